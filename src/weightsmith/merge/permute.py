"""Permutation specs and weight matching.

Git Re-Basin: Merging Models modulo Permutation Symmetries. Samuel K. Ainsworth, Jonathan Hayase,
Siddhartha Srinivasa, ICLR 2023, arXiv:2209.04836. Weight matching (their Alg. 1) maximises
``sum_l <W_l^A, P_l W_l^B P_{l-1}^T>`` by coordinate descent: each ``P_l`` is a linear assignment problem
with the others fixed, visited in random order until a full sweep improves nothing.

A ``PermutationSpec`` names each permutation and lists the (tensor, axis, group) it moves. ``group`` > 1
permutes contiguous blocks: attention heads (``head_dim`` rows of q/k/v, columns of o), grouped-query
blocks, or the channel-major positions a conv channel occupies after ``flatten``. ``perm[p][i] = j`` means
unit ``j`` of B is moved to position ``i`` (where it meets A's unit ``i``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import WeightsmithError

Perms = dict[str, Tensor]


@dataclass(frozen=True)
class Axis:
    tensor: str
    axis: int
    group: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    perms: dict[str, tuple[Axis, ...]]
    by_tensor: dict[str, tuple[tuple[str, Axis], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, list[tuple[str, Axis]]] = {}
        for p, axes in self.perms.items():
            for ax in axes:
                if any(q == p for q, _ in index.get(ax.tensor, [])):
                    raise WeightsmithError(f"permutation '{p}' moves tensor '{ax.tensor}' on two axes")
                index.setdefault(ax.tensor, []).append((p, ax))
        object.__setattr__(self, "by_tensor", {k: tuple(v) for k, v in index.items()})

    def sizes(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        """Units per permutation, checked for agreement across every tensor it moves."""
        out: dict[str, int] = {}
        for p, axes in self.perms.items():
            for ax in axes:
                if ax.tensor not in state:
                    raise WeightsmithError(f"permutation spec: tensor '{ax.tensor}' not in the weights")
                d = state[ax.tensor].shape[ax.axis]
                if d % ax.group or out.setdefault(p, d // ax.group) != d // ax.group:
                    raise WeightsmithError(
                        f"permutation '{p}': tensor '{ax.tensor}' axis {ax.axis} has size {d}, "
                        f"not {out[p]} units of {ax.group}; the spec does not fit these weights"
                    )
        return out


def _take(w: Tensor, ax: Axis, perm: Tensor) -> Tensor:
    idx = (perm[:, None] * ax.group + torch.arange(ax.group)).reshape(-1)
    return w.index_select(ax.axis, idx.to(w.device))


def permute_tensor(
    spec: PermutationSpec, name: str, w: Tensor, perm: Perms, skip: str | None = None
) -> Tensor:
    for p, ax in spec.by_tensor.get(name, ()):
        if p != skip and p in perm:
            w = _take(w, ax, perm[p])
    return w


def apply_permutation(state: Mapping[str, Tensor], spec: PermutationSpec, perm: Perms) -> dict[str, Tensor]:
    """A new state dict with every tensor the spec names permuted; other tensors are passed through."""
    return {k: permute_tensor(spec, k, v, perm) for k, v in state.items()}


def invert(perm: Perms) -> Perms:
    return {p: torch.argsort(v) for p, v in perm.items()}


def random_permutation(spec: PermutationSpec, state: Mapping[str, Tensor], seed: int = 0) -> Perms:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}


def _rows(w: Tensor, ax: Axis, n: int) -> Tensor:
    return w.movedim(ax.axis, 0).reshape(n, -1).double()


def _cost(
    spec: PermutationSpec, p: str, n: int, a: Mapping[str, Tensor], b: Mapping[str, Tensor], perm: Perms
) -> np.ndarray:
    C = torch.zeros(n, n, dtype=torch.float64)
    for ax in spec.perms[p]:
        wb = permute_tensor(spec, ax.tensor, b[ax.tensor], perm, skip=p)
        C += _rows(a[ax.tensor], ax, n) @ _rows(wb, ax, n).T
    return C.numpy()


def objective(spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], perm: Perms) -> float:
    """``sum <W^A, pi(W^B)>`` over every tensor the spec touches."""
    return sum(
        float((a[t].double() * permute_tensor(spec, t, b[t], perm).double()).sum()) for t in spec.by_tensor
    )


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
    init: Perms | None = None,
) -> Perms:
    """Alg. 1 (PermutationCoordinateDescent): permutations of B's units that best match A's weights."""
    sizes = spec.sizes(a)
    if spec.sizes(b) != sizes:
        raise WeightsmithError(f"models A and B differ in permuted widths: {sizes} vs {spec.sizes(b)}")
    perm = {p: (init[p].clone() if init and p in init else torch.arange(n)) for p, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.perms)
    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(names)):
            p = names[i]
            C = _cost(spec, p, sizes[p], a, b, perm)
            rows, cols = linear_sum_assignment(C, maximize=True)
            old, new = C[np.arange(sizes[p]), perm[p].numpy()].sum(), C[rows, cols].sum()
            if new > old + 1e-12:
                improved = True
                perm[p] = torch.as_tensor(cols, dtype=torch.long)
        if not improved:
            break
    return perm


# ----------------------------------------------------------------------------- spec builders


def _axes(
    names: set[str],
    prefix: str,
    axis: int,
    group: int = 1,
    params: Iterable[str] = ("weight", "bias"),
) -> list[Axis]:
    """``prefix.weight`` on ``axis`` and (for axis 0) every other existing 1-D parameter on axis 0."""
    out = []
    for k in params:
        name = f"{prefix}.{k}"
        if name in names:
            out.append(Axis(name, axis if k == "weight" else 0, group))
    return out


def chain_spec(
    names: Iterable[str],
    layers: list[str],
    norms: Mapping[str, str] | None = None,
    in_groups: Mapping[str, int] | None = None,
) -> PermutationSpec:
    """Hidden units between consecutive layers (Linear or Conv): outputs of ``layers[i]`` (weight rows,
    bias, and its BatchNorm's weight/bias/running stats) and inputs of ``layers[i+1]`` (weight columns,
    in blocks of ``in_groups[layers[i+1]]`` when a flatten sits between them)."""
    names, norms, in_groups = set(names), norms or {}, in_groups or {}
    stats = ("weight", "bias", "running_mean", "running_var")
    perms = {}
    for cur, nxt in zip(layers[:-1], layers[1:], strict=False):
        axes = _axes(names, cur, 0)
        if cur in norms:
            axes += _axes(names, norms[cur], 0, params=stats)
        axes += _axes(names, nxt, 1, in_groups.get(nxt, 1), params=("weight",))
        perms[f"P_{cur}"] = tuple(axes)
    return PermutationSpec(perms)


def mlp_spec(names: Iterable[str], layers: list[str]) -> PermutationSpec:
    return chain_spec(names, layers)


def _layer_prefix(names: set[str], pattern: str) -> tuple[str, int]:  # (prefix, number of layers)
    hits = [m for m in (re.match(pattern, n) for n in names) if m]
    if not hits:
        raise WeightsmithError(
            f"no tensor name matches the layer pattern {pattern!r}; is this the right --spec?"
        )
    return hits[0].group(1), 1 + max(int(m.group(2)) for m in hits)


def bert_spec(names: Iterable[str], num_heads: int, head_dim: int, residual: bool = False) -> PermutationSpec:
    """BERT encoder: per layer a head permutation (q/k/v rows and attention-output columns, ``head_dim``
    each) and an MLP hidden-unit permutation (intermediate rows, output columns). ``residual=True`` also
    permutes the residual stream: embeddings, every LayerNorm, the other axis of every projection; the
    encoder output is then permuted too (``last_hidden_state[..., perm]``)."""
    names = set(names)
    pre, n_layers = _layer_prefix(names, r"(.*)encoder\.layer\.(\d+)\.attention\.self\.query\.weight$")
    perms: dict[str, tuple[Axis, ...]] = {}
    res: list[Axis] = []
    if residual:
        res += [Axis(f"{pre}embeddings.{e}_embeddings.weight", 1) for e in ("word", "position", "token_type")]
        res += _axes(names, f"{pre}embeddings.LayerNorm", 0)
        res += _axes(names, f"{pre}pooler.dense", 1, params=("weight",))
    for i in range(n_layers):
        L = f"{pre}encoder.layer.{i}."
        heads = [
            a for m in ("query", "key", "value") for a in _axes(names, f"{L}attention.self.{m}", 0, head_dim)
        ]
        perms[f"P_{L}heads"] = (*heads, *_axes(names, f"{L}attention.output.dense", 1, head_dim, ("weight",)))
        mlp = _axes(names, f"{L}intermediate.dense", 0) + _axes(
            names, f"{L}output.dense", 1, params=("weight",)
        )
        perms[f"P_{L}mlp"] = tuple(mlp)
        if residual:
            res += [
                Axis(f"{L}{m}.weight", 1)
                for m in (
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                    "intermediate.dense",
                )
            ]
            for m in (
                "attention.output.dense",
                "attention.output.LayerNorm",
                "output.dense",
                "output.LayerNorm",
            ):
                res += _axes(names, f"{L}{m}", 0)
    if residual:
        perms["P_residual"] = tuple(a for a in res if a.tensor in names)
    return PermutationSpec(perms)


def llama_spec(
    names: Iterable[str], num_heads: int, num_kv_heads: int, head_dim: int, residual: bool = False
) -> PermutationSpec:
    """Llama-family decoder: per layer a permutation of key/value heads (with grouped-query attention
    each kv head carries its ``num_heads // num_kv_heads`` query heads along, so q rows and o columns
    move in blocks of that many heads) and an MLP permutation (gate/up rows, down columns). Whole heads
    move, so RoPE's within-head pairing is untouched. ``residual=True`` also permutes the residual stream
    (embeddings, RMSNorms, lm_head columns): the logits are unchanged."""
    names = set(names)
    pre, n_layers = _layer_prefix(names, r"(.*)layers\.(\d+)\.self_attn\.q_proj\.weight$")
    rep = num_heads // num_kv_heads
    perms: dict[str, tuple[Axis, ...]] = {}
    res = [Axis(f"{pre}embed_tokens.weight", 1), Axis(f"{pre}norm.weight", 0), Axis("lm_head.weight", 1)]
    for i in range(n_layers):
        L = f"{pre}layers.{i}."
        kv = _axes(names, f"{L}self_attn.q_proj", 0, rep * head_dim)
        kv += [a for m in ("k_proj", "v_proj") for a in _axes(names, f"{L}self_attn.{m}", 0, head_dim)]
        perms[f"P_{L}heads"] = (*kv, *_axes(names, f"{L}self_attn.o_proj", 1, rep * head_dim, ("weight",)))
        mlp = _axes(names, f"{L}mlp.gate_proj", 0) + _axes(names, f"{L}mlp.up_proj", 0)
        perms[f"P_{L}mlp"] = (*mlp, *_axes(names, f"{L}mlp.down_proj", 1, params=("weight",)))
        res += [Axis(f"{L}self_attn.{m}.weight", 1) for m in ("q_proj", "k_proj", "v_proj")]
        res += [Axis(f"{L}mlp.{m}.weight", 1) for m in ("gate_proj", "up_proj")]
        res += _axes(names, f"{L}self_attn.o_proj", 0) + _axes(names, f"{L}mlp.down_proj", 0)
        res += [Axis(f"{L}{m}.weight", 0) for m in ("input_layernorm", "post_attention_layernorm")]
    if residual:
        perms["P_residual"] = tuple(a for a in res if a.tensor in names)
    return PermutationSpec(perms)


def spec_from_config(
    names: Iterable[str], config: Mapping[str, Any], residual: bool = False
) -> PermutationSpec:
    """A transformer spec from a Hugging Face ``config.json`` (BERT-like or Llama-like)."""
    mt, heads, hidden = (
        str(config.get("model_type", "")),
        int(config["num_attention_heads"]),
        int(config["hidden_size"]),
    )
    head_dim = int(config.get("head_dim") or hidden // heads)
    if mt in ("bert", "roberta", "xlm-roberta", "electra"):
        return bert_spec(names, heads, head_dim, residual)
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        kv = int(config.get("num_key_value_heads") or heads)
        return llama_spec(names, heads, kv, head_dim, residual)
    raise WeightsmithError(f"no permutation spec for model_type '{mt}'; supported: bert-like and llama-like")


def infer_chain_spec(state: Mapping[str, Tensor]) -> PermutationSpec:
    """A chain spec read off a plain feed-forward state dict (MLP, or convs with BatchNorm then linears):
    layers are the modules with a matrix/kernel ``weight`` in state order, a module with
    ``running_mean`` after a layer is its norm, and a flatten is detected where a layer's input width is
    a multiple of the previous layer's output width."""
    layers: list[str] = []
    norms: dict[str, str] = {}
    for name, t in state.items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and t.dim() >= 2 and mod not in layers:
            layers.append(mod)
        elif name.endswith(".running_mean") and layers and layers[-1] not in norms:
            norms[layers[-1]] = mod
    if len(layers) < 2:
        raise WeightsmithError("cannot infer a permutation spec: fewer than two weight layers found")
    groups = {}
    for cur, nxt in zip(layers[:-1], layers[1:], strict=False):
        n_out, n_in = state[f"{cur}.weight"].shape[0], state[f"{nxt}.weight"].shape[1]
        if n_in % n_out:
            raise WeightsmithError(f"cannot infer a spec: '{nxt}' takes {n_in} inputs, '{cur}' gives {n_out}")
        if n_in != n_out:
            groups[nxt] = n_in // n_out
    return chain_spec(state, layers, norms, groups)
