"""The one place that names the project's container images (from params.yaml `pipeline:`)."""

import os
from pathlib import Path

from automoe.config import PipelineConfig, load_section

# `python pipeline.py compile --set ...` compiles from a merged copy of params.yaml
PARAMS_FILE = Path(os.environ.get("AUTOMOE_PIPELINE_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml")
PIPELINE = load_section(PipelineConfig, "pipeline", PARAMS_FILE)
IMAGE = PIPELINE.image_for("")  # the CPU image


def image_for(stage: str) -> str:
    """The CUDA image for a stage given GPUs in params, else the CPU image."""
    return PIPELINE.image_for(stage)
