"""Attaching adapters to modules, written once for every method.

``adapt`` replaces each targeted ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Embedding`` by an
:class:`AdaptedLayer` that holds the original module as ``base`` and the adapters by name. Several
adapters on one weight add their updates; merged adapters live in ``base.weight`` (a stack, so that
unmerging is exact in reverse order).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsmithError, close_names
from ..layers import Layer, StatsSpec, collect_stats, is_head, layer_kind
from ..select import Selector
from ._core import Adapter, AdapterConfig, AdapterContext, SharedBases
from .lora_group import SiblingGroup, link_siblings

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
CALIBRATION_ROWS = 4096  # rows of activations kept per layer for data-driven inits


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters. ``forward`` never builds a dense ΔW unless a method must."""

    def __init__(self, base: nn.Module, weight_name: str) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(f"cannot adapt a {type(base).__name__}")
        self.base = base
        self.kind = kind
        self.weight_name = weight_name
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}  # the per-layer config each adapter was made with
        self.roots: dict[str, AdapterConfig] = {}  # the config the user passed to adapt()
        self.enabled: dict[str, bool] = {}
        self.merged: list[str] = []  # merge order; unmerge pops from the end
        # adapted linear layers of the same parent: siblings reading one input with plain LoRA or an adapter
        # with `group_terms` (DoRA) run as one node (lora_group)
        self.siblings: SiblingGroup | None = None

    # W0 as [out, in] (a view for Conv1D; [num_embeddings, dim] for embeddings)
    def weight(self) -> Tensor:
        W: Tensor = self.base.weight  # type: ignore[assignment]
        return W.T if self.kind == "conv1d" else W

    def _write(self, W: Tensor) -> None:
        with torch.no_grad():
            target: Tensor = self.base.weight  # type: ignore[assignment]
            target.copy_((W.T if self.kind == "conv1d" else W).to(target.dtype))

    def active(self) -> list[Adapter]:
        return [a for n, a in self.adapters.items() if self.enabled[n] and n not in self.merged]  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        active = self.active()
        if not active:
            return self.base(x)  # type: ignore[no-any-return]
        W0 = self.weight()
        if self.kind == "embedding":
            out = self.base(x)
            if len(active) == 1:
                return active[0].embed(x, W0, out)
            return out + sum(a.embed(x, W0, out) - out for a in active)
        if len(active) == 1 and not active[0].needs_base_out:
            group = getattr(self, "siblings", None)  # None on layers unpickled from before grouping existed
            y = None if group is None or torch.compiler.is_compiling() else group(self, x)
            if y is None:  # LoRA, OFT, BOFT, input-scaled (IA)3: x W0ᵀ would be thrown away
                y = active[0](x, W0, None)
        else:
            out = torch.matmul(x, W0.T) if self.kind == "conv1d" else F.linear(x, W0)
            y = active[0](x, W0, out) if len(active) == 1 else out + sum(a(x, W0, out) - out for a in active)
        bias: Tensor | None = getattr(self.base, "bias", None)
        if bias is None:
            return y
        scales = []  # a plain loop: a walrus comprehension breaks torch.compile's graph at every biased layer
        for a in active:
            s = a.bias_scale()
            if s is not None:
                scales.append(s)
        if not scales:
            return y + bias
        # each adapter's own output carries s_a ⊙ b; several add their changes: b + Σ (s_a ⊙ b - b)
        scaled = bias + sum(bias * s.to(bias.dtype) - bias for s in scales)
        return y + scaled

    def _scale_bias(self, adapter: Adapter, inverse: bool) -> None:
        s = adapter.bias_scale()
        bias: Tensor | None = getattr(self.base, "bias", None)
        if s is None or bias is None:
            return
        with torch.no_grad():
            b = bias.float()
            bias.copy_((b / s.float() if inverse else b * s.float()).to(bias.dtype))

    def merge(self, name: str) -> None:
        if name in self.merged:
            raise WeightsmithError(
                f"adapter '{name}' on '{self.weight_name}' is already merged; unmerge_adapters first"
            )
        adapter: Adapter = self.adapters[name]  # type: ignore[assignment]
        with torch.no_grad():
            W = self.weight().float()
            self._write(adapter.merge(W))
        self._scale_bias(adapter, inverse=False)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            raise WeightsmithError(f"adapter '{name}' on '{self.weight_name}' is not merged")
        later = self.merged[self.merged.index(name) + 1 :]
        with torch.no_grad():
            for n in [*reversed(later), name]:
                a: Adapter = self.adapters[n]  # type: ignore[assignment]
                self._write(a.unmerge(self.weight().float()))
                self._scale_bias(a, inverse=True)
                self.merged.remove(n)
        for n in later:
            self.merge(n)

    def extra_repr(self) -> str:
        return f"weight={self.weight_name!r}, adapters={list(self.adapters)}, merged={self.merged}"


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(module path, layer)`` for every adapted layer."""
    for path, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield path, m


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(weight name, module, kind)`` for every adaptable layer, named as in the original model."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str]]:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if isinstance(child, AdaptedLayer):
                yield f"{path}.weight", child, child.kind
                continue
            kind = layer_kind(child)
            if kind is not None:
                yield f"{path}.weight", child, kind
            else:
                yield from walk(child, path + ".")

    yield from walk(model, "")


def _select(
    model: nn.Module, config: AdapterConfig, targets: Selector | str | None
) -> list[tuple[str, nn.Module, str]]:
    cands = list(_candidates(model))
    names = [n for n, _, _ in cands]
    if not cands:
        raise WeightsmithError(
            f"{type(model).__name__} has no nn.Linear, Conv1D or nn.Embedding layer to adapt"
        )
    if targets is None:
        hits = [c for c in cands if c[2] != "embedding" and not is_head(c[0])]
        if not hits:
            raise WeightsmithError(
                f"no linear layers outside the heads to adapt; layers: {close_names('', names)}"
            )
        return hits
    sel = Selector.of(targets)
    chosen = set(sel.require(names, "adaptable layers (Linear, Conv1D, Embedding) of the model"))
    hits = [c for c in cands if c[0] in chosen]
    if not config.supports_embedding:
        emb = [n for n, _, k in hits if k == "embedding"]
        if emb:
            raise WeightsmithError(
                f"'{type(config).method}' cannot adapt embeddings, but the targets include '{emb[0]}'; "  # type: ignore[attr-defined]
                "exclude it from the targets"
            )
    return hits


def _replace(model: nn.Module, weight_name: str, new: nn.Module) -> None:
    path = weight_name[: -len(".weight")]
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _present(module: nn.Module, kind: str) -> Tensor:
    if isinstance(module, AdaptedLayer):
        return module.weight()
    W: Tensor = module.weight  # type: ignore[assignment]
    return W.T if kind == "conv1d" else W


def collect_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Any],
    max_rows: int = CALIBRATION_ROWS,
) -> dict[str, Tensor]:
    """Run ``batches`` through ``model`` and keep the first ``max_rows`` input rows per module (float32, CPU).

    For dict batches with an ``attention_mask``, padding positions are left out.
    """
    layers = [Layer(n, m, m.kind if isinstance(m, AdaptedLayer) else layer_kind(m) or "linear")
              for n, m in modules.items()]  # fmt: skip
    stats = collect_stats(model, layers, batches, StatsSpec(gram=False, channels=False, max_rows=max_rows))
    return {n: s.inputs().cpu() for n, s in stats.items()}


def attach(
    model: nn.Module,
    layer_configs: Mapping[str, AdapterConfig],
    name: str,
    root: AdapterConfig,
    inputs: Mapping[str, Tensor] | None = None,
    restoring: bool = False,
) -> list[str]:
    """Create and attach one adapter per weight in ``layer_configs`` (weight name -> config)."""
    if not _NAME_RE.match(name):
        raise WeightsmithError(f"adapter name '{name}' must be an identifier (letters, digits, _ and -)")
    cands = {n: (m, k) for n, m, k in _candidates(model)}
    for wname in layer_configs:
        if wname not in cands:
            raise WeightsmithError(
                f"model has no adaptable weight '{wname}'; close: {close_names(wname, list(cands))}"
            )
        mod = cands[wname][0]
        if isinstance(mod, AdaptedLayer) and name in mod.adapters:
            raise WeightsmithError(
                f"an adapter named '{name}' is already attached to '{wname}'; pass another name="
            )
    shapes = tuple(tuple(_present(cands[w][0], cands[w][1]).shape) for w in layer_configs)
    first = _present(*cands[next(iter(layer_configs))])
    shared = SharedBases(root.seed, first.device)
    for index, (wname, cfg) in enumerate(layer_configs.items()):
        module, kind = cands[wname]
        W0 = _present(module, kind).detach().float()
        ctx = AdapterContext(
            name=wname,
            index=index,
            seed=root.seed,
            kind="embedding" if kind == "embedding" else "linear",
            shared=shared,
            inputs=None if inputs is None else inputs.get(wname),
            shapes=shapes,  # type: ignore[arg-type]
            restoring=restoring,
        )
        adapter = cfg.create(W0, ctx)
        adapter.link_shared(shared)
        adapter.to(W0.device)
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, wname)
        if layer is not module:
            _replace(model, wname, layer)
        layer.adapters[name] = adapter
        layer.configs[name] = cfg
        layer.roots[name] = root
        layer.enabled[name] = True
    link_siblings(model, AdaptedLayer)
    mark_only_adapters_trainable(model)
    return list(layer_configs)


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    targets: Selector | str | None = None,
    name: str = "default",
    calibration: Iterable[Any] | None = None,
) -> list[str]:
    """Attach ``config``'s adapter, named ``name``, to the weights that ``targets`` selects.

    ``targets`` is a Selector or pattern string on weight names (``"q_proj,v_proj"``,
    ``"re:layers\\.[0-3]\\..*proj"``); None means every Linear/Conv1D layer except classifier heads.
    ``calibration`` (an iterable of model inputs: dicts for Hugging Face models) is run through the
    model to collect each targeted layer's inputs for data-driven inits (EVA). The base weights are
    frozen and the adapters made trainable. Returns the adapted weight names.
    """
    if not isinstance(config, AdapterConfig):
        raise WeightsmithError(f"adapt() needs an adapter config, got {type(config).__name__}")
    hits = _select(model, config, targets)
    names = [n for n, _, _ in hits]
    inputs = None
    if calibration is not None:
        inputs = collect_inputs(model, {n: m for n, m, _ in hits}, calibration)
    elif config.needs_calibration():
        raise WeightsmithError(
            f"'{type(config).method}' initialises from data: pass calibration= (an iterable of model inputs)"  # type: ignore[attr-defined]
        )
    return attach(model, config.layer_configs(names, inputs), name, config, inputs)


def _layers_with(model: nn.Module, name: str | None) -> list[tuple[AdaptedLayer, list[str]]]:
    layers = [
        (layer, [n for n in layer.adapters if name is None or n == name])
        for _, layer in adapted_layers(model)
    ]
    layers = [(layer, ns) for layer, ns in layers if ns]
    if not layers:
        known = sorted({n for _, layer in adapted_layers(model) for n in layer.adapters})
        what = f"adapter named '{name}'" if name else "adapters"
        raise WeightsmithError(f"the model has no {what}; adapters: {', '.join(known) or '(none)'}")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def merge_adapters(model: nn.Module, name: str | None = None) -> None:
    """Add the adapters' ΔW into the base weights (all enabled adapters when ``name`` is None)."""
    layers = _layers_with(model, name)
    todo = [(layer, [n for n in ns if n not in layer.merged and (name is not None or layer.enabled[n])])
            for layer, ns in layers]  # fmt: skip
    if not any(ns for _, ns in todo):
        what = f"adapter '{name}' is" if name else "all enabled adapters are"
        raise WeightsmithError(f"{what} already merged; unmerge_adapters first")
    if name is not None:
        for layer, _ in layers:
            if name in layer.merged:
                layer.merge(name)  # raises the already-merged error naming the weight
            if not layer.enabled[name]:
                raise WeightsmithError(f"adapter '{name}' is disabled; enable it before merging")
    for layer, ns in todo:
        for n in ns:
            layer.merge(n)


