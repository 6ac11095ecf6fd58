"""A fork server for ``advtrain`` commands: one process per test worker imports the package (torch, Lightning:
about 6 of the 7 seconds a new ``advtrain`` process takes on the CI machine) once, and then forks a child per
command. Each child is still a process of its own, as a user's command is: its own working directory,
environment, standard output and error (files), exit code, and a signal or ``os._exit`` ends it alone.

Protocol (one JSON object per line): the test sends ``{args, cwd, env, stdout, stderr}``; the server forks, answers
``{pid}``, waits for the child and answers ``{returncode}`` (negative: killed by that signal, as subprocess says).
Run as ``python forkserver.py ROOT``; nothing has run in it but imports when it forks, so the children start from
the same state.
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
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        # as `python -m advtrain` would be: PYTHONPATH on the path, and a __main__ that launchers (Lightning's DDP
        # starts the other ranks with the same command) can name
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = extra
        spec = importlib.util.find_spec("advtrain.__main__")
        sys.modules["__main__"].__spec__ = spec
        sys.argv = [spec.origin, *request["args"]]
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

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
