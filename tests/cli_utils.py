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


def straight_and_resumed(args: list, kill_at_step: int, cwd: Path) -> tuple[dict, dict, dict]:
    """``advtrain fit *args`` twice: once uninterrupted (run name "straight"), once SIGKILLed at ``kill_at_step``
    and resumed with ``--ckpt_path last`` (run name "killed"). Returns the ``last.ckpt`` of the straight run, of
    the resumed run, and the one the killed run had left, loaded."""
    import torch  # only the tests that resume need it

    def last(name: str) -> dict:
        return torch.load(cwd / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)

    advtrain("fit", *args, "--trainer.logger.init_args.name", "straight", cwd=cwd)
    killed = advtrain("fit", *args, "--trainer.logger.init_args.name", "killed",
                      "--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step", kill_at_step,
                      cwd=cwd, check=False, env_extra={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert killed.returncode != 0, "the run was meant to be killed"
    interrupted = last("killed")
    advtrain("fit", *args, "--trainer.logger.init_args.name", "killed", "--ckpt_path", "last", cwd=cwd)
    assert not (cwd / "runs" / "killed" / "version_1").exists()  # resumed in the same run directory
    return last("straight"), last("killed"), interrupted


def last_checkpoint(trainer) -> str:
    """The path of the run's last.ckpt (the ``last_checkpoint`` callback of the CLI)."""
    return next(cb.best_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "filename", None) == "last")
