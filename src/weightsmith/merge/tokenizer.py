"""The output tokenizer of a merge, and the embedding / LM-head rows of its tokens (mergekit's
``tokenizer_source``, ``tokenizer:`` block and ``chat_template`` keys).

Merging models whose vocabularies differ needs one output vocabulary and, for each input model, its
token-indexed tensors (input embeddings, LM head) re-indexed to it before the merge method sees them.
This follows mergekit 0.1.5's documented semantics (Goddard et al., "Arcee's MergeKit: A Toolkit for
Merging Large Language Models", EMNLP 2024 Industry, arXiv:2403.13257):

- **Output vocabulary.** ``base``: the base model's tokenizer (the first model's when there is no base),
  stripped of tokens whose id is not below the model's ``vocab_size``. ``union``: the base's tokenizer plus
  every other token of every model (ids below the model's ``vocab_size``), then every model's added
  (special) tokens, first definition wins. ``MODEL``: that model's tokenizer. The ``tokens:`` keys of the
  ``tokenizer:`` block are added when absent. ``pad_to_multiple_of`` pads the row count.
- **Rows of each model** (``E_m`` its token-indexed tensor, ``p_m(v)`` the row of output token v in model
  m or none): ``E'_m[v] = E_m[p_m(v)]`` when model m has v and v is not forced; otherwise a default row
  d(v) shared by the models of the tensor: the configured source for v (``{kind: zero}``; a model, whose own
  row of v is used; ``{kind: model_token, model, token | token_id}``), else, when v is in exactly one model,
  that model's row; in none, zeros; in the base, the base's row; else the mean of the rows of the models that
  have it, d(v) = (1/|S|) sum_{m in S} E_m[p_m(v)]. Padding rows are each model's mean row (Hewitt,
  "Initializing New Word Embeddings for Pretrained Language Models", 2021).

Where mergekit is not deterministic we fix an order: mergekit numbers the union's new tokens in the
iteration order of a Rust hash map (random per process); we number them by model (the base, then the YAML
order) and by id within a model. Which token gets which id is the only difference; every token's rows are
mergekit's (tests compare the matrices token by token).

The Hugging Face tokenizer objects come from ``transformers`` (imported only when a tokenizer is built).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..progress import log
from ._chat_templates import TEMPLATES

VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings)\.weight$"
)
TOKENIZER_FILES = (
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json", "*.model",
    "chat_template*",
)  # fmt: skip
TOKEN_KINDS = ("model_token", "zero")


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is token-indexed along its first axis (input embeddings, LM head)."""
    return bool(VOCAB_TENSOR.search(name))


# ---------------------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: ``model`` (that model's row of the token), ``model_token``
    (a given token or id of ``model``) or ``zero``."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer keys of a mergekit YAML: ``source`` (``union``, ``base``, a model, or None when only
    ``chat_template`` is given), per-token rules, padding and the chat template (resolved text or
    ``auto``)."""

    source: str | None
    tokens: Mapping[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    key: str = "tokenizer_source"  # where ``source`` was given, for messages


def _model_name(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WeightsmithError(f"{where}: {key} must be a model path or name (got {str(value)[:80]})")
    return value


def _token_source(value: Any, key: str, where: str) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        return TokenSource("model", _model_name(value, key, where))
    if not isinstance(value, Mapping) or value.get("kind") not in TOKEN_KINDS:
        raise WeightsmithError(
            f"{where}: {key} is a model, {{kind: zero}} or {{kind: model_token, model: M, token: T}} "
            f"(got {str(value)[:120]})"
        )
    allowed = {"kind"} if value["kind"] == "zero" else {"kind", "model", "token", "token_id"}
    extra = sorted(str(k) for k in set(value) - allowed)
    if extra:
        raise WeightsmithError(f"{where}: {key} has unknown key(s) {extra}; allowed: {sorted(allowed)}")
    if value["kind"] == "zero":
        return TokenSource("zero")
    token, token_id = value.get("token"), value.get("token_id")
    if (token is None) == (token_id is None):
        raise WeightsmithError(f"{where}: {key} (model_token) needs exactly one of 'token' and 'token_id'")
    if token is not None and not isinstance(token, str):
        raise WeightsmithError(f"{where}: {key}.token must be a string (got {str(token)[:80]})")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise WeightsmithError(f"{where}: {key}.token_id must be a non-negative integer (got {token_id!r})")
    return TokenSource("model_token", _model_name(value.get("model"), f"{key}.model", where), token, token_id)


def _chat_template(value: Any, where: str) -> str | None:
    """mergekit's rule: ``auto``, a template name, or a literal Jinja template (>= 20 characters with a
    ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise WeightsmithError(
            f"{where}: chat_template must be a name or a Jinja template (got {value!r:.80})"
        )
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value and value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise WeightsmithError(
            f"{where}: chat_template {value[:80]!r} is neither a known template "
            f"({', '.join(sorted(TEMPLATES))}, auto) nor a Jinja template"
        )
    return value


