"""``advtrain report``: one table of the ``robustness.json`` files that ``advtrain test`` writes into run
directories, laid out like the papers' tables (rows: defenses; columns: clean, then attack x eps).

    advtrain report runs/cifar10                           # every run under runs/cifar10
    advtrain report runs/cifar10 --latest --csv table.csv  # newest version of each experiment only
    advtrain report runs/mnist --eps-average only          # accuracy averaged over each eps grid (SGR)
    advtrain report runs/mnist/{gn,sgr} --lrc-plot lrc.png # accuracy against LRC's zeta (evaluation/figures.py)
    advtrain report runs/digits                            # a swept table: each cell mean ± std (n) over seeds

Rows are named by experiment: the run directory relative to the runs' common root, without
``version_N`` unless an experiment has several versions, and by the checkpoint that was evaluated (every
``advtrain test`` of a run keeps its own ``robustness-<checkpoint>.json``). Columns are the attack settings in the order
they first appear; a cell is robust accuracy in percent, empty where a run lacks that setting. For a
randomized network the cell is the mean over draws, and a setting attacked with single-draw gradients (no EOT)
is marked with a dagger in the markdown: an upper bound on robust accuracy. Attacks that report perturbation
sizes (DeepFool's rho and median L2 norm) add a column per metric, in the input's units, not in percent.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from advtrain.evaluation.results import EvaluationResults, SettingResult

from .aggregate import (  # the values of table cells
    LOW_PRECISION_MARK,
    NO_EOT_MARK,
    Percent,
    Size,
    UpperBound,
    aggregate,
    sweep_seed,
)

RESULTS = "robustness*.json"  # robustness.json, robustness-<checkpoint>.json, ...-2.json
class ReportError(Exception):
    """A problem with the paths or result files given to ``advtrain report``."""


def find_results(paths: list[str | Path]) -> list[Path]:
    """The result files among ``paths`` (files, or folders searched recursively), without duplicates."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS))
        found.update(dict.fromkeys(f.resolve() for f in files))
    if not found:
        raise ReportError(f"no {RESULTS} found under {', '.join(map(str, paths))}; `advtrain test` writes one "
                          "into each run directory")
    return list(found)


def load(file: Path) -> EvaluationResults:
    """One result file, read into :class:`advtrain.evaluation.EvaluationResults`."""
    try:
        return EvaluationResults.read(file)
    except ValueError as e:
        raise ReportError(str(e)) from e


def _version(run_dir: Path) -> int | None:
    """N of a run folder ``version_N``, or of ``seed_N`` (a cell of ``advtrain sweep``); None for another folder."""
    match = re.fullmatch(r"(?:version|seed)_(\d+)", run_dir.name)
    return int(match.group(1)) if match else None


def _checkpoint_order(results: EvaluationResults) -> tuple:
    """Rows of one run: the evaluation of the freshest weights last (by the checkpoint's step), then by time."""
    step = results.global_step
    return (-1 if step is None else step, str(results.time or ""))


def collect(paths: list[str | Path], split: str = "test", latest: bool = False
            ) -> list[tuple[str, EvaluationResults]]:
    """(row name, results) for every result file of ``split`` under ``paths``, sorted by experiment, version and
    checkpoint. A row evaluated from a checkpoint is named with it: ``pgd_at [best-epoch042]``."""
    files = find_results(paths)
    runs = []  # (experiment dir, version or None, results)
    for file in files:
        results = load(file)
        if results.split == split:
            version = _version(file.parent)
            runs.append((file.parent.parent if version is not None else file.parent, version, results))
    if not runs:
        raise ReportError(f"none of the {len(files)} result files under {', '.join(map(str, paths))} "
                          f"has results for the {split} split")
    runs.sort(key=lambda r: (str(r[0]), -1 if r[1] is None else r[1], _checkpoint_order(r[2])))
    if latest:
        newest = {experiment: v for experiment, v, _ in runs}
        runs = [r for r in runs if r[1] == newest[r[0]]]
    root = Path(os.path.commonpath([experiment.parent for experiment, _, _ in runs]))
    versions: dict[Path, set] = {}
    for experiment, v, _ in runs:
        versions.setdefault(experiment, set()).add(v)
    rows = []
    for experiment, v, res in runs:
        folder = f"seed_{v}" if sweep_seed(res) is not None else f"version_{v}"
        name = experiment.relative_to(root).as_posix() + (f"/{folder}" if len(versions[experiment]) > 1 else "")
        if res.checkpoint:
            name += f" [{Path(res.checkpoint).stem}]"
        rows.append((name, res))
    # one checkpoint evaluated twice (another suite): its rows say which results file each one is
    names = [name for name, _ in rows]
    return [(f"{name} ({res.path.name})" if names.count(name) > 1 else name, res) for name, res in rows]


