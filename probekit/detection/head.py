"""An FCOS-style box head on frozen token maps, and G of them trained as one batch.

One head (`BoxHead`), for the token maps of one layer set:

- levels: one layer's map (stride s) made a simple feature pyramid as ViTDet does (a 1x1
  projection to `width` channels, then per scale: 4 and 2 by transposed 2x2 convolutions,
  1 as is, 0.5 by 2x2 max pooling; no top-down path), or several layers' maps at their own
  strides (a CNN's stages), each projected; every level normalized (GroupNorm; the
  convolutions before a normalization have no bias);
- a tower shared by the levels (`depth` 3x3 convolutions, GroupNorm, ReLU), then 3x3 outputs:
  class logits (C, bias at a 1% prior), the distances to a box's four sides (ReLU, in units of
  the level's stride), and centerness.

Training targets are FCOS's: a location is a positive of the smallest box that holds it, within
1.5 strides of the box's centre and whose largest distance falls in the level's range (up to 8
strides; the last level unbounded); a location inside a crowd or difficult box and no other is
ignored. Loss: torchvision's `sigmoid_focal_loss` (alpha 0.25, gamma 2) over the locations,
`generalized_box_iou_loss` on the positives weighted by their centerness targets, and binary
cross-entropy of centerness, each over the batch's positives. Decoding: scores are
sqrt(sigmoid(class) x sigmoid(centerness)), at least 0.05, the 1000 best a level, boxes clipped
to the input, class-wise NMS at IoU 0.6 (`batched_nms`), the 100 best an image.

The G heads of a grid (its lr x wd configurations) are `torch.func.stack_module_state` copies
of one module run under `vmap`: each head has its own parameters and gradients (a batched head
steps exactly as it would alone).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BoxHead",
    "GridHeads",
    "LevelSpec",
    "Targets",
    "decode",
    "detection_loss",
    "locations",
    "targets",
]

PRIOR = 0.01  # the class logits' bias: sigmoid(bias) = PRIOR
CENTER_RADIUS = 1.5  # positives within this many strides of a box's centre
SCORE_MIN, PRE_NMS, NMS_IOU, PER_IMAGE = 0.05, 1000, 0.6, 100


@dataclass(frozen=True)
class LevelSpec:
    """The pyramid's levels: each one's stride (input pixels a location) and its box sizes."""

    strides: tuple[float, ...]

    def ranges(self) -> list[tuple[float, float]]:
        """(lower, upper] of a positive's largest distance per level: up to 8 strides, from
        where the level before stops; the last level unbounded (FCOS)."""
        out, lower = [], 0.0
        for i, s in enumerate(self.strides):
            upper = math.inf if i == len(self.strides) - 1 else 8 * s
            out.append((lower, upper))
            lower = upper
        return out


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, width), width)


class BoxHead(nn.Module):
    """One head: levels from the token maps, the shared tower and its three outputs."""

    def __init__(
        self,
        in_channels: Sequence[int],
        n_classes: int,
        scales: Sequence[float] = (1.0,),
        width: int = 64,
        depth: int = 2,
    ):
        super().__init__()
        self.pyramid = len(in_channels) == 1
        self.scales = tuple(scales) if self.pyramid else (1.0,) * len(in_channels)
        # no bias before a normalization: it would cancel it (and a parameter whose true
        # gradient is 0 only drifts on rounding noise under AdamW)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), _norm(width)) for c in in_channels
        )
        ups: list[nn.Module] = []
        for s in self.scales:
            steps: list[nn.Module] = []
            k = round(math.log2(s)) if s > 1 else 0
            for j in range(k):
                steps.append(nn.ConvTranspose2d(width, width, 2, stride=2, bias=False))
                steps.append(_norm(width) if j == k - 1 else nn.Sequential(_norm(width), nn.GELU()))
            if s < 1:
                steps.append(nn.MaxPool2d(round(1 / s)))
            ups.append(nn.Sequential(*steps))
        self.up = nn.ModuleList(ups)
        tower: list[nn.Module] = []
        for _ in range(depth):
            tower += [nn.Conv2d(width, width, 3, padding=1, bias=False), _norm(width), nn.ReLU()]
        self.tower = nn.Sequential(*tower)
        self.cls = nn.Conv2d(width, n_classes, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        for m in [*self.tower, self.cls, self.box, self.ctr]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR) / PRIOR))  # type: ignore[arg-type]

    def levels(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.pyramid:
            p = self.proj[0](maps[0])
            return [up(p) for up in self.up]
        return [proj(m) for proj, m in zip(self.proj, maps, strict=True)]

    def forward(self, maps: Sequence[torch.Tensor], strides: Sequence[float]) -> torch.Tensor:
        """(B, P, C + 5) over the levels' locations (row-major, level by level): class logits,
        the four distances in input pixels, centerness logit."""
        out = []
        for level, stride in zip(self.levels(maps), strides, strict=True):
            t = self.tower(level)
            dist = F.relu(self.box(t)) * stride
            z = torch.cat([self.cls(t), dist, self.ctr(t)], 1)
            out.append(z.flatten(2).transpose(1, 2))
        return torch.cat(out, 1)


def locations(sizes: Sequence[tuple[int, int]], strides: Sequence[float]) -> torch.Tensor:
    """(P, 3): each level's location centres (x, y) in input pixels and its level index."""
    out = []
    for li, ((h, w), s) in enumerate(zip(sizes, strides, strict=True)):
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32) + 0.5) * s,
            (torch.arange(w, dtype=torch.float32) + 0.5) * s,
            indexing="ij",
        )
        out.append(torch.stack([xs.flatten(), ys.flatten(), torch.full((h * w,), li)], 1))
    return torch.cat(out)


