"""The cluster manifests a user deploys are valid: the launcher config against Ray's own schema,
the KubeRay RayJob with the fields its CRD requires."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_ray_cluster_yaml_validates_against_rays_autoscaler_schema():
    config = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_kuberay_rayjob_has_the_fields_the_crd_requires():
    job = yaml.safe_load((CLUSTER / "ray" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "segpipe train" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"][0]["image"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
