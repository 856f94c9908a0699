"""What the data-aware merges (RegMean, Fisher merging, AdaMerging) share: their data options, the batches
they read, the model they run, and the streamed write of the merged checkpoint.

Data options sit in each method's config (``data``, ``samples``, ``seq_len``, ``batch_size``, ``seed``) so
Python, our YAML recipe and the config objects name them the same way. ``data`` gives one source per model
(or one for all): a packaged classification data set (``rotten_tomatoes``, ``debates``, ``speeches``: its
sentences, with labels), a packaged text (``hamlet``: its first 90 %) or a UTF-8 text file (windows of
``seq_len`` tokens). A model is run as its Hugging Face class: a causal LM, a sequence classifier, or a bare
encoder (architectures in ``config.json``); one instance is built and each input's weights are loaded into it
in turn, so one model is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import assets, models
from ..compress._core import PACKAGED_TEXTS, calibration_batches
from ..errors import WeightsmithError
from ..execute import resolve_device
from ..store import WeightStore
from ..tasks import CLASSIFICATION_TASKS
from . import _core

Batch = dict[str, Tensor]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataOptions:
    """``data``: one source per model, or one for all; ``samples`` examples (sentences, or windows of
    ``seq_len`` tokens of a text) per source, ``batch_size`` per batch; ``split`` of a classification data
    set (texts always give their first 90 %); ``seed`` picks the sentences."""

    data: tuple[str, ...] = ()
    samples: int = 64
    seq_len: int = 128
    batch_size: int = 8
    split: str = "train"
    seed: int = 0

    def check_data(self) -> None:
        name = type(self).method  # type: ignore[attr-defined]
        for opt in ("samples", "seq_len", "batch_size"):
            low = 2 if opt == "seq_len" else 1
            if getattr(self, opt) < low:
                raise WeightsmithError(f"{name} option {opt}={getattr(self, opt)}: must be at least {low}")
        if self.split not in SPLITS:
            raise WeightsmithError(f"{name} option split='{self.split}': use one of {SPLITS}")

    def sources(self, n_models: int) -> list[str]:
        """The data source of each model (``data`` has one entry per model, or one shared by all)."""
        name = type(self).method  # type: ignore[attr-defined]
        if not self.data:
            raise WeightsmithError(
                f"{name} needs data: give option 'data' (one source per model: a data set such as "
                f"{CLASSIFICATION_TASKS[0]}, a packaged text such as hamlet, or a text file)"
            )
        if len(self.data) not in (1, n_models):
            raise WeightsmithError(
                f"{name} option data has {len(self.data)} sources for {n_models} models; give one per model "
                "or one for all"
            )
        return list(self.data) * n_models if len(self.data) == 1 else list(self.data)


def check_source(source: str) -> None:
    """``source`` is a packaged data set, a packaged text or an existing text file."""
    if source not in CLASSIFICATION_TASKS + PACKAGED_TEXTS and not Path(source).expanduser().is_file():
        raise WeightsmithError(
            f"data source '{source}' is not a packaged data set ({', '.join(CLASSIFICATION_TASKS)}), "
            f"a packaged text ({', '.join(PACKAGED_TEXTS)}) or a text file"
        )


def load_batches(
    tokenizer: Any, source: str, opts: DataOptions, *, split: str | None = None, single: bool = False
) -> list[Batch]:
    """Batches of ``source`` (see :class:`DataOptions`); ``single``: one example per batch, so no row is
    padding (statistics gathered by hooks see every row)."""
    size = 1 if single else opts.batch_size
    if source in CLASSIFICATION_TASKS:
        part = getattr(assets.load_dataset(source), split or opts.split)
        g = torch.Generator().manual_seed(opts.seed)
        pick = torch.randperm(len(part.y), generator=g)[: opts.samples].tolist()
        texts, labels = [part.x[i] for i in pick], torch.as_tensor(part.y[pick], dtype=torch.long)
        out = []
        for i in range(0, len(texts), size):
            enc = tokenizer(
                texts[i : i + size],
                truncation=True,
                max_length=opts.seq_len,
                padding=True,
                return_tensors="pt",
            )
            out.append({**dict(enc), "labels": labels[i : i + size]})
        return out
    check_source(source)
    windows = calibration_batches(tokenizer, source, opts.samples, opts.seq_len, size)
    return [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in windows]


def inputs_of(batch: Any) -> Any:
    """A batch without its labels (what the model is called with); a tensor or tuple batch as it is."""
    return {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, Mapping) else batch


def logits_of(model: nn.Module, batch: Batch, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """The model's logits on ``batch`` ([B, C] for a classifier, [B, T, V] for a causal LM), optionally with
    ``params`` in place of its own tensors (``torch.func.functional_call``)."""
    kw = inputs_of(batch)
    out = model(**kw) if params is None else torch.func.functional_call(model, dict(params), (), kw)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        raise WeightsmithError(
            f"{type(model).__name__} gives no logits (a bare encoder?): this merge needs a model with an "
            "output distribution, a causal LM or a sequence classifier"
        )
    return logits


def token_logits(logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor | None]:
    """Rows of predictive distributions and their observed targets: for a causal LM every non-padding
    position but the last with the next token, for a classifier each example with its label (or None)."""
    if logits.dim() == 2:
        return logits, batch.get("labels")
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[:, 1:].bool()
    return logits[:, :-1][mask], batch["input_ids"][:, 1:][mask]


def split_examples(batches: Sequence[Batch]) -> Iterator[Batch]:
    """Each example of ``batches`` as a batch of one, padding removed."""
    for b in batches:
        for i in range(len(b["input_ids"])):
            one = {k: v[i : i + 1] for k, v in b.items()}
            if "attention_mask" in one and one["input_ids"].dim() == 2:
                keep = one["attention_mask"][0].bool()
                one = {k: (v[:, keep] if v.dim() == 2 else v) for k, v in one.items()}
            yield one


# --------------------------------------------------------------------------------------- model handling


def model_kind(config_dir: Path) -> str:
    """``causal-lm``, ``classification`` or ``encoder`` from ``config.json``'s architectures."""
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(config_dir).architectures or []
    if any("CausalLM" in a for a in archs):
        return "causal-lm"
    if any("SequenceClassification" in a for a in archs):
        return "classification"
    return "encoder"


