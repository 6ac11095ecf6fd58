"""Which run directory a job writes into, and where it resumes from.

One run is one folder, ``runs/<dataset>/<experiment>/version_N``, whatever happens to its job:

* A SLURM job marks the run it starts with its job id (``slurm_jobs`` in the run directory; an array task is
  ``<array job>_<task>``). Requeued, the same job finds its run by that mark and continues it, from the newest
  resume point in it (``checkpoints/hpc.ckpt``, written when it was signalled, or ``last.ckpt``, written at each
  epoch's end, for a job killed without warning). Two jobs never share a run: each has its own mark, and a new
  run's folder is created atomically, so two array tasks starting at once get two folders.
* One job that runs several trainings (a loop in an sbatch script) has one mark on several runs: a run is its
  own only if it trains what this command trains (the same training settings in ``config_fit.yaml``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from .checkpoints import CheckpointError, config_differences, find_checkpoint, resume_point, unreadable, versions
from .guards import UsageError

JOB_MARK = "slurm_jobs"


def slurm_job() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or None outside a batch job. Lightning's
    rule decides what a batch job is (an interactive ``srun bash`` is not)."""
    if not SLURMEnvironment.detect():
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def marked_by(run: Path) -> list[str]:
    mark = run / JOB_MARK
    return mark.read_text().split() if mark.is_file() else []


def mark(run: Path, job: str) -> None:
    """Record that ``job`` writes into ``run`` (appended: a run continued by a later job keeps both marks)."""
    if job not in marked_by(run):
        with open(run / JOB_MARK, "a") as f:
            f.write(job + "\n")


def job_run(root: Path, job: str, settings: dict | None) -> Path | None:
    """The newest run under ``root`` that ``job`` marked and that trains what ``settings`` train."""
    for run in versions(root):
        if job in marked_by(run) and not (settings is not None and config_differences(run, settings)):
            return run
    return None


def new_run(root: Path) -> Path:
    """Create and return the next free ``version_N`` under ``root``; ``mkdir`` is atomic, so concurrent jobs never
    get the same folder."""
    root.mkdir(parents=True, exist_ok=True)
    taken = versions(root)
    n = int(taken[0].name.split("_")[1]) + 1 if taken else 0
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return root / f"version_{n}"
        except FileExistsError:
            n += 1


def _tensorboard(logger) -> bool:
    return bool(logger) and "TensorBoardLogger" in str(getattr(logger, "class_path", ""))


def experiment_name(config_files) -> str:
    """``configs/cifar10/pgd_at.yaml`` -> ``cifar10/pgd_at`` (trainer presets are skipped)."""
    paths = [Path(str(p)) for p in (config_files or []) if p is not None]
    paths = [p for p in paths if p.parent.name != "trainer"] or paths
    if not paths:
        return "default"
    return f"{paths[-1].parent.name}/{paths[-1].stem}" if paths[-1].parent.name else paths[-1].stem


