"""``zoo.check_task``: a zoo model read from a file must take the task's input size and class count."""

from __future__ import annotations

import pytest
import torch

from weightsmith import zoo
from weightsmith.errors import WeightsmithError


def _task(name: str, in_dim: int, n_classes: int) -> zoo.TaskData:
    empty = torch.zeros(0)
    return zoo.TaskData(name, empty, empty, empty, empty, empty, empty, in_dim, n_classes)


@pytest.mark.parametrize(
    "model", [zoo.MLP(64, (8,), 10), zoo.CNN(8, 2, (2, 2), 4, 10)], ids=["mlp", "cnn-8x8"]
)
def test_check_task_accepts_the_task_it_fits_and_names_the_mismatch(model: torch.nn.Module) -> None:
    zoo.check_task(model, _task("digits", 64, 10), "a.safetensors")
    with pytest.raises(WeightsmithError, match=r"a.safetensors takes 64 inputs and 10 classes, but --task "
                       r"mnist1d has 40 inputs and 10 classes"):  # fmt: skip
        zoo.check_task(model, _task("mnist1d", 40, 10), "a.safetensors")


def test_check_task_counts_a_1d_cnn_input_as_its_length() -> None:
    model = zoo.CNN(40, 1, (2, 2), 4, 10)
    zoo.check_task(model, _task("mnist1d", 40, 10), "b.safetensors")
    with pytest.raises(WeightsmithError, match="takes 40 inputs and 10 classes, but --task digits has 64"):
        zoo.check_task(model, _task("digits", 64, 3), "b.safetensors")
