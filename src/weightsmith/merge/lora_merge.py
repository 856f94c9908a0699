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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..store import atomic_replace, prepare_output
from . import _core
from .recipe import Recipe, register_runner

PREFIX = "base_model.model."


@register_config("lora", kind="merge")
@dataclass(frozen=True)
class LoRAMerge:
    """``mode``: ``concat`` (a rank-sum adapter, exact) or ``dense`` (merged into the base, exact)."""

    mode: str = "concat"

    def __post_init__(self) -> None:
        if self.mode not in ("concat", "dense"):
            raise WeightsmithError(f"lora merge mode must be 'concat' or 'dense' (got '{self.mode}')")


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
class Adapter:
    """A PEFT LoRA adapter directory: per-module factors keyed by the base weight's name."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoRAFactors]


def _pattern(table: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in table.items():  # PEFT matches rank/alpha patterns as regex on the module path
        if re.search(rf"(^|\.){key}$", module):
            return value
    return default


def load_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise WeightsmithError(
            f"{path}: not a PEFT LoRA adapter (needs adapter_config.json and adapter_model.safetensors)"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise WeightsmithError(
            f"{path}: only plain LoRA adapters can be merged exactly (got {cfg.get('peft_type')}"
            f"{', DoRA' if cfg.get('use_dora') else ''})"
        )
    state = load_file(str(weights))
    modules: dict[str, LoRAFactors] = {}
    for key, A in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(PREFIX)
        B = state.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise WeightsmithError(f"{path}: '{key}' has no matching lora_B tensor")
        r = int(_pattern(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if cfg.get("fan_in_fan_out"):
            A, B = B.mT, A.mT  # Conv1D stores W transposed: dW^T = A^T B^T
        modules[module + ".weight"] = LoRAFactors(A, B, scale)
    if not modules:
        raise WeightsmithError(f"{path}: no lora_A/lora_B tensors found")
    return Adapter(path, cfg, modules)


def merge_adapters(
    adapters: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    mode: str = "concat",
    base: str | Path | None = None,
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

    def members(n: str) -> tuple[list[LoRAFactors], list[float]]:
        pairs = [(a.modules[n], wi) for a, wi in zip(ads, w, strict=True) if n in a.modules]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    if mode == "dense":
        if base is None:
            raise WeightsmithError("lora merge mode 'dense' needs the base model (base: ...)")
        b = _core.open_input(base)
        missing = [n for n in names if n not in b]
        if missing:
            raise WeightsmithError(
                f"{b.source} has no weight for adapter module(s): {', '.join(missing[:5])}"
            )
        return _core.write_model(
            [b],
            lambda n, ts: ts[0].float() + dense_lora(*members(n)).to(ts[0].device),
            out,
            merged=set(names),
            dtype=_core.parse_dtype(dtype),
            device=device,
            force=force,
            shard_bytes=_core.parse_size(shard_size),
            copy_from=_core.source_dir(base),
            extra_files=extra_files,
        )
    return _write_adapter(ads, names, {n: concat_lora(*members(n)) for n in names}, out, force, extra_files)


def _write_adapter(
    ads: Sequence[Adapter],
    names: list[str],
    merged: Mapping[str, LoRAFactors],
    out: str | Path,
    force: bool,
    extra: Mapping[str, str] | None,
) -> Path:
    from safetensors.torch import save_file

    out = prepare_output(out, force)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    state, ranks = {}, {}
    fan = bool(ads[0].config.get("fan_in_fan_out"))
    for n in names:
        f, module = merged[n], n.removesuffix(".weight")
        A, B = (f.B.mT, f.A.mT) if fan else (f.A, f.B)
        state[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
        state[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
        ranks[module] = int(f.A.shape[0])
    r = max(ranks.values())
    cfg = {
        **ads[0].config,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
    }
    try:
        save_file(state, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        for fname, text in (extra or {}).items():
            (tmp / fname).write_text(text)
        atomic_replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WeightsmithError(f"writing {out} failed ({exc.strerror}); nothing was left behind") from exc
        raise
    return out


@register_runner(LoRAMerge)
def _run(recipe: Recipe, out: Path, **kw: Any) -> Path:
    return merge_adapters(recipe.models, out, recipe.weights, recipe.method.mode, recipe.base, **kw)
