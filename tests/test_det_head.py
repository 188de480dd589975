"""The box head against independent references: FCOS targets against a location-by-location
reference, the loss against torchvision's ops applied by hand, decoding against per-class NMS
by hand, and G batched heads against the same heads trained one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import generalized_box_iou_loss, nms, sigmoid_focal_loss

from probekit.detection.head import (
    BoxHead,
    GridHeads,
    LevelSpec,
    decode,
    detection_loss,
    locations,
    targets,
)

STRIDES = (8.0, 16.0, 32.0)
SIZES = [(12, 12), (6, 6), (3, 3)]  # a 96x96 input


def _images(seed: int, n: int = 3, n_classes: int = 4):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (k, 2))
        b = np.column_stack([xy, np.minimum(96, xy + rng.uniform(6, 90, (k, 2)))])
        out.append((b, rng.integers(0, n_classes, k), rng.random(k) < 0.2))
    return out


def _reference_targets(locs, spec, images, n_classes):  # type: ignore[no-untyped-def]
    """FCOS's assignment location by location, box by box, in plain Python."""
    ranges = spec.ranges()
    out_cls = np.full((len(images), len(locs)), n_classes)
    out_ctr = np.zeros((len(images), len(locs)))
    for i, (boxes, classes, ignored) in enumerate(images):
        for p, (x, y, level) in enumerate(locs.tolist()):
            s = spec.strides[int(level)]
            lo, hi = ranges[int(level)]
            best, pick, in_ignored = math.inf, None, False
            for j, (x0, y0, x1, y1) in enumerate(boxes):
                ltrb = (x - x0, y - y0, x1 - x, y1 - y)
                if min(ltrb) <= 0:
                    continue
                if ignored[j]:
                    in_ignored = True
                    continue
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                if abs(x - cx) >= 1.5 * s or abs(y - cy) >= 1.5 * s:
                    continue
                if not lo < max(ltrb) <= hi:
                    continue
                area = (x1 - x0) * (y1 - y0)
                if area < best:
                    best, pick = area, (j, ltrb)
            if pick is not None:
                j, (left, top, right, bottom) = pick
                out_cls[i, p] = classes[j]
                out_ctr[i, p] = math.sqrt(
                    min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom)
                )
            elif in_ignored:
                out_cls[i, p] = -1
    return out_cls, out_ctr


@pytest.mark.parametrize("seed", range(4))
def test_targets_equal_a_location_by_location_reference(seed: int) -> None:
    locs = locations(SIZES, STRIDES)
    spec = LevelSpec(STRIDES)
    images = _images(seed)
    got = targets(locs, spec, images, 4)
    cls, ctr = _reference_targets(locs, spec, images, 4)
    np.testing.assert_array_equal(got.classes.numpy(), cls)
    np.testing.assert_allclose(got.centerness.numpy(), ctr, atol=1e-5)
    assert (got.classes >= 0).any() and (got.classes < 4).any()


def test_loss_equals_torchvisions_ops_applied_by_hand() -> None:
    torch.manual_seed(0)
    locs = locations(SIZES, STRIDES)
    images = _images(1, n=4)
    t = targets(locs, LevelSpec(STRIDES), images, 4)
    out = torch.randn(4, len(locs), 4 + 5)
    out[..., 4:8] = out[..., 4:8].abs() * 20
    got = detection_loss(out, t, locs)
    total = 0.0
    pos = (t.classes >= 0) & (t.classes < 4)
    n_pos = max(1, int(pos.sum()))
    focal, giou, bce, weight = 0.0, 0.0, 0.0, 0.0
    for i in range(4):
        for p in range(len(locs)):
            c = int(t.classes[i, p])
            if c < 0:
                continue
            target = torch.zeros(4)
            if c < 4:
                target[c] = 1
            focal += float(sigmoid_focal_loss(out[i, p, :4], target, reduction="sum"))
            if c < 4:
                x, y = locs[p, 0], locs[p, 1]
                d = out[i, p, 4:8]
                box = torch.stack([x - d[0], y - d[1], x + d[2], y + d[3]])[None]
                w = float(t.centerness[i, p])
                giou += w * float(generalized_box_iou_loss(box, t.boxes[i, p][None]))
                weight += w
                logit = out[i, p, 8]
                bce += float(
                    torch.nn.functional.binary_cross_entropy_with_logits(logit, t.centerness[i, p])
                )
    total = focal / n_pos + giou / weight + bce / n_pos
    assert float(got) == pytest.approx(total, rel=1e-4)


