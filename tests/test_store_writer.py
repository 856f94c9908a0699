"""ShardWriter on the one staging writer: hidden staging names, the old output kept until the swap,
normal permissions, full disks and read-only directories as errors naming the path; and the
deprecated store helpers still working as thin wrappers over ``weightsmith.staging``."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith import staging
from weightsmith import store as store_mod
from weightsmith.errors import WeightsmithError
from weightsmith.store import INDEX_NAME, ShardWriter, open_store

STATE = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}


def _write(out: Path, force: bool = False, **kw) -> Path:
    with ShardWriter(out, force=force, **kw) as w:
        for k, v in STATE.items():
            w.add(k, v)
    return out


def test_writer_stages_under_the_staging_name_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with ShardWriter(out) as w:
        w.add("a", STATE["a"])
        assert w.tmp.parent == tmp_path and w.tmp.name.startswith(f".model{staging.STAGING}{os.getpid()}-")
        assert w.tmp.is_dir() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert torch.equal(open_store(out)["a"], STATE["a"])


def test_force_keeps_the_old_output_until_close(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _write(out)
    (out / "old-marker.txt").write_text("old")
    w = ShardWriter(out, force=True)
    w.add("a", torch.zeros(2, 3))
    assert (out / "old-marker.txt").read_text() == "old", "the old output must stay until the new one is done"
    w.close()
    assert not (out / "old-marker.txt").exists() and torch.equal(open_store(out)["a"], torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_rewrite_leaves_the_old_output_intact(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _write(out)
    with pytest.raises(RuntimeError), ShardWriter(out, force=True) as w:
        w.add("a", torch.zeros(2, 3))
        raise RuntimeError("interrupted")
    assert torch.equal(open_store(out)["a"], STATE["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        single = _write(tmp_path / "single")
        with ShardWriter(tmp_path / "sharded", max_shard_bytes=16) as w:
            for k, v in STATE.items():
                w.add(k, v)
            w.write_text("config.json", "{}")
    finally:
        os.umask(old)
    files = [single / "model.safetensors", *(tmp_path / "sharded").iterdir()]
    assert len(files) == 5  # model.safetensors; two shards, the index and config.json
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "single").stat().st_mode) == 0o755


def test_full_disk_names_the_output_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    _write(out)

    def full(fh, data) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "_write_chunk", full)
    w = ShardWriter(out, force=True)
    with pytest.raises(
        WeightsmithError, match=f"writing {out} failed: No space left on device; free some space"
    ):
        w.add("a", torch.ones(3))
    assert torch.equal(open_store(out)["a"], STATE["a"]), "the old output must survive a full disk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(WeightsmithError, match="after the writer was closed"):
        w.add("b", torch.ones(1))


def test_full_disk_while_finishing_a_shard(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def flaky(fh, data) -> None:
        calls.append(len(data))
        if len(calls) > 1:  # the tensor data goes through; the header write fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fh.write(data)

    monkeypatch.setattr(store_mod, "_write_chunk", flaky)
    with pytest.raises(WeightsmithError, match="No space left on device"), ShardWriter(tmp_path / "m") as w:
        w.add("a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_names_the_path(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WeightsmithError, match=f"{ro}.*not writable"):
            ShardWriter(ro / "model")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_file_system_error_names_the_path(tmp_path: Path, monkeypatch) -> None:
    """What a read-only mount gives even to root: EROFS from the first file created in the staging."""
    real_open = open

    def ro_open(path, mode="r", *a, **kw):
        if "w" in mode and str(path).endswith(".safetensors"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", ro_open)
    with pytest.raises(WeightsmithError, match=f"writing {tmp_path / 'm'} failed: Read-only file system"):
        _write(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_zero_size_and_new_dtypes_roundtrip_through_the_library(tmp_path: Path) -> None:
    state = {
        "empty": torch.zeros(0, 4),
        "u16": torch.arange(10, dtype=torch.uint8).view(torch.uint16),
        "c64": torch.tensor([1 + 2j], dtype=torch.complex64),
        "w": torch.ones(3),
    }
    with ShardWriter(tmp_path / "m") as w:
        for k, v in state.items():
            w.add(k, v)
    loaded = load_file(str(tmp_path / "m" / "model.safetensors"))
    ours = open_store(tmp_path / "m")
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and ours[k].shape == v.shape
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8))


def test_unsupported_dtype_is_named(tmp_path: Path) -> None:
    with (
        pytest.raises(WeightsmithError, match="tensor 'z' has dtype torch.complex128"),
        ShardWriter(tmp_path / "m") as w,
    ):
        w.add("z", torch.zeros(2, dtype=torch.complex128))
    assert list(tmp_path.iterdir()) == []


def test_sharded_output_index_matches_shards(tmp_path: Path) -> None:
    out = _write(tmp_path / "m", max_shard_bytes=16)
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(STATE)
    store = open_store(out)  # the strict index checks accept what ShardWriter writes
    assert all(torch.equal(store[k], v) for k, v in STATE.items())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_safetensors_gets_normal_permissions(tmp_path: Path) -> None:
    """safetensors' own save_file creates 0600 files; the store's wrapper gives them the umask's mode."""
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        save_file({"a": torch.ones(2)}, str(tmp_path / "raw.safetensors"))
        store_mod.save_safetensors({"a": torch.ones(2)}, tmp_path / "ours.safetensors", {"k": "v"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600  # why the wrapper exists
    assert stat.S_IMODE((tmp_path / "ours.safetensors").stat().st_mode) == 0o644
    assert open_store(tmp_path / "ours.safetensors").metadata == {"k": "v"}
    with pytest.raises(WeightsmithError, match="missing-dir"):
        store_mod.save_safetensors({"a": torch.ones(2)}, tmp_path / "missing-dir" / "x.safetensors")