def parse(config: Mapping[str, Any], where: str) -> TokenizerSpec | None:
    """The tokenizer keys of a mergekit YAML, checked (None when it has none)."""
    source, block = config.get("tokenizer_source"), config.get("tokenizer")
    template = _chat_template(config.get("chat_template"), where)
    if source is not None and block is not None:
        raise WeightsmithError(f"{where}: give either 'tokenizer_source' or a 'tokenizer:' block, not both")
    tokens: dict[str, TokenRule] = {}
    pad = None
    if block is not None:
        if not isinstance(block, Mapping):
            raise WeightsmithError(f"{where}: 'tokenizer' must be a mapping (got {str(block)[:80]})")
        extra = sorted(str(k) for k in set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if extra:
            raise WeightsmithError(
                f"{where}: unknown key(s) {extra} in 'tokenizer'; known: pad_to_multiple_of, source, tokens"
            )
        source = block.get("source", "union")
        raw = block.get("tokens") or {}
        if not isinstance(raw, Mapping):
            raise WeightsmithError(
                f"{where}: tokenizer.tokens must map tokens to rules (got {str(raw)[:80]})"
            )
        for tok, rule in raw.items():
            key = f"tokenizer.tokens[{str(tok)[:40]!r}]"
            if not isinstance(tok, str) or not tok:
                raise WeightsmithError(f"{where}: {key}: a token is a non-empty string")
            rule = rule or {}
            if not isinstance(rule, Mapping) or set(rule) - {"source", "force"}:
                raise WeightsmithError(
                    f"{where}: {key} is {{source: ..., force: true|false}} (got {rule!r:.120})"
                )
            force = rule.get("force", False)
            if not isinstance(force, bool):
                raise WeightsmithError(f"{where}: {key}.force must be true or false (got {force!r:.40})")
            tokens[tok] = TokenRule(_token_source(rule.get("source"), f"{key}.source", where), force)
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad <= 0):
            raise WeightsmithError(
                f"{where}: tokenizer.pad_to_multiple_of must be a positive integer (got {pad!r})"
            )
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    if source is not None:
        source = _model_name(source, key, where)
    if source is None and template is None:
        return None
    return TokenizerSpec(source, tokens, pad, template, key)


# ----------------------------------------------------------------------------------------- building


def _vocab_size(folder: Path | None) -> int | None:
    """``vocab_size`` of a model's config.json (or its ``text_config``'s), when there is one."""
    cfg = folder / "config.json" if folder is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for d in (data, data.get("text_config") or {}):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
            return int(d["vocab_size"])
    return None


def load_tokenizer(folder: Path | None, what: str) -> Any:
    """A fast Hugging Face tokenizer from ``folder``; a message naming ``what`` when there is none."""
    import transformers

    if folder is None or not folder.is_dir():
        raise WeightsmithError(f"{what}: no model folder to read a tokenizer from ({folder})")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise WeightsmithError(f"{what}: cannot load a tokenizer from {folder} ({str(exc)[:200]})") from None


