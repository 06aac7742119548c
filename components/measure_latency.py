from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def measure_latency(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    supernet: Input[Model],
    shard: int,
    latency: Output[Dataset],
    metrics: Output[Metrics],
):
    from automoe.stages import measure_latency

    measure_latency.component_main(params, overrides, prepared.path, supernet.path, shard, latency.path, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_latency(shards: Input[list[Dataset]], latency: Output[Dataset]):
    from automoe.stages import measure_latency

    measure_latency.merge_main([s.path for s in shards], latency.path)
