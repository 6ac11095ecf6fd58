"""Where ``advtrain sweep`` runs its cells: submitit's local executor (this machine, K cells at once, each with its
share of the CPU threads) or a SLURM job array (one array task per cell)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from .cell import read_status, run_cell
from .tables import Cell

WEEK_MIN = 7 * 24 * 60  # submitit's local executor kills a job after its timeout (2 minutes unless told)


def _quiet() -> tuple[str, ...]:
    return ("--trainer.enable_progress_bar", "false")  # logs, not terminals


def _needed_done(cell: Cell, row: str) -> bool:
    """Whether the cell of ``row`` with ``cell``'s seed is done."""
    return read_status(Cell(cell.table, row, cell.seed, cell.configs, runs=cell.runs)).get("status") == "done"


def _stages(cells: list[Cell]) -> list[list[Cell]]:
    """``cells`` in stages: a cell comes after every cell of this list it needs."""
    depth: dict[tuple[str, int], int] = {}
    for cell in cells:  # tables list a needed row before the rows that need it
        depth[cell.row, cell.seed] = 1 + max((depth.get((need, cell.seed), -1) for need in cell.needs), default=-1)
    return [[c for c in cells if depth[c.row, c.seed] == d] for d in range(1 + max(depth.values(), default=-1))]


def _queued_job(record: dict, row: str, cell: Cell) -> str | None:
    """The job that an earlier sweep submitted for the cell of ``row`` with ``cell``'s seed, if it is not done."""
    other = Cell(cell.table, row, cell.seed, cell.configs, runs=cell.runs)
    entry = record.get(other.name)
    return entry["job"] if entry and read_status(other).get("status") != "done" else None


