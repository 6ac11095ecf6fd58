"""The robustness evaluation engine: threat models (EOT, omniscient, BPDA surrogates), crafting, DDP sharding,
the per-batch cache, statistics and sanity checks, and writers (JSON, markdown, TensorBoard scalars).

Used by ``advtrain.callbacks.RobustnessEvaluation`` (a thin Lightning callback over it), ``advtrain transfer``,
``advtrain report`` and ``advtrain.callbacks.LossLandscape``. It uses attacks and networks, never Lightning.
"""

from advtrain.attacks.mode import is_randomized

from .engine import BatchCache, Run, Tally, TransferSource, evaluate_batch, fingerprint, own_batches, plan_runs
from .sanity import LARGE_EPS, sanity_verdicts
from .statistics import accuracy_summary, summarize
from .threat import check_threat_model, craft, load_network, model_hash, with_version
from .writers import markdown_table, scalars, write_results

__all__ = [
    "LARGE_EPS", "BatchCache", "Run", "Tally", "TransferSource", "accuracy_summary", "check_threat_model", "craft",
    "evaluate_batch", "fingerprint", "is_randomized", "load_network", "markdown_table", "model_hash", "own_batches",
    "plan_runs", "sanity_verdicts", "scalars", "summarize", "with_version", "write_results",
]
