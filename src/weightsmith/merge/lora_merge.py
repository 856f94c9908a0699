"""Exact merging of LoRA adapters in weight space.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685)
adds dW_i = s_i B_i A_i with s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA). A weighted merge
in weight space is sum_i w_i dW_i. Two exact ways to hold it:

- ``concat``: A = [A_1; ...; A_n], B = [w_1 s_1 B_1, ..., w_n s_n B_n]; then B A = sum_i w_i s_i B_i A_i
  exactly, at rank sum_i r_i (a LoRA adapter again, scale 1).
- ``dense``: the full matrices sum_i w_i dW_i added to the base weights (a merged model).

Combining the factors separately (A = sum_i sqrt(w_i) A_i, B = sum_i sqrt(w_i) B_i, as PEFT's
``add_weighted_adapter(combination_type="linear")`` does) introduces cross terms B_i A_j and is not the
weighted sum of the updates.

The adapters are read with the one PEFT reader (``weightsmith.adapters._peft.read_peft``), so a folder
comes in whole or the merge fails naming what it cannot take. Besides the LoRA factors a folder may carry
embedding LoRA (merged like any other weight), ``lora_bias`` (a bias on B: in ``dense`` its
``w_i s_i b_i`` are added to the base bias, in ``concat`` they are summed into the new B's bias), and
plain model tensors (``modules_to_save`` heads, ``bias="all"``/``"lora_only"`` biases). Those are full
tensors, so ``dense`` merges them as task vectors, ``θ0 + sum_i w_i (θ_i − θ0)`` (the trained tensor
itself for one adapter of weight 1); ``concat`` has no base to subtract and copies them only when that
is exact (one adapter carries them, or all carriers hold the same tensor, with weights summing to 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..adapters._peft import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, read_peft, resolve_patterns, split_tensors
from ..config import register_config
from ..errors import WeightsmithError
from ..staging import staged_dir
from ..store import WeightStore
from . import _core, inputs

if TYPE_CHECKING:
    from .recipe import Recipe


@register_config("lora", kind="merge")
class LoRAMerge:
    """``mode``: ``concat`` (a rank-sum adapter, exact) or ``dense`` (merged into the base, exact)."""

    mode: str = "concat"

    def __post_init__(self) -> None:
        if self.mode not in ("concat", "dense"):
            raise WeightsmithError(f"lora merge mode must be 'concat' or 'dense' (got '{self.mode}')")

    def run(self, recipe: Recipe, out: Path, **kw: Any) -> Path:
        """Run a recipe whose models are PEFT LoRA folders (or runs holding one)."""
        models = [Path(m.source) if isinstance(m, WeightStore) else m for m in recipe.models]
        return merge_loras(models, out, recipe.weights, self.mode, recipe.base, **kw)


@dataclass(frozen=True)
class LoRAFactors:
    """One module's update ``scale * B @ A`` (A: r x in, B: out x r)."""

    A: Tensor
    B: Tensor
    scale: float

    def delta(self) -> Tensor:
        return self.scale * (self.B.float() @ self.A.float())


def concat_lora(factors: Sequence[LoRAFactors], weights: Sequence[float]) -> LoRAFactors:
    """Rank concatenation: ``B @ A == sum_i w_i s_i B_i A_i`` exactly."""
    A = torch.cat([f.A.float() for f in factors], dim=0)
    B = torch.cat([w * f.scale * f.B.float() for f, w in zip(factors, weights, strict=True)], dim=1)
    return LoRAFactors(A, B, 1.0)


def dense_lora(factors: Sequence[LoRAFactors], weights: Sequence[float]) -> Tensor:
    """The merged dense update sum_i w_i s_i B_i A_i."""
    return sum((w * f.delta() for f, w in zip(factors, weights, strict=True)), torch.zeros(()))