def load_architecture(config_dir: Path | None, method: str) -> tuple[nn.Module, Any]:
    """One instance of the models' class (from the base's, else the first model's folder), its tokenizer."""
    if config_dir is None or not (config_dir / "config.json").is_file():
        raise WeightsmithError(
            f"{method} runs the models, so it needs a model folder with config.json and a tokenizer "
            f"(got {config_dir})"
        )
    kind = model_kind(config_dir)
    num_labels = None
    if kind == "classification":
        from transformers import AutoConfig

        num_labels = int(AutoConfig.from_pretrained(config_dir).num_labels)
    try:
        model, tok = models.load_model(config_dir, task=kind, num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise WeightsmithError(
            f"{config_dir}: a data-aware merge runs the models, so it needs a tokenizer ({exc})"
        ) from None
    return model, tok


def load_weights(model: nn.Module, weights: Mapping[str, Tensor], source: str = "a model") -> None:
    """Copy ``weights`` (a state dict or a lazy store) into ``model``; every floating parameter the store
    names must be there (tied weights may be absent)."""
    own = model.state_dict()
    missing = [n for n, p in model.named_parameters() if n not in weights]
    tied = {n for n in missing if any(own[n].data_ptr() == own[m].data_ptr() for m in own if m in weights)}
    if set(missing) - tied:
        raise WeightsmithError(
            f"{source} lacks {len(set(missing) - tied)} parameter(s) of {type(model).__name__}: "
            f"{', '.join(sorted(set(missing) - tied)[:3])}"
        )
    with torch.no_grad():
        for n, t in own.items():
            if n in weights:
                t.copy_(weights[n].to(t.dtype))


def merged_state(
    states: Sequence[Mapping[str, Tensor]],
    merge_one: Callable[[str, list[Tensor]], Tensor],
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """In memory: ``merge_one(name, [tensor of each state])`` for every floating tensor of ``states[0]``."""
    todo = names if names is not None else [n for n, t in states[0].items() if t.is_floating_point()]
    return {n: merge_one(n, [s[n].float() for s in states]) for n in todo}


def write_merged(
    recipe: _core.MergeJob,
    stores: Sequence[WeightStore],
    merge_one: Callable[[str, list[Tensor]], Tensor],
    out: Path,
    method: str,
    kw: dict[str, Any],
) -> Path:
    """Stream ``merge_one`` over the selected floating tensors of ``stores`` into a model folder ``out``."""
    dtype = _core.parse_dtype(kw.pop("dtype", None))
    return _core.write_model(
        stores,
        merge_one,
        out,
        merged=_core.selected_names(stores[0], recipe.select),
        dtype=dtype,
        device=resolve_device(kw.pop("device", "cpu")),
        force=kw.pop("force", False),
        shard_bytes=_core.parse_size(kw.pop("shard_size", "2GB")),
        copy_from=recipe.copy_from(),
        extra_files=kw.pop("extra_files", None),
        description=method,
    )


def open_checked(
    recipe: _core.MergeJob, method: str, need_base: bool, no_weights: str | None = None
) -> tuple[list[WeightStore], Any, nn.Module, Any]:
    """The recipe's models (and base when ``need_base``), checked to be one architecture, and one instance
    of that architecture with its tokenizer. ``no_weights``: why per-model weights are refused (None: they
    are allowed)."""
    stores = recipe.open_models()
    if not stores:
        raise WeightsmithError(f"{method}: nothing to merge, give at least one model")
    base = recipe.open_base() if need_base else None
    if need_base and base is None:
        raise WeightsmithError(f"{method} needs a base model (base: ...)")
    if no_weights and recipe.weights is not None and any(w != 1.0 for w in recipe.weights):
        raise WeightsmithError(f"{method} takes no per-model weights: {no_weights}")
    _core.check_inputs(([base] if base is not None else []) + stores, None)
    model, tok = load_architecture(recipe.copy_from(), method)
    return stores, base, model, tok


def mean_of(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ w_i t_i / Σ w_i in float32 (plain mean without weights)."""
    w = list(weights) if weights is not None else [1.0] * len(tensors)
    acc = sum((wi * t.float() for wi, t in zip(w, tensors, strict=True)), torch.zeros(()))
    return acc / sum(w)


# --------------------------------------------------------------------------------------- mergekit YAML
