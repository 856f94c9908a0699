"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information.

Merging Models with Fisher-Weighted Averaging. Michael Matena, Colin Raffel, NeurIPS 2022, arXiv:2111.09832.

    theta*_j = Σ_i w_i F_i,j theta_i,j / Σ_i w_i F_i,j        (eq. 3; w_i the per-model weights, default 1)

with ``F_i = E_x E_y [(∂ log p_theta_i(y | x) / ∂theta)^2]`` the diagonal of model ``i``'s Fisher, estimated
on ``samples`` examples of model ``i``'s own data from squared per-example gradients. ``eps`` is added to
every ``F_i`` (a parameter no example moves falls back to the weighted average; FusionBench's default floor
1e-6).

``labels`` says which ``y`` the log-likelihood is taken at:

- ``predicted`` (default): the model's own most likely label, for a language model its most likely next token
  at every position (the paper's classifier setting uses the model's predictive distribution, not the data's
  labels);
- ``exact``: the expectation over ``y ~ p_theta(y | x)`` summed over every class (classifiers only: one
  backward pass per class);
- ``empirical``: the data's label, for a language model the observed next token (the "empirical Fisher").

For a language model the example is a window of ``seq_len`` tokens and ``log p`` sums over its positions.
One model is in memory at a time; the running sums ``Σ w_i F_i theta_i`` and ``Σ w_i F_i`` take two float32
copies of the parameters, and the merged checkpoint is written tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..progress import track
from . import _core
from ._dataaware import (
    Batch,
    DataOptions,
    load_batches,
    load_weights,
    logits_of,
    merged_state,
    open_checked,
    split_examples,
    token_logits,
    write_merged,
)

LABELS = ("predicted", "exact", "empirical")


@register_config("fisher", kind="merge")
class Fisher(DataOptions):
    """``labels``: predicted | exact | empirical (see the module docstring); ``eps``: floor added to each
    Fisher. Data options: :class:`~._dataaware.DataOptions` (``samples`` examples per model)."""

    labels: str = "predicted"
    eps: float = 1e-6
    samples: int = 32

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise WeightsmithError(f"fisher option labels='{self.labels}': use one of {LABELS}")
        if not self.eps > 0:
            raise WeightsmithError(f"fisher option eps={self.eps}: must be > 0")
        self.check_data()

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        stores, _, model, tok = open_checked(recipe, "fisher", need_base=False)
        weights = recipe.weights or [1.0] * len(stores)
        if len(weights) != len(stores) or any(w < 0 for w in weights) or not any(weights):
            raise WeightsmithError(f"fisher: weights {weights} must be one non-negative number per model")
        device = torch.device(kw.get("device") or "cpu")
        acc = FisherSums(self.eps, weights)
        for i, (store, source) in enumerate(zip(stores, self.sources(len(stores)), strict=True)):
            load_weights(model, store, str(store.source))
            F = fisher_diagonal(model.to(device), load_batches(tok, source, self), self.labels)
            acc.add(i, F, {n: p.detach() for n, p in model.named_parameters()})
        return write_merged(recipe, stores, acc.merge_one, out, "fisher", dict(kw))


def _log_likelihoods(logits: Tensor, targets: Tensor | None, labels: str) -> list[Tensor]:
    """The log-likelihood(s) whose squared gradients estimate the Fisher of one example: one term, or one per
    class weighted by sqrt(p) (``exact``: Σ_c p_c g_c² = Σ_c (sqrt(p_c) g_c)²)."""
    logp = torch.log_softmax(logits.float(), -1)
    if labels == "predicted":
        return [logp.gather(-1, logp.argmax(-1, keepdim=True).detach()).sum()]
    if labels == "empirical":
        if targets is None:
            raise WeightsmithError(
                "fisher option labels='empirical' needs labelled data (a labelled data set)"
            )
        return [logp.gather(-1, targets[:, None]).sum()]
    if logp.shape[0] != 1:
        raise WeightsmithError(
            "fisher option labels='exact' sums over every class: classifiers only (a language model has one "
            "distribution per token); use predicted or empirical"
        )
    p = logp.detach().exp()[0]
    return [p[c].sqrt() * logp[0, c] for c in range(logp.shape[-1])]


