"""The storage types the configuration's ``storage.type`` can name, imported only when chosen.

As fsspec's ``registry.py``: a table of ``"module:ClassName"`` strings, so that choosing
``local`` never imports s3fs, and an import failure says which extra to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .base import Backend

BACKENDS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "local": "backends.local:LocalBackend",
        "memory": "backends.memory:MemoryBackend",
        "s3": "backends.s3:S3Backend",
    }
)

# The distribution packages a backend needs beyond the core, named in the import error.
_EXTRAS: Final[Mapping[str, str]] = MappingProxyType({"s3": "s3fs"})

_DISTRIBUTION: Final = "tenant-storage-gateway"


def backend_class(name: str) -> type[Backend]:
    """Given a ``storage.type``, return its backend class, importing its module now.

    Raises
    ------
    ValueError
        ``name`` is not a known storage type.
    ImportError
        The backend's module, or a package it needs, cannot be imported.
    """
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"storage.type: unknown storage type {name!r}; "
            f"expected one of {', '.join(sorted(BACKENDS))}"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if name in _EXTRAS:
            hint = (
                f"; it needs {_EXTRAS[name]}: pip install '{_DISTRIBUTION}[{name}]'"
                f" (or pip install {_EXTRAS[name]})"
            )
        message = f"storage.type: the {name} storage cannot be imported ({exc}){hint}"
        raise ImportError(message) from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a Backend")
    return cls
