"""The bad-input probe harness: one CLI invocation that must be refused cleanly (issue 7).

A *probe* runs one ``weightsmith`` command line and asserts the contract every bad input must keep:

1. exit code 2 (a ``WeightsmithError`` turned into a message, or a usage error from the option parser);
2. the output names the culprit: every substring in ``names`` (a file, tensor or option such as ``--k``)
   appears in the combined stdout/stderr (compared with whitespace and rich panel borders squeezed out, so a
   wrapped line still matches);
3. no Python traceback (``Traceback (most recent call last)``) and no exception other than
   ``WeightsmithError`` escaped;
4. nothing new appeared: the nearest existing directory above ``out`` (the output's parent, so hidden
   staging siblings such as ``.NAME.ws-staging-PID-N`` are seen; and everything under it) has exactly the
   entries it had before; keep ``out`` in a small directory of its own (``tmp_path``);
5. nothing pre-existing changed: every file under that directory (a pre-existing ``out`` included) is
   byte-for-byte what it was, symlinks point where they pointed, and a special file (``/dev/null``, a FIFO)
   is still that kind of file.

Use it from a test::

    from probes.harness import probe   # tests/ is on sys.path (tests/conftest.py)

    def test_bad_k(tmp_path, model_file):
        probe(["compare", str(model_file), str(model_file), "--k", "0", "--json", str(tmp_path / "o.json")],
              names=["--k"], out=tmp_path / "o.json")

``probe(..., subprocess=True)`` runs ``python -m weightsmith ...`` in a child process instead (slower, ~2 s,
but it exercises ``weightsmith.cli.main`` itself: signal handlers, rich's stderr console, the real exit
code). In-process runs go through typer's ``CliRunner`` over ``weightsmith.cli._app.app`` after
``weightsmith.cli._register()`` and mirror ``cli.main``: a ``WeightsmithError`` counts as exit 2 with its
message as output. ``watch`` adds further paths whose trees must stay unchanged (e.g. an input directory).
``run_cli`` runs a command without asserting anything (for probes that need a custom check).
Probes for one area live in ``tests/probes/test_probe_<area>.py``; tables of cases go through
``pytest.mark.parametrize``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess as sp
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
_SQUEEZE = re.compile(r"[\s│╭╮╰╯─┃━┏┓┗┛]+")


@dataclass
class CliResult:
    """What one CLI run did: exit code, combined output, and the escaped exception (in-process only)."""

    exit_code: int
    output: str
    exception: BaseException | None = None
    traceback: str = ""


def run_cli(
    args: Sequence[str],
    *,
    subprocess: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> CliResult:
    """Run ``weightsmith ARGS`` in-process (default) or as ``python -m weightsmith ARGS``."""
    args = [str(a) for a in args]
    if subprocess:
        child_env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "WEIGHTSMITH_PROGRESS": "0"}
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p
        )
        child_env.update(env or {})
        proc = sp.run(
            [sys.executable, "-m", "weightsmith", *args],
            cwd=cwd,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout + proc.stderr)
    from typer.testing import CliRunner

    from weightsmith.cli import _register
    from weightsmith.cli._app import app
    from weightsmith.errors import WeightsmithError

    _register()
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, args, env={"COLUMNS": "400", **(env or {})}, catch_exceptions=True)
    finally:
        os.chdir(old)
    exc = res.exception
    if isinstance(exc, SystemExit) or exc is None:
        return CliResult(res.exit_code, res.output)
    if isinstance(exc, WeightsmithError):
        return CliResult(2, f"{res.output}error: {exc}\n", exc)
    if isinstance(exc, KeyboardInterrupt):
        return CliResult(130, res.output, exc)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return CliResult(1, res.output + tb, exc, tb)


def _squeeze(text: str) -> str:
    return _SQUEEZE.sub("", text)


def _anchor(path: Path) -> Path:
    """The nearest existing directory above ``path``: where the output and its staging siblings would go."""
    p = Path(os.path.abspath(path)).parent
    while not p.exists():
        p = p.parent
    return p


def _entry(p: Path) -> tuple[str, str]:
    st = p.lstat()
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(p))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", "")
    if stat.S_ISREG(st.st_mode):
        return ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return ("special", oct(stat.S_IFMT(st.st_mode)))


def snapshot(path: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``path`` (a directory, walked without following links) or ``path`` itself."""
    p = Path(os.path.abspath(path))
    if not p.exists() and not p.is_symlink():
        return {}
    if _is_special(p):
        return {str(p): _entry(p)}
    if not p.is_dir() or p.is_symlink():
        return {str(p): _entry(p)}
    out = {str(p): ("dir", "")}
    for dirpath, dirnames, filenames in os.walk(p):
        for n in dirnames + filenames:
            q = Path(dirpath) / n
            out[str(q)] = _entry(q)
    return out


def _is_special(p: Path) -> bool:
    try:
        m = p.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(m) or stat.S_ISBLK(m) or stat.S_ISFIFO(m) or stat.S_ISSOCK(m)


def _watched(out: Path | None, watch: Sequence[Path]) -> list[Path]:
    roots = []
    if out is not None:
        o = Path(os.path.abspath(out))
        roots.append(o if _is_special(o) else _anchor(o))
        if o.is_symlink():
            roots.append(_anchor(Path(os.path.realpath(o))))
    roots += [Path(w) for w in watch]
    return roots


def _diff(before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]]) -> list[str]:
    problems = [f"new: {k}" for k in sorted(after.keys() - before.keys())]
    problems += [f"removed: {k}" for k in sorted(before.keys() - after.keys())]
    problems += [
        f"changed: {k} ({before[k][0]} -> {after[k][0]})"
        for k in sorted(before.keys() & after.keys())
        if before[k] != after[k]
    ]
    return problems


def probe(
    args: Sequence[str],
    names: str | Sequence[str],
    *,
    out: str | os.PathLike[str] | None = None,
    watch: Sequence[str | os.PathLike[str]] = (),
    subprocess: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    exit_code: int = 2,
) -> CliResult:
    """Run one bad invocation and assert the refusal contract (see the module docstring); returns the run."""
    needles = [names] if isinstance(names, str) else list(names)
    roots = _watched(Path(out) if out is not None else None, [Path(w) for w in watch])
    before = {r: snapshot(r) for r in roots}
    res = run_cli(args, subprocess=subprocess, cwd=cwd, env=env)
    shown = f"weightsmith {' '.join(map(str, args))}\n--- output (exit {res.exit_code}) ---\n{res.output}"
    assert TRACEBACK not in res.output and not res.traceback, f"traceback escaped:\n{shown}"
    assert res.exit_code == exit_code, f"expected exit {exit_code}:\n{shown}"
    flat = _squeeze(res.output)
    missing = [n for n in needles if _squeeze(str(n)) not in flat]
    assert not missing, f"the message does not name {missing}:\n{shown}"
    for r in roots:
        problems = _diff(before[r], snapshot(r))
        assert not problems, "the refused run touched the file system:\n" + "\n".join(problems) + f"\n{shown}"
    return res
