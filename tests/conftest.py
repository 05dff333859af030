"""Fixtures shared by the whole suite.

- ``moto_server`` / ``moto_client``: one moto S3 server (server mode, a free local port) and a
  boto3 client of it, for the session, started only when a test needs them.
- ``backend``: a started, empty store of each type: ``memory`` and ``local`` new for each test,
  ``s3`` one ``S3Backend`` for the session over a bucket that moto empties after each test.
  Every test that takes it runs once per type: this is what makes
  ``tests/backends/test_conformance.py`` one suite for all backends.
- ``seed``: stores many objects in ``backend`` the fastest way its type allows, for tests about
  what happens *after* the writes (listings, prefix deletes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
import pytest_asyncio

from backends.base import Backend
from tests.backends.helpers import started

if TYPE_CHECKING:
    from tests.support.moto import MotoServer

BACKEND_TYPES: Final = ("memory", "local", "s3")
S3_BUCKET: Final = "conformance"

Seeder = Callable[[Mapping[str, bytes]], Awaitable[None]]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A moto S3 server for the session (reset after each test that used a bucket)."""
    from tests.support.moto import MotoServer

    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_client(moto_server: MotoServer) -> Iterator[Any]:
    """A boto3 S3 client of the session's moto server (thread-safe; creating one is slow)."""
    from tests.support.moto import s3_client

    assert moto_server.endpoint is not None
    client = s3_client(moto_server.endpoint)
    try:
        yield client
    finally:
        client.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shared_s3_backend(moto_server: MotoServer, moto_client: Any) -> AsyncIterator[Backend]:
    """One started ``S3Backend`` for the session, on the bucket ``S3_BUCKET``.

    Starting an ``S3Backend`` (its client, its first requests) takes a good part of a second;
    a new one per test made the S3 third of the suite mostly start-ups. ``backend`` empties the
    store after each test instead.
    """
    from backends.s3 import S3Backend
    from tests.support.moto import ACCESS_KEY, REGION, SECRET_KEY

    moto_client.create_bucket(Bucket=S3_BUCKET)
    store = S3Backend(
        S3_BUCKET,
        endpoint=moto_server.endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        force_path_style=True,
    )
    async with started(store):
        yield store


@pytest.fixture(params=BACKEND_TYPES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """A started backend of each type, empty when the test begins.

    Async fixtures behind it run in the session's event loop (the S3 backend is shared): a
    module that uses it marks its tests ``pytest.mark.asyncio(loop_scope="session")``.
    """
    store: Backend = request.getfixturevalue(f"{request.param}_backend")
    return store


@pytest_asyncio.fixture(loop_scope="session")
async def memory_backend() -> AsyncIterator[Backend]:
    """A new, started ``MemoryBackend``."""
    from backends.memory import MemoryBackend

    store = MemoryBackend()
    async with started(store):
        yield store


@pytest_asyncio.fixture(loop_scope="session")
async def local_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    """A new, started ``LocalBackend`` in the test's temporary directory."""
    from backends.local import LocalBackend

    store = LocalBackend(tmp_path / "store")
    async with started(store):
        yield store


@pytest.fixture
def s3_backend(
    shared_s3_backend: Backend, moto_server: MotoServer, moto_client: Any
) -> Iterator[Backend]:
    """The session's ``S3Backend``, over an empty bucket."""
    try:
        yield shared_s3_backend
    finally:
        # Every bucket and object goes (moto keeps them in memory); the bucket comes back.
        moto_server.reset()
        moto_client.create_bucket(Bucket=S3_BUCKET)


@pytest.fixture
def seed(backend: Backend, request: pytest.FixtureRequest) -> Seeder:
    """Return a function that stores ``{key: bytes}`` in ``backend``.

    On S3 it puts the objects with boto3 from a few threads: through ``S3Backend.write`` each
    object costs several requests, and moto serves a few hundred a second, so a test about
    listing 1,500 keys would mostly measure the writes. Elsewhere it calls ``backend.write``.
    """
    if backend.protocol == "s3":
        client = request.getfixturevalue("moto_client")
        bucket: str = getattr(backend, "bucket")  # noqa: B009 (S3Backend only)

        async def seed_s3(objects: Mapping[str, bytes]) -> None:
            def put_all() -> None:
                with ThreadPoolExecutor(8) as pool:
                    for _ in pool.map(
                        lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]),
                        objects.items(),
                    ):
                        pass

            await asyncio.to_thread(put_all)

        return seed_s3

    async def seed_any(objects: Mapping[str, bytes]) -> None:
        from tests.backends.helpers import put

        gate = asyncio.Semaphore(64)

        async def write(key: str, data: bytes) -> None:
            async with gate:
                await put(backend, key, data)

        await asyncio.gather(*(write(key, data) for key, data in objects.items()))

    return seed_any
