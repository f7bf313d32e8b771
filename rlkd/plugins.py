"""Resolve a user's plugin spec (a reward, an environment) to the object it names.

A spec is a registry name, `pkg.module:attr` or `path/to/file.py:attr`. Every failure is an
InputError with one line that names the spec and what is wrong, raised before any actor starts.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path

from rlkd.console import one_line
from rlkd.errors import InputError


def resolve(spec: str, kind: str, registry: dict[str, object]) -> object:
    """The object `spec` names; `kind` ("reward", "environment") starts each error line."""
    if spec in registry:
        return registry[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, registry, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise InputError(f"{kind} '{spec}': unknown name (built-ins: {', '.join(registry)}; "
                         f"or use 'pkg.module:{_attr(kind)}' / 'path/to/file.py:{_attr(kind)}'){hint}")
    where, _, attr = spec.rpartition(":")
    module = _load_file(spec, kind, where) if where.endswith(".py") else _import(spec, kind, where)
    if not hasattr(module, attr):
        raise InputError(f"{kind} '{spec}': '{where}' has no attribute '{attr}'")
    return getattr(module, attr)


def _attr(kind: str) -> str:
    return "fn" if kind == "reward" else "Class"


def _import(spec: str, kind: str, name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise InputError(f"{kind} '{spec}': cannot import '{name}': {one_line(e)}") from e


def _load_file(spec: str, kind: str, path: str):
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{kind} '{spec}': file not found: {file.resolve()}")
    # A private module name per path, so two files both called rewards.py don't collide.
    module_spec = importlib.util.spec_from_file_location(f"_rlkd_{kind}_{abs(hash(file.resolve()))}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise InputError(f"{kind} '{spec}': error loading {file}: {one_line(e)}") from e
    return module

