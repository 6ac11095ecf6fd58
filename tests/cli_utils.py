"""Running the ``advtrain`` command in a process of its own, as a user would.

A new Python process spends most of its start importing torch and Lightning, and the suite runs dozens of
commands, so :func:`advtrain` forks them from a server that has imported the package once (``forkserver.py``): each
command is still its own process, with its own working directory, environment, output and exit code.
``ADVTRAIN_TEST_SUBPROCESS=1`` (or an ``env_extra`` beyond PYTHONPATH) starts a new interpreter instead.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADVTRAIN = [sys.executable, "-m", "advtrain"]
_server: subprocess.Popen | None = None
_lock = threading.Lock()
_late = 0  # answers still to come for requests that timed out


def _fork_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
        _server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")), str(ROOT)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        atexit.register(_server.kill)
    return _server


def _reply(server: subprocess.Popen, timeout: float | None) -> dict:
    if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
        raise TimeoutError
    line = server.stdout.readline()
    if not line:
        raise RuntimeError("the advtrain fork server died")
    return json.loads(line)


def _request(request: dict, timeout: float | None = None) -> dict:
    """Send one request to this worker's fork server and read its answer (after any answer a timed-out request
    left behind)."""
    global _late
    server = _fork_server()
    while _late:
        _reply(server, 600)
        _late -= 1
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    try:
        return _reply(server, timeout)
    except TimeoutError:
        _late += 1
        raise


class Forked:
    """A command forked by the server (``subprocess.Popen``'s ``pid`` and ``wait``): standard output and error go to
    files (the same file for both, as ``stderr=STDOUT``); ``group`` as in ``forkserver.py``."""

    def __init__(self, args: list[str], cwd, env: dict, stdout: Path, stderr: Path | None = None,
                 group: int | None = None):
        self.args, self.output_path, self.returncode = args, stdout, None
        with _lock:
            self.pid = _request({"op": "start", "args": args, "cwd": str(cwd), "env": env, "stdout": str(stdout),
                                 "stderr": str(stderr or stdout), "group": group}, 60)["pid"]

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            with _lock:
                try:
                    self.returncode = _request({"op": "wait", "pid": self.pid}, timeout)["returncode"]
                except TimeoutError:
                    raise subprocess.TimeoutExpired(["advtrain", *self.args], timeout) from None
        return self.returncode


def _forked(args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        command = Forked(args, cwd, env, out, err)
        try:
            code = command.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(command.pid, signal.SIGKILL)
            raise
        return subprocess.CompletedProcess(["advtrain", *args], code, out.read_text(), err.read_text())


def forking() -> bool:
    """Whether commands fork from the server (the default) rather than start a new interpreter."""
    return os.environ.get("ADVTRAIN_TEST_SUBPROCESS") != "1"


def advtrain(*args, cwd, check=True, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    env.update(env_extra or {})
    args = [str(a) for a in args]
    if not forking() or set(env_extra or {}) - {"PYTHONPATH"}:
        proc = subprocess.run([*ADVTRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        proc = _forked(args, cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"advtrain {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def config(name: str) -> Path:
    return ROOT / "configs" / name


def straight_and_resumed(args: list, kill_at_step: int, cwd: Path) -> tuple[dict, dict, dict]:
    """``advtrain fit *args`` twice: once uninterrupted (run name "straight"), once SIGKILLed at ``kill_at_step``
    and resumed with ``--ckpt_path last`` (run name "killed"). Returns the ``last.ckpt`` of the straight run, of
    the resumed run, and the one the killed run had left, loaded."""
    import torch  # only the tests that resume need it

    def last(name: str) -> dict:
        return torch.load(cwd / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)

    advtrain("fit", *args, "--trainer.logger.init_args.name", "straight", cwd=cwd)
    killed = advtrain("fit", *args, "--trainer.logger.init_args.name", "killed",
                      "--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step", kill_at_step,
                      cwd=cwd, check=False, env_extra={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert killed.returncode != 0, "the run was meant to be killed"
    interrupted = last("killed")
    advtrain("fit", *args, "--trainer.logger.init_args.name", "killed", "--ckpt_path", "last", cwd=cwd)
    assert not (cwd / "runs" / "killed" / "version_1").exists()  # resumed in the same run directory
    return last("straight"), last("killed"), interrupted


def last_checkpoint(trainer) -> str:
    """The path of the run's last.ckpt (the ``last_checkpoint`` callback of the CLI)."""
    return next(cb.best_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "filename", None) == "last")
