"""The durable run store (train/store.py) on a real SeaweedFS S3 server on 127.0.0.1: a
retried task on a fresh pod resumes from it, and nodes that share no folder resume alike."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from servers import free_port, seaweedfs
from test_search import tiny_supernet  # noqa: F401 - fixture
from test_training import assert_same_weights, cli, prepared, run_to_end, tiny_train  # noqa: F401 - fixture

from automoe.stages import search

STORE = "s3://automoe/runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), buckets=("automoe",)) as server:
        yield server


def stored(s3) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="automoe", Prefix="runs/")
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_a_retried_task_on_a_fresh_pod_resumes_from_the_run_store(s3, prepared, tmp_path):  # noqa: F811
    common = ["train_supernet", "--data", str(prepared), *tiny_train("train_supernet", 30, train__dropout=0.3)]
    run_to_end(common + ["--out", str(tmp_path / "a")], subprocess_env(AUTOMOE_TRACKING="0"))

    def pod(name: str, **extra: str) -> dict[str, str]:  # its own local disk, the store, a KFP run id
        return subprocess_env(
            **(s3.env() | {"AUTOMOE_TRACKING": "0", "AUTOMOE_RUN_STORE": STORE, "KFP_RUN_ID": "run-1"} | extra),
            AUTOMOE_SCRATCH=str(tmp_path / name),
        )

    first = tmp_path / "pod1-out"
    proc = subprocess.Popen(
        cli(*common, "--out", str(first)), env=pod("pod1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not any(k.endswith("checkpoint_0000015.pt") for k in stored(s3)):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (first / "supernet.pt").exists() and not (first / "checkpoints").exists()
    assert all(k.startswith("runs/run-1/train_supernet/") for k in stored(s3))

    retry = tmp_path / "pod2-out"  # a fresh pod: nothing of the first one's disk
    resumed = run_to_end(common + ["--out", str(retry)], pod("pod2"))
    assert "resuming at update 15" in resumed.stderr or "resuming at update 20" in resumed.stderr
    assert_same_weights(tmp_path / "a" / "supernet.pt", retry / "supernet.pt")
    assert (tmp_path / "a" / "curves.csv").read_text() == (retry / "curves.csv").read_text()
    assert not (retry / "checkpoints").exists()  # the output holds the final weights only
    names = [k.rsplit("/", 1)[1] for k in stored(s3)]
    assert "checkpoint_best.pt" in names and len([n for n in names if n != "checkpoint_best.pt"]) <= 3  # keep_last

    # another pipeline run of the same work starts from zero: the key is the run's
    other = run_to_end(common + ["--out", str(tmp_path / "run2")], pod("pod3", KFP_RUN_ID="run-2"))
    assert "resuming" not in other.stderr


def test_nodes_that_share_no_folder_resume_from_the_store(s3, prepared, tmp_path):  # noqa: F811
    """Two torchrun nodes on 127.0.0.1, each with its own output and cache folder: both
    finish (the second needs no checkpoint of its own), and a rerun of the finished job on
    fresh disks resumes both nodes from rank 0's checkpoints in the store."""
    args = [
        "train_supernet",
        "--data",
        str(prepared),
        *tiny_train("train_supernet", 10, train__threads=1, train__max_tokens=512, train__tokens_per_update=512),
    ]
    torchrun = str(Path(sys.executable).parent / "torchrun")

    def job(attempt: str) -> list[subprocess.CompletedProcess]:
        port = free_port()
        procs = []
        for node in (0, 1):
            cmd = [
                torchrun,
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "automoe.cli",
                *args,
                "--out",
                str(tmp_path / f"{attempt}-node{node}"),
            ]
            env = subprocess_env(
                **s3.env(),
                AUTOMOE_TRACKING="0",
                AUTOMOE_RUN_STORE=STORE,
                AUTOMOE_SCRATCH=str(tmp_path / f"{attempt}-disk{node}"),
                KFP_RUN_ID="two-nodes",
                OMP_NUM_THREADS="1",
            )
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        out = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]
        for p in out:
            assert p.returncode == 0, p.stderr[-3000:]
        return out

    job("first")
    assert (tmp_path / "first-node0" / "supernet.pt").is_file()
    assert not (tmp_path / "first-node1" / "supernet.pt").exists()  # rank 0 writes the output
    again = job("again")
    assert all("resuming at update 10" in p.stderr for p in again[:1])  # rank 0 reports; every rank loads it
    assert_same_weights(tmp_path / "first-node0" / "supernet.pt", tmp_path / "again-node0" / "supernet.pt")
    assert (tmp_path / "again-disk1").is_dir()  # node 1 took its resume state from the store, not a shared folder


def test_a_retried_search_takes_its_state_from_the_store(s3, tiny_supernet, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The search's state goes to the store after every iteration; a retry on a fresh pod
    (an empty output folder) takes it from there: a finished search is not evaluated again
    and gives the same winner."""
    prep, net = tiny_supernet
    for key, value in (s3.env() | {"AUTOMOE_RUN_STORE": STORE, "KFP_RUN_ID": "search-run"}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AUTOMOE_TRACKING", "0")
    sets = ["population=6", "parents=2", "mutations=2", "crossovers=2", "iterations=2", "budget.kind=gflops"]
    args = ["--data", str(prep), "--supernet", str(net), *[a for x in sets for a in ("--set", f"search.{x}")]]
    assert search.main([*args, "--out", str(tmp_path / "first")]) == 0, capsys.readouterr().err
    assert [k for k in stored(s3) if k.startswith("runs/search-run/search/") and k.endswith("/state.json")]

    def no_fitness(self, archs):
        raise AssertionError("the retry evaluated archs again")

    monkeypatch.setattr(search.ValidLoss, "__call__", no_fitness)
    assert search.main([*args, "--out", str(tmp_path / "retry")]) == 0, capsys.readouterr().err
    assert "1 file(s) fetched" in capsys.readouterr().err
    first, retry = ((tmp_path / d / "best_arch.yaml").read_text() for d in ("first", "retry"))
    assert first == retry
