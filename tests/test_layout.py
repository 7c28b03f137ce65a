"""The package's layout, read from the source (fast, nothing imported): the library
(``sdn_dist`` minus ``sdn_dist/apps/``) never imports the applications, and no module imports
another module's private name (one leading underscore)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdn_dist"
APPS = "sdn_dist.apps"


def _module(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package_dir: Path = PACKAGE):
    """(line, imported module, [names]) of every import in the file, at any depth (a lazy import
    inside a function counts); relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module = _module(path, package_dir)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base, [a.name for a in node.names]


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _is_app(module: str) -> bool:
    return module == APPS or module.startswith(APPS + ".")


def test_the_library_never_imports_the_applications():
    """Caught: ``from sdn_dist.apps.synth.dataset import make_synth`` in any library module (e.g.
    data/convert.py), lazy or not."""
    found = []
    for path in _sources():
        module = _module(path)
        if _is_app(module) or module == "sdn_dist.cli":   # the CLI dispatches to the applications
            continue
        for line, imported, names in _imports(path):
            targets = [imported] + [f"{imported}.{n}" for n in names]
            if any(_is_app(t) for t in targets):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {imported}")
    assert not found, "the library imports an application:\n" + "\n".join(found)


def test_no_private_name_is_imported_across_modules():
    """Caught: ``from sdn_dist.training.loop import _digest`` (apps/bench/peer.py before), or
    ``_TAR_EXTS`` from data/shards.py in data/index.py. Other packages' private names (pytorch_fid's
    ``_inception_v3``) are theirs to keep stable, not this rule's."""
    found = []
    for path in _sources():
        for line, imported, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and imported.startswith("sdn_dist") and imported != _module(path):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {imported}")
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_checks_read_lazy_and_relative_imports(tmp_path):
    """The reader the checks stand on sees an import inside a function and resolves a relative one."""
    pkg = tmp_path / "sdn_dist" / "data"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from ..apps.synth import dataset\n    from .shards import _filesystem\n")
    got = list(_imports(f, tmp_path / "sdn_dist"))
    assert got == [(2, "sdn_dist.apps.synth", ["dataset"]), (3, "sdn_dist.data.shards", ["_filesystem"])]
