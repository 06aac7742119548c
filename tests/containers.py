"""Docker helpers of the container tests: the daemon, the project image, containers that
clean up after themselves. The tests need a Docker daemon (`../shared/tools/docker-up.sh`
here; `.ci/run` starts it); without one they skip, except under CI=true, where they fail."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = "automoe:test"


def docker_ready() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


needs_docker = pytest.mark.skipif(
    not docker_ready() and os.environ.get("CI") != "true",
    reason="no Docker daemon (run ../shared/tools/docker-up.sh)",
)


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed: {proc.stderr[-3000:]}")
    return proc


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def torch_index() -> list[str]:
    """AUTOMOE_TORCH_INDEX_URL when set; pip's configured index when the base image has one
    (the stand-in base image of ../shared/tools/docker-up.sh points pip at a local mirror);
    else the Dockerfile's default, PyTorch's CPU index."""
    if "AUTOMOE_TORCH_INDEX_URL" in os.environ:
        return ["--build-arg", f"TORCH_INDEX_URL={os.environ['AUTOMOE_TORCH_INDEX_URL']}"]
    probe = ["run", "--rm", "--entrypoint", "cat", "python:3.11-slim-bookworm", "/etc/pip.conf"]
    return ["--build-arg", "TORCH_INDEX_URL="] if docker(*probe, timeout=120, check=False).returncode == 0 else []


def build_image() -> str:
    """The CPU image from the working tree (torch from pip's configured index: the build
    argument users set for private mirrors)."""
    assert docker_ready(), "CI=true but no Docker daemon: .ci/run starts one with ../shared/tools/docker-up.sh"
    t0 = time.monotonic()
    cmd = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "-t", TAG]
    cmd += [*torch_index(), "--build-arg", f"GIT_COMMIT={git_commit()}", "."]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    size = json.loads(docker("image", "inspect", TAG).stdout)[0]["Size"]
    print(f"\nimage {TAG}: built in {time.monotonic() - t0:.0f} s, {size / 1e9:.2f} GB")
    return TAG


@contextlib.contextmanager
def network() -> Iterator[str]:
    """A Docker network of its own, removed with everything still attached to it."""
    name = f"automoe-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name
    finally:
        attached = docker("network", "inspect", name, "-f", "{{range .Containers}}{{.Name}} {{end}}", check=False)
        for container in attached.stdout.split():
            docker("rm", "-f", container, check=False)
        docker("network", "rm", name, check=False)


def start(name: str, net: str, image: str, *args: str, aliases=(), env=None, ports=(), opts=()) -> str:
    """A detached container on `net`, reachable there by `name` and `aliases`."""
    cmd = ["run", "-d", "--name", name, "--hostname", name, "--network", net, *opts]
    for alias in aliases:
        cmd += ["--network-alias", alias]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    for port in ports:
        cmd += ["-p", f"127.0.0.1::{port}"]
    docker(*cmd, image, *args)
    return name


def host_port(container: str, port: int) -> int:
    """The loopback port Docker published for a container's `port`."""
    return int(docker("port", container, str(port)).stdout.split(":")[-1].split()[0])


def logs(container: str) -> str:
    proc = docker("logs", container, check=False)
    return (proc.stdout + proc.stderr)[-4000:]
