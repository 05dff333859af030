"""The registry of storage types: lazy imports, and errors that name what to fix."""

from __future__ import annotations

import sys

import pytest

from backends.base import Backend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from backends.registry import BACKENDS, backend_class


def test_every_storage_type_names_a_backend_with_that_protocol() -> None:
    assert set(BACKENDS) == {"local", "memory", "s3"}
    for name in BACKENDS:
        cls = backend_class(name)
        assert issubclass(cls, Backend)
        assert cls.protocol == name
    assert backend_class("local") is LocalBackend
    assert backend_class("memory") is MemoryBackend


def test_unknown_storage_type_raises_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError) as raised:
        backend_class("ftp")
    assert str(raised.value) == (
        "storage.type: unknown storage type 'ftp'; expected one of local, memory, s3"
    )


def test_missing_dependency_raises_import_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "backends.s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(ImportError) as raised:
        backend_class("s3")
    message = str(raised.value)
    assert message.startswith("storage.type: the s3 storage cannot be imported")
    assert "s3fs" in message
    assert "pip install" in message


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        BACKENDS["ftp"] = "x:Y"  # type: ignore[index]
