"""cluster/cloud: the shipped `ray up` configs pass Ray's own validator and their commands parse
with spd-ray's CLI; broken copies fail with one line naming the file and the key."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_validate import V, broken

REPO = Path(__file__).resolve().parents[2]
CLOUD = REPO / "cluster" / "cloud"
CONFIGS = {"aws": CLOUD / "aws.yaml", "gcp": CLOUD / "gcp.yaml"}


def line_of(path: Path, fragment: str) -> int:
    (n,) = [i for i, line in enumerate(path.read_text().splitlines(), 1) if fragment in line]
    return n


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_shipped_launcher_configs_pass() -> None:
    assert V.launcher_configs() == [CONFIGS["aws"], CONFIGS["gcp"]]
    for path in CONFIGS.values():
        assert V.kind_of(path) == "launcher"
        assert V.validate_launcher_config(path) == []
        assert V.version_problems(path) == []
        assert V.command_problems(path) == []


def test_everything_shipped_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert V.main([]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("ok: ") and "spd-ray commands" in err


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_config_shape(cloud: str) -> None:
    """What the configs promise: a head with no CPU for tasks, GPU workers from 0, runs in the
    cloud's bucket, credentials from roles, the Ray token from a file."""
    config = load(CONFIGS[cloud])
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu"]["resources"]["GPU"] == 1
    assert (types["gpu"]["min_workers"], types["gpu"]["max_workers"]) == (0, 8)
    assert config["idle_timeout_minutes"] == 10
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    commands = "\n".join(config["setup_commands"])
    scheme = {"aws": "s3", "gcp": "gs"}[cloud]
    assert f"'export SPD_RAY_OUT={scheme}://YOUR-BUCKET/spd_ray_runs'" in commands
    assert "'export RAY_AUTH_MODE=token'" in commands
    assert 'torch==2.13.0 "ray[default,train,tune,data]==2.60.0" -e ~/spd-ray' in commands
    assert "aws_credentials" not in config["provider"]
    assert "gcp_credentials" not in config["provider"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(c.startswith(("source ~/.spd_ray_env", "ulimit")) for c in config[key])
    if cloud == "aws":
        assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "spd-ray-head"}
        assert types["gpu"]["node_config"]["IamInstanceProfile"] == {"Name": "spd-ray-worker"}
    else:
        (account,) = types["gpu"]["node_config"]["serviceAccounts"]
        assert account["email"] == "spd-ray-worker@YOUR-PROJECT-ID.iam.gserviceaccount.com"


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("max_workers: 8\nupscaling", 'max_workers: "eight"\nupscaling',
         "max_workers: 'eight' is not of type 'integer'"),
        ("    min_workers: 0\n", "    min_wrkers: 0\n",
         "available_node_types.gpu.min_wrkers: unknown key"),
        ("\nsetup_commands:", "\nsetup_comands:", "setup_comands: unknown key"),
        ('resources: {"CPU": 4, "GPU": 1}', 'resources: {"CPU": 4, "GPU": 0.5}',
         'available_node_types.gpu.resources.GPU: 0.5 is not of type \'integer\''),
        ("head_node_type: head", "head_node_type: hed",
         "`head_node_type` must be one of `available_node_types`."),
        ("    min_workers: 0\n", "    min_workers: 9\n",
         "The specified global `max_workers` is smaller than the sum of `min_workers` of all "
         "the available node types."),
        ("  cache_stopped_nodes: false",
         "  cache_stopped_nodes: false\n  aws_credentials: {aws_access_key_id: AKIA}",
         "provider.aws_credentials: credentials do not belong in the file; give nodes an "
         "instance profile (AWS) or a service account (GCP)"),
        ("'export RAY_AUTH_MODE=token'", "'export RAY_AUTH_MODE=token' 'export HF_TOKEN=hf_abc'",
         "HF_TOKEN: a secret's value is written in the file; give it to the nodes from their "
         "environment or a secret store"),
    ],
    ids=["type", "node-type-key", "top-level-key", "resource-type", "head-type", "min-max",
         "provider-credentials", "literal-secret"],
)  # fmt: skip
def test_broken_aws_config_fails(tmp_path: Path, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, CONFIGS["aws"], old, new)
    assert V.validate_launcher_config(path) == [f"{path}: {problem}"]
    assert V.main([str(path)]) == 1


def test_broken_gcp_config_fails(tmp_path: Path) -> None:
    path = broken(tmp_path, CONFIGS["gcp"], "    max_workers: 8\n", "    max_wrkers: 8\n")
    problem = "available_node_types.gpu.max_wrkers: unknown key"
    assert V.validate_launcher_config(path) == [f"{path}: {problem}"]


def test_ray_pin_mismatch_is_reported(tmp_path: Path) -> None:
    path = broken(tmp_path, CONFIGS["aws"], '"ray[default,train,tune,data]==2.60.0"',
                  '"ray[default,train,tune,data]==2.59.0"')  # fmt: skip
    n = line_of(path, "==2.59.0")
    assert V.version_problems(path) == [
        f"{path}: line {n}: ray[default,train,tune,data]==2.59.0 pins ray 2.59.0, but the "
        "installed ray is 2.60.0"
    ]
    assert V.validate_launcher_config(path) == []  # Ray's schema cannot see a pin


