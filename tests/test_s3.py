"""S3 everywhere, against a real SeaweedFS server on 127.0.0.1: the MLflow artifact store
(proxied and direct), a DVC remote (push/pull) and the failure cases."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import paths_overrides, subprocess_env
from servers import mlflow_server, seaweedfs

from automoe.stages import prepare_data


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweed"), buckets=("mlflow", "dvc")) as server:
        yield server


def objects(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def run_prepare(folder: str, out: Path, capsys) -> int:
    rc = prepare_data.main(["--out", str(out), *[a for o in paths_overrides(folder) for a in ("--set", o)]])
    capsys.readouterr()
    return rc


def test_mlflow_server_proxies_artifacts_to_s3(s3, small_corpus, tmp_path, monkeypatch, capsys):
    server_env = s3.env(MLFLOW_S3_ENDPOINT_URL=s3.endpoint)
    with mlflow_server(tmp_path / "mlflow", artifacts="s3://mlflow/proxied", env=server_env) as uri:
        # the client holds no S3 credentials: the server writes to S3
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("AUTOMOE_TRACKING", "1")
        monkeypatch.chdir(tmp_path)
        assert run_prepare(small_corpus, tmp_path / "prepared", capsys) == 0
    keys = objects(s3, "mlflow")
    assert any(k.startswith("proxied/") and k.endswith("/manifest.json") for k in keys), keys
    assert s3.secret_key not in "".join(keys)


def test_mlflow_direct_s3_artifacts_and_wrong_credentials(s3, small_corpus, tmp_path, monkeypatch, capsys):
    args = ("--default-artifact-root", "s3://mlflow/direct", "--no-serve-artifacts")
    with mlflow_server(tmp_path / "mlflow", extra_args=args) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("AUTOMOE_TRACKING", "1")
        monkeypatch.chdir(tmp_path)
        for key, value in s3.env(MLFLOW_S3_ENDPOINT_URL=s3.endpoint).items():
            monkeypatch.setenv(key, value)
        assert run_prepare(small_corpus, tmp_path / "ok", capsys) == 0
        assert any(k.startswith("direct/") and k.endswith("/manifest.json") for k in objects(s3, "mlflow"))

        cmd = [sys.executable, "-m", "automoe.cli", "prepare_data", "--out", str(tmp_path / "bad")]
        cmd += [a for o in paths_overrides(small_corpus) for a in ("--set", o)]
        env = subprocess_env(**s3.env(MLFLOW_S3_ENDPOINT_URL=s3.endpoint, AWS_SECRET_ACCESS_KEY="not-the-secret"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        rc, err = proc.returncode, proc.stderr.strip().splitlines()[-1]
        assert rc == 2 and err.startswith("error: MLflow at http://127.0.0.1") and "manifest.json" in err, err
        assert "not-the-secret" not in err and "\n" not in err
        assert (tmp_path / "bad" / "manifest.json").is_file()  # nothing lost locally
        from mlflow.tracking import MlflowClient

        runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("automoe").experiment_id])
        assert sorted(r.info.status for r in runs if r.info.run_name == "prepare_data") == ["FAILED", "FINISHED"]


def dvc(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "dvc")
    return subprocess.run([exe, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def dvc_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = subprocess_env(DVC_NO_ANALYTICS="1")
    assert dvc(repo, "init", "-q", env=env).returncode == 0
    (repo / "data").mkdir()
    (repo / "data" / "model.bin").write_bytes(os.urandom(300_000))
    (repo / "data" / "notes.txt").write_text("prepared data and models travel through the S3 remote\n")
    assert dvc(repo, "add", "data", env=env).returncode == 0
    return repo


def test_dvc_remote_on_s3_push_pull_and_failures(s3, dvc_repo, tmp_path):
    env = subprocess_env(DVC_NO_ANALYTICS="1", **s3.env())
    assert dvc(dvc_repo, "remote", "add", "-d", "store", "s3://dvc/cache", env=env).returncode == 0
    assert dvc(dvc_repo, "remote", "modify", "store", "endpointurl", s3.endpoint, env=env).returncode == 0
    config = (dvc_repo / ".dvc" / "config").read_text()
    assert s3.secret_key not in config and s3.access_key not in config  # credentials stay in the environment

    bad = dvc(dvc_repo, "push", env=dict(env, AWS_SECRET_ACCESS_KEY="wrong"))
    assert bad.returncode != 0 and (
        "Forbidden" in bad.stderr or "denied" in bad.stderr.lower() or "signature" in bad.stderr.lower()
    ), bad.stderr[-1500:]
    assert dvc(dvc_repo, "remote", "modify", "store", "url", "s3://no-such-bucket/cache", env=env).returncode == 0
    missing = dvc(dvc_repo, "push", env=env)
    assert missing.returncode != 0 and "bucket" in missing.stderr.lower(), missing.stderr[-1500:]
    assert dvc(dvc_repo, "remote", "modify", "store", "url", "s3://dvc/cache", env=env).returncode == 0

    pushed = dvc(dvc_repo, "push", env=env)
    assert pushed.returncode == 0, pushed.stderr[-1500:]
    assert objects(s3, "dvc")
    original = (dvc_repo / "data" / "model.bin").read_bytes()
    shutil.rmtree(dvc_repo / "data")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    pulled = dvc(dvc_repo, "pull", env=env)
    assert pulled.returncode == 0, pulled.stderr[-1500:]
    assert (dvc_repo / "data" / "model.bin").read_bytes() == original


def test_dvc_push_with_the_server_down_loses_nothing(dvc_repo, tmp_path):
    with seaweedfs(tmp_path / "weed", buckets=("dvc",)) as server:
        env = subprocess_env(DVC_NO_ANALYTICS="1", **server.env())
        assert dvc(dvc_repo, "remote", "add", "-d", "store", "s3://dvc/cache", env=env).returncode == 0
        assert dvc(dvc_repo, "remote", "modify", "store", "endpointurl", server.endpoint, env=env).returncode == 0
    # the server is gone now
    down = dvc(dvc_repo, "push", env=dict(env, AWS_MAX_ATTEMPTS="1"))
    assert down.returncode != 0
    status = dvc(dvc_repo, "status", env=env)
    assert status.returncode == 0 and "up to date" in status.stdout.lower()  # the workspace and cache are intact
    assert (dvc_repo / "data" / "model.bin").stat().st_size == 300_000
