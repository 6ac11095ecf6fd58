"""A simulated SLURM cluster on one machine, as Lightning's own tests do it: the environment variables a job's tasks
see, and fake ``scontrol`` / ``sbatch`` / ``squeue`` / ``sacct`` commands on PATH that record what they are given.

The fake ``scontrol requeue`` also does what SLURM does next: it kills every process of the job (SIGKILL to the
process group the test started the job's tasks in).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from cli_utils import ADVTRAIN, ROOT, Forked, forking

FAKE_SCONTROL = """#!{python}
import os, signal, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["requeue"]:  # SLURM ends a requeued job's processes
    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm_bin(folder: Path) -> Path:
    """A folder with the fake ``scontrol``; put it first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(FAKE_SCONTROL.format(python=sys.executable))
    script.chmod(0o755)
    return folder


def slurm_env(job: int, *, rank: int = 0, tasks: int = 1, nodes: int = 1, array_task: int | None = None,
              port: int | None = None, log: Path | None = None, bin_dir: Path | None = None) -> dict:
    """The variables Lightning's SLURMEnvironment reads for task ``rank`` of ``tasks`` spread over ``nodes`` nodes of
    this machine (an array task if ``array_task`` is given: SLURM_JOB_ID is then the task's own id)."""
    per_node = tasks // nodes
    env = {"SLURM_JOB_ID": str(job + (array_task or 0)), "SLURM_JOB_NAME": "advtrain", "SLURM_NTASKS": str(tasks),
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
           "SLURM_NODEID": str(rank // per_node), "SLURM_NODELIST": ",".join(["localhost"] * nodes),
           "MASTER_PORT": str(port or free_port())}
    if array_task is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(array_task))
    if log is not None:
        env["FAKE_SLURM_LOG"] = str(log)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    return env


def start_tasks(args: list, envs: list[dict], cwd: Path) -> list:
    """Start one ``advtrain`` process per task environment, all in one new process group (the job). Each task's
    output goes to a file (a pipe that nobody reads while the job runs could fill up and stall a task). The tasks are
    forked from the test worker's fork server (``cli_utils``), or with ``ADVTRAIN_TEST_SUBPROCESS=1`` started as new
    interpreters."""
    procs = []
    for env in envs:
        full = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", PYTHONHASHSEED="0", **env)
        group = procs[0].pid if procs else 0  # one new process group: the job
        output = Path(tempfile.mkdtemp()) / "output"
        if forking():
            procs.append(Forked([str(a) for a in args], cwd, full, output, group=group))
            continue
        with open(output, "w") as out:
            proc = subprocess.Popen([*ADVTRAIN, *map(str, args)], cwd=cwd, env=full, stdout=out,
                                    stderr=subprocess.STDOUT, text=True, process_group=group)
        proc.output_path = output
        procs.append(proc)
    return procs


def wait(procs: list, timeout: float = 300) -> list[tuple[int, str]]:
    """Wait for every task: their exit codes and output. A job still running after ``timeout`` seconds is killed."""
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(60)
        raise
    return [(code, proc.output_path.read_text()) for code, proc in zip(codes, procs, strict=True)]


FAKE_SBATCH = """#!{python}
import os, shutil, sys
log = os.environ["FAKE_SLURM_LOG"]
with open(log, "a") as f:
    f.write("sbatch " + " ".join(sys.argv[1:]) + "\\n")
folder = os.path.dirname(log)
n = len([f for f in os.listdir(folder) if f.startswith("submitted")])
shutil.copy(sys.argv[-1], os.path.join(folder, f"submitted{{n or ''}}.sh"))  # submitted.sh, submitted1.sh, ...
print(f"Submitted batch job {{4242 + n}}")
"""

FAKE_SACCT = """#!{python}
import os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("sacct " + " ".join(sys.argv[1:]) + "\\n")
print("JobID|State|NodeList")
for line in os.environ.get("FAKE_SACCT_STATES", "").split(","):
    if line:
        print(line)
"""

FAKE_QUIET = """#!/bin/sh
echo "$(basename $0) $*" >> "$FAKE_SLURM_LOG"
"""


def fake_login_node(folder: Path) -> Path:
    """A folder with fake ``sbatch`` (records the script, answers with job 4242, then 4243, ...), ``sacct``
    (answers the states in FAKE_SACCT_STATES, e.g. ``4242_0|RUNNING|node1``), ``squeue`` and ``srun``; put it first
    on PATH."""
    fake_slurm_bin(folder)
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("squeue", FAKE_QUIET), ("srun", FAKE_QUIET)):
        (folder / name).write_text(text.format(python=sys.executable))
        (folder / name).chmod(0o755)
    return folder
