"""Dependencies run one way (DESIGN.md): core <- kernels <- pipeline <- trainer <- benchmarks <- cli
(core imports nothing of ours, nothing imports cli), and no module of ours imports itself round a cycle.

Every module of every subpackage is parsed (not imported), and every import statement in it, at
module level or inside a function, absolute or relative, is resolved to the subpackage it
reaches. Dynamic imports (importlib.import_module, __import__) are refused outright: they would
hide a dependency from this check.
"""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the layers, bottom first: each subpackage may import itself and those before it, nothing after it
LAYERS = ("core", "kernels", "pipeline", "trainer", "benchmarks", "cli")
ALLOWED = {pkg: set(LAYERS[:i + 1]) for i, pkg in enumerate(LAYERS)}
MODULES = sorted(p for pkg in ALLOWED for p in (REPO / pkg).rglob("*.py"))


def imported_subpackages(path: Path) -> list[tuple[int, str]]:
    """(line, subpackage) for every import of ours in `path`; raises on dynamic imports."""
    rel = path.relative_to(REPO)
    package = ["simmim", *rel.parts[:-1]]  # the module's own package, e.g. simmim.trainer
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                raise AssertionError(f"{rel}:{node.lineno}: dynamic import ({name}); import by name instead")
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level - 1` packages up
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from simmim import trainer` names the subpackage in the imported names
            names = [f"simmim.{a.name}" for a in node.names] if module == "simmim" else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "simmim" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            elif parts[0] in ALLOWED:  # `import trainer...`: the folder name, not the package
                found.append((node.lineno, parts[0]))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_dependencies_run_one_way(path):
    own = path.relative_to(REPO).parts[0]
    bad = [f"line {line}: imports {pkg}" for line, pkg in imported_subpackages(path) if pkg not in ALLOWED[own]]
    assert not bad, f"{path.relative_to(REPO)} ({own}) may import only {sorted(ALLOWED[own])}: {bad}"


def test_the_check_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The parser catches absolute, relative (one and two levels), function-level and dynamic imports."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    cases = {"import simmim.trainer.config": "trainer", "from simmim.benchmarks import step": "benchmarks",
             "from ..trainer import cli": "trainer", "from .. import benchmarks": "benchmarks",
             "from simmim import trainer": "trainer", "from .folder import x": "pipeline",
             "def f():\n    from simmim.trainer.checkpoint import atomic_write": "trainer"}
    for i, (src, want) in enumerate(cases.items()):
        f = pkg / f"m{i}.py"
        f.write_text(src + "\n")
        assert [p for _, p in imported_subpackages(f)] == [want], src
    f = pkg / "dyn.py"
    f.write_text("import importlib\nimportlib.import_module('simmim.trainer')\n")
    with pytest.raises(AssertionError, match="dynamic import"):
        imported_subpackages(f)


def test_every_module_is_checked():
    names = {str(p.relative_to(REPO)) for p in MODULES}
    assert {"core/errors.py", "pipeline/scan.py", "trainer/cli.py", "benchmarks/cli.py", "kernels/loss.py",
            "cli/main.py", "cli/__main__.py"} <= names


def test_every_installed_subpackage_is_a_layer():
    """setup.py's SUBPACKAGES, the layers checked here and the folders gpu_check.sh maps into its
    namespace package (it runs without pip) are the same set: a new top-level folder joins all three."""
    import re

    tree = ast.parse((REPO / "setup.py").read_text())
    (installed,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "SUBPACKAGES" for t in n.targets)]
    mapped = re.search(r"^for p in ([\w ]+); do ln -sfn", (REPO / "benchmarks/gpu_check.sh").read_text(), re.M)
    assert set(installed) == set(LAYERS) == set(mapped.group(1).split())


def test_the_layers_run_bottom_to_top(tmp_path, monkeypatch):
    """core imports nothing of ours, every layer may import those below it, and nothing imports cli:
    an upward import in any layer is refused, a downward one passes."""
    assert ALLOWED["core"] == {"core"} and [p for p in ALLOWED if "cli" in ALLOWED[p]] == ["cli"]
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for i, own in enumerate(LAYERS):
        pkg = tmp_path / own
        pkg.mkdir()
        for j, other in enumerate(LAYERS):
            f = pkg / f"uses_{other}.py"
            f.write_text(f"from simmim.{other} import x\n")
            found = [p for _, p in imported_subpackages(f)]
            assert found == [other] and (other in ALLOWED[own]) == (j <= i), (own, other)


