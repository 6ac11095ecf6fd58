"""The config of every run, saved next to its results without ever replacing another one."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.cli import SaveConfigCallback


class SaveConfigPerStage(SaveConfigCallback):
    """Writes ``config_fit.yaml`` / ``config_test.yaml`` into the run directory, so a test run in a training run's
    directory does not overwrite the training config.

    A file of that name holding another config (a second ``advtrain test`` with other settings, a resumed fit
    with other overrides) is never replaced: the config goes to ``config_<stage>-2.yaml``, ``-3``, ... An
    identical config already saved is not written again.
    """

    def setup(self, trainer, pl_module, stage):
        if self.already_saved:
            return
        stage = getattr(stage, "value", stage)
        log_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            target, k = log_dir / f"config_{stage}.yaml", 1
            while target.exists() and target.read_text() != text:
                k += 1
                target = log_dir / f"config_{stage}-{k}.yaml"
            if not target.exists():
                log_dir.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