def _strip(tok: Any, size: int, what: str) -> Any:
    """``tok`` without the tokens whose id is >= ``size`` (BPE only, as mergekit)."""
    import tokenizers

    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise WeightsmithError(
            f"{what}: its tokenizer has {len(unused)} token(s) beyond vocab_size {size} and is "
            f"{data['model']['type']}; only a BPE tokenizer can be cut to the model's vocabulary"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in pair)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _copy(tok: Any) -> Any:
    import transformers

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def _by_id(vocab: Mapping[str, int]) -> list[str]:
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def _union(base: Any, toks: Sequence[tuple[Any, int]]) -> Any:
    """The base's tokenizer plus every other model's tokens (ids below its vocabulary size), then every
    model's added tokens (the first definition of each wins)."""
    added: dict[str, Any] = {}
    for tok, size in toks:
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < size and info.content not in added:
                added[info.content] = info
    base_vocab = base.get_vocab()
    new: dict[str, None] = {}
    for tok, size in toks:
        vocab = tok.get_vocab()
        for t in _by_id(vocab):
            if vocab[t] < size and t not in added and t not in base_vocab:
                new.setdefault(t, None)
    out = _copy(base)
    if new:
        out.add_tokens(list(new))
    if added:
        out.add_tokens(list(added.values()))
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and, for each model, the source row of each output token (-1: absent)."""

    tokenizer: Any
    tokens: list[str]  # by output id
    size: int  # rows of the output tensors (padded)
    rows: dict[str, Tensor]
    original: dict[str, dict[str, int]]
    rules: Mapping[str, TokenRule]
    where: str = "mergekit config"

    def remap(
        self, models: Sequence[str], base: str | None, tensors: Sequence[Tensor], name: str
    ) -> list[Tensor]:
        """The token-indexed ``tensors`` of ``models`` (one per model, vocabulary on axis 0) re-indexed to the
        output vocabulary, missing and forced tokens filled with their default rows."""
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1 or any(t.dim() == 0 or t.shape[0] == 0 for t in tensors):
            raise WeightsmithError(
                f"{self.where}: tensor '{name}' has different non-vocabulary shapes in its inputs: "
                + ", ".join(f"{m} {tuple(t.shape)}" for m, t in zip(models, tensors, strict=True))
            )
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        n = len(self.tokens)
        perm = torch.stack([self.rows[m] for m in models])  # [models, n]
        for m, p, t in zip(models, perm, tensors, strict=True):
            if int(p.max()) >= t.shape[0]:
                raise WeightsmithError(
                    f"{self.where}: {m}'s tensor '{name}' has {t.shape[0]} rows, but its tokenizer has token "
                    f"id {int(p.max())}; the model's vocab_size and tensor disagree"
                )
        present = perm >= 0
        forced = torch.tensor(
            [bool(self.rules.get(t, TokenRule()).force) for t in self.tokens], dtype=torch.bool
        )
        need = forced | ~present.all(0)
        defaults = {
            v: self._default(v, models, base, tensors, perm, name, dtype)
            for v in need.nonzero().flatten().tolist()
        }
        out = []
        for i, t in enumerate(tensors):
            new = torch.zeros((self.size, *t.shape[1:]), dtype=dtype, device=t.device)
            keep = present[i] & ~forced
            idx = keep.nonzero().flatten()
            new[idx] = t[perm[i, idx]].to(dtype)
            for v, row in defaults.items():
                if not bool(keep[v]):
                    new[v] = row
            if self.size > n:
                new[n:] = torch.mean(new[:n], dim=0)
            out.append(new)
        return out

    def _default(
        self,
        v: int,
        models: Sequence[str],
        base: str | None,
        tensors: Sequence[Tensor],
        perm: Tensor,
        name: str,
        dtype: torch.dtype,
    ) -> Tensor:
        token = self.tokens[v]
        has = [int(perm[i, v]) >= 0 for i in range(len(models))]
        rule = self.rules.get(token)
        if rule is None:  # mergekit's automatic sources
            if sum(has) == 1:
                i = has.index(True)
                return tensors[i][int(perm[i, v])]
            if not any(has):
                log(f"token {token!r} is in no input model: its rows of '{name}' are zero")
                return tensors[0].new_zeros(tensors[0].shape[1:])
            if base is not None and base in models and has[models.index(base)]:
                i = models.index(base)
                return tensors[i][int(perm[i, v])]
            embed = torch.zeros(tensors[0].shape[1:], dtype=dtype, device=tensors[0].device)
            count = 0
            for i, ok in enumerate(has):
                if ok:
                    embed = embed + tensors[i][int(perm[i, v])]
                    count += 1
            return embed / count
        key = f"tokenizer.tokens[{token[:40]!r}]"
        src = rule.source
        if src is None:
            raise WeightsmithError(
                f"{self.where}: {key} needs a 'source' (it is forced or missing from some of "
                f"{', '.join(models)} in '{name}')"
            )
        if src.kind == "zero":
            return tensors[0].new_zeros(tensors[0].shape[1:])
        if src.model not in models:
            raise WeightsmithError(
                f"{self.where}: {key}.source is {src.model}, which is not an input of '{name}' "
                f"(inputs: {', '.join(models)})"
            )
        i = models.index(src.model)
        if src.kind == "model":
            if not has[i]:
                raise WeightsmithError(f"{self.where}: {key}.source: {src.model} has no token {token!r}")
            return tensors[i][int(perm[i, v])]
        row = src.token_id
        if row is None:
            vocab = self.original.get(models[i], {})
            if src.token not in vocab:
                raise WeightsmithError(f"{self.where}: {key}.source: {src.model} has no token {src.token!r}")
            row = vocab[str(src.token)]
        if not 0 <= row < tensors[i].shape[0]:
            raise WeightsmithError(
                f"{self.where}: {key}.source.token_id {row} is outside {src.model}'s "
                f"{tensors[i].shape[0]} rows"
            )
        return tensors[i][row]

    def save(self, folder: Path, template: str | None) -> None:
        """Write the tokenizer files into ``folder`` (replacing any copied there)."""
        save_tokenizer(self.tokenizer, folder, template)


def build(
    spec: TokenizerSpec,
    base: str | None,
    models: Sequence[str],
    folder: Callable[[str], Path | None],
    where: str = "mergekit config",
) -> Vocabulary:
    """The output tokenizer of ``spec`` over ``models`` (every model the YAML names; the base first when
    there is one) and each model's row of each output token. ``folder(model)`` is a model's directory."""
    assert spec.source is not None
    base = base or models[0]
    order = [base, *[m for m in dict.fromkeys(models) if m != base]]
    sizes = {m: _vocab_size(folder(m)) for m in order}
    base_tok = load_tokenizer(folder(base), f"{where}: the base model {base}")
    size = sizes[base] or len(base_tok.get_vocab())
    base_tok = _strip(base_tok, size, f"{where}: {base}")
    toks: dict[str, Any] = {base: base_tok}
    for m in order[1:]:
        try:
            toks[m] = load_tokenizer(folder(m), m)
        except WeightsmithError as exc:
            log(f"{exc}; assuming {m} uses the tokenizer of {base}")
    original = {m: t.get_vocab() for m, t in toks.items()}  # before any token is added to the output
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, [(t, sizes[m] or len(t.get_vocab())) for m, t in toks.items()])
    else:
        what = f"{where}: {spec.key} {spec.source}"
        try:
            src = folder(spec.source)
        except WeightsmithError as exc:
            raise WeightsmithError(f"{what}: {exc}") from None
        out = load_tokenizer(src, what)
    have = set(out.get_vocab())
    extra = [t for t in spec.tokens if t not in have]
    if extra:
        out.add_tokens(extra)
    vocab = out.get_vocab()
    tokens = _by_id(vocab)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise WeightsmithError(
            f"{where}: the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps"
        )
    rows = {}
    for m in order:
        mv = original.get(m, original[base])
        limit = sizes[m] if sizes[m] is not None else len(mv)
        rows[m] = torch.tensor([i if (i := mv.get(t, -1)) < limit else -1 for t in tokens], dtype=torch.long)
    padded = len(tokens)
    if spec.pad_to_multiple_of and padded % spec.pad_to_multiple_of:
        padded += spec.pad_to_multiple_of - padded % spec.pad_to_multiple_of
    return Vocabulary(out, tokens, padded, rows, original, spec.tokens, where)


def auto_template(folders: Sequence[Path | None]) -> str | None:
    """The chat template most of the models' tokenizers carry (the first such on a tie), else None."""
    found = []
    for f in folders:
        try:
            tmpl = load_tokenizer(f, str(f)).chat_template
        except WeightsmithError:
            continue
        if isinstance(tmpl, dict):
            tmpl = tmpl.get("default")
        if tmpl:
            found.append(str(tmpl).strip())
    return Counter(found).most_common(1)[0][0] if found else None


def save_tokenizer(tok: Any, folder: Path, template: str | None) -> None:
    """Replace the tokenizer files in ``folder`` with ``tok``'s (with ``template`` as its chat template)."""
    for pattern in TOKENIZER_FILES:
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink()
    if template is not None:
        tok.chat_template = template
    try:
        tok.save_pretrained(str(folder))
    except OSError as exc:
        raise WeightsmithError(f"writing the tokenizer into {folder} failed ({exc.strerror or exc})") from exc
