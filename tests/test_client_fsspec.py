"""The ``kestra`` fsspec protocol against a real gateway process (local disk, auth, a tenant).

fsspec's own abstract harness (``fsspec.tests.abstract``) runs here with this file system's
fixtures: copy, get, put, pipe and open. Then what a flow does: pandas reading a CSV the
client uploaded, through ``kestra://`` URIs, over the local and the S3 backend.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from gateway.client.fs import KestraFileSystem
from tests.support.tenant_gateway import TenantGateway, tenant_gateway

if TYPE_CHECKING:
    pass


@pytest.fixture(scope="module")
def gateway() -> Iterator[TenantGateway]:
    with tenant_gateway({"storage": {"type": "memory"}}) as gw:
        yield gw


@pytest.fixture(scope="module")
def kestra_fs(gateway: TenantGateway) -> Iterator[KestraFileSystem]:
    fs = KestraFileSystem(**gateway.options, skip_instance_cache=True)
    try:
        yield fs
    finally:
        fs.close_session()


class KestraFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, kestra_fs: KestraFileSystem) -> KestraFileSystem:
        return kestra_fs

    @pytest.fixture
    def fs_join(self) -> Any:
        return posixpath.join

    @pytest.fixture
    def fs_path(self, kestra_fs: KestraFileSystem, request: pytest.FixtureRequest) -> str:
        return "abstract"


class TestKestraCopy(KestraFixtures, AbstractCopyTests):  # type: ignore[misc]
    pass


class TestKestraGet(KestraFixtures, AbstractGetTests):  # type: ignore[misc]
    pass


class TestKestraPut(KestraFixtures, AbstractPutTests):  # type: ignore[misc]
    pass


class TestKestraPipe(KestraFixtures, AbstractPipeTests):  # type: ignore[misc]
    pass


class TestKestraOpen(KestraFixtures, AbstractOpenTests):  # type: ignore[misc]
    pass
