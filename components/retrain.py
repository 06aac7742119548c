from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def retrain(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    arch_name: str,
    nproc: int,
    model: Output[Model],
    metrics: Output[Metrics],
    search_result: Input[Artifact] = None,
    supernet: Input[Model] = None,
):
    """The searched arch (`search_result`), or a named arch of the space (`arch_name`, e.g. largest_dense);
    `supernet` for retrain.init_from_supernet (both retrain tasks get it: one policy for all)."""
    from automoe.stages import retrain

    arch = search_result.path if search_result is not None else arch_name
    net = supernet.path if supernet is not None else ""
    retrain.component_main(params, overrides, prepared.path, arch, net, model.path, metrics, nproc)
