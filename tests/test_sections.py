"""Each component gets its own config section, not the whole tree (fast, reads the source).

The whole ``Config`` is taken only where components are put together: the CLI and the
applications, the driver and its preflight (which checks the whole tree before Ray starts), the
worker's wiring in ``training/loop.py``, and the two places that record the whole run (``config.py``
itself, the export's ``config.json``). Everything else takes the sections (or values) it reads.
"""

import ast
from pathlib import Path

import sdn_dist

PACKAGE = Path(sdn_dist.__file__).parent

# module path (relative to the package) -> functions that may take the tree; "*" = every one
ROOTS = {
    "cli.py": "*",
    "config.py": "*",
    "training/driver.py": "*",
    "training/preflight.py": "*",
    "training/loop.py": {"train_worker", "resume", "next_stage", "finish", "build_engine", "deepspeed_config",
                         "_world_size", "with_resolved_autocast"},
    "training/export.py": {"export_student"},
}
APPLICATIONS = ("apps/",)


def takes_the_tree(arg: ast.arg) -> bool:
    """A parameter annotated ``Config``, or called ``cfg`` with no section type to say otherwise."""
    ann = ast.unparse(arg.annotation).strip("'\"") if arg.annotation else ""
    return ann == "Config" or (arg.arg == "cfg" and not ann)


def tree_takers(source: str) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            if any(takes_the_tree(a) for a in args.posonlyargs + args.args + args.kwonlyargs):
                found.append((node.name, node.lineno))
    return found


def test_only_the_wiring_takes_the_whole_config():
    """Fails on: any library function outside ROOTS given ``cfg: Config`` (e.g. ``student_state_dict(engine,
    cfg: Config)`` back, or ``SampleGrid(cfg, ...)``)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(APPLICATIONS):
            continue
        allowed = ROOTS.get(rel, set())
        for name, line in tree_takers(path.read_text()):
            if allowed != "*" and name not in allowed:
                offenders.append(f"sdn_dist/{rel}:{line} {name}")
    assert not offenders, "take a config section, not the whole Config: " + ", ".join(offenders)


def test_the_check_sees_both_spellings():
    assert tree_takers("def f(engine, cfg: Config): pass") == [("f", 1)]
    assert tree_takers("def f(engine, cfg): pass") == [("f", 1)]
    assert tree_takers("def f(engine, cfg: 'Config'): pass") == [("f", 1)]
    assert tree_takers("def f(engine, cfg: CheckpointConfig): pass") == []
    assert tree_takers("def f(engine, data: DataConfig): pass") == []
