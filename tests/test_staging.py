"""The one staging writer: old outputs survive until the new one is complete, special files and symlinks are
respected, debris never survives, concurrent writers never swap silently."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from weightsmith import staging
from weightsmith.errors import WeightsmithError


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_file_output_appears_whole_with_normal_permissions(tmp_path):
    with staging.staged_file(tmp_path / "a.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.json.ws-staging-")
        tmp.write_text("{}")
        assert not (tmp_path / "a.json").exists()
    assert (tmp_path / "a.json").read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert _listing(tmp_path) == ["a.json"]


def test_private_library_files_get_normal_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    with staging.staged_dir(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert (tmp / "model.safetensors").stat().st_mode & 0o777 == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_existing_output_refused_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(WeightsmithError, match="already exists; pass --force"):
        staging.check_output(tmp_path / "out", force=False, directory=True)


def test_force_keeps_old_directory_until_commit_and_on_failure(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model").write_text("old")
    with pytest.raises(RuntimeError), staging.staged_dir(out, force=True) as tmp:
        (tmp / "model").write_text("new, half")
        assert (out / "model").read_text() == "old"
        raise RuntimeError("diverged")
    assert (out / "model").read_text() == "old"
    assert _listing(tmp_path) == ["run"]
    with staging.staged_dir(out, force=True) as tmp:
        (tmp / "model").write_text("new")
    assert (out / "model").read_text() == "new"
    assert _listing(tmp_path) == ["run"]


def test_keyboard_interrupt_leaves_no_debris(tmp_path):
    with pytest.raises(KeyboardInterrupt), staging.staged_file(tmp_path / "x.safetensors") as tmp:
        tmp.write_bytes(b"123")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["devnull", "fifo"])
def test_special_file_is_written_through_not_replaced(tmp_path, kind):
    if kind == "devnull":
        target = Path("/dev/null")
    else:
        target = tmp_path / "pipe"
        os.mkfifo(target)
        reader = subprocess.Popen(["cat", str(target)], stdout=subprocess.PIPE)
    staging.write_text(target, "hello", force=True)
    assert staging.is_special(target)
    if kind == "fifo":
        out, _ = reader.communicate(timeout=10)
        assert out == b"hello"


def test_directory_output_on_special_file_refused():
    with pytest.raises(WeightsmithError, match="special file"):
        staging.check_output("/dev/null", force=True, directory=True)


def test_symlink_stays_a_symlink(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    staging.write_text(link, "new", force=True)
    assert link.is_symlink() and target.read_text() == "new"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_killed_run_is_removed(tmp_path):
    dead = _dead_pid()
    debris = tmp_path / f".out{staging.STAGING}{dead}-0"
    debris.mkdir()
    (debris / "shard").write_bytes(b"x")
    with staging.staged_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    assert _listing(tmp_path) == ["out"]


def test_old_output_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    dead = _dead_pid()
    aside = tmp_path / f".out{staging.OLD}{dead}"
    aside.mkdir()
    (aside / "f").write_text("the user's finished run")
    staging.clean_stale(staging.final_path(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_text() == "the user's finished run"


def test_second_live_writer_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".out{staging.STAGING}{sleeper.pid}-0").mkdir()
        with pytest.raises(WeightsmithError, match=f"pid {sleeper.pid}"):
            staging.check_output(tmp_path / "out", directory=True)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_output_created_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out.json"
    s = staging.Staging(out)
    s.path.write_text("mine")
    out.write_text("someone else's")
    with pytest.raises(WeightsmithError, match="changed by someone else"):
        s.commit()
    assert out.read_text() == "someone else's"
    assert _listing(tmp_path) == ["out.json"]


def test_full_disk_becomes_a_message_naming_the_path(tmp_path):
    with pytest.raises(WeightsmithError, match="out.bin") as info, staging.staged_file(tmp_path / "out.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "free some space" in str(info.value)
    assert _listing(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_message(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WeightsmithError, match="not writable"):
            staging.check_output(ro / "out.json")
    finally:
        ro.chmod(0o755)


def test_sigterm_removes_staging(tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from weightsmith import staging
        staging.install_signal_handlers()
        with staging.staged_dir({str(tmp_path / "out")!r}) as tmp:
            (tmp / "part").write_text("x")
            Path({str(tmp_path / "ready")!r}).write_text("1")
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _listing(tmp_path) == ["ready"]
