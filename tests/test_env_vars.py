"""Every environment variable the code reads has a row in the README's tables ("Environment
variables"), and every row names a variable the code knows, so a new undocumented variable or a
stale row fails here.

Reads are found in the syntax tree of every module of `spd_ray/`: `os.environ[K]`,
`os.environ.get(K)`, `os.environ.setdefault(K, ...)`, `os.environ.pop(K)`, `os.getenv(K)` and
`K in os.environ`, where K is a string, a module constant holding strings (`ENDPOINT_VARS`), or a
loop variable over either. A key the scan cannot resolve fails the test unless `DYNAMIC` says
where its names come from. The SLURM scripts are shell: there every `$SPD_RAY_...` and every
`${RAY_...:-default}` is a read.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from spd_ray.ray_session import FORWARDED_ENV_PREFIXES, ray_env

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "spd_ray"
SHELL_SCRIPTS = [REPO / "cluster" / "slurm" / name for name in ("ray.sbatch", "submit", "testbed")]

# (module, key expression) -> the names it can hold, for keys that are not constants.
DYNAMIC: dict[tuple[str, str], Callable[[], set[str]]] = {
    # `--api-key-env NAME`: the user names the variable; its default is OPENAI_API_KEY.
    ("autointerp/cli.py", "args.api_key_env"): lambda: set(),
    # The driver's secrets, checked on a worker: names of forwarded variables (the prefixes row).
    ("ray_session.py", "n"): lambda: set(),
    # connect_ray sets Ray's defaults unless the user set them: the keys of ray_env().
    ("ray_session.py", "key"): lambda: set(ray_env()),
}

_READ_METHODS = {"get", "setdefault", "pop"}


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _strings(node: ast.AST) -> set[str] | None:
    """The strings a constant expression holds: "A", ("A", "B"), ["A", "B"]; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts:
        found = [_strings(e) for e in node.elts]
        if all(f is not None for f in found):
            return set().union(*(f for f in found if f is not None))
    return None


