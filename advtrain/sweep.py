"""``advtrain sweep``: every cell of a paper table (a row's config with one seed) trained, tested and reported.

    advtrain sweep configs/tables/sgr_mnist.yaml --seeds 0 1 2                    # on this machine, 2 cells at once
    advtrain sweep configs/tables/nuat_cifar10.yaml --executor slurm --partition gpu --gpus 1 --time 1440
    advtrain sweep configs/tables/nuat_cifar10.yaml --executor slurm --dry-run    # the cells, commands and script

Each cell runs ``advtrain fit`` (into ``runs/<table>/<row>/seed_<seed>``, resuming from its checkpoint if it has
one) and then ``advtrain test`` of the checkpoint the table names, in one process per cell (per GPU under DDP),
through submitit: its local executor here, a SLURM job array on a cluster, one array task per cell. When every
cell is done the table is written with ``advtrain report`` (``runs/<table>/table.md``, ``table.csv``): each cell
the mean ± std (n) over seeds.

Rerunning a sweep skips the finished cells, leaves alone the ones still queued or running on SLURM, resumes the
interrupted ones from their newest checkpoint and reruns the failed ones; it says which for each cell. A failed
cell is reported with its config, seed and log, and stops no other cell.

Requeue on SLURM belongs to Lightning's side of the job (``advtrain.callbacks.Requeue``): the script asks SLURM for
``--signal=USR1@90`` and ``--requeue``, and submitit's own handler (SIGUSR2) is never signalled.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from .cell import read_status
from .guards import UsageError
from .tables import Cell, load_table, seeds_of

SLURM_OPTIONS = ("partition", "gpus", "cpus", "nodes", "time", "sbatch")
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD")


def queued(table_dir: Path, cell: Cell) -> str | None:
    """The SLURM job of ``cell`` (from an earlier sweep) if it is still pending or running."""
    record = _record(table_dir).get(cell.name)
    if not record or record.get("executor") != "slurm" or shutil.which("sacct") is None:
        return None
    import submitit

    state = submitit.SlurmJob(folder=record["folder"], job_id=record["job"]).state
    return record["job"] if state.split()[0] in ACTIVE else None


def _record(table_dir: Path) -> dict:
    try:
        return json.loads((table_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}


def plan(cells: list[Cell], table_dir: Path) -> list[tuple[Cell, str, str]]:
    """(cell, what to do: skip / wait / resume / rerun / start, why) for every cell."""
    from .checkpoints import resume_point

    out = []
    for cell in cells:
        status, job = read_status(cell), queued(table_dir, cell)
        point = resume_point(cell.run_dir) if cell.run_dir.is_dir() else None
        if status.get("status") == "done":
            out.append((cell, "skip", "finished"))
        elif job is not None:
            out.append((cell, "wait", f"queued or running as SLURM job {job}"))
        elif status.get("status") == "failed":
            out.append((cell, "rerun", f"failed before ({status.get('error')}; log {status.get('log')})"
                        + (f"; resumes from {point}" if point else "")))
        elif point is not None or status.get("status") == "running":
            out.append((cell, "resume", f"interrupted; resumes from {point}" if point else "interrupted before its "
                        "first checkpoint; starts again"))
        else:
            out.append((cell, "start", "new"))
    return out


class SweepParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every advtrain mistake
        sys.stderr.write(f"advtrain sweep: error: {message}\n")
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = SweepParser(prog="advtrain sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="a table file, e.g. configs/tables/sgr_mnist.yaml")
    p.add_argument("--seeds", nargs="+", metavar="SEED", help="the seeds of every row (default: the table's)")
    p.add_argument("--executor", default="local", help="local (this machine) or slurm (a job array)")
    p.add_argument("--parallel", type=int, default=None, metavar="K",
                   help="cells at once (local: default 2, each with its share of the CPU threads; slurm: the "
                        "array's parallelism, default all)")
    p.add_argument("--dry-run", action="store_true", help="print the cells, their commands (and the SLURM script); "
                   "submit and write nothing")
    p.add_argument("--runs", default="runs", help="the folder of all runs (default: runs)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a config appended to every cell's, e.g. configs/trainer/gpu.yaml (repeatable)")
    slurm = p.add_argument_group("SLURM (--executor slurm)")
    slurm.add_argument("--partition", help="the partition")
    slurm.add_argument("--gpus", type=int, help="GPUs per node of a cell, one process per GPU (DDP when > 1)")
    slurm.add_argument("--cpus", type=int, help="CPUs per process")
    slurm.add_argument("--nodes", type=int, help="nodes per cell, for cells that train with multi-node DDP")
    slurm.add_argument("--time", type=int, metavar="MINUTES", help="each array task's time limit")
    slurm.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="an extra sbatch parameter, e.g. "
                       "account=myproject or constraint=a100 (repeatable)")
    return p


def check(args) -> None:
    if args.executor not in ("local", "slurm"):
        raise UsageError(f"--executor must be local or slurm, got {args.executor!r}")
    given = [f"--{name}" for name in SLURM_OPTIONS if getattr(args, name) is not None]
    if given and args.executor != "slurm":
        raise UsageError(f"{', '.join(given)} {'is a SLURM option' if len(given) == 1 else 'are SLURM options'}: add "
                         "--executor slurm")
    if args.executor == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise UsageError("--executor slurm needs SLURM's sbatch, which is not on PATH: run the sweep on a login node "
                         "of the cluster (or --dry-run to see what it would submit)")
    for name in ("parallel", "gpus", "cpus", "nodes", "time"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus" else 1):
            raise UsageError(f"--{name} must be {'>= 0' if name == 'gpus' else '>= 1'}, got {value}")
    for item in args.sbatch or []:
        if "=" not in item:
            raise UsageError(f"--sbatch takes KEY=VALUE, got {item!r}")
    for config in args.config:
        if not Path(config).is_file():
            raise UsageError(f"--config {config}: no such file")


def main(argv=None, show_table: bool = True) -> int:
    """The command; ``show_table=False`` writes the table without printing it (``make demo`` prints its own)."""
    args = parser().parse_args(argv)
    try:
        check(args)
        table = load_table(args.table)
        seeds = None if args.seeds is None else seeds_of(args.seeds, "--seeds")
        cells = table.cells(seeds, args.runs, tuple(args.config))
    except UsageError as error:
        sys.stderr.write(f"advtrain sweep: error: {error}\n")
        return 2
    from . import executors

    table_dir = Path(args.runs) / table.name
    todo = plan(cells, table_dir)
    runner = executors.Slurm(args, table_dir) if args.executor == "slurm" else executors.Local(args, table_dir)
    print(f"advtrain sweep {args.table}: {len(cells)} cells ({len(table.rows)} rows x {len(cells) // len(table.rows)} "
          f"seeds), {runner.describe(sum(what in ('start', 'resume', 'rerun') for _, what, _ in todo))}")
    for cell, what, why in todo:
        print(f"  {cell.name:<28} {what:<6} {why}  [{cell.run_dir}]")
        if args.dry_run and what != "skip":
            for command in cell.commands(runner.extra()):
                print(f"      advtrain {shlex.join(command)}")
    if args.dry_run:
        print(runner.dry_run_text([cell for cell, what, _ in todo if what in ("start", "resume", "rerun")]), end="")
        print("(dry run: nothing was submitted or written)")
        return 0
    started = time.time()
    unfinished = runner.run([cell for cell, what, _ in todo if what in ("start", "resume", "rerun")])
    done = sum(read_status(cell).get("status") == "done" for cell in cells)
    print(f"{done} of {len(cells)} cells done ({time.time() - started:.0f} s)")
    if done == len(cells):
        written = write_table(table_dir, [row["name"] for row in table.rows])
        print(written if show_table else written.splitlines()[-1])
    elif args.executor == "slurm":
        print(runner.summary_note())
    return 1 if unfinished else 0


def write_table(table_dir: Path, rows: list[str]) -> str:
    """``advtrain report`` of the table: ``table.md`` and ``table.csv`` in its folder; returns the markdown."""
    from . import report

    header, body, seeds = report.seed_table(report.collect([table_dir]))
    order = {row: i for i, row in enumerate(rows)}  # the table's row order
    body.sort(key=lambda line: order.get(line[0].split("/")[0].split(" ")[0], len(order)))
    text = report.markdown(header, body)
    (table_dir / "table.md").write_text(text + "\n")
    report.write_csv(table_dir / "table.csv", header, body, seeds)
    return f"{text}\n(written to {table_dir / 'table.md'} and table.csv" + (
        "; each cell: mean ± std (number of seeds))" if seeds else ")")
