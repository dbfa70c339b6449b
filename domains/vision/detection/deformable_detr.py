"""Deformable DETR (Zhu et al. 2021, https://arxiv.org/abs/2010.04159) trained the DINO way (Zhang et al. 2023,
https://arxiv.org/abs/2203.03605), with an optional one-to-many branch (H-DETR, Jia et al. 2023,
https://arxiv.org/abs/2207.13080), on an ImageNet-pre-trained multi-scale backbone (backbones.py).

The method, piece by piece (each a switch in `DeformableDETRConfig`, so that an ablation can turn it off):
- Multi-scale features: the backbone's maps at strides 8, 16, 32, and further levels made by stride-2 convolutions
  of the last, each brought to width d (1×1 convolution + GroupNorm). The encoder's tokens are every cell of every
  level, with 2-D sine positions plus a learned level embedding.
- Deformable attention (the core's `polyformer.deformable`): each token or query attends to a few points per head
  and level, sampled around its reference point at offsets it predicts, weighted by softmaxed weights it predicts
  — O(tokens) rather than O(tokens²), so all levels fit. Encoder: each cell's centre is its reference point.
- Anchor queries (DAB-DETR, Liu et al. 2022): a query is a content vector plus a box; the box's sine embedding,
  through an MLP, is the query's position, and its (cx, cy, w, h) the reference of its deformable cross-attention.
- `box_refine` (iterative bounding-box refinement, Deformable DETR §4.1): every decoder layer moves the boxes (an
  offset in logit space) and the next layer starts from the moved boxes, without their gradient;
  `look_forward_twice` (DINO §3.5): a layer's box loss also reaches the previous layer's box prediction.
- `two_stage` (Deformable DETR §4.1): every encoder cell proposes a box (its centre, a level-sized side, refined by a
  head) with class scores; the top-scoring proposals become the decoder's anchors, and their loss is added.
  `mixed_query` (DINO §3.4): only the anchors come from the encoder; content queries stay learned embeddings.
- `denoising_queries` (contrastive denoising, DINO §3.3, after DN-DETR, Li et al. 2022): in training, groups of
  noised ground-truth boxes and labels join the queries: positives (noise below `box_noise`) learn to give the
  true box and class back, negatives (noise between one and two times `box_noise`) learn "no object". An attention
  bias keeps the matching queries from seeing them and each group from seeing the others.
- `one_to_many_queries` (H-DETR's hybrid matching): in training, a second set of queries, matched to the ground
  truth repeated `one_to_many_k` times, adds dense positive supervision; it cannot see the one-to-one queries nor
  they it, and it is dropped at inference.
Classification is per-class sigmoid with focal loss (Lin et al. 2017), as in Deformable DETR and DINO; boxes L1 and
generalised IoU; Hungarian matching on focal, L1 and GIoU costs; losses after every decoder layer.

Left out: DINO's sharing of the denoising groups with the two-stage encoder loss, the paper's 900 queries and
width 256 (configurable), DINO's five-scale variant and the deformable self-attention of the decoder (never used).

Shapes: b batch, L levels, m = Σ H_l·W_l encoder tokens, d width, q queries (one-to-one), r one-to-many queries,
p denoising queries, k classes, t ground-truth boxes of an image, D decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from polyformer.attention import MultiHeadAttention
from polyformer.deformable import MultiScaleDeformableAttention
from polyformer.domains.vision.detection.backbones import BackboneConfig, MultiScaleBackbone
from polyformer.domains.vision.detection.detr import (MLP, add_box_terms, box_positions, padded_targets,
                                                     sine_positions_2d, with_total)
from polyformer.layers import FeedForward


@dataclass
class SetLossConfig:
    """Focal classification, L1 and GIoU box losses and their matching costs (DINO's weights)."""

    class_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    class_cost: float = 2.0  # the matcher's weight of the focal class cost
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    encoder_weight: float = 1.0  # two-stage: the weight of the encoder proposals' loss


@dataclass
class DeformableDETRConfig:
    num_classes: int = 91  # object classes (sigmoid per class: no "no object" class)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dim: int = 256
    heads: int = 8
    levels: int = 4  # the backbone's maps, then stride-2 convolutions of the last up to this many
    points: int = 4  # sampling points per head and level
    encoder_depth: int = 6
    decoder_depth: int = 6
    mlp_ratio: float = 4.0  # feed-forward width = mlp_ratio · dim (Deformable DETR: 1024 at width 256)
    dropout: float = 0.0  # DINO's; Deformable DETR's is 0.1
    num_queries: int = 300
    box_refine: bool = True
    look_forward_twice: bool = True
    two_stage: bool = True
    mixed_query: bool = True  # two-stage anchors with learned content (DINO); False: content from the encoder too
    denoising_queries: int = 100  # contrastive denoising: at most this many queries in all groups (DINO: 2·t per group); 0: off
    box_noise: float = 0.4  # DINO's dn_box_noise_scale: corners move by up to box_noise · half the side (positives)
    label_noise: float = 0.5  # DINO's dn_label_noise_ratio: half of this share of labels is replaced at random
    one_to_many_queries: int = 0  # H-DETR's hybrid branch (training only); 0: off
    one_to_many_k: int = 6  # the ground truth repeated this many times for it
    one_to_many_weight: float = 1.0
    loss: SetLossConfig = field(default_factory=SetLossConfig)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.num_queries < 1:
            raise ValueError(f"num_classes and num_queries must be positive, found {self.num_classes} and "
                             f"{self.num_queries}")
        if self.dim % 32 or self.dim < 64 or self.dim % self.heads:
            raise ValueError(f"dim must be a multiple of 32 and of heads, and at least 64 (GroupNorm's 32 groups of "
                             f"at least 2 channels: a 1×1 map still normalises), found dim={self.dim}, "
                             f"heads={self.heads}")
        if self.levels < len(self.backbone.strides):
            raise ValueError(f"levels ({self.levels}) must be at least the backbone's {len(self.backbone.strides)} "
                             f"maps (strides {self.backbone.strides})")
        if self.mixed_query and not self.two_stage:
            raise ValueError("mixed_query selects anchors from the encoder's proposals: it needs two_stage=True")
        if self.look_forward_twice and not self.box_refine:
            raise ValueError("look_forward_twice passes gradients between refined boxes: it needs box_refine=True")
        if min(self.denoising_queries, self.one_to_many_queries, self.one_to_many_k - 1) < 0:
            raise ValueError(f"denoising_queries and one_to_many_queries must be >= 0 and one_to_many_k >= 1, found "
                             f"{self.denoising_queries}, {self.one_to_many_queries}, {self.one_to_many_k}")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: Tensor) -> Tensor:
    """(b h w) padding mask → (b 2): the share of each side that is image, as (x, y)."""
    height = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]
    width = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]
    return torch.stack((width, height), dim=-1)