@dataclass
class LoRAFolder:
    """A PEFT LoRA adapter folder: per-weight factors (in the stored weight's orientation) and extras."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoRAFactors]  # "<module>.weight" -> factors of the update of that tensor
    embeddings: set[str] = field(default_factory=set)  # weights among ``modules`` that are embeddings
    lora_bias: dict[str, Tensor] = field(default_factory=dict)  # "<module>.bias" -> s * b
    base: dict[str, Tensor] = field(default_factory=dict)  # full model tensors (heads, biases)
    source: dict[str, str] = field(default_factory=dict)  # base key -> key in the adapter file


def load_adapter(path: str | Path) -> LoRAFolder:
    """Read a PEFT LoRA folder (or a weightsmith run holding one) whole: every tensor has a place."""
    folder = read_peft(path)
    cfg, where = folder.config, folder.weights
    if folder.peft_type != "LORA" or cfg.get("use_dora"):
        raise WeightsmithError(
            f"{folder.path}: only plain LoRA adapters can be merged exactly (got {folder.peft_type}"
            f"{', DoRA' if cfg.get('use_dora') else ''})"
        )
    parts = split_tensors(folder, lambda module, suffix: suffix.startswith("lora_"))
    if parts.shared:
        raise WeightsmithError(
            f"{where}: tensor '{parts.source[next(iter(parts.shared))]}' is not a LoRA tensor"
        )
    ad = LoRAFolder(folder.path, cfg, {})
    for module, state in parts.modules.items():
        resolved = resolve_patterns(cfg, module)
        r, alpha = int(resolved["r"]), float(resolved.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        state = dict(state)
        if "lora_embedding_A" in state and "lora_embedding_B" in state:
            # PEFT: ΔW [num_embeddings, dim] = s (B_e A_e)ᵀ = s A_eᵀ B_eᵀ
            A_e, B_e = state.pop("lora_embedding_A"), state.pop("lora_embedding_B")
            ad.modules[f"{module}.weight"] = LoRAFactors(B_e.mT, A_e.mT, scale)
            ad.embeddings.add(f"{module}.weight")
        elif "lora_A.weight" in state and "lora_B.weight" in state:
            A, B = state.pop("lora_A.weight"), state.pop("lora_B.weight")
            if cfg.get("fan_in_fan_out"):
                A, B = B.mT, A.mT  # Conv1D stores W transposed: dW^T = A^T B^T
            ad.modules[f"{module}.weight"] = LoRAFactors(A, B, scale)
        if "lora_B.bias" in state:
            ad.lora_bias[f"{module}.bias"] = scale * state.pop("lora_B.bias").float()
        if state:
            key = parts.source[f"{module}.{next(iter(state))}"]
            raise WeightsmithError(
                f"{where}: tensor '{key}' has no place in a LoRA merge (no matching A/B pair?)"
            )
    if not ad.modules:
        raise WeightsmithError(f"{where}: no lora_A/lora_B tensors found")
    ad.base, ad.source = parts.base, {k: parts.source[k] for k in parts.base}
    return ad


def merge_loras(
    adapters: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    mode: str = "concat",
    base: str | Path | WeightStore | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """``concat``: write one PEFT adapter (rank = sum of ranks) whose update is exactly
    sum_i w_i dW_i. ``dense``: write the base model with sum_i w_i dW_i added (needs ``base``)."""
    LoRAMerge(mode)
    ads = [load_adapter(a) for a in adapters]
    w = [float(x) for x in (weights if weights is not None else [1.0] * len(ads))]
    if len(w) != len(ads):
        raise WeightsmithError(f"{len(w)} weights for {len(ads)} adapters; give one weight per adapter")
    names = sorted(set().union(*(a.modules for a in ads)))
    for a in ads:
        for n in names:
            f = a.modules.get(n)
            ref = next(x.modules[n] for x in ads if n in x.modules)
            if f is not None and (f.A.shape[1], f.B.shape[0]) != (ref.A.shape[1], ref.B.shape[0]):
                raise WeightsmithError(
                    f"{a.path}: module '{n}' is {f.B.shape[0]}x{f.A.shape[1]}, another "
                    f"adapter has {ref.B.shape[0]}x{ref.A.shape[1]}: different base models"
                )
            if f is not None and (n in a.embeddings) != any(n in x.embeddings for x in ads if n in x.modules):
                raise WeightsmithError(
                    f"{a.path}: module '{n}' is an embedding in one adapter, not in another"
                )

    def members(n: str) -> tuple[list[LoRAFactors], list[float]]:
        pairs = [(a.modules[n], wi) for a, wi in zip(ads, w, strict=True) if n in a.modules]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    if mode == "dense":
        if base is None:
            raise WeightsmithError("lora merge mode 'dense' needs the base model (base: ...)")
        return _dense(ads, w, names, members, base, out, dtype, device, force, shard_size, extra_files)
    return _write_adapter(
        ads, w, names, {n: concat_lora(*members(n)) for n in names}, out, force, extra_files
    )


def _dense(
    ads: Sequence[LoRAFolder],
    w: Sequence[float],
    names: list[str],
    members: Any,
    base: str | Path | WeightStore,
    out: str | Path,
    dtype: str | torch.dtype | None,
    device: str | None,
    force: bool,
    shard_size: str | int,
    extra_files: Mapping[str, str] | None,
) -> Path:
    b = inputs.open_input(base)
    bias_keys = sorted(set().union(*(a.lora_bias for a in ads)))
    full_keys = sorted(set().union(*(a.base for a in ads)))
    for key in [*names, *bias_keys, *full_keys]:
        if key not in b:
            who = next(a for a in ads if key in a.modules or key in a.lora_bias or key in a.base)
            what = (
                "a lora_bias needs the layer's bias in the base"
                if key in bias_keys
                else "a modules_to_save/bias tensor of the adapter; for a classification head use "
                "'weightsmith export ADAPTER --base MODEL --merged OUT', which builds the model with its head"
                if key in full_keys
                else "an adapted weight"
            )
            raise WeightsmithError(f"{b.source} has no tensor '{key}' ({what}, from {who.path})")

    def merge_one(n: str, ts: list[Tensor]) -> Tensor:
        t = ts[0].float()
        if n in names:
            t = t + dense_lora(*members(n)).to(t.device)
        for a, wi in zip(ads, w, strict=True):
            if n in a.lora_bias:
                t = t + wi * a.lora_bias[n].to(t.device)
            if n in a.base:
                t = t + wi * (a.base[n].float().to(t.device) - ts[0].float())
        return t

    return _core.write_model(
        [b],
        merge_one,
        out,
        merged={*names, *bias_keys, *full_keys},
        dtype=_core.parse_dtype(dtype),
        device=device,
        force=force,
        shard_bytes=_core.parse_size(shard_size),
        copy_from=inputs.source_dir(base),
        extra_files=extra_files,
    )


def _full_tensors(ads: Sequence[LoRAFolder], w: Sequence[float]) -> dict[str, Tensor]:
    """Plain model tensors of a concat merge, under the adapter file's own key names; only when exact."""
    out: dict[str, Tensor] = {}
    for key in sorted(set().union(*(a.base for a in ads))):
        carriers = [(a, wi) for a, wi in zip(ads, w, strict=True) if key in a.base]
        first = carriers[0][0].base[key]
        same = all(torch.equal(a.base[key], first) for a, _ in carriers)
        if not same or abs(sum(wi for _, wi in carriers) - 1.0) > 1e-9:
            names = ", ".join(str(a.path) for a, _ in carriers)
            raise WeightsmithError(
                f"'{key}' (modules_to_save or a trained bias) is a full tensor in {names}; merging it with "
                "these weights needs the base model: use mode dense (base: ...)"
            )
        out[carriers[0][0].source[key]] = first
    return out


