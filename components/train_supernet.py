from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_supernet(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    nproc: int,
    supernet: Output[Model],
    metrics: Output[Metrics],
):
    """nproc > 1: one torchrun worker per GPU."""
    from automoe.stages import train_supernet

    train_supernet.component_main(params, overrides, prepared.path, supernet.path, metrics, nproc)
