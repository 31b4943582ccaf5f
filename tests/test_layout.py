"""The package's dependency rules, read from the modules' own import statements (no import is run).

face (cli, api, bench) -> runs -> methods -> nn -> genotype; data and device beside them; views
read run files and genotypes only. Each rule is checked on every import, at module level or inside
a function, so a lazy import cannot sneak around it.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "msrdarts"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every msrdarts module ``path`` imports (relative imports resolved), and third-party roots."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # "from .pkg import mod" imports the module pkg.mod; "from .mod import name", the module
            subs = {f"{target}.{a.name}" for a in node.names} & ALL
            found |= subs or {target}
    return found


ALL = {_module_name(p) for p in PKG.rglob("*.py")}
MODULES = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _internal(imports: set[str]) -> set[str]:
    return {m for m in imports if m == "msrdarts" or m.startswith("msrdarts.")}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imports in MODULES.items() if _in(m, *sources)
                  for i in _internal(imports) if _in(i, *forbidden) and not _in(i, *allowed))


def test_the_rules_see_every_module():
    for sub in ("nn", "methods", "data", "runs", "views"):
        assert any(m.startswith(f"msrdarts.{sub}.") for m in MODULES), sub
    assert "msrdarts.runs.loop" in MODULES and "msrdarts.methods.base" in MODULES
    # the parser resolves relative imports: the loop imports the run folder and the epoch module
    assert {"msrdarts.runs.folder", "msrdarts.runs.epoch"} <= _internal(MODULES["msrdarts.runs.loop"])


PURE = ("msrdarts.config", "msrdarts.errors", "msrdarts.primitives", "msrdarts.genotype", "msrdarts.zoo",
        "msrdarts.data.registry", "msrdarts.runs.folder", "msrdarts._io")


@pytest.mark.parametrize("module", PURE)
def test_pure_data_modules_import_no_network_code(module):
    """config, genotypes, the zoo, op and data-set facts and the run folder: no torch, no network."""
    assert module in MODULES
    third_party = {i.split(".")[0] for i in MODULES[module]} - {"msrdarts"}
    assert not third_party & {"torch", "numpy", "torchvision", "matplotlib"}, (module, third_party)
    assert not [i for i in _internal(MODULES[module]) if not _in(i, *PURE)], module


def test_genotype_and_zoo_do_not_import_each_other_in_a_cycle():
    assert "msrdarts.zoo" not in _internal(MODULES["msrdarts.genotype"])
    assert "msrdarts.genotype" in _internal(MODULES["msrdarts.zoo"])


def test_nn_imports_nothing_from_runs_data_methods_or_views():
    assert _violations(("msrdarts.nn",), ("msrdarts.runs", "msrdarts.data", "msrdarts.methods",
                                          "msrdarts.views", "msrdarts.api", "msrdarts.cli")) == []


def test_methods_import_no_runs_views_or_face():
    """A method is a step, not a loop: it never reaches back into the run machinery."""
    assert _violations(("msrdarts.methods",), ("msrdarts.runs", "msrdarts.views", "msrdarts.api",
                                               "msrdarts.cli", "msrdarts.data")) == []


def test_views_read_run_files_and_genotypes_not_modules():
    allowed = ("msrdarts.views", "msrdarts.runs.folder") + PURE
    assert _violations(("msrdarts.views",), ("msrdarts",), allowed) == []


def test_data_and_device_stand_beside_the_networks():
    assert _violations(("msrdarts.data", "msrdarts.device", "msrdarts.distributed"),
                       ("msrdarts.nn", "msrdarts.methods", "msrdarts.runs", "msrdarts.views", "msrdarts.api",
                        "msrdarts.cli")) == []


def test_only_the_face_imports_the_face():
    face = ("msrdarts.cli", "msrdarts.api", "msrdarts.__main__")
    users = sorted(m for m, imports in MODULES.items() if not _in(m, *face) and m != "msrdarts"
                   for i in _internal(imports) if _in(i, *face))
    assert users == []


def test_run_folder_file_names_have_one_home():
    """The literal names of the run files appear in runs/folder.py and nowhere else in the code."""
    names = ("checkpoint.pt", "genotype.json", "history.jsonl", "results.json", "config.json", "best.pt",
             "sample.json")
    homes = {}
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for n in names:
                    if node.value == n:
                        homes.setdefault(n, set()).add(_module_name(path))
    assert homes == {n: {"msrdarts.runs.folder"} for n in names}


def test_exceptions_have_one_home():
    defined = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id == "Exception") for b in node.bases):
                defined[node.name] = _module_name(path)
    assert defined and set(defined.values()) == {"msrdarts.errors"}, defined


def test_the_readme_layout_names_every_module():
    """The README's layout section lists every module file of the package, and only those."""
    text = (PKG.parents[1] / "README.md").read_text()
    section = text[text.index("## Layout"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("\ntests/")]   # the package part of the tree
    import re

    named = set(re.findall(r"([a-z_]+\.py)\b", block))
    files = {p.name for p in PKG.rglob("*.py") if p.name not in ("__main__.py",)}
    assert named == files
    for sub in ("nn", "methods", "data", "runs", "views"):
        assert f"{sub}/" in block


def test_importing_the_pure_modules_loads_no_torch():
    """Not only their own imports: the package's __init__ loads the API (and torch) on first use."""
    import subprocess
    import sys

    code = ("import sys, msrdarts.config, msrdarts.runs.folder, msrdarts.zoo, msrdarts.primitives, msrdarts.data.registry; "
            "msrdarts.config.SearchConfig().validate(); print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
