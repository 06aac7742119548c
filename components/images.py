"""The one place that names the project's container images (read from params.yaml)."""

from pathlib import Path

from automoe.config import PipelineConfig, load_section

_PIPELINE = load_section(PipelineConfig, "pipeline", Path(__file__).resolve().parents[1] / "params.yaml")
IMAGE = f"{_PIPELINE.image}:{_PIPELINE.image_tag}"
GPU_IMAGE = f"{_PIPELINE.image}:{_PIPELINE.image_tag}-cuda"
