from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    params: str,
    overrides: list,
    prepared: Input[Dataset],
    model: Input[Model],
    baseline: Input[Model],
    latency: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    from automoe.stages import evaluate

    evaluate.component_main(
        params,
        overrides,
        prepared.path,
        model.path,
        baseline.path,
        evaluation.path,
        metrics,
        report.path,
        latency.path,
    )
