"""The one place that names the project's container images (from params.yaml `pipeline:`)."""

from pathlib import Path

from automoe.config import PipelineConfig, load_section

PIPELINE = load_section(PipelineConfig, "pipeline", Path(__file__).resolve().parents[1] / "params.yaml")
IMAGE = PIPELINE.image_for("")  # the CPU image


def image_for(stage: str) -> str:
    """The CUDA image for a stage given GPUs in params, else the CPU image."""
    return PIPELINE.image_for(stage)
