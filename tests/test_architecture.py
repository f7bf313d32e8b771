"""rlkd's layers point one way, and the library stays pure.

    rank 3  the CLI: rlkd.train, rlkd.eval, rlkd.quantize
    rank 2  tasks (drivers): rlkd.tasks.*
    rank 1  actors (Ray, vLLM, DeepSpeed): rlkd.actors.*
    rank 0  the library: every other rlkd module, and rewards

Every import of an rlkd or rewards module, at module level or inside a function, points to a
lower rank, or stays in its rank where that rank allows it: library and actor modules use their
own layer, tasks never import another task (study -> study_report excepted), the other commands
use rlkd.train's runner, and the import graph
has no cycle. Importing any library module (and so everything it imports) loads no Ray, vLLM or
DeepSpeed, checked for every module found on disk, not for a list. Each checker also runs on a
planted violation, so none of these tests can pass vacuously.
"""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO_ROOT

CLI = {"rlkd.train", "rlkd.eval", "rlkd.quantize"}
ALLOWED_TASK_EDGES = {("rlkd.tasks.study", "rlkd.tasks.study_report")}
ALLOWED_CLI_EDGES = {("rlkd.eval", "rlkd.train"), ("rlkd.quantize", "rlkd.train")}  # the one runner
HEAVY = ("ray", "vllm", "deepspeed")
PROBE = ("import importlib, sys\n"
         "importlib.import_module(sys.argv[1])\n"
         "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:]))))")


def rank(module: str) -> int:
    if module in CLI:
        return 3
    if module.startswith("rlkd.tasks."):
        return 2
    if module.startswith("rlkd.actors."):
        return 1
    return 0


def modules(root: Path) -> dict[str, Path]:
    """Every module of the rlkd and rewards packages under `root`, by dotted name."""
    found = {}
    for package in ("rlkd", "rewards", "environments"):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name in known:
                out.add(name)
    return out


def violations(root: Path) -> list[str]:
    """Every import that breaks the layering, and every cycle, as one line each."""
    found = modules(root)
    graph = {m: imports(p, set(found)) - {m} for m, p in found.items()}
    bad = []
    for src, targets in graph.items():
        for dst in sorted(targets):
            if dst in ("rlkd", "rlkd.tasks", "rlkd.actors"):  # package __init__ files
                continue
            up = rank(dst) > rank(src)
            sideways_task = rank(src) == rank(dst) == 2 and (src, dst) not in ALLOWED_TASK_EDGES
            sideways_cli = rank(src) == rank(dst) == 3 and (src, dst) not in ALLOWED_CLI_EDGES
            if up or sideways_task or sideways_cli:
                bad.append(f"{src} (rank {rank(src)}) imports {dst} (rank {rank(dst)})")
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:  # depth-first: a grey node seen again is a cycle
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                bad.append("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return bad


def test_every_import_points_down_and_there_is_no_cycle():
    assert violations(REPO_ROOT) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"rlkd/data.py": "from rlkd.tasks.grpo import train\n", "rlkd/tasks/grpo.py": ""},
     "rlkd.data (rank 0) imports rlkd.tasks.grpo (rank 2)"),
    ({"rlkd/actors/rollout.py": "def f():\n    import rlkd.tasks.eval\n", "rlkd/tasks/eval.py": ""},
     "rlkd.actors.rollout (rank 1) imports rlkd.tasks.eval (rank 2)"),
    ({"rlkd/tasks/sft.py": "from rlkd.tasks.cot import gold_text\n", "rlkd/tasks/cot.py": ""},
     "rlkd.tasks.sft (rank 2) imports rlkd.tasks.cot (rank 2)"),
    ({"rlkd/packing.py": "from rlkd.learner import TrainBatch\n",
      "rlkd/learner.py": "from rlkd.packing import pack\n"},
     "import cycle: rlkd.learner -> rlkd.packing -> rlkd.learner"),
])
def test_a_planted_violation_is_reported(tmp_path, files, expected):
    assert expected in violations(_plant(tmp_path, files))


def test_the_allowed_edges_are_allowed(tmp_path):
    root = _plant(tmp_path, {"rlkd/tasks/study.py": "from rlkd.tasks.study_report import Row\n",
                             "rlkd/tasks/study_report.py": "from rlkd.stats import mcnemar_exact\n",
                             "rlkd/stats.py": "", "rlkd/train.py": "from rlkd.tasks.study import run\n"})
    assert violations(root) == []


def _heavy_imports(module: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, module, *HEAVY], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"
    return proc.stdout.strip()


def test_no_library_module_loads_the_distributed_stack():
    library = sorted(m for m in modules(REPO_ROOT) if rank(m) == 0)
    assert "rlkd.losses" in library and "rlkd.types" in library and "rewards.gsm8k" in library
    with ThreadPoolExecutor(2) as pool:
        loaded = dict(zip(library, pool.map(_heavy_imports, library), strict=True))
    assert {m: heavy for m, heavy in loaded.items() if heavy} == {}


def test_the_probe_sees_a_heavy_import():
    # The same probe on a module that does import Ray must report it (or the test above could
    # never fail).
    assert "ray" in _heavy_imports("rlkd.actors.recovery").split()
