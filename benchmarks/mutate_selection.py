"""Mutation check of the selection tests: each mutation below makes one selection rule take
another configuration; the tests of `tests/test_selection.py` (and the transfer test) must
fail under every one of them. Run from the repository root:

    python benchmarks/mutate_selection.py [--only NAME]

Each mutation is applied to a copy of the file in place and undone afterwards (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, original text, mutated text)
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "grid head: worst instead of best": (
        "probekit/probes/grid.py",
        "np.lexsort((-tie.ravel(), -main.ravel()))[0]",
        "np.lexsort((tie.ravel(), main.ravel()))[0]",
    ),
    "grid epoch: always the last": (
        "probekit/probes/grid.py",
        "better = (main > fit.main) | ((main == fit.main) & (tie > fit.tie))",
        "better = np.ones(main.shape, bool)",
    ),
    "grid epoch: tie-breaker reversed": (
        "probekit/probes/grid.py",
        "((main == fit.main) & (tie > fit.tie))",
        "((main == fit.main) & (tie < fit.tie))",
    ),
    "linear: worst feature group": (
        "probekit/probes/linear.py",
        "        if score > best[0]:\n            w, b",
        "        if best[1] is None or score < best[0]:\n            w, b",
    ),
    "logreg: ignores validation (last C, last feature)": (
        "probekit/probes/logreg.py",
        "if (acc, -loss) > best[0]:",
        "if True:",
    ),
    "logreg: the first C of the path": (
        "probekit/probes/logreg.py",
        "if (acc, -loss) > best[0]:",
        "if best[1] is None:",
    ),
    "attentive: worst probe": (
        "probekit/probes/attentive.py",
        "li, hd = best_head(heads.val_acc, -heads.val_loss)",
        "li, hd = best_head(-heads.val_acc, heads.val_loss)",
    ),
    "mlp: worst head": (
        "probekit/probes/mlp.py",
        "if score > best[0]:",
        "if best[1] is None or score < best[0]:",
    ),
    "linseg: worst configuration": (
        "probekit/dense/linseg.py",
        "    best = max(\n        range(len(trained)),",
        "    best = min(\n        range(len(trained)),",
    ),
    "linseg: a feature's last configuration": (
        "probekit/dense/linseg.py",
        "g = int(np.lexsort((-heads.val_acc[li], -heads.val_miou[li]))[0])",
        "g = int(np.lexsort((-heads.val_acc[li], -heads.val_miou[li]))[-1])",
    ),
    "dense-knn: worst k": (
        "probekit/dense/knn.py",
        "miou, acc, _, k = max(scored)",
        "miou, acc, _, k = min(scored)",
    ),
    "knn: worst configuration": (
        "probekit/records.py",
        'return max(recs, key=lambda r: (r.value, -int(r.hyper["k"])))',
        'return min(recs, key=lambda r: (r.value, -int(r.hyper["k"])))',
    ),
    "few-shot kNN: the larger k among equals": (
        "probekit/fewshot.py",
        "pick = [int(np.flatnonzero(row == row.max())[0]) for row in val_acc.cpu().numpy()]",
        "pick = [int(np.flatnonzero(row == row.max())[-1]) for row in val_acc.cpu().numpy()]",
    ),
    "few-shot kNN: chosen on test": (
        "probekit/fewshot.py",
        "pick = [int(np.flatnonzero(row == row.max())[0]) for row in val_acc.cpu().numpy()]",
        "pick = [int(np.flatnonzero(row == row.max())[0]) for row in test_acc.cpu().numpy()]",
    ),
    "transfer: no same-backbone check": (
        "probekit/probes/run.py",
        "if not held or not src.info.same_model(dst.info):",
        "if not held:",
    ),
}

TESTS = ["tests/test_selection.py"]


def run(name: str, file: str, old: str, new: str) -> bool:
    """True when the tests fail under the mutation (it is caught)."""
    path = ROOT / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate is not found once in {file}")
    try:
        path.write_text(text.replace(old, new))
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(text)
    return res.returncode != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name holds this text")
    args = parser.parse_args()
    missed = []
    for name, (file, old, new) in MUTATIONS.items():
        if args.only and args.only not in name:
            continue
        caught = run(name, file, old, new)
        print(f"{'caught' if caught else 'MISSED'}  {name}  ({file})", flush=True)
        if not caught:
            missed.append(name)
    if missed:
        raise SystemExit(f"{len(missed)} mutation(s) missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
