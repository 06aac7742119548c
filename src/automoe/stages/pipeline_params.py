"""The parameters of one pipeline run: params.yaml, then the fields a person sets in the
Kubeflow UI, then `section.key=value` overrides; every stage section is validated before
any stage starts, so a typo fails the run in seconds, not after training. Each stage's
task then gets its own section only (`sections`): a task's inputs are its cache key, so a
change to `search.budget` leaves the upstream tasks' keys, and their cached outputs, as
they were."""

from __future__ import annotations

import importlib
import json
from typing import Any

from automoe.config import STAGES, merge, parse_overrides, parse_yaml
from automoe.errors import ConfigError

# UI field -> params key
UI_FIELDS = {
    "corpus_source": "prepare_data.source",
    "src_lang": "prepare_data.src_lang",
    "tgt_lang": "prepare_data.tgt_lang",
    "budget_kind": "search.budget.kind",
    "budget_value": "search.budget.value",
    "target_device": "measure_latency.device",
    "search_iterations": "search.iterations",
    "search_population": "search.population",
    "supernet_updates": "train_supernet.train.max_updates",
    "retrain_updates": "retrain.train.max_updates",
}
# keys a UI field sets beside its own: latency is measured where the model is served
ALSO_SETS = {"target_device": ("evaluate.decode.device",)}
INTEGER_FIELDS = {"search_iterations", "search_population", "supernet_updates", "retrain_updates"}
# fixed when the pipeline is compiled (the DAG's shape, pods, images): a run cannot change them
COMPILE_TIME = (
    "pipeline",
    "measure_latency.num_shards",
    "measure_latency.node_selector",
    "measure_latency.accelerator",
)


def ui_overrides(ui: dict[str, Any]) -> list[str]:
    """UI fields left empty (or 0) keep the params.yaml value. KFP hands numbers over as floats."""
    out = []
    for field, value in ui.items():
        if field not in UI_FIELDS:
            raise ValueError(f"unknown pipeline field {field!r}")
        if value in ("", None, 0, 0.0):
            continue
        if field in INTEGER_FIELDS:
            value = int(value)
        out += [f"{key}={value}" for key in (UI_FIELDS[field], *ALSO_SETS.get(field, ()))]
    return out


def compile_time_keys(overrides: list[str]) -> list[str]:
    """The overrides that try to change what the compiled pipeline fixed."""
    keys = [str(o).partition("=")[0].strip() for o in overrides]
    return [k for k in keys if any(k == c or k.startswith(c + ".") for c in COMPILE_TIME)]


def validate(data: dict[str, Any]) -> None:
    """Load every stage section (unknown keys and wrong types fail here, named)."""
    from automoe.cli import COMMANDS
    from automoe.config import PipelineConfig, load_section

    for name in data:
        target = COMMANDS.get(name, "")
        if target and ":" not in target:
            importlib.import_module(target).load_config(data)
    if "pipeline" in data:
        load_section(PipelineConfig, "pipeline", data)
    serving = {
        "measure_latency.precision": (data.get("measure_latency") or {}).get("precision", "fp32"),
        "evaluate.decode.precision": ((data.get("evaluate") or {}).get("decode") or {}).get("precision", "fp32"),
        "register.precision": (data.get("register") or {}).get("precision", "fp32"),
    }
    if len(set(serving.values())) > 1:  # the search would optimise a latency that is not served
        shown = ", ".join(f"{k}={v}" for k, v in serving.items())
        raise ConfigError(f"{shown}: the serving precision must be the same in all three")
    devices = {
        "measure_latency.device": (data.get("measure_latency") or {}).get("device", "cpu"),
        "evaluate.decode.device": ((data.get("evaluate") or {}).get("decode") or {}).get("device", "cpu"),
    }
    if len(set(devices.values())) > 1:  # a CPU latency table cannot rank models served on a GPU
        shown = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ConfigError(f"{shown}: latency is measured where the model is served; set both alike")


def resolve(params: str, overrides: list, ui: dict[str, Any]) -> str:
    fixed = compile_time_keys([str(o) for o in overrides])
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)}: fixed when the pipeline was compiled; change it with "
            "`python pipeline.py compile --set ...` (or upload --set) and run the new version"
        )
    data = parse_yaml(params, "params") or {}
    data = merge(data, parse_overrides(ui_overrides(ui) + [str(o) for o in overrides]))
    validate(data)
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def sections(resolved: str) -> dict[str, str]:
    """One JSON document per stage holding only that stage's section (canonical: sorted keys)."""
    data = parse_yaml(resolved, "params") or {}
    return {stage: json.dumps({stage: data.get(stage, {})}, separators=(",", ":"), sort_keys=True) for stage in STAGES}
