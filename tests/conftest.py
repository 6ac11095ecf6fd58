"""Shared fixtures. Tests run on CPU; each keeps to a few seconds on 2 cores.

The folders mirror the package (tests/attacks, tests/networks, tests/defenses, tests/datamodules, tests/callbacks,
tests/evaluation, tests/advtrain); tests/integration holds the CLI, the recipes end to end, the cluster simulations,
the benches and the docs' links. The support modules beside this file (helpers: small networks and defenses;
cli_utils: running ``advtrain``; cluster_utils: simulated SLURM; fixtures_data: datasets in their real on-disk
formats; sync_counter: host-device sync counting) are imported by name from every folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the support modules beside this file (helpers, cli_utils, cluster_utils, fixtures_data, sync_counter) import by name
# from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_counter import counter  # noqa: E402, F401, I001  (the fixture that counts host-device syncs)

os.environ.setdefault("PYTHONHASHSEED", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and in the processes they start), or the two
    # would oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_tensors():
    """scikit-learn's digits as float tensors in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture
def batch(digits_tensors):
    """32 digits (files that need another batch size define their own ``batch``)."""
    x, y, _, _ = digits_tensors
    return x[:32], y[:32]


@pytest.fixture(scope="session")
def trained_mlp(digits_tensors):
    """A small MLP trained (clean) on digits to about 95% test accuracy, in eval mode."""
    x, y, _, _ = digits_tensors
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
