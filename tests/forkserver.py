"""A fork server for ``advtrain`` commands: one process per test worker imports the package (torch, Lightning:
about 6 of the 7 seconds a new ``advtrain`` process takes on the CI machine) once, and then forks a child per
command. Each child is still a process of its own, as a user's command is: its own working directory,
environment, standard output and error (files), exit code, and a signal or ``os._exit`` ends it alone.

Protocol (one JSON object per line): the test sends ``{op, args, cwd, env, stdout, stderr, group}``. ``op: run``:
the server forks, answers ``{pid}``, waits for the child and answers ``{returncode}`` (negative: killed by that signal,
as subprocess says). ``op: start`` answers ``{pid}`` only (the tasks of one simulated SLURM job run at once), and
``{op: wait, pid}`` later answers its ``{returncode}``. ``group``: None, 0 (a new process group, as
``Popen(process_group=0)``) or the group to join. Run as ``python forkserver.py ROOT``; nothing has run in it but
imports when it forks, so the children start from the same state.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def _child(request: dict) -> None:
    """Become the command (never returns)."""
    code = 1
    try:
        if request.get("group") is not None:
            os.setpgid(0, request["group"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        # one file for both (stderr=STDOUT) shares one offset, as a shell's 2>&1 does
        same = request["stderr"] == request["stdout"]
        os.dup2(out if same else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        # as `python -m advtrain` would be: PYTHONPATH on the path, and a __main__ that launchers (Lightning's DDP
        # starts the other ranks with the same command) can name
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = extra
        spec = importlib.util.find_spec("advtrain.__main__")
        sys.modules["__main__"].__spec__ = spec
        sys.argv = [spec.origin, *request["args"]]
        # Lightning reads the process's rank from the environment when it is imported (SLURM_PROCID, RANK, ...)
        from lightning_fabric.utilities.rank_zero import _get_rank
        from lightning_utilities.core.rank_zero import rank_zero_only

        rank_zero_only.rank = _get_rank() or 0
        from advtrain.console import main

        try:
            code = main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        code = 0 if code is None else code
    except BaseException:  # what an uncaught exception does to a process: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(root: str) -> None:
    sys.path[:0] = [root, os.path.join(root, "tests")]
    import advtrain.cli  # noqa: F401  (the imports every command pays)
    import advtrain.console  # noqa: F401
    import advtrain.sweep  # noqa: F401
    import advtrain.transfer  # noqa: F401

    finished: dict[int, int] = {}  # exit codes of children already waited for
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "wait":
            pid = request["pid"]
        else:
            pid = os.fork()
            if pid == 0:
                _child(request)
            if request.get("group") is not None:
                try:  # here too, so that the group exists before the next task of the job joins it
                    os.setpgid(pid, request["group"] or pid)
                except OSError:
                    pass
            print(json.dumps({"pid": pid}), flush=True)
            if request["op"] == "start":
                continue
        if pid not in finished:
            finished[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(json.dumps({"returncode": finished[pid]}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
