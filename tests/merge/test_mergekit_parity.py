"""Kernel parity: each tensor-wise merge method against mergekit 0.1.5's own implementation of it, on the
same random float32 tensors (target: 1e-5).

mergekit draws DELLA's masks and Arcee Fusion's quantile sample from the global torch RNG; our kernels
take a ``torch.Generator``. Seeding the global RNG and the generator with the same value gives the same
CPU (mt19937) stream, and both draw in the same order (one ``bernoulli`` per model, in model order), so
those are compared exactly too.
"""

from __future__ import annotations

import pytest
import torch

from weightsmith.config import registered
from weightsmith.errors import WeightsmithError
from weightsmith.merge.arcee_fusion import ArceeFusion
from weightsmith.merge.breadcrumbs import Breadcrumbs, BreadcrumbsTIES
from weightsmith.merge.della import DELLA, DELLALinear, della
from weightsmith.merge.karcher import Karcher
from weightsmith.merge.model_stock import ModelStock
from weightsmith.merge.nearswap import NearSwap
from weightsmith.merge.passthrough import Passthrough
from weightsmith.merge.ram import RAM, RAMPlusTL
from weightsmith.merge.sce import SCE
from weightsmith.merge.slerp import SLERP, MultiSLERP, NuSLERP

pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

ATOL = 1e-5
SHAPES = [(16, 12), (7,), (3, 4, 5)]


def family(n: int, shape=(16, 12), seed: int = 0, spread: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * torch.randn(shape, generator=g) for _ in range(n)]


def mk(name: str, base, thetas, **params) -> torch.Tensor:
    """mergekit's method ``name`` on one tensor group (base first, models m0, m1, ...)."""
    ids = (["base"] if base is not None else []) + [f"m{i}" for i in range(len(thetas))]
    tensors = ([base] if base is not None else []) + list(thetas)
    group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0 if base is not None else None)
    return registry.get(name)([group], parameters=params)[0]


def per_model(values, n):
    return {f"m{i}": v for i, v in enumerate(values if isinstance(values, list) else [values] * n)}


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------- SLERP


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(shape, t):
    base, (other,) = family(1, shape, spread=1.0)
    close(SLERP(t=t).merge(base, [other]), mk("slerp", base, [other], t=t))


def test_slerp_collinear_and_zero_inputs_match_mergekit():
    base = torch.randn(8, 4)
    for other in (2.0 * base, -base, torch.zeros_like(base), base + 1e-6):
        close(SLERP(t=0.4).merge(base, [other]), mk("slerp", base, [other], t=0.4))


def test_slerp_is_on_the_arc():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = SLERP(t=0.5).merge(a, [b])
    torch.testing.assert_close(out, torch.tensor([0.5**0.5, 0.5**0.5]))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_slerp_t_outside_unit_interval_is_refused(bad):
    with pytest.raises(WeightsmithError, match="t="):
        SLERP(t=bad)


def test_slerp_more_than_two_models_is_refused():
    base, thetas = family(2)
    with pytest.raises(WeightsmithError, match="at most 1"):
        SLERP().merge(base, thetas)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize(
    "opts", [{}, {"flatten": False}, {"flatten": False, "row_wise": True}], ids=["flat", "rows", "cols"]
)
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.3, 0.9], [1.0, -1.0]])
def test_nuslerp_matches_mergekit(with_base, opts, weights):
    base, thetas = family(2, (9, 6), spread=0.7)
    b = base if with_base else None
    theirs = mk(
        "nuslerp",
        b,
        thetas,
        weight=per_model(weights, 2),
        nuslerp_flatten=opts.get("flatten", True),
        nuslerp_row_wise=opts.get("row_wise", False),
    )
    close(NuSLERP(**opts).merge(b, thetas, weights), theirs)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit(with_base, n, normalize):
    base, thetas = family(n, (10, 5), spread=0.5)
    b = base if with_base else None
    w = [0.5 + 0.25 * i for i in range(n)]
    theirs = mk("multislerp", b, thetas, weight=per_model(w, n), normalize_weights=normalize)
    close(MultiSLERP(normalize_weights=normalize).merge(b, thetas, w), theirs)


def test_multislerp_antipodal_pair_falls_back_to_linear_like_mergekit():
    x = torch.randn(6, 3)
    close(
        MultiSLERP().merge(None, [x, -x], [1.0, 1.0]),
        mk("multislerp", None, [x, -x], weight=per_model(1.0, 2)),
    )
    with pytest.raises(WeightsmithError, match="weighted mean direction"):
        MultiSLERP().merge(None, [x, -x, x * 0], [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- Model Stock, Karcher


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(shape, n, filter_wise):
    base, thetas = family(n, shape)
    theirs = mk("model_stock", base, thetas, filter_wise=filter_wise)
    close(ModelStock(filter_wise=filter_wise).merge(base, thetas), theirs)


def test_model_stock_paper_ratio_for_orthogonal_offsets():
    """Two orthogonal offsets (cos 0) give t = 0: the base itself (Jang et al. 2024, Eq. 6)."""
    base = torch.zeros(4)
    out = ModelStock().merge(base, [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])])
    torch.testing.assert_close(out, base)


