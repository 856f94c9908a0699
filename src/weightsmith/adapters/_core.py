"""The adapter contract: what every method states, and nothing else.

A method is an :class:`AdapterConfig` (a frozen dataclass registered with
``@register_config("name", kind="adapter")``) whose ``create(W0, ctx)`` returns an :class:`Adapter`:
the reparameterisation ``W' = W0 + delta(W0)`` of *one* weight. Attaching to modules, enabling,
merging, unmerging, saving and loading are written once, in ``_attach.py`` / ``_io.py``.

Conventions every method can rely on:

- ``W0`` is always ``[out_features, in_features]`` (GPT-2 ``Conv1D`` weights are transposed by the
  core; for ``nn.Embedding`` it is ``[num_embeddings, dim]``). In ``create``, ``merge`` and
  ``unmerge`` it is float32; in ``forward`` it is the live weight (model dtype, maybe a view).
- ``create`` returns an adapter whose parameters are float32 on ``W0.device``. In ``forward`` the
  activations may be bfloat16/float16 while the parameters are float32: cast parameters to
  ``x.dtype`` (``self.A.to(x.dtype)``), never the activations to float32.
- ``nn.Parameter`` = trainable and saved. Persistent buffers are saved but not trained. Tensors that
  can be regenerated (shared random bases from ``ctx.shared``, SVD factors of ``W0``) must be
  registered with ``persistent=False``: ``create`` runs again on load and rebuilds them.
- Bases shared between layers come from ``ctx.shared.get(key, shape, factory)``; register the result
  as a non-persistent buffer. The core keeps one copy in memory, also across ``model.to(...)``.
- ``forward(x, W0, base_out)`` receives ``base_out = x W0ᵀ`` without the layer's bias and returns
  ``x W'ᵀ``; the core adds the bias. Multiplicative methods (DoRA, HRA) can therefore rescale or
  re-project ``base_out`` directly. A method that computes the whole output ``x W'ᵀ`` from ``x`` and
  ``W0`` itself sets ``needs_base_out = False``: when it is the only active adapter on the layer the
  core skips ``x W0ᵀ`` and passes ``base_out=None``; with several active adapters it still passes
  ``base_out`` (the same ``x W0ᵀ`` for all), so such a ``forward`` takes ``base_out: Tensor | None`` and
  must give the same result either way. Uses: methods that never read ``base_out`` (OFT, BOFT rotate
  ``x`` before ``W0``), and methods that fuse the base product into their own autograd node (LoRA: the
  input gradient ``g W0 + s (g B) A`` becomes one GEMM accumulating into the small one, instead of two
  full-size gradients that autograd then adds). The base layer's bias is still added by the core; a
  ``forward`` that computes the base product must use ``W0`` as given (any dtype, maybe a transposed
  view) and must return gradients for it when it requires them.
- A method that also rescales the layer's bias (PEFT's (IA)³ computes ``l ⊙ (W0 x + b)``) returns the
  scale from ``bias_scale()``; the core adds ``bias ⊙ scale`` in ``forward`` and multiplies / divides
  ``base.bias`` by it on merge / unmerge.
- Errors about user input (a rank too large for the matrix, ...) are ``ctx.error(message)``, which
  names the weight and its shape.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ShapeMismatchError, WeightsmithError
from ..linalg import seeded_generator, stable_seed

T = TypeVar("T")
F_ = TypeVar("F_", bound=Callable[..., Any])


class SharedBases:
    """Tensors shared by all layers of one adapter (one per ``(key, shape)``), e.g. VeRA's random A, B.

    Each tensor is made once by ``factory(generator)`` on CPU in float32 from a generator seeded by
    ``(seed, key)`` only (never the global RNG), then moved to ``device``. They are never written to
    adapter files: loading calls ``create`` again and regenerates them bit-identically from the seed.
    ``group(key, factory)`` keeps one plain Python object per key for coordination between layers
    (AdaLoRA's global budget); it is not saved either.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.device = torch.device(device)
        self._tensors: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        self._groups: dict[str, Any] = {}
        self._last_fn: Callable[[Tensor], Tensor] | None = None

    def key_seed(self, key: str) -> int:
        return stable_seed(f"{self.seed}:{key}", "sha256")

    def get(self, key: str, shape: tuple[int, ...], factory: Callable[[torch.Generator], Tensor]) -> Tensor:
        shape = tuple(int(s) for s in shape)
        slot = (key, shape)
        if slot not in self._tensors:
            t = factory(seeded_generator(self.key_seed(key)))
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"shared basis '{key}': factory made shape {tuple(t.shape)}, expected {shape}"
                )
            self._tensors[slot] = t.to(device=self.device, dtype=torch.float32)
        return self._tensors[slot]

    def group(self, key: str, factory: Callable[[], T]) -> T:
        if key not in self._groups:
            self._groups[key] = factory()
        return self._groups[key]  # type: ignore[no-any-return]

    def slot_of(self, t: Tensor) -> tuple[str, tuple[int, ...]] | None:
        for slot, s in self._tensors.items():
            if s is t:
                return slot
        return None

    def moved(self, slot: tuple[str, tuple[int, ...]], fn: Callable[[Tensor], Tensor]) -> Tensor:
        """The tensor at ``slot`` after ``fn`` (a ``Module._apply`` function), applied once for all layers."""
        if fn is not self._last_fn:
            self._tensors = {k: fn(t) for k, t in self._tensors.items()}
            self._last_fn = fn
            if self._tensors:
                self.device = next(iter(self._tensors.values())).device
        return self._tensors[slot]

    def __len__(self) -> int:
        return len(self._tensors)

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())