def test_header_commands_are_extracted_and_parse() -> None:
    n = line_of(CONFIGS["aws"], "RAY_AUTH_MODE=token ray job submit")
    argv = shlex.split("spd-ray run ss_gpt2 --gpu --name ss_gpt2-aws --wait-timeout 1800")
    assert V.entrypoints(CONFIGS["aws"]) == [V.Command(n, argv)]
    assert V.check_command(argv) is None


def test_bad_header_command_is_reported(tmp_path: Path) -> None:
    old, new = "spd-ray run ss_gpt2 --gpu", "spd-ray run --workers two --gpu"
    path = broken(tmp_path, CONFIGS["aws"], old, new)
    n = line_of(path, "RAY_AUTH_MODE=token ray job submit")
    assert V.command_problems(path) == [
        f"{path}: line {n}: spd-ray run --workers two --gpu --name ss_gpt2-aws --wait-timeout "
        "1800: spd-ray run: error: argument --workers: 'two' is not a whole number"
    ]


def test_readme_commands_parse() -> None:
    readme = CLOUD / "README.md"
    argvs = [c.argv for c in V.entrypoints(readme)]
    assert shlex.split("spd-ray pretrain experiments/pretrain/ss_llama_1L.yaml") in argvs
    assert (
        shlex.split(
            "spd-ray run ss_llama_simple_mlp-1L --workers 4 --gpu --name ss_llama-aws "
            "--wait-timeout 1800"
        )
        in argvs
    )
    assert shlex.split("spd-ray harvest gs://YOUR-BUCKET/spd_ray_runs/ss_gpt2-gcp") in argvs
    assert len(argvs) == 8
    assert V.command_problems(readme) == []


def test_readme_command_checks(tmp_path: Path) -> None:
    """Fenced lines only; `spd-ray` where a command starts (not in `cd spd-ray` or a URL), also
    inside `bash -c "..."`; parse errors, unknown targets and indivisible batches reported."""
    readme = tmp_path / "README.md"
    readme.write_text(
        "Prose is not checked: spd-ray run --workers two\n"
        "```bash\n"
        "git clone https://github.com/org/spd-ray && cd spd-ray\n"
        "spd-ray run --workers two\n"
        'ray exec c.yaml "spd-ray list" && bash -c "spd-ray run ss_gtp2"\n'
        "ray job submit --address http://127.0.0.1:8265 -- \\\n"
        "  spd-ray run ss_gpt2 --workers 3 --gpu\n"
        "spd-ray pretrain experiments/pretrain/missing.yaml\n"
        "```\n"
    )
    assert [c.argv for c in V.entrypoints(readme)] == [
        ["spd-ray", "run", "--workers", "two"],
        ["spd-ray", "list"],
        ["spd-ray", "run", "ss_gtp2"],
        ["spd-ray", "run", "ss_gpt2", "--workers", "3", "--gpu"],
        ["spd-ray", "pretrain", "experiments/pretrain/missing.yaml"],
    ]
    problems = V.command_problems(readme)
    assert problems[0] == (
        f"{readme}: line 4: spd-ray run --workers two: spd-ray run: error: argument --workers: "
        "'two' is not a whole number"
    )
    assert problems[1].startswith(
        f"{readme}: line 5: spd-ray run ss_gtp2: ss_gtp2: unknown experiment 'ss_gtp2': not a "
        "registry name ("
    )
    assert problems[2:] == [
        f"{readme}: line 6: spd-ray run ss_gpt2 --workers 3 --gpu: batch_size 16 of ss_gpt2 is "
        "not divisible by 3 workers",
        f"{readme}: line 8: spd-ray pretrain experiments/pretrain/missing.yaml: pretrain config "
        "experiments/pretrain/missing.yaml: no such file in the repository",
    ]


def test_filled_lists_placeholders_outside_comments(tmp_path: Path) -> None:
    tokens = {p.rsplit("placeholder ", 1)[1] for p in V.placeholder_problems(CONFIGS["aws"])}
    assert tokens == {
        "YOUR-BUCKET is not filled in",
        "YOUR-ORG is not filled in",
        "YOUR-COMMIT is not filled in",
        "YOUR-DLAMI is not filled in",
    }
    text = CONFIGS["aws"].read_text()
    for old, new in [("YOUR-BUCKET", "my-bucket"), ("YOUR-ORG", "me"),
                     ("YOUR-COMMIT", "0123abc"), ("ami-YOUR-DLAMI", "ami-0abc")]:  # fmt: skip
        text = "\n".join(
            line if line.lstrip().startswith("#") else line.replace(old, new)
            for line in text.splitlines()
        )
    filled = tmp_path / "filled.yaml"
    filled.write_text(text)
    assert V.validate_all([filled], filled=True) == []
    assert V.main(["--filled", str(CONFIGS["aws"])]) == 1
