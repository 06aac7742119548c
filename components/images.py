"""The image the component definitions name: a placeholder. pipeline.py's `build` gives each
task its real image (params.yaml `pipeline:` image and tag; the CUDA one for a stage with
GPUs or a GPU latency target), so importing the components reads no params and the
compiled spec never holds this name (a test checks it)."""

IMAGE = "automoe-image-set-by-pipeline-build"
