"""The ``advtrain`` command: a LightningCLI (fit, validate, test) with defenses and datamodules in
subclass mode, TensorBoard under ``runs/``, and the checkpointing and evaluation this package needs.

    advtrain fit  -c configs/cifar10/pgd_at.yaml
    advtrain fit  -c configs/cifar10/pgd_at.yaml --ckpt_path last      # resume the newest run
    advtrain test -c configs/cifar10/pgd_at.yaml --ckpt_path best      # or a path to a .ckpt
    advtrain report runs/cifar10                                       # results of many runs as one table
    advtrain transfer -c CONFIG --checkpoints A.ckpt B.ckpt --attack '{"attack": "pgd", "eps": "8/255"}'
    advtrain covariance -c CONFIG --output cov.pt                      # the data set's input covariance
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_info

from callbacks import RobustnessEvaluation
from defenses import AdversarialDefense

TRAINER_DEFAULTS = {
    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": None}},
    # attacks need gradients during validation and test
    "inference_mode": False,
}


class SaveConfigPerStage(SaveConfigCallback):
    """Writes ``config_fit.yaml`` / ``config_test.yaml`` so a test run in a training run's directory
    does not overwrite the training config."""

    def setup(self, trainer, pl_module, stage):
        self.config_filename = f"config_{getattr(stage, 'value', stage)}.yaml"
        super().setup(trainer, pl_module, stage)


def experiment_name(config_files) -> str:
    """``configs/cifar10/pgd_at.yaml`` -> ``cifar10/pgd_at`` (trainer presets are skipped)."""
    paths = [Path(str(p)) for p in (config_files or []) if p is not None]
    paths = [p for p in paths if p.parent.name != "trainer"] or paths
    if not paths:
        return "default"
    return f"{paths[-1].parent.name}/{paths[-1].stem}" if paths[-1].parent.name else paths[-1].stem


def _versions(root: Path) -> list[Path]:
    """Run directories under ``root``, newest version last."""
    found = [p for p in root.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(root: Path, which: str) -> Path | None:
    """The newest run's ``last.ckpt`` (which='last') or best checkpoint (which='best') under ``root``."""
    for run in reversed(_versions(root)):
        ckpt_dir = run / "checkpoints"
        if which == "last" and (ckpt_dir / "last.ckpt").exists():
            return ckpt_dir / "last.ckpt"
        if which == "best":
            best = sorted(ckpt_dir.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
            if best:
                return best[-1]
    return None


class AdvtrainCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_callback", SaveConfigPerStage)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
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
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")

    def instantiate_classes(self):
        """Turn errors raised while building the model, data or callbacks (a missing dataset, an
        impossible budget) into one line and exit code 2, instead of a traceback through jsonargparse."""
        try:
            super().instantiate_classes()
            # a surrogate or BPDA the network cannot honour fails now, not after training
            for callback in self.trainer.callbacks:
                if isinstance(callback, RobustnessEvaluation):
                    callback.check_network(self.model.network)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
            reasons = [line.strip()[2:] for line in str(error).splitlines()
                       if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
            sys.stderr.write(f"advtrain: error: {'; '.join(reasons) or error}\n")
            sys.exit(2)

    def before_instantiate_classes(self):
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        if not logger or "TensorBoardLogger" not in str(getattr(logger, "class_path", "")):
            return
        args = logger.init_args
        if args.name is None:
            args.name = experiment_name(config.get("config"))
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "best"):
            found = find_checkpoint(Path(args.save_dir) / args.name, ckpt)
            if found is None:
                if self.subcommand == "fit" and ckpt == "last":
                    rank_zero_info(f"--ckpt_path last: no last.ckpt under {Path(args.save_dir) / args.name}; "
                                   "starting a new run")
                    config.ckpt_path = None
                    return
                sys.exit(f"--ckpt_path {ckpt}: no checkpoint found under {Path(args.save_dir) / args.name}/"
                         "version_*/checkpoints. Train first, or give the path of a .ckpt file.")
            config.ckpt_path = str(found)
            rank_zero_info(f"--ckpt_path {ckpt}: using {found}")
        ckpt = config.get("ckpt_path")
        if not ckpt and self.subcommand in ("test", "validate"):
            rank_zero_info(f"advtrain {self.subcommand} without --ckpt_path evaluates the network as the config "
                           "builds it (freshly initialized, unless the config loads a checkpoint into it); pass "
                           "--ckpt_path best, last or a .ckpt file for a trained run")
        if ckpt:
            ckpt_path = Path(ckpt)
            if not ckpt_path.exists():
                sys.exit(f"--ckpt_path {ckpt}: no such file")
            # keep writing into the run the checkpoint came from: resumed TensorBoard curves continue
            # and test results land next to the training run
            if ckpt_path.parent.name == "checkpoints" and args.version is None:
                run_dir = ckpt_path.parent.parent
                args.save_dir, args.name, args.version = str(run_dir.parent), "", run_dir.name


class _DropAdvertisement(logging.Filter):
    def filter(self, record):
        return "litlogger" not in record.getMessage()


def quiet_lightning_noise() -> None:
    """Drop Lightning's cloud-logging advertisement and a deprecation inside Lightning itself."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisement())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(args=None):
    argv = sys.argv[1:] if args is None else args
    # report and transfer are not LightningCLI subcommands
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
        from advtrain import report

        return report.main(list(argv[1:]))
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["transfer"]:
        from advtrain import transfer

        quiet_lightning_noise()
        return transfer.main(list(argv[1:]))
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["covariance"]:
        from advtrain import covariance

        quiet_lightning_noise()
        return covariance.main(list(argv[1:]))
    quiet_lightning_noise()
    AdvtrainCLI(args=args)


if __name__ == "__main__":
    main()