@dataclass
class AdapterContext:
    """What ``create`` may know besides ``W0``: where the weight sits and what it shares."""

    name: str  # the weight's name, e.g. "model.layers.0.self_attn.q_proj.weight"
    index: int  # position among the adapted weights (0, 1, ...)
    seed: int  # the adapter's seed (config.seed, default 0)
    kind: str  # "linear" | "embedding"
    shared: SharedBases
    inputs: Tensor | None = None  # calibration activations [n, in_features] (data-driven inits, EVA)
    shapes: tuple[tuple[int, int], ...] = ()  # [out, in] of every weight this adapter is attached to
    # True when create() only rebuilds the structure before saved tensors are loaded into it
    # (load_adapters, from_peft): data-driven inits may then skip their data and use zeros.
    restoring: bool = False

    def error(self, message: str, shape: tuple[int, ...] | None = None) -> WeightsmithError:
        where = f"weight '{self.name}'" + (f" (shape {tuple(shape)})" if shape is not None else "")
        return WeightsmithError(f"{where}: {message}")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for this layer's own random init, seeded by (seed, weight name)."""
        return seeded_generator(self.shared.key_seed(f"layer:{self.name}"), device)


class Adapter(nn.Module):
    """One adapter on one weight. Subclasses define ``delta``; most also a fast ``forward``."""

    # False: forward never reads base_out, so the core does not compute x W0ᵀ for it (it may pass None)
    needs_base_out: ClassVar[bool] = True

    def hold(self, **tensors: Tensor) -> None:
        """Hold frozen tensors (random bases, SVD factors, masks) as non-persistent buffers: they follow the
        module's device and dtype moves, get no gradient, and are not saved (each method rebuilds them from
        its seed or from ``W0``)."""
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)

    def delta(self, W0: Tensor) -> Tensor:
        """The dense update ``ΔW`` (same shape as ``W0``), so that ``W' = W0 + ΔW``."""
        raise TypeError(f"{type(self).__name__} must define delta(W0)")

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:  # type: ignore[override]
        """``x W'ᵀ`` given ``base_out = x W0ᵀ`` (both WITHOUT the bias: the core adds the bias afterwards)."""
        return base_out + F.linear(x, self.delta(W0).to(x.dtype))

    def embed(self, ids: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        """Output of an adapted embedding (``W0`` is ``[num_embeddings, dim]``)."""
        return base_out + F.embedding(ids, self.delta(W0).to(base_out.dtype))

    def merge(self, W0: Tensor) -> Tensor:
        """``W0 + ΔW``; methods whose ``unmerge`` needs state from merge time override this."""
        return W0 + self.delta(W0)

    def unmerge(self, W_merged: Tensor) -> Tensor:
        """Recover ``W0`` from ``W0 + ΔW``. Valid as is only when ``delta`` does not depend on ``W0``."""
        return W_merged - self.delta(W_merged)

    def bias_scale(self) -> Tensor | None:
        """A scale ``s`` [out] for the layer's bias, ``y = x W'ᵀ + s ⊙ b``, or None (the bias as is).

        Merging multiplies ``base.bias`` by ``s`` and unmerging divides it again."""
        return None

    def low_rank(self) -> tuple[Tensor, Tensor] | None:
        """Exact factors ``(B [out, k], A [k, in])`` with ``delta(W0) == B @ A`` for every ``W0``, or None.

        Used to export to PEFT LoRA without an SVD; None (the default) means "use a truncated SVD".
        """
        return None

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called by ``adapter_step`` after backward, before the gradients are zeroed."""

    def regularizer(self) -> Tensor | None:
        """A term to add to the training loss (AdaLoRA's orthogonality penalty), or None."""
        return None

    def peft_state(self) -> dict[str, Tensor] | None:
        """Tensors under PEFT's key suffixes relative to the module, adapter name removed, exactly as in
        adapter_model.safetensors (e.g. {"lora_A.weight": A, "lora_B.weight": B}, {"ia3_l": v},
        {"hada_w1_a": ..}); None when PEFT cannot hold this adapter exactly."""
        return None

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        """Load tensors keyed as ``peft_state`` returns.

        Raises WeightsmithError naming a missing or mis-shaped key."""
        raise WeightsmithError(f"{type(self).__name__} cannot load PEFT tensors")

    # Shared bases registered as buffers stay a single tensor across model.to(device/dtype).
    def link_shared(self, shared: SharedBases) -> None:
        """Called by the core after ``create``: remember which buffers are shared bases."""
        self._shared_bases = shared
        self._shared_slots = {
            n: s for n, b in self._buffers.items() if b is not None and (s := shared.slot_of(b))
        }

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Adapter:  # type: ignore[override]
        slots: dict[str, tuple[str, tuple[int, ...]]] = self.__dict__.get("_shared_slots", {})
        if not slots:
            return super()._apply(fn, recurse)  # type: ignore[no-any-return]
        for n in slots:
            self._buffers[n] = None
        super()._apply(fn, recurse)
        for n, slot in slots.items():
            self._buffers[n] = self._shared_bases.moved(slot, fn)
        return self


def peft_take(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """``state[key]`` as float32 for ``Adapter.load_peft_state``; a WeightsmithError names a missing key or a
    shape other than ``shape``."""
    if key not in state:
        raise WeightsmithError(f"tensor '{key}' is missing")
    t = state[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise WeightsmithError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.float()


def copy_peft(state: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
    """Copy ``state[key]`` into each ``targets[key]`` (same shape required), without autograd."""
    values = {k: peft_take(state, k, tuple(t.shape)) for k, t in targets.items()}
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(values[k])


A = TypeVar("A", bound="AdapterConfig")


class AdapterConfig:
    """Base of every adapter config (a frozen dataclass registered with ``register_config``).

    Class-level switches a method may set: ``supports_embedding`` (may attach to ``nn.Embedding``),
    ``default_lr``.
    A config with a ``seed`` field seeds its shared bases and random inits with it.
    """

    supports_embedding: ClassVar[bool] = False
    # PEFT's peft_type this method reads/writes exactly ("LORA", "IA3", ...); None: no PEFT form.
    peft_type: ClassVar[str | None] = None
    # Learning rate the trainer uses when none is given: the range the method's paper reports for
    # BERT/RoBERTa-size encoders (methods that train few scalars or vectors use ~10x larger rates).
    default_lr: ClassVar[float] = 5e-4
    seed = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> Adapter:
        raise TypeError(f"{type(self).__name__} must define create(W0, ctx)")

    # Small settings for the conformance suite (toy weights of shapes like 48x64, 64x32).
    example_opts: ClassVar[dict[str, Any]] = {}

    @classmethod
    def example(cls: type[A]) -> A:
        return cls(**cls.example_opts)

    @classmethod
    def peft_claims(cls, peft_config: Mapping[str, Any]) -> bool:
        """Whether this method reads ``peft_config`` (of its ``peft_type``); LoRA and DoRA share "LORA" and
        split it by ``use_dora``. Only classes that set ``peft_type`` themselves are asked."""
        return True

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> AdapterConfig:
        """This method's config for one module of a PEFT adapter.

        ``peft_config`` is the adapter_config.json dict with per-module patterns (rank_pattern,
        alpha_pattern) already resolved for ``module`` into the plain keys."""
        raise WeightsmithError(f"PEFT adapters cannot be read as {cls.__name__}")

    def to_peft(self) -> dict[str, Any]:
        """The adapter_config.json fields for this config.

        peft_type and the method's fields; not target_modules."""
        raise WeightsmithError(f"{type(self).__name__} has no exact PEFT form")

    def needs_calibration(self) -> bool:
        """True when ``create`` requires ``ctx.inputs`` (data-driven inits)."""
        return False

    def layer_configs(
        self, names: list[str], inputs: Mapping[str, Tensor] | None
    ) -> dict[str, AdapterConfig]:
        """Per-weight configs before creation (EVA redistributes ranks across layers here)."""
        return {n: self for n in names}


# ------------------------------------------------------------ helpers the method files share


def check_rank(
    rank: int, W0: Tensor, ctx: AdapterContext, method: str | None = None, limit: int | None = None
) -> None:
    """A low-rank method's ``rank`` must be in ``1..limit`` (default ``min(W0.shape)``, the smaller side
    of the matrix); else ``ctx.error`` naming the weight, its shape and ``method``."""
    top = min(W0.shape) if limit is None else limit
    if rank < 1 or rank > top:
        what = "rank" if method is None else f"{method} rank"
        why = " (the smaller side of the matrix)" if limit is None else ""
        raise ctx.error(f"{what} {rank} is not in 1..{top}{why}", tuple(W0.shape))


def amp_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's dtype inside an autocast region on ``x``'s
    device (float64 is never autocast), else ``x.dtype``."""
    dev = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def amp_apply(fn: Any, base_out: Tensor | None, x: Tensor, *args: Any) -> Tensor:
    """``fn.apply(base_out, x, *args)`` for a hand-written autograd Function under autocast or not.

    ``x`` and ``base_out`` (which may be None: a Function that computes the base product itself) are
    cast (differentiably) to :func:`amp_dtype` and autocast is off inside,
    so forward computes in the dtype autocast would have used and casts parameters explicitly; the
    output has the dtype autocast gives a plain ``nn.Linear``. Backward (see :func:`autocast_off`)
    then sees gradients in that one dtype and returns parameter gradients in the parameters' dtype.
    """
    dt = amp_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        base = None if base_out is None else base_out.to(dt)
        return fn.apply(base, x.to(dt), *args)  # type: ignore[no-any-return]


def autocast_off(backward: F_) -> F_:
    """Run a Function's backward with autocast off (it may be called inside an autocast region on the
    CPU, where backward runs on the caller's thread): its explicit casts then hold."""

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        dev = next((g.device.type for g in grads if isinstance(g, Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return backward(ctx, *grads)

    return run  # type: ignore[return-value]


_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def shared_cast(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``t.to(dtype)`` (times ``scale``) for a frozen basis shared by many layers, made once instead of once
    per layer call.

    Keyed by the tensor object (entries vanish with it) and remade when ``t`` is modified in place. Under
    ``torch.compile`` it is traced (a dictionary lookup keyed by a tensor would break the graph at every
    layer; the compiler folds a cast of a frozen tensor anyway).
    """
    if t.dtype == dtype and scale == 1.0:
        return t
    if torch.compiler.is_compiling():
        return _cast(t, dtype, scale)
    slot = _CASTS.setdefault(t, {})
    key = (dtype, scale)
    hit = slot.get(key)
    if hit is None or hit[0] != t._version:
        hit = slot[key] = (t._version, _cast(t, dtype, scale))
    return hit[1]  # type: ignore[no-any-return]


def _cast(t: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    out = t.detach().to(dtype)
    return out if scale == 1.0 else out * scale


def load_peft_tensors(adapter: nn.Module, state: Mapping[str, Tensor], names: Mapping[str, str]) -> None:
    """Copy ``state[peft_key]`` into ``adapter.<attribute>`` for each ``peft_key -> attribute`` in ``names``.

    Raises WeightsmithError naming a missing or extra key, and ShapeMismatchError for a wrong shape.
    """
    missing = [k for k in names if k not in state]
    if missing:
        raise WeightsmithError(
            f"{type(adapter).__name__}: PEFT tensor '{missing[0]}' is missing (got {sorted(state)})"
        )
    extra = sorted(set(state) - set(names))
    if extra:
        raise WeightsmithError(
            f"{type(adapter).__name__}: unexpected PEFT tensor '{extra[0]}' (expected {sorted(names)})"
        )
    with torch.no_grad():
        for key, attr in names.items():
            p: Tensor = getattr(adapter, attr)
            v = state[key]
            if tuple(v.shape) != tuple(p.shape):
                raise ShapeMismatchError(key, tuple(p.shape), tuple(v.shape), type(adapter).__name__)
            p.copy_(v.to(device=p.device, dtype=p.dtype))


PATHS = ("auto", "activation", "weight")  # where a method with two exact forms computes (RandLoRA, BOFT)


def check_path(path: str, method: str) -> None:
    """``path`` must be one of :data:`PATHS`; else a WeightsmithError naming the option."""
    if path not in PATHS:
        raise WeightsmithError(f"{method} path must be one of {', '.join(PATHS)}, got {path!r}")


def cheaper_path(
    path: str,
    x: Tensor,
    W0: Tensor,
    base_out: Tensor | None,
    trains: bool,
    costs: Callable[[int, bool, bool], tuple[int, int]],
) -> str:
    """``"weight"`` or ``"activation"`` for one call of a method with both exact paths, from shapes and
    autograd flags only (never from values: a CUDA graph or ``torch.compile`` sees one path per shape).
    ``path`` other than ``"auto"`` is obeyed; a given ``base_out`` (several adapters on the layer) or a
    trainable ``W0`` always takes the activation path; else ``costs(tokens, train, input_grad)`` gives the
    multiply-adds of (activation, weight) and the fewer wins, the activation path on a tie. ``trains``:
    whether any of the method's parameters require a gradient."""
    if base_out is not None or W0.requires_grad:
        return "activation"
    if path != "auto":
        return path
    grad = torch.is_grad_enabled()
    tokens = x.numel() // max(x.shape[-1], 1)
    act, weight = costs(tokens, grad and trains, grad and x.requires_grad)
    return "weight" if weight < act else "activation"


def check_dropouts(peft_config: Mapping[str, Any], keys: tuple[str, ...], method: str) -> None:
    """Dropouts are training-time only: importing weights trained with them is exact. Reject bad values."""
    for key in keys:
        value = peft_config.get(key) or 0.0
        if not 0.0 <= float(value) < 1.0:
            raise WeightsmithError(f"PEFT {method} option '{key}' must be in [0, 1), got {value!r}")


def pattern_value(peft_config: Mapping[str, Any], table: str, module: str, default: Any) -> Any:
    """PEFT's per-module override (``rank_pattern`` / ``alpha_pattern``): the value of the first key ``k``
    with ``re.match(rf"(.*\\.)?({k})$", module)``, else ``default``."""
    for key, value in (peft_config.get(table) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
