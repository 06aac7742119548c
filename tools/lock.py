"""Write requirements.lock (the runtime closure of pyproject's dependencies) and
requirements-dev.lock (the dev extra's additions) from the packages installed in .venv.

    .venv/bin/python tools/lock.py      (or: make lock)

torch is pinned as 2.13.0 so that the CPU build (2.13.0+cpu) and the CUDA build both
satisfy it; the Makefile and docker/ install the right build first.
"""

import tomllib
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn

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


runtime = closure(proj["dependencies"])
dev = closure(proj["optional-dependencies"]["dev"])


def line(k, v):
    return f"{k}=={'2.13.0' if k == 'torch' else v}"


open("requirements.lock", "w").write(
    "# runtime pins (make install; docker/); regenerate with: make lock\n"
    + "\n".join(line(k, v) for k, v in sorted(runtime.items()))
    + "\n"
)
devonly = {k: v for k, v in dev.items() if k not in runtime}
open("requirements-dev.lock", "w").write(
    "# test and lint tools on top of requirements.lock\n"
    + "\n".join(line(k, v) for k, v in sorted(devonly.items()))
    + "\n"
)
print(len(runtime), len(devonly))
