"""What a result was measured on: CPU, cores, Python, torch, GPU (for reports and benchmark files)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def usable_cores() -> int:
    """The cores this process may run on (its affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`machine_description` records describe the same kind of machine (load aside)."""
    keys = ("cpu", "cores", "gpu", "torch", "python")
    return all(a.get(k) == b.get(k) for k in keys)
