"""advtrain.callbacks.covariance: SGR's Sigma representations (Roth et al. 2018, eqs. 14-16) against independent
references: dense matrices built here with numpy, brute-force loops over position pairs, hand EMA updates, and synthetic
Gaussian perturbations of a known stationary covariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advtrain.callbacks.covariance import (
    FullCovariance,
    IdentityCovariance,
    StationaryCovariance,
    decay_lengths,
    load_covariance,
    make_covariance,
)


def random_functions(c: int, bins: int, seed: int) -> torch.Tensor:
    """Random covariance functions, symmetric in the channel pair (what makes Sigma symmetric)."""
    f = torch.randn(c, c, bins, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (f + f.transpose(0, 1)) / 2


def numpy_dense(functions: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Sigma[(c, p), (c', q)] = functions[c, c', rint(hypot(p - q))], written independently of the package."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    radius = np.rint(np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])).astype(int)
    p = h * w
    dense = np.zeros((c * p, c * p))
    for a in range(c):
        for b in range(c):
            dense[a * p:(a + 1) * p, b * p:(b + 1) * p] = functions[a, b][radius]
    return dense


def brute_force_functions(xi: np.ndarray) -> np.ndarray:
    """The pooled estimate by loops: mean of xi[c, p] xi[c', q] over examples and ordered pairs (p, q) per bin."""
    m, c, h, w = xi.shape
    bins = int(round(math.hypot(h - 1, w - 1))) + 1
    sums, counts = np.zeros((c, c, bins)), np.zeros(bins)
    for p in range(h * w):
        for q in range(h * w):
            r = int(round(math.hypot(p // w - q // w, p % w - q % w)))
            counts[r] += 1
            sums[:, :, r] += np.einsum("ic,id->cd", xi[:, :, p // w, p % w], xi[:, :, q // w, q % w])
    return sums / (m * np.maximum(counts, 1))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["mnist", "cifar"])
def test_stationary_matvec_equals_the_dense_matrix_times_g(shape):
    c, h, w = shape
    sigma = StationaryCovariance(shape, dtype=torch.float64, psd="none")  # random functions: indefinite
    functions = random_functions(c, sigma.functions.shape[-1], seed=c)
    sigma.functions.copy_(functions)
    dense = sigma.to_dense()
    reference = numpy_dense(functions.numpy(), c, h, w)
    np.testing.assert_array_equal(dense.numpy(), reference)  # to_dense itself is right
    g = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = (g.flatten(1) @ dense.T).reshape(g.shape)
    for method in ("fft", "conv"):
        sigma.method = method
        sigma._changed()
        torch.testing.assert_close(sigma.matvec(g), expected, rtol=1e-9, atol=1e-9)
    # every channel pair on its own: only CovFun_{a,b} = CovFun_{b,a} non-zero moves channel a by channel b
    sigma.method = "fft"
    for a in range(c):
        for b in range(a, c):
            only = torch.zeros_like(functions)
            only[a, b] = only[b, a] = functions[a, b]
            sigma.functions.copy_(only)
            sigma._changed()
            expected = (g.flatten(1) @ torch.from_numpy(numpy_dense(only.numpy(), c, h, w)).T).reshape(g.shape)
            torch.testing.assert_close(sigma.matvec(g), expected, rtol=1e-9, atol=1e-9)


def test_float32_fft_matvec_is_accurate_and_differentiable():
    sigma = StationaryCovariance((3, 12, 10), psd="none")
    sigma.functions.copy_(random_functions(3, sigma.functions.shape[-1], seed=5).float())
    g = torch.randn(4, 3, 12, 10, requires_grad=True)
    dense = sigma.to_dense().double()
    expected = (g.detach().double().flatten(1) @ dense.T).reshape(g.shape)
    torch.testing.assert_close(sigma.matvec(g).double(), expected, rtol=1e-4, atol=1e-4)
    # d/dg 1/2 g^T Sigma g = Sigma g (Sigma symmetric): the path SGR's double backprop takes
    (grad,) = torch.autograd.grad(0.5 * (g * sigma.matvec(g)).sum(), g)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-4)


def test_stationary_batch_moment_is_the_pooled_mean_over_position_pairs():
    xi = torch.randn(5, 2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = StationaryCovariance((2, 4, 5), dtype=torch.float64)
    sigma.update(xi, beta=1.0)
    np.testing.assert_allclose(sigma.functions.numpy(), brute_force_functions(xi.numpy()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma.mean, xi.mean(0))


def test_full_update_rule_by_hand():
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(6, 2, 3, generator=gen), torch.randn(4, 2, 3, generator=gen)
    sigma = FullCovariance((2, 3))
    torch.testing.assert_close(sigma.matrix, torch.eye(6))  # starts as the identity
    sigma.update(x1, beta=0.3)
    m1 = x1.flatten(1).T @ x1.flatten(1) / 6
    torch.testing.assert_close(sigma.matrix, 0.7 * torch.eye(6) + 0.3 * m1)
    torch.testing.assert_close(sigma.mean, 0.3 * x1.mean(0))
    sigma.update(x2, beta=0.1)
    m2 = x2.flatten(1).T @ x2.flatten(1) / 4
    torch.testing.assert_close(sigma.matrix, 0.9 * (0.7 * torch.eye(6) + 0.3 * m1) + 0.1 * m2)
    torch.testing.assert_close(sigma.mean, 0.9 * 0.3 * x1.mean(0) + 0.1 * x2.mean(0))
    g = torch.randn(5, 2, 3, generator=gen)
    torch.testing.assert_close(sigma.matvec(g), (g.flatten(1) @ sigma.matrix.T).reshape(g.shape))
    with pytest.raises(ValueError, match="beta"):
        sigma.update(x1, beta=0.0)


def true_stationary(zeta: float, rho: float, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """C (x) K with K_pq = exp(-||p - q|| / zeta) (unrounded, positive definite), C = 1 on the diagonal and rho off it;
    and its stationary projection (per pair and radius bin, the mean of its entries), computed by loops."""
    c, h, w = shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    dist = np.hypot(rows.ravel()[:, None] - rows.ravel()[None, :], cols.ravel()[:, None] - cols.ravel()[None, :])
    channel = np.full((c, c), rho) + (1 - rho) * np.eye(c)
    dense = np.kron(channel, np.exp(-dist / zeta))
    radius = np.rint(dist).astype(int)
    bins = radius.max() + 1
    kernel = np.array([np.exp(-dist / zeta)[radius == r].mean() for r in range(bins)])
    return torch.from_numpy(dense), torch.from_numpy(channel[:, :, None] * kernel[None, None, :])


def test_estimate_converges_to_a_known_stationary_covariance_and_its_decay_length():
    shape, zeta = (2, 10, 10), 3.0
    dense, expected = true_stationary(zeta, 0.5, shape)
    factor = torch.linalg.cholesky(dense)
    gen = torch.Generator().manual_seed(4)
    stationary, full = StationaryCovariance(shape, dtype=torch.float64), FullCovariance(shape, dtype=torch.float64)
    for t in range(1, 41):  # beta = 1 / t: the running mean of all batches (10,000 samples)
        xi = (torch.randn(250, dense.shape[0], generator=gen, dtype=torch.float64) @ factor.T).reshape(-1, *shape)
        stationary.update(xi, beta=1.0 / t)
        full.update(xi, beta=1.0 / t)
    near = slice(0, 9)  # radii with many position pairs (the long ones have a handful)
    torch.testing.assert_close(stationary.functions[..., near], expected[..., near], rtol=0, atol=0.02)
    # full and stationary agree: the stationary estimate is the projection of the full one
    torch.testing.assert_close(StationaryCovariance.from_dense(full.matrix, shape, dtype=torch.float64).functions,
                               stationary.functions, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(full.covariance_functions(), stationary.functions, rtol=1e-9, atol=1e-9)
    # the full estimate converges to the full matrix too
    assert (full.matrix - dense).abs().max() < 0.1 and (full.matrix - dense).abs().mean() < 0.02
    # decay length: exp(-r / zeta) reaches 1/e at r = zeta, intra- and inter-channel alike
    lengths = stationary.decay_lengths()
    assert lengths.shape == (2, 2)
    torch.testing.assert_close(decay_lengths(expected), torch.full((2, 2), zeta, dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(lengths, torch.full((2, 2), zeta, dtype=torch.float64), atol=0.1, rtol=0)
    other = StationaryCovariance(shape, functions=true_stationary(1.5, 0.5, shape)[1])
    assert (other.decay_lengths() - 1.5).abs().max() < 0.15  # not a constant answer


def test_decay_lengths_by_hand():
    r = torch.arange(20, dtype=torch.float64)
    functions = torch.stack([2 * torch.exp(-r / 4), torch.exp(-r / 2.5), torch.ones(20), -torch.exp(-r)])
    lengths = decay_lengths(functions)
    torch.testing.assert_close(lengths[:2], torch.tensor([4.0, 2.5], dtype=torch.float64), atol=0.05, rtol=0)
    # linear interpolation between r = 1 (value 0.5) and r = 2 (value 0.25)
    assert decay_lengths(torch.tensor([1.0, 0.5, 0.25]))[()] == pytest.approx(1 + (0.5 - math.exp(-1)) / 0.25)
    assert math.isinf(lengths[2]) and math.isnan(lengths[3])


def test_scaling_state_and_file():
    gen = torch.Generator().manual_seed(6)
    xi = torch.randn(16, 3, 6, 6, generator=gen)
    for representation in ("full", "stationary"):
        sigma = make_covariance(representation, (3, 6, 6))
        sigma.update(xi, beta=1.0)
        scaled = sigma.scaled_to(0.25)
        assert float(scaled.mean_diagonal()) == pytest.approx(0.25, rel=1e-6)
        factor = 0.25 / float(sigma.mean_diagonal())
        torch.testing.assert_close(scaled.to_dense(), sigma.to_dense() * factor)
        torch.testing.assert_close(scaled.mean, sigma.mean * math.sqrt(factor))
        assert float(sigma.mean_diagonal()) == pytest.approx(float(xi.pow(2).mean()), rel=1e-5)
        copy = make_covariance(representation, (3, 6, 6))
        copy.load_state_dict(sigma.state_dict())
        assert torch.equal(copy.values, sigma.values) and torch.equal(copy.mean, sigma.mean)
        with pytest.raises(ValueError, match="shape"):
            make_covariance(representation, (3, 5, 5)).load_state_dict(sigma.state_dict())
    identity = IdentityCovariance((3, 6, 6), scale=2.0)
    torch.testing.assert_close(identity.matvec(xi), 2 * xi)
    assert float(identity.scaled_to(0.5).mean_diagonal()) == pytest.approx(0.5)


def test_fixed_covariance_file(tmp_path):
    x = torch.rand(50, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    flat = x.flatten(1).double()
    covariance = torch.cov(flat.T)  # what advtrain covariance writes: (d, d) float64, divided by n - 1
    path = tmp_path / "cov.pt"
    torch.save(covariance, path)
    full = load_covariance(path, "full", (2, 4, 4))
    torch.testing.assert_close(full.matrix, covariance.float())
    stationary = load_covariance(path, "stationary", (2, 4, 4))
    np.testing.assert_allclose(stationary.functions.numpy(),
                               brute_force_functions((flat - flat.mean(0)).reshape(-1, 2, 4, 4).numpy()) * 50 / 49,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(48, 48\)"):
        load_covariance(path, "full", (3, 4, 4))
    with pytest.raises(FileNotFoundError, match="advtrain covariance"):
        load_covariance(tmp_path / "missing.pt", "full", (2, 4, 4))


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_stationary_never_builds_a_d_by_d_matrix_at_cifar_shape(monkeypatch):
    def refuse(self):
        raise AssertionError("to_dense called")

    monkeypatch.setattr(StationaryCovariance, "to_dense", refuse)
    sigma = StationaryCovariance((3, 32, 32))
    xi = torch.randn(8, 3, 32, 32)
    g = torch.randn(8, 3, 32, 32, requires_grad=True)
    with Shapes() as record:
        sigma.update(xi, beta=1.0)
        sigma.update(xi, beta=0.1)
        scaled = sigma.scaled_to(0.5)
        omega = 0.5 * (g * scaled.matvec(g)).sum()
        torch.autograd.grad(omega, g)
        scaled.decay_lengths()
    assert len(record.shapes) > 20
    positions = 32 * 32
    # a (d, d) or (HW, HW) matrix has two dimensions of at least H W; the kernel grid (2H x 2W) and the binning
    # matrix (4HW x R) have one
    big = [s for s in record.shapes if sum(n >= positions for n in s) >= 2]
    assert big == []
    assert max(math.prod(s) for s in record.shapes) < 3072**2 / 16


def test_covariance_cost_benchmark_runs_and_writes_its_ratios(tmp_path):
    import importlib.util
    import json

    from cli_utils import ROOT

    spec = importlib.util.spec_from_file_location("covariance_cost", ROOT / "bench" / "covariance_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.json"
    result = module.main(["--batch-size", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert {"update_stationary_vs_clean", "matvec_conv_vs_fft"} <= set(result["ratios"])
    assert all(value > 0 for value in result["seconds"].values())
