"""The automoe KFP v2 pipeline: wiring only (tasks, resources, retries, caching), no logic.

    python pipeline.py compile [--output pipeline.yaml] [--set section.key=value ...]
    python pipeline.py run-local [--no-cache] [--set section.key=value ...]   # kfp.local, this machine
    python pipeline.py run-local --runner docker [--network NET] [--mount PATH ...] [--set ...]
    python pipeline.py upload --host http://ml-pipeline:8888 [--name automoe] [--version TAG] [--set ...]

The run's parameters are params.yaml (as JSON, the `params` pipeline parameter), the
fields below that a person sets in the Kubeflow UI (empty or 0 = keep params.yaml), then
`overrides` (`section.key=value` strings). Structure (latency shards, resources, images,
secrets) comes from params.yaml's `pipeline` and `measure_latency` sections at compile time;
`compile --set` / `upload --set` change them there (a run cannot: the params task refuses).
Compiled without `pipeline.mlflow_tracking_uri`, every task refuses to track into its pod's
own throwaway store (it fails at once, naming the setting).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kfp import compiler, dsl, kubernetes

import components as c
from automoe.config import PipelineConfig, load_section, merge, parse_overrides, read_yaml
from automoe.stages.measure_latency import MeasureLatencyConfig
from components.images import PARAMS_FILE

ROOT = Path(__file__).resolve().parent
# One line of JSON: a KFP dict parameter (protobuf Struct) turns ints into floats, and a
# multi-line default breaks the comment header of the compiled YAML.
PARAMS = json.dumps(read_yaml(PARAMS_FILE), separators=(",", ":"), sort_keys=True)
PIPELINE = load_section(PipelineConfig, "pipeline", PARAMS_FILE)
MEASURE = load_section(MeasureLatencyConfig, "measure_latency", PARAMS_FILE)
MERGED = "AUTOMOE_PIPELINE_MERGED"  # set in the child that compiles from params merged with compile-time --sets
RUN_LOCAL = {"on": False}  # kfp.local SubprocessRunner: tasks are processes here and may track into ./mlflow.db
# kfp.local DockerRunner: what a task's container gets from this process's environment
DOCKER_ENV = (
    "AUTOMOE_TRACKING",
    "AUTOMOE_PARENT_RUN_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def _tracking(task):
    """The tracking store of every task that tracks (stages, and the parent run's open/close)."""
    if PIPELINE.mlflow_tracking_uri:
        task.set_env_variable("MLFLOW_TRACKING_URI", PIPELINE.mlflow_tracking_uri)
    elif not RUN_LOCAL["on"]:  # a pod's own sqlite file vanishes with the pod: refuse it
        task.set_env_variable("AUTOMOE_NO_LOCAL_STORE", "pipeline.mlflow_tracking_uri")
    return task


def _task(task, stage: str, retries: int | None = None):
    """Resources, accelerator, retries, tracking and S3 credentials of a stage's task. The
    KFP run id reaches the pod from its `pipeline/runid` label (tracking finds the parent run
    by it and records it): as an input it would be part of the cache key of every task."""
    res = PIPELINE.resources_of(stage)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpu > 0:
        task.set_accelerator_type(PIPELINE.gpu_accelerator).set_accelerator_limit(res.gpu)
    retries = PIPELINE.retries if retries is None else retries
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2)
    task.set_display_name(stage)
    _tracking(task)
    if not RUN_LOCAL["on"]:  # kfp.local: run-local exports the parent run's id instead
        kubernetes.use_field_path_as_env(task, env_name="KFP_RUN_ID", field_path="metadata.labels['pipeline/runid']")
    if PIPELINE.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", PIPELINE.s3_endpoint)
    if PIPELINE.mlflow_secret:  # the pipeline's MLflow user (the chart's auth): never a param or in the spec
        kubernetes.use_secret_as_env(
            task,
            secret_name=PIPELINE.mlflow_secret,
            secret_key_to_env={k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
        )
    if PIPELINE.s3_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=PIPELINE.s3_secret,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
        )
    return task


def _measure_latency(prepared, supernet, common):
    """One pod, or `num_shards` pods in parallel on the target hardware, merged into one table."""
    if MEASURE.num_shards == 1:
        return _on_target(c.measure_latency(prepared=prepared, supernet=supernet, shard=0, **common)).outputs["latency"]
    with dsl.ParallelFor(items=list(range(MEASURE.num_shards))) as shard:
        part = _on_target(c.measure_latency(prepared=prepared, supernet=supernet, shard=shard, **common))
    return _task(c.merge_latency(shards=dsl.Collected(part.outputs["latency"])), "measure_latency").outputs["latency"]


def _on_target(task):
    """Latency is measured on the target hardware: node selector and accelerator from params."""
    for label, value in MEASURE.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    _task(task, "measure_latency")
    if MEASURE.accelerator:
        task.set_accelerator_type(MEASURE.accelerator).set_accelerator_limit(1)
    return task


