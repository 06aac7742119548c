"""MLflow adapter: the only module that imports mlflow.

One parent run per pipeline execution, one child run per stage. The parent run id
travels explicitly: a KFP pipeline passes it as a parameter; under DVC it is kept in
`.automoe/parent_run.json` in the workspace (`make run` starts a fresh one per
execution). The embedded default store is a local sqlite file, `mlflow.db`, with
artifacts in `mlartifacts/`; `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automoe.io import atomic_write_json

PARENT_FILE = Path(".automoe") / "parent_run.json"
DEFAULT_EXPERIMENT = "automoe"


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain process): the one that tracks and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def enabled() -> bool:
    on = os.environ.get("AUTOMOE_TRACKING", "1").lower() not in ("0", "false", "off", "no")
    return on and is_main_process()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').absolute()}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client) -> str:
    exp = client.get_experiment_by_name(experiment_name())
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        location = Path("mlartifacts").absolute().as_uri()
    with contextlib.suppress(Exception):  # a concurrent stage may have created it first
        return client.create_experiment(experiment_name(), artifact_location=location)
    return client.get_experiment_by_name(experiment_name()).experiment_id


def git_commit() -> str:
    if os.environ.get("AUTOMOE_GIT_COMMIT"):
        return os.environ["AUTOMOE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def context_tags() -> dict[str, str]:
    """Where this execution comes from: code, data lock, orchestrator, image."""
    tags = {"automoe.git_commit": git_commit()}
    lock = Path("dvc.lock")
    if lock.is_file():
        tags["automoe.dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    for env, tag in (("KFP_RUN_ID", "automoe.kfp_run_id"), ("AUTOMOE_IMAGE", "automoe.image")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def start_parent(run_name: str = "pipeline", tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline execution and return its id."""
    client = _client()
    run = client.create_run(_experiment_id(client), run_name=run_name, tags={**context_tags(), **(tags or {})})
    return run.info.run_id


def end_parent(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status)


def end_kfp_parent(kfp_run_id: str, succeeded: bool) -> None:
    """Close the parent run that `start_parent` opened for this KFP run, if any."""
    client = _client()
    runs = client.search_runs(
        [_experiment_id(client)], filter_string=f"tags.`automoe.kfp_run_id` = '{kfp_run_id}'", max_results=5
    )
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            client.set_terminated(run.info.run_id, "FINISHED" if succeeded else "FAILED")


def workspace_parent() -> str:
    """The DVC workspace's parent run: reuse the one in PARENT_FILE if this store has it,
    else start one and remember it."""
    uri = tracking_uri()
    if PARENT_FILE.is_file():
        with contextlib.suppress(ValueError, KeyError):
            saved = json.loads(PARENT_FILE.read_text())
            if saved["tracking_uri"] == uri:
                return saved["run_id"]
    run_id = start_parent()
    atomic_write_json(PARENT_FILE, {"run_id": run_id, "tracking_uri": uri})
    return run_id


@dataclass
class StageRun:
    """A child run for one stage; a no-op when tracking is off."""

    run_id: str | None
    _client: Any = field(default=None, repr=False)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in (tags if self.run_id is not None else {}).items():
            self._client.set_tag(self.run_id, key, value)


@contextlib.contextmanager
def stage_run(stage: str, parent_run_id: str | None = None) -> Iterator[StageRun]:
    """Open the child run of `stage` under the execution's parent; FAILED on error."""
    if not enabled():
        yield StageRun(None)
        return
    client = _client()
    parent = parent_run_id or os.environ.get("AUTOMOE_PARENT_RUN_ID") or workspace_parent()
    tags = {**context_tags(), "automoe.stage": stage, "mlflow.parentRunId": parent}
    run = client.create_run(_experiment_id(client), run_name=stage, tags=tags)
    status = "FAILED"
    try:
        yield StageRun(run.info.run_id, client)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
