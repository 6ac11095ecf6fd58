"""Paper tables as files (``configs/tables/*.yaml``) and the cells ``advtrain sweep`` runs.

A table names its rows, the seeds and the checkpoint to test::

    # configs/tables/digits.yaml
    seeds: [0, 1]
    checkpoint: best                            # test each cell's best checkpoint (or: last)
    overrides: {trainer.max_epochs: 2}          # every cell, fit and test
    rows:
      - {name: standard, config: configs/demo/standard.yaml}
      - {name: pgd_at, config: configs/demo/pgd_at.yaml, overrides: {model.init_args.attack.steps: 3}}
      - {name: pgd_at_eps0.1, config: configs/demo/pgd_at.yaml, overrides: {model.init_args.eps: 0.1},
         test_overrides: {evaluation.limit: 100}}   # the test only
      - {name: tensorized, config: configs/demo/tensorized.yaml,   # starts from the same seed's standard cell
         overrides: {model.init_args.network.init_args.checkpoint: "{cell:standard}/checkpoints/last.ckpt"}}
      - {name: squeezed, config: ..., fit: false}   # a row that is only tested (e.g. feature squeezing)

A cell is a row and a seed. ``{cell:<row>}`` in an override is the run directory of that row's cell with the same
seed: the cell runs after it (on SLURM, in a later job array that depends on it). The row must come earlier.

Each cell trains into ``runs/<table>/<row>/seed_<seed>`` (``--seed_everything <seed>``), then
tests the checkpoint the table names into the same run directory; ``advtrain report runs/<table>`` makes the
table, each cell the mean ± std over seeds. Config paths are relative to the working directory, or to the folder
that holds ``configs/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .guards import UsageError

ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
TABLE_KEYS = {"name", "seeds", "checkpoint", "overrides", "test_overrides", "configs", "rows"}
ROW_KEYS = {"name", "config", "overrides", "test_overrides", "fit"}
REFERENCE = re.compile(r"\{cell:([^}]*)\}")


@dataclass(frozen=True)
class Cell:
    """One training run and its test: a row of a table with one seed."""

    table: str
    row: str
    seed: int
    configs: tuple[str, ...]  # the row's config, then the table's (trainer presets, ...)
    overrides: tuple[str, ...] = ()  # command-line arguments for fit and test
    test_overrides: tuple[str, ...] = ()
    checkpoint: str = "best"
    runs: str = "runs"
    fit: bool = True  # False: a row that is only tested (no training of its own)
    needs: tuple[str, ...] = ()  # rows whose cell of this seed must be done first

    @property
    def name(self) -> str:
        return f"{self.row} seed {self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.table / self.row / f"seed_{self.seed}"

    def _common(self) -> list[str]:
        return [arg for config in self.configs for arg in ("-c", config)] + [
            "--seed_everything", str(self.seed), "--trainer.logger.init_args.save_dir", self.runs,
            "--trainer.logger.init_args.name", f"{self.table}/{self.row}",
            "--trainer.logger.init_args.version", f"seed_{self.seed}", *self.overrides]

    def fit_args(self, extra: tuple[str, ...] = ()) -> list[str] | None:
        """``advtrain fit`` arguments; ``--ckpt_path last`` continues an interrupted cell from its resume point."""
        return ["fit", *self._common(), "--ckpt_path", "last", *extra] if self.fit else None

    def test_args(self, extra: tuple[str, ...] = ()) -> list[str]:
        checkpoint = ("--ckpt_path", self.checkpoint) if self.fit else ()
        return ["test", *self._common(), *checkpoint, *self.test_overrides, *extra]

    def commands(self, extra: tuple[str, ...] = ()) -> list[list[str]]:
        return [args for args in (self.fit_args(extra), self.test_args(extra)) if args is not None]


@dataclass
class Table:
    path: Path
    name: str
    seeds: list[int]
    checkpoint: str
    rows: list[dict] = field(default_factory=list)

    def cells(self, seeds: list[int] | None = None, runs: str = "runs", configs: tuple[str, ...] = ()) -> list[Cell]:
        """Every row with every seed (``seeds`` replaces the table's); refused when two cells would share a run
        directory."""
        seeds = self.seeds if seeds is None else seeds
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise UsageError(f"--seeds lists {', '.join(map(str, repeated))} twice: both cells would write into the "
                             "same run directory")
        cells = []
        for row in self.rows:
            for seed in seeds:
                def resolve(args: tuple[str, ...], seed=seed) -> tuple[str, ...]:
                    return tuple(REFERENCE.sub(lambda m: str(Path(runs) / self.name / m.group(1) / f"seed_{seed}"), a)
                                 for a in args)

                cells.append(Cell(self.name, row["name"], seed, (row["config"], *row["configs"], *configs),
                                  resolve(row["overrides"]), resolve(row["test_overrides"]), self.checkpoint, runs,
                                  row["fit"], row["needs"]))
        return cells


def as_arguments(overrides, where: str) -> tuple[str, ...]:
    """``{trainer.max_epochs: 2, model.init_args.eps: 8/255}`` -> ``--trainer.max_epochs 2 --model.init_args.eps
    8/255`` (lists and mappings as JSON, which jsonargparse reads)."""
    if overrides is None:
        return ()
    if not isinstance(overrides, dict):
        raise UsageError(f"{where}: overrides are a mapping such as {{trainer.max_epochs: 2}}, got {overrides!r}")
    args = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        args += [f"--{key}", text]
    return tuple(args)


def _config_path(config, table: Path, where: str) -> str:
    if not isinstance(config, str) or not config:
        raise UsageError(f"{where}: config must be the path of a YAML config, got {config!r}")
    if Path(config).is_file():
        return config
    # configs/tables/x.yaml -> the folder that holds configs/
    beside = table.resolve().parent.parent.parent / config
    if beside.is_file():
        return str(beside)
    raise UsageError(f"{where}: config {config} not found (relative to the working directory or to "
                     f"{table.resolve().parent.parent.parent})")


def seeds_of(values, where: str) -> list[int]:
    """Seeds as integers, or one line that says which value is not one."""
    values = values if isinstance(values, list) else [values]
    seeds = []
    for value in values:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                      re.fullmatch(r"\d+", value))):
            raise UsageError(f"{where}: seeds are integers >= 0, got {value!r}")
        seeds.append(int(value))
    return seeds


def load_table(path: str | Path) -> Table:
    """Read and check a table file; every problem is one line that names the table, the row and the key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"table {path} not found (tables live in configs/tables/)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"table {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise UsageError(f"table {path}: expected a mapping with a non-empty list `rows`")
    unknown = set(spec) - TABLE_KEYS
    if unknown:
        raise UsageError(f"table {path}: unknown keys {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(TABLE_KEYS))})")
    checkpoint = spec.get("checkpoint", "best")
    if checkpoint not in ("best", "last"):
        raise UsageError(f"table {path}: checkpoint must be best or last, got {checkpoint!r}")
    shared = as_arguments(spec.get("overrides"), f"table {path}")
    shared_test = as_arguments(spec.get("test_overrides"), f"table {path}")
    presets = tuple(_config_path(c, path, f"table {path}") for c in spec.get("configs") or [])
    rows, names = [], set()
    for i, row in enumerate(spec["rows"]):
        where = f"table {path} row {i + 1}"
        if not isinstance(row, dict) or set(row) - ROW_KEYS or "name" not in row or "config" not in row:
            raise UsageError(f"{where}: a row is {{name: ..., config: ..., overrides: {{...}}, test_overrides: "
                             f"{{...}}}}, got {row!r}")
        name = str(row["name"])
        if not ROW_NAME.fullmatch(name):
            raise UsageError(f"{where}: the name {name!r} becomes a folder: use letters, digits and _ . + -")
        if name in names:
            raise UsageError(f"{where}: two rows are named {name}: both would write into the same run directories")
        names.add(name)
        overrides = shared + as_arguments(row.get("overrides"), where)
        test_overrides = shared_test + as_arguments(row.get("test_overrides"), where)
        needs = tuple(dict.fromkeys(m for a in overrides + test_overrides for m in REFERENCE.findall(a)))
        for need in needs:
            if need not in names - {name}:
                raise UsageError(f"{where} ({name}): {{cell:{need}}} names no earlier row of this table")
        if not isinstance(row.get("fit", True), bool):
            raise UsageError(f"{where} ({name}): fit is true or false, got {row['fit']!r}")
        rows.append({"name": name, "config": _config_path(row["config"], path, f"{where} ({name})"),
                     "configs": presets, "overrides": overrides, "test_overrides": test_overrides,
                     "fit": row.get("fit", True), "needs": needs})
    name = str(spec.get("name", path.stem))
    if not ROW_NAME.fullmatch(name):
        raise UsageError(f"table {path}: the name {name!r} becomes a folder: use letters, digits and _ . + -")
    return Table(path, name, seeds_of(spec.get("seeds", [0]), f"table {path}"), checkpoint, rows)
