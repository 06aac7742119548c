"""Training on several nodes through Kubeflow Trainer v2: a TrainJob launched by a KFP task.

A KFP task is one pod. When `pipeline.resources.train_supernet.nodes` > 1, the pipeline's
train_supernet task runs `component_main` here instead of the stage: it renders a TrainJob
(`trainer.kubeflow.org/v1alpha1`, runtime `torch-distributed` by default) whose nodes run
`worker_script`, creates it in the task's namespace, follows its pods' logs, waits for
its Complete or Failed condition (a failed job fails the task with the job's message),
then takes the output. A retry of the task finds the same TrainJob by name (run and stage):
one still running is followed, a completed one is not run again, a failed one is replaced.
Trainer v2 over the older PyTorchJob: it is Kubeflow's current training operator, its
runtime owns the torchrun rendezvous (PET_* variables), and PyTorchJob is deprecated.

The nodes share no folder. Each node downloads the input artifact from the pipeline's S3
root (`automoe sync`), runs the stage under torchrun, and checkpoints go through the run
store (train/store.py), which is therefore required; node 0 uploads the output to
`<run store>/<run>/<stage>/output`, which the task copies into its output artifact.
Credentials reach the nodes as Secret references, never as values in the TrainJob.

Prerequisites on the cluster (README, Run on Kubernetes): Kubeflow Trainer v2 with its
`torch-distributed` ClusterTrainingRuntime, and a service account for the pipeline's pods
that may create, get and delete trainjobs and list pods and read their logs in the
namespace (the chart's `trainer.rbac`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automoe.errors import AutomoeError, ConfigError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
WORK = "${AUTOMOE_WORK:-/tmp/automoe}"  # on each node's own disk: the input, the params and the output


@dataclass(frozen=True)
class JobSpec:
    """What the TrainJob runs: the stage on `nodes` nodes of `procs_per_node` workers."""

    stage: str
    params: str  # the stage's params section as JSON
    data_uri: str  # the input artifact (s3://)
    out_uri: str  # where node 0 puts the output (s3://)
    image: str
    nodes: int
    procs_per_node: int = 1  # the GPUs of a node (one worker each), or 1 on CPU nodes
    cpu: str = "4"
    memory: str = "16G"
    gpus: int = 0
    accelerator: str = "nvidia.com/gpu"
    runtime: str = "torch-distributed"
    env: dict[str, str] = field(default_factory=dict)  # plain values (endpoints, run ids, the run store)
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # variable -> (Secret, key)

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ConfigError(f"{self.stage}: a TrainJob is for 2 or more nodes, got {self.nodes}")
        if self.procs_per_node < 1:
            raise ConfigError(f"{self.stage}: procs_per_node must be >= 1")
        for uri in (self.data_uri, self.out_uri):
            if not uri.startswith("s3://"):
                raise ConfigError(
                    f"{self.stage} on {self.nodes} nodes: {uri!r} is not on S3; the nodes share no folder, so "
                    "pipeline.pipeline_root and the run store must be s3:// prefixes"
                )


def job_name(stage: str, run: str) -> str:
    """The TrainJob's name: the same for a retry of the task, an RFC 1035 label of <= 63."""
    digest = hashlib.sha256(f"{run}/{stage}".encode()).hexdigest()[:10]
    return f"automoe-{re.sub(r'[^a-z0-9]+', '-', stage.lower()).strip('-')}-{digest}"[:63].rstrip("-")


def worker_script(spec: JobSpec) -> str:
    """What every node runs: take the input, run the stage under torchrun (the runtime's
    PET_* variables give nodes, rank and rendezvous), node 0 hands the output back."""
    data, out = f"{WORK}/data", f"{WORK}/out"
    stage_cmd = [
        "torchrun",
        "-m",
        "automoe.cli",
        spec.stage,
        "--params",
        f"{WORK}/params.json",
        "--data",
        data,
        "--out",
        out,
        "--metrics",
        f"{out}/stage_metrics.json",
    ]
    return "\n".join(
        [
            "set -euo pipefail",
            f'mkdir -p "{WORK}"',
            f'printf %s "$AUTOMOE_STAGE_PARAMS" > "{WORK}/params.json"',
            f'automoe sync {shlex.quote(spec.data_uri)} "{data}"',
            " ".join(f'"{a}"' if WORK in a else shlex.quote(a) for a in stage_cmd),
            f'if [ "${{PET_NODE_RANK:-0}}" = 0 ]; then automoe sync "{out}" {shlex.quote(spec.out_uri)}; fi',
        ]
    )


def manifest(spec: JobSpec, name: str) -> dict[str, Any]:
    """The TrainJob resource."""
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": spec.cpu, "memory": spec.memory},
        "limits": {"cpu": spec.cpu, "memory": spec.memory},
    }
    if spec.gpus:
        resources["requests"][spec.accelerator] = str(spec.gpus)
        resources["limits"][spec.accelerator] = str(spec.gpus)
    env = [{"name": "AUTOMOE_STAGE_PARAMS", "value": spec.params}]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for k, (secret, key) in sorted(spec.secret_env.items())
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "automoe", "automoe/stage": spec.stage}},
        "spec": {
            "runtimeRef": {"name": spec.runtime},
            "trainer": {
                "image": spec.image,
                "command": ["bash", "-c", worker_script(spec)],
                "numNodes": spec.nodes,
                "numProcPerNode": spec.procs_per_node,
                "resourcesPerNode": resources,
                "env": env,
            },
        },
    }


