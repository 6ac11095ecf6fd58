"""One cell of ``advtrain sweep`` as its job runs it (locally or as a SLURM array task), and its status file."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from .tables import Cell

STATUS = "sweep_cell.json"  # in each cell's run directory: running / done / failed, and its log


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))


def _write_status(cell: Cell, **status) -> None:
    if _rank() == 0:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        status["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (cell.run_dir / STATUS).write_text(json.dumps(status, indent=1))


def read_status(cell: Cell) -> dict:
    try:
        return json.loads((cell.run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def run_cell(cell: Cell, fit_extra: tuple[str, ...] = (), test_extra: tuple[str, ...] = ()) -> str:
    """The job of one cell (pickled by submitit): ``advtrain fit`` then ``advtrain test`` in this process. Its status
    file says running, then done or failed; a requeued job leaves it at running (it resumes)."""
    from advtrain.callbacks.requeue import Requeued
    from advtrain.cli import run

    log = None
    try:
        import submitit

        log = str(submitit.JobEnvironment().paths.stdout).replace("%t", str(_rank()))
    except RuntimeError:  # not inside a submitit job
        pass
    _write_status(cell, status="running", log=log)
    try:
        for args in cell.commands(fit_extra)[:-1]:  # fit, unless the row is only tested
            run(args)
        run(cell.test_args(test_extra))
    except Requeued:
        raise
    except SystemExit as error:
        if error.code not in (0, None):
            _write_status(cell, status="failed", log=log, error=f"exit code {error.code}")
            raise
    except BaseException as error:
        _write_status(cell, status="failed", log=log, error=f"{type(error).__name__}: {error}"[:500])
        raise
    _write_status(cell, status="done", log=log)
    return str(cell.run_dir)
