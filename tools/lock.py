"""Write requirements.lock (the runtime closure of pyproject's dependencies),
requirements-dev.lock (the dev extra's additions) and docker/build.lock (what the image
needs only while it compiles the decoder), every pin with its files' sha256 hashes.

    .venv/bin/python tools/lock.py      (or: make lock; LOCK_INDEX_URL=<simple index> for a mirror)

The versions are those installed in .venv; the hashes are the index's own (its PEP 691 JSON
API), for every file of that version that Python 3.11 on any platform can install (the
sdist and the cp311/abi3/py3 wheels), so the locks hold on Linux, macOS and the image alike.
pip installs them in hash-checking mode: a file whose hash is not in the lock is refused.

torch is pinned as 2.13.0 without a hash: its build (CPU, CUDA, a private mirror) is the
user's choice of index, installed first by the Makefile and docker/; in hash-checking mode
pip then finds it installed and keeps it.
"""

import json
import os
import tomllib
import urllib.request
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.utils import (
    canonicalize_name as cn,
)
from packaging.version import Version

INDEX = os.environ.get("LOCK_INDEX_URL", "https://pypi.org/simple").rstrip("/")
BUILD = {"ninja": "1.13.0"}  # docker/: the decoder's build tool, uninstalled in the same layer

proj = tomllib.load(open("pyproject.toml", "rb"))["project"]


def closure(reqs: list[str]) -> dict[str, str]:
    """Installed name -> version of everything `reqs` needs here (extras and markers followed)."""
    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in reqs]
    while todo:
        r = todo.pop()
        if r.marker and not r.marker.evaluate({"extra": ""}):
            continue
        key, extras = cn(r.name), set(r.extras)
        d = distribution(r.name)  # a requirement that is not installed is an error: install it first
        prev = seen.get(key)
        if prev is not None and extras <= prev:
            continue
        seen[key] = (prev or set()) | extras
        for dep in d.requires or []:
            q = Requirement(dep)
            if q.marker:
                ok = q.marker.evaluate({"extra": ""}) or any(q.marker.evaluate({"extra": e}) for e in seen[key])
                if not ok:
                    continue
                q.marker = None
            todo.append(q)
    return {k: distribution(k).version for k in seen}


def installable(filename: str, name: str, version: str) -> bool:
    """Is this file `name==version`, and can Python 3.11 (any OS, any CPU) install it?"""
    try:
        n, v, _, tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        try:
            n, v = parse_sdist_filename(filename)
        except InvalidSdistFilename:
            return False
        tags = None
    if n != cn(name) or v != Version(version):
        return False
    return tags is None or any(_py311(t.interpreter, t.abi) for t in tags)


def _py311(interpreter: str, abi: str) -> bool:
    """Does CPython 3.11 accept this wheel tag (e.g. cp311-cp311, py3-none, cp38-abi3)?"""
    if abi == "abi3":  # the stable ABI of CPython 3.x, x <= 11
        return interpreter.startswith("cp3") and interpreter[3:].isdigit() and int(interpreter[3:]) <= 11
    return (interpreter, abi) in {("cp311", "cp311"), ("cp311", "none"), ("py3", "none"), ("py311", "none")}


def hashes(name: str, version: str) -> list[str]:
    req = urllib.request.Request(f"{INDEX}/{cn(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    found = sorted(
        {f["hashes"]["sha256"] for f in files if "sha256" in f["hashes"] and installable(f["filename"], name, version)}
    )
    if not found:
        raise SystemExit(f"lock: {name}=={version}: no file for Python 3.11 with a sha256 on {INDEX}")
    return found


def write(path: str, header: str, pins: dict[str, str]) -> None:
    lines = [header]
    for k, v in sorted(pins.items()):
        if k == "torch":
            lines.append("torch==2.13.0  # no hash: installed first from the chosen index (see header)")
            continue
        hs = hashes(k, v)
        lines.append(f"{k}=={v} \\")
        lines += [f"    --hash=sha256:{h}" + (" \\" if i < len(hs) - 1 else "") for i, h in enumerate(hs)]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


runtime = closure(proj["dependencies"])
dev = closure(proj["optional-dependencies"]["dev"])
devonly = {k: v for k, v in dev.items() if k not in runtime}
write("requirements.lock", "# runtime pins with hashes (make install; docker/); regenerate with: make lock", runtime)
write("requirements-dev.lock", "# test and lint tools on top of requirements.lock, with hashes; make lock", devonly)
write("docker/build.lock", "# the image's decoder build tool (docker/), with hashes; make lock", BUILD)
print(f"locked {len(runtime)} runtime, {len(devonly)} dev, {len(BUILD)} build packages with their hashes from {INDEX}")
