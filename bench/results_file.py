"""What every benchmark result file records besides its figures, and the writing of the file.

Each bench script builds its own result (settings, seconds, ``ratios``) and hands it to :func:`write_results`,
which puts in front of it where and when it was measured: the machine, the processor, the CPU count, the device,
torch's thread count, the torch version and the UTC date. A key the script sets itself wins
(``evaluation_cost.py`` measures in worker processes and states their thread count). ``bench/readme_table.py``
turns these files into the performance figures of bench/README.md.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def processor() -> str:
    """The CPU's model name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def device_name(device) -> str:
    """"cpu", or the GPU's name for a CUDA device."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def environment(device="cpu") -> dict:
    """Where, when and with what a benchmark ran."""
    import torch

    return {"machine": platform.platform(), "processor": processor(), "cpus": os.cpu_count(),
            "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_results(path: str | Path, result: dict, device="cpu") -> dict:
    """Write ``environment(device)`` followed by ``result`` (whose keys win) as JSON to ``path``; return it."""
    result = {**environment(device), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
