"""The project image, built and run here as a user would run it: as its non-root user,
with a read-only root file system and only mounted folders writable; stages give the
host's results, track into a store on the volume or a server, and a tracking mistake is
a one-line error, not a traceback.

Needs a Docker daemon (`../shared/tools/docker-up.sh` here; `.ci/run` starts it). Without
one these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from containers import git_commit, needs_docker
from servers import free_port, mlflow_server

from automoe.data.dataset import PreparedData
from automoe.stages import prepare_data, retrain

pytestmark = needs_docker
PREP = ["max_train_pairs=300", "vocab_size=300", "max_len=48"]


def volume(tmp_path: Path) -> Path:
    """A host folder the image's user (uid 10001) can write, mounted at /data."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    return data


def run_stage(image: str, data: Path, multi30k: Path, *args: str, env: dict[str, str] | None = None, network="none"):
    cmd = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", network]
    cmd += ["-v", f"{data}:/data", "-v", f"{multi30k}:/mirror:ro"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=600)


def prep_args(out: str, mirror: str) -> list[str]:
    sets = [*PREP, f"mirror={mirror}"]
    return ["--out", out, *[a for s in sets for a in ("--set", f"prepare_data.{s}")]]


def test_image_runs_as_non_root_with_labels_and_lineage(image):
    info = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001"
    assert config["Labels"]["org.opencontainers.image.revision"] == git_commit()
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["AUTOMOE_GIT_COMMIT"] == git_commit() and env["AUTOMOE_IMAGE"].startswith("ghcr.io/automoe/automoe:")
    assert not any(k.startswith(("AWS_SECRET", "AWS_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")) for k in env)
    proc = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", image, "-u"], capture_output=True, text=True)
    assert proc.stdout.strip() == "10001"


def test_image_decodes_on_the_compiled_decoder_without_a_compiler(image):
    """The image built the extension for its own torch and Python, and left no compiler behind."""
    script = (
        "import shutil, warnings; warnings.simplefilter('error'); "
        "from automoe.model import compiled; assert compiled.active(), 'not built'; "
        "assert shutil.which('g++') is None and shutil.which('ninja') is None, 'a compiler stayed'; print('ok')"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", script], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_stage_without_a_writable_tracking_store_is_a_one_line_error(image, multi30k, tmp_path):
    data = volume(tmp_path)
    proc = run_stage(image, data, multi30k, "prepare_data", *prep_args("/data/prepared", "/mirror"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "/app is not writable" in err[0] and "MLFLOW_TRACKING_URI" in err[0] and "AUTOMOE_TRACKING=0" in err[0]
    assert not (data / "prepared").exists()
    # a server that does not answer: the same kind of error, quickly
    t0 = time.monotonic()
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    proc = run_stage(
        image, data, multi30k, "prepare_data", *prep_args("/data/prepared", "/mirror"), env=env, network="host"
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "is not reachable" in proc.stderr and time.monotonic() - t0 < 60
    assert not (data / "prepared").exists()


def test_stages_in_the_container_equal_the_host_and_track_on_the_volume(image, multi30k, tmp_path):
    data = volume(tmp_path)
    env = {"MLFLOW_TRACKING_URI": "sqlite:////data/mlflow.db"}
    proc = run_stage(image, data, multi30k, "prepare_data", *prep_args("/data/prepared", "/mirror"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host = tmp_path / "host"
    assert prepare_data.main(prep_args(str(host / "prepared"), str(multi30k))) == 0
    ours, theirs = PreparedData.open(host / "prepared"), PreparedData.open(data / "prepared")
    assert ours.manifest["data_sha256"] == theirs.manifest["data_sha256"]
    assert (host / "prepared" / "spm.model").read_bytes() == (data / "prepared" / "spm.model").read_bytes()

    # a few training updates from the same data: the same validation loss
    train = ["max_updates=4", "max_tokens=512", "valid_interval=4", "valid_max_sentences=50", "warmup_updates=2"]
    train += ["threads=1", "precision=fp32"]
    sets = ["--set", "retrain.init_from_supernet=false", *[a for s in train for a in ("--set", f"retrain.train.{s}")]]
    args = ["--arch", "smallest", *sets]
    stage = ["retrain", "--data", "/data/prepared", "--out", "/data/model", *args]
    proc = run_stage(image, data, multi30k, *stage, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert retrain.main(["--data", str(host / "prepared"), "--out", str(host / "model"), *args]) == 0
    container = json.loads((data / "model" / "metrics.json").read_text())
    here = json.loads((host / "model" / "metrics.json").read_text())
    assert container["best_valid_loss"] == pytest.approx(here["best_valid_loss"], rel=1e-4)

    # the runs are in the store on the volume, with the image's lineage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs)[0] == "prepare_data"
    assert sorted(r.info.run_name for r in runs)[1].startswith("retrain/")  # named for the model it trains
    assert {r.data.tags["automoe.git_commit"] for r in runs} == {git_commit()}
    assert all(r.data.tags["automoe.image"].startswith("ghcr.io/automoe/automoe:") for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_stage_in_the_container_tracks_into_a_server(image, multi30k, tmp_path):
    data = volume(tmp_path)
    with mlflow_server(tmp_path / "mlflow") as uri:
        env = {"MLFLOW_TRACKING_URI": uri}
        proc = run_stage(
            image, data, multi30k, "prepare_data", *prep_args("/data/prepared", "/mirror"), env=env, network="host"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_name for r in runs] == ["prepare_data"]
        kept = PreparedData.open(data / "prepared").manifest["counts"]["train"]["kept"]
        assert runs[0].data.metrics["train_pairs"] == kept > 200
