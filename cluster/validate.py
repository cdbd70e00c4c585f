"""Offline checks of what cluster/ ships: the cluster launcher configs, the KubeRay manifests, the
Dockerfile, and every spd-ray command they and the cluster READMEs show.

    python cluster/validate.py                    # everything shipped; exit 1, one line per problem
    python cluster/validate.py --filled my.yaml   # your filled-in copy: no YOUR-... left either

Each problem is one line, `<file>: <key path or line>: <what is wrong>`.

Checked:
- launcher configs (cluster/cloud/*.yaml): Ray's own schema (`ray/autoscaler/ray-schema.json`,
  every error with its key path: types, misspelt keys at the top level and in node types), then
  Ray's own `prepare_config` (merges the provider's defaults.yaml) and `validate_config` (head
  node type, min/max workers, docker block) - the steps `ray up` takes before it calls the cloud;
  provider credentials in the file (`aws_credentials`, `gcp_credentials`) are refused.
- KubeRay manifests (cluster/kubernetes/*.yaml): each document against its CRD's v1
  openAPIV3Schema (the vendored KubeRay v1.7.0 CRDs) with jsonschema Draft 7; `strict` also
  refuses keys the schema does not declare (like `kubeconform -strict`). `rayVersion` must equal
  the installed Ray; an env var whose name says it is a secret must come from a Secret
  (`valueFrom`/`envFrom`), never a `value`, and never from a RayJob's runtime env.
- version pins anywhere (`rayproject/ray:X`, `ray==X`, `ray[...]==X`, `torch==X`) must equal the
  installed Ray and the torch that the Makefile installs.
- spd-ray commands: a RayJob's `entrypoint`, comment lines of the YAMLs and the Dockerfile that
  start (after an optional `Label:`) with a command, and lines of ```-fenced blocks in READMEs.
  Each must parse with `spd_ray.cli.build_parser()`; a run/sweep target must be a registry name or
  a file of this repository, load with its `--set`/`--steps`, and have its batch size divisible by
  `--workers` (`--workers-per-trial`); a pretrain config and a sweep space must exist.

Not checked: the free-form `provider:` and `node_config:` blocks of a launcher config (instance
types, images, regions, IAM names: `ray up` and the cloud check those); the AMI/image/bucket/
service account existing; the manifests' CEL rules (`x-kubernetes-validations`: immutability,
deletionStrategy combinations) and anything an admission webhook or the operator decides;
Kubernetes' own schemas for documents that are not RayCluster/RayJob; the Dockerfile building;
shell syntax of setup commands; commands hidden behind shell variables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.metadata
import io
import json
import logging
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRD_DIR = CLUSTER / "kubernetes" / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
API_VERSION = "ray.io/v1"
PLACEHOLDER = re.compile(r"YOUR-[A-Z0-9]+(?:-[A-Z0-9]+)*")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1-1.5 MB
_SHELL_OPERATORS = {";", "&", "&&", "|", "||", "(", ")", ";;", "|&"}
# `spd-ray` as a word of its own (not ~/spd-ray, spd-ray-head, org/spd-ray@commit).
_SPD_RAY_WORD = re.compile(r"(?:/bin/|(?<![\w./@:~-]))spd-ray(?![\w.@:/-])")
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
_WRAPPERS = {"env", "exec", "time", "nohup", "srun", "sudo", "then", "do", "else"}
# A comment line holds a command when, after an optional "Label:", it starts like one.
_COMMENT_COMMAND = re.compile(
    r"^(?:[A-Z][\w ()/.-]*:\s+)?"
    r"((?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:spd-ray|\S*/bin/spd-ray|ray|kubectl|bash|sh|python3?|sbatch|srun|cluster/\S+)(?:\s.*)?)$"
)
_PINS = (
    ("ray", re.compile(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)")),
    ("ray", re.compile(r"(?<![\w./-])ray(?:\[[\w,\s-]*\])?==(\d+(?:\.\d+)*)")),
    ("torch", re.compile(r"(?<![\w./-])torch==(\d+(?:\.\d+)*)")),
)


class Command(NamedTuple):
    """An spd-ray command a file shows: its line (1-based) and argv (argv[0] is spd-ray), or
    why a line holding `spd-ray` could not be split into words."""

    line: int
    argv: list[str]
    error: str = ""


# --- shipped files -------------------------------------------------------------------------------


def launcher_configs() -> list[Path]:
    return sorted((CLUSTER / "cloud").glob("*.yaml"))


def manifests() -> list[Path]:
    return sorted((CLUSTER / "kubernetes").glob("*.yaml"))


def dockerfiles() -> list[Path]:
    return [CLUSTER / "kubernetes" / "Dockerfile"]


def readmes() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("README.md") if CRD_DIR not in p.parents)


def shipped() -> list[Path]:
    return [*launcher_configs(), *manifests(), *dockerfiles(), *readmes()]


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def key_path(parts: Iterable[Any]) -> str:
    """`spec.workerGroupSpecs[0].groupName`; keys that are not plain names in brackets."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out or "(top level)"