def _constants(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module-level NAME = <strings> of every module (names are unique enough to share)."""
    out: dict[str, set[str]] = {}
    for tree in trees.values():
        for stmt in tree.body:
            targets: list[ast.expr] = []
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            for t in targets:
                held = _strings(value)
                if isinstance(t, ast.Name) and held is not None:
                    out.setdefault(t.id, set()).update(held)
    return out


def _loop_vars(tree: ast.Module, constants: dict[str, set[str]]) -> dict[str, set[str]]:
    """Loop variables (for statements and comprehensions) over strings or string constants."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.For | ast.comprehension) and isinstance(node.target, ast.Name):
            held = _strings(node.iter)
            if held is None and isinstance(node.iter, ast.Name):
                held = constants.get(node.iter.id)
            if held is not None:
                out.setdefault(node.target.id, set()).update(held)
    return out


def _is_read_call(f: ast.expr) -> bool:
    if isinstance(f, ast.Attribute):
        return f.attr == "getenv" or (f.attr in _READ_METHODS and _is_environ(f.value))
    return isinstance(f, ast.Name) and f.id == "getenv"


def _keys(tree: ast.Module) -> Iterator[ast.expr]:
    """The key expression of every environment read in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            if isinstance(node.ctx, ast.Load):
                yield node.slice
        elif isinstance(node, ast.Call) and node.args and _is_read_call(node.func):
            yield node.args[0]
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.In | ast.NotIn)
            and _is_environ(node.comparators[0])
        ):
            yield node.left


def scan(sources: dict[str, str]) -> tuple[set[str], set[tuple[str, str]]]:
    """(names read, (module, key expression) of the reads whose key is not a constant)."""
    trees = {name: ast.parse(text, name) for name, text in sources.items()}
    constants = _constants(trees)
    names: set[str] = set()
    unresolved: set[tuple[str, str]] = set()
    for module, tree in trees.items():
        loops = _loop_vars(tree, constants)
        for key in _keys(tree):
            held = _strings(key)
            if held is None and isinstance(key, ast.Name):
                held = constants.get(key.id) or loops.get(key.id)
            if held is None:
                unresolved.add((module, ast.unparse(key)))
            else:
                names |= held
    return names, unresolved


def shell_reads(text: str) -> set[str]:
    """`$SPD_RAY_X` / `${SPD_RAY_X...}` anywhere, and `${RAY_X:-...}` (an environment variable
    with a default: the script's own RAY_ variables are plain assignments)."""
    own = set(re.findall(r"\$\{?(SPD_RAY_[A-Z0-9_]+)", text))
    ray = set(re.findall(r"\$\{(RAY_[A-Z0-9_]+):?[-=]", text))
    return own | ray


def documented(readme: str) -> set[str]:
    """Backquoted names in the first column of the tables under "## Environment variables"."""
    section = readme.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", line.split(" | ", 1)[0]))
    return names


def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _code_reads() -> set[str]:
    names, unresolved = scan(_package_sources())
    for where in unresolved & set(DYNAMIC):  # the rest fail the test below
        names |= DYNAMIC[where]()
    for script in SHELL_SCRIPTS:
        names |= shell_reads(script.read_text())
    return names


def test_the_scan_finds_every_kind_of_read() -> None:
    src = (
        "import os\n"
        "from os import getenv\n"
        "PAIR = ('P_ONE', 'P_TWO')\n"
        "os.environ['SUBSCRIPT']\n"
        "os.environ['WRITTEN'] = '1'\n"
        "os.environ.get('GET', 'x')\n"
        "os.environ.setdefault('SETDEFAULT', '1')\n"
        "os.getenv('GETENV'); getenv('BARE_GETENV')\n"
        "'MEMBER' not in os.environ\n"
        "for var in PAIR:\n"
        "    os.environ.get(var)\n"
        "any(os.environ.get(k) for k in ('G_ONE', 'G_TWO'))\n"
        "os.environ.get(args.flag)\n"
    )
    names, unresolved = scan({"m.py": src})
    assert names == {
        "SUBSCRIPT",
        "GET",
        "SETDEFAULT",
        "GETENV",
        "BARE_GETENV",
        "MEMBER",
        "P_ONE",
        "P_TWO",
        "G_ONE",
        "G_TWO",
    }
    assert unresolved == {("m.py", "args.flag")}
    assert shell_reads('A="${SPD_RAY_A:-1}"; echo $SPD_RAY_B ${RAY_C:-0} $RAY_OWN') == {
        "SPD_RAY_A",
        "SPD_RAY_B",
        "RAY_C",
    }
    table = "## Environment variables\n\n| `A_B`, `C` | `NOT_ME` | x |\n| `P_*` | y |\n\n## Next\n"
    assert documented("# t\n" + table + "| `LATER` |\n") == {"A_B", "C", "P_*"}


def test_every_variable_the_code_reads_is_in_the_readme() -> None:
    readme = documented((REPO / "README.md").read_text())
    reads = _code_reads()
    # The ones this scan must see (a scan that finds nothing would pass the check below).
    assert {"SPD_RAY_OUT", "SPD_RAY_VERBOSE", "AWS_ENDPOINT_URL_S3", "SPD_RAY_PORT"} <= reads
    missing = sorted(reads - readme)
    assert not missing, f"read by the code but not in the README's environment tables: {missing}"


def test_every_unresolved_read_is_explained() -> None:
    _, unresolved = scan(_package_sources())
    assert unresolved <= set(DYNAMIC), sorted(unresolved - set(DYNAMIC))


def test_the_forwarded_prefixes_are_in_the_readme() -> None:
    readme = documented((REPO / "README.md").read_text())
    assert {p + "*" for p in FORWARDED_ENV_PREFIXES} <= readme


def test_every_readme_row_names_a_variable_the_code_knows() -> None:
    code = "\n".join(_package_sources().values())
    code += "\n".join(s.read_text() for s in SHELL_SCRIPTS)
    readme = documented((REPO / "README.md").read_text())
    stale = sorted(n for n in readme if not n.endswith("*") and n not in code)
    assert not stale, f"in the README's environment tables but nowhere in the code: {stale}"
