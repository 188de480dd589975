"""What the benchmark scripts share: the machine's name and where results go."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def save_result(
    bench: str, device: str, device_name: str, payload: dict[str, Any], out: str | Path = RESULTS
) -> Path:
    """Write `<out>/<bench>-<device>-<device name>.json` and return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in f"{device}-{device_name}").strip("-").lower()
    path = folder / f"{bench}-{tag}.json"
    path.write_text(json.dumps({"device": device, "device_name": device_name, **payload}, indent=2))
    print(f"wrote {path}")
    return path
