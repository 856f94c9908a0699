"""Run a mergekit YAML with a tensor-wise method, ``slices:`` (frankenmerges) included, as mergekit 0.1.5
plans it.

The plan (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models", EMNLP 2024
Industry, arXiv:2403.13257; mergekit's documented config semantics):

- ``models:`` is one slice whose sources are every model over all its layers (the base appended when it
  is not listed). ``slices:`` lists output slices; each has ``sources`` (``model``, ``layer_range:
  [start, end)``, ``parameters``), all of the same length, and optional ``base_model``/``parameters``.
- Output layers are numbered consecutively across slices; output layer k of a slice merges layer
  ``start + k`` of each source. Gradients (a list of numbers for a parameter) are interpolated at
  t = k / (n - 1) within the slice (t = 1 for a one-layer slice); tensors outside the layers (embeddings
  before, final norm and head after) use t = 0, the first slice's sources before and the last slice's after.
- Parameters resolve per tensor from the most specific scope that gives a value: the source's own
  ``parameters`` (per-model values), then the slice's, then the global ``parameters``; a list of
  ``{filter, value}`` takes the first entry whose filter is a substring of the tensor name.

Tensors are read ahead and written behind through the shared executor (:mod:`weightsmith.execute`) into a
staged output directory (:class:`weightsmith.store.ShardWriter`); config and tokenizer files come from the
base (or the first source), with ``num_hidden_layers`` set to the output's layer count. ``modules:
{default: ...}`` is the same config with one more parameter scope; tokenizer keys re-index the
token-indexed tensors as they are read (:mod:`weightsmith.merge.tokenizer`) and write the built tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..execute import ByteBudget, ReadAhead, Reader, WriteBehind, device_budget, is_finite, resolve_device
from ..progress import track
from ..store import ShardWriter, WeightStore
from . import _core, _tensorwise, mergekit_exact, tokenizer
from .mergekit_methods import METHODS as METHODS_WITH_KERNELS
from .mergekit_methods import REQUIRED, MergekitMethod, Param, method

LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
ONE_PASS_ROWS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")  # run by task_arithmetic.py
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")
Setting = Any


@dataclass(frozen=True)
class Source:
    model: str
    start: int
    end: int
    params: Mapping[str, Setting]


@dataclass(frozen=True)
class OutSlice:
    sources: tuple[Source, ...]
    base: str | None
    params: Mapping[str, Setting]


@dataclass(frozen=True)
class Job:
    """One output tensor: its name, its inputs ``(model, tensor name)`` in source order, its slice and t."""

    out: str
    inputs: tuple[tuple[str, str], ...]
    slice: int
    t: float


def layer_of(name: str) -> int | None:
    m = LAYER.search("." + name)
    return int(m.group(1)) if m else None


def template(name: str) -> str:
    """``name`` with its layer index replaced by ``{L}`` (fill it with :func:`fill`)."""
    m = LAYER.search("." + name)
    if m is None:
        raise ValueError(f"'{name}' is not a layer tensor")
    s, e = m.span(1)
    return name[: s - 1] + "{L}" + name[e - 1 :]


def fill(tmpl: str, index: int) -> str:
    return tmpl.replace("{L}", str(index), 1)


def num_layers(names: Sequence[str]) -> int:
    found = [i for i in map(layer_of, names) if i is not None]
    return max(found) + 1 if found else 0


# ------------------------------------------------------------------------------------ parameter values


def _convert(value: Any, kind: type, key: str, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise WeightsmithError(
                f"{where}: parameter '{key}' must be true or false (got {str(value)[:80]})"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsmithError(f"{where}: parameter '{key}' must be a number (got {str(value)[:80]})")
    return kind(value)


def evaluate(setting: Setting, name: str, t: float, kind: type, key: str, where: str) -> Any:
    """mergekit's value rules: a scalar; a gradient (list of numbers, linearly interpolated at ``t``; a
    list of flags picks entry floor(t (n - 1))); or ``{filter, value}`` entries, first match wins."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Mapping) for e in setting):
            for cond in setting:
                flt = cond.get("filter")
                if flt is None or flt == "*" or (name and flt in name):
                    return evaluate(cond.get("value"), name, t, kind, key, where)
            return None
        values = [_convert(v, kind, key, where) for v in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        x = t * (len(values) - 1)
        i0 = int(x)
        i1 = min(len(values) - 1, i0 + 1)
        return kind((1 - (x - i0)) * values[i0] + (x - i0) * values[i1])
    return _convert(setting, kind, key, where)


def resolve(p: Param, scopes: Sequence[Mapping[str, Setting] | None], name: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope is not None and p.name in scope:
            v = evaluate(scope[p.name], name, t, p.kind, p.name, where)
            if v is not None:
                return v
    if p.default is REQUIRED:
        raise WeightsmithError(
            f"{where}: missing required parameter '{p.name}' for tensor '{name}' (no scalar, gradient or "
            "matching filter gives it a value)"
        )
    return p.default


# ------------------------------------------------------------------------------------------------ plan


def _slices(config: Mapping[str, Any], layer_count: Callable[[str], int], where: str) -> list[OutSlice]:
    base = config.get("base_model")
    if config.get("slices"):
        out = []
        for i, sl in enumerate(config["slices"]):
            if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise WeightsmithError(f"{where}: slices[{i}] needs a non-empty 'sources:' list")
            srcs = []
            for j, src in enumerate(sl["sources"]):
                rng = src.get("layer_range") if isinstance(src, Mapping) else None
                if (
                    not isinstance(src, Mapping)
                    or not isinstance(src.get("model"), str)
                    or not isinstance(rng, list)
                    or len(rng) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                ):
                    raise WeightsmithError(
                        f"{where}: slices[{i}].sources[{j}] needs 'model: NAME' and "
                        "'layer_range: [START, END]'"
                    )
                n = layer_count(src["model"])
                if not 0 <= rng[0] < rng[1] <= n:
                    raise WeightsmithError(
                        f"{where}: slices[{i}].sources[{j}] layer_range {rng} is outside {src['model']}'s "
                        f"{n} layers"
                    )
                srcs.append(Source(src["model"], rng[0], rng[1], src.get("parameters") or {}))
            lengths = {s.end - s.start for s in srcs}
            if len(lengths) != 1:
                raise WeightsmithError(
                    f"{where}: slices[{i}]: every source must span the same number of layers "
                    f"(got {sorted(lengths)})"
                )
            out.append(OutSlice(tuple(srcs), sl.get("base_model") or base, sl.get("parameters") or {}))
        return out
    models = config.get("models") or []
    srcs = []
    for j, m in enumerate(models):
        name = m.get("model") if isinstance(m, Mapping) else m
        if not isinstance(name, str):
            raise WeightsmithError(f"{where}: models[{j}] needs 'model: NAME'")
        params = (m.get("parameters") if isinstance(m, Mapping) else None) or {}
        srcs.append(Source(name, 0, layer_count(name), params))
    if base and all(s.model != base for s in srcs):
        srcs.append(Source(base, 0, layer_count(base), {}))
    if not srcs:
        raise WeightsmithError(f"{where}: nothing to merge: give 'models:' or 'slices:'")
    return [OutSlice(tuple(srcs), base, {})]


def plan(
    config: Mapping[str, Any], names: Callable[[str], Sequence[str]], where: str = "mergekit config"
) -> tuple[list[OutSlice], list[Job], int]:
    """The output slices, one :class:`Job` per output tensor (embeddings, layers, then the rest) and the
    number of output layers. ``names(model)`` lists a model's tensor names."""
    slices = _slices(config, lambda m: num_layers(names(m)), where)
    first, last = slices[0].sources, slices[-1].sources
    ref = config.get("base_model") or first[0].model
    loose = [n for n in names(ref) if layer_of(n) is None]
    pre = [n for n in loose if any(h in n for h in PRE_HINTS)]
    post = [n for n in loose if n not in pre]
    jobs = [Job(n, tuple((s.model, n) for s in first), 0, 0.0) for n in pre]
    k = 0
    for i, sl in enumerate(slices):
        length = sl.sources[0].end - sl.sources[0].start
        for off in range(length):
            t = off / (length - 1) if length > 1 else 1.0
            per_source = []
            for s in sl.sources:
                idx = s.start + off
                by_suffix = {template(n): n for n in names(s.model) if layer_of(n) == idx}
                per_source.append(by_suffix)
            for suffix, _ in per_source[0].items():
                missing = [s.model for s, d in zip(sl.sources, per_source, strict=True) if suffix not in d]
                if missing:
                    raise WeightsmithError(
                        f"{where}: slices[{i}]: {missing[0]} has no tensor "
                        f"'{fill(suffix, sl.sources[0].start + off)}' (layer {off} of the slice)"
                    )
                jobs.append(
                    Job(
                        fill(suffix, k),
                        tuple((s.model, d[suffix]) for s, d in zip(sl.sources, per_source, strict=True)),
                        i,
                        t,
                    )
                )
            k += 1
    jobs += [Job(n, tuple((s.model, n) for s in last), len(slices) - 1, 0.0) for n in post]
    return slices, jobs, k


def job_parameters(
    mk: MergekitMethod,
    job: Job,
    sl: OutSlice,
    outer: Sequence[Mapping[str, Setting]],
    base_index: int | None,
    where: str,
) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    """(shared values, one dict per non-base input) for one output tensor; ``outer`` are the scopes after
    the slice's (the module's parameters, then the global ones)."""
    shared = {
        p.name: resolve(p, [sl.params, *outer], job.out, job.t, where)
        for p in mk.params
        if p.scope == "shared"
    }
    per: list[Mapping[str, Any]] = []
    for i, (model, name) in enumerate(job.inputs):
        if i == base_index:
            continue
        scopes = [s.params for s in sl.sources if s.model == model] + [sl.params, *outer]
        per.append(
            {
                p.name: resolve(p, scopes, name, job.t, f"{where} ({model})")
                for p in mk.params
                if p.scope != "shared"
            }
        )
    return shared, per


# ------------------------------------------------------------------------------------------------- run


def run(
    config: Mapping[str, Any],
    out: str | Path,
    *,
    open_model: Callable[[str], WeightStore],
    source_dir: Callable[[str], Path | None],
    dtype: str | None = None,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    seed: int = 0,
    extra_files: Mapping[str, str] | None = None,
    where: str = "mergekit config",
    exact: bool = False,
) -> Path:
    """Merge as the mergekit ``config`` (a parsed YAML mapping) says and write a model directory to ``out``.
    ``open_model`` / ``source_dir`` resolve the config's model names (the caller's business). ``exact``
    computes in the inputs' dtype as mergekit does (:mod:`weightsmith.merge.mergekit_exact`) instead of
    float32."""
    mk = method(str(config.get("merge_method")))
    kernel = mergekit_exact.kernel(mk.name) if exact else mk.kernel
    config, module_params = lift_modules(config, where)
    outer = [module_params, config.get("parameters") or {}]
    stores: dict[str, WeightStore] = {}

    def store(model: str) -> WeightStore:
        if model not in stores:
            stores[model] = open_model(model)
        return stores[model]

    slices, jobs, n_out = plan(config, lambda m: list(store(m)), where)
    bases: list[int | None] = []
    for i, sl in enumerate(slices):
        models = [s.model for s in sl.sources]
        has = mk.base != "ignored" and sl.base is not None and sl.base in models
        if mk.base == "required" and sl.base is not None and sl.base not in models:
            raise WeightsmithError(f"{where}: slices[{i}]: base_model {sl.base} is not one of its sources")
        mk.check_inputs(len(models), has, f"{where}: slices[{i}]")
        bases.append(models.index(sl.base) if has and sl.base is not None else None)
    in_dtype = _core.parse_dtype(config.get("dtype"))
    out_dtype = _core.parse_dtype(dtype or config.get("out_dtype") or config.get("dtype"))
    dev = resolve_device(device)
    params = [job_parameters(mk, j, slices[j.slice], outer, bases[j.slice], where) for j in jobs]
    if mk.name == "slerp":
        for job, (shared, _) in zip(jobs, params, strict=True):
            if not 0.0 <= shared["t"] <= 1.0:
                raise WeightsmithError(
                    f"{where}: parameter 't' of tensor '{job.out}' is out of range: t={shared['t']:g}; "
                    "SLERP's t must be in [0, 1]"
                )
    tok_spec = tokenizer.parse(config, where)
    vocab = None
    if tok_spec is not None and tok_spec.source is not None:
        vocab = tokenizer.build(tok_spec, config.get("base_model"), referenced(config), source_dir, where)

    reader = Reader(dev)  # parallel positioned reads; pinned staging and a side stream on a GPU

    def read(job: Job) -> list[Tensor]:
        ts = reader.read([(store(m), n) for m, n in job.inputs])
        ts = [t.to(in_dtype) if in_dtype is not None and t.is_floating_point() else t for t in ts]
        if vocab is not None and tokenizer.is_vocab_tensor(job.out) and ts[0].is_floating_point():
            ts = vocab.remap([m for m, _ in job.inputs], slices[job.slice].base, ts, job.out)
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) > 1:
            raise WeightsmithError(
                f"{where}: tensor '{job.out}' has different shapes in its inputs: "
                + ", ".join(f"{m}:{n} {tuple(t.shape)}" for (m, n), t in zip(job.inputs, ts, strict=True))
            )
        return ts

    def size(job: Job) -> int:
        """The job's inputs and its result (held from the read until written behind)."""
        meta = store(job.inputs[0][0]).meta(job.inputs[0][1])
        result = meta.nbytes // meta.dtype.itemsize * (out_dtype or meta.dtype).itemsize
        return sum(store(m).meta(n).nbytes for m, n in job.inputs) + result

    budget = ByteBudget(device_budget(dev, max((size(j) for j in jobs), default=0)))

    write_as = cast(Callable[..., Tensor], kernel)  # kernels that write the output dtype take ``out_dtype``

    def as_target(target: torch.dtype) -> dict[str, torch.dtype]:
        return {"out_dtype": target} if mk.writes_dtype and not exact else {}

    copy_from = source_dir(config.get("base_model") or slices[0].sources[0].model)
    writer = ShardWriter(out, max_shard_bytes=_core.parse_size(shard_size), force=force)
    behind = WriteBehind(writer.add, budget=budget)
    items = list(enumerate(jobs))
    # fresh buffers from safetensors files may be written into by a kernel (SLERP's result into its base);
    # a vocabulary remap may hand back tensors it keeps, so then no kernel owns its inputs
    owning = _tensorwise.owning_inputs(list(stores.values())) if vocab is None else contextlib.nullcontext()
    try:
        with (
            reader,
            owning,
            _tensorwise.keeping_scratch(),
            ReadAhead(items, lambda ij: [read(ij[1])], size=lambda ij: size(ij[1]), budget=budget) as ahead,
        ):
            for (i, job), box in track(ahead, "merge", len(jobs)):
                tensors = box.pop()  # the box is emptied: only this loop holds the inputs
                target = out_dtype or tensors[0].dtype
                if not tensors[0].is_floating_point():
                    behind.put(job.out, tensors[0])
                    del tensors
                    continue
                if exact:
                    tensors = mergekit_exact.align(tensors)
                b = bases[job.slice]
                base = tensors[b] if b is not None else None
                thetas = [t for k, t in enumerate(tensors) if k != b]
                shared, per = params[i]
                gen = None
                if mk.random:
                    gen = torch.Generator(device=dev).manual_seed(_core.seed_for(seed, 0, job.out))
                try:
                    result = write_as(base, thetas, shared, per, gen, **as_target(target))
                except (RuntimeError, ValueError) as exc:
                    raise WeightsmithError(f"merging tensor '{job.out}' failed: {exc}") from exc
                if not is_finite(result):
                    raise WeightsmithError(f"merging tensor '{job.out}' gave NaN or Inf")
                behind.put(job.out, result, target)
                del result, tensors, base, thetas  # freed before the next item is read into the budget
        behind.finish()
        _core._copy_model_files(writer, copy_from, out_dtype, extra_files)
        if tok_spec is not None:
            _write_tokenizer(tok_spec, vocab, config, source_dir, copy_from, writer.tmp, where)
        cfg = writer.tmp / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if "num_hidden_layers" in data:
                data["num_hidden_layers"] = n_out
            if vocab is not None:
                _set_vocab_size(data, vocab.size)
            writer.write_text("config.json", json.dumps(data, indent=2))
        return writer.close()
    except BaseException:
        behind.close()
        writer.abort()
        raise


def lift_modules(config: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], Mapping[str, Setting]]:
    """A ``modules:`` config as the equivalent ``models:`` / ``slices:`` config and the module's
    ``parameters`` (a scope between the slice's and the global ones). mergekit names the one module of a
    single-module (decoder-only) architecture ``default``; multi-module architectures (vision-language
    models) are not supported."""
    modules = config.get("modules")
    if not modules:
        return config, {}
    present = [k for k in ("models", "slices") if config.get(k)]
    if present:
        raise WeightsmithError(
            f"{where}: give exactly one of 'models', 'slices' and 'modules' (also got {present})"
        )
    if not isinstance(modules, Mapping) or list(modules) != ["default"]:
        names = list(modules) if isinstance(modules, Mapping) else modules
        raise WeightsmithError(
            f"{where}: modules {str(names)[:80]}: only the 'default' module of a single-module "
            "(decoder-only) architecture is supported; a multi-module (vision-language) model is not"
        )
    mod = modules["default"]
    if not isinstance(mod, Mapping) or set(mod) - {"models", "slices", "parameters"}:
        raise WeightsmithError(
            f"{where}: modules.default is {{models: [...] | slices: [...], parameters: {{...}}}} "
            f"(got {str(mod)[:80]})"
        )
    if bool(mod.get("models")) == bool(mod.get("slices")):
        raise WeightsmithError(f"{where}: modules.default needs exactly one of 'models' and 'slices'")
    lifted = {k: v for k, v in config.items() if k != "modules"}
    key = "models" if mod.get("models") else "slices"
    lifted[key] = mod[key]
    return lifted, mod.get("parameters") or {}