def test_model_stock_needs_two_models():
    base, thetas = family(1)
    with pytest.raises(WeightsmithError, match="at least 2"):
        ModelStock().merge(base, thetas)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_karcher_matches_mergekit(with_base, n):
    base, thetas = family(n, (12, 7), spread=0.8)
    b = base if with_base else None
    close(Karcher().merge(b, thetas), mk("karcher", b, thetas))
    close(Karcher(max_iter=3, tol=1e-3).merge(b, thetas), mk("karcher", b, thetas, max_iter=3, tol=1e-3))


def test_karcher_with_a_zero_input_matches_mergekit():
    _, thetas = family(3, (5, 5), spread=1.0)
    thetas[1] = torch.zeros_like(thetas[1])
    close(Karcher().merge(None, thetas), mk("karcher", None, thetas))


# ------------------------------------------------------------------------------ DELLA, breadcrumbs


@pytest.mark.parametrize("cls,name", [(DELLA, "della"), (DELLALinear, "della_linear")])
@pytest.mark.parametrize("shape", [(20, 16), (33,)])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.1), (1.0, 0.15)])
def test_della_matches_mergekit_with_the_same_seed(cls, name, shape, density, epsilon):
    base, thetas = family(3, shape)
    w = [1.0, 0.5, 0.8]
    torch.manual_seed(1234)
    theirs = mk(
        name,
        base,
        thetas,
        weight=per_model(w, 3),
        density=per_model(density, 3),
        epsilon=per_model(epsilon, 3),
    )
    gen = torch.Generator().manual_seed(1234)
    close(cls(density=density, epsilon=epsilon).merge(base, thetas, w, gen), theirs)


@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, False), (False, True)])
def test_della_options_match_mergekit(normalize, rescale):
    base, thetas = family(2, (12, 10))
    torch.manual_seed(7)
    theirs = mk(
        "della",
        base,
        thetas,
        weight=per_model([1.0, 2.0], 2),
        density=per_model([0.4, 0.6], 2),
        epsilon=per_model(0.2, 2),
        normalize=normalize,
        rescale=rescale,
        **{"lambda": 0.7},
    )
    ours = della(
        base,
        thetas,
        [1.0, 2.0],
        [0.4, 0.6],
        [0.2, 0.2],
        elect=True,
        normalize=normalize,
        rescale=rescale,
        scaling=0.7,
        generator=torch.Generator().manual_seed(7),
    )
    close(ours, theirs)


def test_della_keeps_larger_entries_more_often():
    """MagPrune: the keep probability rises with the magnitude rank (Deep et al. 2024, Sec. 3)."""
    base = torch.zeros(200, 100)
    delta = torch.arange(100, dtype=torch.float32).add(1).expand(200, 100).contiguous()
    out = DELLALinear(density=0.5, epsilon=0.4, rescale=False).merge(
        base, [delta], [1.0], torch.Generator().manual_seed(0)
    )
    kept = (out != 0).float().mean(dim=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8
    assert abs(kept.mean().item() - 0.5) < 0.02


def test_della_density_epsilon_out_of_range_is_refused():
    with pytest.raises(WeightsmithError, match="epsilon"):
        DELLA(density=0.1, epsilon=0.15)


@pytest.mark.parametrize("cls,name", [(Breadcrumbs, "breadcrumbs"), (BreadcrumbsTIES, "breadcrumbs_ties")])
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0), (1.0, 0.01)])
@pytest.mark.parametrize("shape", [(30, 20), (51,)])
def test_breadcrumbs_matches_mergekit(cls, name, density, gamma, shape):
    base, thetas = family(3, shape)
    w = [1.0, 0.7, 0.4]
    theirs = mk(
        name, base, thetas, weight=per_model(w, 3), density=per_model(density, 3), gamma=per_model(gamma, 3)
    )
    close(cls(density=density, gamma=gamma).merge(base, thetas, w), theirs)


