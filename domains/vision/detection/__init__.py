"""Detection: DETR and Deformable DETR (DINO's training) on the Polyformer core, a torchvision Faster R-CNN peer, the
multi-scale backbones they share (ResNet, EfficientNet-Lite0 with its ImageNet weights, Swin) and VOC / COCO data."""

from polyformer.domains.vision.detection.backbones import BackboneConfig, MultiScaleBackbone
from polyformer.domains.vision.detection.data import VOCDetectionDataModule
from polyformer.domains.vision.detection.deformable_detr import DeformableDETR, DeformableDETRConfig
from polyformer.domains.vision.detection.detr import DETR, DETRConfig
from polyformer.domains.vision.detection.task import DeformableDetectionTask, DetectionTask, DetectorTask
