"""The walking skeleton end to end: MLflow runs, dvc repro, KFP compile and kfp.local."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, as_overrides, paths_overrides, subprocess_env, tiny_pipeline_params

from automoe import tracking
from automoe.errors import AutomoeError
from automoe.stages import prepare_data

# one MLflow child run per stage execution (retrain runs twice: searched and dense)
ALL_STAGE_RUNS = ["prepare_data", "train_supernet", "measure_latency", "train_predictor", "search"]
ALL_STAGE_RUNS += ["retrain/searched", "retrain/dense", "evaluate", "register"]


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("automoe")
    assert exp is not None, "no automoe experiment was created"
    return client, client.search_runs([exp.experiment_id])


def test_stage_runs_are_children_of_one_workspace_parent(small_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    monkeypatch.setenv("DVC_STAGE", "prepare_data")  # as DVC runs a stage command
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["--out", "prepared", *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]]
    assert prepare_data.main(args) == 0, capsys.readouterr().err
    assert prepare_data.main(args + ["--set", "prepare_data.vocab_size=350"]) == 0
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert child.info.run_name == "prepare_data" and child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["automoe.stage"] == "prepare_data" and "automoe.git_commit" in child.data.tags
        assert child.data.metrics["train_pairs"] == 300
        assert child.data.params["source"] == "paths"
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["manifest.json"]
    assert {c.data.params["vocab_size"] for c in children} == {"400", "350"}
    assert json.loads((tmp_path / tracking.PARENT_FILE).read_text())["run_id"] == parents[0].info.run_id


def test_the_workspace_parent_ends_with_its_execution_and_ad_hoc_runs_join_none(
    small_corpus, tmp_path, monkeypatch, capsys
):
    """A stage DVC runs opens the execution's parent; a failed stage ends it FAILED and the next
    execution opens a new one; the end of an execution (register) ends it FINISHED with its
    figures. A stage run by hand outside DVC is a top-level run: it joins no parent."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["--out", "prepared", *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]]
    monkeypatch.setenv("DVC_STAGE", "prepare_data")
    assert prepare_data.main(args) == 0
    first = json.loads((tmp_path / tracking.PARENT_FILE).read_text())["run_id"]
    assert prepare_data.main(["--out", "p2", "--set", "prepare_data.mirror=/nonexistent"]) == 2  # fails
    assert not (tmp_path / tracking.PARENT_FILE).exists()
    assert prepare_data.main(args) == 0  # the next execution
    second = json.loads((tmp_path / tracking.PARENT_FILE).read_text())["run_id"]
    assert second != first
    assert tracking.end_workspace_parent("FINISHED", {"searched_bleu": 25.0}, {"model_name": "m"}) == second
    monkeypatch.delenv("DVC_STAGE")
    assert prepare_data.main(args) == 0  # by hand, after the execution
    client, runs = mlflow_runs(uri)
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[first].info.status == "FAILED" and by_id[second].info.status == "FINISHED"
    assert by_id[second].data.metrics == {"searched_bleu": 25.0} and by_id[second].data.params == {"model_name": "m"}
    alone = [r for r in runs if r.info.run_name == "prepare_data" and "mlflow.parentRunId" not in r.data.tags]
    assert len(alone) == 1 and alone[0].info.status == "FINISHED"
    assert not (tmp_path / tracking.PARENT_FILE).exists()


def test_default_store_is_in_the_dvc_project_when_dvc_runs_stages_in_a_copy(small_corpus, tmp_path, monkeypatch):
    """`dvc exp run` runs stages in a temporary copy of the project and sets DVC_ROOT to the
    project: the default store and the parent-run file must be the project's, not the copy's."""
    project, copy = tmp_path / "project", tmp_path / "exp-copy"
    project.mkdir()
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(project))
    args = ["--out", "prepared", *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]]
    assert prepare_data.main(args) == 0
    assert (project / "mlflow.db").is_file() and (project / tracking.PARENT_FILE).is_file()
    assert not (copy / "mlflow.db").exists() and not (copy / ".automoe").exists()
    _, runs = mlflow_runs(f"sqlite:///{project / 'mlflow.db'}")
    assert sorted(r.info.run_name for r in runs) == ["pipeline", "prepare_data"]