def module_name(path: Path) -> str:
    """simmim.<subpackage>.<module> of a file under REPO (a package's __init__: the package)."""
    return ".".join(["simmim", *path.relative_to(REPO).with_suffix("").parts]).removesuffix(".__init__")


def imported_modules(path: Path, ours: set[str]) -> set[str]:
    """The modules of `ours` that `path` imports anywhere (module level or inside a function):
    `from .x import y` reaches module `x`, or `x.y` where that is a module of ours."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])) \
                if node.level else node.module
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in ours else base for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in ours)
    return found - {module_name(path)}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_no_import_cycles():
    """No module of ours reaches itself through imports, counting those inside functions (which hide
    a cycle from Python, not from a reader): a constant lives with the options that name it."""
    ours = {module_name(p) for p in MODULES}
    graph = {module_name(p): imported_modules(p, ours) for p in MODULES}
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("x = 1\ndef f():\n    from simmim.pipeline import a\n")
    files = sorted(pkg.glob("*.py"))
    ours = {module_name(p) for p in files}
    graph = {module_name(p): imported_modules(p, ours) for p in files}
    assert import_cycle(graph) == ["simmim.pipeline.a", "simmim.pipeline.b", "simmim.pipeline.a"]
    (pkg / "b.py").write_text("x = 1\n")
    assert import_cycle({module_name(p): imported_modules(p, ours) for p in files}) is None


IMPORT_ALL = """
import importlib, os, signal, sys
import torch
# third-party libraries first: what they do at import is theirs (ffcv's compiler module sets torch's
# thread count to 1); the check is that our modules add nothing
for lib in ("ffcv.writer", "ffcv.loader", "nvidia.dali", "triton", "timm", "matplotlib.figure", "scipy.interpolate"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
def state():
    umask = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("Umask:"))
    return (sys.unraisablehook, sys.excepthook, umask, torch.get_num_threads(), torch.get_default_dtype(),
            [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)],
            "matplotlib.pyplot" in sys.modules)
before = state()
for name in sys.argv[1:]:
    importlib.import_module(name)
after = state()
assert after == before, (before, after)
print("imported", len(sys.argv) - 1)
"""


@pytest.mark.slow
def test_importing_changes_no_process_state():
    """No import-time global side effects: importing every module of ours leaves hooks, umask,
    threads, default dtype, signal handlers and matplotlib's global state as they were."""
    import subprocess

    names = [f"simmim.{'.'.join(p.relative_to(REPO).with_suffix('').parts)}".removesuffix(".__init__")
             for p in MODULES if p.name != "__main__.py"]  # a __main__ runs its command when imported
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL, *names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"imported {len(names)}" in r.stdout


MAX_FUNCTION_LINES = 60  # outside kernels/ (issue 13): a longer function is split into named pieces
SIZE_CHECKED = ("core", "pipeline", "trainer", "benchmarks", "cli")


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'name (N lines)' for each function or method in `path` longer than `limit` lines, from its
    `def` (decorators not counted) to its last line, docstring and nested functions included."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("path", [p for p in MODULES if p.relative_to(REPO).parts[0] in SIZE_CHECKED],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_over_60_lines(path):
    long = long_functions(path)
    assert not long, f"{path.relative_to(REPO)}: over {MAX_FUNCTION_LINES} lines: {long}; split into named pieces"


def test_the_length_check_counts_lines(tmp_path):
    """61 lines fail, 60 pass; methods, nested and async functions are counted too."""
    body = "    x = 0\n"
    f = tmp_path / "m.py"
    f.write_text("def ok():\n" + body * 59 + "def long():\n" + body * 60
                 + "class C:\n    async def m(self):\n" + "        x = 0\n" * 61)
    assert long_functions(f) == ["long (61 lines)", "m (62 lines)"]
    f.write_text("def outer():\n    def inner():\n" + "        x = 0\n" * 60)
    assert long_functions(f) == ["outer (62 lines)", "inner (61 lines)"]


