"""Multi-node training through Kubeflow Trainer (automoe/trainjob.py): the TrainJob's manifest
against the CRD's constraints, its worker script run as two nodes on 127.0.0.1 with a real
SeaweedFS as the only thing they share, and the pipeline that launches it."""

import json
import sys

import jsonschema
import pytest
import yaml
from conftest import ROOT

from automoe.errors import ConfigError
from automoe.trainjob import JobSpec, job_name, manifest

# The TrainJob fields this project sets, with the constraints of the TrainJob CRD
# (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2: trainjob_types.go) on each of them;
# nothing else may appear, so a misspelt or unknown field fails here as the API server would.
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+([KMGTPE]i?|[mkMGTPE])?$"}]}
ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[^=]+$"},
        "value": {"type": "string"},
        "valueFrom": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretKeyRef": {
                    "type": "object",
                    "required": ["key", "name"],
                    "additionalProperties": False,
                    "properties": {"key": {"type": "string"}, "name": {"type": "string"}},
                }
            },
        },
    },
    "not": {"required": ["value", "valueFrom"]},  # one or the other
}
TRAINJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"const": "TrainJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
        },
        "spec": {
            "type": "object",
            "required": ["runtimeRef"],
            "additionalProperties": False,
            "properties": {
                "runtimeRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 253}},
                },
                "trainer": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "string", "maxLength": 500},
                        "command": {"type": "array", "maxItems": 128, "items": {"type": "string", "maxLength": 65536}},
                        "args": {"type": "array", "maxItems": 128, "items": {"type": "string", "maxLength": 65536}},
                        "env": {"type": "array", "maxItems": 128, "items": ENV_VAR},
                        "numNodes": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                        "numProcPerNode": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                        "resourcesPerNode": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "requests": {"type": "object", "additionalProperties": QUANTITY},
                                "limits": {"type": "object", "additionalProperties": QUANTITY},
                            },
                        },
                    },
                },
            },
        },
    },
}


def spec(**extra) -> JobSpec:
    base = {
        "stage": "train_supernet",
        "params": json.dumps({"train_supernet": {"train": {"max_updates": 5}}}),
        "data_uri": "s3://automoe/kfp/prepared",
        "out_uri": "s3://automoe/kfp/runs/run-1/train_supernet/output",
        "image": "ghcr.io/automoe/automoe:0.1.0-cuda",
        "nodes": 4,
        "procs_per_node": 8,
        "gpus": 8,
        "env": {"AUTOMOE_RUN_STORE": "s3://automoe/kfp/runs", "KFP_RUN_ID": "run-1"},
        "secret_env": {"AWS_SECRET_ACCESS_KEY": ("automoe-s3", "AWS_SECRET_ACCESS_KEY")},
    }
    return JobSpec(**(base | extra))


def test_the_trainjob_manifest_meets_the_crd_constraints():
    body = manifest(spec(), job_name("train_supernet", "run-1"))
    jsonschema.validate(body, TRAINJOB_SCHEMA)
    trainer = body["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)  # --nproc_per_node: the node's GPUs
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    secret = next(e for e in trainer["env"] if e["name"] == "AWS_SECRET_ACCESS_KEY")
    assert secret == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "automoe-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    # a retried task names the same TrainJob (it follows it); another run or stage does not
    assert job_name("train_supernet", "run-1") == body["metadata"]["name"]
    assert (
        len({job_name("train_supernet", "run-1"), job_name("train_supernet", "run-2"), job_name("retrain", "run-1")})
        == 3
    )
    long = job_name("x" * 200, "run-1")
    jsonschema.validate(manifest(spec(stage="x" * 200), long), TRAINJOB_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch what the API would refuse
        jsonschema.validate(dict(body, metadata={"name": "Automoe_Job"}), TRAINJOB_SCHEMA)
    with pytest.raises(ConfigError, match="nodes share no folder"):
        spec(data_uri="/mnt/prepared")
    with pytest.raises(ConfigError, match="2 or more nodes"):
        spec(nodes=1)


def test_a_supernet_on_several_nodes_compiles_to_a_trainjob_launcher(tmp_path):
    sys.path.insert(0, str(ROOT))
    from kfp import compiler

    import pipeline

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pipeline"]["resources"]["train_supernet"] |= {"nodes": 3, "gpu": 8}
    with pytest.raises(ConfigError, match="nodes share no folder"):
        pipeline.build(params)
    params["pipeline"] |= {"pipeline_root": "s3://automoe/kfp", "s3_secret": "automoe-s3"}
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline.build(params), str(out))
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-train-supernet" not in executors
    launcher = executors["exec-train-supernet-nodes"]["container"]
    assert "accelerator" not in launcher["resources"] and launcher["image"].endswith(":0.1.0")  # a small CPU pod
    assert {"name": "AUTOMOE_RUN_STORE", "value": "s3://automoe/kfp/runs"} in launcher["env"]
    job = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train-supernet-nodes"]["inputs"]["parameters"][
        "job"
    ]
    job = job["runtimeValue"]["constant"]
    assert (job["nodes"], job["procs_per_node"], job["gpus"]) == (3, 8, 8) and job["image"].endswith("-cuda")
    assert job["secret_env"]["AWS_SECRET_ACCESS_KEY"] == ["automoe-s3", "AWS_SECRET_ACCESS_KEY"]  # a reference
    params["pipeline"]["resources"]["retrain"] |= {"nodes": 2}
    with pytest.raises(ConfigError, match="only train_supernet runs on several nodes"):
        pipeline.build(params)


def test_pod_logs_are_followed_in_windows_without_repeats_and_conditions_read():
    """The launcher reads each pod's last minute of log per poll (not the whole log of a
    days-long run); lines seen in the previous window are not printed again."""
    from types import SimpleNamespace

    from automoe import trainjob

    class Core:  # the two calls of the Kubernetes API the follower makes, answering in windows
        windows = ["a\nb", "a\nb\nc\nd", "c\nd\ne", "x"]

        def list_namespaced_pod(self, namespace, label_selector):
            assert label_selector == "jobset.sigs.k8s.io/jobset-name=job"
            return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name="job-node-0-0"))])

        def read_namespaced_pod_log(self, name, namespace, container, since_seconds):
            return self.windows.pop(0)

    printed, seen, core = [], {}, Core()
    for _ in range(4):
        trainjob._print_new_logs(core, "ns", "job", seen, printed.append)
    assert printed == [f"[job-node-0-0] {x}" for x in "abcdex"]
    done = {
        "status": {
            "conditions": [
                {"type": "Created", "status": "True"},
                {"type": "Failed", "status": "True", "message": "OOMKilled"},
            ]
        }
    }
    assert trainjob.condition(done) == ("Failed", "OOMKilled")
    assert trainjob.condition({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}) is None
