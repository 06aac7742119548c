"""The automoe KFP v2 pipeline: wiring only (tasks, resources, retries, caching), no logic.

    python pipeline.py compile [--output pipeline.yaml] [--set section.key=value ...]
    python pipeline.py run-local [--no-cache] [--set section.key=value ...]   # kfp.local, this machine
    python pipeline.py run-local --runner docker [--network NET] [--mount PATH ...] [--set ...]
    python pipeline.py upload --host http://ml-pipeline:8888 [--name automoe] [--version TAG] [--set ...]

`build(params)` makes the pipeline from params.yaml (as a mapping, `--set`s applied): no
params are read at import and no child process is started. A run's parameters are
params.yaml (as JSON, the `params` pipeline parameter), the fields a person sets in the
Kubeflow UI (each described there, with params.yaml's value as its default; emptied or 0
= keep the JSON's), then `overrides` (`section.key=value` strings). Structure (latency
shards, resources, pod settings, images, secrets) comes from params.yaml's `pipeline` and
`measure_latency` sections at compile time; `compile --set` / `upload --set` change them
there (a run cannot: the params task refuses).
Compiled without `pipeline.mlflow_tracking_uri`, every task refuses to track into its pod's
own throwaway store (it fails at once, naming the setting).
"""

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

import components as c
from automoe.config import PipelineConfig, load_section, merge, parse_overrides, read_yaml
from automoe.errors import ConfigError
from automoe.stages.measure_latency import MeasureLatencyConfig
from automoe.stages.pipeline_params import INTEGER_FIELDS, UI_FIELDS, compile_time_keys, validate

ROOT = Path(__file__).resolve().parent
PARAMS_FILE = ROOT / "params.yaml"
# stages whose checkpoints or search state go to the run store (pipeline.run_store): a retried task resumes
RESUMABLE = ("train_supernet", "search", "retrain")
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
# what the Kubeflow UI shows beside each run field (the pipeline function's docstring)
FIELD_HELP = {
    "corpus_source": "prepare_data.source: multi30k, or paths (prepare_data.paths in params)",
    "src_lang": "prepare_data.src_lang: source language code, e.g. en",
    "tgt_lang": "prepare_data.tgt_lang: target language code, e.g. de",
    "budget_kind": "search.budget.kind: latency_ms or gflops",
    "budget_value": "search.budget.value: the budget; a fraction of the dense reference's cost "
    "when search.budget.relative_to_dense (0.5 = half)",
    "target_device": "measure_latency.device: where latency is measured and the model served "
    "(evaluate.decode.device follows), cpu or cuda",
    "search_iterations": "search.iterations: evolutionary search generations",
    "search_population": "search.population: archs per generation",
    "supernet_updates": "train_supernet.train.max_updates: supernet training updates",
    "retrain_updates": "retrain.train.max_updates: updates of each retrained model",
}


def field_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """Each run field's real default: the value its params key has (or the stage's own default)."""
    from automoe.cli import COMMANDS

    out = {}
    for field, key in UI_FIELDS.items():
        section, *path = key.split(".")
        value: Any = importlib.import_module(COMMANDS[section]).load_config(params)
        for name in path:
            value = getattr(value, name)
        out[field] = int(value) if field in INTEGER_FIELDS else float(value) if field == "budget_value" else str(value)
    return out


