"""The registry of evaluation methods: kNN and the probe methods, by name. The CLI, triage,
report and plots read it (it imports nothing heavy: each probe's code loads when it runs).

A probe method is one module and one entry here. The module holds `Options` (a frozen
`probekit.probes.options.MethodOptions`: its own fields, defaults, help and checks) and
`select(data, options) -> Selection` (fit on the fit part, choose on validation; `data.options`
holds the shared options: seed, epochs, batch size, device). Its module imports no torch at the
top, so that the CLI can read its options fast. Evaluation on test is shared.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probekit.probes.options import Flag, MethodOptions

__all__ = [
    "METHODS",
    "PROBE_METHODS",
    "ProbeMethod",
    "all_methods",
    "default_probes",
    "method_flags",
    "method_title",
]


@dataclass(frozen=True)
class ProbeMethod:
    """One probe method: its name, what it is (help texts), its plot title and its module."""

    name: str
    summary: str
    title: str  # the layer curve's panel title
    module: str  # holds `select(data, options) -> Selection`
    default: bool = True  # run by "both" and by a triage's default methods
    tokens: bool = False  # reads the token arrays (`extract --tokens`), not pooled features
    # segments (tokens and masks of a segmentation dataset): `select(DenseData, options) ->
    # DenseSelection`, metrics miou and pixel_acc
    dense: bool = False
    # detects (tokens and boxes of a detection dataset): `select(DetData, options) ->
    # BoxSelection`, metrics ap, ap50, ap75, ap by size, corloc
    boxes: bool = False

    def select(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = importlib.import_module(self.module).select
        return fn

    @property
    def options(self) -> type[MethodOptions]:
        """The method's own options dataclass (its module's `Options`; none: no options)."""
        from probekit.probes.options import MethodOptions

        cls: type[MethodOptions] = getattr(
            importlib.import_module(self.module), "Options", MethodOptions
        )
        return cls

    @property
    def shown(self) -> tuple[str, ...]:
        return self.options.shown


PROBE_METHODS: dict[str, ProbeMethod] = {
    m.name: m
    for m in (
        ProbeMethod(
            "linear",
            "batched linear heads (DINOv2's protocol: lr x wd grid, best epoch on validation)",
            "linear heads, val top-1",
            "probekit.probes.linear",
        ),
        ProbeMethod(
            "logreg",
            "multinomial logistic regression (L-BFGS along a C path, refit on train + val)",
            "logistic regression, val top-1",
            "probekit.probes.logreg",
        ),
        ProbeMethod(
            "attentive",
            "attentive probe on stored tokens (learned queries, multi-head cross-attention "
            "pooling, linear classifier; lr x wd x layer grid, best epoch on validation)",
            "attentive probe, val top-1",
            "probekit.probes.attentive",
            default=False,
            tokens=True,
        ),
        ProbeMethod(
            "mlp",
            "MLP probe (one hidden GELU layer on a pooled feature; lr x wd x width grid, best "
            "epoch on validation)",
            "MLP probe, val top-1",
            "probekit.probes.mlp",
            default=False,
        ),
        ProbeMethod(
            "linseg",
            "linear segmentation on stored tokens and masks (DINOv2's linear protocol: "
            "batch-norm + 1x1 layer, bilinear upsampling; lr x wd x layer grid, best epoch on "
            "validation mIoU)",
            "linear segmentation, val mIoU",
            "probekit.dense.linseg",
            default=False,
            tokens=True,
            dense=True,
        ),
        ProbeMethod(
            "dense-knn",
            "dense kNN on stored tokens and masks (Hummingbird: each test patch takes its "
            "nearest train patches' label distributions; k and layer chosen on validation mIoU)",
            "dense kNN, val mIoU",
            "probekit.dense.knn",
            default=False,
            tokens=True,
            dense=True,
        ),
        ProbeMethod(
            "detect",
            "box probe on stored tokens and boxes (an FCOS-style head on a layer's simple "
            "pyramid, ViTDet-style, or a CNN's stages; lr x wd x layer-set grid, best epoch on "
            "validation COCO AP)",
            "box probe, val AP",
            "probekit.detection.probe",
            default=False,
            tokens=True,
            boxes=True,
        ),
    )
}
# the methods a triage runs by default, in the order of a report's columns
METHODS = ("knn", *(m.name for m in PROBE_METHODS.values() if m.default))


def all_methods() -> tuple[str, ...]:
    """Every method there is now (kNN, then the registry's probes, in its order)."""
    return ("knn", *PROBE_METHODS)


def default_probes() -> list[str]:
    """The probe methods "both" means: those that read pooled features."""
    return [m.name for m in PROBE_METHODS.values() if m.default]


def method_title(method: str) -> str:
    """The layer curve's title of a method's panel."""
    if method == "knn":
        return "kNN test top-1"
    entry = PROBE_METHODS.get(method)
    return entry.title if entry is not None else method


def method_flags() -> dict[str, Flag]:
    """Every method's options by the flat name each goes by (`attn_lrs`), in registry order;
    two methods may share a flat name only for one option of one meaning (the same default)."""
    out: dict[str, Flag] = {}
    for m in PROBE_METHODS.values():
        for flag in m.options.flags(m.name):
            seen = out.get(flag.flat)
            assert seen is None, f"{m.name} and {seen and seen.method} both name {flag.flat}"
            out[flag.flat] = flag
    return out
