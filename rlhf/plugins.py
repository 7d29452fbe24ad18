"""Plug-ins named in configs as "package.module:function" (judges, pair taggers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_callable(spec: str) -> Callable:
    """"pkg.mod:name" -> the callable; a clear error when it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"plug-in {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"plug-in {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"plug-in {spec!r} is not callable")
    return fn
