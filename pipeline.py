"""The automoe KFP v2 pipeline: wiring only (tasks, caching, resources), no logic.

python pipeline.py compile [--output pipeline.yaml]
python pipeline.py run-local [--set section.key=value ...]   # kfp.local, this machine
"""

import argparse
import json
import sys
from pathlib import Path

from kfp import compiler, dsl

from automoe.config import PipelineConfig, load_section, read_yaml
from components import close_tracking, open_tracking, prepare_data, retrain, train_supernet

ROOT = Path(__file__).resolve().parent
# The params travel as one line of JSON: a KFP dict parameter (protobuf Struct) turns ints into
# floats, and a multi-line default breaks the comment header of the compiled YAML.
PARAMS = json.dumps(read_yaml(ROOT / "params.yaml"), separators=(",", ":"), sort_keys=True)
PIPELINE = load_section(PipelineConfig, "pipeline", ROOT / "params.yaml")


@dsl.pipeline(name=PIPELINE.name, description="AutoMoE: search, train, evaluate and register a translation MoE")
def automoe_pipeline(params: str = PARAMS, overrides: list = []):  # noqa: B006 - KFP needs a literal default
    # The exit task closes the parent run (FINISHED or FAILED); it finds it by the KFP run id.
    close = close_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False)
    with dsl.ExitHandler(close):
        parent = open_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_caching_options(False)
        common = {"params": params, "overrides": overrides, "parent_run_id": parent.output}
        prepared = prepare_data(**common).set_cpu_limit("2").set_memory_limit("8G")
        supernet = train_supernet(prepared=prepared.outputs["prepared"], **common)
        supernet.set_cpu_limit("4").set_memory_limit("16G")
        dense = retrain(prepared=prepared.outputs["prepared"], arch="largest_dense", **common)
        dense.set_display_name("retrain (dense baseline)").set_cpu_limit("4").set_memory_limit("16G")


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
