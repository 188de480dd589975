"""The `probekit` command line: a thin typer layer over the Python API (same names).

Each command translates its arguments into one call of the API and prints the result; the
API checks every value. The modules beside this one hold the commands; they import torch,
timm and faiss only inside the commands that need them, so `--help`, `--version`, `ls`
and `info` start at once.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import Annotated, Any

import typer

from probekit import __version__
from probekit.cli import evaluate, report, store
from probekit.cli import extract as extract_module
from probekit.cli._common import err, out
from probekit.errors import ProbekitError, ProbekitWarning

__all__ = ["app", "main"]


class _Group(typer.core.TyperGroup):
    """Turns every ProbekitError into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ProbekitError as e:
            err.print(f"error: {e}")
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt as e:  # Ctrl-C: what was kept (an extraction says), code 130
            err.print(str(e) or "interrupted.")
            raise typer.Exit(code=130) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                todo = "Free space (or use --cache-dir on another disk)"
            elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                todo = "It is read-only here: use --cache-dir on a writable disk"
            else:
                raise
            err.print(
                f"error: cannot write {e.filename or 'the cache'}: {os.strerror(e.errno)}. "
                f"{todo} and run the same command again: finished chunks are kept."
            )
            raise typer.Exit(code=1) from None


app = typer.Typer(
    cls=_Group,
    name="probekit",
    help="Triage pretrained vision backbones: cached multi-layer features, kNN and linear probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"probekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """probekit: which pretrained vision backbone should I use?"""


app.command()(store.backbones)
app.command()(extract_module.extract)
app.command(name="knn")(evaluate.knn_cmd)
app.command(name="probe")(evaluate.probe_cmd)
app.command(name="compare")(evaluate.compare_cmd)
app.command(name="structure")(evaluate.structure_cmd)
app.command(name="transfer")(evaluate.transfer_cmd)
app.command(name="fewshot")(evaluate.fewshot_cmd)
app.command(name="triage")(report.triage_cmd)
app.command(name="report")(report.report_cmd)
app.command()(report.demo)
app.command(name="ls")(store.ls)
app.command()(store.info)
app.command()(store.verify)


def main() -> None:
    """Entry point of the `probekit` script."""
    warnings.simplefilter("default", ProbekitWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    app()
