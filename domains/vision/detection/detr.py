"""DETR (Carion et al. 2020, https://arxiv.org/abs/2005.12872): detection as set prediction on the core's encoder and
decoder.

A CNN (or the Swin of swin.py) turns the padded image batch into a feature map; a 1×1 convolution brings it to the
transformer's width, and its H'·W' cells become the tokens of an encoder of the core's blocks, with 2-D sine
positions added to queries and keys (not values) at every layer (`PositionedBlock`; padding cells masked). The
decoder lets a fixed set of learned object queries (their embeddings are the decoder's query positions; its input starts at zero) attend to the
encoded image. Every query predicts a class — one of the k classes or "no object" — and a box (cx, cy, w, h) in
[0, 1] of the unpadded image. Training matches predictions to the ground truth one-to-one (Hungarian matching on a
cost of class probability, L1 and generalised IoU of the boxes) and penalises: cross-entropy for every query (the
unmatched ones toward "no object", down-weighted), L1 and generalised-IoU losses for the matched boxes — after every
decoder layer (auxiliary losses), with the heads shared.

`queries: anchor` is DAB-DETR's faster-converging decoder (Liu et al. 2022): each query is a learned box whose sine
embedding, through a small MLP, gives the query position of every decoder layer, and every layer moves the boxes
(its box head predicts an offset in logit space). Left out of DAB-DETR: the width/height-modulated attention and
the content-conditioned scaling of the positions.
With `denoising_groups` (DN-DETR, Li et al. 2022), training adds groups of noised ground-truth boxes (the anchors)
and labels (the content, through a label embedding) as extra queries, which learn to give back the truth without
matching; an attention bias keeps the matching queries from seeing them and each group from seeing the others.

Shapes: b batch, (H W) padded image, (h w) feature map, m = h·w tokens, d width, q queries, k classes (+1 no-object),
L decoder layers, t ground-truth boxes of an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from polyformer.domains.vision.swin import SwinConfig, SwinTransformer
from polyformer.transformer import TransformerBlock, TransformerConfig, TransformerDecoder, TransformerEncoder

Backbone = Literal["resnet18", "resnet34", "resnet50", "swin"]


@dataclass
class DETRLossConfig:
    """Matching costs and loss weights (DETR's: class 1, L1 5, GIoU 2; no-object weight 0.1)."""

    class_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1  # DETR's eos_coef: the cross-entropy weight of the "no object" class
    aux_loss: bool = True  # the same losses after every decoder layer


@dataclass
class DETRConfig:
    num_classes: int = 91  # object classes, without "no object"
    backbone: Backbone = "resnet50"  # torchvision's ResNets (random init: nothing is downloaded) or swin.py's Swin
    backbone_stride: Literal[16, 32] = 32  # ResNets: stop after layer3 (16) or layer4 (32)
    pretrained_backbone: bool = False  # ResNets: torchvision's ImageNet weights (downloaded: only when asked)
    swin: SwinConfig | None = None  # the Swin backbone's config (num_classes ignored); its last stage is read
    dim: int = 256
    heads: int = 8
    encoder_depth: int = 6
    decoder_depth: int = 6
    mlp_ratio: float = 8.0  # DETR's 2048-wide feed-forward at width 256
    dropout: float = 0.1
    num_queries: int = 100
    # learned: DETR's query embeddings; anchor: DAB-DETR's (Liu et al. 2022, https://arxiv.org/abs/2201.12329)
    # learned boxes as queries, their sine embedding the query positions, each layer refining the boxes
    queries: Literal["learned", "anchor"] = "learned"
    # DN-DETR (Li et al. 2022, https://arxiv.org/abs/2203.01305), with anchor queries: in training, groups of noised
    # ground-truth boxes and labels join the queries and learn to reconstruct the truth (no matching)
    denoising_groups: int = 0
    box_noise: float = 0.4  # centres move up to box_noise · half the side, sides scale by up to 1 ± box_noise
    label_noise: float = 0.2  # the share of noised labels replaced by a random class
    prenorm: bool = True  # DETR's normalize_before variant (pre-norm, a final norm on encoder and decoder)
    loss: DETRLossConfig = field(default_factory=DETRLossConfig)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.num_queries < 1:
            raise ValueError(f"num_classes and num_queries must be positive, found {self.num_classes} and "
                             f"{self.num_queries}")
        if self.backbone not in ("resnet18", "resnet34", "resnet50", "swin"):
            raise ValueError(f"backbone must be resnet18, resnet34, resnet50 or swin, found {self.backbone!r}")
        if self.queries not in ("learned", "anchor"):
            raise ValueError(f"queries must be 'learned' or 'anchor', found {self.queries!r}")
        if self.denoising_groups < 0 or (self.denoising_groups and self.queries != "anchor"):
            raise ValueError(f"denoising_groups must be >= 0 and needs queries='anchor' (its noised boxes are anchors), "
                             f"found denoising_groups={self.denoising_groups}, queries={self.queries!r}")

    def transformer(self, depth: int) -> TransformerConfig:
        return TransformerConfig(dim=self.dim, depth=depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                                 activation="relu", dropout=self.dropout, attn_dropout=self.dropout,
                                 prenorm=self.prenorm, final_norm=True)


def sine_encode(angle: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """(...) angles → (... channels): sines on even channels, cosines on odd, at geometric frequencies."""
    frequencies = temperature ** (2 * (torch.arange(channels, device=angle.device) // 2) / channels)
    phase = angle[..., None] / frequencies
    return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_positions_2d(padding_mask: Tensor, dim: int) -> Tensor:
    """DETR's 2-D sine positions: each real cell's row and column, counted over real cells and scaled to [0, 2π],
    each in dim/2 sine/cosine channels. padding_mask (b h w) True at padding → (b h w d)."""
    if dim % 4:
        raise ValueError(f"2-D sine positions need a width divisible by 4, found {dim}")
    real = (~padding_mask).float()
    rows, cols = real.cumsum(1), real.cumsum(2)
    rows = rows / (rows[:, -1:, :] + 1e-6) * 2 * math.pi
    cols = cols / (cols[:, :, -1:] + 1e-6) * 2 * math.pi
    return torch.cat((sine_encode(rows, dim // 2), sine_encode(cols, dim // 2)), dim=-1)


def box_positions(boxes: Tensor, dim: int) -> Tensor:
    """DAB-DETR's query positions before their MLP: (... 4) boxes (cx, cy, w, h) in [0, 1] → (... 2d), each
    coordinate (× 2π) in d/2 sine/cosine channels, in the order (cy, cx, w, h) of the feature map's (rows, cols)."""
    angles = boxes[..., [1, 0, 2, 3]] * 2 * math.pi
    return torch.cat([sine_encode(angles[..., i], dim // 2) for i in range(4)], dim=-1)


class ResNetBackbone(nn.Module):
    """torchvision's ResNet up to layer3 (stride 16) or layer4 (stride 32): (b 3 H W) → (b c h w)."""

    def __init__(self, name: str, stride: int, pretrained: bool = False):
        super().__init__()
        resnet = getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None)
        layers = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"] + (["layer4"] if stride == 32
                                                                                      else [])
        self.body = nn.Sequential(*[getattr(resnet, layer) for layer in layers])
        last = resnet.layer4 if stride == 32 else resnet.layer3
        self.channels = last[-1].conv3.out_channels if hasattr(last[-1], "conv3") else last[-1].conv2.out_channels

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)


class SwinBackbone(nn.Module):
    """swin.py's Swin, its last stage normed: (b 3 H W) → (b c h w)."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.swin = SwinTransformer(config)
        self.channels = self.swin.num_features

    def forward(self, images: Tensor) -> Tensor:
        return rearrange(self.swin.norm(self.swin.stages(images)[-1]), "b h w c -> b c h w")


class MLP(nn.Module):
    """DETR's small MLPs (ReLU between layers): the box head (a query's output → its box in logit space, 3 layers)
    and DAB-DETR's query-position head (2 layers)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class Denoising:
    """DN-DETR's extra queries for one batch: p = groups · t_max per image, padded where an image has fewer boxes."""

    content: Tensor  # (b p d) embeddings of the noised labels
    boxes: Tensor  # (b p 4) noised boxes: the queries' anchors
    labels: Tensor  # (b p) the true labels to reconstruct
    target_boxes: Tensor  # (b p 4) the true boxes
    valid: Tensor  # (b p) False at padding
    groups: int


def padded_targets(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Every image's ground truth padded to the batch's most boxes t: labels (b t), boxes (b t 4) (padding: 0 and
    a centred half-size box) and real (b t), False at padding."""
    b, most = len(targets), max(len(t["labels"]) for t in targets)
    labels = torch.zeros(b, most, dtype=torch.long, device=device)
    boxes = torch.full((b, most, 4), 0.5, device=device)
    real = torch.zeros(b, most, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        labels[i, :n], boxes[i, :n], real[i, :n] = target["labels"], target["boxes"], True
    return labels, boxes, real


def make_denoising(targets: list[dict[str, Tensor]], config: DETRConfig, label_embed: nn.Embedding) -> Denoising | None:
    """Noised copies of every image's ground truth, `config.denoising_groups` of them; None when no image has a box."""
    if max(len(t["labels"]) for t in targets) == 0:
        return None
    groups, device = config.denoising_groups, label_embed.weight.device
    labels, boxes, valid = padded_targets(targets, device)
    labels, boxes, valid = (t.repeat(1, groups, *([1] * (t.ndim - 2))) for t in (labels, boxes, valid))
    noised_labels = torch.where(torch.rand(labels.shape, device=device) < config.label_noise,
                                torch.randint_like(labels, config.num_classes), labels)
    scale = torch.cat((boxes[..., 2:] / 2, boxes[..., 2:]), dim=-1)  # (half w, half h, w, h)
    noised = boxes + (torch.rand_like(boxes) * 2 - 1) * config.box_noise * scale
    noised = torch.cat((noised[..., :2].clamp(0, 1), noised[..., 2:].clamp(1e-3, 1)), dim=-1)
    return Denoising(label_embed(noised_labels), noised, labels, boxes, valid, groups)


def denoising_bias(queries: int, dn: Denoising) -> Tensor:
    """(q+p, q+p) self-attention bias: the matching queries never see the denoising ones, nor one group another."""
    p = dn.boxes.shape[1]
    size = p // dn.groups
    group = torch.cat((torch.full((queries,), -1), torch.arange(p) // size)).to(dn.boxes.device)
    blocked = (group[None, :] >= 0) & (group[:, None] != group[None, :])  # a key in a group other than the query's
    return torch.zeros(blocked.shape, device=dn.boxes.device).masked_fill(blocked, float("-inf"))


class PositionedBlock(TransformerBlock):
    """The core's block with DETR's positions: added to every attention's queries and keys, never to its values, at
    every layer (the same parameters as TransformerBlock)."""

    def forward(self, x: Tensor, memory: Tensor | None = None, *, pos: Tensor, memory_pos: Tensor | None = None,
                key_padding_mask: Tensor | None = None, memory_padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> Tensor:
        """x, pos (b n d); memory, memory_pos (b m d); attn_bias: added to the self-attention scores."""
        def attend(h: Tensor) -> Tensor:
            positioned = h + pos
            return self.attn.attend(positioned, positioned, h, key_padding_mask=key_padding_mask, attn_bias=attn_bias)

        x = self.residual(x, self.norm1, attend, self.ls1)
        if memory is not None:
            keys = memory if memory_pos is None else memory + memory_pos
            x = self.residual(x, self.norm_cross, lambda h: self.cross_attn.attend(
                h + pos, keys, memory, key_padding_mask=memory_padding_mask), self.ls_cross)
        return self.residual(x, self.norm2, self.mlp, self.ls2)


class PositionedEncoder(TransformerEncoder):
    """DETR's encoder: (b m d) tokens and their (b m d) positions → (b m d)."""

    block_type = PositionedBlock

    def forward(self, x: Tensor, pos: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, pos=pos, key_padding_mask=key_padding_mask)
        return self.norm(x)


class PositionedDecoder(TransformerDecoder):
    """DETR's decoder: queries (b q d) with their positions (b q d) over the memory (b m d) with its positions →
    every layer's output through the final norm (L b q d), for the losses at every layer."""

    block_type = PositionedBlock

    def forward(self, x: Tensor, memory: Tensor, pos: Tensor, memory_pos: Tensor, *,
                memory_padding_mask: Tensor | None = None) -> Tensor:
        outputs = []
        for block in self.blocks:
            x = block(x, memory, pos=pos, memory_pos=memory_pos, memory_padding_mask=memory_padding_mask)
            outputs.append(self.norm(x))
        return torch.stack(outputs)


class DETR(nn.Module):
    """(b 3 H W) images and their (b H W) padding mask → logits (L b q k+1) and boxes (L b q 4), one per decoder
    layer (the last is the prediction)."""

    def __init__(self, config: DETRConfig):
        super().__init__()
        self.config = c = config
        self.backbone = SwinBackbone(c.swin or SwinConfig(num_classes=0)) if c.backbone == "swin" \
            else ResNetBackbone(c.backbone, c.backbone_stride, c.pretrained_backbone)
        self.input_proj = nn.Conv2d(self.backbone.channels, c.dim, kernel_size=1)
        self.encoder = PositionedEncoder(c.transformer(c.encoder_depth))
        self.decoder = PositionedDecoder(c.transformer(c.decoder_depth))
        self.class_head = nn.Linear(c.dim, c.num_classes + 1)
        self.box_head = MLP([c.dim, c.dim, c.dim, 4])
        if c.queries == "learned":
            self.query_embed = nn.Embedding(c.num_queries, c.dim)
        else:  # boxes in logit space: centres spread over the image, sides a tenth of it
            anchors = torch.cat((torch.rand(c.num_queries, 2), torch.full((c.num_queries, 2), 0.1)), dim=1)
            self.anchors = nn.Parameter(torch.logit(anchors, eps=1e-4))
            self.query_pos_head = MLP([2 * c.dim, c.dim, c.dim])
        if c.denoising_groups:
            self.label_embed = nn.Embedding(c.num_classes, c.dim)

    def encode(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(memory (b m d), its padding mask (b m), its positions (b m d))."""
        features = self.input_proj(self.backbone(images))  # (b d h w)
        mask = F.interpolate(padding_mask[:, None].float(), size=features.shape[-2:])[:, 0].bool()  # (b h w)
        pos = rearrange(sine_positions_2d(mask, self.config.dim), "b h w d -> b (h w) d")
        tokens, mask = rearrange(features, "b d h w -> b (h w) d"), rearrange(mask, "b h w -> b (h w)")
        return self.encoder(tokens, pos, key_padding_mask=mask), mask, pos

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        memory, mask, pos = self.encode(images, padding_mask)
        if self.config.queries == "anchor":
            return self.anchor_decoder(memory, mask, pos)
        queries = self.query_embed.weight.expand(images.shape[0], -1, -1)  # (b q d)
        outputs = self.decoder(torch.zeros_like(queries), memory, queries, pos, memory_padding_mask=mask)  # (L b q d)
        return self.class_head(outputs), self.box_head(outputs).sigmoid()

    def forward_denoising(self, images: Tensor, padding_mask: Tensor, targets: list[dict[str, Tensor]]
                          ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Denoising] | None]:
        """Training with DN-DETR: the matching queries' (logits, boxes), as forward() gives them, and the denoising
        queries' (logits (L b p k+1), boxes (L b p 4), their Denoising) — None when the batch has no box."""
        memory, mask, pos = self.encode(images, padding_mask)
        dn = make_denoising(targets, self.config, self.label_embed)
        logits, boxes = self.anchor_decoder(memory, mask, pos, dn)
        q = self.config.num_queries
        if dn is None:
            return logits, boxes, None
        return logits[:, :, :q], boxes[:, :, :q], (logits[:, :, q:], boxes[:, :, q:], dn)

    def anchor_decoder(self, memory: Tensor, mask: Tensor, pos: Tensor, dn: Denoising | None = None
                       ) -> tuple[Tensor, Tensor]:
        """DAB-DETR's decoding: each core decoder block gets its query positions from the current boxes, then the
        box head moves them (in logit space); the next layer starts from the moved boxes, without their gradient.
        With `dn`, its queries follow the matching ones (which cannot see them)."""
        boxes = self.anchors.sigmoid().expand(memory.shape[0], -1, -1)  # (b q 4)
        x = memory.new_zeros(boxes.shape[:2] + (self.config.dim,))  # (b q d): content starts at zero
        padding = bias = None
        if dn is not None:
            padding = torch.cat((torch.zeros_like(boxes[..., 0], dtype=torch.bool), ~dn.valid), dim=1)
            bias = denoising_bias(boxes.shape[1], dn)
            boxes, x = torch.cat((boxes, dn.boxes), dim=1), torch.cat((x, dn.content), dim=1)
        outputs, layer_boxes = [], []
        for block in self.decoder.blocks:
            query_pos = self.query_pos_head(box_positions(boxes, self.config.dim))
            x = block(x, memory, key_padding_mask=padding, memory_padding_mask=mask, pos=query_pos, memory_pos=pos,
                      attn_bias=bias)
            out = self.decoder.norm(x)
            refined = (torch.logit(boxes, eps=1e-4) + self.box_head(out)).sigmoid()
            outputs.append(out)
            layer_boxes.append(refined)
            boxes = refined.detach()
        return self.class_head(torch.stack(outputs)), torch.stack(layer_boxes)


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor,
                    loss: DETRLossConfig) -> tuple[Tensor, Tensor]:
    """One image: the assignment of queries to its t boxes minimising class + L1 + GIoU cost. logits (q k+1),
    boxes (q 4) and target_boxes (t 4) as (cx, cy, w, h); returns (query indices, target indices), t of each."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = (-loss.class_weight * logits.softmax(-1)[:, labels]
            + loss.l1_weight * torch.cdist(boxes, target_boxes, p=1)
            - loss.giou_weight * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                     box_convert(target_boxes, "cxcywh", "xyxy")))
    queries, targets = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)


def detr_loss(logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], loss: DETRLossConfig
              ) -> dict[str, Tensor]:
    """Summed over the decoder layers that count (all with aux_loss, else the last): "class" (cross-entropy with the
    no-object weight), "l1" and "giou" (matched boxes, per ground-truth box), and "total" (weighted)."""
    layers = range(logits.shape[0]) if loss.aux_loss else [logits.shape[0] - 1]
    k = logits.shape[-1] - 1
    class_weights = torch.ones(k + 1, device=logits.device)
    class_weights[k] = loss.no_object_weight
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    terms = {"class": logits.new_zeros(()), "l1": logits.new_zeros(()), "giou": logits.new_zeros(())}
    for layer in layers:
        wanted = torch.full(logits.shape[1:3], k, dtype=torch.long, device=logits.device)  # (b q): no object
        matched, truth = [], []
        for i, target in enumerate(targets):
            queries, indices = hungarian_match(logits[layer, i], boxes[layer, i], target["labels"],
                                               target["boxes"], loss)
            wanted[i, queries] = target["labels"][indices]
            matched.append(boxes[layer, i, queries])
            truth.append(target["boxes"][indices])
        terms["class"] = terms["class"] + F.cross_entropy(logits[layer].transpose(1, 2), wanted, class_weights)
        add_box_terms(terms, torch.cat(matched), torch.cat(truth), num_boxes)
    return with_total(terms, loss)


def add_box_terms(terms: dict[str, Tensor], predicted: Tensor, truth: Tensor, num_boxes: int) -> None:
    """Adds one layer's L1 and generalised-IoU losses of predicted vs true (n 4) boxes, per ground-truth box."""
    terms["l1"] = terms["l1"] + F.l1_loss(predicted, truth, reduction="sum") / num_boxes
    giou = generalized_box_iou(box_convert(predicted, "cxcywh", "xyxy"), box_convert(truth, "cxcywh", "xyxy"))
    terms["giou"] = terms["giou"] + (1 - giou.diagonal()).sum() / num_boxes


def with_total(terms: dict[str, Tensor], loss: DETRLossConfig) -> dict[str, Tensor]:
    terms["total"] = loss.class_weight * terms["class"] + loss.l1_weight * terms["l1"] + \
        loss.giou_weight * terms["giou"]
    return terms


def denoising_loss(logits: Tensor, boxes: Tensor, dn: Denoising, loss: DETRLossConfig) -> dict[str, Tensor]:
    """DN-DETR's reconstruction loss, summed over the layers: every real denoising query against the box it was
    made from (no matching) — cross-entropy, L1 and GIoU, per ground-truth box and group; "total" weighted."""
    valid = dn.valid
    num_boxes = max(int(valid.sum()), 1)
    terms = {"class": logits.new_zeros(()), "l1": logits.new_zeros(()), "giou": logits.new_zeros(())}
    truth = dn.target_boxes[valid]
    for layer in range(logits.shape[0]):
        terms["class"] = terms["class"] + F.cross_entropy(logits[layer][valid], dn.labels[valid])
        add_box_terms(terms, boxes[layer][valid], truth, num_boxes)
    return with_total(terms, loss)


def detections(logits: Tensor, boxes: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
    """Per image: every query's most likely real class and its probability, and its box in pixels (x0, y0, x1, y1)
    of an image of sizes[i] = (height, width). logits (b q k+1), boxes (b q 4)."""
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    height, width = sizes.unbind(-1)
    scale = torch.stack((width, height, width, height), dim=-1)[:, None].to(boxes.dtype)  # (b 1 4)
    pixels = box_convert(boxes, "cxcywh", "xyxy") * scale
    return [{"boxes": pixels[i], "scores": scores[i], "labels": labels[i]} for i in range(len(logits))]
