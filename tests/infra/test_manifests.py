"""The cluster YAML and the KubeRay manifests parse and carry what a cpews sweep needs (Ray's own schema
validation for the cluster-launcher config, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_cluster_launcher_yaml_passes_rays_validation_and_has_a_cpu_head_and_gpu_workers() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster-aws-gpu.yaml").read_text())
    # what `ray up` does first: fill in defaults, then Ray's JSON schema of cluster configs
    validate_config(prepare_config(config))
    broken = {**config, "available_node_types": {"head": {"node_config": {}}}}
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        validate_config(prepare_config(broken))  # the check is not a no-op
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu)  # autoscaling
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu)  # GPU instances
    assert "." in config["file_mounts"].values()  # the project is copied to every node
    assert any('pip install -e ".[server]"' in c for c in config["setup_commands"])
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def _gpu_limits(group: dict) -> list[str]:
    return [c["resources"]["limits"].get("nvidia.com/gpu") for c in group["template"]["spec"]["containers"]]


def test_kuberay_raycluster_has_a_cpu_head_autoscaling_gpu_workers_and_shared_storage() -> None:
    manifest = yaml.safe_load((INFRA / "ray" / "k8s" / "raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _gpu_limits(spec["headGroupSpec"]) == [None]
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] < workers["maxReplicas"] and _gpu_limits(workers) == ["1"]
    for group in (spec["headGroupSpec"], workers):
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/shared"} in mounts


def test_kuberay_rayjob_runs_a_sweep_into_the_shared_folder() -> None:
    manifest = yaml.safe_load((INFRA / "ray" / "k8s" / "rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("cpews sweep run ") and "--run-dir /shared/runs" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert _gpu_limits(cluster["workerGroupSpecs"][0]) == ["1"]
    sweep_file = spec["entrypoint"].split()[3].replace("/home/ray/cpews-sweep/", "")
    assert (INFRA.parent / sweep_file).is_file()


def test_mlflow_templates_hold_no_secrets_and_name_every_setting() -> None:
    env = (INFRA / "mlflow" / "mlflow.env.example").read_text()
    for key in ("MLFLOW_BACKEND_STORE_URI=postgresql://", "MLFLOW_ARTIFACTS_DESTINATION=s3://",
                "MLFLOW_AUTH_CONFIG_PATH=", "MLFLOW_FLASK_SERVER_SECRET_KEY="):
        assert key in env
    secrets = [line for line in env.splitlines() if any(w in line for w in ("SECRET", "PASSWORD", "KEY_ID"))
               and not line.startswith("#")]
    assert secrets and all(line.endswith("CHANGE_ME") for line in secrets)
    script = (INFRA / "mlflow" / "run_server.sh").read_text()
    assert "--app-name basic-auth" in script and "--serve-artifacts" in script
