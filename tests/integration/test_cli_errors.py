"""No lost results and no tracebacks: every rerun and every bad input through the command a user runs (a
subprocess), with its exit code, its one-line message, and checksums showing that nothing earlier changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_utils import ROOT, advtrain, config

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CHEAP = '[{"attack": "fgsm", "eps": 0.1}, {"attack": "pgd", "eps": 0.1, "steps": 2}]'
OTHER = '[{"attack": "fgsm", "eps": 0.05}]'
HELPERS = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """demo/standard trained for 2 epochs: version_0 with a best and a last checkpoint."""
    cwd = tmp_path_factory.mktemp("cli")
    advtrain("fit", "-c", config("demo/standard.yaml"), "--trainer.max_epochs", 2, *FAST, cwd=cwd)
    return cwd, cwd / "runs" / "demo" / "standard" / "version_0"


def test_two_checkpoints_keep_their_own_results_and_the_report_shows_both(trained, tmp_path):
    cwd, run = trained
    cfg = config("demo/standard.yaml")
    advtrain("test", "-c", cfg, "--ckpt_path", "best", "--evaluation.attacks", CHEAP, *FAST, cwd=cwd)
    (best,) = run.glob("robustness-best-epoch*.json")
    before = {p: digest(p) for p in (best, best.with_suffix(".md"), run / "config_test.yaml")}
    proc = advtrain("test", "-c", cfg, "--ckpt_path", "last", "--evaluation.attacks", CHEAP, *FAST, cwd=cwd)
    assert "using " in proc.stderr + proc.stdout and "last.ckpt" in proc.stderr + proc.stdout  # says which file
    last = run / "robustness-last.json"
    assert {p: digest(p) for p in before} == before  # nothing of the first evaluation changed
    assert not (run / "robustness_batches").exists()  # no empty cache folder left behind
    results = json.loads(last.read_text())
    assert results["global_step"] == 2 * 20 and results["epoch"] == 1  # the checkpoint's, not the test run's 0
    assert json.loads(best.read_text())["global_step"] > 0
    # the same checkpoint with another suite: a new file; the very same evaluation again: its own file, replaced
    first_last = digest(last)
    advtrain("test", "-c", cfg, "--ckpt_path", "last", "--evaluation.attacks", OTHER, *FAST, cwd=cwd)
    assert (run / "robustness-last-2.json").exists() and digest(last) == first_last
    again = advtrain("test", "-c", cfg, "--ckpt_path", "last", "--evaluation.attacks", CHEAP, *FAST, cwd=cwd)
    assert "replacing" in again.stderr + again.stdout and not (run / "robustness-last-3.json").exists()
    report = advtrain("report", run, cwd=cwd)
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ") and "[" in line]
    assert any(f"[{best.stem.removeprefix('robustness-')}]" in r for r in rows) and any("[last]" in r for r in rows)
    assert report.returncode == 0


def test_a_failed_test_keeps_the_saved_configs(trained):
    cwd, run = trained
    before = checksums(run)
    proc = advtrain("test", "-c", config("demo/standard.yaml"), "--ckpt_path", "last",
                    "--evaluation.attacks", OTHER, "--trainer.callbacks+=helpers.FailAt",
                    "--trainer.callbacks.hook", "test", *FAST, cwd=cwd, check=False, env_extra=HELPERS)
    assert proc.returncode != 0 and "simulated failure" in proc.stderr
    assert checksums(run) == before  # config_test.yaml untouched, and no new file left


def test_ckpt_path_last_skips_a_truncated_file_and_prefers_the_same_settings(trained, tmp_path):
    cwd, run = trained
    root = tmp_path / "runs" / "demo" / "standard"
    shutil.copytree(run.parent, root)
    (root / "version_1" / "checkpoints").mkdir(parents=True)
    good = root / "version_0" / "checkpoints" / "last.ckpt"
    (root / "version_1" / "checkpoints" / "last.ckpt").write_bytes(good.read_bytes()[:5000])  # truncated
    shutil.copytree(root / "version_0", root / "version_2")
    fit_config = (root / "version_2" / "config_fit.yaml").read_text()
    (root / "version_2" / "config_fit.yaml").write_text(fit_config.replace("max_epochs: 2", "max_epochs: 1"))
    proc = advtrain("test", "-c", config("demo/standard.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", 2,
                    "--evaluation.attacks", OTHER, "--evaluation.limit", 20, *FAST, cwd=tmp_path)
    output = proc.stderr + proc.stdout
    relative = Path("runs", "demo", "standard")  # the runs' save_dir is relative to where advtrain runs
    assert f"skipped {relative / 'version_1' / 'checkpoints' / 'last.ckpt'}: not a readable checkpoint" in output
    assert f"using {relative / 'version_0' / 'checkpoints' / 'last.ckpt'}" in output  # version_2 trained otherwise
    assert "same training settings" in output
    assert (root / "version_0" / "robustness-last.json").exists()


@pytest.mark.parametrize("which", ["fit", "test"])
def test_a_truncated_checkpoint_names_the_file_and_the_others(trained, tmp_path, which):
    cwd, run = trained
    broken = tmp_path / "run" / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:3000])
    shutil.copy(run / "checkpoints" / "last.ckpt", broken.parent / "last.ckpt")
    proc = advtrain(which, "-c", config("demo/standard.yaml"), "--ckpt_path", broken, *FAST, cwd=tmp_path,
                    check=False)
    one_line_error(proc, str(broken), "truncated", str(broken.parent / "last.ckpt"))
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_another_network_says_which_networks(trained, tmp_path):
    cwd, run = trained
    proc = advtrain("test", "-c", config("demo/tensorized.yaml"), "--ckpt_path", run / "checkpoints" / "last.ckpt",
                    *FAST, cwd=tmp_path, check=False)
    one_line_error(proc, "holds DigitsCNN", "builds Tensorized(DigitsCNN)")


@pytest.mark.parametrize("args,words", [
    (["-c", "configs/trainer/ddp.yaml"], ["no CUDA GPU", "--trainer.accelerator cpu"]),
    (["--model.init_args.eps", "8"], ["eps 8 is larger than half the input range", "8/255", "--allow_large_eps"]),
    (["--evaluation.attacks", '[{"attack": "pgd", "eps": 16}]'], ["pgd-10 eps=16", "16/255"]),
    (["--model", "advtrain.defenses.PGDATT"], ["did you mean advtrain.defenses.PGDAT?", "NuAT", "TRADES"]),
    (["--model", "defenses.PGDAT"], ["class path defenses.PGDAT", "is now advtrain.defenses.PGDAT"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    proc = advtrain("fit", "-c", config("demo/pgd_at.yaml"), *args, *FAST, cwd=tmp_path, check=False, timeout=120)
    one_line_error(proc, *words)
    assert not (tmp_path / "runs").exists()


def test_large_budgets_pass_when_allowed_and_checkpointing_can_be_off(tmp_path):
    advtrain("fit", "-c", config("demo/standard.yaml"), "--model.init_args.eps", "0.6", "--allow_large_eps", "true",
             "--trainer.enable_checkpointing", "false", "--trainer.max_epochs", 1, "--threads", 1, *FAST,
             cwd=tmp_path)
    run = tmp_path / "runs" / "demo" / "standard" / "version_0"
    assert run.is_dir() and not list(run.rglob("*.ckpt"))


def test_a_run_that_fails_before_its_first_step_leaves_no_run_directory(tmp_path):
    proc = advtrain("fit", "-c", config("demo/standard.yaml"), "--trainer.callbacks+=helpers.FailAt", *FAST,
                    cwd=tmp_path, check=False, env_extra=HELPERS)
    assert proc.returncode != 0 and "simulated failure" in proc.stderr
    assert not list((tmp_path / "runs").rglob("version_*"))


def test_the_console_script_exits_0_on_success_and_2_on_bad_input(trained, tmp_path):
    cwd, run = trained
    script = [str(Path(sys.executable).parent / "advtrain")]

    def call(*args):
        return subprocess.run([*script, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = config("demo/standard.yaml")
    # independent processes, two at a time (the machine's cores): each spends seconds importing torch
    with ThreadPoolExecutor(max_workers=2) as pool:
        ok, tested, covariance = pool.map(lambda args: call(*args), [
            ("transfer", "-c", cfg, "--checkpoints", ckpt, ckpt, "--attack", '{"attack": "fgsm", "eps": 0.1}',
             "--limit", 20, "--device", "cpu"),
            ("test", "-c", cfg, "--ckpt_path", ckpt, "--evaluation.attacks", OTHER, "--evaluation.limit", 20,
             "--evaluation.filename", "script", *FAST),
            ("covariance", "-c", cfg, "--output", tmp_path / "cov.pt")])
    assert ok.returncode == 0 and "Transfer matrix" in ok.stdout and "{'sources'" not in ok.stderr
    assert tested.returncode == 0 and (run / "script-last.json").exists()
    assert call("report", run / "script-last.json").returncode == 0  # the results the test above wrote
    assert covariance.returncode == 0
    bad = call("fit", "-c", cfg, "--trainer.epochz", 1)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    # every other command's mistakes, through the same main() (cli_utils forks them: no second start-up each)
    for args in [("report", tmp_path / "nothing"), ("covariance", "-c", cfg, "--output", tmp_path / "cov.pt"),
                 ("transfer", "-c", cfg, "--checkpoints", tmp_path / "missing.ckpt", "--attack", '{"attack": "x"}'),
                 ("transfer", "-c", cfg, "--checkpoints", tmp_path / "missing.ckpt", "--attack",
                  '{"attack": "fgsm", "eps": 0.1}'),
                 ("test", "-c", cfg, "--ckpt_path", tmp_path / "missing.ckpt")]:
        proc = advtrain(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_the_progress_bar_names_the_setting_that_runs(trained):
    cwd, run = trained
    proc = advtrain("test", "-c", config("demo/standard.yaml"), "--ckpt_path", run / "checkpoints" / "last.ckpt",
                    "--evaluation.attacks", CHEAP, "--evaluation.limit", 100, "--evaluation.batch_size", 50,
                    "--evaluation.filename", "progress", "--trainer.enable_model_summary", "false", cwd=cwd)
    assert "batch 1/2: fgsm eps=0.1" in proc.stderr and "batch 2/2: pgd-2 eps=0.1" in proc.stderr
