"""Open and close the MLflow parent run of one pipeline execution."""

from kfp import dsl

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_tracking(kfp_run_id: str) -> str:
    from automoe import tracking

    return tracking.open_kfp_parent(kfp_run_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def close_tracking(kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    from automoe import tracking

    tracking.end_kfp_parent(kfp_run_id, succeeded=status.state == "SUCCEEDED")
