"""Extract a PEFT LoRA adapter from a fine-tune: the truncated SVD of each weight's task vector.

For a ``Linear`` weight the update ``ΔW = W_tuned − W_base`` [out, in] is replaced by its best rank-``r``
approximation (Eckart–Young–Mirsky; "The approximation of one matrix by another of lower rank", Eckart and
Young, 1936): ``ΔW ≈ U_r diag(S_r) V_rᵀ``, written as the LoRA factors of Hu et al. ("LoRA: Low-Rank
Adaptation of Large Language Models", 2022), ``ΔW = s B A`` with

    B = U_r diag(√S_r)   [out, r],     A = diag(√S_r) V_rᵀ   [r, in],     s = lora_alpha / r = 1.

The Frobenius error of the truncation is ``sqrt(Σ_{i>r} S_i²)``: zero when the true update has rank ≤ r.
The conventions are those of ``mergekit-extract-lora`` (mergekit 0.1.5), so its adapters and ours agree
up to the signs of singular vectors (their products ``B A`` agree):

- embeddings: kept whole in ``modules_to_save`` by default; with ``embed_lora`` an input embedding
  [vocab, dim] becomes PEFT embedding LoRA from the SVD of ``ΔWᵀ`` (``lora_embedding_A`` [r, vocab],
  ``lora_embedding_B`` [dim, r]), and the output embedding (``lm_head``) a Linear LoRA;
- tensors that are not a matrix of a Linear (norms, 3-D/4-D weights) are kept whole in ``modules_to_save``;
- a Linear's bias update goes to ``lora_B.bias`` (PEFT's ``lora_bias``), which PEFT adds at scale 1;
- ``sv_epsilon`` drops singular values at or below it (a module's rank may then be smaller than ``r``:
  ``rank_pattern`` / ``alpha_pattern`` hold those ranks).

Unlike mergekit, a tensor that did not change is left out of the adapter, ``modules_to_save`` holds full
module paths (PEFT would otherwise wrap every layer's module of that name and miss their tensors), a
Linear's bias update sets ``lora_bias`` (without it PEFT drops ``lora_B.bias``), and a rank larger than a
matrix side is an error naming the tensor (mergekit lowers it silently).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..adapters._peft import PEFT_CONFIG, PEFT_FORMAT_VERSION, PEFT_WEIGHTS, PREFIX
from ..errors import ShapeMismatchError, WeightsmithError
from ..execute import stream
from ..linalg import svd
from ..staging import check_output, staged_dir
from ..store import WeightStore
from . import inputs

OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
_INPUT_EMBEDDINGS = ("wte", "wpe", "shared")


@dataclass
class Extracted:
    """What :func:`extract_lora` wrote: per-tensor rank and relative Frobenius error of the truncation
    (``‖ΔW − B A‖ / ‖ΔW‖``; 0 for tensors kept whole), and the tensors kept whole."""

    out: Path
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)


def is_input_embedding(weight_name: str) -> bool:
    """``model.embed_tokens.weight``, ``embeddings.word_embeddings.weight``, GPT-2's ``wte`` / ``wpe``."""
    module = weight_name.rsplit(".", 2)[-2] if weight_name.count(".") else ""
    return "embed" in module and module not in OUTPUT_EMBEDDINGS or module in _INPUT_EMBEDDINGS


def is_output_embedding(weight_name: str) -> bool:
    return weight_name.rsplit(".", 2)[-2] in OUTPUT_EMBEDDINGS if weight_name.count(".") else False


