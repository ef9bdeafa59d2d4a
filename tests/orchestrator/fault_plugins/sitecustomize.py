"""Test-only. Put this folder on PYTHONPATH of a fault test's child process and every Python process of
that run, its Ray workers included, loads `grnn_fault_plugin` right after it imports `grnn_engine`.

Why a post-import hook: Ray workers only know the plugins registered while `grnn_engine` is imported,
and the tests must not register anything in the pytest process (contract tests parametrise over the
registries). Processes that never import grnn_engine (Ray's own helpers) pay nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


class _AfterGrnnEngine:
    """A meta-path finder that only wraps the loader of `grnn_engine`, once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != "grnn_engine":
            return None
        sys.meta_path.remove(self)  # the real finders locate the package (editable install or PYTHONPATH)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            import grnn_fault_plugin  # noqa: F401  (registers the test attack, wraps run_trial)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _AfterGrnnEngine())
