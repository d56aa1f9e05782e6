"""User code plugged in by import path (``package.module:factory``): models and ASR engines."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from streamproc.errors import UserError


def import_factory(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``spec`` names (``package.module:attr``, ``attr`` may be dotted), or a
    UserError naming ``what`` it was for and what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj
