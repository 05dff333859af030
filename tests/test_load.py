"""The real gateway process under concurrency and load.

- Concurrent overwrites: 64 PUTs of different bodies to one key while GETs loop on it. The
  final object is exactly one of the 64 bodies, whole, and every GET that answered 200 got one
  whole body (the first one or one of the 64), never a mix or a truncation. On local disk and
  on S3 (moto, smaller bodies).
- Load: ``CLIENTS`` clients, each with its own connection, run mixed PUT/GET/LIST/DELETE over
  several tenants for ``LOAD_SECONDS``. Each client owns its keys, so the status of every
  operation is known in advance; anything else is an error, and there must be none. The
  gateway's peak RSS and open file descriptors (sampled every 100 ms) stay within bounds, and
  the descriptors come back near the baseline once the clients are gone.

Observed figures (ops/s, peak RSS, fds) are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import psutil
import pytest

from tests.support.gateway_process import GatewayProcess

if TYPE_CHECKING:
    from tests.support.moto import MotoServer

pytestmark = pytest.mark.slow

WRITERS: Final = 64
READERS: Final = 16
KEY: Final = "ns/flow/executions/e1/out.bin"

LOAD_SECONDS: Final = 30.0  # the issue asks for 30 s
CLIENTS: Final = 200
TENANTS: Final = ("t1", "t2", "t3", "t4")
KEYS_PER_CLIENT: Final = 4
MAX_RSS: Final = 300 * 1024 * 1024
# Open descriptors: each connection holds a socket, and while it writes to local disk a
# temporary file and a directory or two (opened one segment at a time, O_NOFOLLOW), plus the
# audit log's own writes; nothing may grow with the number of requests served.
# A download from local disk holds the socket, the file and a duplicate of each (sendfile
# runs in a worker thread on duplicates, so a closed connection's number cannot be reused
# under it); an upload holds the socket, its temporary file and a directory or two.
SOCKETS_PER_CLIENT: Final = 2
FD_PER_CLIENT: Final = 4
FD_HEADROOM: Final = 50
SOCKET_HEADROOM: Final = 10  # the listening socket, the registry's, the log's
FD_SETTLE: Final = 2  # how far above the baseline the count may stay once the clients left
SAMPLE_EVERY: Final = 0.1
TIMEOUT: Final = aiohttp.ClientTimeout(total=60)
# A GET whose body stops arriving for this long is stuck (an answer that promised bytes
# and never sent them), not slow.
READ_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_read=10)


def _bodies(count: int, low: int, high: int, seed: int) -> list[bytes]:
    """Return ``count`` random bodies of ``low``..``high`` bytes, each with its own sha256."""
    rng = random.Random(seed)
    bodies = [rng.randbytes(rng.randint(low, high)) for _ in range(count)]
    assert len({hashlib.sha256(b).digest() for b in bodies}) == count
    return bodies


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """Stream ``data`` in pieces (chunked encoding), yielding to the loop between them so the
    uploads really overlap on the server."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def _overwrite_race(
    url: str, bodies: list[bytes], initial: bytes, other_statuses: frozenset[int] = frozenset()
) -> dict[str | int, int]:
    """PUT ``initial``, then every body of ``bodies`` at once to one key while readers GET it.

    Return counts of what the readers saw; fail on any GET that is not one whole body, or
    that answers a status other than 200 and ``other_statuses``.
    """
    file_url = f"{url}/api/v1/files/{KEY}"
    known = {hashlib.sha256(b).hexdigest(): i for i, b in enumerate(bodies)}
    initial_digest = hashlib.sha256(initial).hexdigest()
    seen: dict[str | int, int] = {"initial": 0, "new": 0}
    problems: list[str] = []
    done = asyncio.Event()

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        async with session.put(file_url, data=initial) as response:
            assert response.status == 201, await response.text()

        async def write(body: bytes) -> None:
            async with session.put(file_url, data=_chunks(body)) as response:
                text = await response.text()
                if response.status != 201:
                    problems.append(f"PUT answered {response.status}: {text}")

        async def read() -> None:
            while not done.is_set():
                status, length = 0, None
                try:
                    async with session.get(file_url, timeout=READ_TIMEOUT) as response:
                        status, length = response.status, response.headers.get("Content-Length")
                        data = await response.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    problems.append(f"GET {status} (Content-Length {length}): {exc!r}")
                    return  # this connection is stuck or gone
                if status != 200:
                    seen[status] = seen.get(status, 0) + 1
                    if status not in other_statuses:
                        problems.append(f"GET answered {status}: {data[:200]!r}")
                    continue
                if length is not None and int(length) != len(data):
                    problems.append(f"GET Content-Length {length} but {len(data)} bytes")
                digest = hashlib.sha256(data).hexdigest()
                if digest == initial_digest:
                    seen["initial"] += 1
                elif digest in known:
                    seen["new"] += 1
                else:
                    problems.append(f"GET returned {len(data)} bytes matching no body")

        readers = [asyncio.create_task(read()) for _ in range(READERS)]
        try:
            await asyncio.gather(*(write(body) for body in bodies))
        finally:
            done.set()
            await asyncio.gather(*readers)

        async with session.get(file_url) as response:
            assert response.status == 200
            final = await response.read()
    assert not problems, f"{len(problems)} problems, first ones: {problems[:5]}"
    assert hashlib.sha256(final).hexdigest() in known, "the final object is none of the 64"
    return seen


