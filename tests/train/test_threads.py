"""torch's CPU thread count from the CPUs the process may use (weightsmith.threads, issue 14)."""

from __future__ import annotations

import pytest
import torch

from weightsmith import threads
from weightsmith.errors import WeightsmithError


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_available_cpus_honours_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert threads.available_cpus(cpu_max) == 4
    cpu_max.write_text("250000 100000\n")  # 2.5 CPUs: two threads fit
    assert threads.available_cpus(cpu_max) == 2
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert threads.available_cpus(cpu_max) == 1
    assert threads.available_cpus(tmp_path / "absent") == 4


def test_auto_threads_caps_and_leaves_a_cpu_on_a_busy_machine():
    assert threads.auto_threads(cpus=2, load=0.3) == 2
    assert threads.auto_threads(cpus=2, load=2.5) == 1  # one spinning neighbour on 2 cores
    assert threads.auto_threads(cpus=1, load=9.0) == 1
    assert threads.auto_threads(cpus=64, load=0.0) == threads.MAX_AUTO


def test_explicit_counts_win(monkeypatch):
    monkeypatch.delenv("WEIGHTSMITH_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.configure() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("WEIGHTSMITH_THREADS", "2")
    assert threads.configure() == 2 and torch.get_num_threads() == 2
    assert threads.configure(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("WEIGHTSMITH_THREADS", "two")
    with pytest.raises(WeightsmithError, match="WEIGHTSMITH_THREADS='two'"):
        threads.configure()
    with pytest.raises(WeightsmithError, match="--threads"):
        threads.configure(0)


def test_automatic_count_follows_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("WEIGHTSMITH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert threads.configure() == 1 and torch.get_num_threads() == 1
