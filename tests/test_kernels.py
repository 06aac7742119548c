"""The machine's kernel plan: a GEMM choice is measured once and every later process reuses it."""

import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

from automoe.model import kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    path = tmp_path / "machine-kernels.json"
    monkeypatch.setenv("AUTOMOE_KERNEL_CACHE", str(path))
    kernels.clear()
    yield path
    kernels.clear()


def never() -> int:
    raise AssertionError("probed again: the plan was not reused")


def test_a_choice_is_measured_once_and_kept_in_the_machine_cache(fresh):
    k = kernels.key(512, 256, True, 2)
    assert kernels.choice(k, lambda: 8) == 8
    assert kernels.choice(k, never) == 8  # the process's plan
    saved = json.loads(fresh.read_text())
    assert saved["small_rows"] == {k: 8} and saved["machine_id"] == kernels.machine_id()
    assert saved["machine"]["int8_kernel"] in ("u7xs8-int16pairs", "u8xs8-vnni")
    kernels.clear()  # as a new process: the machine's cache answers, no probe
    assert kernels.choice(k, never) == 8


def test_a_plan_file_is_adopted_on_the_same_machine_only(fresh, tmp_path):
    k = kernels.key(64, 64, False, 1)
    kernels.choice(k, lambda: 4)
    plan = tmp_path / "kernels.json"
    kernels.save(plan)
    kernels.clear()
    fresh.unlink()
    assert kernels.use(plan) == 1 and kernels.choice(k, never) == 4
    other = json.loads(plan.read_text()) | {"machine_id": "0" * 12, "machine": {"cpu_model": "Other CPU"}}
    plan.write_text(json.dumps(other))
    kernels.clear()
    with pytest.warns(UserWarning, match="kernel plan of another machine \\(Other CPU\\)"):
        assert kernels.use(plan) == 0
    assert kernels.choice(k, lambda: 2) == 2  # measured here instead
    assert kernels.use(plan.parent / "missing.json") == 0


def test_an_unwritable_or_disabled_cache_keeps_the_plan_in_the_process(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOMOE_KERNEL_CACHE", str(blocker / "kernels.json"))  # its folder is a file
    kernels.clear()
    assert kernels.choice("k", lambda: 1) == 1 and kernels.choice("k", never) == 1
    monkeypatch.setenv("AUTOMOE_KERNEL_CACHE", "off")
    assert kernels.cache_path() is None
    kernels.clear()


def test_two_processes_time_the_same_engine(fresh, tmp_path):
    """The second process builds the serving layout from the first one's choices, probing nothing."""
    code = (
        "import torch, json\n"
        "from automoe.model import inference, kernels\n"
        "calls = []\n"
        "real = inference._seconds\n"
        "inference._seconds = lambda *a, **k: (calls.append(1), real(*a, **k))[1]\n"
        "torch.set_num_threads(1)\n"
        "w = torch.randn(96, 32)\n"
        "inference.small_rows(w, inference._pack(w), None)\n"
        "print(json.dumps(len(calls)))\n"
    )
    env = subprocess_env(AUTOMOE_KERNEL_CACHE=str(fresh))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout) > 0 and json.loads(second.stdout) == 0
    assert kernels.key(96, 32, False, 1) in json.loads(fresh.read_text())["small_rows"]