@dsl.pipeline(
    name=PIPELINE.name,
    description="AutoMoE: search, train, evaluate and register a translation MoE",
    pipeline_root=PIPELINE.pipeline_root or None,
)
def automoe_pipeline(
    corpus_source: str = "",
    src_lang: str = "",
    tgt_lang: str = "",
    budget_kind: str = "",
    budget_value: float = 0.0,
    target_device: str = "",
    search_iterations: int = 0,
    search_population: int = 0,
    supernet_updates: int = 0,
    retrain_updates: int = 0,
    params: str = PARAMS,
    overrides: list = [],  # noqa: B006 - KFP needs a literal default
):
    # The exit task closes the parent run (FINISHED or FAILED); it finds it by the KFP run id.
    close = _tracking(c.close_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False))
    with dsl.ExitHandler(close):
        resolved = c.resolve_params(
            params=params,
            overrides=overrides,
            corpus_source=corpus_source,
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            budget_kind=budget_kind,
            budget_value=budget_value,
            target_device=target_device,
            search_iterations=search_iterations,
            search_population=search_population,
            supernet_updates=supernet_updates,
            retrain_updates=retrain_updates,
        ).set_display_name("params")
        parent = _tracking(c.open_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False))

        def own(stage: str) -> dict:
            """A stage task's inputs: its own params section only (the inputs are the cache key)."""
            return {"params": resolved.outputs[stage], "overrides": []}

        prepared = _task(c.prepare_data(**own("prepare_data")).after(parent), "prepare_data").outputs["prepared"]
        supernet = _task(
            c.train_supernet(
                prepared=prepared, nproc=PIPELINE.resources_of("train_supernet").gpu, **own("train_supernet")
            ),
            "train_supernet",
        ).outputs["supernet"]
        latency = _measure_latency(prepared, supernet, own("measure_latency"))
        predictor = _task(c.train_predictor(latency=latency, **own("train_predictor")), "train_predictor").outputs[
            "predictor"
        ]
        found = _task(c.search(prepared=prepared, supernet=supernet, predictor=predictor, **own("search")), "search")
        nproc = PIPELINE.resources_of("retrain").gpu
        searched = _task(
            c.retrain(
                prepared=prepared,
                arch_name="",
                search_result=found.outputs["result"],
                supernet=supernet,
                nproc=nproc,
                **own("retrain"),
            ),
            "retrain",
        ).set_display_name("retrain (searched)")
        dense = _task(
            c.retrain(prepared=prepared, arch_name="largest_dense", supernet=supernet, nproc=nproc, **own("retrain")),
            "retrain",
        )
        dense.set_display_name("retrain (dense baseline)")
        evaluation = _task(
            c.evaluate(
                prepared=prepared,
                model=searched.outputs["model"],
                baseline=dense.outputs["model"],
                latency=latency,
                **own("evaluate"),
            ),
            "evaluate",
        )
        registered = c.register(
            prepared=prepared,
            model=searched.outputs["model"],
            evaluation=evaluation.outputs["evaluation"],
            search_result=found.outputs["result"],
            **own("register"),
        )
        # never retried: a retry after the version was created would register a second one
        _task(registered, "register", retries=0).set_caching_options(False)  # the registry changes between runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.py")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", allow_abbrev=False, help="write the pipeline spec YAML")
    comp.add_argument("--output", default="pipeline.yaml")
    comp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    local = sub.add_parser("run-local", allow_abbrev=False, help="run every stage here with kfp.local")
    local.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    local.add_argument("--pipeline-root", default=".kfp_local")
    local.add_argument("--no-cache", action="store_true", help="run every task (default: reuse cached task outputs)")
    local.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: tasks are processes of this environment; docker: each task runs in the project "
        "image (pipeline.image:image_tag) as its non-root user, read-only root file system",
    )
    local.add_argument("--network", default="", help="docker: the Docker network of the task containers")
    local.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="PATH",
        help="docker: a host folder the tasks read (a corpus mirror), mounted read-only at the same path",
    )
    up = sub.add_parser("upload", allow_abbrev=False, help="compile and upload to a Kubeflow Pipelines endpoint")
    up.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    up.add_argument("--name", default=PIPELINE.name)
    up.add_argument("--version", default=PIPELINE.image_tag, help="pipeline version name")
    up.add_argument("--output", default="pipeline.yaml")
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    structure = args.overrides if args.command != "run-local" else _compile_time(args.overrides)
    if structure and os.environ.get(MERGED) != "1":  # compile-time keys change what this module builds:
        return _with_overrides(list(argv if argv is not None else sys.argv[1:]), structure)  # from merged params
    if args.command in ("compile", "upload"):
        compiler.Compiler().compile(automoe_pipeline, args.output)
        print(f"wrote {args.output}")
        if args.command == "upload":
            return upload(args.host, args.name, args.version, args.output)
        return 0
    from kfp import local as kfp_local

    from automoe import tracking

    root = Path(args.pipeline_root).absolute()
    env = _docker_env() if args.runner == "docker" else {}  # refuses a setup the containers cannot track from
    if tracking.enabled():  # this execution's parent run: the tasks inherit its id (not an input)
        tracking.check_store()
        os.environ["AUTOMOE_PARENT_RUN_ID"] = env["AUTOMOE_PARENT_RUN_ID"] = tracking.start_parent()
    if args.runner == "docker":
        runner = _docker_runner(env, args.network, args.mount, root)
    else:
        runner = kfp_local.SubprocessRunner(use_venv=False)
        RUN_LOCAL["on"] = True
    kfp_local.init(
        runner=runner,
        pipeline_root=str(root),
        enable_caching=not args.no_cache,  # as on a cluster: a task whose inputs are unchanged is reused
    )
    automoe_pipeline(params=PARAMS, overrides=list(args.overrides))
    return 0