def _factors(delta: Tensor, rank: int, sv_epsilon: float) -> tuple[Tensor, Tensor, float]:
    """``(B, A, relative error)`` of the rank-``rank`` truncated SVD of ``delta`` (float32 math)."""
    U, S, Vh = svd(delta)
    r = rank
    if sv_epsilon > 0:
        r = max(1, min(r, int((sv_epsilon < S).sum())))
    root = S[:r].sqrt()
    B, A = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]
    total = float(S.square().sum())
    rel = (float(S[r:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return B, A, rel


def _weights(base: WeightStore, tuned: WeightStore) -> list[str]:
    """The floating-point tensors of ``base`` (in its order), checked to be those of ``tuned`` with equal
    shapes; integer buffers (``position_ids``), which one checkpoint may hold and not the other, are left
    out."""
    floats = [{n for n in s if s.meta(n).dtype.is_floating_point} for s in (base, tuned)]
    for have, lack, extra in ((base, tuned, floats[0] - floats[1]), (tuned, base, floats[1] - floats[0])):
        if extra:
            raise WeightsmithError(
                f"{lack.source} lacks {len(extra)} tensor(s) that {have.source} has, e.g. '{min(extra)}'"
            )
    names = [n for n in base if n in floats[0]]
    for n in names:
        if base.meta(n).shape != tuned.meta(n).shape:
            raise ShapeMismatchError(
                n, base.meta(n).shape, tuned.meta(n).shape, f"{base.source} vs {tuned.source}"
            )
    return names


def extract_lora(
    base: str | Path | WeightStore,
    tuned: str | Path | WeightStore,
    rank: int,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str | torch.device | None = "cpu",
    embed_lora: bool = False,
    sv_epsilon: float = 0.0,
    modules_to_save: Sequence[str] = (),
) -> Extracted:
    """Write a PEFT LoRA adapter folder at ``out`` that turns ``base`` into (approximately) ``tuned``.

    Every 2-D ``.weight`` of a Linear (or, with ``embed_lora``, of an embedding) whose value changed is
    decomposed at ``rank``; other changed tensors (and modules named in ``modules_to_save``, by full path
    or last name component) are saved whole. Tensors are streamed one at a time through the shared executor
    (``weightsmith.execute.stream``) on ``device``; nothing is written unless all of them succeed.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise WeightsmithError(f"--rank must be a positive integer (got {rank!r})")
    if sv_epsilon < 0:
        raise WeightsmithError(f"--sv-epsilon must be >= 0 (got {sv_epsilon})")
    target = check_output(out, force, directory=True)
    b_store, t_store = inputs.open_input(base), inputs.open_input(tuned)
    names = _weights(b_store, t_store)
    keep_whole = set(modules_to_save)

    def module_of(name: str) -> str:
        return name.rsplit(".", 1)[0]

    def whole(module: str) -> bool:
        return module in keep_whole or module.rsplit(".", 1)[-1] in keep_whole

    def decomposed(name: str) -> str | None:
        """ "linear", "embedding" or None (kept whole) for a ``.weight``."""
        shape = b_store.meta(name).shape
        if not name.endswith(".weight") or len(shape) != 2 or whole(module_of(name)):
            return None
        if is_input_embedding(name):
            return "embedding" if embed_lora else None
        if is_output_embedding(name) and not embed_lora:
            return None
        return "linear"

    kinds = {n: decomposed(n) for n in names}
    lora_modules = {module_of(n) for n, k in kinds.items() if k is not None}
    for n, k in kinds.items():
        if k is not None and rank > min(b_store.meta(n).shape):
            raise WeightsmithError(
                f"--rank {rank} is larger than a side of tensor '{n}' {tuple(b_store.meta(n).shape)}; "
                f"use --rank <= {min(b_store.meta(n).shape)} (or keep that module whole: --save-module)"
            )

    def work(name: str, tensors: list[Tensor]) -> tuple[str, Any] | None:
        b, t = tensors
        if torch.equal(b, t):
            return None
        delta = t.float() - b.float()
        kind = kinds[name]
        module = module_of(name)
        if kind is None:
            if name.endswith(".bias") and module in lora_modules:
                return "bias", delta.to(t.dtype).cpu()
            return "whole", t.cpu()
        if kind == "embedding":
            B, A, rel = _factors(delta.T, rank, sv_epsilon)
            return "embedding", (A.to(t.dtype).cpu(), B.to(t.dtype).cpu(), rel)
        B, A, rel = _factors(delta, rank, sv_epsilon)
        return "linear", (A.to(t.dtype).cpu(), B.to(t.dtype).cpu(), rel)

    results = stream(
        [b_store, t_store], work, names=names, device=device, description="extract-lora", verb="decomposing"
    )
    tensors: dict[str, Tensor] = {}
    done = Extracted(target)
    saved_keys: set[str] = set()
    biases: dict[str, Tensor] = {}
    for name, res in results.items():
        if res is None:
            continue
        kind, value = res
        module = module_of(name)
        if kind == "whole":
            tensors[f"{PREFIX}{name}"] = value
            saved_keys.add(module)
            done.saved.append(name)
        elif kind == "bias":
            biases[module] = value
        else:
            A, B, rel = value
            if kind == "embedding":
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = A
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = B
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = A
                tensors[f"{PREFIX}{module}.lora_B.weight"] = B
            done.ranks[name], done.errors[name] = int(A.shape[0]), rel
    # a changed bias whose weight did not change: its module is not a LoRA target, so keep the bias whole
    targets = {module_of(n) for n in done.ranks}
    for module, delta in biases.items():
        if module in targets:
            tensors[f"{PREFIX}{module}.lora_B.bias"] = delta
        else:
            tensors[f"{PREFIX}{module}.bias"] = t_store[f"{module}.bias"].cpu()
            saved_keys.add(module)
            done.saved.append(f"{module}.bias")
    # PEFT replaces a modules_to_save module whole: every tensor of it must be in the folder
    for name in names:
        if module_of(name) in saved_keys and f"{PREFIX}{name}" not in tensors:
            tensors[f"{PREFIX}{name}"] = t_store[name].cpu()
            done.saved.append(name)
    if not done.ranks and not done.saved:
        raise WeightsmithError(
            f"{t_store.source} and {b_store.source} hold the same weights: nothing to extract"
        )
    config = _config(done, sorted(targets), sorted(saved_keys), b_store, any(m in targets for m in biases))
    with staged_dir(target, force) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / PEFT_WEIGHTS), {"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return done


def _config(
    done: Extracted, targets: list[str], saved: list[str], base: WeightStore, lora_bias: bool
) -> dict[str, Any]:
    """PEFT's LoRA config: ``r`` the largest rank, ``lora_alpha = r`` (scale 1) and per-module
    ``rank_pattern`` / ``alpha_pattern`` for the modules of smaller rank (anchored full paths)."""
    ranks = {name.rsplit(".", 1)[0]: r for name, r in done.ranks.items()}
    top = max(ranks.values(), default=1)
    other = {"^" + re.escape(m) + "$": r for m, r in ranks.items() if r != top}
    src = base.source
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": src if src and not src.startswith("<") else None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "peft_version": PEFT_FORMAT_VERSION,
    }
