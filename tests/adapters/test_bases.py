"""Orthogonal shared bases (adapters/_bases.py) for VeRA, NOLA and RandLoRA, checked with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightsmith.adapters import AdapterContext, SharedBases
from weightsmith.adapters._bases import haar_orthogonal, orthogonal_basis
from weightsmith.adapters.nola import NOLA
from weightsmith.adapters.randlora import RandLoRA
from weightsmith.adapters.vera import VeRA, kaiming_uniform
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def make(cfg, W0, shapes=None):
    shared = SharedBases(cfg.seed)
    ctx = AdapterContext("w", 0, cfg.seed, "linear", shared, shapes=shapes or (tuple(W0.shape),))
    return cfg.create(W0, ctx)


def n(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
def test_haar_orthogonal_is_orthonormal_and_seeded(shape):
    Q = n(haar_orthogonal(*shape, torch.Generator().manual_seed(1)))
    small = min(shape)
    gram = Q @ Q.T if shape[0] <= shape[1] else Q.T @ Q
    assert np.abs(gram - np.eye(small)).max() < 1e-6
    again = n(haar_orthogonal(*shape, torch.Generator().manual_seed(1)))
    assert np.array_equal(Q, again)


def test_haar_sign_fix_makes_first_entry_centred():
    """Without Mezzadri's sign fix LAPACK's QR gives Q[0, 0] <= 0 always; Haar Q has E[Q00] = 0 and
    E[Q00²] = 1/n."""
    g = torch.Generator().manual_seed(0)
    q = np.array([float(haar_orthogonal(4, 4, g)[0, 0]) for _ in range(400)])
    assert abs(q.mean()) < 0.08 and (q > 0).mean() > 0.4
    assert abs((q**2).mean() - 0.25) < 0.04


def test_orthogonal_basis_keeps_iid_energy():
    """‖basis‖_F² = m n v, the i.i.d. draw's expected energy; rows orthogonal as flattened vectors."""
    B = n(orthogonal_basis((6, 4, 5), 0.3)(torch.Generator().manual_seed(2)))
    assert B.shape == (6, 4, 5)
    assert math.isclose((B**2).sum(), 6 * 20 * 0.3, rel_tol=1e-6)
    F = B.reshape(6, 20)
    gram = F @ F.T
    assert np.abs(gram - gram[0, 0] * np.eye(6)).max() < 1e-6 * gram[0, 0]


def test_vera_default_basis_unchanged_and_orthogonal_option():
    W0 = torch.randn(12, 10)
    a = make(VeRA(rank=4), W0)
    shared = SharedBases(0)
    ref = kaiming_uniform((4, 10), torch.Generator().manual_seed(shared.key_seed("vera.A")))
    assert torch.equal(a.vera_A, ref)  # the default draw (and so PEFT-copied tests) is unchanged
    o = make(VeRA(rank=4, basis="orthogonal"), W0)
    A, B = n(o.vera_A), n(o.vera_B)
    assert np.allclose(A @ A.T, (10 * 2 / 10) * np.eye(4), atol=1e-5)  # scale² = max(m, n) v = 2
    assert np.allclose(B.T @ B, (12 * 2 / 4) * np.eye(4), atol=1e-5)
    torch.nn.init.normal_(o.vera_lambda_b)
    x = torch.randn(3, 10)
    expected = n(x) @ (np.diag(n(o.vera_lambda_b)) @ B @ np.diag(n(o.vera_lambda_d)) @ A).T
    assert np.allclose(n(o(x, W0, torch.zeros(3, 12))), expected, atol=1e-5)


def test_nola_orthogonal_bases_are_orthonormal_vectors():
    a = make(NOLA(rank=2, num_basis_A=5, num_basis_B=3, basis="orthogonal"), torch.randn(8, 6))
    FA = n(a.A_basis).reshape(5, -1)
    FB = n(a.B_basis).reshape(3, -1)
    assert np.allclose(FA @ FA.T, FA[0] @ FA[0] * np.eye(5), atol=1e-6)
    assert np.allclose(FB @ FB.T, FB[0] @ FB[0] * np.eye(3), atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_randlora_orthogonal_concatenated_bases(shape):
    a = make(RandLoRA(rank=4, alpha=8.0, basis="orthogonal"), torch.randn(*shape))
    d, D = min(shape), max(shape)
    Bf = n(a.randlora_B)[:D, : a.n, :4].reshape(D, a.n * 4)
    assert np.allclose(Bf.T @ Bf, D * np.eye(a.n * 4), atol=1e-4)  # unit variance: scale² = D
    A = n(a.randlora_A)[:4, :d]
    assert np.allclose(A @ A.T, d * np.eye(4), atol=1e-4)
    with torch.no_grad():
        a.randlora_lambda.normal_()
        a.randlora_gamma.normal_()
    assert np.linalg.matrix_rank(n(a.delta(torch.zeros(*shape)))) == d


@pytest.mark.parametrize("cfg", [VeRA, NOLA, RandLoRA])
def test_bad_basis_names_the_option(cfg):
    with pytest.raises(WeightsmithError, match="basis='haar'"):
        cfg(basis="haar")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))


@pytest.mark.parametrize(
    "cfg", [VeRA(rank=4, basis="orthogonal"), RandLoRA(rank=3, alpha=6.0, basis="orthogonal")]
)
def test_orthogonal_adapter_saves_regenerates_and_exports_exactly(cfg, tmp_path):
    """The bases are regenerated from (seed, basis) on load; the PEFT export (LoRA factors) is exact."""
    from weightsmith.adapters import adapt
    from weightsmith.adapters._io import load_adapters, save_adapters
    from weightsmith.adapters._peft import to_peft

    m = _mlp()
    adapt(m, cfg, targets="0,2")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(4, 6)
    want = m(x)
    save_adapters(m, tmp_path / "a")
    fresh = _mlp()
    load_adapters(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), want)
    errors = to_peft(m, tmp_path / "peft")
    assert max(errors.values()) < 1e-6