def referenced(config: Mapping[str, Any]) -> list[str]:
    """Every model a mergekit YAML names, once each: the base, then ``models:`` and ``slices:`` sources in
    order."""
    out = [config["base_model"]] if isinstance(config.get("base_model"), str) else []
    for m in config.get("models") or []:
        out.append(m.get("model") if isinstance(m, Mapping) else m)
    for sl in config.get("slices") or []:
        out += [src.get("model") for src in (sl.get("sources") or []) if isinstance(src, Mapping)]
    return list(dict.fromkeys(m for m in out if isinstance(m, str)))


def _set_vocab_size(data: dict[str, Any], size: int) -> None:
    holder = (
        data if "vocab_size" in data or not isinstance(data.get("text_config"), dict) else data["text_config"]
    )
    holder["vocab_size"] = size


def _write_tokenizer(
    spec: tokenizer.TokenizerSpec,
    vocab: tokenizer.Vocabulary | None,
    config: Mapping[str, Any],
    source_dir: Callable[[str], Path | None],
    donor: Path | None,
    folder: Path,
    where: str,
) -> None:
    """The output's tokenizer files: the built vocabulary's tokenizer, or (``chat_template`` alone) the
    donor's with the template set, as mergekit re-saves it."""
    template = spec.chat_template
    if template == "auto":
        template = tokenizer.auto_template([source_dir(m) for m in referenced(config)])
    if vocab is not None:
        vocab.save(folder, template)
    elif template is not None:
        tok = tokenizer.load_tokenizer(donor, f"{where}: chat_template needs the tokenizer of {donor}")
        tokenizer.save_tokenizer(tok, folder, template)


