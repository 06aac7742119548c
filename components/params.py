from kfp import dsl

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_params(params: str, overrides: list, ui: dict) -> str:
    """The run's params: params.yaml JSON + the UI fields + overrides, validated for every stage."""
    from automoe.stages.pipeline_params import resolve

    return resolve(params, overrides, ui)
