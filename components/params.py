from typing import NamedTuple

from kfp import dsl

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_params(
    params: str,
    overrides: list,
    corpus_source: str,
    src_lang: str,
    tgt_lang: str,
    budget_kind: str,
    budget_value: float,
    target_device: str,
    search_iterations: int,
    search_population: int,
    supernet_updates: int,
    retrain_updates: int,
) -> NamedTuple(
    "Sections",
    prepare_data=str,
    train_supernet=str,
    measure_latency=str,
    train_predictor=str,
    search=str,
    retrain=str,
    evaluate=str,
    register=str,
):
    """The run's params: params.yaml JSON + the UI fields + overrides, validated for every
    stage, then one output per stage holding only its section (a task's inputs are its cache
    key: a change to one section leaves the other tasks' keys as they were)."""
    from collections import namedtuple

    from automoe.stages.pipeline_params import STAGES, resolve, sections

    ui = {
        "corpus_source": corpus_source,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "budget_kind": budget_kind,
        "budget_value": budget_value,
        "target_device": target_device,
        "search_iterations": search_iterations,
        "search_population": search_population,
        "supernet_updates": supernet_updates,
        "retrain_updates": retrain_updates,
    }
    split = sections(resolve(params, overrides, ui))
    return namedtuple("Sections", STAGES)(*(split[stage] for stage in STAGES))
