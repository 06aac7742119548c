"""The automoe KFP v2 pipeline: wiring only (tasks, caching, resources), no logic.

python pipeline.py compile [--output pipeline.yaml]
python pipeline.py run-local [--set section.key=value ...]   # kfp.local, this machine
"""

import argparse
import json
import sys
from pathlib import Path

from kfp import compiler, dsl

import components as c
from automoe.config import PipelineConfig, load_section, read_yaml
from automoe.stages.measure_latency import MeasureLatencyConfig

ROOT = Path(__file__).resolve().parent
# The params travel as one line of JSON: a KFP dict parameter (protobuf Struct) turns ints into
# floats, and a multi-line default breaks the comment header of the compiled YAML.
PARAMS = json.dumps(read_yaml(ROOT / "params.yaml"), separators=(",", ":"), sort_keys=True)
PIPELINE = load_section(PipelineConfig, "pipeline", ROOT / "params.yaml")
MEASURE = load_section(MeasureLatencyConfig, "measure_latency", ROOT / "params.yaml")


def _measure_latency(prepared, supernet, common):
    """One pod, or `num_shards` pods in parallel on the target hardware, merged into one table."""
    if MEASURE.num_shards == 1:
        return _on_target(c.measure_latency(prepared=prepared, supernet=supernet, shard=0, **common)).outputs["latency"]
    with dsl.ParallelFor(items=list(range(MEASURE.num_shards))) as shard:
        part = _on_target(c.measure_latency(prepared=prepared, supernet=supernet, shard=shard, **common))
    return c.merge_latency(shards=dsl.Collected(part.outputs["latency"])).outputs["latency"]


def _on_target(task):
    """Latency is measured on the target hardware: node selector and accelerator from params."""
    from kfp import kubernetes

    for label, value in MEASURE.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    if MEASURE.accelerator:
        task.set_accelerator_type(MEASURE.accelerator).set_accelerator_limit(1)
    return task.set_cpu_limit(str(MEASURE.threads)).set_caching_options(True)


@dsl.pipeline(name=PIPELINE.name, description="AutoMoE: search, train, evaluate and register a translation MoE")
def automoe_pipeline(params: str = PARAMS, overrides: list = []):  # noqa: B006 - KFP needs a literal default
    # The exit task closes the parent run (FINISHED or FAILED); it finds it by the KFP run id.
    close = c.close_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False)
    with dsl.ExitHandler(close):
        parent = c.open_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False)
        common = {"params": params, "overrides": overrides, "parent_run_id": parent.output}
        prepared = c.prepare_data(**common).set_cpu_limit("2").set_memory_limit("8G").outputs["prepared"]
        supernet = c.train_supernet(prepared=prepared, **common).set_cpu_limit("4").set_memory_limit("16G")
        latency = _measure_latency(prepared, supernet.outputs["supernet"], common)
        predictor = c.train_predictor(latency=latency, **common)
        found = (
            c.search(
                prepared=prepared,
                supernet=supernet.outputs["supernet"],
                predictor=predictor.outputs["predictor"],
                **common,
            )
            .set_cpu_limit("4")
            .set_memory_limit("16G")
        )
        searched = c.retrain(prepared=prepared, arch_name="", search_result=found.outputs["result"], **common)
        searched.set_display_name("retrain (searched)").set_cpu_limit("4").set_memory_limit("16G")
        dense = c.retrain(prepared=prepared, arch_name="largest_dense", **common)
        dense.set_display_name("retrain (dense baseline)").set_cpu_limit("4").set_memory_limit("16G")
        evaluation = (
            c.evaluate(prepared=prepared, model=searched.outputs["model"], baseline=dense.outputs["model"], **common)
            .set_cpu_limit("2")
            .set_memory_limit("8G")
        )
        c.register(
            prepared=prepared,
            model=searched.outputs["model"],
            evaluation=evaluation.outputs["evaluation"],
            search_result=found.outputs["result"],
            **common,
        ).set_caching_options(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.py")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write the pipeline spec YAML")
    comp.add_argument("--output", default="pipeline.yaml")
    local = sub.add_parser("run-local", help="run every stage here with kfp.local (SubprocessRunner)")
    local.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    local.add_argument("--pipeline-root", default=".kfp_local")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compiler.Compiler().compile(automoe_pipeline, args.output)
        print(f"wrote {args.output}")
        return 0
    from kfp import local as kfp_local

    kfp_local.init(
        runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(args.pipeline_root).absolute())
    )
    automoe_pipeline(params=PARAMS, overrides=list(args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
