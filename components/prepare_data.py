from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(params: str, overrides: list, prepared: Output[Dataset], metrics: Output[Metrics]):
    from automoe.stages import prepare_data

    prepare_data.component_main(params, overrides, prepared.path, metrics)
