"""bench/README.md's performance figures are the ones in bench/results/ (bench/readme_table.py writes them), and
no other page (README.md, docs/*.md) quotes a measured ratio that no results file holds."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from cli_utils import ROOT

from bench import readme_table
from bench.results_file import write_results
from bench.step_cost import NUAT_CONFIGS, nuat_settings

RESULTS = ROOT / "bench" / "results"
BENCH_README = ROOT / "bench" / "README.md"
RATIO = re.compile(r"(\d+\.\d+)x")


def numbers(value):
    if isinstance(value, dict):
        yield from (n for v in value.values() for n in numbers(v))
    elif isinstance(value, list):
        yield from (n for v in value for n in numbers(v))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)


def test_bench_readme_performance_section_is_what_the_results_files_give(capsys):
    assert readme_table.main(["--check"]) == 0, capsys.readouterr().out  # the default page is bench/README.md
    assert readme_table.main(["--readme", str(BENCH_README), "--check"]) == 0, capsys.readouterr().out


def held_figures() -> list[float]:
    return [n for path in RESULTS.glob("*.json") for n in numbers(json.loads(path.read_text()))]


def unbacked(quoted: set[str], held: list[float]) -> list[str]:
    return sorted(q for q in quoted if not any(round(v, len(q.split(".")[1])) == float(q) for v in held))


def test_every_ratio_quoted_in_bench_readme_is_held_by_a_results_file():
    quoted = set(RATIO.findall(BENCH_README.read_text()))
    assert quoted, "bench/README.md quotes no measured ratio"
    assert not unbacked(quoted, held_figures()), "bench/README.md ratios with no results file behind them"


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_every_ratio_quoted_in_the_readme_and_docs_is_held_by_a_results_file(page):
    quoted = set(RATIO.findall((ROOT / page).read_text()))
    missing = unbacked(quoted, held_figures())
    assert not missing, f"{page} quotes ratios with no results file behind them: {missing}"


def test_the_readme_quotes_no_figures_but_points_to_bench_readme():
    readme = (ROOT / "README.md").read_text()
    assert readme_table.BEGIN_PREFIX not in readme and not RATIO.search(readme)
    assert "bench/README.md" in readme


def test_a_figure_in_the_wrong_page_would_be_caught():
    assert unbacked({"99.99"}, held_figures()) == ["99.99"]
    assert unbacked(set(RATIO.findall("PGD-10 7.31x")), held_figures()) == []


def test_check_fails_on_a_changed_figure_and_a_rewrite_restores_only_the_marked_part(tmp_path, capsys):
    readme = tmp_path / "README.md"
    original = BENCH_README.read_text()
    start, end = original.index(readme_table.BEGIN_PREFIX), original.index(readme_table.END)
    figure = re.search(r"\d+\.\d+x", original[start:end]).group()
    readme.write_text("# edited outside\n" + original[:start] + original[start:end].replace(figure, "99.99x", 1)
                      + original[end:])
    args = ["--readme", str(readme), "--results", str(RESULTS)]
    assert readme_table.main([*args, "--check"]) == 1
    assert "99.99x" in capsys.readouterr().out  # the difference is shown
    assert readme_table.main(args) == 0
    assert readme.read_text() == "# edited outside\n" + original
    assert readme_table.main([*args, "--check"]) == 0


def test_a_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## Performance\n\nPGD-10 7.45x\n")
    assert readme_table.main(["--readme", str(readme), "--check"]) == 2
    assert readme_table.main(["--readme", str(readme)]) == 2
    assert readme.read_text() == "## Performance\n\nPGD-10 7.45x\n"


def test_step_cost_times_nuat_with_the_configs_settings():
    nuat, nuat2 = (nuat_settings(NUAT_CONFIGS[name]) for name in ("nuat", "nuat2"))
    assert (nuat["attack_steps"], nuat["nuclear_every"], nuat["lambda_max"]) == (1, 2, 4.5)
    assert (nuat2["attack_steps"], nuat2["nuclear_every"], nuat2["lambda_max"]) == (2, 1, 4.0)


def test_a_new_results_file_shows_its_machine_date_and_nuat_settings(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    (results / "evaluation_cost.json").unlink()  # a bench without a file has no figures
    old = json.loads((results / "step_cost.json").read_text())
    settings = {name: nuat_settings(config) for name, config in NUAT_CONFIGS.items()}
    new = write_results(results / "step_cost.json", {**old, "settings": settings})
    text = " ".join(readme_table.render(readme_table.load(results)).split())  # lines wrapped anywhere
    assert f"machine {new['machine']}" in text and new["date"][:10] in text
    assert "`configs/cifar10/nuat.yaml`: attack_steps 1, nuclear_every 2, lambda 4.5" in text
    assert "`configs/cifar10/nuat2_wrn.yaml`: attack_steps 2, nuclear_every 1" in text
    assert "does not record the NuAT settings" not in text
    assert "evaluation_cost" not in text and "0.98x" not in text
    assert f"{old['ratios']['pgd10_vs_clean']:.2f}x" in text
