"""The values in the cells of ``advtrain report``'s table, and the seeds of one cell as one row: a swept table gives
each cell as ``mean ± std (n)``.

A run folder ``seed_<N>`` is a cell of ``advtrain sweep``; its rows (one per evaluated checkpoint) are grouped with
the other seeds' rows of the same experiment and checkpoint kind (``best-epoch012`` and ``best-epoch017`` are both
the best checkpoint of their seed). The std is the sample standard deviation (n - 1); it is 0 for one seed.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

from advtrain.evaluation.results import EvaluationResults

NO_EOT_MARK = "†"
LOW_PRECISION_MARK = "ᵇ"


class Percent(float):
    """An accuracy in percent; ``low_precision``: it was evaluated in bf16, not float32."""

    low_precision = False


class UpperBound(Percent):
    """An accuracy of a randomized network under an attack with single-draw gradients (no EOT)."""


class Size(float):
    """A perturbation size (DeepFool's rho, a median L2 norm), not a percentage: printed with 4 significant digits."""



class Spread(float):
    """The mean of a cell over seeds (a float, so sorting and comparisons work), with its std and n."""

    def __new__(cls, values: list[float]):
        spread = super().__new__(cls, statistics.fmean(values))
        spread.std = statistics.stdev(values) if len(values) > 1 else 0.0
        spread.n = len(values)
        spread.size = any(isinstance(v, Size) for v in values)  # a perturbation size, not a percentage
        spread.upper_bound = any(isinstance(v, UpperBound) for v in values)  # single-draw gradients (no EOT)
        spread.low_precision = any(getattr(v, "low_precision", False) for v in values)  # bf16, not float32
        return spread

    def text(self, mark: bool = True) -> str:
        mean = f"{self:.4g}" if self.size else f"{self:.2f}"
        spread = "" if self.n == 1 else f" ± {self.std:.2g}" if self.size else f" ± {self.std:.2f}"
        marks = (NO_EOT_MARK if self.upper_bound and not self.size else "") + \
            (LOW_PRECISION_MARK if self.low_precision else "")
        return f"{mean}{spread} ({self.n})" + (marks if mark else "")


def _group(name: str) -> str:
    """``sgr/seed_1 [best-epoch017]`` -> ``sgr [best]``: the cell a seed's row belongs to."""
    name = re.sub(r"/seed_\d+", "", name)
    return re.sub(r"best-epoch\d+", "best", name)


def sweep_seed(results: EvaluationResults) -> int | None:
    """The seed of an ``advtrain sweep`` cell whose results these are (its run folder is ``seed_<N>``), else None."""
    match = re.fullmatch(r"seed_(\d+)", results.path.parent.name) if results.path is not None else None
    return int(match.group(1)) if match else None


def aggregate(rows: list[tuple[str, EvaluationResults]], body: list[list]) -> list[list]:
    """One row per cell (rows of ``seed_N`` runs grouped; other rows as they are), each value a :class:`Spread`."""
    groups: dict[str, list[list]] = {}
    for (name, res), row in zip(rows, body, strict=True):
        groups.setdefault(_group(name) if sweep_seed(res) is not None else name, []).append(row)
    out = []
    for name, members in groups.items():
        columns = list(zip(*(row[1:] for row in members)))
        out.append([name, *(Spread([v for v in column if v is not None]) if any(v is not None for v in column)
                            else None for column in columns)])
    return out


def write_csv(path: str | Path, header: list[str], body: list[list]) -> None:
    """Columns ``<setting> mean``, ``<setting> std``, ``<setting> n`` for every setting."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([header[0], *(f"{h} {part}" for h in header[1:] for part in ("mean", "std", "n"))])
        for row in body:
            cells = []
            for v in row[1:]:
                cells += ["", "", ""] if v is None else [f"{float(v):.4f}", f"{v.std:.4f}", str(v.n)]
            writer.writerow([row[0], *cells])
