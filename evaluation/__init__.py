"""The robustness evaluation engine: threat models (EOT, omniscient, BPDA surrogates), crafting, DDP sharding,
the per-batch cache, statistics and sanity checks, and writers (JSON, markdown, TensorBoard scalars).

Used by ``advtrain.callbacks.RobustnessEvaluation`` (a thin Lightning callback over it), ``advtrain transfer``,
``advtrain report`` and ``advtrain.callbacks.LossLandscape``. It uses attacks and networks, never Lightning.
"""

from advtrain.attacks.mode import is_randomized

from .engine import (
    BatchCache,
    Run,
    Tally,
    TransferSource,
    batch_loader,
    evaluate_batch,
    fingerprint,
    own_batches,
    plan_runs,
)
from .results import Accuracy, EvaluationResults, SettingResult, Verdict
from .sanity import LARGE_EPS, sanity_verdicts
from .statistics import summarize
from .threat import check_threat_model, craft, load_network, model_hash, with_version
from .writers import free_stem, markdown_table, scalars, write_results

__all__ = [
    "Accuracy", "BatchCache", "EvaluationResults", "LARGE_EPS", "Run", "SettingResult", "Tally", "TransferSource",
    "Verdict", "batch_loader", "check_threat_model", "craft", "evaluate_batch", "fingerprint", "free_stem",
    "is_randomized", "load_network", "markdown_table", "model_hash", "own_batches", "plan_runs", "sanity_verdicts",
    "scalars", "summarize", "with_version", "write_results",
]
