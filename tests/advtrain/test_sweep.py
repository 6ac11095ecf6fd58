"""advtrain sweep: a paper table's cells (row x seed) through submitit, locally and as a SLURM job array (simulated
with fake sbatch / sacct / squeue / srun), reruns that skip, resume and rerun, and bad input in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from cli_utils import ROOT, advtrain
from cluster_utils import fake_login_node

from advtrain import sweep
from advtrain.cell import run_cell
from advtrain.tables import load_table

DIGITS = ROOT / "configs" / "tables" / "digits.yaml"
DEMO = ROOT / "configs" / "demo"


def status(cell_dir: Path) -> dict:
    return json.loads((cell_dir / "sweep_cell.json").read_text())


def test_the_digits_table_runs_every_cell_and_reports_mean_and_std_over_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(DIGITS), "--parallel", "2"]) == 0  # each cell in a process of its own
    out = capsys.readouterr().out
    assert "4 cells (2 rows x 2 seeds), local executor: 4 to run, 2 at a time" in out
    table = tmp_path / "runs" / "digits"
    for row in ("standard", "pgd_at"):
        for seed in (0, 1):
            cell = table / row / f"seed_{seed}"
            assert status(cell)["status"] == "done" and Path(status(cell)["log"]).is_file()
            assert f"seed_everything: {seed}" in (cell / "config_fit.yaml").read_text()
            (results,) = cell.glob("robustness-best-epoch*.json")  # the table's checkpoint: best
            tested = json.loads(results.read_text())["checkpoint"]
            assert tested.startswith(str(cell.relative_to(tmp_path) / "checkpoints" / "best"))
    # the report: one row per cell, mean ± std (n) over the two seeds, equal to the seeds' own results
    accuracies = {}
    for row in ("standard", "pgd_at"):
        files = [next((table / row / f"seed_{s}").glob("robustness-*.json")) for s in (0, 1)]
        accuracies[row] = [100 * json.loads(f.read_text())["clean"]["accuracy"] for f in files]
    with open(table / "table.csv") as f:
        rows = {r["experiment"]: r for r in csv.DictReader(f)}
    for row, values in accuracies.items():
        cell = rows[f"{row} [best]"]
        assert float(cell["clean mean"]) == pytest.approx(sum(values) / 2, abs=1e-4)
        assert float(cell["clean std"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-4)
        assert cell["clean n"] == "2"
    markdown = (table / "table.md").read_text()
    assert markdown.splitlines()[2].startswith("| standard [best]")  # the table's row order
    assert f"{sum(accuracies['standard']) / 2:.2f} ± " in markdown and "(2) |" in markdown

    # a rerun: nothing to do but the table
    assert sweep.main([str(DIGITS)]) == 0
    again = capsys.readouterr().out
    assert again.count(" skip   finished") == 4 and "0 to run" in again and "| standard [best]" in again

    # what a rerun does with a cell that failed, one that was interrupted, one never started
    (table / "pgd_at" / "seed_1" / "sweep_cell.json").write_text(json.dumps({"status": "failed", "error": "exit code 1",
                                                                            "log": "x.log"}))
    (table / "standard" / "seed_1" / "sweep_cell.json").write_text(json.dumps({"status": "running"}))
    assert sweep.main([str(DIGITS), "--seeds", "0", "1", "2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    lines = {line.split()[0] + line.split()[2]: line for line in plan.splitlines() if "seed" in line and "[" in line}
    assert " skip " in lines["standard0"] and " skip " in lines["pgd_at0"]
    assert " resume " in lines["standard1"] and "standard/seed_1/checkpoints/last.ckpt" in lines["standard1"]
    assert " rerun " in lines["pgd_at1"] and "failed before (exit code 1; log x.log)" in lines["pgd_at1"]
    assert " start " in lines["standard2"] and " start " in lines["pgd_at2"]
    assert "advtrain fit -c configs/demo/standard.yaml --seed_everything 2" in plan.replace(str(ROOT) + "/", "")
    assert "nothing was submitted or written" in plan and not (table / "standard" / "seed_2").exists()


def test_a_failed_cell_is_named_and_stops_no_other(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.yaml").write_text(
        "seeds: [0]\noverrides: {trainer.max_epochs: 1, trainer.limit_train_batches: 3}\n"
        "test_overrides: {evaluation.attacks: [{attack: fgsm, eps: 0.1}], evaluation.limit: 40,"
        " evaluation.sanity_checks: false}\n"
        f"rows:\n  - {{name: broken, config: {DEMO}/pgd_at.yaml, overrides: {{model.init_args.eps: -1}}}}\n"
        f"  - {{name: fine, config: {DEMO}/standard.yaml}}\n")
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(tmp_path / "t.yaml")]) == 1
    out = capsys.readouterr().out
    failed = next(line for line in out.splitlines() if "FAILED" in line)
    assert "broken seed 0: config" in failed and "pgd_at.yaml, seed 0, exit code 2; log" in failed
    log = Path(failed.split("log ")[-1])
    assert "eps must be a finite number >= 0" in log.read_text()
    assert "finished  fine seed 0" in out and "1 of 2 cells done" in out
    assert status(tmp_path / "runs" / "t" / "fine" / "seed_0")["status"] == "done"


def test_slurm_sweep_submits_one_array_with_the_resources_signal_and_requeue(tmp_path, monkeypatch, capsys):
    bin_dir = fake_login_node(tmp_path / "bin")
    log = tmp_path / "slurm.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(shutil.which('python3')).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    code = sweep.main([str(DIGITS), "--executor", "slurm", "--partition", "gpu", "--gpus", "2", "--cpus", "4",
                       "--time", "60", "--parallel", "3", "--sbatch", "account=robust"])
    assert code == 0
    out = capsys.readouterr().out
    assert log.read_text().count("sbatch ") == 1  # one array for the 4 cells
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=4", "#SBATCH --time=60",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --account=robust", "#SBATCH --nodes=1"):
        assert line in script.splitlines(), line
    assert "srun --unbuffered" in script and "-m submitit.core._submit" in script
    # each array task's cell, as submitted: the row's config, its seed, its run folder, 2 GPUs with DDP
    from submitit.core.utils import DelayedSubmission

    cells = []
    for task in range(4):
        pickled = tmp_path / "runs" / "digits" / "submitit" / f"4242_{task}" / f"4242_{task}_submitted.pkl"
        delayed = DelayedSubmission.load(pickled)
        assert delayed.function is run_cell
        cell, fit_extra, _ = delayed.args
        cells.append((cell.row, cell.seed))
        fit = cell.fit_args(fit_extra)
        assert fit[fit.index("--trainer.logger.init_args.version") + 1] == f"seed_{cell.seed}"
        assert fit[fit.index("--seed_everything") + 1] == str(cell.seed)
        assert " ".join(fit_extra).endswith("--trainer.accelerator gpu --trainer.devices 2 --trainer.strategy ddp "
                                            "--threads 4")
    assert cells == [("standard", 0), ("standard", 1), ("pgd_at", 0), ("pgd_at", 1)]
    assert "submitted standard seed 0 as SLURM job 4242_0" in out

    # rerun while the array is in the queue: nothing is submitted twice
    monkeypatch.setenv("FAKE_SACCT_STATES", "4242_0|RUNNING|n1,4242_1|PENDING|,4242_2|PENDING|,4242_3|REQUEUED|")
    assert sweep.main([str(DIGITS), "--executor", "slurm", "--partition", "gpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("queued or running as SLURM job 4242_") == 4
    assert log.read_text().count("sbatch ") == 1


def test_cells_that_start_from_another_cell_go_in_a_later_array_that_waits_for_it(tmp_path, monkeypatch, capsys):
    bin_dir = fake_login_node(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "slurm.log"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text(
        f"seeds: [0, 1]\nrows:\n  - {{name: plain, config: {DEMO}/tensorized.yaml,"
        " overrides: {model.init_args.network.init_args.theta: 1.0}}\n"
        f"  - {{name: randomized, config: {DEMO}/tensorized.yaml,"
        " overrides: {model.init_args.network.init_args.checkpoint: '{cell:plain}/checkpoints/last.ckpt'}}\n")
    assert sweep.main([str(tmp_path / "t.yaml"), "--executor", "slurm"]) == 0
    first, second = (tmp_path / "submitted.sh").read_text(), (tmp_path / "submitted1.sh").read_text()
    assert "#SBATCH --array=0-1" in first and "--dependency" not in first
    assert "#SBATCH --array=0-1" in second and "#SBATCH --dependency=afterok:4242" in second.splitlines()
    out = capsys.readouterr().out
    assert "submitted randomized seed 1 as SLURM job 4243_1 after job 4242" in out
    from submitit.core.utils import DelayedSubmission

    cell = DelayedSubmission.load(tmp_path / "runs" / "t" / "submitit" / "4243_1" / "4243_1_submitted.pkl").args[0]
    assert "runs/t/plain/seed_1/checkpoints/last.ckpt" in cell.fit_args()  # the same seed's plain cell


def test_dry_run_on_slurm_prints_the_cells_commands_and_script_and_writes_nothing(tmp_path):
    table = ROOT / "configs" / "tables" / "sgr_mnist.yaml"
    out = advtrain("sweep", table, "--executor", "slurm", "--gpus", 1, "--dry-run", cwd=tmp_path).stdout  # no SLURM
    n_cells = len(load_table(table).rows) * len(load_table(table).seeds)
    assert out.count("advtrain fit -c ") == n_cells and out.count("advtrain test -c ") == n_cells
    assert "#SBATCH --signal=USR1@90" in out and "#SBATCH --requeue" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0", "one"], "--seeds: seeds are integers >= 0, got 'one'"),
    (["--executor", "kubernetes"], "--executor must be local or slurm, got 'kubernetes'"),
    (["--partition", "gpu"], "--partition is a SLURM option: add --executor slurm"),
    (["--executor", "slurm"], "needs SLURM's sbatch, which is not on PATH"),
    (["--seeds", "1", "1"], "--seeds lists 1 twice: both cells would write into the same run directory"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no SLURM here
    assert sweep.main([str(DIGITS), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("rows,message", [
    ("  - {name: a, config: configs/nowhere.yaml}\n", "row 1 (a): config configs/nowhere.yaml not found"),
    (f"  - {{name: a, config: {DEMO}/standard.yaml}}\n  - {{name: a, config: {DEMO}/pgd_at.yaml}}\n",
     "two rows are named a: both would write into the same run directories"),
    (f"  - {{name: b, config: {DEMO}/standard.yaml, overrides: {{x: '{{cell:c}}/last.ckpt'}}}}\n",
     "row 1 (b): {cell:c} names no earlier row of this table"),
])
def test_bad_tables_are_one_line_and_exit_code_2(rows, message, tmp_path, capsys):
    (tmp_path / "t.yaml").write_text(f"seeds: [0]\nrows:\n{rows}")
    assert sweep.main([str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("table", sorted((ROOT / "configs" / "tables").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_table_names_configs_and_overrides_that_parse(table, capsys):
    """Every row's config exists (load_table); each row that changes its config (overrides, another row's
    checkpoint, test only) still parses as the cell will run it."""
    from advtrain.cli import AdvtrainCLI

    loaded = load_table(table)
    assert loaded.cells()
    for row in loaded.rows:
        if not (row["overrides"] or row["test_overrides"] or not row["fit"]):
            continue
        cell = next(c for c in loaded.cells() if c.row == row["name"])
        for args in cell.commands():
            with pytest.raises(SystemExit) as exit_info:
                AdvtrainCLI(args=[*args, "--print_config"])
            assert exit_info.value.code in (0, None), (row["name"], capsys.readouterr().err)
        printed = capsys.readouterr().out
        for reference in ("{cell:",):
            assert reference not in printed  # every {cell:row} became a run folder
