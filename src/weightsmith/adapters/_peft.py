"""The one reader and the one writer of Hugging Face PEFT adapter folders.

A PEFT folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``adapter_model.bin``,
read with ``torch.load(weights_only=True)`` only). Its tensors are named
``base_model.model.<module>.<suffix>`` (the adapter name removed); tensors shared by all layers
(VeRA's and RandLoRA's bases) are ``base_model.<name>``. Besides the adapter's own tensors a folder
may hold plain model tensors: ``modules_to_save`` copies (a trained classifier head, saved as
``classifier.weight``; PEFT's wrapper names ``.modules_to_save.`` / ``.original_module.`` may appear
too), biases trained with ``bias="all"`` / ``"lora_only"`` (``<module>.base_layer.bias`` on adapted
layers) and saved embedding layers.

:func:`from_peft` imports a folder *whole or not at all*: each adapted module's tensors go to the
weightsmith method whose ``AdapterConfig.peft_type`` is the folder's ``peft_type`` (through the
method's ``from_peft`` / ``Adapter.load_peft_state``), plain model tensors are written into the
model, and a tensor that nothing takes, a shape that does not fit, or an option that changes the
output in a way weightsmith cannot hold (aLoRA, layer replication, trainable tokens, PiSSA-style
inits that changed the base weights, ...) is an error naming it; the model is then left unchanged.

:func:`to_peft` writes a folder: in the method's own PEFT form when it has one (``to_peft`` /
``peft_state``), else as a PEFT LoRA from the adapter's exact low-rank factors
(``Adapter.low_rank``), else as the truncated SVD of each update (the relative error per layer is
returned). PEFT itself is never imported here.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import registered
from ..errors import WeightsmithError
from ..linalg import truncated_svd
from ..staging import staged_dir
from ..store import SafetensorsStore, ShardWriter
from ._attach import (
    AdaptedLayer,
    _candidates,
    _layers_with,
    adapted_layers,
    attach,
    base_state_dict,
    remove_adapters,
)
from ._core import Adapter, AdapterConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
SHARED = "base_model."
SVD_RANK = 16

# adapter_config.json options whose effect weightsmith cannot hold; the value that is harmless
_REFUSED: dict[str, str] = {
    "alora_invocation_tokens": "aLoRA (activated LoRA: the adapter acts only after invocation tokens)",
    "layer_replication": "layer replication (PEFT duplicates base layers)",
    "trainable_token_indices": "trainable tokens (per-token embedding deltas)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "use_qalora": "QA-LoRA (GPTQ group pooling)",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA)",
    "kasa_config": "KaSA (a singular-value diagonal, the base weight truncated)",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
}
# LoRA inits that rewrite the base weights: the folder alone does not describe the model
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Written into adapter_config.json as peft_version: the PEFT release whose format the writer follows
# (PEFT fills the field in itself since 0.18; OFT's Cayley-Neumann form warns when it is missing or older).
PEFT_FORMAT_VERSION = "0.21.0"
# the alpha field of the PEFT types with rank_pattern / alpha_pattern tables
_ALPHA_FIELD: dict[str, str] = {
    "LORA": "lora_alpha",
    "ADALORA": "lora_alpha",
    "LOHA": "alpha",
    "LOKR": "alpha",
}
# fields the writer adds for every method that PEFT's config of these types does not have (PEFT warns
# about unknown fields on load)
_NOT_IN_CONFIG: dict[str, tuple[str, ...]] = {
    "IA3": ("bias",),
    "LOHA": ("bias", "fan_in_fan_out"),
    "LOKR": ("bias", "fan_in_fan_out"),
    "HRA": ("fan_in_fan_out",),
    "MISS": ("fan_in_fan_out",),
}


def _module_path(layer: AdaptedLayer) -> str:
    return layer.weight_name[: -len(".weight")]


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class PeftFolder:
    """A PEFT adapter folder as stored: its config and every tensor under its on-disk name."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    weights: Path  # the file the tensors came from (for messages)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))