def _write_adapter(
    ads: Sequence[LoRAFolder],
    w: Sequence[float],
    names: list[str],
    merged: Mapping[str, LoRAFactors],
    out: str | Path,
    force: bool,
    extra: Mapping[str, str] | None,
) -> Path:
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    fan = bool(ads[0].config.get("fan_in_fan_out"))
    if any(bool(a.config.get("fan_in_fan_out")) != fan for a in ads):
        raise WeightsmithError("the adapters disagree on fan_in_fan_out: they were made for different models")
    embeddings = set().union(*(a.embeddings for a in ads))
    for n in names:
        f, module = merged[n], n.removesuffix(".weight")
        if n in embeddings:
            state[f"{PREFIX}{module}.lora_embedding_A"] = f.B.mT.contiguous()
            state[f"{PREFIX}{module}.lora_embedding_B"] = f.A.mT.contiguous()
        else:
            A, B = (f.B.mT, f.A.mT) if fan else (f.A, f.B)
            state[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
            state[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
        ranks[module] = int(f.A.shape[0])
    biases: dict[str, Tensor] = {}
    for a, wi in zip(ads, w, strict=True):
        for key, sb in a.lora_bias.items():
            biases[key] = biases.get(key, torch.zeros_like(sb)) + wi * sb  # the new scale is 1
    for key, b in biases.items():
        module = key.removesuffix(".bias")
        if module not in ranks:
            raise WeightsmithError(f"lora_bias '{key}' has no LoRA A/B pair in the adapters")
        state[f"{PREFIX}{module}.lora_B.bias"] = b.contiguous()
    if biases and embeddings:
        raise WeightsmithError(
            f"the merged adapter would have lora_bias and embedding LoRA ('{sorted(embeddings)[0]}'), which "
            "PEFT cannot load together (no lora_bias on embeddings); use mode dense (base: ...)"
        )
    state.update(_full_tensors(ads, w))
    r = max(ranks.values())
    carriers = [a.config for a in ads if a.base]
    cfg = {
        **ads[0].config,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": bool(biases),
        "rank_pattern": {_anchored(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {_anchored(m): k for m, k in ranks.items() if k != r},
        "target_modules": sorted(ranks),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": sorted({m for c in carriers for m in c.get("modules_to_save") or []}) or None,
        "bias": next((c.get("bias") for c in carriers if c.get("bias") not in (None, "none")), "none"),
    }
    with staged_dir(out, force) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"}
        )
        (tmp / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        for fname, text in (extra or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
    return Path(out)


def _anchored(module: str) -> str:
    # PEFT matches pattern keys as regexes on the module name's suffix: anchor full paths
    return "^" + module.replace(".", r"\.") + "$"
