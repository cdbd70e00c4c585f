"""cluster/kubernetes: the shipped RayCluster and RayJob pass the vendored KubeRay v1.7.0 CRDs
(strict), pin the installed Ray, keep secrets out, and their entrypoints parse; broken copies
fail with one line naming the file and the key."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_validate import V, broken
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "cluster" / "kubernetes"
RAYCLUSTER, RAYJOB, DOCKERFILE = K8S / "raycluster.yaml", K8S / "rayjob.yaml", K8S / "Dockerfile"
RAY = importlib.metadata.version("ray")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_shipped_manifests_pass_strict() -> None:
    assert V.manifests() == [RAYCLUSTER, RAYJOB]
    for path in (RAYCLUSTER, RAYJOB):
        assert V.kind_of(path) == "manifest"
        assert V.validate_manifest(path, strict=True) == []
        assert V.version_problems(path) == []
        assert V.command_problems(path) == []
    assert V.version_problems(DOCKERFILE) == []
    assert V.command_problems(K8S / "README.md") == []


def test_crds_are_vendored_unchanged() -> None:
    crds = K8S / "crds"
    assert sorted(p.name for p in crds.glob("*.yaml")) == sorted(V.CRD_FILES.values())
    for kind, name in V.CRD_FILES.items():
        (crd,) = yaml.load_all((crds / name).read_text(), Loader=V._LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1", "v1alpha1"]
    shared = REPO.parent / "shared" / "schemas" / "kuberay"
    if not shared.is_dir():
        pytest.skip("no shared/ beside the checkout to compare the CRDs with")
    for name in V.CRD_FILES.values():
        ours, theirs = (crds / name).read_bytes(), (shared / name).read_bytes()
        assert hashlib.sha256(ours).digest() == hashlib.sha256(theirs).digest(), name


def _cluster_spec_checks(spec: dict[str, Any], max_replicas: int) -> None:
    assert spec["rayVersion"] == RAY
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, max_replicas)
    pods = [spec["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        env = {e["name"]: e for e in container["env"]}
        assert env["SPD_RAY_OUT"]["value"] == "s3://YOUR-BUCKET/spd_ray_runs"
        assert container["envFrom"] == [
            {"secretRef": {"name": "spd-ray-secrets", "optional": True}}
        ]
        assert container["image"] == "YOUR-REGISTRY/spd-ray:YOUR-TAG"
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_raycluster_shape() -> None:
    cluster = load(RAYCLUSTER)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _cluster_spec_checks(cluster["spec"], max_replicas=8)


def test_rayjob_shape_and_entrypoint() -> None:
    job = load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 6 * 3600
    assert "runtimeEnvYAML" not in spec
    _cluster_spec_checks(spec["rayClusterSpec"], max_replicas=2)
    argv = shlex.split(spec["entrypoint"])
    expected = "spd-ray run ss_gpt2 --workers 2 --gpu --name ss_gpt2-k8s --wait-timeout 1800"
    assert argv == shlex.split(expected)
    assert V.Command(23, argv) in V.entrypoints(RAYJOB)
    assert RAYJOB.read_text().splitlines()[22].startswith("  entrypoint: spd-ray run")
    assert V.check_command(argv) is None


def test_dockerfile_pins_the_installed_ray_and_torch() -> None:
    text = DOCKERFILE.read_text()
    assert f"FROM rayproject/ray:{RAY}-py311-gpu" in text
    assert f'"ray[default,train,tune,data]=={RAY}"' in text
    assert "torch==2.13.0" in text


@pytest.mark.parametrize(
    ("old", "new", "count", "problems"),
    [
        ("    - groupName: gpu\n      replicas: 0", "    - replicas: 0", 1,
         ["spec.workerGroupSpecs[0].groupName: missing (required)"]),
        ("groupName: gpu", "grupName: gpu", 1,
         ["spec.workerGroupSpecs[0].groupName: missing (required)",
          "spec.workerGroupSpecs[0].grupName: unknown key"]),
        ("maxReplicas: 8", 'maxReplicas: "eight"', 1,
         ["spec.workerGroupSpecs[0].maxReplicas: 'eight' is not of type 'integer'"]),
        ('rayVersion: "2.60.0"', 'rayVersion: "2.59.0"', 1,
         [f"spec.rayVersion: 2.59.0 is not the installed Ray {RAY}"]),
        ("limits: {cpu: 7, memory: 28Gi", "limits: {cpu: 7, memory: lots", 1,
         ["spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory: 'lots' "
          "is not a valid value"]),
        ("  enableInTreeAutoscaling: true", "  enableInTreeAutoscaling: yes please", 1,
         ["spec.enableInTreeAutoscaling: 'yes please' is not of type 'boolean'"]),
        ("emptyDir: {medium: Memory}", "emptyDir: {medium: Memory, sizeLimit: 2Gi}", 2, []),
        ("emptyDir: {medium: Memory}", "emptyDir: {medium: Memory, sizeLimt: 2Gi}", 2,
         ["spec.headGroupSpec.template.spec.volumes[0].emptyDir.sizeLimt: unknown key",
          "spec.workerGroupSpecs[0].template.spec.volumes[0].emptyDir.sizeLimt: unknown key"]),
        ("                - name: AWS_REGION\n                  value: us-west-2",
         "                - name: AWS_SECRET_ACCESS_KEY\n                  value: abc", 1,
         ["spec.workerGroupSpecs[0].template.spec.containers[0].env[1].value: "
          "AWS_SECRET_ACCESS_KEY is a secret: take it from a Secret (valueFrom.secretKeyRef or "
          "envFrom)"]),
    ],
    ids=["no-groupName", "grupName", "maxReplicas-type", "rayVersion", "quantity", "bool",
         "quantity-string-ok", "misspelt-emptyDir-key", "secret-value"],
)  # fmt: skip
def test_broken_raycluster_fails(
    tmp_path: Path, old: str, new: str, count: int, problems: list[str]
) -> None:
    path = broken(tmp_path, RAYCLUSTER, old, new, count)
    assert V.validate_manifest(path) == [f"{path}: {p}" for p in problems]


def test_lenient_allows_unknown_keys(tmp_path: Path) -> None:
    path = broken(tmp_path, RAYCLUSTER, "groupName: gpu", "groupName: gpu\n      grupName: x")
    assert V.validate_manifest(path, strict=False) == []
    assert V.validate_manifest(path, strict=True) == [
        f"{path}: spec.workerGroupSpecs[0].grupName: unknown key"
    ]
    assert V.main(["--lenient", str(path)]) == 0
    assert V.main([str(path)]) == 1


def test_broken_rayjob_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = broken(tmp_path, RAYJOB, "entrypoint: spd-ray run ss_gpt2", "entrypoint: spd-ray run")
    text = path.read_text().replace("--workers 2 --gpu", "--workers two --gpu")
    path.write_text(text.replace('    rayVersion: "2.60.0"', '    rayVersion: "2.6"'))
    assert V.main([str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}: spec.rayClusterSpec.rayVersion: 2.6 is not the installed Ray {RAY}",
        f"{path}: line 8: spd-ray run ss_gpt2 --workers two --gpu --name ss_gpt2-k8s "
        "--wait-timeout 1800: spd-ray run: error: argument --workers: 'two' is not a whole "
        "number",
        f"{path}: line 23: spd-ray run --workers two --gpu --name ss_gpt2-k8s --wait-timeout "
        "1800: spd-ray run: error: argument --workers: 'two' is not a whole number",
    ]


def test_rayjob_runtime_env_secret_is_refused(tmp_path: Path) -> None:
    runtime_env = "  runtimeEnvYAML: |\n    env_vars: {WANDB_API_KEY: abc}\n"
    path = broken(tmp_path, RAYJOB, "  backoffLimit: 0\n", "  backoffLimit: 0\n" + runtime_env)
    assert V.validate_manifest(path) == [
        f"{path}: spec.runtimeEnvYAML: WANDB_API_KEY is a secret: a runtime env is stored and "
        "shown by the cluster; take it from a Secret"
    ]


def test_other_documents_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(
        RAYCLUSTER.read_text() + "\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    )
    assert V.validate_manifest(path) == [
        f"{path} (document 2): apiVersion/kind v1/ConfigMap: expected ray.io/v1 RayCluster or "
        "RayJob"
    ]


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (f"FROM rayproject/ray:{RAY}-py311-gpu", "FROM rayproject/ray:2.59.0-py311-gpu",
         f"rayproject/ray:2.59.0 pins ray 2.59.0, but the installed ray is {RAY}"),
        (f'"ray[default,train,tune,data]=={RAY}"', '"ray[default,train,tune,data]==2.61.0"',
         f"ray[default,train,tune,data]==2.61.0 pins ray 2.61.0, but the installed ray is {RAY}"),
        ("torch==2.13.0", "torch==2.12.0",
         "torch==2.12.0 pins torch 2.12.0, but the Makefile installs torch 2.13.0"),
    ],
)  # fmt: skip
def test_dockerfile_pin_mismatch(tmp_path: Path, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, DOCKERFILE, old, new)
    (n,) = [i for i, line in enumerate(path.read_text().splitlines(), 1) if new in line]
    assert V.validate_file(path) == [f"{path}: line {n}: {problem}"]


def test_strict_schema_transform() -> None:
    """OpenAPI to Draft 7: int-or-string accepts 1 and "1Gi", nullable accepts None, strict
    closes objects that declare properties but not those that preserve unknown fields."""
    schema = {
        "type": "object",
        "properties": {
            "q": {"x-kubernetes-int-or-string": True},
            "n": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }  # fmt: skip
    strict = Draft7Validator(V._prepare_schema(schema, strict=True))
    lenient = Draft7Validator(V._prepare_schema(schema, strict=False))
    good = {"q": 1, "n": None, "free": {"a": 1, "b": 2}, "open": {"k": "v"}}
    assert strict.is_valid(good) and strict.is_valid({**good, "q": "1Gi"})
    assert not strict.is_valid({**good, "q": 1.5})
    assert not strict.is_valid({**good, "extra": 1})
    assert lenient.is_valid({**good, "extra": 1})
    assert "additionalProperties" not in schema  # the CRD itself is left as it is