def test_decoding_equals_per_class_nms_by_hand() -> None:
    torch.manual_seed(1)
    locs = locations(SIZES, STRIDES)
    out = torch.randn(2, len(locs), 3 + 5)
    out[..., :3] += 1.0  # many candidates above the score threshold
    out[..., 3:7] = out[..., 3:7].abs() * 16
    got = decode(out, locs, (96, 96))
    for i in range(2):
        z = out[i]
        prob = torch.sqrt(torch.sigmoid(z[:, :3]) * torch.sigmoid(z[:, -1:]))
        boxes, scores, classes = [], [], []
        for p in range(len(locs)):
            for c in range(3):
                if prob[p, c] >= 0.05:
                    x, y = float(locs[p, 0]), float(locs[p, 1])
                    d = z[p, 3:7].tolist()
                    b = [x - d[0], y - d[1], x + d[2], y + d[3]]
                    b = [min(max(v, 0.0), 96.0) for v in b]
                    boxes.append(b)
                    scores.append(float(prob[p, c]))
                    classes.append(c)
        boxes_t, scores_t = (
            torch.tensor(boxes, dtype=torch.float64),
            torch.tensor(scores, dtype=torch.float64),
        )
        classes_t = torch.tensor(classes)
        kept = []
        for c in range(3):
            idx = torch.nonzero(classes_t == c)[:, 0]
            keep = nms(boxes_t[idx], scores_t[idx], 0.6)
            kept += idx[keep].tolist()
        kept.sort(key=lambda j: -scores[j])
        kept = kept[:100]
        want = sorted((round(scores[j], 5), classes[j]) for j in kept)
        have = sorted(zip(np.round(got[i][1], 5).tolist(), got[i][2].tolist(), strict=True))
        assert have == want
        assert len(got[i][0]) == min(100, len(kept))


def test_batched_heads_equal_each_head_alone() -> None:
    """Two heads (their own parameters) under vmap give each head's own outputs and
    gradients, as the module alone gives them."""
    torch.manual_seed(0)
    head = BoxHead([16], 4, scales=(2, 1, 0.5), width=16, depth=1)
    grid = GridHeads(head, 2)
    with torch.no_grad():  # make the two heads differ
        for v in grid.params.values():
            v[1].add_(0.01 * torch.randn_like(v[1]))
    x = torch.randn(3, 16, 6, 6)
    out = grid([x], STRIDES)
    locs = locations(SIZES, STRIDES)
    t = targets(locs, LevelSpec(STRIDES), _images(2), 4)
    losses = detection_loss(out, t, locs)
    grads = torch.autograd.grad(losses.sum(), list(grid.params.values()))
    for g in range(2):
        alone = grid.one(g)
        for p in alone.parameters():
            p.requires_grad_(True)
        mine = alone([x], STRIDES)
        torch.testing.assert_close(mine, out[g], rtol=1e-4, atol=1e-5)
        loss = detection_loss(mine, t, locs)
        torch.testing.assert_close(loss, losses[g], rtol=1e-5, atol=1e-6)
        own = torch.autograd.grad(loss, list(alone.parameters()))
        for name, want, batched in zip(grid.params, own, grads, strict=True):
            torch.testing.assert_close(batched[g], want, rtol=1e-4, atol=1e-6, msg=name)
