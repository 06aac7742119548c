from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def search(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    supernet: Input[Model],
    predictor: Input[Model],
    result: Output[Artifact],
    metrics: Output[Metrics],
    pareto: Output[HTML],
):
    from automoe.stages import search

    search.component_main(
        params,
        overrides,
        prepared.path,
        supernet.path,
        predictor.path,
        result.path,
        metrics,
        pareto.path,
    )
