from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test writes to the workspace's MLflow store or picks up a parent run file."""
    monkeypatch.setenv("AUTOMOE_TRACKING", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("AUTOMOE_PARENT_RUN_ID", raising=False)
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # the machine's kernel plan (model/kernels.py) per test, never the user's ~/.cache
    monkeypatch.setenv("AUTOMOE_KERNEL_CACHE", str(tmp_path / "kernels-cache.json"))
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield
    # MLflow's process-wide URIs (set by tracking code, e.g. tracking._client()) end with the
    # test, else a later test's MLFLOW_TRACKING_URI would be overridden by this one's store;
    # monkeypatch then restores the variables MLflow's setters also wrote
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def multi30k() -> Path:
    """The shared Multi30k copy; its absence is a failure, never a skip."""
    if not (MULTI30K / "SHA256SUMS").is_file():
        pytest.fail(f"Multi30k is missing: expected ../shared/data/multi30k beside the project ({MULTI30K})")
    return MULTI30K


def read_gz_lines(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [next(fh).rstrip("\n") for _ in range(n)]


@pytest.fixture
def small_corpus(multi30k, tmp_path) -> str:
    """Real Multi30k pairs (300/50/50) as plain local files; returns the {split}.{lang} template root."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, name, n in (("train", "train", 300), ("valid", "val", 50), ("test", "test_2016_flickr", 50)):
        for lang in ("en", "de"):
            lines = read_gz_lines(multi30k / f"{name}.{lang}.gz", n)
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def paths_overrides(folder: str, vocab: int = 400) -> list[str]:
    return [
        "prepare_data.source=paths",
        f"prepare_data.paths.train={folder}/train.{{lang}}",
        f"prepare_data.paths.valid={folder}/valid.{{lang}}",
        f"prepare_data.paths.test={folder}/test.{{lang}}",
        f"prepare_data.vocab_size={vocab}",
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


TINY_SPACE = str(Path(__file__).parent / "data" / "tiny_space.yaml")
TINY_TRAIN = {
    "max_updates": 6,
    "max_tokens": 1024,
    "tokens_per_update": 2048,
    "warmup_updates": 2,
    "valid_interval": 3,
    "valid_max_sentences": 50,
    "log_interval": 3,
}


def tiny_pipeline_params(mirror: Path) -> dict[str, dict]:
    """Every stage of the pipeline at toy size: seconds, not minutes."""
    return {
        "prepare_data": {"max_train_pairs": 300, "vocab_size": 300, "mirror": str(mirror)},
        "train_supernet": {"space": TINY_SPACE, "train": dict(TINY_TRAIN)},
        "measure_latency": {"n_archs": 10, "warmup": 1, "repeats": 2, "sources": 2, "tgt_steps": 5},
        "train_predictor": {"fit": {"epochs": 30}},
        "search": {
            "population": 6,
            "parents": 2,
            "mutations": 2,
            "crossovers": 2,
            "iterations": 2,
            "valid_sentences": 20,
            "budget": {"kind": "gflops", "value": 0.8},
        },
        "retrain": {"space": TINY_SPACE, "train": dict(TINY_TRAIN)},
        "evaluate": {
            "max_sentences": 20,
            "latency_repeats": 2,
            "latency_warmup": 1,
            "latency_rounds": 2,
            "flops_sentences": 3,
        },
        # toy models do not translate: no floor here, so the plumbing of promotion is exercised
        # (tests/test_registry.py tests the floor)
        "register": {"min_bleu": 0.0, "min_chrf": 0.0},
    }


def as_overrides(sections: dict[str, dict], prefix: str = "") -> list[str]:
    out = []
    for key, value in sections.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


@pytest.fixture(scope="session")
def image() -> str:
    """The project's CPU image built from the working tree, once per session (tests/containers.py)."""
    from containers import build_image

    return build_image()