def _docker_env() -> dict[str, str]:
    """What the task containers get from this process's environment (S3 credentials, tracking
    switches). The tracking store is the compiled `pipeline.mlflow_tracking_uri`, else this
    process's MLFLOW_TRACKING_URI when it is a server; anything else is refused."""
    from automoe import tracking

    env = {k: os.environ[k] for k in DOCKER_ENV if os.environ.get(k)}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not PIPELINE.mlflow_tracking_uri and uri.startswith(("http://", "https://")):
        env["MLFLOW_TRACKING_URI"] = uri
    elif not PIPELINE.mlflow_tracking_uri and tracking.enabled():
        raise SystemExit(
            "pipeline.py run-local --runner docker: the task containers need a tracking server: set "
            "MLFLOW_TRACKING_URI=http://<host>:5000 (or --set pipeline.mlflow_tracking_uri=...), or AUTOMOE_TRACKING=0"
        )
    return env


def _docker_runner(env: dict[str, str], network: str, mounts: list[str], root: Path):
    """Each task in the project image with `env`, as a cluster pod runs it: the image's non-root
    user, a read-only root file system with a scratch /tmp, the pipeline root (mounted by
    kfp.local at its own path) and the `mounts`, read-only, as its only folders."""
    from kfp import local as kfp_local

    import docker

    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o777)  # the image's user (uid 10001) writes task outputs into it
    binds = []
    for path in mounts:
        source = Path(path).absolute()
        if not source.is_dir():
            raise SystemExit(f"pipeline.py: --mount {path}: not a folder")
        binds.append(docker.types.Mount(target=str(source), source=str(source), type="bind", read_only=True))
    run_args = {
        "entrypoint": ["/usr/bin/env"],  # the image's entrypoint is `automoe`; the task's command is a shell line
        "environment": env,
        "read_only": True,
        "tmpfs": {"/tmp": ""},
        "mounts": binds,
    }
    if network:
        run_args["network"] = network
    return kfp_local.DockerRunner(**run_args)


def _compile_time(overrides: list[str]) -> list[str]:
    from automoe.stages.pipeline_params import compile_time_keys

    fixed = set(compile_time_keys(overrides))
    return [o for o in overrides if o.partition("=")[0].strip() in fixed]


def _with_overrides(argv: list[str], overrides: list[str]) -> int:
    """Compile (upload, run-local) from params.yaml with `overrides` applied: the structure is
    read when this module and the components are imported, so a child process does it from a
    merged, validated copy of params.yaml. The other `--set`s of run-local stay run overrides."""
    from automoe.stages.pipeline_params import validate

    data = merge(read_yaml(PARAMS_FILE) or {}, parse_overrides(overrides))
    validate(data)
    rest, skip = [], False
    for i, a in enumerate(argv):  # the applied --sets leave, in both forms argparse takes
        if skip:
            skip = False
            continue
        if a == "--set" and i + 1 < len(argv) and argv[i + 1] in overrides:
            skip = True
            continue
        if a.startswith("--set=") and a.split("=", 1)[1] in overrides:
            continue
        rest.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "params.yaml"
        merged.write_text(json.dumps(data))
        # the child builds from the merged params and never starts another (MERGED)
        env = dict(os.environ, AUTOMOE_PIPELINE_PARAMS=str(merged), **{MERGED: "1"})
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], env=env).returncode


def upload(host: str, name: str, version: str, package: str) -> int:
    """A new version of the pipeline (creating the pipeline the first time)."""
    import kfp

    client = kfp.Client(host=host)
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        client.upload_pipeline(package, pipeline_name=name, description="automoe (AutoMoE NAS pipeline)")
        print(f"uploaded pipeline {name}")
    else:
        client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pipeline_id)
        print(f"uploaded pipeline {name} version {version}")
    return 0


def guarded_main(argv: list[str] | None = None) -> int:
    """main, with a user's mistake (a mistyped section or key, a wrong type) as one line
    `error: ...` and exit status 2, as on the stage CLIs."""
    from automoe.errors import AutomoeError
    from automoe.redact import redact

    try:
        return main(argv)
    except AutomoeError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(guarded_main())
