"""Ray stays at the edge: the core imports without it (DESIGN.md rule 7)."""

import subprocess
import sys

CORE = [
    "raycontrast.config",
    "raycontrast.space",
    "raycontrast.plan",
    "raycontrast.storage",
    "raycontrast.anchors",
    "raycontrast.loss",
    "raycontrast.memory",
    "raycontrast.models.hrnet",
    "raycontrast.models.pretrained",
    "raycontrast.data.info",
    "raycontrast.data.loader",
    "raycontrast.metrics",
    "raycontrast.engine",
    "raycontrast.sampling",
    "raycontrast.session",
    "raycontrast.build",
    "raycontrast.loop",
    "raycontrast.checkpoint",
    "raycontrast.results",
    "raycontrast.plots",
    "raycontrast.analyze",
    "raycontrast.inference",
    "raycontrast.evaluation",
    "raycontrast.predict",
    "raycontrast.preflight",
    "raycontrast.cli",
]


def test_core_modules_never_import_ray() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(leaked[:5]); sys.exit(1 if leaked else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray was imported by the core: {out.stdout}{out.stderr}"


def test_config_and_dataset_facts_import_without_torch() -> None:
    """The CLI validates a config before anything heavy loads: config and dataset facts are torch-free."""
    code = (
        "import sys, raycontrast.config, raycontrast.data.info\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"torch was imported: {out.stdout}{out.stderr}"


def test_no_import_cycles_in_the_package() -> None:
    """Module-level imports between raycontrast modules form no cycle (e.g. data.canvases <-> data.loader)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "raycontrast"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        mod = ".".join(("raycontrast", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        deps = graph.setdefault(mod, set())
        for node in ast.parse(
            path.read_text()
        ).body:  # top level only: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raycontrast"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("raycontrast"))
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*trail, m, d])}"
            if d in graph and d not in state:
                visit(d, [*trail, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