def peft_dir(path: str | os.PathLike[str]) -> Path:
    """The PEFT folder at ``path``: the folder itself, or a weightsmith run's ``adapter/`` folder."""
    d = Path(path)
    if (
        not (d / PEFT_CONFIG).is_file()
        and (d / "run.json").is_file()
        and (d / "adapter" / PEFT_CONFIG).is_file()
    ):
        return d / "adapter"
    return d


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    return (peft_dir(path) / PEFT_CONFIG).is_file()


def read_peft(path: str | os.PathLike[str]) -> PeftFolder:
    """Read a PEFT folder (or a weightsmith run whose ``adapter/`` is one); refuses what cannot be held."""
    d = peft_dir(path)
    cfg_file = d / PEFT_CONFIG
    if not cfg_file.is_file():
        if (d / "run.json").is_file() and (d / "adapter" / "adapters.json").is_file():
            raise WeightsmithError(
                f"{d}: a weightsmith run whose adapter is in weightsmith's own format, not PEFT's; write it "
                f"as PEFT first (weightsmith export {d} --peft OUT) or train with --format peft"
            )
        raise WeightsmithError(f"{d}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsmithError(f"{cfg_file}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsmithError(f"{cfg_file}: must be a JSON object")
    if (d / PEFT_WEIGHTS).is_file():
        weights = d / PEFT_WEIGHTS
        store = SafetensorsStore([weights], str(weights))
        try:
            tensors = {k: store[k] for k in store}
        finally:
            store.close()
    elif (d / PEFT_BIN).is_file():
        weights = d / PEFT_BIN
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsmithError(
                f"{weights}: cannot load as a weights-only torch state dict: {exc}"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
        ):
            raise WeightsmithError(f"{weights}: expected a dict of tensor names to tensors")
        tensors = dict(state)
    else:
        raise WeightsmithError(f"{d}: no {PEFT_WEIGHTS} or {PEFT_BIN} beside {PEFT_CONFIG}")
    folder = PeftFolder(d, config, tensors, weights)
    _check_config(folder)
    return folder


def _check_config(folder: PeftFolder) -> None:
    cfg, where = folder.config, folder.path / PEFT_CONFIG
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise WeightsmithError(f"{where}: '{key}' is set: {what} cannot be represented in weightsmith")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise WeightsmithError(
            f"{where}: init_lora_weights={init!r} changed the base weights when the adapter was made, so "
            "the folder does not describe the model; save it with PEFT's "
            "path_initial_model_for_weight_conversion (plain LoRA) first"
        )
    method_for(folder)  # an unknown peft_type is refused here


def method_for(folder: PeftFolder) -> type[AdapterConfig]:
    """The weightsmith method reading this folder's ``peft_type`` (the one whose ``peft_claims`` agrees)."""
    table: dict[str, list[type[AdapterConfig]]] = {}
    for cls in registered("adapter").values():
        t = cls.__dict__.get("peft_type")
        if t:
            table.setdefault(t, []).append(cls)
    hits = [c for c in table.get(folder.peft_type, []) if c.peft_claims(folder.config)]
    if len(hits) != 1:
        known = ", ".join(sorted(table))
        what = f"peft_type {folder.peft_type!r}" + (
            " with these options" if folder.peft_type in table else ""
        )
        raise WeightsmithError(
            f"{folder.path / PEFT_CONFIG}: {what} cannot be imported; weightsmith reads {known}"
        )
    return hits[0]


def resolve_patterns(config: Mapping[str, Any], module: str) -> dict[str, Any]:
    """``config`` with ``rank_pattern`` / ``alpha_pattern`` resolved for ``module`` into ``r`` /
    ``lora_alpha``. PEFT's rule: the first pattern key ``k`` with ``re.match(r"(.*\\.)?(k)$", module)``."""
    out = dict(config)
    for table_key, plain in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        for key, value in (config.get(table_key) or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[plain] = value
                break
    return out


@dataclass
class PeftParts:
    """A folder's tensors sorted by role; each tensor lands in exactly one place."""

    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {suffix: tensor}
    shared: dict[str, Tensor] = field(default_factory=dict)  # base_model.<name> -> tensor
    base: dict[str, Tensor] = field(default_factory=dict)  # model state key -> tensor
    source: dict[str, str] = field(default_factory=dict)  # module/base/shared key -> key in the file
    copies: list[str] = field(default_factory=list)  # PEFT's unused original_module copies


def split_tensors(folder: PeftFolder, is_module: Callable[[str, str], bool]) -> PeftParts:
    """Sort the tensors: ``is_module(module, suffix)`` says whether ``<module>.<suffix>`` is an adapter
    tensor of ``module`` (the caller knows the model's layers, or the method's tensor names)."""
    parts = PeftParts()
    wrapped = [m for m in folder.config.get("modules_to_save") or [] if isinstance(m, str)]
    for key, t in folder.tensors.items():
        if not key.startswith(SHARED):
            raise WeightsmithError(
                f"{folder.weights}: tensor '{key}' is not under '{SHARED}'; not a PEFT adapter"
            )
        if not key.startswith(PREFIX):
            parts.shared[key[len(SHARED) :]] = t
            parts.source[key[len(SHARED) :]] = key
            continue
        rest = key[len(PREFIX) :]
        if ".original_module." in rest and any(
            rest.split(".original_module.")[0].endswith(m) for m in wrapped
        ):
            parts.copies.append(key)  # PEFT keeps the untrained original beside the trained copy
            continue
        rest = rest.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
        comps = rest.split(".")
        for i in range(len(comps) - 1, 0, -1):
            module, suffix = ".".join(comps[:i]), ".".join(comps[i:])
            if suffix not in ("weight", "bias") and is_module(module, suffix):
                parts.modules.setdefault(module, {})[suffix] = t
                parts.source[f"{module}.{suffix}"] = key
                break
        else:
            if rest in parts.base and not torch.equal(parts.base[rest], t):
                raise WeightsmithError(
                    f"{folder.weights}: '{key}' and '{parts.source[rest]}' are two different values "
                    f"of '{rest}'"
                )
            parts.base[rest] = t
            parts.source.setdefault(rest, key)
    return parts


class _Tracked(Mapping[str, Tensor]):
    """A read-only mapping that records which keys were read."""

    def __init__(self, data: Mapping[str, Tensor]) -> None:
        self._data = data
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Tensor:
        value = self._data[key]
        self.used.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data


def from_peft(model: nn.Module, peft_path: str | os.PathLike[str], name: str = "default") -> list[str]:
    """Import a PEFT adapter folder into ``model`` as weightsmith adapter ``name``; returns the adapted
    weight names. ``model`` must be the model PEFT wrapped (for a ``SEQ_CLS`` adapter the model with its
    classification head), so that the folder's names are its names.

    Every tensor in the folder is used or the import fails naming it; on any error the model is left as
    it was. Plain model tensors in the folder (``modules_to_save``, ``bias="all"``/``"lora_only"``
    biases, saved embeddings) are written into the model's own weights; ``lora_bias`` (a bias on LoRA's
    B) is folded into the layer's bias (created if the layer had none). These stay when the adapter
    is disabled or removed.
    """
    folder = read_peft(peft_path)
    cls = method_for(folder)
    cands = {w[: -len(".weight")]: (m, k) for w, m, k in _candidates(model)}
    parts = split_tensors(folder, lambda module, suffix: module in cands)
    where = folder.weights
    if not parts.modules:
        raise WeightsmithError(
            f"{where}: no adapter tensor belongs to a Linear, Conv1D or Embedding layer of "
            f"{type(model).__name__} (keys like '{PREFIX}<module>.<tensor>'); is it the model the "
            "adapter was made for?"
        )
    lora_biases: dict[str, Tensor] = {}
    if folder.peft_type == "LORA":
        for module, state in parts.modules.items():
            if "lora_B.bias" in state:
                if folder.config.get("use_dora"):
                    raise WeightsmithError(f"{where}: lora_bias with DoRA ('{module}') cannot be represented")
                lora_biases[module] = state.pop("lora_B.bias")
    base_state = base_state_dict(model)
    for key, t in parts.base.items():
        if key not in base_state:
            raise WeightsmithError(
                f"{where}: tensor '{parts.source[key]}' is for '{key}', which {type(model).__name__} does "
                "not have (a modules_to_save head? load the model with the head the adapter was trained with)"
            )
        if tuple(base_state[key].shape) != tuple(t.shape):
            raise WeightsmithError(
                f"{where}: tensor '{parts.source[key]}' has shape {tuple(t.shape)}, but the model's '{key}' "
                f"is {tuple(base_state[key].shape)}"
            )
    # a layer left with no parameters (AdaLoRA pruned all its triplets) contributes nothing
    empty = [m for m, state in parts.modules.items() if all(t.numel() == 0 for t in state.values())]
    for module in empty:
        del parts.modules[module]
    layer_cfgs: dict[str, AdapterConfig] = {}
    for module in parts.modules:
        kind = cands[module][1]
        try:
            cfg = cls.from_peft(resolve_patterns(folder.config, module), module)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsmithError(
                f"{folder.path / PEFT_CONFIG}: module '{module}': bad option ({exc})"
            ) from exc
        if kind == "embedding" and not cfg.supports_embedding:
            raise WeightsmithError(
                f"{where}: '{module}' is an embedding; {cls.__name__} cannot adapt embeddings"
            )
        layer_cfgs[f"{module}.weight"] = cfg
    first = next(iter(parts.modules))
    root = cls.from_peft(folder.config, first)
    attach(model, layer_cfgs, name, root, restoring=True)
    saved: dict[str, Tensor] = {}
    try:
        shared = _Tracked(parts.shared)
        for layer, _ in _layers_with(model, name):
            module = _module_path(layer)
            own = parts.modules[module]
            view = _Tracked({**parts.shared, **own})
            adapter: Adapter = layer.adapters[name]  # type: ignore[assignment]
            try:
                adapter.load_peft_state(view)
            except WeightsmithError as exc:
                raise WeightsmithError(f"{where}: module '{module}': {exc}") from exc
            unused = [k for k in own if k not in view.used]
            if unused:
                raise WeightsmithError(
                    f"{where}: tensor '{parts.source[f'{module}.{unused[0]}']}' is not used by "
                    f"{cls.__name__}; refusing to drop it"
                )
            shared.used |= view.used & set(parts.shared)
        unused_shared = [k for k in parts.shared if k not in shared.used]
        if unused_shared:
            raise WeightsmithError(
                f"{where}: tensor '{parts.source[unused_shared[0]]}' is not used; refusing to drop it"
            )
        for module, b in lora_biases.items():
            wrapped = model.get_submodule(module)
            assert isinstance(wrapped, AdaptedLayer)
            scale = float(getattr(wrapped.adapters[name], "scaling", 1.0))
            _add_bias(wrapped.base, module, b.float() * scale, saved)
        for key, t in parts.base.items():
            _assign(model, key, t, saved)
    except BaseException:
        _restore(model, saved)
        remove_adapters(model, name)
        raise
    return list(layer_cfgs)


def _param(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if isinstance(module, AdaptedLayer):
        module = module.base
    return module, attr


def _assign(model: nn.Module, key: str, value: Tensor, saved: dict[str, Tensor]) -> None:
    module, attr = _param(model, key)
    t: Tensor = getattr(module, attr)
    saved.setdefault(key, t.detach().clone())
    with torch.no_grad():
        t.copy_(value.to(t.dtype))


def _add_bias(module: nn.Module, path: str, delta: Tensor, saved: dict[str, Tensor]) -> None:
    bias = getattr(module, "bias", None)
    if bias is None:
        W: Tensor = module.weight  # type: ignore[assignment]
        module.bias = nn.Parameter(
            torch.zeros(delta.shape, dtype=W.dtype, device=W.device), requires_grad=False
        )
        saved[f"{path}.bias"] = torch.empty(0)  # marks "had no bias"
        bias = module.bias
    else:
        saved.setdefault(f"{path}.bias", bias.detach().clone())
    if tuple(bias.shape) != tuple(delta.shape):
        raise WeightsmithError(
            f"'{path}.lora_B.bias' has shape {tuple(delta.shape)}, the layer's bias {tuple(bias.shape)}"
        )
    with torch.no_grad():
        bias.add_(delta.to(bias.dtype))


def _restore(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    for key, old in saved.items():
        module, attr = _param(model, key)
        if (
            old.numel() == 0
            and attr == "bias"
            and getattr(module, "bias", None) is not None
            and old.ndim == 1
        ):
            module.register_parameter("bias", None)
            continue
        with torch.no_grad():
            getattr(module, attr).copy_(old)


# ---------------------------------------------------------------------------------------------- writer


def _lora_tensors(layer: AdaptedLayer, name: str, rank: int | None) -> tuple[dict[str, Tensor], int, float]:
    """PEFT LoRA tensors (module-relative) for a layer without an exact PEFT form: exact factors when
    the method has them, else the truncated SVD of its update. Returns (tensors, rank, relative error)."""
    a: Adapter = layer.adapters[name]  # type: ignore[assignment]
    factors = a.low_rank()
    rel = 0.0
    if factors is not None:
        B, A = (f.detach().float() for f in factors)
    else:
        delta = a.delta(layer.weight().detach().float()).detach().float()
        k = min(rank or SVD_RANK, *delta.shape)
        U, S, Vh = truncated_svd(delta, k)
        B, A = U * S.sqrt(), S.sqrt().unsqueeze(1) * Vh
        rel = float((delta - B @ A).norm() / delta.norm().clamp_min(1e-30))
    if layer.kind == "embedding":
        out = {"lora_embedding_A": B.T.contiguous(), "lora_embedding_B": A.T.contiguous()}
    else:
        out = {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}
    return out, int(A.shape[0]), rel


def _exact(path: str) -> str:
    # pattern keys match the module name's suffix as a regex: anchor full paths
    return "^" + re.escape(path) + "$" if "." in path else path


def _native(
    layers: list[AdaptedLayer], name: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Tensor]]] | None:
    """Per-module PEFT config fields and tensors in the method's own PEFT form, or None."""
    if type(layers[0].roots[name]).__dict__.get("peft_type") is None:
        return None
    cfgs, states = {}, {}
    for layer in layers:
        a: Adapter = layer.adapters[name]  # type: ignore[assignment]
        state = a.peft_state()
        if state is None:
            return None
        try:
            cfgs[_module_path(layer)] = layer.configs[name].to_peft()
        except WeightsmithError:
            return None
        states[_module_path(layer)] = state
    return cfgs, states


def _pattern_tables(peft_type: str) -> tuple[tuple[str, str], ...]:
    """``(table, field)`` pairs of the per-module overrides PEFT's config for ``peft_type`` has."""
    alpha = _ALPHA_FIELD.get(peft_type)
    return () if alpha is None else (("rank_pattern", "r"), ("alpha_pattern", alpha))


def _common(cfgs: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """One config for all modules, with rank / alpha differences as rank_pattern / alpha_pattern (for
    the PEFT types that have them); None when the modules differ in anything else (or in the method's
    type)."""
    first = next(iter(cfgs.values()))
    keys = set(first)
    if any(set(c) != keys for c in cfgs.values()):
        return None
    tables = _pattern_tables(str(first.get("peft_type")))
    common = {}
    for k in keys:
        values = [json.dumps(c[k], sort_keys=True) for c in cfgs.values()]
        top = Counter(values).most_common(1)[0][0]
        if len(set(values)) > 1 and k not in [f for _, f in tables]:
            return None
        common[k] = json.loads(top)
    for table, k in tables:
        if k in common:
            common[table] = {_exact(m): c[k] for m, c in cfgs.items() if c[k] != common[k]}
    return common


def to_peft(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    name: str = "default",
    rank: int | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Write adapter ``name`` as a PEFT adapter folder; returns the relative error per weight (0: exact).

    The method's own PEFT form when it has one, else PEFT LoRA from exact low-rank factors, else the
    truncated SVD of each update at ``rank`` (default 16).
    """
    layers = [layer for layer, _ in _layers_with(model, name)]
    native = _native(layers, name)
    common = _common(native[0]) if native is not None else None
    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    if native is not None and common is not None:
        for module, state in native[1].items():
            tensors.update({f"{PREFIX}{module}.{k}": v for k, v in state.items()})
        errors = {layer.weight_name: 0.0 for layer in layers}
        config = common
    else:
        cfgs: dict[str, dict[str, Any]] = {}
        for layer in layers:
            t, r, rel = _lora_tensors(layer, name, rank)
            tensors.update({f"{PREFIX}{_module_path(layer)}.{k}": v for k, v in t.items()})
            cfgs[_module_path(layer)] = {"r": r, "lora_alpha": float(r)}  # scaling folded into B
            errors[layer.weight_name] = rel
        config = {"peft_type": "LORA", "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
                  "init_lora_weights": True, **(_common(cfgs) or {})}  # fmt: skip
    config = {
        **config,
        "task_type": None,
        "base_model_name_or_path": _name_or_path(model),
        "target_modules": sorted(_module_path(layer) for layer in layers),
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers),
        "inference_mode": True,
        "peft_version": PEFT_FORMAT_VERSION,
    }
    for key in _NOT_IN_CONFIG.get(str(config["peft_type"]), ()):
        del config[key]
    with staged_dir(out_dir, force) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp / PEFT_WEIGHTS),
            metadata={"format": "pt"},
        )
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return errors


def _name_or_path(model: nn.Module) -> str | None:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model.config._name_or_path or None
    return None


# ---------------------------------------------------------------------------------------------- merged


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base state dict with every enabled, unmerged adapter folded in (the model is not changed)."""
    state = base_state_dict(model)
    for path, layer in adapted_layers(model):
        active = layer.active()
        if not active:
            continue
        W = layer.weight().detach().float()
        with torch.no_grad():
            W = W + sum(a.merge(W) - W for a in active)
        key = f"{path}.weight"
        state[key] = (W.T if layer.kind == "conv1d" else W).to(state[key].dtype).contiguous()
        scales = [s.detach().float() for a in active if (s := a.bias_scale()) is not None]
        if scales and f"{path}.bias" in state:
            b = state[f"{path}.bias"]
            bf = b.float()
            state[f"{path}.bias"] = (bf + sum(bf * s - bf for s in scales)).to(b.dtype)
    return state


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    force: bool = False,
    extra: Callable[[Path], None] | None = None,
    state: Mapping[str, Tensor] | None = None,
    config_json: str | None = None,
) -> Path:
    """Write the model with its adapters merged as a Hugging Face directory (config + safetensors).

    ``state`` / ``config_json`` replace the merged state dict / the model's config (a classification
    export renames keys); ``extra(tmp)`` writes further files into the directory before it is swapped in.
    """
    from transformers import PreTrainedModel

    tensors = merged_state_dict(model) if state is None else state
    with ShardWriter(out_dir, force=force) as writer:
        for key, t in tensors.items():
            writer.add(key, t)
        if config_json is not None:
            writer.write_text("config.json", config_json)
        elif isinstance(model, PreTrainedModel):
            writer.write_text("config.json", model.config.to_json_string())
            if model.can_generate() and model.generation_config is not None:
                writer.write_text("generation_config.json", model.generation_config.to_json_string())
        if extra is not None:
            extra(writer.tmp)
    return Path(out_dir)