def fisher_diagonal(
    model: nn.Module, batches: Sequence[Batch], labels: str = "predicted"
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` (every floating parameter) as the mean over the examples of
    ``batches`` of squared per-example gradients of the log-likelihood."""
    if labels not in LABELS:
        raise WeightsmithError(f"fisher option labels='{labels}': use one of {LABELS}")
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    F = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    count = 0
    device = next(model.parameters()).device
    try:
        for p in params.values():
            p.requires_grad_(True)
        for one in split_examples(batches):
            one = {k: v.to(device) for k, v in one.items()}
            logits = logits_of(model, one)
            rows, targets = token_logits(logits, one)
            terms = _log_likelihoods(rows, targets, labels)
            for j, term in enumerate(terms):
                grads = torch.autograd.grad(term, list(params.values()), retain_graph=j < len(terms) - 1,
                                            allow_unused=True)  # fmt: skip
                for (n, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        F[n].add_(g.float().square())
            count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if count == 0:
        raise WeightsmithError("fisher: the data gave no example")
    return {n: f.div_(count) for n, f in F.items()}


class FisherSums:
    """``Σ_i w_i F_i theta_i`` and ``Σ_i w_i F_i`` per parameter (``merge_one`` adds ``eps`` to each F_i)."""

    def __init__(self, eps: float, weights: Sequence[float]) -> None:
        self.eps, self.weights = eps, [float(w) for w in weights]
        self.num: dict[str, Tensor] = {}
        self.den: dict[str, Tensor] = {}

    def add(self, index: int, fisher: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        w = self.weights[index]
        for n, f in fisher.items():
            wf = f * w
            num = wf * params[n].float()
            self.num[n] = num if n not in self.num else self.num[n].add_(num)
            self.den[n] = wf if n not in self.den else self.den[n].add_(wf)

    def merge_one(self, name: str, tensors: list[Tensor]) -> Tensor:
        """theta* = (Σ w_i F_i theta_i + eps Σ w_i theta_i) / (Σ w_i F_i + eps Σ w_i); the weighted mean for a
        tensor without a Fisher (a buffer)."""
        wsum = sum((w * t.float() for w, t in zip(self.weights, tensors, strict=True)), torch.zeros(()))
        if name not in self.num:
            return wsum / sum(self.weights)
        dev = tensors[0].device
        num = self.num[name].to(dev) + self.eps * wsum
        return num / (self.den[name].to(dev) + self.eps * sum(self.weights))


def fisher_merge(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Sequence[Batch]],
    config: Fisher = Fisher(),
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """In memory: Fisher merging of ``states`` (state dicts of ``model``'s parameters, or stores), the Fisher
    of each computed on its own ``batches``. ``model`` is the architecture (e.g. an encoder with the task's
    head: pass one module per model by loading ``states`` into a module whose head differs; see
    :func:`fisher_merge_modules`). Returns float32 tensors for ``names`` (default: every floating tensor)."""
    return fisher_merge_modules([model] * len(states), states, batches, config, weights, names)


def fisher_merge_modules(
    models: Sequence[nn.Module],
    states: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Sequence[Batch]],
    config: Fisher = Fisher(),
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """As :func:`fisher_merge`, with a module per model (``models[i]`` computes model ``i``'s likelihood, e.g.
    the shared encoder under task ``i``'s own head); ``states[i]`` are the merged part's tensors, named as in
    ``models[i]`` after ``prefix`` (``"encoder."`` when only the encoder of a classifier is merged)."""
    if not len(models) == len(states) == len(batches):
        raise WeightsmithError(
            f"fisher: {len(models)} models, {len(states)} states, {len(batches)} batch lists"
        )
    acc = FisherSums(config.eps, weights or [1.0] * len(states))
    for i, (model, state, data) in enumerate(
        track(list(zip(models, states, batches, strict=True)), "fisher")
    ):
        load_weights(model.get_submodule(prefix.rstrip(".")) if prefix else model, state)
        F = fisher_diagonal(model, data, config.labels)
        own = {n[len(prefix) :]: p.detach() for n, p in model.named_parameters() if n.startswith(prefix)}
        acc.add(i, {n[len(prefix) :]: f for n, f in F.items() if n.startswith(prefix)}, own)
    return merged_state(states, acc.merge_one, names)
