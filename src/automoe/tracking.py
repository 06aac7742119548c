"""MLflow adapter: the only module that imports mlflow.

One parent run per pipeline execution, one child run per stage. A stage finds its parent
from its environment, never from a task input (a KFP task's inputs are its cache key, and
a per-execution id there would make every task miss the cache): `AUTOMOE_PARENT_RUN_ID`
(kfp.local: `pipeline.py run-local` opens the parent and exports it), else `KFP_RUN_ID`
(a cluster pod's `pipeline/runid` label: the parent is the run the pipeline's
open-tracking task tagged with it), else, under DVC (`dvc repro`, `dvc exp run`),
`.automoe/parent_run.json` in the workspace: the first stage of an execution opens it, and
it ends with the execution, FINISHED with the headline figures when `register` finishes,
FAILED when a stage fails; its file goes with it, so the next execution opens its own. A
stage run by hand outside DVC is a top-level run of its own (it joins no old parent). The embedded default store is a
local sqlite file, `mlflow.db`, with artifacts in `mlartifacts/`, in the DVC project's
root (`DVC_ROOT`, which DVC sets to the project even when `dvc exp run` runs stages in a
temporary copy) or else the working directory; `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automoe.errors import AutomoeError
from automoe.io import atomic_write_json

PARENT_FILE = Path(".automoe") / "parent_run.json"
DEFAULT_EXPERIMENT = "automoe"


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain process): the one that tracks and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def enabled() -> bool:
    on = os.environ.get("AUTOMOE_TRACKING", "1").lower() not in ("0", "false", "off", "no")
    return on and is_main_process()


def workspace() -> Path:
    """Where the default store and the parent-run file live: the DVC project root, else `.`."""
    return Path(os.environ.get("DVC_ROOT") or ".").absolute()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _existing_store_client():
    """The client of a store that already exists, for commands that only read or move the
    registry (translate, promote, rollback): a sqlite file that is not there is a one-line
    error instead of a new empty store (run from another folder, it would report "no
    champion" from a registry that was never made)."""
    db = _sqlite_path(tracking_uri())
    if db is not None and not db.is_file():
        raise AutomoeError(
            f"MLflow store {_redact(tracking_uri())}: no such file, so no registry here; run from the "
            "project folder (where make run made mlflow.db) or set MLFLOW_TRACKING_URI to the registry's store"
        )
    return _client()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store (None for other stores)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_store() -> None:
    """Fail fast, in one line naming the fix, when the tracking store cannot be used: a
    sqlite file in a folder this user cannot write (a container's read-only root file
    system) or a tracking server that does not answer."""
    uri = tracking_uri()
    fix = (
        "set MLFLOW_TRACKING_URI to a tracking server (http://host:5000) or to "
        "sqlite:////<writable folder>/mlflow.db, or AUTOMOE_TRACKING=0 to run without tracking"
    )
    db = _sqlite_path(uri)
    if db is not None and os.environ.get("AUTOMOE_NO_LOCAL_STORE") and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise AutomoeError(
            f"this task would track into {_redact(uri)} inside its pod, which is lost with the pod; "
            f"compile the pipeline with `--set {os.environ['AUTOMOE_NO_LOCAL_STORE']}=http://<mlflow>:5000`"
        )
    if db is not None:
        folder = db.parent
        if not folder.is_dir():
            raise AutomoeError(f"MLflow tracking store {_redact(uri)}: folder {folder} does not exist; {fix}")
        if not os.access(folder, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise AutomoeError(f"MLflow tracking store {_redact(uri)}: {folder} is not writable by this user; {fix}")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        # an API call, not /health: the server answers /health whatever the Host header
        probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        request = urllib.request.Request(probe)
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            import base64

            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
        try:
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - the configured server
                pass
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # alive, but this client is refused (auth, allowed hosts)
                raise AutomoeError(
                    f"MLflow tracking server {_redact(uri)} refused this client (HTTP {exc.code}): check "
                    "MLFLOW_TRACKING_USERNAME/PASSWORD and the server's --allowed-hosts"
                ) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise AutomoeError(f"MLflow tracking server {_redact(uri)} is not reachable ({reason}); {fix}") from None


def _experiment_id(client) -> str:
    exp = client.get_experiment_by_name(experiment_name())
    if exp is not None:
        return exp.experiment_id
    location = None
    db = _sqlite_path(tracking_uri())
    if db is not None:  # artifacts beside the database (a mounted volume in a container)
        location = (db.parent / "mlartifacts").absolute().as_uri()
    elif not tracking_uri().startswith(("http://", "https://")):
        location = (workspace() / "mlartifacts").as_uri()
    with contextlib.suppress(Exception):  # a concurrent stage may have created it first
        return client.create_experiment(experiment_name(), artifact_location=location)
    return client.get_experiment_by_name(experiment_name()).experiment_id


def _redact(uri: str) -> str:
    """A tracking URI without user:password@ or query values (never into logs)."""
    from automoe.redact import redact

    return redact(uri)


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
    tags = {"automoe.git_commit": git_commit()}  # (dvc.lock changes as stages finish: the commit names the state)
    for env, tag in (("KFP_RUN_ID", "automoe.kfp_run_id"), ("AUTOMOE_IMAGE", "automoe.image")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def start_parent(run_name: str = "pipeline", tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline execution and return its id."""
    client = _client()
    run = client.create_run(_experiment_id(client), run_name=run_name, tags={**context_tags(), **(tags or {})})
    return run.info.run_id


def open_kfp_parent(kfp_run_id: str) -> str:
    """The parent run of KFP run `kfp_run_id`, tagged with it so that its tasks find it: the
    one this process was handed (AUTOMOE_PARENT_RUN_ID, kfp.local), else a new one."""
    given = os.environ.get("AUTOMOE_PARENT_RUN_ID")
    if not given:
        return start_parent(tags={"automoe.kfp_run_id": kfp_run_id})
    _client().set_tag(given, "automoe.kfp_run_id", kfp_run_id)
    return given


def kfp_parent(kfp_run_id: str, attempts: int = 5) -> str:
    """The id of the parent run tagged with `kfp_run_id` (open_kfp_parent ran before any stage)."""
    client = _client()
    query = f"tags.`automoe.kfp_run_id` = '{kfp_run_id}'"
    for attempt in range(attempts):
        runs = client.search_runs([_experiment_id(client)], filter_string=query, max_results=5)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if parents:
            return parents[0].info.run_id
        time.sleep(min(2**attempt, 10))
    raise AutomoeError(
        f"MLflow at {_redact(tracking_uri())}: no parent run tagged automoe.kfp_run_id={kfp_run_id} "
        "(the pipeline's open-tracking task creates it before any stage: was this task started on its own?)"
    )


def find_parent() -> str | None:
    """This execution's parent run (see the module doc), or None for a top-level stage run."""
    if os.environ.get("AUTOMOE_PARENT_RUN_ID"):
        return os.environ["AUTOMOE_PARENT_RUN_ID"]
    if os.environ.get("KFP_RUN_ID"):
        return kfp_parent(os.environ["KFP_RUN_ID"])
    return workspace_parent() if under_dvc() else None


def under_dvc() -> bool:
    """A stage that DVC runs (it sets DVC_STAGE for every stage command, DVC_ROOT too)."""
    return bool(os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"))


def end_workspace_parent(
    status: str, metrics: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None
) -> str | None:
    """End the DVC workspace's parent run (FINISHED or FAILED) with `metrics` and `params`,
    and forget it: the next execution opens its own. Returns its id (None: there was none)."""
    from mlflow.entities import Metric, Param

    path = workspace() / PARENT_FILE
    try:
        saved = json.loads(path.read_text())
        run_id = saved["run_id"] if saved["tracking_uri"] == tracking_uri() else None
    except (OSError, ValueError, KeyError):
        return None
    if run_id is None:
        return None
    client = _client()
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in sorted((metrics or {}).items())],
        params=[Param(k, str(v)[:6000]) for k, v in sorted(_flatten(params or {}).items())],
    )
    client.set_terminated(run_id, status)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return run_id


def end_kfp_parent(kfp_run_id: str, succeeded: bool) -> None:
    """Close the parent run that `start_parent` opened for this KFP run, if any."""
    client = _client()
    runs = client.search_runs(
        [_experiment_id(client)], filter_string=f"tags.`automoe.kfp_run_id` = '{kfp_run_id}'", max_results=5
    )
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            client.set_terminated(run.info.run_id, "FINISHED" if succeeded else "FAILED")


def workspace_parent() -> str | None:
    """The DVC workspace's parent run: reuse the one in PARENT_FILE if this store has it,
    else start one and remember it. None where the working directory is not writable (a
    single stage in a container): the stage's run is then a top-level run."""
    uri = tracking_uri()
    path = workspace() / PARENT_FILE
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError):
            saved = json.loads(path.read_text())
            if saved["tracking_uri"] == uri:
                return saved["run_id"]
    if not os.access(path.parent if path.parent.is_dir() else workspace(), os.W_OK):
        return None
    run_id = start_parent()
    atomic_write_json(path, {"run_id": run_id, "tracking_uri": uri})
    return run_id


@dataclass
class StageRun:
    """A child run for one stage; a no-op when tracking is off."""

    run_id: str | None
    _client: Any = field(default=None, repr=False)
    parent_run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, _redact(str(v))[:6000]) for k, v in sorted(flat.items())]  # no URL credentials
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
        if self.run_id is None:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001 - MLflow, HTTP and S3 errors alike
            from automoe.errors import AutomoeError

            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise AutomoeError(
                f"MLflow at {_redact(tracking_uri())}: could not store artifact {Path(path).name} "
                f"({reason}); the stage's local output is kept"
            ) from None