@pytest.mark.parametrize("normalize,rescale", [(True, False), (True, True)])
def test_breadcrumbs_options_match_mergekit(normalize, rescale):
    base, thetas = family(2, (20, 10))
    theirs = mk(
        "breadcrumbs_ties",
        base,
        thetas,
        weight=per_model([1.0, 0.5], 2),
        density=per_model(0.6, 2),
        gamma=per_model(0.05, 2),
        normalize=normalize,
        rescale=rescale,
        **{"lambda": 1.3},
    )
    ours = BreadcrumbsTIES(density=0.6, gamma=0.05, normalize=normalize, rescale=rescale, scaling=1.3)
    close(ours.merge(base, thetas, [1.0, 0.5]), theirs)


def test_breadcrumbs_drops_the_outliers_and_the_smallest():
    delta = torch.arange(1, 101, dtype=torch.float32)
    out = Breadcrumbs(density=0.5, gamma=0.1).merge(torch.zeros(100), [delta], [1.0])
    assert (out[90:] == 0).all() and (out[:40] == 0).all() and (out[40:90] == delta[40:90]).all()


# ------------------------------------------------------------------ SCE, NearSwap, Fusion, RAM, passthrough


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(16, 12), (40,)])
def test_sce_matches_mergekit(topk, shape):
    base, thetas = family(3, shape)
    close(SCE(select_topk=topk).merge(base, thetas), mk("sce", base, thetas, select_topk=topk))


@pytest.mark.parametrize("t", [1e-4, 0.05, 0.5, 10.0])
def test_nearswap_matches_mergekit(t):
    base, (other,) = family(1, (20, 8))
    close(NearSwap(t=t).merge(base, [other]), mk("nearswap", base, [other], t=t))


@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 5, 7)])
def test_arcee_fusion_matches_mergekit(shape):
    base, (other,) = family(1, shape, spread=0.5)
    close(ArceeFusion().merge(base, [other]), mk("arcee_fusion", base, [other]))


def test_arcee_fusion_sampled_quartiles_match_mergekit_with_the_same_seed():
    base, (other,) = family(1, (1001, 1000), spread=0.5)  # > 1M entries: quartiles from a sample
    torch.manual_seed(5)
    theirs = mk("arcee_fusion", base, [other])
    close(ArceeFusion().merge(base, [other], None, torch.Generator().manual_seed(5)), theirs)


def sparse_family(n: int, shape=(30, 20), seed: int = 0):
    """Task vectors with many exact zeros, so unique / shared / inactive entries all occur."""
    base, thetas = family(n, shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return base, [base + (t - base) * (torch.rand(shape, generator=g) < 0.4) for t in thetas]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ram_matches_mergekit(n):
    base, thetas = sparse_family(n)
    close(RAM().merge(base, thetas), mk("ram", base, thetas))
    close(RAM(epsilon=0.05).merge(base, thetas), mk("ram", base, thetas, epsilon=0.05))


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 1.0)])
def test_ramplus_tl_matches_mergekit(n, r, alpha):
    base, thetas = sparse_family(n)
    close(RAMPlusTL(r=r, alpha=alpha).merge(base, thetas), mk("ramplus_tl", base, thetas, r=r, alpha=alpha))


@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 2.0])
def test_passthrough_matches_mergekit(scale):
    _, (x,) = family(1, (6, 4))
    theirs = mk("passthrough", None, [x], scale=per_model(scale, 1))
    close(Passthrough(scale=scale).merge(None, [x]), theirs)


def test_every_new_method_is_registered():
    names = {
        "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "della", "della_linear", "breadcrumbs",
        "breadcrumbs_ties", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
    }  # fmt: skip
    assert names <= set(registered("merge"))


# ------------------------------------------------- the task-arithmetic rows of the mergekit table


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [1.0, 0.4])
@pytest.mark.parametrize("rescale", [False, True])
def test_gta_rows_of_the_mergekit_table_match_mergekit(name, density, rescale):
    from weightsmith.merge.mergekit_methods import METHODS

    base, thetas = family(3, (14, 9))
    w = [1.0, 0.6, -0.3]
    shared = {"normalize": name == "ties", "rescale": rescale, "lambda": 0.8, "int8_mask": False}
    torch.manual_seed(99)
    theirs = mk(name, base, thetas, weight=per_model(w, 3), density=per_model(density, 3), **shared)
    per = [{"weight": x, "density": density} for x in w]
    ours = METHODS[name].kernel(base, thetas, shared, per, torch.Generator().manual_seed(99))
    close(ours, theirs)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_row_of_the_mergekit_table_matches_mergekit(normalize):
    from weightsmith.merge.mergekit_methods import METHODS

    _, thetas = family(3, (8, 5))
    w = [0.2, 0.5, 1.0]
    theirs = mk("linear", None, thetas, weight=per_model(w, 3), normalize=normalize)
    ours = METHODS["linear"].kernel(None, thetas, {"normalize": normalize}, [{"weight": x} for x in w], None)
    close(ours, theirs)