def _family(entry: SettingResult) -> str | None:
    """The setting without its budget (``pgd-20x2 eps=0.1`` -> ``pgd-20x2``); None for a budget-free attack."""
    label = entry.setting.get("eps_label")
    suffix = f" eps={label}"
    return entry.name[: -len(suffix)] if label is not None and entry.name.endswith(suffix) else None


def _average(values: list) -> float | None:
    if not values or any(v is None for v in values):
        return None  # a run that lacks part of the grid has no average over it
    average = (UpperBound if any(isinstance(v, UpperBound) for v in values) else Percent)(sum(values) / len(values))
    average.low_precision = any(getattr(v, "low_precision", False) for v in values)
    return average


def table(rows: list[tuple[str, EvaluationResults]], eps_average: str | None = None
          ) -> tuple[list[str], list[list[str | float | None]]]:
    """The header (experiment, clean, settings in order of first appearance, each followed by the perturbation
    metrics its attack reports) and one row per run with accuracies in percent (None where the run lacks a
    setting).

    ``eps_average``: ``add`` puts, after the last budget of each setting measured at several budgets, its
    accuracy averaged over that eps grid (the area under the accuracy-vs-eps curve the SGR paper reports, over
    the budgets any run has; a run missing one of them gets no average); ``only`` shows the averages instead of
    the per-budget columns.
    """
    if eps_average not in (None, "add", "only"):
        raise ValueError(f"eps_average must be 'add' or 'only', got {eps_average!r}")
    entries = [{a.name: a for a in reversed(res.attacks)} for _, res in rows]
    first = {a.name: a for _, res in rows for a in reversed(res.attacks)}
    names = list(dict.fromkeys(a.name for _, res in rows for a in res.attacks))
    grid: dict[str, dict[str, float]] = {}
    for name in names:
        family = _family(first[name])
        if family is not None:
            grid.setdefault(family, {})[name] = first[name].eps
    averaged = {f: sorted(members, key=members.get) for f, members in grid.items()
                if eps_average and len(members) > 1}
    last_of = {members[-1]: f for f, members in averaged.items()}

    def accuracy(entry: SettingResult | None):
        if entry is None:
            return None
        value = (UpperBound if entry.single_draw_gradient else Percent)(100 * entry.accuracy)
        value.low_precision = entry.setting.get("precision", "32") != "32"
        return value

    header, getters = ["experiment", "clean"], []
    for name in names:
        if not (eps_average == "only" and _family(first[name]) in averaged):
            header.append(name)
            getters.append(lambda found, n=name: accuracy(found.get(n)))
            for metric in first[name].metrics or {}:
                header.append(f"{name} {metric}")
                getters.append(lambda found, n=name, m=metric: Size(found[n].metrics[m])
                               if n in found and m in (found[n].metrics or {}) else None)
        if name in last_of:
            family = last_of[name]
            labels = ", ".join(first[n].setting["eps_label"] for n in averaged[family])
            header.append(f"{family} mean over eps {{{labels}}}")
            getters.append(lambda found, f=family: _average([accuracy(found.get(n)) for n in averaged[f]]))
    body = [[name, 100 * res.clean.accuracy, *(get(found) for get in getters)]
            for (name, res), found in zip(rows, entries, strict=True)]
    return header, body