def test_failed_stage_run_is_marked_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert prepare_data.main(["--out", "p", "--set", "prepare_data.mirror=/nonexistent"]) == 2
    _, runs = mlflow_runs(uri)
    assert [r.info.status for r in runs if r.info.run_name == "prepare_data"] == ["FAILED"]


def test_a_pod_finds_its_parent_run_by_the_kfp_run_id_and_records_it(tmp_path, monkeypatch):
    """On a cluster the run id comes from the pod's label (KFP_RUN_ID), never from a task input."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent = tracking.open_kfp_parent("run-1234")  # the open-tracking task
    monkeypatch.setenv("KFP_RUN_ID", "run-1234")  # a stage's pod
    with tracking.stage_run("search") as run:
        assert run.parent_run_id == parent
    _, runs = mlflow_runs(uri)
    child = next(r for r in runs if r.info.run_name == "search")
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.tags["automoe.kfp_run_id"] == "run-1234"
    assert not (tmp_path / tracking.PARENT_FILE).exists()  # no workspace parent in a pod
    monkeypatch.setenv("KFP_RUN_ID", "run-without-parent")
    with pytest.raises(AutomoeError, match="no parent run tagged automoe.kfp_run_id=run-without-parent"):
        tracking.kfp_parent("run-without-parent", attempts=1)
    # kfp.local: run-local hands its parent to the tasks; open-tracking tags that one
    monkeypatch.setenv("AUTOMOE_PARENT_RUN_ID", parent)
    assert tracking.open_kfp_parent("local-run") == parent


def copy_repo(dst: Path) -> Path:
    top_level = {
        ".venv",
        "tmp",
        "data",
        "reports",
        ".git",
        "mlflow.db",
        "mlartifacts",
        ".automoe",
        ".kfp_local",
        "dvc.lock",
        "pipeline.yaml",
        ".pytest_cache",
        ".ruff_cache",
    }
    anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info")

    def ignore(folder, names):
        skip = set(anywhere(folder, names))
        return skip | (top_level & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dst, ignore=ignore)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def set_params(repo: Path, sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def reproduced(multi30k, tmp_path_factory):
    """A copy of the repository after `dvc repro` at toy size: (repo, env, dvc, tracking URI, output)."""
    tmp = tmp_path_factory.mktemp("reproduced")
    repo = copy_repo(tmp / "repo")
    set_params(repo, tiny_pipeline_params(multi30k))
    uri = f"sqlite:///{tmp / 'store.db'}"
    env = subprocess_env(AUTOMOE_TRACKING="1", MLFLOW_TRACKING_URI=uri, DVC_NO_ANALYTICS="1")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    first = subprocess.run(dvc + ["repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    return repo, env, dvc, uri, first


@pytest.mark.slow
def test_dvc_repro_in_a_copy_of_the_repo(reproduced):
    repo, env, dvc, uri, first = reproduced
    assert first.returncode == 0, first.stdout + first.stderr
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"]["raw"] == 300
    assert json.loads((repo / "reports/prepare_data.json").read_text())["train_pairs"] == 300
    assert (repo / "dvc.lock").is_file()
    again = subprocess.run(dvc + ["repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr
    _, runs = mlflow_runs(uri)
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert children == sorted(ALL_STAGE_RUNS)
    # no tag claims to identify the committed dvc.lock (it hashed a file mid-run and matched no commit)
    assert not [r.info.run_name for r in runs if any(t.startswith("automoe.dvc_lock") for t in r.data.tags)]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert len(parents) == 1
    parent = next(r for r in runs if r.info.run_id in parents)  # ended with the execution, its figures on it
    assert parent.info.status == "FINISHED" and {"searched_bleu", "speedup", "promoted"} <= set(parent.data.metrics)
    assert parent.data.params["model_name"] == "automoe-en-de"
    assert (repo / "models/supernet/supernet.pt").is_file() and (repo / "models/retrain/dense/model.pt").is_file()
    registration = json.loads((repo / "results/register/registration.json").read_text())
    assert registration["version"] == 1 and registration["promoted"] and registration["champion"] == 1
    assert "searched" in (repo / "results/evaluate/report.md").read_text()
    # checkpoints (with optimizer state) are persisted but never copied into the DVC cache
    import hashlib

    cache = {p.parent.name + p.name for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    ckpts = list((repo / "models/supernet/checkpoints").glob("*.pt"))
    assert ckpts and (repo / "models/supernet/supernet.pt").is_file()
    assert not {hashlib.md5(p.read_bytes()).hexdigest() for p in ckpts} & cache  # noqa: S324 - DVC's key
    assert hashlib.md5((repo / "models/supernet/supernet.pt").read_bytes()).hexdigest() in cache  # noqa: S324
    # a change in a module a stage imports (not named by the stage itself) makes it stale
    module = repo / "src/automoe/model/inference.py"
    source = module.read_text()
    module.write_text(source + "\n# changed\n")
    status = subprocess.run(dvc + ["status"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    module.write_text(source)
    assert "measure_latency:" in status.stdout and "prepare_data:" not in status.stdout, status.stdout


def _imported_files(module: str, skip: set[str]) -> set[str]:
    """The package files `module` imports, transitively (function-level imports included),
    not following the modules in `skip`."""
    import ast

    src = ROOT / "src"

    def file_of(mod: str) -> Path | None:
        p = src.joinpath(*mod.split("."))
        return (
            p / "__init__.py"
            if (p / "__init__.py").is_file()
            else (p.with_suffix(".py") if p.with_suffix(".py").is_file() else None)
        )

    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen or mod in skip:
            continue
        seen.add(mod)
        path = file_of(mod)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            todo += [n for n in names if n.startswith("automoe") and file_of(n)]
    return {str(file_of(m).relative_to(ROOT)) for m in seen}


def test_dvc_stage_deps_cover_every_module_the_stage_imports():
    """A change in any module a stage runs makes `dvc repro` rerun it. MLflow tracking does
    not change a stage's outputs (it is not followed), except for register, whose output
    is the registration."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        skip = set() if name == "register" else {"automoe.tracking"}
        needed = _imported_files(f"automoe.stages.{name}", skip)
        missing = sorted(f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {name} does not depend on {missing}"


def test_pipeline_compiles_to_a_valid_pipeline_spec(tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    out = tmp_path / "pipeline.yaml"
    proc = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields fail
    executors = parsed.deployment_spec["executors"]
    images = {e["container"]["image"] for e in executors.values()}
    from components import IMAGE

    assert images == {"ghcr.io/automoe/automoe:0.1.0"}  # every task given the params' image
    assert IMAGE not in out.read_text()  # the components' placeholder never reaches a spec
    assert set(parsed.root.dag.tasks) == {"exit-handler-1", "close-tracking"}
    inner = set(parsed.components["comp-exit-handler-1"].dag.tasks)
    stages = {
        "prepare-data",
        "train-supernet",
        "measure-latency",
        "train-predictor",
        "search",
        "retrain",
        "retrain-2",
        "evaluate",
        "register",
    }
    assert inner == stages | {"resolve-params", "open-tracking"}
    for task in stages - {"register"}:  # retries for transient failures
        assert parsed.components["comp-exit-handler-1"].dag.tasks[task].retry_policy.max_retry_count == 2
    # but not register: a retry after its version was created would register a second version
    assert parsed.components["comp-exit-handler-1"].dag.tasks["register"].retry_policy.max_retry_count == 0
    for executor in executors.values():  # nothing is pip-installed at run time
        assert "pip install" not in " ".join(executor["container"]["command"])
    # the cache key of a task is its inputs: only its own params section, nothing per execution
    dag = parsed.components["comp-exit-handler-1"].dag.tasks
    for task in stages:
        inputs = dag[task].inputs.parameters
        assert "parent_run_id" not in inputs and "kfp_run_id" not in inputs
        source = inputs["params"].task_output_parameter
        stage = task.removesuffix("-2").replace("-", "_")
        assert (source.producer_task, source.output_parameter_key) == ("resolve-params", stage)
        assert "open-tracking" in dag[task].dependent_tasks or task != "prepare-data"
    platform = spec_platform(out)
    for task in stages:  # the run id reaches the pod from its label (lineage, parent run)
        env = platform[f"exec-{task}"]["fieldPathAsEnv"]
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in env


def run_local_command(multi30k: Path, tmp_path: Path) -> tuple[str, dict[str, str], list[str]]:
    """(store URI, environment, command) of a tracked `pipeline.py run-local` at toy size."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = subprocess_env(AUTOMOE_TRACKING="1", MLFLOW_TRACKING_URI=uri, TMPDIR=str(tmp_path))
    cmd = [sys.executable, "pipeline.py", "run-local", "--pipeline-root", str(tmp_path / "root")]
    cmd += [a for o in as_overrides(tiny_pipeline_params(multi30k)) for a in ("--set", o)]
    return uri, env, cmd


def spec_platform(path: Path) -> dict:
    """The Kubernetes platform config of each executor in a compiled pipeline file."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.slow
def test_kfp_local_run_records_its_runs_and_a_rerun_with_a_new_budget_reuses_the_cache(multi30k, tmp_path):
    uri, env, cmd = run_local_command(multi30k, tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifests = list((tmp_path / "root").rglob("manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["counts"]["train"]["kept"] > 0
    _, runs = mlflow_runs(uri)
    parent = [r for r in runs if r.info.run_name == "pipeline"]
    child = [r for r in runs if r.info.run_name == "prepare_data"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(child) == 1 and child[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert all(r.info.status == "FINISHED" for r in runs)
    registrations = list((tmp_path / "root").rglob("registration.json"))
    assert len(registrations) == 1 and json.loads(registrations[0].read_text())["champion"] == 1

    # the same run with only a new budget
    proc = subprocess.run(
        cmd + ["--set", "search.budget.value=0.7"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, runs = mlflow_runs(uri)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    first, second = (
        sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents
    )
    assert first == sorted(ALL_STAGE_RUNS)
    # data, supernet, latency table, predictor and the dense baseline came from the cache
    assert second == ["evaluate", "register", "retrain/searched", "search"]
    searched = [r for r in runs if r.info.run_name == "search"]
    assert sorted(r.data.params["budget.value"] for r in searched) == ["0.7", "0.8"]


def test_gpu_resources_compile_to_cuda_image_accelerators_and_secrets(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pipeline"]["resources"]["train_supernet"]["gpu"] = 4
    params["pipeline"]["s3_secret"] = "automoe-s3"
    params["pipeline"]["mlflow_secret"] = "automoe-mlflow-pipeline"
    params["pipeline"]["mlflow_tracking_uri"] = "http://mlflow.automoe:5000"
    params["pipeline"]["pipeline_root"] = "s3://automoe/kfp"
    params["measure_latency"]["num_shards"] = 3
    params["measure_latency"]["node_selector"] = {"node.kubernetes.io/instance-type": "c6i.large"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "p.yaml"
    proc = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(out)],
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    spec, platform = docs[0], docs[1]
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-supernet"]["container"]
    assert train["image"].endswith("-cuda") and train["resources"]["accelerator"]["resourceCount"] == "4"
    assert executors["exec-prepare-data"]["container"]["image"].endswith(":0.1.0")
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.automoe:5000"} in train["env"]
    # training resumes from the run store on a retry (under the pipeline root); no other stage uses it
    store = {"name": "AUTOMOE_RUN_STORE", "value": "s3://automoe/kfp/runs"}
    assert store in train["env"] and store in executors["exec-retrain"]["container"]["env"]
    assert store not in executors["exec-measure-latency"]["container"].get("env", [])
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = {e["secretName"]: e for e in k8s["exec-train-supernet"]["secretAsEnv"]}
    assert set(secrets) == {"automoe-s3", "automoe-mlflow-pipeline"}
    assert {m["envVar"] for m in secrets["automoe-mlflow-pipeline"]["keyToEnv"]} == {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }  # the credential is a Secret reference: nothing of it is in the spec
    assert k8s["exec-measure-latency"]["nodeSelector"]["labels"] == {"node.kubernetes.io/instance-type": "c6i.large"}
    assert "exec-merge-latency" in executors  # shards measured in a ParallelFor, then merged


def test_ui_fields_override_params_and_are_validated():
    from automoe.stages.pipeline_params import resolve

    params = (ROOT / "params.yaml").read_text()
    ui = {
        "corpus_source": "",
        "src_lang": "en",
        "tgt_lang": "fr",
        "budget_kind": "gflops",
        "budget_value": 0.3,
        "target_device": "",
        "search_iterations": 7.0,
        "search_population": 0,
        "supernet_updates": 0,
        "retrain_updates": 0,
    }
    data = json.loads(resolve(params, ["search.seed=5"], ui))
    assert data["prepare_data"]["tgt_lang"] == "fr" and data["search"]["budget"] == {
        **data["search"]["budget"],
        "kind": "gflops",
        "value": 0.3,
    }
    assert data["search"]["iterations"] == 7 and data["search"]["seed"] == 5
    assert data["search"]["population"] == yaml.safe_load(params)["search"]["population"]  # 0 keeps params.yaml
    from automoe.errors import ConfigError

    with pytest.raises(ConfigError, match="search.budget.kind: expected one of"):
        resolve(params, [], dict(ui, budget_kind="watts"))


def test_serving_precision_is_one_setting_for_measure_evaluate_and_register():
    from automoe.stages.pipeline_params import resolve

    params = (ROOT / "params.yaml").read_text()
    with pytest.raises(ValueError, match="measure_latency.precision=int8, evaluate.decode.precision=fp32"):
        resolve(params, ["measure_latency.precision=int8"], {})
    keys = ("measure_latency.precision", "evaluate.decode.precision", "register.precision")
    data = json.loads(resolve(params, [f"{k}=int8" for k in keys], {}))
    assert data["measure_latency"]["precision"] == data["register"]["precision"] == "int8"
    # GPU serving: fp16/bf16 on a GPU only, latency measured on the device that serves
    with pytest.raises(ValueError, match="fp16 serving runs on a GPU only"):
        resolve(params, [f"{k}=fp16" for k in keys], {})
    gpu = [f"{k}=bf16" for k in keys] + ["measure_latency.device=cuda", "evaluate.decode.device=cuda"]
    data = json.loads(resolve(params, gpu, {}))
    assert data["evaluate"]["decode"] == {**data["evaluate"]["decode"], "precision": "bf16", "device": "cuda"}
    with pytest.raises(ValueError, match="measure_latency.device=cuda, evaluate.decode.device=cpu"):
        resolve(params, ["measure_latency.device=cuda"], {})
    data = json.loads(resolve(params, [], {"target_device": "cuda"}))  # the UI field moves both
    assert data["measure_latency"]["device"] == data["evaluate"]["decode"]["device"] == "cuda"


def test_compile_time_settings_come_from_compile_set_and_runs_cannot_change_them(tmp_path, monkeypatch):
    """compile/upload take --set (the chart's upload Job passes the cluster's MLflow URI);
    without a tracking URI every task refuses its pod-local store; a run's overrides cannot
    change what compilation fixed."""
    out = tmp_path / "p.yaml"

    def compile_with(*sets: str) -> dict:
        cmd = [sys.executable, "pipeline.py", "compile", "--output", str(out)]
        cmd += [a for s in sets for a in ("--set", s)]
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]

    uri = "http://automoe-mlflow.automoe.svc.cluster.local:5000"
    executors = compile_with(f"pipeline.mlflow_tracking_uri={uri}", "pipeline.image_tag=abc123")
    train = executors["exec-train-supernet"]["container"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in train["env"]
    assert train["image"] == "ghcr.io/automoe/automoe:abc123"
    digest = "sha256:" + "0f" * 32
    executors = compile_with("pipeline.image_tag=abc123", f"pipeline.image_digest={digest}")
    assert executors["exec-train-supernet"]["container"]["image"] == f"ghcr.io/automoe/automoe:abc123@{digest}"
    from automoe.config import PipelineConfig

    both = PipelineConfig(image_tag="t", image_digest=digest, image_digest_cuda="sha256:" + "1e" * 32)
    assert both.image_for("train_supernet", cuda=True) == "ghcr.io/automoe/automoe:t-cuda@sha256:" + "1e" * 32
    assert (
        PipelineConfig(image_tag="t", image_digest=digest).image_for("x", cuda=True) == "ghcr.io/automoe/automoe:t-cuda"
    )
    bad = [sys.executable, "pipeline.py", "compile", "--output", str(out), "--set", "pipeline.image_digest=latest"]
    proc = subprocess.run(bad, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "image_digest" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # --set=VALUE, argparse's other form, too (it used to start a child that started a child, without end)
    cmd = [sys.executable, "pipeline.py", "compile", "--output", str(out), "--set=pipeline.image_tag=eq1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["deploymentSpec"]["executors"]["exec-train-supernet"]["container"]["image"].endswith(":eq1")
    assert not any(e["name"] == "AUTOMOE_NO_LOCAL_STORE" for e in train["env"])
    executors = compile_with()
    assert {"name": "AUTOMOE_NO_LOCAL_STORE", "value": "pipeline.mlflow_tracking_uri"} in executors[
        "exec-prepare-data"
    ]["container"]["env"]
    bad = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(out), "--set", "pipeline.retries=many"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "retries" in bad.stderr

    # in a task compiled that way, tracking into the pod's own sqlite file fails at once
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("AUTOMOE_NO_LOCAL_STORE", "pipeline.mlflow_tracking_uri")
    with pytest.raises(tracking.AutomoeError, match="pipeline.mlflow_tracking_uri=http"):
        tracking.check_store()

    from automoe.stages.pipeline_params import resolve

    params = (ROOT / "params.yaml").read_text()
    for key in ("measure_latency.num_shards=4", "pipeline.image_tag=x", "measure_latency.node_selector.a=b"):
        with pytest.raises(ValueError, match="fixed when the pipeline was compiled"):
            resolve(params, [key], {})
    assert json.loads(resolve(params, ["measure_latency.repeats=4"], {}))["measure_latency"]["repeats"] == 4


@pytest.mark.slow
def test_the_readme_commands_run_as_written_after_a_pipeline_run(reproduced, tmp_path):
    """In the workspace a pipeline run left (toy size): a DVC experiment, `make compare`'s
    table and `dvc metrics diff` against it; then every `automoe` command of the README, in
    the README's order, exits 0. Changed only where the README names a file of the user's
    (/tmp/..., my-params.yaml); the S3 corpus example needs an S3 store (tests/test_s3_source.py
    runs it against SeaweedFS)."""
    import re

    from test_local_workflow import readme_commands

    repo, env, dvc, uri, first = reproduced
    assert first.returncode == 0, first.stdout + first.stderr

    def execute(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, cwd=repo, env=env, input=stdin, capture_output=True, text=True, timeout=600)
        said = proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{said}"
        return proc

    # DVC: an experiment, compared with the commit by make compare's columns and by metrics diff
    execute(["git", "add", "-A"])
    execute(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "make run"])
    execute(dvc + ["exp", "run", "-n", "fewer", "-S", "evaluate.max_sentences=10"])
    columns = re.search(r"^EXP_COLUMNS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).replace("$$", "$")
    table = execute(dvc + ["exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep", columns]).stdout
    header = table.splitlines()[0]
    assert "searched_bleu" in header and "speedup" in header and "evaluate.max_sentences" in header, table
    assert "fewer" in table and "!" not in table.replace("!=", ""), table
    diff = execute(dvc + ["metrics", "diff", "HEAD", "fewer", "--all", "--md"]).stdout
    assert "reports/evaluate.json" in diff and "searched_bleu" in diff, diff

    shutil.copy(repo / "params.yaml", repo / "my-params.yaml")
    automoe = str(Path(sys.executable).parent / "automoe")
    ran = []
    for words in readme_commands():
        if any("s3://" in w for w in words):
            continue
        words = [w.replace("/tmp/", f"{tmp_path}/") for w in words]
        if words[0] == "translate":
            out = execute([automoe, *words], "A dog runs through the snow.\n").stdout.splitlines()
            assert len(out) == 1, (words, out)  # a line per line (toy models may say nothing)
        elif words[0] == "serve":  # a server: started, asked as the README's curl asks, stopped
            serve_as_written(automoe, words, repo, env, tmp_path)
        else:
            execute([automoe, *words])
        ran.append(words[0])
    assert ran.count("translate") == 3
    assert {"retrain", "export_ct2", "register", "promote", "rollback", "serve"} <= set(ran)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='automoe-en-de'"))
    assert versions == [1, 2]  # make run's and the README's register (the experiment's went elsewhere)
    assert tracking.champion_version(client, "automoe-en-de") == 1  # promote v2, then rollback


def serve_as_written(automoe: str, words: list[str], repo: Path, env: dict, tmp_path: Path) -> None:
    """`automoe serve` as the README writes it, on a free port instead of 5001, until it
    answers the README's request with a translation."""
    from servers import free_port, invocations, stop, wait_http

    port = free_port()
    words = [str(port) if w == "5001" else w for w in words]
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [automoe, *words], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=300, proc=proc)
        assert len(invocations(f"http://127.0.0.1:{port}", ["A dog runs."])[0]["predictions"]) == 1
    finally:
        stop(proc)


def test_the_pipeline_is_built_by_a_function_of_the_params(tmp_path):
    """No params read at import and no child process: `build(params)` makes the pipeline.
    Every run field is described in the Kubeflow UI and defaults to the params' value;
    pod settings per stage (node selector, tolerations, /dev/shm, pull secrets) and a GPU
    latency target's CUDA image are compiled in."""
    import importlib

    from kfp import compiler

    from automoe.stages.pipeline_params import UI_FIELDS

    sys.path.insert(0, str(ROOT))
    try:
        pipeline = importlib.import_module("pipeline")
    finally:
        sys.path.remove(str(ROOT))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["search"]["budget"]["value"] = 0.3
    params["train_supernet"]["train"]["max_updates"] = 77
    params["prepare_data"]["tgt_lang"] = "fr"
    gpu_pool = params["pipeline"]["resources"]["train_supernet"]
    gpu_pool["node_selector"] = {"pool": "gpu"}
    gpu_pool["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    gpu_pool["shm"] = "8Gi"
    params["pipeline"]["image_pull_secrets"] = ["registry-pull"]
    params["measure_latency"]["accelerator"] = "nvidia.com/gpu"
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline.build(params), str(out))
    spec, platform = list(yaml.safe_load_all(out.read_text()))

    fields = spec["root"]["inputDefinitions"]["parameters"]
    for name, key in UI_FIELDS.items():
        assert fields[name]["description"].startswith(key + ":"), name
    assert fields["params"]["description"] and fields["overrides"]["description"]
    assert fields["budget_value"]["defaultValue"] == 0.3 and fields["supernet_updates"]["defaultValue"] == 77
    assert fields["tgt_lang"]["defaultValue"] == "fr" and fields["corpus_source"]["defaultValue"] == "multi30k"
    assert json.loads(fields["params"]["defaultValue"]) == params

    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-measure-latency"]["container"]["image"] == "ghcr.io/automoe/automoe:0.1.0-cuda"
    assert executors["exec-prepare-data"]["container"]["image"] == "ghcr.io/automoe/automoe:0.1.0"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = k8s["exec-train-supernet"]
    assert train["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert train["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm = {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}
    assert train["emptyDirMounts"] == [shm]
    assert "tolerations" not in k8s["exec-prepare-data"]
    for name, executor in k8s.items():
        assert [s["secretName"] for s in executor["imagePullSecret"]] == ["registry-pull"], name