def test_concurrent_overwrites_local(tmp_path: Path) -> None:
    bodies = _bodies(WRITERS, 64 * 1024, 1024 * 1024, seed=1)
    initial = secrets.token_bytes(100_000)
    base = tmp_path / "data"
    config = {
        "storage": {"type": "local", "local": {"base-path": str(base)}},
        "auth": {"enabled": False},
    }
    with GatewayProcess(config) as gateway:
        assert gateway.url is not None
        started = time.monotonic()
        seen = asyncio.run(_overwrite_race(gateway.url, bodies, initial))
        elapsed = time.monotonic() - started
    print(f"\nlocal: 64 overwrites in {elapsed:.2f} s; GETs saw {seen}")
    # No temporary file is left behind by the 63 uploads that lost the race (the store's
    # checkpoint of the journal stays: backends.local.CHECKPOINT_NAME).
    tmp = base / ".gateway" / "tmp"
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and p != tmp / "checkpoint"]
    assert leftovers == []
    objects = [p for p in base.rglob("*") if p.is_file() and ".gateway" not in p.parts]
    assert [p.relative_to(base).as_posix() for p in objects] == [KEY]


def test_concurrent_overwrites_s3(moto_server: MotoServer) -> None:
    from tests.support.moto import ACCESS_KEY, REGION, SECRET_KEY, make_bucket

    assert moto_server.endpoint is not None
    bucket = f"load-{secrets.token_hex(6)}"
    make_bucket(moto_server.endpoint, bucket)
    bodies = _bodies(WRITERS, 16 * 1024, 256 * 1024, seed=2)
    initial = secrets.token_bytes(50_000)
    config = {
        "storage": {
            "type": "s3",
            "s3": {
                "bucket": bucket,
                "endpoint": moto_server.endpoint,
                "access-key": ACCESS_KEY,
                "secret-key": SECRET_KEY,
                "region": REGION,
                "force-path-style": True,
            },
        },
        "auth": {"enabled": False},
    }
    with GatewayProcess(config) as gateway:
        assert gateway.url is not None
        started = time.monotonic()
        # A read that finds the object changed between S3's HEAD and GET may be refused
        # with 503 (retryable) before any byte is sent; never half an answer.
        seen = asyncio.run(_overwrite_race(gateway.url, bodies, initial, frozenset({503})))
        elapsed = time.monotonic() - started
    print(f"\ns3: 64 overwrites in {elapsed:.2f} s; GETs saw {seen}")


# -- load ---------------------------------------------------------------------------------


def _fd_kinds(pid: int) -> dict[str, int]:
    """Return the process's open descriptors by kind: socket, file, directory, other."""
    kinds = dict.fromkeys(("socket", "file", "directory", "other"), 0)
    base = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(base):
        try:
            target = os.readlink(base / entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("/"):
            kinds["directory" if os.path.isdir(target) else "file"] += 1
        else:
            kinds["other"] += 1
    return kinds


@dataclass
class Sampler:
    """Samples a process's RSS and open descriptors every ``SAMPLE_EVERY`` seconds."""

    pid: int
    peak_rss: int = 0
    peak_fds: int = 0
    peak_kinds: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int]:
        process = psutil.Process(self.pid)
        rss = process.memory_info().rss + sum(
            child.memory_info().rss for child in process.children(recursive=True)
        )
        kinds = _fd_kinds(self.pid)
        fds = sum(kinds.values())
        for kind, count in kinds.items():
            self.peak_kinds[kind] = max(self.peak_kinds.get(kind, 0), count)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_fds = max(self.peak_fds, fds)
        self.samples += 1
        return rss, fds

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            try:
                self.sample()
            except psutil.Error:
                return

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Tally:
    ops: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("PUT", "GET", "LIST", "DEL"), 0)
    )
    errors: list[str] = field(default_factory=list)


