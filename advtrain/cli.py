"""The ``advtrain`` command: a LightningCLI (fit, validate, test) with defenses and datamodules in
subclass mode, TensorBoard under ``runs/``, and the checkpointing and evaluation this package needs.

    advtrain fit  -c configs/cifar10/pgd_at.yaml
    advtrain fit  -c configs/cifar10/pgd_at.yaml --ckpt_path last      # resume the newest run
    advtrain test -c configs/cifar10/pgd_at.yaml --ckpt_path best      # or a path to a .ckpt
    advtrain report runs/cifar10                                       # results of many runs as one table
    advtrain transfer -c CONFIG --checkpoints A.ckpt B.ckpt --attack '{"attack": "pgd", "eps": "8/255"}'
    advtrain covariance -c CONFIG --output cov.pt                      # the data set's input covariance
    advtrain sweep configs/tables/digits.yaml --seeds 0 1              # a paper table: every cell, then its report

Every mistake a user can fix (a config typo, a budget in the wrong units, a missing or corrupted data set or
checkpoint, a GPU preset without a GPU) ends in one line and exit code 2, and a run that fails before it trained
anything leaves no run directory behind.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from advtrain.callbacks import Requeue, RobustnessEvaluation
from advtrain.datamodules import DatasetError
from advtrain.defenses import AdversarialDefense

from .checkpoints import CheckpointError, check_checkpoint
from .guards import (
    UsageError,
    check_accelerator,
    check_budgets,
    check_class_paths,
    class_hint,
    remove_failed_run,
    remove_new_logs,
)
from .runs import resolve_run
from .saved_config import SaveConfigPerStage

TRAINER_DEFAULTS = {
    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": None}},
    # attacks need gradients during validation and test
    "inference_mode": False,
}
USER_ERRORS = (DatasetError, CheckpointError, UsageError)


def fail(message: str) -> None:
    """One line on stderr and exit code 2: the way every user-fixable error ends."""
    sys.stderr.write(f"advtrain: error: {message}\n")
    sys.exit(2)


class AdvtrainParser(LightningArgumentParser):
    """A config error is the error itself (with the classes a misspelled class path could have meant), not the
    usage text of every option before it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        hint = class_hint(message)
        sys.stderr.write(f"advtrain: error: {message.strip()}\n" + (f"advtrain: hint: {hint}\n" if hint else "")
                         + f"(`{self.prog.replace(' [options]', '')} --help` lists every option)\n")
        sys.exit(2)


class AdvtrainCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_callback", SaveConfigPerStage)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        kwargs.setdefault("parser_class", AdvtrainParser)
        self.run_dir: Path | None = None
        self.run_dir_existed = True
        self.created_run: Path | None = None  # a SLURM job's new run, created when the config was resolved
        super().__init__(AdversarialDefense, pl.LightningDataModule, *args, subclass_mode_model=True,
                         subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser):
        # the best epoch by validation robust accuracy (Rice et al.'s early stopping)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc_robust",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        # last.ckpt after every epoch, for resuming. A separate callback because Lightning 2.6's
        # save_last only refreshes last.ckpt when the monitored checkpoint improves.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "last_checkpoint.filename": "last",
            "last_checkpoint.monitor": None,
            "last_checkpoint.save_top_k": 1,
            "last_checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(RobustnessEvaluation, "evaluation")
        # a signalled job (SLURM's requeue signal, SIGTERM) saves its state between two steps and is requeued
        parser.add_lightning_class_args(Requeue, "requeue")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="torch CPU threads per process (default: torch's choice). On a machine shared "
                                 "with other jobs, 1 per process is often several times faster")
        parser.add_argument("--allow_large_eps", type=bool, default=False,
                            help="accept Linf budgets larger than half the input range (usually 8 meant 8/255)")

    # ---- before anything is built ----------------------------------------------------------------
    def _section(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` / ``best`` to a file that loads, and refuse an unreadable file, before
        Lightning reads it."""
        self.subcommand = self.config.get("subcommand")  # Lightning sets it only after this method
        if self.subcommand:
            try:
                self._resolve_checkpoint(self._section())
            except USER_ERRORS as error:
                fail(str(error))
        super()._parse_ckpt_path()

    def _resolve_checkpoint(self, config) -> None:
        self.created_run, notes = resolve_run(config, self.subcommand, lambda: self._training_settings(config))
        for note in notes:
            rank_zero_info(note)
        if not config.get("ckpt_path") and self.subcommand in ("test", "validate"):
            rank_zero_info(f"advtrain {self.subcommand} without --ckpt_path evaluates the network as the config "
                           "builds it (freshly initialized, unless the config loads a checkpoint into it); pass "
                           "--ckpt_path best, last or a .ckpt file for a trained run")

    def _training_settings(self, config) -> dict | None:
        """The current config as saved in config_fit.yaml, for comparing with a run's (None if it cannot be
        written out yet, e.g. a class path that does not resolve: the comparison is then skipped)."""
        try:
            return yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False, skip_check=True))
        except Exception:  # noqa: BLE001 - a config jsonargparse cannot dump here fails later, with its own message
            return None

    def before_instantiate_classes(self):
        config = self._section()
        if config.get("threads"):
            torch.set_num_threads(config.threads)
        try:
            check_accelerator(config.trainer.accelerator)
        except UsageError as error:
            fail(str(error))

    # ---- building -------------------------------------------------------------------------------------
    def instantiate_classes(self):
        """Turn errors raised while building the model, data or callbacks (a missing dataset, an impossible
        budget, a checkpoint of another network) into one line and exit code 2, before anything is written."""
        try:
            super().instantiate_classes()
            self._check_built()
        except USER_ERRORS as error:
            remove_failed_run(self.created_run, existed_before=False)
            fail(str(error))
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
            remove_failed_run(self.created_run, existed_before=False)
            reasons = [line.strip()[2:] for line in str(error).splitlines()
                       if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
            fail("; ".join(reasons) or str(error))

    def _check_built(self) -> None:
        config = self._section()
        evaluations = [cb for cb in self.trainer.callbacks if isinstance(cb, RobustnessEvaluation)]
        for evaluation in evaluations:  # a surrogate or BPDA the network cannot honour fails now
            evaluation.check_network(self.model.network)
        if not config.get("allow_large_eps"):
            bounds = tuple(float(b) for b in getattr(self.datamodule, "input_bounds", (0.0, 1.0)))
            check_budgets(self.model, [s for e in evaluations for s in e.settings], bounds)
        if config.get("ckpt_path"):
            check_checkpoint(Path(config.ckpt_path), self.model)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        if config.get("enable_checkpointing") is False:
            # honour the flag: our best/last/requeue checkpoint callbacks would make Lightning refuse it
            callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]
            config["callbacks"] = [cb for cb in config.get("callbacks") or [] if not isinstance(cb, Checkpoint)]
            rank_zero_info("checkpointing is off: no best, last or requeue checkpoint will be written")
        return super()._instantiate_trainer(config, callbacks)

    # ---- running ----------------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        """Run fit/test/...; a problem the user can fix ends in one line and exit code 2, not a traceback; a run
        that fails before it wrote a checkpoint or results leaves no run directory behind."""
        zero = self.trainer.is_global_zero
        self.run_dir = Path(self.trainer.log_dir) if zero and self.trainer.log_dir else None
        self.run_dir_existed = self.run_dir is None or (self.run_dir.exists() and self.run_dir != self.created_run)
        before = set(self.run_dir.iterdir()) if self.run_dir is not None and self.run_dir_existed else set()
        try:
            super()._run_subcommand(subcommand)
        except BaseException as error:
            if zero and remove_failed_run(self.run_dir, self.run_dir_existed):
                rank_zero_info(f"removed {self.run_dir}: the run failed before writing anything worth keeping")
            elif zero and subcommand != "fit" and self.run_dir is not None:
                # a failed test produced nothing: take back its config and event files from the run it tested
                remove_new_logs(self.run_dir, before)
            if isinstance(error, USER_ERRORS):
                fail(str(error))
            raise


class _DropAdvertisement(logging.Filter):
    def filter(self, record):
        return "litlogger" not in record.getMessage()


def quiet_lightning_noise() -> None:
    """Drop Lightning's cloud-logging advertisement and a deprecation inside Lightning itself."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisement())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def run(args: list[str] | None = None) -> int:
    """``advtrain fit|validate|test ...`` (the LightningCLI subcommands); exit code 0, or a ``SystemExit``: 2 for a
    user's mistake, 3 for a run stopped to be requeued."""
    try:
        check_class_paths(sys.argv[1:] if args is None else list(args))
    except UsageError as error:
        fail(str(error))
    quiet_lightning_noise()
    AdvtrainCLI(args=args)
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """The processes of a DDP run leave together. Lightning keeps the process group after a run; a process that
    exits while another still holds its gloo connections can make that one abort (SIGABRT) at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
