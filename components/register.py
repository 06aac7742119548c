from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Dataset],
    search_result: Input[Artifact],
    registration: Output[Artifact],
    metrics: Output[Metrics],
):
    from automoe.stages import register

    register.component_main(
        params,
        overrides,
        prepared.path,
        model.path,
        evaluation.path,
        search_result.path,
        registration.path,
        metrics,
    )
