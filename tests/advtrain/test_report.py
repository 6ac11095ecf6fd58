"""advtrain report: one table (rows: runs, columns: clean then attack x eps) of many robustness.json files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from cli_utils import advtrain

from advtrain import report

PGD8, FGSM8, PGD16, CW8 = "pgd-20 eps=8/255", "fgsm eps=8/255", "pgd-20 eps=16/255", "cw-20 eps=8/255"

# run dir (under runs/) -> (split, clean accuracy, [(setting name, accuracy)][, n]); pgd_at has two versions, and
# version_10 must sort after (and be newer than) version_2
RUNS = {
    "cifar10/ablations/mart/version_0": ("test", 0.8003, [(PGD8, 0.5211), (FGSM8, 0.5534)]),
    "cifar10/pgd_at/version_2": ("test", 0.8412, [(FGSM8, 0.5631), (PGD8, 0.5012), (PGD16, 0.2049)]),
    "cifar10/pgd_at/version_10": ("test", 0.8501, [(FGSM8, 0.5702), (PGD8, 0.5105)]),
    "cifar10/trades/version_0": ("test", 0.8196, [(PGD8, 0.5307), (CW8, 0.4981)]),
    "cifar10/standard/version_0": ("val", 0.9410, [(PGD8, 0.0)]),
}

EXPECTED = """\
| experiment        | clean | pgd-20 eps=8/255 | fgsm eps=8/255 | pgd-20 eps=16/255 | cw-20 eps=8/255 |
|-------------------|------:|-----------------:|---------------:|------------------:|----------------:|
| ablations/mart    | 80.03 |            52.11 |          55.34 |                   |                 |
| pgd_at/version_2  | 84.12 |            50.12 |          56.31 |             20.49 |                 |
| pgd_at/version_10 | 85.01 |            51.05 |          57.02 |                   |                 |
| trades            | 81.96 |            53.07 |                |                   |           49.81 |"""

EXPECTED_LATEST = """\
| experiment     | clean | pgd-20 eps=8/255 | fgsm eps=8/255 | cw-20 eps=8/255 |
|----------------|------:|-----------------:|---------------:|----------------:|
| ablations/mart | 80.03 |            52.11 |          55.34 |                 |
| pgd_at         | 85.01 |            51.05 |          57.02 |                 |
| trades         | 81.96 |            53.07 |                |           49.81 |"""


def result(split: str, clean: float, attacks: list[tuple[str, float]], n: int = 10000) -> dict:
    """A robustness.json as callbacks/robustness.py writes it (the fields the report reads, and the rest)."""
    entries = [{"attack": name.split("-")[0].split(" ")[0], "eps": 8 / 255, "eps_label": name.split("=")[1],
                "norm": "linf", "steps": 20, "step": 2 / 255, "restarts": 1, "name": name,
                "correct": round(acc * n), "n": n, "accuracy": acc, "seconds": 1.0} for name, acc in attacks]
    return {"split": split, "n": n, "seed": 0, "clean": {"correct": round(clean * n), "n": n, "accuracy": clean},
            "attacks": entries, "transfer": [], "per_example": {}, "model": "PGDAT", "network": "ResNet",
            "model_hash": "0123456789abcdef", "checkpoint": None, "world_size": 1, "global_step": 100,
            "time": "2025-01-01T00:00:00+00:00"}


def write_runs(root: Path, runs: dict = RUNS) -> Path:
    for run, spec in runs.items():
        (root / run).mkdir(parents=True)
        (root / run / "robustness.json").write_text(json.dumps(result(*spec), indent=1))
        (root / run / "robustness.md").write_text("not read\n")
    return root


@pytest.fixture
def runs(tmp_path) -> Path:
    return write_runs(tmp_path / "runs")


def test_markdown_table_is_exact(runs):
    assert report.markdown(*report.table(report.collect([runs / "cifar10"]))) == EXPECTED


def test_rows_sort_by_experiment_then_version_number_and_columns_by_first_appearance(runs):
    # the same table whatever the order or overlap of the paths given
    paths = [runs / "cifar10/trades", runs / "cifar10/pgd_at/version_10", runs / "cifar10", runs]
    header, body = report.table(report.collect(paths))
    assert [row[0] for row in body] == ["ablations/mart", "pgd_at/version_2", "pgd_at/version_10", "trades"]
    assert header == ["experiment", "clean", PGD8, FGSM8, PGD16, CW8]
    assert body[1][1:] == pytest.approx([84.12, 50.12, 56.31, 20.49, None])


def test_main_prints_the_table_and_writes_markdown_and_csv(runs, tmp_path, capsys):
    md, table_csv = tmp_path / "table.md", tmp_path / "table.csv"
    report.main([str(runs), "--markdown", str(md), "--csv", str(table_csv)])
    assert capsys.readouterr().out == EXPECTED + "\n"
    assert md.read_text() == EXPECTED + "\n"
    with open(table_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["experiment", "clean", PGD8, FGSM8, PGD16, CW8],
                    ["ablations/mart", "80.03", "52.11", "55.34", "", ""],
                    ["pgd_at/version_2", "84.12", "50.12", "56.31", "20.49", ""],
                    ["pgd_at/version_10", "85.01", "51.05", "57.02", "", ""],
                    ["trades", "81.96", "53.07", "", "", "49.81"]]


def test_latest_keeps_the_newest_version_of_each_experiment(runs, capsys):
    report.main([str(runs / "cifar10"), "--latest"])
    assert capsys.readouterr().out == EXPECTED_LATEST + "\n"


def test_split_selects_results_and_names_follow_the_common_root(runs, tmp_path, capsys):
    report.main([str(runs), "--split", "val"])
    out, err = capsys.readouterr()
    assert not err
    assert out.splitlines()[2] == "| standard   | 94.10 |             0.00 |"
    # one run given directly is named by its experiment; runs of two datasets keep the dataset in the name
    assert [name for name, _ in report.collect([runs / "cifar10/trades/version_0"])] == ["trades"]
    write_runs(runs, {"mnist/pgd_at/version_0": ("test", 0.99, [("pgd-40 eps=0.3", 0.93)], 1000)})
    names = [name for name, _ in report.collect([runs], latest=True)]
    assert names == ["cifar10/ablations/mart", "cifar10/pgd_at", "cifar10/trades", "mnist/pgd_at"]
    # rows measured on different numbers of examples are flagged (on stderr, so stdout stays the table)
    report.main([str(runs)])
    assert "different numbers of examples ([1000, 10000])" in capsys.readouterr().err


def test_errors_name_the_problem(runs, tmp_path, capsys):
    def error(*args):  # bad input: exit code 2 and one line on stderr
        with pytest.raises(SystemExit) as exit_info:
            report.main([str(a) for a in args])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert re.search(r"nowhere does not exist", error(runs, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert re.search(r"no robustness\*\.json found under .*empty; `advtrain test` writes", error(tmp_path / "empty"))
    three = [runs / "cifar10/pgd_at", runs / "cifar10/trades", runs / "cifar10/ablations"]
    assert re.search(r"none of the 4 result files .* val split", error(*three, "--split", "val"))
    broken = runs / "cifar10/trades/version_0/robustness.json"
    broken.write_text('{"split": "test", "clean": ')
    assert re.search(r"trades/version_0/robustness.json is not a readable robustness result", error(runs))
    broken.write_text(json.dumps({"split": "test", "clean": {"accuracy": 0.5}}))  # no attacks
    assert re.search(r"trades/version_0/robustness.json .*KeyError: 'attacks'", error(runs))


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "advtrain report" in out and "--latest" in out and "--csv" in out


def test_advtrain_cli_dispatches_report(runs, capsys):
    from advtrain import console

    console.main(["report", str(runs), "--latest"])
    assert capsys.readouterr().out == EXPECTED_LATEST + "\n"


def test_advtrain_report_end_to_end(runs, tmp_path):
    proc = advtrain("report", runs, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED + "\n"
    proc = advtrain("report", tmp_path / "nowhere", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "nowhere does not exist" in proc.stderr and not proc.stdout


def test_single_draw_attacks_on_randomized_runs_are_marked_in_markdown_only(tmp_path, capsys):
    data = result("test", 0.9, [("pgd-10 eps=8/255", 0.5), ("pgd-10 eot8 eps=8/255", 0.4)], 100)
    data.update(randomized=True, draws=10)
    data["attacks"][0]["single_draw_gradient"] = True
    data["attacks"][1]["single_draw_gradient"] = False
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "robustness.json").write_text(json.dumps(data))
    table_csv = tmp_path / "table.csv"
    report.main([str(tmp_path / "run"), "--csv", str(table_csv)])
    out = capsys.readouterr().out
    assert "50.00† |" in out and "40.00 |" in out and "† randomized network" in out
    with open(table_csv, newline="") as f:
        assert list(csv.reader(f))[1][2:] == ["50.00", "40.00"]


def test_cells_not_evaluated_in_float32_are_marked(tmp_path, capsys):
    data = result("test", 0.9, [("pgd-10 eps=8/255", 0.5), ("fgsm eps=8/255", 0.6)], 100)
    data["precision"] = "bf16-mixed"
    for entry in data["attacks"]:
        entry["precision"] = "bf16-mixed"
    data["attacks"][1]["precision"] = "32"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "robustness.json").write_text(json.dumps(data))
    report.main([str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "50.00ᵇ |" in out and "60.00 |" in out and "ᵇ evaluated in bf16" in out


def test_one_checkpoint_evaluated_with_two_suites_gives_two_named_rows(tmp_path):
    run = tmp_path / "runs" / "demo" / "standard" / "version_0"
    run.mkdir(parents=True)
    first = result("test", 0.98, [(PGD8, 0.02)]) | {"checkpoint": str(run / "checkpoints" / "best-epoch012.ckpt")}
    second = result("test", 0.98, [(FGSM8, 0.10)]) | {"checkpoint": first["checkpoint"]}
    (run / "robustness-best-epoch012.json").write_text(json.dumps(first))
    (run / "robustness-best-epoch012-2.json").write_text(json.dumps(second))
    names = [name for name, _ in report.collect([tmp_path / "runs"])]
    assert sorted(names) == ["standard [best-epoch012] (robustness-best-epoch012-2.json)",
                             "standard [best-epoch012] (robustness-best-epoch012.json)"]


def test_the_seeds_of_a_swept_cell_are_one_row_of_mean_std_and_n(tmp_path, capsys):
    """runs/<table>/<row>/seed_<N> (advtrain sweep): each row the mean ± sample std (n) over its seeds, best
    checkpoints of different epochs grouped; --per-seed shows the seeds; the CSV has mean, std and n."""
    table = tmp_path / "runs" / "tab"
    accuracies = {"pgd_at": [(0.80, 0.50), (0.84, 0.46), (0.82, 0.54)], "standard": [(0.95, 0.01)]}
    for row, seeds in accuracies.items():
        for seed, (clean, robust) in enumerate(seeds):
            run = table / row / f"seed_{seed}"
            run.mkdir(parents=True)
            data = result("test", clean, [(PGD8, robust)]) | {"checkpoint": f"{run}/checkpoints/best-epoch{seed}.ckpt"}
            (run / f"robustness-best-epoch{seed}.json").write_text(json.dumps(data))
    table_csv = tmp_path / "table.csv"
    report.main([str(table), "--csv", str(table_csv)])
    out = capsys.readouterr().out
    assert "| pgd_at [best]   | 82.00 ± 2.00 (3) | 50.00 ± 4.00 (3) |" in out
    assert "| standard [best] |        95.00 (1) |" in out and "mean ± std (number of seeds)" in out
    with open(table_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["experiment", "clean mean", "clean std", "clean n", f"{PGD8} mean", f"{PGD8} std", f"{PGD8} n"]
    assert rows[1] == ["pgd_at [best]", "82.0000", "2.0000", "3", "50.0000", "4.0000", "3"]

    report.main([str(table), "--per-seed"])
    per_seed = capsys.readouterr().out
    assert "pgd_at/seed_1 [best-epoch1] | 84.00 |" in per_seed and "±" not in per_seed
