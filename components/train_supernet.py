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


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_supernet_nodes(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    job: dict,
    supernet: Output[Model],
    metrics: Output[Metrics],
):
    """The stage on several nodes: a Kubeflow Trainer TrainJob launched and followed from here."""
    from automoe import trainjob

    trainjob.component_main("train_supernet", params, prepared.uri, supernet.path, metrics, **job)