def unmerge_adapters(model: nn.Module, name: str | None = None) -> None:
    """Subtract merged adapters from the base weights, restoring W0 (all merged ones if ``name`` is None)."""
    layers = _layers_with(model, name)
    todo = [(layer, [n for n in reversed(layer.merged) if name is None or n == name]) for layer, _ in layers]
    if not any(ns for _, ns in todo):
        raise WeightsmithError(f"adapter '{name}' is not merged" if name else "no adapter is merged")
    for layer, ns in todo:
        for n in ns:
            layer.unmerge(n)


def set_adapters_enabled(model: nn.Module, enabled: bool, name: str | None = None) -> None:
    for layer, ns in _layers_with(model, name):
        for n in ns:
            if n in layer.merged:
                raise WeightsmithError(
                    f"adapter '{n}' is merged into '{layer.weight_name}'; "
                    "unmerge_adapters before disabling it"
                )
            layer.enabled[n] = enabled


@contextmanager
def adapters_disabled(model: nn.Module, name: str | None = None) -> Iterator[None]:
    """Within the block the model computes as if the (unmerged) adapters were absent."""
    before = {(id(layer), n): layer.enabled[n] for layer, ns in _layers_with(model, name) for n in ns}
    set_adapters_enabled(model, False, name)
    try:
        yield
    finally:
        for layer, ns in _layers_with(model, name):
            for n in ns:
                layer.enabled[n] = before[(id(layer), n)]


