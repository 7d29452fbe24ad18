"""Plug-ins named in configs as "package.module:function" (judges, pair taggers)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from rlhf.errors import ConfigError


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


def reward_function(spec: str, key: str) -> Callable:
    """A reward function named in ppo.reward.terms: importable and callable as f(prompt, response); else a ConfigError
    naming `key`."""
    try:
        fn = import_callable(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (a source is rm or 'package.module:function')") from None
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError as e:
        raise ConfigError(f"{key}: {spec} cannot be called as f(prompt, response): {e}") from None
    except ValueError:  # no signature to read (some builtins): the first call will tell
        pass
    return fn