# ------------------------------------------------------------------------- the recipe layer's handle

YAML_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "name", "chat_template", "modules",
}  # fmt: skip


def _check_keys(config: Mapping[str, Any], mk: MergekitMethod, where: str) -> None:
    """Refuse what this path does not do yet, and parameter names the method does not have."""
    unknown = sorted(str(k) for k in config if k not in YAML_KEYS)
    if unknown:
        raise WeightsmithError(
            f"{where}: unknown mergekit key(s) {unknown[:5]}; known: {', '.join(sorted(YAML_KEYS))}"
        )
    config, module_params = lift_modules(config, where)
    tokenizer.parse(config, where)
    known = {p.name for p in mk.params}
    scopes: list[tuple[str, Any]] = [("(global)", config.get("parameters"))]
    if module_params:
        scopes.append(("of modules.default", module_params))
    for i, sl in enumerate(config.get("slices") or []):
        if isinstance(sl, Mapping):
            scopes.append((f"of slices[{i}]", sl.get("parameters")))
            for j, src in enumerate(sl.get("sources") or []):
                if isinstance(src, Mapping):
                    scopes.append((f"of slices[{i}].sources[{j}]", src.get("parameters")))
    for j, m in enumerate(config.get("models") or []):
        if isinstance(m, Mapping):
            scopes.append((f"of models[{j}]", m.get("parameters")))
    for what, params in scopes:
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise WeightsmithError(f"{where}: 'parameters' {what} must be a mapping (got {str(params)[:80]})")
        for key in params:
            if key not in known:
                raise WeightsmithError(
                    f"{where}: unknown parameter '{str(key)[:80]}' {what} for method '{mk.name}'; "
                    f"known: {', '.join(sorted(known)) or '(none)'}"
                )


