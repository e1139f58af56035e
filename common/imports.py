"""User code named by import path ('package.module:function'): how a user's model, data and loss
reach every process that needs them (a path travels to a spawned or remote process where an
object cannot)."""
from __future__ import annotations

import importlib
from typing import Any


class ImportPathError(ValueError):
    """The path does not lead to an object; the message says where it stopped."""


def is_import_path(text: str) -> bool:
    """'package.module:name' (dotted names on both sides of one colon)."""
    module, _, name = text.partition(":")
    return bool(module) and bool(name) and all(part.isidentifier() for part in [*module.split("."), *name.split(".")])


def import_object(path: str) -> Any:
    """The object at 'package.module:name' (the name may be dotted: 'module:Class.method')."""
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportPathError(f"cannot import {module_name} ({exc}); it must be importable in every "
                              f"process that uses it (installed, or on PYTHONPATH)") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportPathError(f"{module_name} has no {attr}") from None
    return obj
