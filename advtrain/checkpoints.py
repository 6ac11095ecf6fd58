"""Finding and checking checkpoints for the CLI: ``--ckpt_path last`` / ``best`` pick a file that loads and say
why; a truncated file or one of another network fails in one line that names the file and the alternatives."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
import yaml
from torch import nn

from advtrain.callbacks.requeue import REQUEUE_CHECKPOINT
from advtrain.defenses.base import describe_network


class CheckpointError(Exception):
    """A checkpoint that cannot be used as given; the message is one line that says what to do."""


# config keys that decide what a run trains (others: logging, progress, evaluation, resuming)
TRAINING_KEYS = ("seed_everything", "model", "data", "trainer.max_epochs", "trainer.precision",
                 "trainer.accumulate_grad_batches", "trainer.gradient_clip_val")


def versions(root: Path) -> list[Path]:
    """Run directories ``version_N`` under ``root``, newest (highest N) first."""
    found = [p for p in root.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def unreadable(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint (truncated, corrupted, not a checkpoint), or None. Checks the zip
    container and every member's checksum without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a readable checkpoint ({error or type(error).__name__}: truncated or not a torch file?)"
    return None if broken is None else f"corrupted: {broken} fails its checksum"


def run_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))




def _position(path: Path) -> tuple[int, int]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(checkpoint.get("global_step", -1)), int(checkpoint.get("epoch", -1))


def resume_point(run_dir: Path) -> Path | None:
    """The run's newest exact resume point: ``checkpoints/hpc.ckpt`` (the state when its job was signalled) or
    ``last.ckpt`` (each epoch's end), whichever is further in training; None if neither loads."""
    best, best_position = None, None
    for name in (REQUEUE_CHECKPOINT, "last.ckpt"):  # on a tie the epoch-end checkpoint wins: it comes later
        path = run_dir / "checkpoints" / name
        if path.is_file() and unreadable(path) is None:
            position = _position(path)
            if best_position is None or position >= best_position:
                best, best_position = path, position
    return best


def _candidates(run_dir: Path, which: str) -> list[Path]:
    folder = run_dir / "checkpoints"
    if which == "last":
        point = resume_point(run_dir)
        # a file that does not load is named in the notes (find_checkpoint) rather than passed over in silence
        return [point] if point is not None else [p for p in (folder / "last.ckpt",) if p.exists()]
    return sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(run_dir: Path, current: dict) -> list[str] | None:
    """The training settings in which the run's ``config_fit.yaml`` differs from ``current`` (None: no file)."""
    saved = run_dir / "config_fit.yaml"
    if not saved.exists():
        return None
    try:
        old = _flat(yaml.safe_load(saved.read_text()) or {})
    except yaml.YAMLError:
        return None
    new = _flat(current)
    keys = sorted(k for k in set(old) | set(new) if any(k == t or k.startswith(t + ".") for t in TRAINING_KEYS))
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k)]


def find_checkpoint(root: Path, which: str, current: dict | None = None) -> tuple[Path | None, list[str]]:
    """The newest usable resume point (which='last': ``last.ckpt`` or a requeued job's ``hpc.ckpt``, see
    :func:`resume_point`) or best checkpoint (which='best') under ``root``.

    Prefers the newest run whose ``config_fit.yaml`` trains what ``current`` trains; otherwise the newest run
    whose file loads. Returns the file and lines that say why it was chosen and what was passed over."""
    notes, loadable = [], []
    for run in versions(root):
        for path in _candidates(run, which):
            reason = unreadable(path)
            if reason is not None:
                notes.append(f"skipped {path}: {reason}")
                continue
            differences = None if current is None else config_differences(run, current)
            if not differences:
                return path, notes + [f"using {path}: the newest run with a loadable {which} checkpoint"
                                      + (" and the same training settings" if differences == [] else "")]
            loadable.append((path, differences))
            break
    if not loadable:
        return None, notes
    path, differences = loadable[0]
    others = ", ".join(str(p) for p, _ in loadable[1:4])
    notes.append(f"using {path}: the newest loadable {which} checkpoint, but its run was trained with other "
                 f"settings ({'; '.join(differences[:4])}){'; other candidates: ' + others if others else ''}")
    return path, notes


def check_checkpoint(path: Path, model: nn.Module) -> None:
    """Raise :class:`CheckpointError` when ``path`` does not load or holds weights of another network than
    ``model`` builds (named by the ``network`` field our defenses save, and by the mismatching keys)."""
    reason = unreadable(path)
    if reason is not None:
        others = [str(p) for p in run_checkpoints(path.parent.parent) if p != path]
        raise CheckpointError(f"checkpoint {path} is {reason}" + (
            f"; other checkpoints of this run: {', '.join(others)}" if others else
            "; no other checkpoint in its run: train again, or give another .ckpt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    state = checkpoint.get("state_dict", {})
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    network = getattr(model, "network", model)
    held = checkpoint.get("network", "another network")
    detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                       (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)) if keys)
    raise CheckpointError(f"checkpoint {path} holds {held} but this config builds {describe_network(network)}: "
                          f"the weights do not fit ({detail}). Use the config the run was trained with "
                          "(config_fit.yaml next to its checkpoints folder)")
