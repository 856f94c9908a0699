"""RegMean: merge each linear layer by the closed-form solution of a regression on the models' own inputs.

Dataless Knowledge Fusion by Merging Weights of Language Models. Xisen Jin, Xiang Ren, Daniel Preotiuc-Pietro,
Pengxiang Cheng, ICLR 2023, arXiv:2212.09849.

For a linear layer ``y = W x`` held as ``W_i`` by model ``i``, with ``X_i`` [n_i, in] the layer's inputs in
model ``i`` on model ``i``'s data, RegMean minimises ``Σ_i ‖X_i W^T − X_i W_i^T‖²`` (eq. 1-2):

    W* = (Σ_i G_i)^-1 Σ_i G_i W_i   (in the [in, out] layout: W*^T = (Σ G_i)^-1 Σ G_i W_i^T),  G_i = X_i^T X_i

with the non-diagonal entries of each ``G_i`` scaled by ``alpha`` (§3.3:
``G~ = alpha G + (1 - alpha) diag(G)``;
``alpha = 1`` is the plain solution; ``alpha = 0`` keeps the diagonal only, a per-input-channel average of the
columns weighted by ``‖X_j‖²``, which is the plain average when every model's channel energies agree).
Every other tensor (embeddings, norms, biases, heads outside the blocks) is averaged, as in the paper.

Each ``G_i`` is the mean over tokens (``X_i^T X_i / n_i``, the authors' released ``regmean_mean`` setting), so
a data set of long texts does not outweigh one of short sentences. Statistics are gathered by hooks on the
layer walker (:func:`weightsmith.layers.walk_blocks`): one model in memory, one block on the device; only the
sums ``A = Σ G~_i`` (shared by layers that read one input, e.g. q/k/v) and ``B = Σ G~_i W_i^T`` are kept, so
memory does not grow with the number of models. The solve is in float64, damped towards the average weight by
``damp · mean(diag A)`` (a channel no model ever saw gets the average).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, StatsSpec, find_layers, walk_blocks
from ..progress import track
from . import _core
from ._dataaware import (
    DataOptions,
    inputs_of,
    load_batches,
    load_weights,
    mean_of,
    merged_state,
    open_checked,
    write_merged,
)


@register_config("regmean", kind="merge")
class RegMean(DataOptions):
    """``alpha``: scale of the Gram matrices' non-diagonal entries (1 keeps them, 0 drops them);
    ``damp``: ridge towards the average weight, relative to the mean diagonal of ``Σ G~`` (0: the exact
    solve, which refuses a singular Gram matrix). Data options: :class:`~._dataaware.DataOptions`."""

    alpha: float = 0.9
    damp: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise WeightsmithError(f"regmean option alpha={self.alpha}: must be in [0, 1]")
        if self.damp < 0:
            raise WeightsmithError(f"regmean option damp={self.damp}: must be >= 0")
        self.check_data()

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        stores, _, model, tok = open_checked(recipe, "regmean", False, "the Gram matrices weigh the models")
        device = kw.get("device") or "cpu"
        acc = RegMeanStats(self)
        for store, source in zip(stores, self.sources(len(stores)), strict=True):
            load_weights(model, store, str(store.source))
            acc.add(model, load_batches(tok, source, self, single=True), device=device)
        del model  # the write needs only the sums (a float32 copy of the model is as large as 2 bf16 ones)
        return write_merged(recipe, stores, acc.merge_one, out, "regmean", dict(kw))


class RegMeanStats:
    """The running sums ``A = Σ_i G~_i`` and ``B = Σ_i G~_i W_i^T`` of every walked linear layer. Solving a
    layer frees its ``B``, and the last layer of a group its ``A``: memory falls as the merge is written."""

    def __init__(self, config: RegMean = RegMean()) -> None:
        self.config = config
        self.A: dict[str, Tensor] = {}  # keyed by the first layer of each group sharing one input
        self.group: dict[str, str] = {}  # layer name -> its group's key
        self.B: dict[str, Tensor] = {}
        self.transposed: set[str] = set()  # GPT-2 Conv1D: stored [in, out]
        self._last: tuple[str, Tensor, float] | None = None
        self._left: dict[str, int] | None = None  # layers of each group not solved yet

    def reduced(self, gram: Tensor) -> Tensor:
        """``G~ = alpha G + (1 - alpha) diag(G)`` (RegMean §3.3)."""
        a = self.config.alpha
        return gram * a + torch.diag(torch.diagonal(gram)) * (1.0 - a)

    def add(self, model: nn.Module, batches: Sequence[Any], device: str | torch.device = "cpu") -> None:
        """Walk ``model`` block by block over ``batches`` (its own data) and fold its statistics in."""
        calib = [inputs_of(b) for b in batches]

        def on_block(_i: int, prefix: str, block: nn.Module, stats: dict[str, InputStats]) -> None:
            kinds = {ly.name: ly for ly in find_layers(block, prefix=prefix)}
            firsts: list[tuple[str, Tensor, Tensor]] = []  # (group key, G, G~) of this block
            for name, st in stats.items():
                G = st.hessian() / 2  # X^T X / n
                hit = next((f for f in firsts if f[1].shape == G.shape and torch.equal(f[1], G)), None)
                if hit is None:
                    hit = (name, G, self.reduced(G))
                    firsts.append(hit)
                    self.A[name] = hit[2].clone() if name not in self.A else self.A[name].add_(hit[2])
                self.group[name] = hit[0]
                layer = kinds[name]
                if layer.kind == "conv1d":
                    self.transposed.add(name)
                GW = hit[2] @ layer.weight().detach().float().T.to(G.device)  # [in, out]
                self.B[name] = GW if name not in self.B else self.B[name].add_(GW)

        walk_blocks(model, list(calib), on_block, StatsSpec(gram=True, channels=False), device=device)

    def _factor(self, key: str) -> tuple[Tensor, float]:
        """The Cholesky factor of ``A + lam I`` of one group and ``lam`` (the last group's is kept: layers
        that share an input, q/k/v or gate/up, are written one after another and factor it once)."""
        if self._last is None or self._last[0] != key:
            A = self.A[key].double()
            lam = self.config.damp * float(torch.diagonal(A).mean())
            L, info = torch.linalg.cholesky_ex(
                A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            )
            if int(info) != 0:
                raise WeightsmithError(
                    f"regmean: the Gram matrix of '{key}' is singular (no input reached some channel); "
                    "raise option damp (e.g. 1e-6)"
                )
            self._last = (key, L, lam)
        return self._last[1], self._last[2]

    def solve(self, name: str, mean_weight: Tensor) -> Tensor:
        """``W*`` ([out, in]) of one layer; ``mean_weight`` (the average of the models' weights, [out, in])
        is where the damping pulls."""
        key = self.group[name]
        if name not in self.B:
            raise WeightsmithError(f"regmean: layer '{name}' was solved already")
        if self._left is None:
            self._left = {}
            for k in self.group.values():
                self._left[k] = self._left.get(k, 0) + 1
        L, lam = self._factor(key)
        rhs = self.B.pop(name).double() + lam * mean_weight.T.to(L)
        self._left[key] -= 1
        if self._left[key] == 0:
            del self.A[key]
        return torch.cholesky_solve(rhs, L).T.float()

    def merge_one(self, name: str, tensors: list[Tensor]) -> Tensor:
        """Tensor ``name`` merged from the models' ``tensors``: RegMean for a walked layer, else the mean."""
        mean = mean_of(tensors)
        if name not in self.group:
            return mean
        if name in self.transposed:  # Conv1D stores [in, out]
            return self.solve(name, mean.T).T.to(mean.device)
        return self.solve(name, mean).to(mean.device)


def regmean_merge(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Sequence[Any]],
    config: RegMean = RegMean(),
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """In memory: RegMean of ``states`` (state dicts or stores of ``model``'s architecture), each walked on
    its own ``batches``; returns float32 merged tensors for every floating tensor of ``states[0]``.
    ``model`` is the architecture; its own weights are overwritten by each state in turn."""
    if len(states) != len(batches):
        raise WeightsmithError(f"regmean: {len(states)} models but {len(batches)} batch lists")
    acc = RegMeanStats(config)
    for state, data in track(list(zip(states, batches, strict=True)), "regmean"):
        load_weights(model, state)
        acc.add(model, data, device=device)
    return merged_state(states, acc.merge_one)
