"""Wall time of ``advtrain sweep`` on this machine: the same cells one after another and two at a time.

Runs ``advtrain sweep TABLE --parallel 1`` (each cell with every core's thread) and ``--parallel 2`` (each with
half) in fresh folders, as a user would, and writes the seconds and their ratio as JSON; the tables both produce
are in the folders it prints.

    python bench/sweep_cost.py                                  # configs/tables/digits.yaml, seeds 0 1
    python bench/sweep_cost.py --table configs/tables/demo.yaml --seeds 0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import RESULTS, write_results  # noqa: E402


def timed_sweep(table: Path, seeds: list[str], parallel: int, folder: Path) -> float:
    (folder / "configs").symlink_to(ROOT / "configs")  # the table names configs/... relative to the repository
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "advtrain", "sweep", str(table), "--seeds", *seeds, "--parallel",
                    str(parallel)], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(ROOT / "configs" / "tables" / "digits.yaml"))
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--out", default=str(RESULTS / "sweep_cost.json"))
    args = parser.parse_args(argv)
    table = Path(args.table).resolve()
    seconds = {}
    for parallel in (1, 2):
        folder = Path(tempfile.mkdtemp(prefix=f"sweep-parallel{parallel}-"))
        seconds[f"parallel_{parallel}"] = timed_sweep(table, args.seeds, parallel, folder)
        print(f"--parallel {parallel}: {seconds[f'parallel_{parallel}']:.1f} s ({folder}/runs)")
    ratio = seconds["parallel_1"] / seconds["parallel_2"]
    print(f"two at a time is {ratio:.2f}x faster than one after another")
    return write_results(args.out, {"table": table.relative_to(ROOT).as_posix() if table.is_relative_to(ROOT)
                                    else str(table), "seeds": args.seeds, "seconds": seconds,
                                    "ratios": {"sequential_vs_two_at_a_time": ratio}})


if __name__ == "__main__":
    main()
