"""The README's Python blocks run as written, on CPU, in an empty working directory (issue 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """Every fenced ```python block of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks and all(b.strip() for b in blocks)
    assert python_blocks("```python\nx = 1\n```\n```bash\nls\n```\n") == ["x = 1\n"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the README must run on a CPU-only machine")
@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs_on_cpu(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = python_blocks(README.read_text(encoding="utf-8"))[index]
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    if "report.write(" in block:
        assert any(p.suffix == ".html" for p in tmp_path.iterdir())
