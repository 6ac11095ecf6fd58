"""Preemption: a signalled job stops between two steps with its exact state saved in its own run, and is requeued.

SLURM signals a job before its time limit (``sbatch --signal=SIGUSR1@90``) and, on preemption, sends SIGTERM.
Lightning's own SIGUSR1 handler saves a checkpoint inside the signal handler, wherever the main thread happens to
be: in the middle of a step (the weights of one moment, the loop counters and random streams of another), during a
DDP all-reduce (where a barrier deadlocks), into the working directory that every job shares. This callback takes
that signal instead (Lightning leaves a signal alone that already has a handler) and acts at the next step boundary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info

REQUEUE_CHECKPOINT = "hpc.ckpt"  # in the run's checkpoints folder, next to last.ckpt
EXIT_REQUEUED = 3  # the exit code of a process that stopped to be requeued (state saved; not finished)
_signalled = threading.Event()  # process-wide: set by the signal handler, read at step boundaries


class Requeued(SystemExit):
    """Raised to end a process that saved its state and asked to be requeued. A ``SystemExit`` (code 3): no
    ``except Exception`` on the way out takes it for a failure, and Python exits without a traceback."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUED)


def _on_signal(signum, frame) -> None:  # only sets a flag: anything more is unsafe inside a signal handler
    _signalled.set()


def signalled() -> bool:
    return _signalled.is_set()


def stop_requested(trainer: pl.Trainer) -> bool:
    """Whether this process or any other of the run was signalled (the requeue signal, or SIGTERM, which Lightning
    records). Under DDP a one-element all-reduce, so that every rank stops at the same step."""
    mine = signalled() or bool(getattr(trainer, "received_sigterm", False))
    return bool(trainer.strategy.reduce_boolean_decision(mine, all=False))


def _cluster_environment(trainer: pl.Trainer):
    return trainer._accelerator_connector.cluster_environment  # what Lightning's own signal connector reads


def slurm_requeue(trainer: pl.Trainer) -> str | None:
    """On the first process of a SLURM job with auto-requeue: ``scontrol requeue <job>`` (an array task is
    ``<array job>_<task>``), as Lightning's own handler does. Returns what was done, for the log."""
    environment = _cluster_environment(trainer)
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue) or not trainer.is_global_zero:
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        return f"could not requeue job {job}: scontrol not found"
    return f"requeued job {job}" if code == 0 else f"scontrol requeue {job} failed with exit code {code}"


class Requeue(Checkpoint):
    """Save a signalled run between two training steps into ``<run>/checkpoints/hpc.ckpt``, requeue, stop.

    When each hook runs:

    * ``setup`` (fit, test, ...): installs a handler for ``signal`` (SLURM's requeue signal as Lightning's cluster
      environment sets it, SIGUSR1 by default) that only sets a flag.
    * ``on_train_batch_end``: if a process was signalled (or received SIGTERM), writes ``hpc.ckpt`` with the state
      after this step: weights, optimizer, schedulers, the callbacks' state (EMA averages, covariance estimate),
      the loop's and the data loader's position in the epoch and every rank's random streams. A Lightning
      ``Checkpoint`` runs after every other callback, so their updates of this step are in it. When the step ends
      an epoch, the epoch finishes first (validation, ``last.ckpt``) and ``hpc.ckpt`` is written at its end.
    * ``on_train_batch_start`` (the next step): on the first process of a SLURM job, ``scontrol requeue <job>``;
      then every process exits with code 3. After SIGTERM Lightning stops the process itself (a preempted job is
      requeued by SLURM, a cancelled one is not).
    * The robustness evaluation (``advtrain test``) stops between two attacked batches the same way; its finished
      batches are on disk (``advtrain.callbacks.RobustnessEvaluation``).
    * ``on_fit_end``: a finished training has no use for ``hpc.ckpt`` (``last.ckpt`` is further): it is removed.

    The requeued command finds its run again (``advtrain/runs.py``) and resumes from the newer of ``hpc.ckpt`` and
    ``last.ckpt``, and ends bitwise where an uninterrupted run ends, with the same number of processes and threads.

    Args:
        signal: the requeue signal's name (default: the cluster environment's, else ``SIGUSR1``).
        requeue: call ``scontrol requeue`` under SLURM (false when something else requeues the job).
    """

    def __init__(self, signal: str | None = None, requeue: bool = True):
        self.signal_name = signal
        self.requeue = requeue
        self.dirpath: Path | None = None
        self._stopping: str | None = None  # where the state was saved, once a signal was acted on

    def _signal(self, trainer) -> signal.Signals:
        if self.signal_name:
            return signal.Signals[self.signal_name if self.signal_name.startswith("SIG") else "SIG" + self.signal_name]
        return getattr(_cluster_environment(trainer), "requeue_signal", None) or signal.SIGUSR1

    def setup(self, trainer, pl_module, stage):
        if threading.current_thread() is threading.main_thread():
            signal.signal(self._signal(trainer), _on_signal)
        if stage == "fit":  # next to last.ckpt (ModelCheckpoint's setup ran first: a Checkpoint before this one)
            checkpoint = trainer.checkpoint_callback
            folder = checkpoint.dirpath if checkpoint is not None else None
            self.dirpath = Path(folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._stopping is None and stop_requested(trainer):
            last_of_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            if not last_of_epoch or trainer.received_sigterm:  # after SIGTERM Lightning stops before the epoch ends
                self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if self._stopping is None and stop_requested(trainer):
            self._save(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._stopping is not None:
            self.stop(trainer, self._stopping)

    def stop(self, trainer, saved: str) -> None:
        """Requeue (under SLURM) and end the process; ``saved`` says where the work done so far is."""
        rank_zero_info(f"advtrain: signalled: {saved}")  # before the requeue: SLURM ends the job right after it
        # SIGTERM alone (preemption, scancel) stops without a requeue: SLURM requeues a preempted job itself
        wanted = self.requeue and trainer.strategy.reduce_boolean_decision(signalled(), all=False)
        done = slurm_requeue(trainer) if wanted else None
        rank_zero_info(f"advtrain: {done or 'stopped; rerun the same command to continue'}")
        raise Requeued()

    def on_fit_end(self, trainer, pl_module):
        self._stopping = None  # training ended before the next step: nothing to requeue
        if trainer.is_global_zero and self.dirpath is not None:
            (self.dirpath / REQUEUE_CHECKPOINT).unlink(missing_ok=True)

    def _save(self, trainer) -> None:
        target = self.dirpath / REQUEUE_CHECKPOINT
        partial = target.with_name(target.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank takes part (the random streams are gathered); rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, target)  # a kill while writing never leaves a truncated hpc.ckpt
        self._stopping = f"state at step {trainer.global_step} saved to {target}"
