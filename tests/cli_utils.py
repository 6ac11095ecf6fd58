"""Running the ``advtrain`` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADVTRAIN = [sys.executable, "-m", "advtrain"]


def advtrain(*args, cwd, check=True, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    env.update(env_extra or {})
    proc = subprocess.run([*ADVTRAIN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"advtrain {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def config(name: str) -> Path:
    return ROOT / "configs" / name
