"""prepare_data reading s3:// sources from a real SeaweedFS server on 127.0.0.1."""

import pytest
from servers import seaweedfs

from automoe.data.dataset import PreparedData
from automoe.stages import prepare_data


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), buckets=("corpus",)) as server:
        yield server


@pytest.fixture
def s3_corpus(s3, small_corpus):
    client = s3.client()
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            client.upload_file(f"{small_corpus}/{split}.{lang}", "corpus", f"m30k/{split}.{lang}")
    return "s3://corpus/m30k"


def s3_args(prefix: str, out) -> list[str]:
    sets = ["prepare_data.source=paths", "prepare_data.vocab_size=400"] + [
        f"prepare_data.paths.{split}={prefix}/{split}.{{lang}}" for split in ("train", "valid", "test")
    ]
    return ["--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_prepare_from_s3_equals_local(s3, s3_corpus, small_corpus, tmp_path, monkeypatch, capsys):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    assert prepare_data.main(s3_args(s3_corpus, tmp_path / "from_s3")) == 0, capsys.readouterr().err
    assert prepare_data.main(s3_args(small_corpus, tmp_path / "local")) == 0
    remote, local = PreparedData.open(tmp_path / "from_s3"), PreparedData.open(tmp_path / "local")
    assert remote.manifest["data_sha256"] == local.manifest["data_sha256"]
    assert "s3://corpus/m30k/train.en" in remote.manifest["files"]
    assert s3.secret_key not in (tmp_path / "from_s3" / "manifest.json").read_text()


@pytest.mark.parametrize(
    "env_change, prefix, needle",
    [
        ({}, "s3://corpus/missing", "s3://corpus/missing/train.en: object not found"),
        ({}, "s3://no-such-bucket/m30k", "bucket 'no-such-bucket' does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "s3://corpus/m30k", "access denied"),
        ({"AWS_ACCESS_KEY_ID": "unknown-key"}, "s3://corpus/m30k", "access denied"),
    ],
)
def test_s3_errors(s3, s3_corpus, tmp_path, monkeypatch, capsys, env_change, prefix, needle):
    for key, value in s3.env(**env_change).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert prepare_data.main(s3_args(prefix, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert "wrong-secret" not in err and s3.secret_key not in err
    assert not out.exists()
