from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_predictor(
    params: str,
    overrides: list,
    latency: Input[Dataset],
    predictor: Output[Model],
    metrics: Output[Metrics],
    scatter: Output[HTML],
):
    from automoe.stages import train_predictor

    train_predictor.component_main(params, overrides, latency.path, predictor.path, metrics, scatter.path)
