"""The durable run store (train/store.py) on a real SeaweedFS S3 server on 127.0.0.1: a
retried task on a fresh pod resumes from it, a retried search takes its state, and the
nodes of a TrainJob (automoe/trainjob.py), which share no folder, train and resume alike."""

import json
import subprocess

import pytest
from conftest import ROOT, subprocess_env
from servers import free_port, seaweedfs
from test_search import tiny_supernet  # noqa: F401 - fixture
from test_training import assert_same_weights, prepared  # noqa: F401 - fixture
from test_trainjob import spec

from automoe.stages import search
from automoe.train.store import RunStore, sync
from automoe.trainjob import job_name, manifest, take_output

STORE = "s3://automoe/runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), buckets=("automoe",)) as server:
        yield server


def stored(s3) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="automoe", Prefix="runs/")
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_each_pipeline_run_and_each_work_has_a_store_key_of_its_own(monkeypatch):
    """A retried task resumes from its own key only (tests/test_cluster.py kills a training
    container and resumes it in a fresh one): another pipeline run, or other work (another
    identity), starts from zero."""
    monkeypatch.setenv("AUTOMOE_RUN_STORE", STORE)
    keys = set()
    for run, identity in (("run-1", {"a": 1}), ("run-2", {"a": 1}), ("run-1", {"a": 2})):
        monkeypatch.setenv("KFP_RUN_ID", run)
        keys.add(RunStore.from_env("train_supernet", lambda i=identity: i).prefix)
    assert len(keys) == 3
    monkeypatch.delenv("AUTOMOE_RUN_STORE")
    assert RunStore.from_env("train_supernet", lambda: {"a": 1}) is None  # no store: checkpoints stay in the output


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


def test_two_trainjob_nodes_that_share_only_s3_train_and_resume_from_the_store(s3, prepared, tmp_path, monkeypatch):  # noqa: F811
    """The TrainJob's command (automoe/trainjob.py), run as its runtime runs it on two nodes
    (PET_* variables, each node its own disk), the Secret references resolved as the kubelet
    would: both nodes take the data from S3, train together, node 0's output comes back.
    Rerun on fresh disks, both nodes resume from rank 0's checkpoints in the store."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    sync(str(prepared), "s3://automoe/kfp/prepared")
    train = {"max_updates": 6, "max_tokens": 512, "tokens_per_update": 512, "warmup_updates": 2}
    train |= {"valid_interval": 3, "valid_max_sentences": 50, "log_interval": 3, "threads": 1}
    section = {"train_supernet": {"space": str(ROOT / "tests" / "data" / "tiny_space.yaml"), "train": train}}
    job = spec(
        params=json.dumps(section),
        nodes=2,
        procs_per_node=1,
        gpus=0,
        env={"AUTOMOE_RUN_STORE": STORE, "KFP_RUN_ID": "trainjob-run"},
        secret_env={k: ("automoe-s3", k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    )
    body = manifest(job, job_name(job.stage, "trainjob-run"))
    secret = {"automoe-s3": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}}
    env_of_pod = {}
    for e in body["spec"]["trainer"]["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env_of_pod[e["name"]] = secret[ref["name"]][ref["key"]] if ref else e["value"]

    def run_job(attempt: str) -> list[str]:
        port, procs = free_port(), []
        for node in (0, 1):
            env = subprocess_env(
                **env_of_pod,
                AWS_ENDPOINT_URL=s3.endpoint,
                AWS_REGION="us-east-1",
                AUTOMOE_TRACKING="0",
                AUTOMOE_WORK=str(tmp_path / f"{attempt}-node{node}"),
                AUTOMOE_SCRATCH=str(tmp_path / f"{attempt}-node{node}-cache"),
                PET_NNODES="2",
                PET_NODE_RANK=str(node),
                PET_NPROC_PER_NODE="1",
                PET_MASTER_ADDR="127.0.0.1",
                PET_MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            command = body["spec"]["trainer"]["command"]
            procs.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        logs = [p.communicate(timeout=600)[0] for p in procs]
        for p, log in zip(procs, logs, strict=True):
            assert p.returncode == 0, log[-3000:]
        return logs

    run_job("first")
    out = tmp_path / "task-output"
    metrics = take_output(job.out_uri, out)
    assert (out / "supernet.pt").is_file() and metrics["updates"] == 6.0
    assert not (tmp_path / "first-node1" / "out" / "supernet.pt").exists()  # node 1 wrote nothing of its own
    assert (tmp_path / "first-node1" / "data" / "manifest.json").is_file()  # it took the data from S3 itself
    logs = run_job("again")  # fresh disks: rank 0 says where it resumes, and node 1 fetched the same files
    assert "resuming at update 6" in logs[0] and "file(s) fetched" in logs[1]
    assert_same_weights(out / "supernet.pt", tmp_path / "again-node0" / "out" / "supernet.pt")