# Imports inside a function body hide a module's needs from its reader and can hide a cycle from
# Python: they stay only for optional heavy dependencies, imported where they are used so that the
# package imports and runs without them (module prefixes; a module of ours that needs one at its
# top counts as that dependency).
OPTIONAL_HEAVY = {
    "ffcv": "the ffcv extra", "numba": "the ffcv extra", "cv2": "the ffcv extra (opencv)",
    "simmim.pipeline.ffcv_writer": "imports ffcv at its top",
    "streaming": "the stream extra", "simmim.pipeline.shards": "imports streaming at its top",
    "simmim.pipeline.stream_dataset": "imports streaming at its top", "simmim.pipeline.resample": "imports numba at its top",
    "nvidia.dali": "the dali extra", "triton": "the triton extra",
    "torch.utils.tensorboard": "TensorBoard: seconds to import, only for a run folder's event files",
    "wandb": "the test extra (offline logging)", "sklearn": "the test extra (the probe test)",
    "psutil": "the test extra (memory figures of benchmarks)",
    "matplotlib": "plots only; pyplot sets global state (the Agg backend) when imported",
    "moto": "the test extra (the local S3 server of `simmim bench loaders`)",
    "boto3": "the stream extra (run.mirror's S3 client)", "botocore": "the stream extra (boto3's core)",
}
# `simmim` and `simmim bench` dispatch: each command's module imported when that command runs, so
# that `simmim --help` or one command does not import every command (and its heavy dependencies)
CLI_DISPATCH = {
    "benchmarks/cli.py": {"simmim.benchmarks.avg_dist", "simmim.benchmarks.kernels", "simmim.benchmarks.step",
                          "simmim.benchmarks.claims", "simmim.benchmarks.loaders", "simmim.benchmarks.compile_check",
                          "simmim.benchmarks.heads", "simmim.benchmarks.memory", "simmim.benchmarks.scale"},
    "trainer/cli.py": {"simmim.trainer.config", "simmim.trainer.pretrain", "simmim.trainer.finetune",
                       "simmim.trainer.finetune_options", "simmim.trainer.probe", "simmim.trainer.sweep",
                       "simmim.trainer.export", "simmim.trainer.reconstruct", "simmim.trainer.monitor",
                       "simmim.trainer.loop", "simmim.pipeline.scanlist",
                       "simmim.pipeline.convert", "simmim.pipeline.sample_data", "simmim.pipeline.shards"},
}


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement inside a function body of `path`."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                found.append((node.lineno, base))
    return sorted(set(found))


def misplaced_imports(path: Path) -> list[str]:
    """'line N: module' for each import inside a function of `path` that is neither an optional heavy
    dependency nor a command's module in the CLI dispatch: it belongs at the module's top."""
    rel = str(path.relative_to(REPO))
    return [f"line {line}: {m}" for line, m in function_imports(path)
            if not any(m == k or m.startswith(k + ".") for k in OPTIONAL_HEAVY)
            and m not in CLI_DISPATCH.get(rel, ())]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_inside_functions_only_for_optional_dependencies(path):
    bad = misplaced_imports(path)
    assert not bad, (f"{path.relative_to(REPO)}: imports inside a function {bad}; move them to the module's top "
                     f"(only optional heavy dependencies stay inside: {sorted(OPTIONAL_HEAVY)})")


def test_the_function_import_check_catches_one(tmp_path, monkeypatch):
    """A light import inside a function (stdlib, ours, relative, in a method) is caught; an optional
    heavy one, or a command's module in cli.py's dispatch, is not."""
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    f = pkg / "m.py"
    f.write_text("import json\n\ndef f():\n    import wandb\n    from ffcv.loader import Loader\n    return 1\n")
    assert misplaced_imports(f) == []
    f.write_text("def f():\n    import wandb\n    import json\n"
                 "class C:\n    def g(self):\n        from .config import load_config\n"
                 "        from simmim.core.io import atomic_write\n")
    assert misplaced_imports(f) == ["line 3: json", "line 6: simmim.trainer.config", "line 7: simmim.core.io"]
    cli = pkg / "cli.py"
    cli.write_text("def cmd():\n    from .pretrain import pretrain\n    from .validate import validate_config\n")
    assert misplaced_imports(cli) == ["line 3: simmim.trainer.validate"]
