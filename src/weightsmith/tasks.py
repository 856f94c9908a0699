"""Training tasks on the packaged data: sentence classification on ``minilm`` and language modelling on
``smollm2``.

A task builds its model (with tokenizer), yields seeded training batches, computes the loss and its
evaluation metric. Adapters attach to the task's *backbone* (the pretrained network); a classification
head, when there is one, is always trainable and saved beside the adapter.

- ``rotten_tomatoes`` / ``debates`` / ``speeches``: mean-pooled encoder states (the pooling MiniLM was
  trained with) followed by a linear head; metric: accuracy.
- ``hamlet``: causal language modelling on blocks of ``max_len`` tokens from the first 90 % of the play;
  metric: perplexity on the last 10 % (strided windows of ``2 * max_len`` tokens, stride ``max_len``,
  ``weightsmith.evaluate.perplexity``).

``eval_examples`` counts examples on every task: sentences for classification, windows (one forward pass
each) for language modelling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import assets, evaluate, models
from .errors import WeightsmithError

CLASSIFICATION_TASKS = ("rotten_tomatoes", "debates", "speeches")
LM_TASKS = ("hamlet",)
TASKS = CLASSIFICATION_TASKS + LM_TASKS
DEFAULT_MODEL = {**{t: "minilm" for t in CLASSIFICATION_TASKS}, "hamlet": "smollm2"}
LM_TRAIN_FRACTION = 0.9

Batch = dict[str, torch.Tensor]


class SentenceClassifier(nn.Module):
    """``head(mean_pool(encoder(x)))``: the encoder is a Hugging Face encoder (e.g. BertModel)."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled.to(self.head.weight.dtype))


