"""The probe harness itself: it must fail a probe whenever the refusal contract is broken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probes.harness import _diff, probe, run_cli, snapshot


def test_snapshot_sees_new_hidden_changed_and_removed_entries(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("a")
    (tmp_path / "gone").write_text("b")
    before = snapshot(tmp_path)
    (tmp_path / "keep").write_text("A")
    (tmp_path / "gone").unlink()
    (tmp_path / ".out.json.ws-staging-1-0").write_text("")
    problems = _diff(before, snapshot(tmp_path))
    assert any(p.startswith("new:") and "ws-staging" in p for p in problems)
    assert any(p.startswith("changed:") and p.endswith("keep (file -> file)") for p in problems)
    assert any(p.startswith("removed:") and "gone" in p for p in problems)


def test_probe_fails_on_success_on_unnamed_culprit_and_on_written_output(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"w.weight": torch.randn(8, 8)}, model)
    out = tmp_path / "o" / "a.json"
    with pytest.raises(AssertionError, match="expected exit 2"):
        probe(["analyze", str(model), "--out", str(out), "--no-farms", "--device", "cpu"], "x", out=out)
    with pytest.raises(AssertionError, match="does not name"):
        probe(["analyze", str(model), "--device", "tpu"], "--precision")
    res = run_cli(["analyze", str(model), "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output


def test_probe_fails_when_a_refused_run_leaves_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate a command that writes debris and then refuses: the harness must notice the new file."""
    from weightsmith.cli import _options

    real = _options.device

    def leaky(value: str, option: str = "--device") -> str | None:
        (tmp_path / ".o.json.ws-staging-1-0").write_text("debris")
        return real(value, option)

    monkeypatch.setattr(_options, "device", leaky)
    with pytest.raises(AssertionError, match="touched the file system"):
        probe(["analyze", "minilm", "--device", "tpu", "--out", str(tmp_path / "o.json")], "tpu",
              out=tmp_path / "o.json")  # fmt: skip
