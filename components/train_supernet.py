from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_supernet(
    params: str,
    overrides: list,
    parent_run_id: str,
    prepared: Input[Dataset],
    supernet: Output[Model],
    metrics: Output[Metrics],
):
    from automoe.stages import train_supernet

    train_supernet.component_main(params, overrides, parent_run_id, prepared.path, supernet.path, metrics)