@dataclass
class Task:
    """A task instance bound to a model spec and data options (see :func:`get_task`)."""

    name: str
    model_spec: str
    max_examples: int | None = None
    max_len: int = 64
    eval_examples: int | None = None

    @property
    def kind(self) -> str:
        return "classification" if self.name in CLASSIFICATION_TASKS else "lm"

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.kind == "classification" else "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    # ------------------------------------------------------------------ model
    def build(self) -> tuple[nn.Module, Any]:
        """A fresh ``(model, tokenizer)`` in float32 with the pretrained weights."""
        if self.kind == "classification":
            encoder, tok = models.load_model(self.model_spec, task="encoder")
            if getattr(encoder.config, "is_decoder", False) or not hasattr(encoder.config, "hidden_size"):
                raise WeightsmithError(
                    f"task '{self.name}' needs an encoder model; '{self.model_spec}' is not one"
                )
            return SentenceClassifier(encoder, len(self.dataset.classes)), tok
        model, tok = models.load_model(self.model_spec, task="causal-lm")
        return model, tok

    def backbone(self, model: nn.Module) -> nn.Module:
        """The pretrained network adapters attach to (the encoder, or the whole causal LM)."""
        return model.encoder if isinstance(model, SentenceClassifier) else model

    @property
    def default_targets(self) -> str | None:
        """Weights adapted when none are named: every linear layer of the encoder blocks (not the unused
        pooler) for classification; every linear layer except ``lm_head`` for language modelling."""
        return r"re:^encoder\.layer\.\d+\." if self.kind == "classification" else None

    def head(self, model: nn.Module) -> nn.Module | None:
        """The always-trainable task head, or None."""
        return model.head if isinstance(model, SentenceClassifier) else None

    # ------------------------------------------------------------------ data
    @property
    def dataset(self) -> assets.Dataset:
        return assets.load_dataset(self.name)

    def _train_xy(self) -> tuple[list[str], np.ndarray]:
        split = self.dataset.train
        n = len(split.y) if self.max_examples is None else min(self.max_examples, len(split.y))
        return list(split.x[:n]), np.asarray(split.y[:n])

    def lm_texts(self) -> tuple[str, str]:
        """(train text, validation text): the play cut at the line break nearest 90 %."""
        text = assets.load_text(self.name)
        cut = text.rfind("\n", 0, int(len(text) * LM_TRAIN_FRACTION)) + 1
        return text[:cut], text[cut:]

    def prepare(self, tokenizer: Any) -> None:
        """Tokenize the training data once (called by the trainer)."""
        if self.kind == "classification":
            x, y = self._train_xy()
            enc = tokenizer(x, truncation=True, max_length=self.max_len)
            self._ids: list[list[int]] = list(enc["input_ids"])
            self._labels = torch.as_tensor(y, dtype=torch.long)
            self._pad_id = int(tokenizer.pad_token_id or 0)
        else:
            train_text, _ = self.lm_texts()
            ids = tokenizer(train_text, return_tensors="pt").input_ids[0]
            n_blocks = len(ids) // self.max_len
            blocks = ids[: n_blocks * self.max_len].view(n_blocks, self.max_len)
            if self.max_examples is not None:
                blocks = blocks[: self.max_examples]
            self._blocks = blocks

    def num_examples(self) -> int:
        return len(self._ids) if self.kind == "classification" else len(self._blocks)

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.num_examples() / batch_size)

    def batches(self, epoch: int, seed: int, batch_size: int) -> Iterator[Batch]:
        """The training batches of one epoch, in an order fixed by ``(seed, epoch)``."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples(), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if self.kind == "lm":
                block = self._blocks[idx]
                yield {"input_ids": block, "attention_mask": torch.ones_like(block)}
                continue
            seqs = [self._ids[j] for j in idx.tolist()]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.as_tensor(s)
                mask[r, : len(s)] = 1
            yield {"input_ids": ids, "attention_mask": mask, "labels": self._labels[idx]}

    # ------------------------------------------------------------------ loss / metric
    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits for ``batch`` (per example for classification, per token for an LM)."""
        if self.kind == "classification":
            return model(batch["input_ids"], batch["attention_mask"])  # type: ignore[no-any-return]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits  # type: ignore[no-any-return]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the batch's examples (classification) or predicted tokens (LM)."""
        logits = self.logits(model, batch)
        if self.kind == "classification":
            return nn.functional.cross_entropy(logits.float(), batch["labels"])
        return lm_loss(logits, batch["input_ids"])

    def split(self, batch: Batch, max_tokens: int | None) -> list[tuple[Batch, float]]:
        """``batch`` cut into micro-batches of at most ``max_tokens`` tokens (at least one example each),
        with the weight of each micro-batch's mean loss in the batch's mean: ``sum(w * loss(micro))``
        equals ``loss(batch)`` (every example holds the same number of loss terms: one label per
        sentence, ``max_len - 1`` predicted tokens per LM block). ``None`` keeps the batch whole."""
        rows, width = batch["input_ids"].shape
        if max_tokens is None or rows * width <= max_tokens:
            return [(batch, 1.0)]
        per = max(1, max_tokens // max(width, 1))
        return [
            ({k: v[i : i + per] for k, v in batch.items()}, min(per, rows - i) / rows)
            for i in range(0, rows, per)
        ]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer: Any, split: str = "val", device: Any = "cpu") -> float:
        """Accuracy (classification) or perplexity (LM) on ``split`` ("val" or "test")."""
        was_training = model.training
        model.eval()
        try:
            if self.kind == "lm":
                _, val_text = self.lm_texts()
                return evaluate.perplexity(
                    model,
                    tokenizer,
                    val_text,
                    window=2 * self.max_len,
                    stride=self.max_len,
                    device=device,
                    max_windows=self.eval_examples,
                )
            data = getattr(self.dataset, split)
            n = len(data.y) if self.eval_examples is None else min(self.eval_examples, len(data.y))

            def predict(texts: Sequence[Any]) -> torch.Tensor:
                enc = tokenizer(
                    list(texts), truncation=True, max_length=self.max_len, padding=True, return_tensors="pt"
                ).to(device)
                return model(enc["input_ids"], enc["attention_mask"]).float()

            return evaluate.accuracy(predict, list(data.x[:n]), list(np.asarray(data.y[:n])), batch_size=128)
        finally:
            model.train(was_training)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the mean of ``-log softmax(logits[:, t])[ids[:, t + 1]]`` over every
    position but the last of each row. The targets are shifted instead of the logits, so no copy of the
    ``[B, T, vocab]`` logits is made (the last position is ignored with ``ignore_index``)."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def get_task(
    name: str,
    model: str | None = None,
    max_examples: int | None = None,
    max_len: int | None = None,
    eval_examples: int | None = None,
) -> Task:
    """A task by name (``rotten_tomatoes``, ``debates``, ``speeches``, ``hamlet``)."""
    if name not in TASKS:
        raise WeightsmithError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    for option, value in (("--max-examples", max_examples), ("--eval-examples", eval_examples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise WeightsmithError(f"{option} must be an integer of at least 1 (got {value!r})")
    default_len = 64 if name in CLASSIFICATION_TASKS else 128
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 8):
        raise WeightsmithError(f"--max-len must be at least 8 (got {max_len})")
    return Task(name, model or DEFAULT_MODEL[name], max_examples, max_len or default_len, eval_examples)