def _cell(value, mark: bool = False) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if hasattr(value, "text"):  # a cell over seeds (aggregate.Spread)
        return value.text(mark)
    if isinstance(value, Size):
        return f"{value:.4g}"
    marks = (NO_EOT_MARK if isinstance(value, UpperBound) else "") + \
        (LOW_PRECISION_MARK if getattr(value, "low_precision", False) else "")
    return f"{value:.2f}" + (marks if mark else "")


def markdown(header: list[str], body: list[list]) -> str:
    cells = [header] + [[_cell(v, mark=True) for v in row] for row in body]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
                 + "|")
    return "\n".join(lines)


def seed_table(rows: list[tuple[str, EvaluationResults]], eps_average: str | None = None, per_seed: bool = False
               ) -> tuple[list[str], list[list], bool]:
    """:func:`table`, with the seeds of each ``advtrain sweep`` cell made one row of ``mean ± std (n)`` unless
    ``per_seed``; the last value says whether that happened."""
    header, body = table(rows, eps_average=eps_average)
    if per_seed or not any(sweep_seed(res) is not None for _, res in rows):
        return header, body, False
    return header, aggregate(rows, body), True


def write_csv(path: str | Path, header: list[str], body: list[list], seeds: bool = False) -> None:
    if seeds:
        from .aggregate import write_csv as write_seed_csv

        return write_seed_csv(path, header, body)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([row[0], *(_cell(v) for v in row[1:])] for row in body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="advtrain report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help=f"run directories, {RESULTS} files, or folders to search recursively")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV (accuracy in percent)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown table to FILE")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="only results evaluated on this split (default: test)")
    parser.add_argument("--latest", action="store_true", help="only the newest version of each experiment")
    parser.add_argument("--per-seed", action="store_true", help="one row per seed of an advtrain sweep cell (by "
                        "default a cell is its mean ± std (n) over seeds; the CSV then has mean, std and n columns)")
    parser.add_argument("--eps-average", choices=["add", "only"], default=None,
                        help="add (or show only) each setting's accuracy averaged over its eps grid: the area under "
                             "the accuracy-vs-eps curve, as the SGR paper reports")
    parser.add_argument("--lrc-plot", metavar="PNG", help="also draw robust accuracy against the LRC decay length "
                        "zeta, a line per run and a panel per eps plus the eps average (the SGR paper's figure)")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write that figure (and its curves as scalars) "
                        "as TensorBoard events into DIR")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.paths, split=args.split, latest=args.latest)
        if args.lrc_plot or args.tensorboard:
            from advtrain.evaluation.figures import write_lrc_figure

            try:
                write_lrc_figure(rows, args.lrc_plot, args.tensorboard)
                print(f"LRC figure written to {' and '.join(filter(None, (args.lrc_plot, args.tensorboard)))}",
                      file=sys.stderr)
            except ValueError as error:
                raise ReportError(str(error)) from error
    except ReportError as e:
        sys.stderr.write(f"advtrain report: error: {e}\n")
        sys.exit(2)
    header, body, seeds = seed_table(rows, eps_average=args.eps_average, per_seed=args.per_seed)
    text = markdown(header, body)
    print(text)
    if seeds:
        print("cells of advtrain sweep: mean ± std (number of seeds); --per-seed shows each seed")
    sizes = {res.n for _, res in rows}
    if any(isinstance(v, UpperBound) or getattr(v, "upper_bound", False) for row in body for v in row):
        print(f"{NO_EOT_MARK} randomized network attacked with single-draw gradients (no EOT): an upper bound on "
              "robust accuracy")
    if any(getattr(v, "low_precision", False) for row in body for v in row):
        print(f"{LOW_PRECISION_MARK} evaluated in bf16 (evaluation.precision), not float32: not comparable with "
              "float32 numbers")
    if len(sizes) > 1:
        print(f"note: the runs were evaluated on different numbers of examples ({sorted(sizes)})", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.csv:
        write_csv(args.csv, header, body, seeds)


if __name__ == "__main__":
    main()