@contextlib.contextmanager
def stage_run(stage: str, parent_run_id: str | None = None, run_name: str = "") -> Iterator[StageRun]:
    """Open the child run of `stage` (named `run_name`, default the stage) under the
    execution's parent; FAILED on error."""
    if not enabled():
        yield StageRun(None)
        return
    check_store()
    client = _client()
    parent = parent_run_id or find_parent()
    tags = {**context_tags(), "automoe.stage": stage} | ({"mlflow.parentRunId": parent} if parent else {})
    run = client.create_run(_experiment_id(client), run_name=_redact(run_name or stage), tags=tags)
    status = "FAILED"
    try:
        yield StageRun(run.info.run_id, client, parent)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
        if status == "FAILED" and parent and parent_run_id is None and under_dvc():
            with contextlib.suppress(Exception):  # the execution ends here: so does its parent run
                end_workspace_parent("FAILED")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# -- model registry -------------------------------------------------------------------------

INPUT_EXAMPLE = ["A man in an orange hat starring at something.", "Two dogs play in the snow."]


def log_translator(
    run: StageRun,
    model_dir: Path,
    registered_name: str,
    tags: Mapping[str, str],
    precision: str = "fp32",
    kernel_plan: Path | None = None,
    device: str = "cpu",
):
    """Log the retrained model as a pyfunc translator in `run` and register a new version: its
    code as files, no pickle (models-from-code, automoe/pyfunc_model.py), its SentencePiece
    model, arch, weights, signature, input example, its serving `precision` and `device` as
    model config and the kernel plan it was timed with, when given."""
    import mlflow

    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(name="translator", **_pyfunc(model_dir, precision, kernel_plan, device))
    version = mlflow.register_model(info.model_uri, registered_name, tags=dict(tags))
    return int(version.version)