@dataclass(frozen=True)
class MergekitYAML:
    """A parsed mergekit YAML that this module runs (``run`` has the signature of every merge config's)."""

    config: Mapping[str, Any]
    path: Path | None = None
    exact: bool = False  # mergekit's low-precision arithmetic (``--exact-dtype``)

    def __post_init__(self) -> None:
        _check_keys(
            self.config, method(str(self.config.get("merge_method"))), str(self.path or "mergekit config")
        )

    def _locate(self, spec: str) -> str:
        from . import inputs

        return inputs.locate(spec, self.path.parent if self.path is not None else None)

    def run(self, recipe: Any, out: Path, **kw: Any) -> Path:
        from . import inputs

        def open_model(spec: str) -> WeightStore:
            return inputs.open_input(self._locate(spec))  # MODEL+LORA: the LoRA applied as tensors are read

        return run(
            self.config,
            out,
            open_model=open_model,
            source_dir=lambda spec: inputs.source_dir(self._locate(spec)),
            dtype=kw.get("dtype"),
            device=kw.get("device", "cpu"),
            force=bool(kw.get("force", False)),
            shard_size=kw.get("shard_size", "2GB"),
            seed=int(kw.get("seed", 0)),
            extra_files=kw.get("extra_files"),
            where=str(self.path or "mergekit config"),
            exact=self.exact,
        )


def handles(config: Mapping[str, Any]) -> bool:
    """Whether this module runs ``config``: a method of the table that the task-arithmetic executor does
    not run, or any method of the table with ``slices:`` or tokenizer keys."""
    name = config.get("merge_method")
    if not isinstance(name, str) or name not in METHODS_WITH_KERNELS:
        return False
    retokenize = any(config.get(k) is not None for k in ("tokenizer_source", "tokenizer", "chat_template"))
    return bool(config.get("slices") or config.get("modules")) or name not in ONE_PASS_ROWS or retokenize
