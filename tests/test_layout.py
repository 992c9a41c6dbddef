"""The package's architecture: model families live in mobileformer.models, nothing outside it but
the package's entry point imports a family, no module-level import cycle, and the module paths
of earlier releases still import."""
from __future__ import annotations

import ast
import glob
import importlib
import os
from typing import Dict, Set

import mobileformer
from mobileformer.models import FAMILIES, SHARED

PACKAGE = os.path.dirname(mobileformer.__file__)


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len('.py')].replace(os.sep, '.')
    return relative[:-len('.__init__')] if relative.endswith('.__init__') else relative


def _resolve(module: str, name: str) -> str:
    """`module.name` when `from module import name` imports a submodule, else `module`."""
    base = os.path.join(PACKAGE, *f'{module}.{name}'.split('.')[1:])
    return f'{module}.{name}' if os.path.exists(base + '.py') or os.path.exists(os.path.join(base, '__init__.py')) else module


class _ModuleLevelImports(ast.NodeVisitor):
    """The mobileformer modules a file imports when it is loaded (imports inside functions run later)."""

    def __init__(self) -> None:
        self.found: Set[str] = set()

    def visit_FunctionDef(self, node: ast.AST) -> None:
        pass

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names if alias.name.startswith('mobileformer'))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or '').startswith('mobileformer'):
            self.found.update(_resolve(node.module, alias.name) for alias in node.names)


def _module_level_imports(path: str) -> Set[str]:
    with open(path, encoding='utf-8') as f:
        visitor = _ModuleLevelImports()
        visitor.visit(ast.parse(f.read()))
    return visitor.found


def _graph() -> Dict[str, Set[str]]:
    return {_module_name(path): _module_level_imports(path)
            for path in glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True)}


def test_only_the_package_entry_point_imports_a_model_family():
    families = {f'mobileformer.models.{name}' for name in FAMILIES}
    offenders = {module: sorted(imports & families) for module, imports in _graph().items()
                 if imports & families and module != 'mobileformer' and module not in families}
    assert not offenders


def test_shared_model_modules_import_no_family():
    graph = _graph()
    for name in SHARED:
        assert not graph[f'mobileformer.models.{name}'] & {f'mobileformer.models.{f}' for f in FAMILIES}


def test_no_module_level_import_cycle():
    graph, done, path = _graph(), set(), []

    def visit(module: str) -> None:
        assert module not in path, ' -> '.join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported != 'mobileformer':  # every module loads the package first; it is the root
                visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_module_paths_of_earlier_releases_are_the_moved_modules():
    for name in FAMILIES + SHARED:
        assert importlib.import_module(f'mobileformer.{name}') is importlib.import_module(f'mobileformer.models.{name}')
    from mobileformer.mobile_former import MobileFormer  # the README's import before the move
    from mobileformer.models.mobile_former import MobileFormer as moved
    assert MobileFormer is moved
