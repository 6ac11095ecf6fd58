"""Preemption and requeue on a simulated SLURM cluster: a signalled job saves its state between two steps into its
own run, asks ``scontrol`` to requeue it and is killed; the same command then continues that run bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from cli_utils import ROOT, advtrain, config
from cluster_utils import fake_slurm_bin, slurm_env, start_tasks, wait

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# NuAT-WA (an EMA, the lambda schedule), a per-batch learning-rate schedule and the covariance tracker: every kind
# of state a run carries
SCHEDULE = json.dumps({"class_path": "advtrain.defenses.schedules.PiecewiseLinearLR",
                       "init_args": {"epochs": [0, 1, 2], "factors": [0.5, 1.0, 0.1]}})
NUAT_WA = ["-c", config("demo/nuat.yaml"), "--trainer.max_epochs", 2, "--model.init_args.lr_scheduler", SCHEDULE,
           "--trainer.callbacks+=advtrain.callbacks.CovarianceTracker", "--trainer.callbacks.source", "defense", *FAST]
WITH_HELPERS = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
SIGNAL_AT = 25  # digits: 20 batches per epoch, so the signal comes in the middle of the second epoch


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every preempted one must end equal to."""
    cwd = tmp_path_factory.mktemp("straight")
    advtrain("fit", *NUAT_WA, "--trainer.logger.init_args.name", "straight", cwd=cwd)
    return cwd / "runs" / "straight" / "version_0"


def load(path):
    return torch.load(path, weights_only=False)


def assert_same_state(a, b, path="checkpoint"):
    """Equal tensors and values everywhere but the paths Lightning's ModelCheckpoint keeps (other run folders)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key not in ("best_model_path", "kth_best_model_path", "dirpath", "best_k_models", "last_model_path"):
                assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def scalars(run_dir, tag):
    """Every (step, value) of a TensorBoard tag in each events file of the run, in the order the files were made."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = []
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            series.append([(e.step, e.value) for e in accumulator.Scalars(tag)])
    return series


