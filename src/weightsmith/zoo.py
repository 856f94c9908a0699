"""Small models and trainers for evidence on packaged data: MLPs and BatchNorm CNNs on sklearn digits
(64 inputs, 8x8 images) and MNIST-1D (length-40 signals), trained from different seeds in seconds on
one CPU thread, plus task variants (rotated, flipped, inverted, pixel-permuted, noisy inputs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .assets import load_dataset
from .errors import WeightsmithError

TASKS = ("digits", "mnist1d")
VARIANTS = ("rot90", "rot180", "flip", "invert", "perm", "noise")


@dataclass(frozen=True)
class TaskData:
    """Float inputs and integer labels of one task, as tensors."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    in_dim: int
    n_classes: int


def _variant(x: np.ndarray, task: str, variant: str, seed: int) -> np.ndarray:
    if task == "digits":
        img = x.reshape(-1, 8, 8)
        if variant == "rot90":
            return np.rot90(img, 1, axes=(1, 2)).reshape(len(x), 64).copy()
        if variant == "rot180":
            return np.rot90(img, 2, axes=(1, 2)).reshape(len(x), 64).copy()
        if variant == "flip":
            return img[:, :, ::-1].reshape(len(x), 64).copy()
    elif variant in ("rot90", "rot180", "flip"):
        return x[:, ::-1].copy() if variant != "rot90" else np.roll(x, x.shape[1] // 2, axis=1)
    if variant == "invert":
        return (x.max() - x).astype(np.float32)
    if variant == "perm":
        return x[:, np.random.RandomState(1000 + seed).permutation(x.shape[1])]
    if variant == "noise":
        rng = np.random.RandomState(2000 + seed)
        return (x + rng.normal(0.0, x.std(), x.shape)).astype(np.float32)
    raise WeightsmithError(f"unknown task variant '{variant}'; use one of {', '.join(VARIANTS)}")


def load_task(task: str = "digits", variant: str | None = None, seed: int = 0) -> TaskData:
    """A packaged classification task, optionally transformed (the transform is seeded and fixed)."""
    if task not in TASKS:
        raise WeightsmithError(f"unknown zoo task '{task}'; use one of {', '.join(TASKS)}")
    d = load_dataset(task)
    parts = []
    for i, split in enumerate((d.train, d.val, d.test)):
        x = np.asarray(split.x, dtype=np.float32)
        if variant is not None:
            # the noise differs per split; every other variant is one fixed map of the input
            x = _variant(x, task, variant, seed + (i if variant == "noise" else 0))
        parts += [
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.as_tensor(split.y).long(),
        ]
    name = task if variant is None else f"{task}-{variant}"
    x_tr, y_tr, x_va, y_va, x_te, y_te = parts
    return TaskData(name, x_tr, y_tr, x_va, y_va, x_te, y_te, x_tr.shape[1], len(d.classes))


class MLP(nn.Module):
    """``in -> [Linear, ReLU] * len(hidden) -> Linear``; layers live in ``self.net`` (a Sequential)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (256, 256, 256), n_classes: int = 10) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], n_classes))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.hidden = in_dim, tuple(hidden)

    def linear_names(self) -> list[str]:
        return [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, max-pool 2, fc-ReLU, fc. 2-D on 8x8 digits, 1-D on length-40 MNIST-1D."""

    def __init__(
        self,
        side: int = 8,
        dim: int = 2,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
        c1, c2 = channels
        self.conv1, self.bn1 = conv(1, c1, 3, padding=1), bn(c1)
        self.conv2, self.bn2 = conv(c1, c2, 3, padding=1), bn(c2)
        self.pool = nn.MaxPool2d(2) if dim == 2 else nn.MaxPool1d(2)
        self.spatial = (side // 2) ** dim  # positions per channel after pooling (the flatten group size)
        self.fc1, self.fc2 = nn.Linear(c2 * self.spatial, hidden), nn.Linear(hidden, n_classes)
        self.side, self.dim = side, dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(len(x), 1, *([self.side] * self.dim))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make_model(kind: str, task: TaskData, width: int = 256, depth: int = 3) -> nn.Module:
    """A fresh zoo model for ``task``: kind "mlp" or "cnn" (``width`` = MLP hidden width or CNN fc width)."""
    if kind == "mlp":
        return MLP(task.in_dim, (width,) * depth, task.n_classes)
    if kind == "cnn":
        side, dim = (8, 2) if task.in_dim == 64 else (task.in_dim, 1)
        return CNN(side, dim, hidden=width, n_classes=task.n_classes)
    raise WeightsmithError(f"unknown zoo model kind '{kind}'; use mlp or cnn")


def train(
    model: nn.Module,
    task: TaskData,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Adam on cross-entropy over seeded mini-batches; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(task.y_train)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def train_model(
    kind: str, task: TaskData, seed: int, width: int = 256, depth: int = 3, epochs: int = 60, lr: float = 1e-3
) -> nn.Module:
    """A zoo model initialised and trained from ``seed`` (init and batch order both follow the seed)."""
    torch.manual_seed(seed)
    return train(make_model(kind, task, width, depth), task, epochs=epochs, lr=lr, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` (in eval mode) on ``x, y``."""
    model.eval()
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


@torch.no_grad()
def check_task(model: Any, task: TaskData, path: str | os.PathLike[str]) -> None:
    """Refuse a zoo model (read from ``path``) whose input size or class count is not ``task``'s."""
    in_dim = model.in_dim if isinstance(model, MLP) else model.side**model.dim
    n_classes = model.net[-1].out_features if isinstance(model, MLP) else model.fc2.out_features
    if (in_dim, n_classes) != (task.in_dim, task.n_classes):
        raise WeightsmithError(
            f"{path} takes {in_dim} inputs and {n_classes} classes, but --task {task.name} has "
            f"{task.in_dim} inputs and {task.n_classes} classes; pass the task it was trained on"
        )


def reset_bn_stats(model: nn.Module, x: Tensor, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``x`` (cumulative average), then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m, momentum in zip(bns, momenta, strict=False):
        m.momentum = momentum
    return model.eval()


def _arch(model: nn.Module) -> dict[str, object]:
    if isinstance(model, MLP):
        n_classes = model.net[-1].out_features
        return {"kind": "mlp", "in_dim": model.in_dim, "hidden": list(model.hidden), "n_classes": n_classes}
    if isinstance(model, CNN):
        return {
            "kind": "cnn",
            "side": model.side,
            "dim": model.dim,
            "channels": [model.conv1.out_channels, model.conv2.out_channels],
            "hidden": model.fc1.out_features,
            "n_classes": model.fc2.out_features,
        }
    raise WeightsmithError(f"not a zoo model: {type(model).__name__}")


def save(model: nn.Module, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a zoo model as one safetensors file (through ``weightsmith.staging``: swapped in whole, an
    existing file only with ``force``); its architecture goes in the file's metadata."""
    from safetensors.torch import save

    from .staging import write_bytes

    if Path(path).suffix != ".safetensors":
        raise WeightsmithError(f"zoo model output {path}: the file name must end in .safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"format": "pt", "weightsmith.zoo": json.dumps(_arch(model))})
    return write_bytes(path, data, force=force)


MAX_DIM = 1 << 16  # no zoo layer is wider; a larger number in a file's metadata is corrupt, not a model


def _dim(arch: dict[str, Any], key: str, low: int = 1) -> int:
    v = arch.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not (low <= v <= MAX_DIM):
        raise WeightsmithError(f"zoo architecture field '{key}' must be an integer in [{low}, {MAX_DIM}]")
    return v


def from_arch(arch: dict[str, Any]) -> nn.Module:
    """Build an empty zoo model from the architecture record ``save`` writes (every field checked)."""
    if not isinstance(arch, dict):
        raise WeightsmithError(f"zoo architecture must be a JSON object, got {type(arch).__name__}")
    hidden = arch.get("hidden")
    if arch.get("kind") == "mlp":
        if not isinstance(hidden, list) or not hidden:
            raise WeightsmithError("zoo architecture field 'hidden' must be a non-empty list of widths")
        widths = tuple(_dim({"hidden": h}, "hidden") for h in hidden)
        return MLP(_dim(arch, "in_dim"), widths, _dim(arch, "n_classes"))
    if arch.get("kind") == "cnn":
        channels = arch.get("channels")
        if not isinstance(channels, list) or len(channels) != 2:
            raise WeightsmithError("zoo architecture field 'channels' must be a list of two widths")
        c1, c2 = (_dim({"channels": c}, "channels") for c in channels)
        dim = _dim(arch, "dim")
        if dim not in (1, 2):
            raise WeightsmithError(f"zoo architecture field 'dim' must be 1 or 2, got {dim}")
        return CNN(_dim(arch, "side", 2), dim, (c1, c2), _dim(arch, "hidden"), _dim(arch, "n_classes"))
    kind = arch.get("kind")
    shown = kind if isinstance(kind, str) and len(kind) < 40 else type(kind).__name__
    raise WeightsmithError(f"unknown zoo architecture kind '{shown}'; expected mlp or cnn")


def load(path: str | os.PathLike[str]) -> nn.Module:
    """A zoo model written by ``save`` (eval mode); anything else is a WeightsmithError naming the file."""
    from .store import SafetensorsStore

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        raise WeightsmithError(f"{p}: expected a zoo model .safetensors file (see `weightsmith zoo-train`)")
    store = SafetensorsStore([p], str(p))  # validated as the safetensors library would, naming the file
    try:
        state, meta = {k: store[k] for k in store}, store.metadata
    finally:
        store.close()
    if "weightsmith.zoo" not in meta:
        raise WeightsmithError(
            f"{p}: no 'weightsmith.zoo' metadata; it was not written by weightsmith.zoo.save"
        )
    try:
        model = from_arch(json.loads(meta["weightsmith.zoo"]))
    except json.JSONDecodeError as exc:
        raise WeightsmithError(f"{p}: the 'weightsmith.zoo' metadata is not valid JSON") from exc
    except WeightsmithError as exc:
        raise WeightsmithError(f"{p}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    for name in [*expected, *(k for k in got if k not in expected)]:
        if expected.get(name) != got.get(name):
            what = "missing" if name not in got else "unexpected" if name not in expected else "shape"
            raise WeightsmithError(
                f"{p}: tensor '{name}' does not fit the architecture in its metadata ({what}: expected "
                f"{expected.get(name)}, found {got.get(name)})"
            )
    model.load_state_dict(state)
    return model.eval()