async def _client(url: str, index: int, deadline: float, tally: Tally) -> None:
    """One client with its own connection, over keys only it touches: the expected status of
    every request is exact."""
    rng = random.Random(index)
    tenant = TENANTS[index % len(TENANTS)]
    prefix = f"clients/c{index}"
    files = f"{url}/api/v1/{tenant}/files/{prefix}"
    listing = f"{url}/api/v1/{tenant}/list/{prefix}"
    stored: dict[str, bytes] = {}  # name -> body, as this client last left it

    def error(what: str) -> None:
        tally.errors.append(f"client {index} ({tenant}): {what}")

    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        # A permanent file, so the listing of the client's prefix always exists (200).
        async with session.put(f"{files}/keep", data=b"keep") as response:
            if response.status != 201:
                error(f"PUT keep: {response.status}")
        while time.monotonic() < deadline:
            name = f"k{rng.randrange(KEYS_PER_CLIENT)}"
            op = rng.choices(("PUT", "GET", "LIST", "DEL"), weights=(3, 4, 2, 1))[0]
            try:
                if op == "PUT":
                    body = rng.randbytes(rng.randint(1, 16 * 1024))
                    async with session.put(f"{files}/{name}", data=body) as response:
                        await response.read()
                        if response.status != 201:
                            error(f"PUT {name}: {response.status}")
                        stored[name] = body
                elif op == "GET":
                    async with session.get(f"{files}/{name}") as response:
                        data = await response.read()
                        expected = 200 if name in stored else 404
                        if response.status != expected:
                            error(f"GET {name}: {response.status}, expected {expected}")
                        elif expected == 200 and data != stored[name]:
                            error(f"GET {name}: {len(data)} bytes, not the stored body")
                elif op == "LIST":
                    async with session.get(listing) as response:
                        if response.status != 200:
                            error(f"LIST: {response.status}")
                        else:
                            entries = (await response.json())["entries"]
                            names = {e["fileName"]: e["size"] for e in entries}
                            want = {"keep": 4} | {n: len(b) for n, b in stored.items()}
                            if names != want:
                                error(f"LIST: {names}, expected {want}")
                else:
                    async with session.delete(f"{files}/{name}") as response:
                        await response.read()
                        expected = 204 if name in stored else 404
                        if response.status != expected:
                            error(f"DELETE {name}: {response.status}, expected {expected}")
                        stored.pop(name, None)
            except (TimeoutError, aiohttp.ClientError) as exc:
                error(f"{op} {name}: {type(exc).__name__}: {exc}")
            tally.ops[op] += 1


async def _load(url: str, seconds: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(_client(url, i, deadline, tally) for i in range(CLIENTS)))
    return tally


@pytest.fixture
def tenant_gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    config: dict[str, Any] = {
        "storage": {"type": "local", "local": {"base-path": str(tmp_path / "data")}},
        "tenants": {"enabled": True, "ids": list(TENANTS)},
        "auth": {"enabled": False},
    }
    with GatewayProcess(config) as gateway:
        yield gateway


def test_mixed_load(tenant_gateway: GatewayProcess) -> None:
    assert tenant_gateway.url is not None and tenant_gateway.process is not None
    sampler = Sampler(tenant_gateway.process.pid)
    baseline_rss, baseline_fds = sampler.sample()
    started = time.monotonic()
    with sampler:
        tally = asyncio.run(_load(tenant_gateway.url, LOAD_SECONDS))
        elapsed = time.monotonic() - started
    # Once the clients have closed their connections, the descriptors come back.
    settle_deadline = time.monotonic() + 10
    fd_bound = baseline_fds + FD_PER_CLIENT * CLIENTS + FD_HEADROOM
    _, after_fds = sampler.sample()
    while after_fds > baseline_fds + FD_SETTLE and time.monotonic() < settle_deadline:
        time.sleep(0.1)
        _, after_fds = sampler.sample()
    total = sum(tally.ops.values())
    print(
        f"\nload: {CLIENTS} clients, {elapsed:.1f} s, {total} ops = {total / elapsed:.0f} ops/s"
        f" {tally.ops}; errors {len(tally.errors)}"
        f"\nRSS: baseline {baseline_rss / 2**20:.1f} MiB, peak {sampler.peak_rss / 2**20:.1f} MiB"
        f" (bound {MAX_RSS / 2**20:.0f}); fds: baseline {baseline_fds},"
        f" peak {sampler.peak_fds} {sampler.peak_kinds} (bound {fd_bound}),"
        f" after {after_fds} {_fd_kinds(tenant_gateway.process.pid)};"
        f" {sampler.samples} samples"
    )
    dropped = tenant_gateway.log_text().count("a record was dropped")
    print(f"audit records dropped under load (logged warnings): {dropped}")
    assert tenant_gateway.alive(), tenant_gateway.log_text()[-4000:]
    assert not tally.errors, f"{len(tally.errors)} errors, first ones: {tally.errors[:10]}"
    assert total > CLIENTS, "the clients barely ran"
    assert sampler.samples >= LOAD_SECONDS / SAMPLE_EVERY / 2
    assert sampler.peak_rss <= MAX_RSS
    assert sampler.peak_kinds["socket"] <= SOCKETS_PER_CLIENT * CLIENTS + SOCKET_HEADROOM
    assert sampler.peak_fds <= fd_bound
    assert after_fds <= baseline_fds + FD_SETTLE
    assert "Traceback" not in tenant_gateway.log_text()