@dataclass
class Targets:
    """A batch's training targets over (B, P) locations: the class (C: background, -1:
    ignored), the assigned box (xyxy) and its centerness."""

    classes: torch.Tensor  # (B, P) int64
    boxes: torch.Tensor  # (B, P, 4)
    centerness: torch.Tensor  # (B, P)


def targets(
    locs: torch.Tensor,
    spec: LevelSpec,
    images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_classes: int,
) -> Targets:
    """FCOS targets for each image's (boxes (k, 4), classes (k,), ignored (k,))."""
    ranges = torch.tensor(spec.ranges(), dtype=torch.float32)
    strides = torch.tensor(spec.strides, dtype=torch.float32)
    level = locs[:, 2].long()
    lo, hi, stride = ranges[level, 0], ranges[level, 1], strides[level]
    xs, ys = locs[:, 0:1], locs[:, 1:2]
    n, p = len(images), len(locs)
    classes = torch.full((n, p), n_classes, dtype=torch.int64)
    boxes = torch.zeros(n, p, 4)
    ctr = torch.zeros(n, p)
    for i, (b_np, c_np, ign_np) in enumerate(images):
        if not len(b_np):
            continue
        b = torch.as_tensor(b_np, dtype=torch.float32)
        ign = torch.as_tensor(ign_np, dtype=torch.bool)
        ltrb = torch.stack([xs - b[:, 0], ys - b[:, 1], b[:, 2] - xs, b[:, 3] - ys], -1)  # (P,k,4)
        inside = ltrb.min(-1).values > 0
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        r = CENTER_RADIUS * stride[:, None]
        near = ((xs - cx).abs() < r) & ((ys - cy).abs() < r)
        reach = ltrb.max(-1).values
        fits = (reach > lo[:, None]) & (reach <= hi[:, None])
        ok = inside & near & fits & ~ign
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None].expand(p, -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best, j = area.min(1)
        pos = torch.isfinite(best)
        classes[i] = torch.where(pos, torch.as_tensor(c_np, dtype=torch.int64)[j], n_classes)
        ignored = (inside & ign[None]).any(1) & ~pos
        classes[i][ignored] = -1
        boxes[i] = b[j]
        d = ltrb[torch.arange(p), j].clamp_min(1e-6)
        lr, tb = d[:, [0, 2]], d[:, [1, 3]]
        c = torch.sqrt(
            (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
        )
        ctr[i] = torch.where(pos, c, torch.zeros_like(c))
    return Targets(classes, boxes, ctr)


def detection_loss(out: torch.Tensor, t: Targets, locs: torch.Tensor) -> torch.Tensor:
    """The FCOS loss of outputs (..., B, P, C + 5) (any leading head dims): one loss per
    head, each normalized by the batch's positives."""
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    n_classes = out.shape[-1] - 5
    lead = out.shape[:-2]
    flat = out.reshape(-1, *out.shape[-3:])  # (H, B, P, C + 5)
    keep = t.classes >= 0
    pos = (t.classes >= 0) & (t.classes < n_classes)
    n_pos = max(1.0, float(pos.sum()))
    onehot = F.one_hot(t.classes.clamp(0, n_classes), n_classes + 1)[..., :n_classes].float()
    losses = []
    xy = locs[:, :2]
    for z in flat:
        cls = sigmoid_focal_loss(z[..., :n_classes][keep], onehot[keep], reduction="sum") / n_pos
        loss = cls
        if pos.any():
            d = z[..., n_classes : n_classes + 4][pos]
            centre = xy.expand(len(t.classes), -1, -1)[pos]
            pred = torch.cat([centre - d[:, :2], centre + d[:, 2:]], 1)
            w = t.centerness[pos]
            giou = generalized_box_iou_loss(pred, t.boxes[pos], reduction="none")
            loss = loss + (giou * w).sum() / w.sum().clamp_min(1e-6)
            loss = (
                loss
                + F.binary_cross_entropy_with_logits(z[..., -1][pos], w, reduction="sum") / n_pos
            )
        losses.append(loss)
    return torch.stack(losses).reshape(lead[:-1] if len(lead) > 1 else ())


@torch.no_grad()
def decode(
    out: torch.Tensor, locs: torch.Tensor, size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each image's detections (boxes (d, 4) xyxy, scores (d,), classes (d,)) from one head's
    outputs (B, P, C + 5); `size` the input's (H, W)."""
    from torchvision.ops import batched_nms

    n_classes = out.shape[-1] - 5
    h, w = size
    level = locs[:, 2].long()
    result = []
    for z in out:
        prob = torch.sqrt(torch.sigmoid(z[:, :n_classes]) * torch.sigmoid(z[:, -1:]))
        boxes_all, scores_all, classes_all = [], [], []
        for li in range(int(level.max()) + 1):
            at = level == li
            p = prob[at].flatten()
            cand = torch.nonzero(p >= SCORE_MIN)[:, 0]
            if len(cand) > PRE_NMS:
                cand = cand[p[cand].topk(PRE_NMS).indices]
            loc, cls = cand // n_classes, cand % n_classes
            d = z[at][loc, n_classes : n_classes + 4]
            centre = locs[at][loc, :2]
            box = torch.cat([centre - d[:, :2], centre + d[:, 2:]], 1)
            box[:, 0::2] = box[:, 0::2].clamp(0, w)
            box[:, 1::2] = box[:, 1::2].clamp(0, h)
            boxes_all.append(box)
            scores_all.append(p[cand])
            classes_all.append(cls)
        boxes, scores, classes = (torch.cat(v) for v in (boxes_all, scores_all, classes_all))
        keep = batched_nms(boxes.double(), scores.double(), classes, NMS_IOU)[:PER_IMAGE]
        result.append(
            (boxes[keep].double().numpy(), scores[keep].double().numpy(), classes[keep].numpy())
        )
    return result


class GridHeads:
    """G copies of one `BoxHead` (each seeded alike) as stacked parameters, run under vmap."""

    def __init__(self, head: BoxHead, g: int):
        from torch.func import stack_module_state

        heads = [copy.deepcopy(head) for _ in range(g)]
        params, buffers = stack_module_state(heads)  # type: ignore[arg-type]
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(head).to("meta")

    def __call__(self, maps: Sequence[torch.Tensor], strides: Sequence[float]) -> torch.Tensor:
        """(G, B, P, C + 5) outputs of every head on the same maps."""
        from torch.func import functional_call, vmap

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = functional_call(self.base, (p, b), (list(maps), list(strides)))
            return out

        result: torch.Tensor = vmap(one)(self.params, self.buffers)
        return result

    def state(self) -> dict[str, torch.Tensor]:
        """The parameters as (1, G, ...) views (the grid trainer's layout)."""
        return {k: v.unsqueeze(0) for k, v in self.params.items()}

    def one(self, g: int) -> BoxHead:
        """Head g as a module of its own."""
        head = copy.deepcopy(self.base).to_empty(device="cpu")
        head.load_state_dict(
            {
                **{k: v[g].detach().clone() for k, v in self.params.items()},
                **{k: v[g].clone() for k, v in self.buffers.items()},
            }
        )
        return head