@dataclass(frozen=True)
class Build:
    """What one compiled pipeline is made of: params.yaml's `pipeline` and `measure_latency`
    structure, and whether its tasks run as kfp.local processes here."""

    pipeline: PipelineConfig
    measure: MeasureLatencyConfig
    run_local: bool = False  # kfp.local SubprocessRunner: tasks are processes here and may track into ./mlflow.db

    def tracking(self, task, stage: str = ""):
        """Image and tracking store of every task (stages, and the parent run's open/close)."""
        task.set_container_image(self.pipeline.image_for(stage))
        if self.pipeline.mlflow_tracking_uri:
            task.set_env_variable("MLFLOW_TRACKING_URI", self.pipeline.mlflow_tracking_uri)
        elif not self.run_local:  # a pod's own sqlite file vanishes with the pod: refuse it
            task.set_env_variable("AUTOMOE_NO_LOCAL_STORE", "pipeline.mlflow_tracking_uri")
        if self.pipeline.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(self.pipeline.image_pull_secrets))
        return task

    def task(self, task, stage: str, retries: int | None = None):
        """Resources, pod settings, accelerator, retries, tracking and S3 credentials of a
        stage's task. The KFP run id reaches the pod from its `pipeline/runid` label
        (tracking finds the parent run by it and records it): as an input it would be part
        of the cache key of every task."""
        p = self.pipeline
        res = p.resources_of(stage)
        task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory)
        if res.gpu > 0:
            task.set_accelerator_type(p.gpu_accelerator).set_accelerator_limit(res.gpu)
        for label, value in res.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for t in res.tolerations:
            kubernetes.add_toleration(
                task, key=t.key or None, operator=t.operator, value=t.value or None, effect=t.effect or None
            )
        if res.shm:  # a memory-backed /dev/shm (NCCL, DataLoader and encoding workers); the default is 64 MB
            kubernetes.empty_dir_mount(
                task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=res.shm
            )
        retries = p.retries if retries is None else retries
        if retries:
            task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2)
        task.set_display_name(stage)
        self.tracking(task, stage)
        if not self.run_local:  # kfp.local: run-local exports the parent run's id instead
            runid = "metadata.labels['pipeline/runid']"
            kubernetes.use_field_path_as_env(task, env_name="KFP_RUN_ID", field_path=runid)
        if p.s3_endpoint:
            task.set_env_variable("AWS_ENDPOINT_URL", p.s3_endpoint)
        if stage in RESUMABLE and p.checkpoint_store():  # a retry resumes from the store (train/store.py)
            task.set_env_variable("AUTOMOE_RUN_STORE", p.checkpoint_store())
        if p.mlflow_secret:  # the pipeline's MLflow user (the chart's auth): never a param or in the spec
            kubernetes.use_secret_as_env(
                task,
                secret_name=p.mlflow_secret,
                secret_key_to_env={k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
            )
        if p.s3_secret:
            kubernetes.use_secret_as_env(
                task,
                secret_name=p.s3_secret,
                secret_key_to_env={
                    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                },
            )
        return task

    def trainjob(self, stage: str) -> dict[str, Any]:
        """What the TrainJob of `stage` is made of (automoe/trainjob.py JobSpec), fixed at compile time."""
        p, res = self.pipeline, self.pipeline.resources_of(stage)
        if not p.checkpoint_store():
            raise ConfigError(
                f"pipeline.resources.{stage}.nodes={res.nodes}: the nodes share no folder; set pipeline.pipeline_root "
                "(or pipeline.run_store) to an s3:// prefix"
            )
        secrets = {}
        if p.s3_secret:
            secrets |= {k: [p.s3_secret, k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        if p.mlflow_secret:
            secrets |= {k: [p.mlflow_secret, k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        return {
            "image": p.image_for(stage),
            "nodes": res.nodes,
            "procs_per_node": max(res.gpu, 1),
            "cpu": res.cpu,
            "memory": res.memory,
            "gpus": res.gpu,
            "accelerator": p.gpu_accelerator,
            "runtime": p.trainer_runtime,
            "secret_env": secrets,
        }

    def launcher(self, task, stage: str):
        """The task that launches and follows a TrainJob: the stage's env, retries and secrets,
        a small CPU pod on the CPU image (the nodes get the stage's resources)."""
        self.task(task, f"{stage}_launcher")
        task.set_cpu_request("1").set_cpu_limit("1").set_memory_request("1G").set_memory_limit("1G")
        task.set_env_variable("AUTOMOE_RUN_STORE", self.pipeline.checkpoint_store())
        task.set_display_name(f"{stage} ({self.pipeline.resources_of(stage).nodes} nodes, TrainJob)")
        return task

    def measure_latency(self, prepared, supernet, common):
        """One pod, or `num_shards` pods in parallel on the target hardware, merged into one table."""
        if self.measure.num_shards == 1:
            task = c.measure_latency(prepared=prepared, supernet=supernet, shard=0, **common)
            return self.on_target(task).outputs["latency"]
        with dsl.ParallelFor(items=list(range(self.measure.num_shards))) as shard:
            part = self.on_target(c.measure_latency(prepared=prepared, supernet=supernet, shard=shard, **common))
        merged = c.merge_latency(shards=dsl.Collected(part.outputs["latency"]))
        return self.task(merged, "measure_latency").outputs["latency"]

    def on_target(self, task):
        """Latency is measured on the target hardware: node selector and accelerator from
        params; a GPU target runs the CUDA image."""
        for label, value in self.measure.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        self.task(task, "measure_latency")
        if self.measure.accelerator:
            task.set_accelerator_type(self.measure.accelerator).set_accelerator_limit(1)
            task.set_container_image(self.pipeline.image_for("measure_latency", cuda=True))
        return task


def build(params: dict[str, Any], run_local: bool = False):
    """The pipeline function for `params` (params.yaml as a mapping, compile-time --sets
    applied): its structure, images and the run fields' defaults all come from them."""
    validate(params)
    b = Build(
        load_section(PipelineConfig, "pipeline", params),
        load_section(MeasureLatencyConfig, "measure_latency", params),
        run_local,
    )
    for stage, res in b.pipeline.resources.items():
        if res.nodes > 1 and stage != "train_supernet":
            raise ConfigError(f"pipeline.resources.{stage}.nodes: only train_supernet runs on several nodes")
    # One line of JSON: a KFP dict parameter (protobuf Struct) turns ints into floats, and a
    # multi-line default breaks the comment header of the compiled YAML.
    params_json = json.dumps(params, separators=(",", ":"), sort_keys=True)
    d = field_defaults(params)

    def automoe_pipeline(
        corpus_source: str = d["corpus_source"],
        src_lang: str = d["src_lang"],
        tgt_lang: str = d["tgt_lang"],
        budget_kind: str = d["budget_kind"],
        budget_value: float = d["budget_value"],
        target_device: str = d["target_device"],
        search_iterations: int = d["search_iterations"],
        search_population: int = d["search_population"],
        supernet_updates: int = d["supernet_updates"],
        retrain_updates: int = d["retrain_updates"],
        params: str = params_json,
        overrides: list = [],  # noqa: B006 - KFP needs a literal default
    ):
        # The exit task closes the parent run (FINISHED or FAILED); it finds it by the KFP run id.
        close = b.tracking(c.close_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False))
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
            b.tracking(resolved)
            parent = b.tracking(c.open_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False))

            def own(stage: str) -> dict:
                """A stage task's inputs: its own params section only (the inputs are the cache key)."""
                return {"params": resolved.outputs[stage], "overrides": []}

            prepared = b.task(c.prepare_data(**own("prepare_data")).after(parent), "prepare_data").outputs["prepared"]
            if b.pipeline.resources_of("train_supernet").nodes > 1:  # a TrainJob, followed by a small task
                launcher = c.train_supernet_nodes(
                    prepared=prepared, job=b.trainjob("train_supernet"), **own("train_supernet")
                )
                supernet = b.launcher(launcher, "train_supernet").outputs["supernet"]
            else:
                supernet = b.task(
                    c.train_supernet(
                        prepared=prepared, nproc=b.pipeline.resources_of("train_supernet").gpu, **own("train_supernet")
                    ),
                    "train_supernet",
                ).outputs["supernet"]
            latency = b.measure_latency(prepared, supernet, own("measure_latency"))
            predictor = b.task(c.train_predictor(latency=latency, **own("train_predictor")), "train_predictor").outputs[
                "predictor"
            ]
            found = b.task(
                c.search(prepared=prepared, supernet=supernet, predictor=predictor, **own("search")), "search"
            )
            nproc = b.pipeline.resources_of("retrain").gpu
            searched = b.task(
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
            dense = b.task(
                c.retrain(
                    prepared=prepared, arch_name="largest_dense", supernet=supernet, nproc=nproc, **own("retrain")
                ),
                "retrain",
            )
            dense.set_display_name("retrain (dense baseline)")
            evaluation = b.task(
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
            b.task(registered, "register", retries=0).set_caching_options(False)  # the registry changes between runs

    fields = "\n".join(f"    {name}: {text}" for name, text in FIELD_HELP.items())
    automoe_pipeline.__doc__ = (
        "AutoMoE: search, train, evaluate and register a translation MoE.\n\n"
        "Args:\n"
        f"{fields}\n"
        "    params: params.yaml as one line of JSON; the fields above win over it, overrides over both\n"
        "    overrides: section.key=value strings applied last (compile-time keys refused)\n"
    )
    return dsl.pipeline(
        name=b.pipeline.name,
        description="AutoMoE: search, train, evaluate and register a translation MoE",
        pipeline_root=b.pipeline.pipeline_root or None,
    )(automoe_pipeline)


def params_with(overrides: list[str]) -> dict[str, Any]:
    """params.yaml with `overrides` applied (validated by `build`)."""
    return merge(read_yaml(PARAMS_FILE) or {}, parse_overrides(overrides))


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
    up.add_argument("--name", default="", help="pipeline name (default: pipeline.name in params)")
    up.add_argument("--version", default="", help="pipeline version name (default: pipeline.image_tag)")
    up.add_argument("--output", default="pipeline.yaml")
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    if args.command in ("compile", "upload"):  # every --set goes into the compiled params
        params = params_with(args.overrides)
        compiler.Compiler().compile(build(params), args.output)
        print(f"wrote {args.output}")
        if args.command == "upload":
            cfg = load_section(PipelineConfig, "pipeline", params)
            return upload(args.host, args.name or cfg.name, args.version or cfg.image_tag, args.output)
        return 0
    from kfp import local as kfp_local

    from automoe import tracking

    # run-local: the compile-time --sets shape the pipeline; the others are the run's overrides
    fixed = set(compile_time_keys(args.overrides))
    structure = [o for o in args.overrides if o.partition("=")[0].strip() in fixed]
    run_overrides = [o for o in args.overrides if o not in structure]
    params = params_with(structure)
    pipeline_fn = build(params, run_local=args.runner == "subprocess")
    cfg = load_section(PipelineConfig, "pipeline", params)
    root = Path(args.pipeline_root).absolute()
    env = _docker_env(cfg) if args.runner == "docker" else {}  # refuses a setup the containers cannot track from
    if tracking.enabled():  # this execution's parent run: the tasks inherit its id (not an input)
        tracking.check_store()
        os.environ["AUTOMOE_PARENT_RUN_ID"] = env["AUTOMOE_PARENT_RUN_ID"] = tracking.start_parent()
    if args.runner == "docker":
        runner = _docker_runner(env, args.network, args.mount, root)
    else:
        runner = kfp_local.SubprocessRunner(use_venv=False)
    kfp_local.init(
        runner=runner,
        pipeline_root=str(root),
        enable_caching=not args.no_cache,  # as on a cluster: a task whose inputs are unchanged is reused
    )
    pipeline_fn(params=json.dumps(params, separators=(",", ":"), sort_keys=True), overrides=run_overrides)
    return 0


def _docker_env(cfg: PipelineConfig) -> dict[str, str]:
    """What the task containers get from this process's environment (S3 credentials, tracking
    switches). The tracking store is the compiled `pipeline.mlflow_tracking_uri`, else this
    process's MLFLOW_TRACKING_URI when it is a server; anything else is refused."""
    from automoe import tracking

    env = {k: os.environ[k] for k in DOCKER_ENV if os.environ.get(k)}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not cfg.mlflow_tracking_uri and uri.startswith(("http://", "https://")):
        env["MLFLOW_TRACKING_URI"] = uri
    elif not cfg.mlflow_tracking_uri and tracking.enabled():
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