def _load_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=_LOADER) if doc is not None]


def project_versions() -> dict[str, tuple[str, str]]:
    """{name: (version, where it comes from)}: Ray as installed here (the project pins it by
    installing it), torch as `make install` pins it (GPU users may bring another build)."""
    ray = importlib.metadata.version("ray").split("+")[0]
    match = re.search(r"torch==(\d+(?:\.\d+)*)", (REPO / "Makefile").read_text())
    assert match, "the Makefile no longer pins torch=="
    return {
        "ray": (ray, "the installed ray is"),
        "torch": (match.group(1), "the Makefile installs torch"),
    }


# --- schema errors as one line each --------------------------------------------------------------


def _schema_problems(instance: Any, schema: dict[str, Any], where: str) -> list[str]:
    from jsonschema import Draft7Validator

    problems = []
    errors = sorted(
        Draft7Validator(schema).iter_errors(instance), key=lambda e: [str(p) for p in e.path]
    )
    for err in errors:
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            declared = err.schema.get("properties", {})
            patterns = err.schema.get("patternProperties", {})
            for key in err.instance:
                if key not in declared and not any(re.search(p, key) for p in patterns):
                    problems.append(f"{where}: {key_path([*path, key])}: unknown key")
        elif err.validator == "required" and isinstance(err.instance, dict):
            for key in err.validator_value:
                if key not in err.instance:
                    problems.append(f"{where}: {key_path([*path, key])}: missing (required)")
        elif err.validator == "pattern":
            problems.append(f"{where}: {key_path(path)}: {err.instance!r} is not a valid value")
        else:
            problems.append(f"{where}: {key_path(path)}: {err.message}")
    return problems


# --- cluster launcher ----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def validate_launcher_config(path: Path) -> list[str]:
    """Problems of a Ray cluster launcher YAML, as `ray up` would find them before calling the
    cloud: Ray's schema first (all errors), then Ray's prepare_config + validate_config."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    where = rel(path)
    docs = _load_documents(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return [f"{where}: a cluster launcher config is one YAML mapping"]
    config = docs[0]
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    problems = _schema_problems(config, json.loads(schema_path.read_text()), where)
    for key in ("aws_credentials", "gcp_credentials"):
        if isinstance(config.get("provider"), dict) and key in config["provider"]:
            problems.append(
                f"{where}: provider.{key}: credentials do not belong in the file; give nodes an "
                "instance profile (AWS) or a service account (GCP)"
            )
    problems += _literal_secret_problems(_strings(config), where)
    if problems:
        return problems  # Ray's own steps assume a config its schema accepts
    try:
        with _quiet_ray_logs():
            validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError, KeyError, AssertionError, jsonschema.ValidationError) as err:
        return [f"{where}: {' '.join(str(err).split())}"]
    return []


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _is_secret(name: str) -> bool:
    from spd_ray.ray_session import is_secret

    return is_secret(name)


def _literal_secret_problems(texts: Iterable[str], where: str) -> list[str]:
    """`NAME=value` with a secret's name and a literal value (not `$OTHER`) in commands."""
    problems = []
    for text in texts:
        for match in re.finditer(r"(?<![\w$])([A-Z][A-Z0-9_]*)=([^\s$'\"][^\s'\"]*)", text):
            if _is_secret(match.group(1)):
                problems.append(
                    f"{where}: {match.group(1)}: a secret's value is written in the file; "
                    "give it to the nodes from their environment or a secret store"
                )
    return problems


