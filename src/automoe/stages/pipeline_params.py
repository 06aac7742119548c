"""The parameters of one pipeline run: params.yaml, then the fields a person sets in the
Kubeflow UI, then `section.key=value` overrides; every stage section is validated before
any stage starts, so a typo fails the run in seconds, not after training."""

from __future__ import annotations

import importlib
import json
from typing import Any

from automoe.config import merge, parse_overrides, parse_yaml

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
INTEGER_FIELDS = {"search_iterations", "search_population", "supernet_updates", "retrain_updates"}


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
        out.append(f"{UI_FIELDS[field]}={value}")
    return out


def resolve(params: str, overrides: list, ui: dict[str, Any]) -> str:
    from automoe.cli import COMMANDS

    data = parse_yaml(params, "params") or {}
    data = merge(data, parse_overrides(ui_overrides(ui) + [str(o) for o in overrides]))
    for name in data:
        target = COMMANDS.get(name, "")
        if target and ":" not in target:
            importlib.import_module(target).load_config(data)
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