@pytest.mark.xdist_group("straight")  # one worker trains the module's straight run once for both tests
def test_preempted_job_continues_its_run_bitwise(tmp_path, straight):
    log, bin_dir = tmp_path / "slurm.log", fake_slurm_bin(tmp_path / "bin")
    env = slurm_env(77, array_task=3, log=log, bin_dir=bin_dir)
    command = ["fit", *NUAT_WA, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", SIGNAL_AT]
    (code, out), = wait(start_tasks(command, [env], tmp_path))
    assert code == -9, out  # killed by SLURM after it asked for the requeue
    assert log.read_text() == "scontrol requeue 77_3\n"  # the array task, as SLURM names it
    run = tmp_path / "runs" / "demo" / "nuat" / "version_0"
    assert (run / "slurm_jobs").read_text().split() == ["77_3"]
    assert load(run / "checkpoints" / "hpc.ckpt")["global_step"] == SIGNAL_AT + 1  # the step that was running
    assert load(run / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert not list(tmp_path.glob("*.ckpt"))  # nothing in the working directory that another job could pick up

    (code, out), = wait(start_tasks(command, [env], tmp_path))  # the requeued job: the same command
    assert code == 0, out
    assert f"continues its run runs/demo/nuat/version_0 from {run.relative_to(tmp_path)}/checkpoints/hpc.ckpt" in out
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    assert not (run / "checkpoints" / "hpc.ckpt").exists()  # training finished: last.ckpt is further
    resumed, expected = load(run / "checkpoints" / "last.ckpt"), load(straight / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == expected["global_step"] == 40
    assert_same_state(expected, resumed)  # weights, optimizer, schedule, EMA, covariance, loops, random streams

    # TensorBoard: one curve in the one run folder, continued by a second events file, equal to the straight run's
    before, after = scalars(run, "train/loss")
    assert max(step for step, _ in before) < min(step for step, _ in after)
    assert before + after == [point for series in scalars(straight, "train/loss") for point in series]


def test_array_tasks_started_together_stay_apart(tmp_path):
    """Two seeds of one config as two tasks of one array, started at once in one working directory; task 2 is
    killed without warning (SIGKILL: no hpc.ckpt) in its second epoch and requeued by SLURM; then a job with
    another config, next to a stray hpc checkpoint of Lightning's own naming."""
    bin_dir, log = fake_slurm_bin(tmp_path / "bin"), tmp_path / "slurm.log"
    tiny = ["--trainer.limit_train_batches", 3, "--trainer.limit_val_batches", 1, *FAST]
    command = ["fit", "-c", config("demo/pgd_at.yaml"), "--model.init_args.attack.steps", 1, *tiny]
    tasks = {task: slurm_env(500, array_task=task, log=log, bin_dir=bin_dir) for task in (1, 2)}
    first = [*command, "--seed_everything", 1, "--trainer.max_epochs", 1]
    second = [*command, "--seed_everything", 2, "--trainer.max_epochs", 2]
    killed = [*second, "--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step", 4]
    procs = [start_tasks(first, [tasks[1]], tmp_path)[0], start_tasks(killed, [tasks[2]], tmp_path)[0]]
    assert [code for code, _ in wait(procs)] == [0, -9]
    root = tmp_path / "runs" / "demo" / "pgd_at"
    marks = {(run / "slurm_jobs").read_text().strip(): run for run in root.iterdir()}
    assert sorted(marks) == ["500_1", "500_2"] and len(set(marks.values())) == 2
    for task, run in ((1, marks["500_1"]), (2, marks["500_2"])):
        assert f"seed_everything: {task}" in (run / "config_fit.yaml").read_text()
    assert not (marks["500_2"] / "checkpoints" / "hpc.ckpt").exists()

    (code, out), = wait(start_tasks(second, [tasks[2]], tmp_path))  # requeued (the kill was the test's, not the job's)
    run = marks["500_2"].relative_to(tmp_path)
    assert code == 0 and f"continues its run {run} from {run}/checkpoints/last.ckpt" in out, out
    assert load(marks["500_2"] / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert load(marks["500_1"] / "checkpoints" / "last.ckpt")["global_step"] == 3  # task 1's run untouched
    assert len(list(root.iterdir())) == 2

    # another job, another config: it trains from scratch, whatever checkpoints lie around
    torch.save({"state_dict": {}}, tmp_path / "hpc_ckpt_1.ckpt")
    other = slurm_env(600, log=log, bin_dir=bin_dir)
    (code, out), = wait(start_tasks(["fit", "-c", config("demo/standard.yaml"), "--trainer.max_epochs", 1, *tiny],
                                    [other], tmp_path))
    assert code == 0 and "Restoring states" not in out, out
    assert (tmp_path / "runs" / "demo" / "standard" / "version_0" / "slurm_jobs").read_text().split() == ["600"]
    assert not log.exists()  # nobody was signalled


@pytest.mark.xdist_group("straight")
def test_preempted_evaluation_attacks_only_the_batches_it_had_not_finished(tmp_path, straight):
    ckpt = straight / "checkpoints" / "last.ckpt"
    suite = json.dumps([{"attack": "pgd", "eps": 0.1, "steps": 5}])
    command = ["test", "-c", config("demo/nuat.yaml"), "--ckpt_path", ckpt, "--evaluation.attacks", suite,
               "--evaluation.limit", 90, "--evaluation.batch_size", 30, "--evaluation.sanity_checks", "false", *FAST]
    advtrain(*command, "--evaluation.filename", "uninterrupted", cwd=tmp_path)

    bin_dir, log = fake_slurm_bin(tmp_path / "bin"), tmp_path / "slurm.log"
    env = slurm_env(900, log=log, bin_dir=bin_dir)
    preempted = [*command, "--evaluation.filename", "preempted", "--trainer.callbacks+=helpers.SignalAtTestStart",
                 "--trainer.callbacks.once", tmp_path / "signalled"]
    (code, out), = wait(start_tasks(preempted, [env], tmp_path))
    assert code == -9 and log.read_text() == "scontrol requeue 900\n", out
    assert "robustness evaluation stopped" in out
    (cache,) = (straight / "preempted_batches").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["b000000.pt"]  # one finished batch, none half-written

    (code, out), = wait(start_tasks(preempted, [env], tmp_path))  # requeued: the same command
    assert code == 0, out
    assert "reusing 1 of 3 batches saved by an interrupted evaluation" in out
    results = [json.loads((straight / f"{name}-last.json").read_text()) for name in ("uninterrupted", "preempted")]
    assert results[0]["per_example"] == results[1]["per_example"]
    assert not (straight / "preempted_batches").exists()


def test_a_signal_without_slurm_saves_and_stops_with_exit_code_3(tmp_path):
    """On one machine, ``kill -USR1`` stops a run between two steps with its state saved; ``--ckpt_path last``
    continues it (from hpc.ckpt, the newer resume point)."""
    command = ["fit", "-c", config("demo/pgd_at.yaml"), "--trainer.max_epochs", 1, "--model.init_args.attack.steps", 1,
               "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", 5, *FAST]
    proc = advtrain(*command, cwd=tmp_path, check=False, env_extra=WITH_HELPERS)
    assert proc.returncode == 3, proc.stderr
    assert "rerun the same command to continue" in proc.stderr + proc.stdout
    run = tmp_path / "runs" / "demo" / "pgd_at" / "version_0"
    assert load(run / "checkpoints" / "hpc.ckpt")["global_step"] == 6
    proc = advtrain(*command, "--ckpt_path", "last", cwd=tmp_path, env_extra=WITH_HELPERS)
    assert "hpc.ckpt" in proc.stderr + proc.stdout
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 20


def test_resume_point_is_the_further_of_hpc_and_last_and_passes_over_a_truncated_file(tmp_path):
    from advtrain.checkpoints import resume_point

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"global_step": 40, "epoch": 1}, folder / "last.ckpt")
    torch.save({"global_step": 26, "epoch": 1}, folder / "hpc.ckpt")  # an older requeue
    assert resume_point(tmp_path / "run") == folder / "last.ckpt"
    torch.save({"global_step": 46, "epoch": 2}, folder / "hpc.ckpt")
    assert resume_point(tmp_path / "run") == folder / "hpc.ckpt"
    (folder / "hpc.ckpt").write_bytes((folder / "hpc.ckpt").read_bytes()[:100])  # killed while writing
    assert resume_point(tmp_path / "run") == folder / "last.ckpt"


def test_runs_created_at_the_same_moment_never_share_a_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from advtrain.runs import new_run

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: new_run(tmp_path / "exp"), range(16)))
    assert sorted(r.name for r in runs) == sorted(f"version_{n}" for n in range(16))