def cell_centres(shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Every cell's centre, (b m 2) as (x, y) in [0, 1] of the image part of its level; ratios (b L 2)."""
    centres = []
    for level, (height, width) in enumerate(shapes):
        y, x = torch.meshgrid(torch.arange(height, device=ratios.device) + 0.5,
                              torch.arange(width, device=ratios.device) + 0.5, indexing="ij")
        x = x.reshape(1, -1) / (ratios[:, None, level, 0] * width)
        y = y.reshape(1, -1) / (ratios[:, None, level, 1] * height)
        centres.append(torch.stack((x, y), dim=-1))
    return torch.cat(centres, dim=1)


def query_bias(one_to_one: int, one_to_many: int, groups: list[int], device: torch.device) -> Tensor:
    """(n n) self-attention bias over the queries [one-to-one | one-to-many | denoising groups]: each part sees
    itself only, except that denoising queries also see the one-to-one queries (DN-DETR's and DINO's mask: the
    matching queries never see a denoising query, nor one group another); -inf where a key is hidden."""
    sizes = [one_to_one, one_to_many, *groups]
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    allowed = (segment[:, None] == segment[None, :]) | ((segment[:, None] >= 2) & (segment[None, :] == 0))
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then the feed-forward."""

    def __init__(self, config: DeformableDETRConfig):
        super().__init__()
        c = config
        self.attn = MultiScaleDeformableAttention(c.dim, heads=c.heads, levels=c.levels, points=c.points)
        self.norm1, self.norm2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.mlp = FeedForward(c.dim, int(c.mlp_ratio * c.dim), "relu", dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]], mask: Tensor
                ) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x + pos, reference, x, shapes, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention among the queries (the core's), deformable cross-attention around each query's
    box, the feed-forward."""

    def __init__(self, config: DeformableDETRConfig):
        super().__init__()
        c = config
        self.self_attn = MultiHeadAttention(c.dim, c.heads, dropout=c.dropout)
        self.cross_attn = MultiScaleDeformableAttention(c.dim, heads=c.heads, levels=c.levels, points=c.points)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.mlp = FeedForward(c.dim, int(c.mlp_ratio * c.dim), "relu", dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, query_pos: Tensor, boxes: Tensor, memory: Tensor, shapes: list[tuple[int, int]],
                memory_mask: Tensor, bias: Tensor | None) -> Tensor:
        """x, query_pos (b n d); boxes (b n L 4): each query's reference box on every level."""
        positioned = x + query_pos  # positions on the queries and keys, not the values
        x = self.norm1(x + self.self_attn.attend(positioned, positioned, x, attn_bias=bias))
        x = self.norm2(x + self.drop(self.cross_attn(x + query_pos, boxes, memory, shapes, memory_mask)))
        return self.norm3(x + self.drop(self.mlp(x)))


@dataclass
class Denoising:
    """Contrastive denoising queries of a batch: `groups` groups of 2·t_max (positives, then negatives) per image,
    padded where an image has fewer boxes."""

    content: Tensor  # (b p d) embeddings of the noised labels
    boxes: Tensor  # (b p 4) noised boxes: the queries' anchors
    labels: Tensor  # (b p) the true labels
    target_boxes: Tensor  # (b p 4) the true boxes
    positive: Tensor  # (b p) True at a real positive query (reconstructs its box)
    negative: Tensor  # (b p) True at a real negative query (learns "no object")
    groups: int


def make_denoising(targets: list[dict[str, Tensor]], config: DeformableDETRConfig, label_embed: nn.Embedding
                   ) -> Denoising | None:
    """DINO's contrastive denoising queries for a batch; None when no image has a box."""
    most = max(len(t["labels"]) for t in targets)
    if most == 0:
        return None
    groups, b, device = max(config.denoising_queries // (2 * most), 1), len(targets), label_embed.weight.device
    labels, boxes, real = padded_targets(targets, device)
    # each group: the boxes twice, first as positives then as negatives
    labels, boxes, real = (t.repeat(1, 2 * groups, *([1] * (t.ndim - 2))) for t in (labels, boxes, real))
    negative = (torch.arange(2 * groups * most, device=device) // most % 2 == 1)[None].expand(b, -1)
    swap = torch.rand(labels.shape, device=device) < config.label_noise * 0.5
    noised_labels = torch.where(swap, torch.randint_like(labels, config.num_classes), labels)
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half = torch.cat((boxes[..., 2:], boxes[..., 2:]), dim=-1) / 2
    size = torch.rand_like(corners) + negative[..., None].float()  # [0, 1) for positives, [1, 2) for negatives
    sign = torch.randint_like(corners, 2) * 2 - 1
    noised = (corners + sign * size * half * config.box_noise).clamp(0, 1)
    noised = box_convert(noised, "xyxy", "cxcywh")
    noised = torch.cat((noised[..., :2], noised[..., 2:].clamp(min=1e-3)), dim=-1)
    return Denoising(label_embed(noised_labels), noised, labels, boxes, real & ~negative, real & negative, groups)


@dataclass
class Outputs:
    """One batch's predictions: per decoder layer for the one-to-one queries (the detections), and in training the
    pieces whose losses are added."""

    logits: Tensor  # (D b q k)
    boxes: Tensor  # (D b q 4) as (cx, cy, w, h) in [0, 1]
    encoder: tuple[Tensor, Tensor] | None = None  # two-stage: the selected proposals' (logits (b q k), boxes)
    one_to_many: tuple[Tensor, Tensor] | None = None  # (D b r k), (D b r 4)
    denoising: tuple[Tensor, Tensor, Denoising] | None = None  # (D b p k), (D b p 4), the queries


class DeformableDETR(nn.Module):
    """(b 3 H W) ImageNet-normalised images and their (b H W) padding mask → `Outputs`."""

    def __init__(self, config: DeformableDETRConfig):
        super().__init__()
        self.config = c = config
        self.backbone = MultiScaleBackbone(c.backbone)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, c.dim, kernel_size=1), nn.GroupNorm(32, c.dim))
            for channels in self.backbone.channels)
        extra, last = c.levels - len(self.backbone.channels), self.backbone.channels[-1]
        self.extra_levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(last if i == 0 else c.dim, c.dim, kernel_size=3, stride=2, padding=1),
                          nn.GroupNorm(32, c.dim)) for i in range(extra))
        self.level_embed = nn.Parameter(torch.randn(c.levels, c.dim))  # normal(0, 1), as the original
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_depth))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.dim)
        self.query_pos_head = MLP([2 * c.dim, c.dim, c.dim])
        # the heads of every decoder layer are shared (DINO's default)
        self.class_head = nn.Linear(c.dim, c.num_classes)
        self.box_head = MLP([c.dim, c.dim, c.dim, 4])
        total = c.num_queries + c.one_to_many_queries
        self.content = nn.Embedding(total, c.dim)
        if c.two_stage:
            self.proposal_proj = nn.Sequential(nn.Linear(c.dim, c.dim), nn.LayerNorm(c.dim))
            self.proposal_class = nn.Linear(c.dim, c.num_classes)
            self.proposal_box = MLP([c.dim, c.dim, c.dim, 4])
            if not c.mixed_query:
                self.content_from_memory = nn.Sequential(nn.Linear(c.dim, c.dim), nn.LayerNorm(c.dim))
        else:  # learned anchors in logit space: centres over the image, sides a tenth of it
            anchors = torch.cat((torch.rand(total, 2), torch.full((total, 2), 0.1)), dim=1)
            self.anchors = nn.Parameter(inverse_sigmoid(anchors))
        if c.denoising_queries:
            self.label_embed = nn.Embedding(c.num_classes, c.dim)
        self.reset_heads()

    def reset_heads(self) -> None:
        """Focal loss's prior (every class starts at probability 0.01) and zero box offsets, as in the papers."""
        prior = -math.log((1 - 0.01) / 0.01)
        heads = [(self.class_head, self.box_head)]
        if self.config.two_stage:
            heads.append((self.proposal_class, self.proposal_box))
        for class_head, box_head in heads:
            nn.init.constant_(class_head.bias, prior)
            nn.init.zeros_(box_head.layers[-1].weight)
            nn.init.zeros_(box_head.layers[-1].bias)

    def levels(self, images: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The L maps (b d h_l w_l) at width d and their padding masks (b h_l w_l)."""
        features = self.backbone(images)
        maps = [proj(feature) for proj, feature in zip(self.input_proj, features)]
        source = features[-1]
        for extra in self.extra_levels:
            source = extra(source)
            maps.append(source)
        masks = [F.interpolate(padding_mask[:, None].float(), size=m.shape[-2:])[:, 0].bool() for m in maps]
        return maps, masks

    def encode(self, images: Tensor, padding_mask: Tensor
               ) -> tuple[Tensor, Tensor, list[tuple[int, int]], Tensor]:
        """(memory (b m d), its padding mask (b m), the level shapes, valid ratios (b L 2))."""
        maps, masks = self.levels(images, padding_mask)
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        ratios = torch.stack([valid_ratios(mask) for mask in masks], dim=1)  # (b L 2)
        pos = torch.cat([rearrange(sine_positions_2d(mask, self.config.dim), "b h w d -> b (h w) d") + embed
                         for mask, embed in zip(masks, self.level_embed)], dim=1)
        x = torch.cat([rearrange(m, "b d h w -> b (h w) d") for m in maps], dim=1)
        mask = torch.cat([rearrange(m, "b h w -> b (h w)") for m in masks], dim=1)
        reference = cell_centres(shapes, ratios)[:, :, None] * ratios[:, None]  # (b m L 2)
        for layer in self.encoder:
            x = layer(x, pos, reference, shapes, mask)
        return x, mask, shapes, ratios

    def proposals(self, memory: Tensor, mask: Tensor, shapes: list[tuple[int, int]], ratios: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Two-stage: every cell's proposal — (logits (b m k), boxes in logit space (b m 4), projected memory)."""
        sides = torch.cat([torch.full((h * w,), 0.05 * 2.0 ** level, device=memory.device)
                           for level, (h, w) in enumerate(shapes)])
        centres = cell_centres(shapes, ratios)
        boxes = torch.cat((centres, sides[None, :, None].expand(memory.shape[0], -1, 2)), dim=-1)  # (b m 4)
        usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~mask
        projected = self.proposal_proj(memory.masked_fill(~usable[..., None], 0.0))
        logits = self.proposal_class(projected).masked_fill(~usable[..., None], float("-inf"))
        return logits, inverse_sigmoid(boxes) + self.proposal_box(projected), projected

    def queries(self, memory: Tensor, mask: Tensor, shapes: list[tuple[int, int]], ratios: Tensor, total: int
                ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """The first `total` queries' content (b n d) and anchors (b n 4), and the two-stage proposals they came
        from (logits (b n k), boxes (b n 4)) for their loss."""
        b = memory.shape[0]
        if not self.config.two_stage:
            return (self.content.weight[:total].expand(b, -1, -1), self.anchors[:total].sigmoid().expand(b, -1, -1),
                    None)
        logits, boxes, projected = self.proposals(memory, mask, shapes, ratios)
        if logits.shape[1] < total:  # an image with fewer cells than queries: centred boxes that never win
            fill = total - logits.shape[1]
            logits = torch.cat((logits, logits.new_full((b, fill, logits.shape[2]), float("-inf"))), dim=1)
            boxes = torch.cat((boxes, boxes.new_zeros(b, fill, 4)), dim=1)
            projected = torch.cat((projected, projected.new_zeros(b, fill, projected.shape[2])), dim=1)
        top = logits.max(-1).values.topk(total, dim=1).indices  # (b n)
        pick = lambda t: t.gather(1, top[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        chosen_logits, chosen_boxes = pick(logits), pick(boxes)
        anchors = chosen_boxes.detach().sigmoid()
        if self.config.mixed_query:
            content = self.content.weight[:total].expand(b, -1, -1)
        else:
            content = self.content_from_memory(pick(projected).detach())
        return content, anchors, (chosen_logits.nan_to_num(neginf=-1e4), chosen_boxes.sigmoid())

    def decode(self, content: Tensor, anchors: Tensor, memory: Tensor, mask: Tensor, shapes: list[tuple[int, int]],
               ratios: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """Decoder layers over queries (b n d) with anchors (b n 4) → logits (D b n k), boxes (D b n 4)."""
        c = self.config
        x, reference = content, anchors  # the reference boxes a layer attends around (no gradient)
        previous = anchors  # the previous layer's refined boxes, with its box head's gradient (look forward twice)
        scale = torch.cat((ratios, ratios), dim=-1)[:, None]  # (b 1 L 4)
        logits, boxes = [], []
        for layer in self.decoder:
            query_pos = self.query_pos_head(box_positions(reference, c.dim))
            x = layer(x, query_pos, reference[:, :, None] * scale, memory, shapes, mask, bias)
            out = self.decoder_norm(x)
            offset = self.box_head(out)
            refined = (offset + inverse_sigmoid(reference)).sigmoid()  # from the detached reference
            # look forward twice (training: it only changes gradients): the same value, but the loss also reaches
            # the previous layer's box head (one layer back, no further: `previous` came from a detached reference)
            lft = c.look_forward_twice and self.training
            predicted = (offset + inverse_sigmoid(previous)).sigmoid() if lft else refined
            logits.append(self.class_head(out))
            boxes.append(predicted)
            if c.box_refine:
                reference, previous = refined.detach(), refined
        return torch.stack(logits), torch.stack(boxes)

    def forward(self, images: Tensor, padding_mask: Tensor, targets: list[dict[str, Tensor]] | None = None
                ) -> Outputs:
        """With `targets` (training), the one-to-many and denoising queries join when configured."""
        c = self.config
        memory, mask, shapes, ratios = self.encode(images, padding_mask)
        q, r = c.num_queries, c.one_to_many_queries if targets is not None else 0
        content, anchors, proposals = self.queries(memory, mask, shapes, ratios, q + r)
        dn = make_denoising(targets, c, self.label_embed) if targets is not None and c.denoising_queries else None
        groups = []
        if dn is not None:
            content, anchors = torch.cat((content, dn.content), dim=1), torch.cat((anchors, dn.boxes), dim=1)
            groups = [dn.boxes.shape[1] // dn.groups] * dn.groups
        bias = query_bias(q, r, groups, images.device) if r or groups else None
        logits, boxes = self.decode(content, anchors, memory, mask, shapes, ratios, bias)
        out = Outputs(logits[:, :, :q], boxes[:, :, :q])
        if proposals is not None:
            out.encoder = (proposals[0][:, :q], proposals[1][:, :q])
        if r:
            out.one_to_many = (logits[:, :, q:q + r], boxes[:, :, q:q + r])
        if dn is not None:
            out.denoising = (logits[:, :, q + r:], boxes[:, :, q + r:], dn)
        return out


@torch.no_grad()
def focal_match(logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, loss: SetLossConfig
                ) -> tuple[Tensor, Tensor]:
    """One image: the assignment of its q queries to its t boxes minimising focal class + L1 + GIoU cost (Deformable
    DETR's matcher). logits (q k); boxes (q 4), target_boxes (t 4) as (cx, cy, w, h); (query, target) indices."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    alpha, gamma = loss.focal_alpha, loss.focal_gamma
    p = logits.float().sigmoid()[:, labels]  # (q t)
    positive = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    negative = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    cost = (loss.class_cost * (positive - negative) + loss.l1_weight * torch.cdist(boxes.float(), target_boxes, p=1)
            - loss.giou_weight * generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"),
                                                     box_convert(target_boxes, "cxcywh", "xyxy")))
    queries, targets = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)


def focal_class_loss(logits: Tensor, wanted: Tensor, loss: SetLossConfig, num_boxes: int) -> Tensor:
    """Sigmoid focal loss of logits (... k) against class indices `wanted` (...), k meaning "no object", summed and
    divided by the number of ground-truth boxes (Deformable DETR's normalisation)."""
    k = logits.shape[-1]
    onehot = F.one_hot(wanted, k + 1)[..., :k].to(logits.dtype)
    focal = sigmoid_focal_loss(logits, onehot, alpha=loss.focal_alpha, gamma=loss.focal_gamma, reduction="sum")
    return focal / num_boxes


def set_loss(logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], loss: SetLossConfig, repeat: int = 1
             ) -> dict[str, Tensor]:
    """Hungarian-matched losses summed over the layers of logits (D b n k), boxes (D b n 4): "class", "l1", "giou"
    and "total". `repeat` > 1: each image's ground truth repeated that many times (H-DETR's one-to-many)."""
    k = logits.shape[-1]
    num_boxes = max(sum(len(t["labels"]) for t in targets) * repeat, 1)
    terms = {"class": logits.new_zeros(()), "l1": logits.new_zeros(()), "giou": logits.new_zeros(())}
    for layer in range(logits.shape[0]):
        wanted = torch.full(logits.shape[1:3], k, dtype=torch.long, device=logits.device)  # (b n): no object
        matched, truth = [], []
        for i, target in enumerate(targets):
            labels, target_boxes = target["labels"].repeat(repeat), target["boxes"].repeat(repeat, 1)
            queries, indices = focal_match(logits[layer, i], boxes[layer, i], labels, target_boxes, loss)
            wanted[i, queries] = labels[indices]
            matched.append(boxes[layer, i, queries])
            truth.append(target_boxes[indices])
        terms["class"] = terms["class"] + focal_class_loss(logits[layer], wanted, loss, num_boxes)
        add_box_terms(terms, torch.cat(matched), torch.cat(truth), num_boxes)
    return with_total(terms, loss)


def denoising_loss(logits: Tensor, boxes: Tensor, dn: Denoising, loss: SetLossConfig) -> dict[str, Tensor]:
    """Contrastive denoising, no matching: positives against the box and class they were made from, negatives
    toward "no object"; summed over the layers, per ground-truth box and group."""
    k = logits.shape[-1]
    num_boxes = max(int(dn.positive.sum()), 1)
    wanted = torch.where(dn.positive, dn.labels, torch.full_like(dn.labels, k))
    real = dn.positive | dn.negative
    terms = {"class": logits.new_zeros(()), "l1": logits.new_zeros(()), "giou": logits.new_zeros(())}
    for layer in range(logits.shape[0]):
        terms["class"] = terms["class"] + focal_class_loss(logits[layer][real], wanted[real], loss, num_boxes)
        add_box_terms(terms, boxes[layer][dn.positive], dn.target_boxes[dn.positive], num_boxes)
    return with_total(terms, loss)


def detection_loss(out: Outputs, targets: list[dict[str, Tensor]], config: DeformableDETRConfig
                   ) -> dict[str, Tensor]:
    """Every loss term of `out`: the one-to-one set loss ("class", "l1", "giou"), and "encoder", "one_to_many",
    "denoising" where present; "total" their weighted sum."""
    lc = config.loss
    terms = set_loss(out.logits, out.boxes, targets, lc)
    total = terms["total"]
    if out.encoder is not None:
        terms["encoder"] = set_loss(out.encoder[0][None], out.encoder[1][None], targets, lc)["total"]
        total = total + lc.encoder_weight * terms["encoder"]
    if out.one_to_many is not None:
        terms["one_to_many"] = set_loss(*out.one_to_many, targets, lc, repeat=config.one_to_many_k)["total"]
        total = total + config.one_to_many_weight * terms["one_to_many"]
    if out.denoising is not None:
        terms["denoising"] = denoising_loss(*out.denoising, lc)["total"]
        total = total + terms["denoising"]
    terms["total"] = total
    return terms


def top_detections(logits: Tensor, boxes: Tensor, sizes: Tensor, keep: int = 100) -> list[dict[str, Tensor]]:
    """Per image, the `keep` best (query, class) pairs by sigmoid score (Deformable DETR's post-processing), boxes
    in pixels (x0, y0, x1, y1) of an image of sizes[i] = (height, width). logits (b q k), boxes (b q 4)."""
    b, q, k = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(keep, q * k), dim=1)
    labels, query = index % k, index // k
    height, width = sizes.unbind(-1)
    scale = torch.stack((width, height, width, height), dim=-1)[:, None].to(boxes.dtype)  # (b 1 4)
    chosen = boxes.float().gather(1, query[..., None].expand(-1, -1, 4))  # float: pixels exact under autocast
    pixels = box_convert(chosen, "cxcywh", "xyxy") * scale.float()
    return [{"boxes": pixels[i], "scores": scores[i], "labels": labels[i]} for i in range(b)]