class Local:
    """One process per cell through ``submitit.LocalExecutor``, at most ``--parallel`` at once."""

    def __init__(self, args, table_dir: Path):
        self.parallel = args.parallel or 2
        self.threads = max(1, len(os.sched_getaffinity(0)) // self.parallel)
        self.folder = table_dir / "submitit"

    def describe(self, n: int) -> str:
        return (f"local executor: {n} to run, {min(self.parallel, max(n, 1))} at a time with {self.threads} "
                f"thread{'s' if self.threads > 1 else ''} each")

    def extra(self) -> tuple[str, ...]:
        return ("--threads", str(self.threads), *_quiet())

    def dry_run_text(self, cells: list[Cell]) -> str:
        return ""

    def run(self, cells: list[Cell]) -> list[Cell]:
        """Run ``cells`` (a cell after the cells it needs); returns those that did not finish, each with its reason
        printed."""
        import submitit

        executor = submitit.LocalExecutor(folder=self.folder)
        executor.update_parameters(timeout_min=WEEK_MIN, stderr_to_stdout=True)
        pending, running, unfinished = list(cells), {}, []
        while pending or running:
            in_play = {(c.row, c.seed) for c in [*pending, *(cell for cell, _ in running.values())]}
            for cell in [c for c in pending if any((need, c.seed) not in in_play and not _needed_done(c, need)
                                                   for need in c.needs)]:
                pending.remove(cell)
                unfinished.append(cell)
                print(f"  SKIPPED   {cell.name}: it needs {', '.join(cell.needs)} seed {cell.seed}, which did not "
                      "finish", flush=True)
            ready = [c for c in pending if all(_needed_done(c, need) for need in c.needs)]
            while ready and len(running) < self.parallel:
                cell = ready.pop(0)
                pending.remove(cell)
                job = executor.submit(run_cell, cell, self.extra(), self.extra())
                running[job] = (cell, time.time())
                print(f"  started   {cell.name} (log {job.paths.stdout})", flush=True)
            time.sleep(0.2)
            for job in [job for job in running if job.done()]:
                cell, started = running.pop(job)
                status = read_status(cell)
                if status.get("status") == "done":
                    print(f"  finished  {cell.name} in {time.time() - started:.0f} s", flush=True)
                    continue
                unfinished.append(cell)
                what = "FAILED   " if status.get("status") == "failed" else "STOPPED  "
                print(f"  {what} {cell.name}: config {cell.configs[0]}, seed {cell.seed}, "
                      f"{status.get('error', 'interrupted')}; log {job.paths.stdout}", flush=True)
        return unfinished


class Slurm:
    """One SLURM job array (``submitit.SlurmExecutor.map_array``), one task per cell."""

    def __init__(self, args, table_dir: Path):
        self.args, self.table_dir = args, table_dir
        self.folder = table_dir / "submitit" / "%j"

    def parameters(self, n: int) -> dict:
        a = self.args
        gpus, nodes = a.gpus or 0, a.nodes or 1
        params = {"job_name": f"advtrain-{self.table_dir.name}", "time": a.time or 24 * 60, "nodes": nodes,
                  "ntasks_per_node": max(1, gpus), "stderr_to_stdout": True,
                  # Lightning's side of the job owns the requeue (advtrain.callbacks.Requeue on SIGUSR1): submitit's
                  # handler
                  # listens to SIGUSR2, which this script never asks for
                  "additional_parameters": {"signal": "USR1@90", "requeue": True,
                                            **dict(item.split("=", 1) for item in a.sbatch or [])}}
        for key, value in (("partition", a.partition), ("cpus_per_task", a.cpus), ("gpus_per_node", a.gpus or None),
                           ("array_parallelism", a.parallel)):
            if value is not None:
                params[key] = value
        return params

    def extra(self) -> tuple[str, ...]:
        a, extra = self.args, list(_quiet())
        if a.gpus:
            extra += ["--trainer.accelerator", "gpu", "--trainer.devices", str(a.gpus)]
        if a.nodes:
            extra += ["--trainer.num_nodes", str(a.nodes)]
        if (a.gpus or 1) * (a.nodes or 1) > 1:
            extra += ["--trainer.strategy", "ddp"]
        if a.cpus:
            extra += ["--threads", str(a.cpus)]
        return tuple(extra)

    def describe(self, n: int) -> str:
        at_once = f", at most {self.args.parallel} at once" if self.args.parallel else ""
        return f"SLURM executor: {n} to submit as one job array, one task per cell{at_once}"

    def dry_run_text(self, cells: list[Cell]) -> str:
        """The sbatch script of the first job array, as submitit would write it."""
        from submitit.slurm.slurm import _make_sbatch_string

        stages = _stages(cells)
        if not stages:
            return ""
        folder = self.folder.absolute()
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        n = len(stages[0])
        script = _make_sbatch_string(command=command, folder=folder, map_count=n, **self.parameters(n))
        later = (f"; {len(stages) - 1} later array(s) for the {sum(map(len, stages[1:]))} cells that start from "
                 "another cell's checkpoint, each with --dependency=afterok on the arrays before" if len(stages) > 1
                 else "")
        return (f"the script of the job array (one task per cell, each running its cell's fit and test, pickled "
                f"beside it{later}):\n" + script)

    def run(self, cells: list[Cell]) -> list[Cell]:
        """Submit ``cells`` as job arrays: one for the cells that need no other, then one per later stage, each
        starting after the arrays it needs end well (``--dependency=afterok``)."""
        import submitit

        record_path = self.table_dir / "sweep.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        submitted = {}  # (row, seed) -> job id, for the stages after
        stages = _stages(cells)
        for stage in stages:
            executor = submitit.SlurmExecutor(folder=self.folder)
            params = self.parameters(len(stage))
            after = sorted({job.split("_")[0] for cell in stage for need in cell.needs
                            if (job := submitted.get((need, cell.seed)) or _queued_job(record, need, cell))})
            if after:
                params["additional_parameters"] = {**params["additional_parameters"],
                                                   "dependency": "afterok:" + ":".join(after)}
            executor.update_parameters(**params)
            n = len(stage)
            jobs = executor.map_array(run_cell, stage, [self.extra()] * n, [self.extra()] * n)
            for cell, job in zip(stage, jobs):
                submitted[cell.row, cell.seed] = job.job_id
                record[cell.name] = {"executor": "slurm", "job": job.job_id, "folder": str(self.folder)}
                print(f"  submitted {cell.name} as SLURM job {job.job_id}" + (f" after job {', '.join(after)}"
                                                                             if after else ""))
        if stages:
            self.table_dir.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps(record, indent=1))
        return []

    def summary_note(self) -> str:
        return ("when the jobs end, run the same command again: it skips the finished cells, resumes or reruns the "
                "others, and writes the table")