# --- KubeRay manifests ---------------------------------------------------------------------------


def _prepare_schema(node: Any, strict: bool) -> Any:
    """A Draft 7 form of an OpenAPI v3 structural schema: int-or-string and nullable spelled
    out, and with `strict`, no undeclared keys in an object that declares its properties (unless
    it preserves unknown fields)."""
    if isinstance(node, list):
        return [_prepare_schema(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: _prepare_schema(v, strict) for k, v in out["properties"].items()}
        preserve = out.get("x-kubernetes-preserve-unknown-fields")
        if strict and "additionalProperties" not in out and not preserve:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _prepare_schema(out[key], strict)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = _prepare_schema(out[key], strict)
    return out


@functools.cache
def crd_schema(kind: str, strict: bool = True) -> dict[str, Any]:
    """The v1 openAPIV3Schema of the vendored CRD for `kind`, ready for Draft 7."""
    (crd,) = _load_documents(CRD_DIR / CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = _prepare_schema(version["schema"]["openAPIV3Schema"], strict)
    return schema


def _containers(spec: dict[str, Any], base: list[Any]) -> Iterator[tuple[list[Any], Any]]:
    """(key path, container) of every container and init container in a RayCluster spec."""
    groups: list[tuple[list[Any], Any]] = [(["headGroupSpec"], spec.get("headGroupSpec"))]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        groups.append((["workerGroupSpecs", i], group))
    for path, group in groups:
        pod = ((group or {}).get("template") or {}).get("spec") or {}
        for field in ("containers", "initContainers"):
            for i, container in enumerate(pod.get(field) or []):
                yield [*base, *path, "template", "spec", field, i], container
    options = spec.get("autoscalerOptions")
    if isinstance(options, dict):
        yield [*base, "autoscalerOptions"], options


def _cluster_problems(spec: Any, base: list[Any], where: str) -> list[str]:
    """rayVersion and secrets of one RayCluster spec (a RayCluster's `spec` or a RayJob's
    `rayClusterSpec`)."""
    if not isinstance(spec, dict):
        return []
    problems = []
    ray_version = project_versions()["ray"][0]
    if "rayVersion" not in spec:
        problems.append(f"{where}: {key_path([*base, 'rayVersion'])}: missing (set it to Ray's)")
    elif str(spec["rayVersion"]) != ray_version:
        problems.append(
            f"{where}: {key_path([*base, 'rayVersion'])}: {spec['rayVersion']} is not the "
            f"installed Ray {ray_version}"
        )
    for path, container in _containers(spec, base):
        for i, env in enumerate((container or {}).get("env") or []):
            if isinstance(env, dict) and "value" in env and _is_secret(str(env.get("name"))):
                problems.append(
                    f"{where}: {key_path([*path, 'env', i, 'value'])}: {env['name']} is a "
                    "secret: take it from a Secret (valueFrom.secretKeyRef or envFrom)"
                )
    return problems


def validate_manifest(path: Path, strict: bool = True) -> list[str]:
    """Problems of a YAML file of KubeRay RayCluster/RayJob documents, checked against the
    vendored v1 CRDs (`strict`: no undeclared keys), plus rayVersion and secrets."""
    docs = _load_documents(path)
    problems = []
    for n, doc in enumerate(docs, start=1):
        where = rel(path) if len(docs) == 1 else f"{rel(path)} (document {n})"
        if not isinstance(doc, dict):
            problems.append(f"{where}: not a mapping")
            continue
        kind, api = doc.get("kind"), doc.get("apiVersion")
        if api != API_VERSION or kind not in CRD_FILES:
            problems.append(
                f"{where}: apiVersion/kind {api}/{kind}: expected {API_VERSION} "
                f"{' or '.join(CRD_FILES)}"
            )
            continue
        problems += _schema_problems(doc, crd_schema(kind, strict), where)
        name = (doc.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            problems.append(f"{where}: metadata.name: {name!r} is not a DNS-1123 name")
        spec = doc.get("spec") or {}
        if kind == "RayCluster":
            problems += _cluster_problems(spec, ["spec"], where)
        else:
            problems += _cluster_problems(
                spec.get("rayClusterSpec"), ["spec", "rayClusterSpec"], where
            )
            runtime_env = str(spec.get("runtimeEnvYAML") or "")
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", runtime_env):
                if word.isupper() and _is_secret(word):
                    problems.append(
                        f"{where}: spec.runtimeEnvYAML: {word} is a secret: a runtime env is "
                        "stored and shown by the cluster; take it from a Secret"
                    )
    return problems


# --- version pins and placeholders ---------------------------------------------------------------


def version_problems(path: Path) -> list[str]:
    """Every Ray/torch pin in the file (image tags, `==` pins) must equal the project's."""
    versions = project_versions()
    problems = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        for name, pattern in _PINS:
            for match in pattern.finditer(line):
                version, source = versions[name]
                if match.group(1) != version:
                    problems.append(
                        f"{rel(path)}: line {n}: {match.group(0)} pins {name} "
                        f"{match.group(1)}, but {source} {version}"
                    )
    return problems


def placeholder_problems(path: Path) -> list[str]:
    """YOUR-... placeholders left outside comments (for a filled-in copy)."""
    problems = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        for token in sorted(set(PLACEHOLDER.findall(line))):
            problems.append(f"{rel(path)}: line {n}: placeholder {token} is not filled in")
    return problems


# --- spd-ray commands ----------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _is_spd_ray(token: str) -> bool:
    return token == "spd-ray" or token.endswith("/bin/spd-ray")


def _commands_in(tokens: list[str]) -> Iterator[list[str]]:
    """spd-ray argvs in a shell-split line. `spd-ray` counts where a command starts: first, after
    an operator, `--` (`ray job submit ... -- spd-ray ...`), env assignments or a wrapper like
    `env`/`srun`; quoted arguments are searched too (`bash -c "..."`, `ray exec cfg '...'`)."""
    at_start, i = True, 0
    while i < len(tokens):
        token = tokens[i]
        if at_start and _is_spd_ray(token):
            j = i + 1
            while j < len(tokens) and tokens[j] not in _SHELL_OPERATORS:
                j += 1
            yield ["spd-ray", *tokens[i + 1 : j]]
            i = j
            continue
        if re.search(r"\s", token) and re.search(r"(?<![\w./@-])spd-ray\s", token):
            yield from _commands_in(_split(token))
        at_start = (
            token in _SHELL_OPERATORS
            or token == "--"
            or (at_start and (token in _WRAPPERS or _ASSIGNMENT.fullmatch(token) is not None))
        )
        i += 1


def _logical_lines(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Join backslash continuations; each result keeps its first line's number."""
    start, parts = 0, list[str]()
    for n, text in lines:
        if not parts:
            start = n
        stripped = text.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        yield start, " ".join(p.strip() for p in parts)
        parts = []
    if parts:
        yield start, " ".join(p.strip() for p in parts)


def _fenced_lines(text: str) -> list[tuple[int, str]]:
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append((n, re.sub(r"^\s*\$\s+", "", line)))
    return out


def _comment_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.lstrip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            match = _COMMENT_COMMAND.match(stripped.lstrip("#").strip())
            out.append((n, match.group(1) if match else ""))
        else:
            out.append((n, ""))  # a gap ends a continued command
    return out


def _entrypoint_lines(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, entrypoint) of each RayJob document."""
    lines = [
        n for n, line in enumerate(text.splitlines(), start=1) if re.match(r"\s*entrypoint:", line)
    ]
    out: list[tuple[int, str]] = []
    for doc in _load_documents(path):
        if isinstance(doc, dict) and doc.get("kind") == "RayJob":
            entry = (doc.get("spec") or {}).get("entrypoint")
            if isinstance(entry, str):
                out.append((lines[len(out)] if len(out) < len(lines) else 0, entry))
    return out


def entrypoints(path: Path) -> list[Command]:
    """Every spd-ray command the file shows: a RayJob's entrypoint, command comment lines of a
    YAML or Dockerfile, lines of ```-fenced blocks of a Markdown file."""
    text = path.read_text()
    if path.suffix == ".md":
        candidates = list(_logical_lines(_fenced_lines(text)))
    else:
        candidates = list(_logical_lines(_comment_lines(text)))
        if path.suffix in (".yaml", ".yml"):
            candidates += _entrypoint_lines(path, text)
    found = []
    for n, line in candidates:
        if not _SPD_RAY_WORD.search(line):
            continue
        try:
            tokens = _split(line)
        except ValueError as err:  # unbalanced quotes
            found.append(Command(n, [], f"cannot split the line into words: {err}"))
            continue
        found += [Command(n, argv) for argv in _commands_in(tokens)]
    return sorted(found)


def _repo_path(name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else REPO / path


def check_command(argv: list[str]) -> str | None:
    """Why spd-ray would reject the command before doing any work, or None."""
    from spd_ray.cli import build_parser, load_target_config
    from spd_ray.errors import user_errors
    from spd_ray.registry import registry

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            return lines[-1] if lines else f"rejected (exit {exit_.code})"
    if args.command in ("run", "sweep"):
        if not args.target and not getattr(args, "all", False):
            return "no TARGET (a registry name or a config path)"
        workers = args.workers if args.command == "run" else args.workers_per_trial
        for target in [t.strip() for t in (args.target or "").split(",") if t.strip()]:
            is_file = target not in registry() and Path(target).suffix in (".yaml", ".yml", ".json")
            name = str(_repo_path(target)) if is_file else target
            try:
                _, config = load_target_config(name, args.overrides, args.steps)
            except user_errors() as err:
                return f"{target}: {' '.join(str(err).split())}"
            if config.batch_size % workers:
                return (
                    f"batch_size {config.batch_size} of {target} is not divisible by "
                    f"{workers} workers"
                )
    if args.command == "sweep" and not _repo_path(args.space).is_file():
        return f"--space {args.space}: no such file in the repository"
    if args.command == "pretrain" and not _repo_path(args.config).is_file():
        return f"pretrain config {args.config}: no such file in the repository"
    return None


def command_problems(path: Path) -> list[str]:
    problems = []
    for command in entrypoints(path):
        if command.error:
            problems.append(f"{rel(path)}: line {command.line}: {command.error}")
            continue
        reason = check_command(command.argv)
        if reason is not None:
            problems.append(
                f"{rel(path)}: line {command.line}: {shlex.join(command.argv)}: {reason}"
            )
    return problems


# --- everything ----------------------------------------------------------------------------------


def kind_of(path: Path) -> str:
    """ "launcher", "manifest", "dockerfile" or "readme" (by name, then by content)."""
    if path.suffix == ".md":
        return "readme"
    if path.name.startswith("Dockerfile"):
        return "dockerfile"
    docs = _load_documents(path)
    first = docs[0] if docs else None
    if isinstance(first, dict) and "provider" in first and "apiVersion" not in first:
        return "launcher"
    return "manifest"


def validate_file(path: Path, strict: bool = True, filled: bool = False) -> list[str]:
    kind = kind_of(path)
    problems = []
    if kind == "launcher":
        problems += validate_launcher_config(path)
    elif kind == "manifest":
        problems += validate_manifest(path, strict)
    problems += version_problems(path)
    problems += command_problems(path)
    if filled and kind != "readme":
        problems += placeholder_problems(path)
    return problems


def validate_all(
    paths: Iterable[Path] | None = None, strict: bool = True, filled: bool = False
) -> list[str]:
    """Problems of the given files, or of everything cluster/ ships."""
    problems = []
    for path in shipped() if paths is None else paths:
        problems += validate_file(Path(path), strict, filled)
    return problems


def main(argv: list[str] | None = None) -> int:
    # Run as a script, cluster/ is sys.path[0], and its kubernetes/ folder would shadow (as a
    # namespace package) the `kubernetes` client that Ray imports where installed.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CLUSTER]
    parser = argparse.ArgumentParser(
        prog="cluster/validate.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="*", type=Path, help="files (default: all cluster/ ships)")
    parser.add_argument(
        "--filled", action="store_true", help="also report YOUR-... placeholders left"
    )
    parser.add_argument(
        "--lenient", action="store_true", help="manifests: allow keys the CRD does not declare"
    )
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    paths = args.paths or shipped()
    problems = validate_all(paths, strict=not args.lenient, filled=args.filled)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    commands = sum(len(entrypoints(p)) for p in paths)
    print(f"ok: {len(paths)} files, {commands} spd-ray commands", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