def _in_run(run: Path, which: str) -> Path | None:
    if which == "last":
        return resume_point(run)
    best = sorted((run / "checkpoints").glob("best*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return best[0] if best else None


def resolve_run(config, subcommand: str, settings: Callable[[], dict | None]) -> tuple[Path | None, list[str]]:
    """Decide where this command writes (the TensorBoard logger's name and version) and what it loads
    (``ckpt_path``: ``last`` and ``best`` become files), editing ``config`` in place. Returns the run directory this
    call created (a new SLURM job's run, created here so that it can be marked), and lines for the log.

    The rules, in order: a run named by the logger's ``version`` (``advtrain sweep``'s cells) is that run; a SLURM
    job's own run (:func:`job_run`) continues from its resume point; otherwise ``last`` / ``best`` search the
    experiment's runs (:func:`~advtrain.checkpoints.find_checkpoint`), and a checkpoint's own run receives what
    this command writes.
    """
    logger, notes, created = config.trainer.logger, [], None
    tensorboard = _tensorboard(logger)
    args = logger.init_args if tensorboard else None
    if tensorboard and args.name is None:
        args.name = experiment_name(config.get("config"))
    ckpt = config.get("ckpt_path")
    if ckpt in ("last", "best") and not tensorboard:
        raise UsageError(f"--ckpt_path {ckpt} looks under the TensorBoard run folders; with another logger give the "
                         "path of a .ckpt file")
    root = Path(args.save_dir) / args.name if tensorboard else None
    job = slurm_job() if tensorboard else None
    if tensorboard and args.version is not None:  # a named run
        run = root / str(args.version)
        if ckpt in ("last", "best"):
            found = _in_run(run, ckpt)
            if found is None and not (subcommand == "fit" and ckpt == "last"):
                raise CheckpointError(f"--ckpt_path {ckpt}: no usable checkpoint in {run}/checkpoints")
            notes.append(f"--ckpt_path {ckpt}: " + (f"using {found}" if found else f"nothing in {run} yet; starting"))
            ckpt = None if found is None else str(found)
    elif job is not None and subcommand != "fit" and ckpt in ("last", "best") and (run := job_run(root, job, None)):
        found = _in_run(run, ckpt)  # the test in a job's script after its fit: that fit's run, not the newest
        if found is None:
            raise CheckpointError(f"--ckpt_path {ckpt}: SLURM job {job}'s run {run} has no usable checkpoint yet")
        notes.append(f"--ckpt_path {ckpt}: using {found}, of SLURM job {job}'s run")
        ckpt = str(found)
    elif job is not None and subcommand == "fit" and (run := job_run(root, job, settings())) is not None:
        args.version = run.name  # a requeued job
        point = resume_point(run)
        if point is not None:
            notes.append(f"SLURM job {job} continues its run {run} from {point}")
            ckpt = str(point)
        elif ckpt in ("last", "best"):
            notes.append(f"SLURM job {job} starts its run {run} again: no checkpoint was written before it stopped")
            ckpt = None
    elif ckpt in ("last", "best"):
        found, found_notes = find_checkpoint(root, ckpt, settings())
        notes += [f"--ckpt_path {ckpt}: {note}" for note in found_notes]
        if found is None:
            if subcommand == "fit" and ckpt == "last" and not found_notes:
                notes.append(f"--ckpt_path last: no checkpoint under {root}; starting a new run")
            else:
                raise CheckpointError(f"--ckpt_path {ckpt}: no usable checkpoint under {root}/version_*/checkpoints"
                                      + (f" ({'; '.join(found_notes)})" if found_notes else "") +
                                      ". Train first, or give the path of a .ckpt file")
        ckpt = None if found is None else str(found)
    if ckpt:
        _check_file(Path(ckpt))
        # keep writing into the run the checkpoint came from: resumed TensorBoard curves continue and test
        # results land next to the training run
        path = Path(ckpt)
        if tensorboard and path.parent.name == "checkpoints" and args.version is None:
            run_dir = path.parent.parent
            args.save_dir, args.name, args.version = str(run_dir.parent), "", run_dir.name
    config.ckpt_path = ckpt
    run = Path(args.save_dir) / args.name / str(args.version) if tensorboard and args.version is not None else None
    if job is not None and subcommand == "fit" and rank_zero_only.rank == 0:  # the job's first process marks its run
        if run is None:
            run = created = new_run(root)
            args.version = run.name
        mark(run, job)
    if SLURMEnvironment.detect() and config.trainer.get("default_root_dir") is None and tensorboard:
        # Lightning looks for hpc_ckpt_*.ckpt to restore in default_root_dir (the working directory by default),
        # where another job's may lie: point it into this run
        config.trainer.default_root_dir = str(run if run is not None else root)
    return created, notes


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such file")
    reason = unreadable(path)
    if reason is not None:
        others = [str(p) for p in sorted(path.parent.glob("*.ckpt")) if p != path]
        raise CheckpointError(f"--ckpt_path {path}: the file is {reason}" + (
            f"; other checkpoints of this run: {', '.join(others)}" if others else ""))
