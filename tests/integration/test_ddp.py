"""DDP on CPU with 2 gloo processes: two SLURM "nodes" under a simulated srun train, resume a preemption bitwise and
evaluate like one process; Lightning's own launcher shards the evaluation of every table attack like one process."""

from __future__ import annotations

import json

import pytest
import torch
from cli_utils import advtrain, config
from cluster_utils import fake_slurm_bin, free_port, slurm_env, start_tasks, wait

from advtrain.callbacks.requeue import EXIT_REQUEUED
from advtrain.datamodules import Digits

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp"]


def test_two_nodes_under_srun_train_resume_a_preemption_bitwise_and_test_like_one_process(tmp_path):
    """``srun advtrain fit ... --trainer.num_nodes 2`` with one task per "node" (gloo, this machine): the ranks train
    on disjoint shards; rank 1 alone is signalled in the middle of the second epoch, both save at the same step, the
    requeued job restores each rank's own random streams (made to differ) and ends bitwise where an uninterrupted
    job ends; its 2-process test equals a one-process test example for example."""
    bin_dir, log = fake_slurm_bin(tmp_path / "bin"), tmp_path / "slurm.log"
    fit = ["fit", "-c", config("demo/pgd_at.yaml"), "--trainer.num_nodes", 2, "--trainer.strategy", "ddp",
           "--trainer.max_epochs", 2, "--model.init_args.attack.steps", 3,
           "--trainer.callbacks+=helpers.DistinctRankStreams",
           *FAST]

    def job(job_id, args):
        port = free_port()
        envs = [slurm_env(job_id, rank=r, tasks=2, nodes=2, port=port, log=log, bin_dir=bin_dir) for r in (0, 1)]
        return wait(start_tasks(args, envs, tmp_path))

    batches = tmp_path / "batches"
    batches.mkdir()
    straight = job(100, [*fit, "--trainer.logger.init_args.name", "straight",
                         "--trainer.callbacks+=helpers.RecordBatches", "--trainer.callbacks.folder", batches])
    assert [code for code, _ in straight] == [0, 0], straight[0][1]
    shards = [(batches / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    digits = Digits()
    digits.setup("fit")
    examples = sorted((x.float() / 255).numpy().tobytes().hex() for x in digits.train_set.x)
    # each rank 629 of the 1257 examples, and together all of them (DistributedSampler repeats one to even out)
    assert len(shards[0]) == len(shards[1]) == 629
    together = sorted(shards[0] + shards[1])
    assert len(together) == 1258 and sorted(set(together)) == sorted(set(examples))
    assert sum(together.count(e) - examples.count(e) for e in set(examples)) == 1

    signalled = [*fit, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", 14,
                 "--trainer.callbacks.rank", 1]
    rank0, rank1 = (code for code, _ in job(200, signalled))
    # rank 0 asks for the requeue and is killed with the job; rank 1 is killed too, or had already stopped to be
    # requeued (exit 3): which one comes first is a race on a real cluster as well
    assert rank0 == -9 and rank1 in (-9, EXIT_REQUEUED), (rank0, rank1)
    assert log.read_text() == "scontrol requeue 200\n"  # rank 0 asked, once
    run = tmp_path / "runs" / "demo" / "pgd_at" / "version_0"
    assert torch.load(run / "checkpoints" / "hpc.ckpt", weights_only=False)["global_step"] == 15
    resumed = job(200, signalled)
    assert [code for code, _ in resumed] == [0, 0], resumed[1][1][-3000:]
    expected, resumed = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
                         for folder in (tmp_path / "runs" / "straight" / "version_0", run))
    assert resumed["global_step"] == expected["global_step"] == 2 * 10  # each rank: half of each epoch
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    streams = [states["torch"] for states in resumed["rng_states"]]
    assert len(streams) == 2 and not torch.equal(*streams)  # two ranks, two streams, each continued
    assert all(torch.equal(a["torch"], b["torch"]) for a, b in zip(expected["rng_states"], resumed["rng_states"]))

    ckpt = run / "checkpoints" / "last.ckpt"
    # FGSM and PGD with restarts on a third of the test set: 4 batches, 2 per rank (the next test shards the other
    # kinds of attack)
    suite = json.dumps([{"attack": "fgsm", "eps": 0.1}, {"attack": "pgd", "eps": [0.1, 0.2], "steps": 10,
                                                          "restarts": 2}])
    test = ["test", "-c", config("demo/pgd_at.yaml"), "--ckpt_path", ckpt, "--evaluation.attacks", suite,
            "--evaluation.limit", 120, "--evaluation.batch_size", 30, *FAST]
    assert [code for code, _ in job(300, [*test, "--trainer.num_nodes", 2, "--trainer.strategy", "ddp",
                                          "--evaluation.filename", "ddp"])] == [0, 0]
    advtrain(*test, "--evaluation.filename", "single", cwd=tmp_path)
    ddp = json.loads((run / "ddp-last.json").read_text())
    single = json.loads((run / "single-last.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["n"] == single["n"] == 120
    assert ddp["clean"] == single["clean"]
    assert [(a["name"], a["correct"]) for a in ddp["attacks"]] == [(a["name"], a["correct"]) for a in single["attacks"]]
    assert ddp["per_example"] == single["per_example"]  # example for example
    assert ddp["model_hash"] == single["model_hash"]
    assert 0 < single["attacks"][-1]["correct"] < single["clean"]["correct"]


def test_ddp_evaluation_of_the_table_attacks_equals_one_process(tmp_path):
    """Budget-free DeepFool with its per-example sizes, worst-of-k noise, the multi-targeted attack and AutoAttack,
    sharded over 2 processes: counts, sizes and AutoAttack's stage counts equal a one-process evaluation."""
    cfg = config("demo/standard.yaml")
    advtrain("fit", "-c", cfg, "--trainer.max_epochs", 1, *FAST, cwd=tmp_path)
    ckpt = tmp_path / "runs" / "demo" / "standard" / "version_0" / "checkpoints" / "last.ckpt"
    suite = json.dumps([{"attack": "deepfool"}, {"attack": "lrc", "eps": 0.1, "zeta": 2, "samples": 3},
                        {"attack": "pgd_targeted", "eps": 0.1, "steps": 3, "target": "all"},
                        {"attack": "autoattack", "eps": 0.3}])  # large: APGD-CE breaks every point, fast
    common = ["--ckpt_path", ckpt, "--evaluation.attacks", suite, "--evaluation.limit", 100,
              "--evaluation.batch_size", 25, "--evaluation.sanity_checks", "false", *FAST]
    advtrain("test", "-c", cfg, *DDP, *common, "--evaluation.filename", "ddp", cwd=tmp_path)
    advtrain("test", "-c", cfg, *common, "--evaluation.filename", "single", cwd=tmp_path)
    run = ckpt.parent.parent
    ddp = json.loads((run / "ddp-last.json").read_text())
    single = json.loads((run / "single-last.json").read_text())
    assert ddp["world_size"] == 2 and ddp["per_example"] == single["per_example"]
    # sizes to float precision: a process of a 2-process run uses other thread counts, so convolutions sum in
    # another order (the counts above are exact)
    for name, sizes in single["per_example_metrics"].items():
        for metric, values in sizes.items():
            assert ddp["per_example_metrics"][name][metric] == pytest.approx(values, rel=1e-4, abs=1e-6)
    assert ddp["attacks"][0]["metrics"] == pytest.approx(single["attacks"][0]["metrics"], rel=1e-4)
    assert min(single["per_example_metrics"]["deepfool-50"]["rho"]) > 0  # every example was attacked once
    # AutoAttack's per-stage counts (what its official checks read), summed over batches and ranks
    (aa_ddp,), (aa_single,) = ([a for a in r["attacks"] if a["attack"] == "autoattack"] for r in (ddp, single))
    assert aa_ddp["autoattack"] == aa_single["autoattack"] and aa_single["autoattack"]["clean_correct"] > 0
