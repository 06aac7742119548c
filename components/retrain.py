from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def retrain(
    params: str,
    overrides: list,
    parent_run_id: str,
    prepared: Input[Dataset],
    arch: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """`arch`: an arch YAML path or a named arch of the space (largest_dense for the baseline)."""
    from automoe.stages import retrain

    retrain.component_main(params, overrides, parent_run_id, prepared.path, arch, "", model.path, metrics)
