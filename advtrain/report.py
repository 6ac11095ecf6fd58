"""``advtrain report``: one table of the ``robustness.json`` files that ``advtrain test`` writes into run
directories, laid out like the papers' tables (rows: defenses; columns: clean, then attack x eps).

    advtrain report runs/cifar10                           # every run under runs/cifar10
    advtrain report runs/cifar10 --latest --csv table.csv  # newest version of each experiment only

Rows are named by experiment: the run directory relative to the runs' common root, without
``version_N`` unless an experiment has several versions. Columns are the attack settings in the order
they first appear; a cell is robust accuracy in percent, empty where a run lacks that setting. For a
randomized network the cell is the mean over draws, and a setting attacked with single-draw gradients (no EOT)
is marked with a dagger in the markdown: an upper bound on robust accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

RESULTS = "robustness.json"
NO_EOT_MARK = "†"


class UpperBound(float):
    """An accuracy of a randomized network under an attack with single-draw gradients (no EOT)."""


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


def load(file: Path) -> dict:
    """One result file, checked for the fields the table needs."""
    try:
        results = json.loads(file.read_text())
        float(results["clean"]["accuracy"])
        for a in results["attacks"]:
            str(a["name"]), float(a["accuracy"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{file} is not a readable robustness result ({type(e).__name__}: {e})") from e
    return results


def _version(run_dir: Path) -> int | None:
    match = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(match.group(1)) if match else None


def collect(paths: list[str | Path], split: str = "test", latest: bool = False) -> list[tuple[str, dict]]:
    """(row name, results) for every result file of ``split`` under ``paths``, sorted by experiment and
    version."""
    files = find_results(paths)
    runs = []  # (experiment dir, version or None, results)
    for file in files:
        results = load(file)
        if results.get("split", "test") == split:
            version = _version(file.parent)
            runs.append((file.parent.parent if version is not None else file.parent, version, results))
    if not runs:
        raise ReportError(f"none of the {len(files)} {RESULTS} files under {', '.join(map(str, paths))} "
                          f"has results for the {split} split")
    runs.sort(key=lambda r: (str(r[0]), -1 if r[1] is None else r[1]))
    if latest:
        runs = list({experiment: (experiment, v, res) for experiment, v, res in runs}.values())
    root = Path(os.path.commonpath([experiment.parent for experiment, _, _ in runs]))
    versions: dict[Path, int] = {}
    for experiment, _, _ in runs:
        versions[experiment] = versions.get(experiment, 0) + 1
    return [(experiment.relative_to(root).as_posix() + (f"/version_{v}" if versions[experiment] > 1 else ""), res)
            for experiment, v, res in runs]


def table(rows: list[tuple[str, dict]]) -> tuple[list[str], list[list[str | float | None]]]:
    """The header (experiment, clean, settings in order of first appearance) and one row per run with
    accuracies in percent (None where the run lacks a setting)."""
    settings = list(dict.fromkeys(a["name"] for _, res in rows for a in res["attacks"]))
    body = []
    for name, res in rows:
        accuracy = {a["name"]: (UpperBound if a.get("single_draw_gradient") else float)(a["accuracy"])
                    for a in reversed(res["attacks"])}
        body.append([name, 100 * res["clean"]["accuracy"]]
                    + [type(accuracy[s])(100 * accuracy[s]) if s in accuracy else None for s in settings])
    return ["experiment", "clean", *settings], body


def _cell(value, mark: bool = False) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    return f"{value:.2f}" + (NO_EOT_MARK if mark and isinstance(value, UpperBound) else "")


def markdown(header: list[str], body: list[list]) -> str:
    cells = [header] + [[_cell(v, mark=True) for v in row] for row in body]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
                 + "|")
    return "\n".join(lines)


def write_csv(path: str | Path, header: list[str], body: list[list]) -> None:
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
    args = parser.parse_args(argv)
    try:
        rows = collect(args.paths, split=args.split, latest=args.latest)
    except ReportError as e:
        sys.exit(f"advtrain report: error: {e}")
    header, body = table(rows)
    text = markdown(header, body)
    print(text)
    sizes = {res["n"] for _, res in rows if "n" in res}
    if any(isinstance(v, UpperBound) for row in body for v in row):
        print(f"{NO_EOT_MARK} randomized network attacked with single-draw gradients (no EOT): an upper bound on "
              "robust accuracy")
    if len(sizes) > 1:
        print(f"note: the runs were evaluated on different numbers of examples ({sorted(sizes)})", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.csv:
        write_csv(args.csv, header, body)


if __name__ == "__main__":
    main()