# -- on the cluster ----------------------------------------------------------------------------


def _namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return os.environ.get("AUTOMOE_NAMESPACE") or (path.read_text().strip() if path.is_file() else "default")


def condition(job: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", message) once the TrainJob has finished, else None."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"], c.get("message") or c.get("reason") or ""
    return None


def launch(
    body: dict[str, Any],
    namespace: str | None = None,
    poll_s: float = 15.0,  # the log window (60 s) must stay longer
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Create the TrainJob (or find it: a retried task), follow it to its end; raise on failure."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_incluster_config() if os.environ.get("KUBERNETES_SERVICE_HOST") else config.load_kube_config()
    api, core = client.CustomObjectsApi(), client.CoreV1Api()
    namespace = namespace or _namespace()
    name = body["metadata"]["name"]
    args = (GROUP, VERSION, namespace, PLURAL)
    try:
        job = api.get_namespaced_custom_object(*args, name)
        state = condition(job)
        if state and state[0] == "Failed":  # an earlier try failed: replace it
            say(f"trainjob {name}: an earlier attempt failed ({state[1]}); starting it again")
            api.delete_namespaced_custom_object(*args, name, propagation_policy="Foreground")
            while _exists(api, args, name):
                time.sleep(2)
            api.create_namespaced_custom_object(*args, body)
        else:
            say(f"trainjob {name}: already there ({state[0] if state else 'running'}); following it")
    except ApiException as exc:
        if exc.status != 404:
            raise AutomoeError(f"trainjob {name}: the Kubernetes API refused ({exc.status} {exc.reason})") from None
        api.create_namespaced_custom_object(*args, body)
        say(f"trainjob {name}: created in {namespace} ({body['spec']['trainer']['numNodes']} nodes)")
    seen: dict[str, list[str]] = {}
    while True:
        _print_new_logs(core, namespace, name, seen, say)
        state = condition(api.get_namespaced_custom_object(*args, name))
        if state:
            _print_new_logs(core, namespace, name, seen, say)
            if state[0] == "Failed":
                raise AutomoeError(f"trainjob {name} failed: {state[1]}")
            say(f"trainjob {name}: complete")
            return
        time.sleep(poll_s)


def _exists(api, args, name: str) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        api.get_namespaced_custom_object(*args, name)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def _print_new_logs(core, namespace: str, job: str, seen: dict[str, list[str]], say, window_s: int = 60) -> None:
    """What each of the job's pods logged since the last call, prefixed by the pod: the
    last `window_s` seconds are read (not the whole log of a days-long run each time) and
    the lines already printed from the previous window are skipped."""
    from kubernetes.client.rest import ApiException

    pods = core.list_namespaced_pod(namespace, label_selector=f"jobset.sigs.k8s.io/jobset-name={job}").items
    for pod in pods:
        pod_name = pod.metadata.name
        text = None
        for container in ("node", None):  # the torch runtime's trainer container, else the pod's only one
            try:
                text = core.read_namespaced_pod_log(pod_name, namespace, container=container, since_seconds=window_s)
                break
            except ApiException:
                continue  # not started yet, or another container name
        if text is None:
            continue
        before = seen.get(pod_name, [])
        lines = text.splitlines()
        start = 0  # where the new lines begin: after the longest overlap with what was printed
        for n in range(min(len(before), len(lines)), 0, -1):
            if before[-n:] == lines[:n]:
                start = n
                break
        for line in lines[start:]:
            say(f"[{pod_name}] {line}")
        seen[pod_name] = lines


def component_main(stage: str, params: str, data_uri: str, out_path: str, metrics: Any, **job: Any) -> None:
    """The KFP task's body: the stage as a TrainJob on several nodes, its output into `out_path`."""
    from automoe.stages._cli import write_kfp_metrics
    from automoe.train.store import ENV

    store = os.environ.get(ENV, "")
    run = os.environ.get("KFP_RUN_ID", "")
    if not store or not run:
        raise ConfigError(f"{stage} on several nodes needs the run store ({ENV}) and the KFP run id")
    section = json.dumps({stage: json.loads(params).get(stage, {})})
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", ENV, "KFP_RUN_ID") if k in os.environ}
    spec = JobSpec(stage, section, data_uri, f"{store.rstrip('/')}/{run}/{stage}/output", env=env, **job)
    launch(manifest(spec, job_name(stage, run)))
    stage_metrics = take_output(spec.out_uri, Path(out_path))
    if stage_metrics:
        write_kfp_metrics(metrics, stage_metrics)


def take_output(out_uri: str, out: Path) -> dict[str, float]:
    """Node 0's output from the store into the task's output folder; the stage metrics."""
    from automoe.train.store import sync

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        sync(out_uri, tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                target = out / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    path = out / "stage_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
