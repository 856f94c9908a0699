"""Mixture-of-experts assembly from dense models (mergekit-moe's YAML, Mixtral output).

Each expert is a dense Llama/Mistral fine-tune of one base. The output is a Mixtral model (Jiang et al.,
"Mixtral of Experts", arXiv:2401.04088, 2024): attention, norms, embeddings and head come from the base;
layer l's MLP becomes a sparse block whose expert e is expert model e's MLP of layer l, and whose router
``W_g`` (one row per expert) picks the top ``experts_per_token`` experts by ``softmax(W_g h)``
(Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer",
ICLR 2017). The router rows are set as mergekit-moe sets them (Goddard et al., "Arcee's MergeKit",
EMNLP 2024 Industry, arXiv:2403.13257), by ``gate_mode``:

- ``hidden`` / ``hidden_avg``: row e of layer l is the base model's hidden state entering layer l for the
  expert's ``positive_prompts`` (the last token, or the mean over positions for ``hidden_avg``), averaged
  over prompts, minus the same for its ``negative_prompts``, normalised to unit length; so a token whose
  hidden state resembles an expert's prompts routes to it. The prompts are tokenised with the base's own
  tokenizer (BOS prepended, left-padded with BOS), and the base runs in bf16 as in mergekit.
- ``cheap_embed``: the normalised sum of the prompts' token embeddings, the same for every layer.
- ``random``: standard normal rows; ``uniform_random``: U(-1/sqrt(d), 1/sqrt(d)) (torch's Linear init).

``noise_scale`` adds Gaussian noise to an expert's MLP weights, ``residual_scale`` scales its
``down_proj``. Random draws come from a generator seeded by ``seed`` (mergekit uses torch's global RNG;
with the same seed the draws are the same, in the same order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..progress import log, track
from ..staging import check_output
from ..store import ShardWriter, WeightStore
from . import _core, inputs

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
MLP = (("gate_proj", "gate"), ("down_proj", "down"), ("up_proj", "up"))  # mergekit-moe's (noise) order


@dataclass(frozen=True)
class Expert:
    model: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoEConfig:
    """A mergekit-moe YAML, checked."""

    base: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2


def _prompts(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise WeightsmithError(f"{where}: {key} must be a list of strings (got {str(value)[:80]})")
    return tuple(value)


def _scale(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WeightsmithError(f"{where}: {key} must be a finite number (got {value!r:.40})")
    return float(value)


def parse(data: Any, where: str, allow_all_same: bool = False) -> MoEConfig:
    """A mergekit-moe config (a parsed YAML mapping), checked as mergekit-moe checks it."""
    if not isinstance(data, Mapping):
        raise WeightsmithError(f"{where}: a MoE config is a YAML mapping (got {str(data)[:80]})")
    unknown = sorted(str(k) for k in set(data) - KEYS)
    if unknown:
        raise WeightsmithError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(KEYS))}")
    if data.get("shared_experts"):
        raise WeightsmithError(
            f"{where}: shared_experts need a Qwen2-MoE/DeepSeek output; only Mixtral is built"
        )
    arch = data.get("architecture")
    if arch is not None and str(arch).lower() != "mixtral":
        raise WeightsmithError(f"{where}: architecture {arch!r:.40}: only 'mixtral' output is supported")
    base = data.get("base_model")
    if not isinstance(base, str) or not base:
        raise WeightsmithError(f"{where}: base_model must be a model path or name (got {base!r:.80})")
    raw = data.get("experts")
    if not isinstance(raw, list) or not raw:
        raise WeightsmithError(f"{where}: experts must be a non-empty list of {{source_model: ...}}")
    experts = []
    for i, e in enumerate(raw):
        key = f"experts[{i}]"
        if not isinstance(e, Mapping) or not isinstance(e.get("source_model"), str):
            raise WeightsmithError(f"{where}: {key} needs 'source_model: MODEL' (got {str(e)[:80]})")
        extra = sorted(str(k) for k in set(e) - EXPERT_KEYS)
        if extra:
            raise WeightsmithError(f"{where}: {key} has unknown key(s) {extra}; known: {sorted(EXPERT_KEYS)}")
        experts.append(
            Expert(
                e["source_model"],
                _prompts(e.get("positive_prompts"), f"{key}.positive_prompts", where),
                _prompts(e.get("negative_prompts"), f"{key}.negative_prompts", where),
                _scale(e.get("noise_scale"), f"{key}.noise_scale", where),
                _scale(e.get("residual_scale"), f"{key}.residual_scale", where),
            )
        )
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise WeightsmithError(f"{where}: gate_mode {mode!r:.40} is not one of {', '.join(GATE_MODES)}")
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise WeightsmithError(f"{where}: experts_per_token must be an integer >= 1 (got {k!r:.40})")
    if len(experts) < k:
        raise WeightsmithError(f"{where}: experts_per_token is {k} but there are only {len(experts)} experts")
    dtype = data.get("dtype")
    if dtype is not None:
        _core.parse_dtype(dtype)
    if mode not in ("random", "uniform_random"):
        for i, e in enumerate(experts):
            if not e.positive:
                raise WeightsmithError(
                    f"{where}: experts[{i}].positive_prompts is empty; gate_mode {mode} needs it"
                )
        if len({(e.positive, e.negative) for e in experts}) == 1 and len(experts) > 1:
            raise WeightsmithError(
                f"{where}: every expert has the same positive_prompts and negative_prompts; the router could "
                "not tell them apart (give each expert prompts of what it should receive)"
            )
    if not allow_all_same and len(experts) > 1 and len({e.model for e in experts}) == 1:
        raise WeightsmithError(
            f"{where}: every expert is {experts[0].model}: the MoE would compute what one expert computes at "
            "more cost (pass --allow-all-same if you will train it afterwards)"
        )
    return MoEConfig(base, tuple(experts), mode, dtype, k)


# --------------------------------------------------------------------------------------------- gates


def _tokenizer(folder: Path | None) -> Any:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(folder, "MoE base_model")
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _encode(tok: Any, prompts: Sequence[str]) -> Any:
    return tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def gate_vectors(
    cfg: MoEConfig, folder: Path, base: WeightStore, tok: Any, device: str, gen: torch.Generator
) -> Tensor:
    """The router rows, shaped (layers, experts, hidden)."""
    mcfg = json.loads((folder / "config.json").read_text())
    layers, hidden, n = int(mcfg["num_hidden_layers"]), int(mcfg["hidden_size"]), len(cfg.experts)
    if cfg.gate_mode == "random":
        return torch.randn((layers, n, hidden), generator=gen)
    if cfg.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return torch.rand((layers, n, hidden), generator=gen) * 2 * bound - bound
    if cfg.gate_mode == "cheap_embed":
        embed = base["model.embed_tokens.weight"]

        def states(enc: Any) -> Tensor:
            onehot = torch.nn.functional.one_hot(enc["input_ids"], num_classes=int(mcfg["vocab_size"]))
            h = onehot.float() @ embed.float()
            summed = (h * enc["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)

    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.bfloat16, device_map=device
        ).eval()
        average = cfg.gate_mode == "hidden_avg"

        def states(enc: Any) -> Tensor:
            with torch.no_grad():
                out = model(**enc.to(device), output_hidden_states=True, return_dict=True)
            hs = torch.stack(out.hidden_states[:-1])  # (layers, prompts, positions, hidden)
            hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
            return (hs.sum(dim=1) / hs.shape[1]).cpu()

    rows = []
    for e in cfg.experts:
        h = states(_encode(tok, e.positive))
        if e.negative:
            h -= states(_encode(tok, e.negative))
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(h)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


# -------------------------------------------------------------------------------------------- output


def _mixtral_config(folder: Path, cfg: MoEConfig, dtype: torch.dtype | None) -> Any:
    import transformers

    base = transformers.AutoConfig.from_pretrained(str(folder))
    if base.model_type not in ("llama", "mistral"):
        raise WeightsmithError(
            f"MoE base_model is a {base.model_type} model; Mixtral output needs Llama or Mistral"
        )
    if not isinstance(base, transformers.MistralConfig):
        as_mistral = transformers.MistralConfig(**base.to_dict())
        as_mistral.sliding_window = None
        as_mistral.max_position_embeddings = base.max_position_embeddings
        base = as_mistral
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    if dtype is not None:
        out.dtype = dtype
    return out


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()


def _noised(t: Tensor, e: Expert, residual: bool, gen: torch.Generator) -> Tensor:
    if e.noise_scale is not None:
        t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * e.noise_scale
    if residual and e.residual_scale is not None:
        t = t * e.residual_scale
    return t


def build(
    cfg: MoEConfig,
    out: str | Path,
    *,
    where: str = "MoE config",
    base_dir: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    shard_size: str | int = "2GB",
) -> Path:
    """Assemble the Mixtral model of ``cfg``: weights, config and the base's tokenizer in ``out``."""
    check_output(out, force, directory=True)
    base_spec = inputs.locate(cfg.base, base_dir)
    folder = inputs.source_dir(base_spec)
    if folder is None or not (folder / "config.json").is_file():
        raise WeightsmithError(f"{where}: base_model {cfg.base} has no config.json")
    base = inputs.open_input(base_spec)
    experts = [inputs.open_input(inputs.locate(e.model, base_dir)) for e in cfg.experts]
    mcfg = json.loads((folder / "config.json").read_text())
    layers = int(mcfg["num_hidden_layers"])
    for e, store in zip(cfg.experts, experts, strict=True):
        for layer in range(layers):
            for name, _ in MLP:
                key = f"model.layers.{layer}.mlp.{name}.weight"
                if key not in store or store.meta(key).shape != base.meta(key).shape:
                    raise WeightsmithError(
                        f"{where}: expert {e.model} has no tensor '{key}' of the base's shape"
                    )
    src_dtype = mcfg.get("dtype") or mcfg.get("torch_dtype")
    dtype = _core.parse_dtype(cfg.dtype or src_dtype)
    gen = torch.Generator().manual_seed(seed)
    tok = _tokenizer(folder)
    gates = gate_vectors(cfg, folder, base, tok, device, gen)
    writer = ShardWriter(out, max_shard_bytes=_core.parse_size(shard_size), force=force)
    try:
        for name in track([n for n in base if ".mlp." not in n], "MoE: base tensors"):
            writer.add(name, _cast(base[name], dtype))
        for layer in track(range(layers), "MoE: experts"):
            parts: dict[str, list[Tensor]] = {"gate": [], "up": [], "down": []}
            for e, store in zip(cfg.experts, experts, strict=True):
                for name, part in MLP:
                    t = store[f"model.layers.{layer}.mlp.{name}.weight"]
                    parts[part].append(_noised(t, e, part == "down", gen))
            prefix = f"model.layers.{layer}.mlp"
            pairs = zip(parts["gate"], parts["up"], strict=True)
            fused = {
                f"{prefix}.experts.gate_up_proj": torch.stack([torch.cat([g, u], dim=0) for g, u in pairs]),
                f"{prefix}.experts.down_proj": torch.stack(parts["down"]),
            }
            for name, t in fused.items():
                writer.add(name, _cast(t, dtype))
        for layer in range(layers):
            writer.add(f"model.layers.{layer}.mlp.gate.weight", _cast(gates[layer], dtype))
        _mixtral_config(folder, cfg, dtype).save_pretrained(writer.tmp)  # into the staged output
        tok.save_pretrained(writer.tmp)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def run(path: str | Path, out: str | Path, **kw: Any) -> Path:
    """Read a mergekit-moe YAML file and build its model into ``out``."""
    from .recipe import read_yaml

    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"MoE config not found: {path}")
    data, _ = read_yaml(path)
    cfg = parse(data, str(path), allow_all_same=bool(kw.pop("allow_all_same", False)))
    log(f"MoE: {len(cfg.experts)} experts, gate_mode {cfg.gate_mode}, {cfg.experts_per_token} per token")
    return build(cfg, out, where=str(path), base_dir=path.parent, **kw)
