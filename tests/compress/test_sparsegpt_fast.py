"""The fast SparseGPT paths give the reference's weights: layers with one Hessian pruned in one pass over
their stacked rows (bit-exact with layer by layer, unstructured and 2:4), and the fused Triton block kernel
(bit-exact with the eager column loop on the CPU under Triton's interpreter; on a GPU against the eager loop
on the same device)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from compress_fixtures import calib, hopper_ptx, run_under_triton_interpreter, tiny_llama
from compress_fixtures import hessian_problem as _problem

from weightsmith.compress import compress
from weightsmith.compress import sparsegpt as sparsegpt_module
from weightsmith.compress._core import CompressConfig
from weightsmith.compress.sparsegpt import SparseGPT, sparsegpt_prune
from weightsmith.errors import WeightsmithError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass(frozen=True)
class LayerByLayer(SparseGPT):
    """SparseGPT through the base class's compress_block: one layer at a time (the reference)."""

    def compress_block(self, block, layers, stats):  # type: ignore[no-untyped-def]
        return CompressConfig.compress_block(self, block, layers, stats)


def _same(a, b) -> bool:  # type: ignore[no-untyped-def]
    return torch.equal(a.W, b.W) and torch.equal(a.mask, b.mask)


def _column_loop(W1, U1, keep1, Err1, n, m):  # type: ignore[no-untyped-def]
    """SparseGPT's column steps on the block's strided columns (the loop the eager steps replaced)."""
    from weightsmith.compress._sparse import nm_mask

    d = U1.diagonal()
    for i in range(W1.shape[1]):
        if m and i % m == 0:
            keep1[:, i : i + m] = nm_mask(W1[:, i : i + m].square() / d[i : i + m].square(), n, m)
        w = W1[:, i]
        q = torch.where(keep1[:, i], w, torch.zeros_like(w))
        err = (w - q) / d[i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        W1[:, i] = q
        Err1[:, i] = err


@pytest.mark.parametrize("n, m, block", [(0, 0, 24), (2, 4, 16), (1, 4, 32)])
def test_eager_steps_give_the_column_loops_bits(monkeypatch, n, m, block):
    """The eager steps run on a transposed copy of the block: weights and masks (unstructured and N:M,
    whose masks are chosen from updated weights mid-block) equal the strided loop's bit for bit."""
    torch.set_num_threads(1)
    W, H = _problem(40, 96, seed=4)
    fast = sparsegpt_prune(W, H, 0.55, n, m, 0.01, block, fused=False)
    monkeypatch.setattr(sparsegpt_module, "_eager_steps", _column_loop)
    ref = sparsegpt_prune(W, H, 0.55, n, m, 0.01, block, fused=False)
    assert _same(fast, ref)


@pytest.mark.parametrize("opts", [{"sparsity": 0.6, "block_size": 24}, {"n": 2, "m": 4, "block_size": 16}])
def test_stacked_rows_give_the_layer_by_layer_weights_bit_for_bit(opts):
    torch.set_num_threads(1)
    base, batches = tiny_llama(), calib(length=32)
    fast, rf = compress(copy.deepcopy(base), SparseGPT(fused=False, **opts), calib=batches)
    slow, rs = compress(copy.deepcopy(base), LayerByLayer(fused=False, **opts), calib=batches)
    assert rf.weights.keys() == rs.weights.keys() and len(rf.weights) == 14
    for name in rf.weights:
        assert _same(rf.weights[name], rs.weights[name]), name
    for (n, p), q in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    if not opts.get("m"):  # each layer's own share of zeros in every block, not the stack's
        for sw in rf.weights.values():
            assert sw.sparsity == pytest.approx(0.6, abs=0.02)


def test_stacked_mask_is_chosen_per_layer():
    # two layers of very different scale: one mask over the stack would prune the small one almost entirely
    W, H = _problem(8, 32)
    stack = torch.cat([W, 100 * W])
    sw = sparsegpt_prune(stack, H, 0.5, rows=[8, 8])
    assert _same(sparsegpt_prune(W, H, 0.5), type(sw)(sw.W[:8], sw.mask[:8])) and sw.mask[
        :8
    ].float().mean() == pytest.approx(0.5)
    with pytest.raises(WeightsmithError, match="row sizes"):
        sparsegpt_prune(stack, H, 0.5, rows=[8, 9])


# unstructured and N:M, a last block narrower than the others, rows not a multiple of the kernel's tile
KERNEL_CASES = [
    (20, 64, 0, 0, 32),
    (20, 72, 0, 0, 32),
    (20, 64, 2, 4, 32),
    (37, 48, 1, 4, 16),
    (5, 40, 4, 8, 128),
]

# Triton's interpreter needs TRITON_INTERPRET=1 before triton is first imported, so the kernel runs on the CPU
# in a fresh process.
CHILD = """
import sys, torch
sys.path[:0] = sys.argv[1:3]
torch.set_num_threads(1)
from test_sparsegpt_fast import KERNEL_CASES, _problem, _same
from weightsmith.compress.sparsegpt import sparsegpt_prune
for out_f, in_f, n, m, block in KERNEL_CASES:
    W, H = _problem(out_f, in_f)
    eager = sparsegpt_prune(W, H, 0.55, n, m, 0.01, block, fused=False)
    fused = sparsegpt_prune(W, H, 0.55, n, m, 0.01, block, fused=True)
    print(out_f, in_f, n, m, block, "same" if _same(eager, fused) else "DIFFERENT")
"""


def test_fused_kernel_gives_the_eager_weights_bit_for_bit():
    pytest.importorskip("triton", minversion="3.9")
    src = Path(sparsegpt_module.__file__).parents[2]
    lines = run_under_triton_interpreter(CHILD, Path(__file__).parent, src)
    assert len(lines) == len(KERNEL_CASES) and all(ln.endswith(" same") for ln in lines), lines


def test_kernel_compiles_for_hopper_with_ieee_division_and_no_fma(monkeypatch, tmp_path):
    """No GPU needed: Triton compiles to PTX for sm_90 (H100/H200); the interpreter does not catch what only
    the compiler refuses, and bit-exactness needs IEEE division and no fused multiply-add."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from weightsmith.compress._sparsegpt_kernel import sparsegpt_block_kernel

    if not hasattr(sparsegpt_block_kernel, "arg_names"):
        pytest.skip("the kernel module was imported under the interpreter")
    ints = ["R", "width", "n", "m", "stride_w", "stride_u", "stride_uc", "stride_k", "stride_e"]
    sig = {"w_ptr": "*fp32", "u_ptr": "*fp32", "k_ptr": "*u8", "e_ptr": "*fp32"}
    sig |= dict.fromkeys(["NM", "BLOCK_R", "BLOCK_C"], "constexpr") | dict.fromkeys(ints, "i32")
    for nm in (True, False):
        ptx = hopper_ptx(sparsegpt_block_kernel, sig, {"NM": nm, "BLOCK_R": 16, "BLOCK_C": 128})
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert "fma." not in ptx


def test_fused_without_triton_or_off_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(sparsegpt_module, "triton_available", lambda: False)
    W, H = _problem(4, 16)
    with pytest.raises(WeightsmithError, match="sparsegpt option fused=true needs Triton"):
        sparsegpt_prune(W, H, 0.5, fused=True)
    assert _same(sparsegpt_prune(W, H, 0.5, fused=None), sparsegpt_prune(W, H, 0.5, fused=False))
    monkeypatch.setattr(sparsegpt_module, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(WeightsmithError, match="runs on CUDA"):
        sparsegpt_prune(W, H, 0.5, fused=True)


@needs_cuda
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_fused_kernel_on_cuda_gives_the_eager_weights(nm):
    pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    W, H = _problem(300, 512, seed=1)
    W, H = W.cuda(), H.cuda()
    eager = sparsegpt_prune(W, H, 0.5, *nm, fused=False)
    fused = sparsegpt_prune(W, H, 0.5, *nm, fused=True)
    assert torch.equal(eager.mask, fused.mask)
    torch.testing.assert_close(eager.W, fused.W, rtol=0, atol=0)