def remove_adapters(model: nn.Module, name: str | None = None) -> None:
    """Drop adapters (merged ones stay in the weights); layers left without adapters are unwrapped."""
    for layer, ns in _layers_with(model, name):
        for n in ns:
            del layer.adapters[n]
            layer.configs.pop(n)
            layer.roots.pop(n)
            layer.enabled.pop(n)
            if n in layer.merged:
                layer.merged.remove(n)
    for path, layer in list(adapted_layers(model)):
        if len(layer.adapters) == 0:
            _replace(model, f"{path}.weight", layer.base)
    link_siblings(model, AdaptedLayer)


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    for _, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if name is None or n == name:
                yield from a.parameters()


def mark_only_adapters_trainable(model: nn.Module, name: str | None = None) -> None:
    """Freeze every parameter except the adapters' (those of ``name`` only, when given)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (each shared parameter counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def adapter_step(model: nn.Module, step: int, total: int) -> None:
    """Call every adapter's ``on_train_step`` (AdaLoRA's budget schedule).

    Call it once per optimisation step, after ``backward()`` and before the gradients are zeroed.
    """
    for _, layer in adapted_layers(model):
        for a in layer.adapters.values():
            a.on_train_step(step, total)  # type: ignore[operator]


def adapter_regularization(model: nn.Module) -> Tensor:
    """Sum of the adapters' regularisers (0 when none has one); add it to the loss."""
    terms = []
    for _, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if layer.enabled[n] and n not in layer.merged:
                r = a.regularizer()  # type: ignore[operator]
                if r is not None:
                    terms.append(r)
    if not terms:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack([t.float() for t in terms]).sum()


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under its original names, without adapter tensors (merged ones included)."""
    paths = [path for path, _ in adapted_layers(model)]
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        owner = next((p for p in paths if key.startswith(p + ".")), None)
        if owner is None:
            out[key] = t
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base."):
            out[f"{owner}.{rest[5:]}"] = t
    return out