def save_translator(model_dir: Path, path: Path, precision: str = "fp32", device: str = "cpu") -> Path:
    """The same pyfunc translator saved to a local folder (`mlflow models serve -m FOLDER`)."""
    import mlflow

    mlflow.pyfunc.save_model(str(path), **_pyfunc(Path(model_dir), precision, None, device))
    return path


def _pyfunc(model_dir: Path, precision: str, kernel_plan: Path | None, device: str) -> dict:
    from mlflow.models import infer_signature

    import automoe

    code = Path(automoe.__file__).resolve().parent
    artifacts = {
        "model": str(model_dir / "model.pt"),
        "spm": str(model_dir / "spm.model"),
        "arch": str(model_dir / "arch.yaml"),
    }
    if kernel_plan is not None and kernel_plan.is_file():
        artifacts["kernels"] = str(kernel_plan)
    # an unnamed string column: accepts a list of strings and a DataFrame with a `text` column
    example = list(INPUT_EXAMPLE)
    return dict(
        python_model=str(code / "pyfunc_model.py"),  # models-from-code: no pickled class in the model
        artifacts=artifacts,
        code_paths=[str(code)],
        signature=infer_signature(example, ["Ein Mann.", "Zwei Hunde."]),
        input_example=example,
        # the serving layout and device it was measured and evaluated in
        model_config={"precision": precision, "device": device},
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """Pins a fresh environment can install from public indexes: without local version
    labels (torch 2.13.0+cpu is served by no public index as such; 2.13.0 is on PyPI)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "sentencepiece", "numpy", "pyyaml", "mlflow")]


def registry_client():
    return _client()


def registry_versions(client, name: str):
    """(current champion, all versions) as registry.Version values."""
    from automoe import registry as r

    def as_version(mv) -> r.Version:
        t = mv.tags
        return r.Version(
            int(mv.version),
            float(t.get(r.BLEU, "nan")),
            float(t.get(r.COST, "inf")),
            float(t.get(r.BUDGET, "inf")),
            decided=r.GATE in t,
            revoked=t.get(r.REVOKED) == "true",
            chrf=float(t.get(r.CHRF, "nan")),
            cost_low=float(t.get(r.COST_LOW, "nan")),
            cost_high=float(t.get(r.COST_HIGH, "nan")),
            reference=float(t.get(r.REFERENCE, "nan")),
            unit=t.get(r.UNIT, ""),
        )

    versions = [as_version(mv) for mv in client.search_model_versions(f"name='{name}'")]
    champion = champion_version(client, name)
    by_number = {v.number: v for v in versions}
    return (by_number.get(champion) if champion else None), versions


def version_of_pipeline_run(client, name: str, tags: Mapping[str, str]) -> int | None:
    """The version of `name` that this pipeline run (`automoe.pipeline_run_id`) already
    registered for this model (`automoe.model_sha256`): a retried register task finds it
    instead of registering a duplicate. Registrations by hand (no pipeline run) never match."""
    run_id = tags.get("automoe.pipeline_run_id")
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such model yet
        return None
    mine = [
        int(mv.version)
        for mv in found
        if mv.tags.get("automoe.pipeline_run_id") == run_id
        and mv.tags.get("automoe.model_sha256") == tags.get("automoe.model_sha256")
    ]
    return min(mine) if mine else None


def champion_version(client, name: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def settle_champion(client, name: str, gate) -> dict[str, Any]:
    """Run the promotion gate and move the `champion` alias; repeat until the registry agrees
    (a concurrent registration may have moved it in between)."""
    from automoe import registry as r

    for _ in range(5):
        champion, versions = registry_versions(client, name)
        best, verdicts = r.decide(champion, versions, gate)
        moving = best is not None and (champion is None or best.number != champion.number)
        for number, verdict in verdicts.items():
            if not (moving and number == best.number):
                _retry(client.set_model_version_tag, name, str(number), r.GATE, verdict)
        if moving:
            # the new champion records its predecessor before the alias moves, and is marked
            # decided only after: a crash in between leaves it to the next decision
            previous = str(champion.number) if champion else ""
            _retry(client.set_model_version_tag, name, str(best.number), r.PREVIOUS, previous)
            _retry(client.set_registered_model_alias, name, r.CHAMPION, str(best.number))
            _retry(client.set_model_version_tag, name, str(best.number), r.GATE, verdicts[best.number])
            _append_history(client, name, best.number, "gate")
        if champion_version(client, name) == (best.number if best else None):
            return {"champion": best.number if best else None, "verdicts": verdicts}
    raise RuntimeError(f"{name}: the champion alias kept moving; rerun register")


def _retry(call, *args, attempts: int = 5):
    """Registry writes that two registrations may make at once (the same tag, the same alias):
    a store can refuse the loser of such a race; the write is idempotent, so try again."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call(*args)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _append_history(client, name: str, version: int, how: str) -> None:
    model = client.get_registered_model(name)
    history = json.loads(model.tags.get("automoe.champion_history", "[]"))
    history.append({"version": version, "how": how, "at": int(time.time())})
    client.set_registered_model_tag(name, "automoe.champion_history", json.dumps(history[-50:]))


def promote(name: str, version: int) -> bool:
    """A person's promotion: `version` becomes champion whatever the gate says. False, and
    nothing changed, when it is the champion already (its previous champion stays the one
    a rollback returns to)."""
    from automoe import registry as r

    client = _existing_store_client()
    check_registry_uri(client, f"models:/{name}/{version}")  # a one-line error naming what exists
    current = champion_version(client, name)
    if current == version:
        return False
    client.set_model_version_tag(name, str(version), r.PREVIOUS, str(current) if current else "")
    client.set_model_version_tag(name, str(version), r.GATE, "promoted by hand")
    if r.REVOKED in client.get_model_version(name, str(version)).tags:
        client.delete_model_version_tag(name, str(version), r.REVOKED)
    client.set_registered_model_alias(name, r.CHAMPION, str(version))
    if current and current != version:
        client.set_model_version_tag(name, str(current), r.REVOKED, "true")
    _append_history(client, name, version, "promote")
    return True


def rollback(name: str) -> int:
    """Back to the champion before the current one; the current one is revoked."""
    from automoe import registry as r
    from automoe.errors import AutomoeError

    client = _existing_store_client()
    current = champion_version(client, name)
    if current is None:
        raise AutomoeError(f"{name}: has no champion to roll back")
    previous = client.get_model_version(name, str(current)).tags.get(r.PREVIOUS, "")
    if not previous:
        raise AutomoeError(f"{name}: champion v{current} has no previous champion to roll back to")
    client.set_model_version_tag(name, str(current), r.REVOKED, "true")
    if r.REVOKED in client.get_model_version(name, previous).tags:  # champion again: its state as it was
        client.delete_model_version_tag(name, previous, r.REVOKED)
    client.set_registered_model_alias(name, r.CHAMPION, previous)
    _append_history(client, name, int(previous), "rollback")
    return int(previous)


def load_translator(uri: str):
    """A registered or logged pyfunc translator (models:/NAME@ALIAS, models:/NAME/VERSION,
    runs:/...). A registry URI that names nothing is a one-line error saying what exists."""
    import mlflow.pyfunc

    client = _existing_store_client()
    if uri.startswith("models:/"):
        check_registry_uri(client, uri)
    return mlflow.pyfunc.load_model(uri)


def resolve_version(uri: str) -> int:
    """The version a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION) names now."""
    client = _existing_store_client()
    check_registry_uri(client, uri)
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return int(client.get_model_version_by_alias(name, alias).version)
    return int(ref.split("/", 1)[1])


def load_registered_translator(uri: str):
    """The `automoe.serving.Translator` inside a registered pyfunc translator, loaded as the
    pyfunc loads it (its precision, device and kernel plan)."""
    model = load_translator(uri).unwrap_python_model()
    if not hasattr(model, "translator"):
        raise AutomoeError(f"{uri}: not an automoe translator")
    return model.translator


def check_registry_uri(client, uri: str) -> None:
    """Raise AutomoeError naming what the registry has when `uri` (models:/NAME@ALIAS or
    models:/NAME/VERSION) points at no model version."""
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/") :]
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.split("/", 1)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise AutomoeError(f"{uri}: no registered model {name!r} (registered: {', '.join(known) or 'none'})") from None
    numbers = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
    have = f"versions {', '.join(map(str, numbers)) or 'none'}"
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "no aliases"
    if alias is not None and alias not in model.aliases:
        hint = f"; use models:/{name}/{numbers[-1]} or make one champion: automoe promote --name {name} --version N"
        raise AutomoeError(f"{uri}: {name} has no alias @{alias} ({aliases}; {have}){hint if numbers else ''}")
    if version is not None and (not version.isdigit() or int(version) not in numbers):
        raise AutomoeError(f"{uri}: {name} has no version {version} ({have}; {aliases})")
