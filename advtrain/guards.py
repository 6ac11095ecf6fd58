"""Checks that turn a user's mistake into one line before anything runs or is written: a GPU preset on a machine
without one, a budget in the wrong units, a misspelled class path; and the clean-up of a run that failed before
it trained anything."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import shutil
from pathlib import Path

import torch


class UsageError(Exception):
    """A mistake in how advtrain was called; the message is one line that says what to do."""


def check_accelerator(accelerator) -> None:
    """``configs/trainer/gpu.yaml`` / ``ddp.yaml`` on a machine without CUDA: say how to run on CPUs instead."""
    if str(accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator is {accelerator} (configs/trainer/gpu.yaml or ddp.yaml) but this "
                         "machine has no CUDA GPU. On CPUs add --trainer.accelerator cpu (DDP on CPUs: also "
                         "--trainer.devices 2 --trainer.strategy ddp; --trainer.precision 32-true, as bf16 is slow "
                         "on most CPUs)")


def _large(value: float, bounds: tuple[float, float]) -> bool:
    return value > (bounds[1] - bounds[0]) / 2 + 1e-12


def _suggestion(value: float, bounds: tuple[float, float]) -> str:
    width = bounds[1] - bounds[0]
    if float(value).is_integer() and value <= 255:
        return f"{int(value)}/255" + (f" (or {value * width / 255:g} for this range)" if width != 1 else "")
    return f"{value / 255:g}"


def check_budgets(model, evaluation_settings, bounds: tuple[float, float]) -> None:
    """Linf budgets larger than half the input range are almost always a units mistake (8 for 8/255): at that
    size any input can be moved to the middle of the range. Raise naming the setting and the likely fraction."""
    found = []
    eps = getattr(model, "eps", None)
    if isinstance(eps, float) and _large(eps, bounds):
        found.append(("model.init_args.eps", eps))
    for setting in evaluation_settings:
        budget = setting.budget
        if budget is not None and setting.norm == "linf" and _large(budget, bounds):
            found.append((f"evaluation attack {setting.name}", budget))
    if found:
        where, value = found[0]
        raise UsageError(f"{where}: eps {value:g} is larger than half the input range {list(bounds)}; budgets are in "
                         f"the input's natural units, so did you mean {_suggestion(value, bounds)}? To use it as "
                         "written, pass --allow_large_eps true")


def class_hint(message: str) -> str:
    """For a class path that names no class (``defenses.PGDATT``), the classes the package does offer."""
    hints = []
    for module_name, missing in re.findall(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names = sorted(n for n, obj in vars(module).items() if inspect.isclass(obj) and not n.startswith("_"))
        close = difflib.get_close_matches(missing, names, n=1)
        hints.append(f"{module_name} has no class {missing}" + (f"; did you mean {module_name}.{close[0]}?" if close
                                                                else "") + f" Its classes: {', '.join(names)}")
    return "; ".join(dict.fromkeys(hints))


OLD_PACKAGES = ("attacks", "networks", "defenses", "datamodules", "callbacks", "evaluation")
_OLD_CLASS_PATH = re.compile(r"(?<![\w.])((?:" + "|".join(OLD_PACKAGES) + r")\.[A-Z]\w*)")


def check_class_paths(args: list[str]) -> None:
    """Refuse the class paths of before the advtrain namespace (``defenses.PGDAT`` is ``advtrain.defenses.PGDAT``),
    in the command line and in the config files it names. Run from the repository's folder, the old path would
    import the folder a second time as another package, whose classes are not advtrain's."""
    sources = [("the command line", " ".join(map(str, args)))]
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--config") and Path(str(value)).is_file():
            sources.append((str(value), Path(str(value)).read_text()))
    for where, text in sources:
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            found = _OLD_CLASS_PATH.search(line)
            if found:
                old = found.group(1)
                raise UsageError(f"class path {old} (in {where}) is now advtrain.{old}: the package's classes "
                                 "live under the advtrain namespace")


def remove_failed_run(run_dir: Path | None, existed_before: bool) -> bool:
    """Remove ``run_dir`` when this invocation created it and it holds nothing a user would want (no checkpoint,
    no results: only TensorBoard events and configs). Returns whether it was removed."""
    if run_dir is None or existed_before or not run_dir.is_dir():
        return False
    keep = [p for p in run_dir.rglob("*") if p.is_file() and not _is_log(p)]
    if keep:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _is_log(path: Path) -> bool:
    # slurm_jobs: the mark of the SLURM job that created the run (advtrain/runs.py)
    return path.name.startswith("events.out.tfevents") or path.suffix in (".yaml", ".yml") or path.name == "slurm_jobs"


def remove_new_logs(run_dir: Path, before: set[Path]) -> None:
    """Remove the event and config files a failed run added to an existing run directory (nothing else)."""
    for path in set(run_dir.iterdir()) - before:
        if path.is_file() and _is_log(path):
            path.unlink(missing_ok=True)
