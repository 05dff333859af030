"""Access-check benchmark: does authentication + authorization cost more with more tenants?

Run from the project root::

    python -m bench.access                              # 10 vs 10,000 tenants, memory backend
    python -m bench.access --tenants 10 10000 --requests 2000 --json out.json
    python -m bench.access --backend local              # registry documents on a temp dir

1. Setup, for each tenant count N (``--tenants``; the smallest and the largest are compared),
   timed apart from the measures. An app from ``gateway.app.create_app`` with auth on, over a
   new memory backend (or a local one in a temporary directory), served by aiohttp's
   ``TestServer`` on 127.0.0.1, which starts the backend and the app's ``Registry``; that
   registry's background refresh is then stopped (its snapshot shows its own writes at once
   and keeps serving). Through it, N tenants (``Registry.create_tenant``, ``--batch`` at a
   time). Then, per tenant, a filler service account with one token and one VIEWER binding
   on that tenant, so the account, token and binding tables grow with N too: written through
   one more ``Registry`` per ``--shard`` tenants (one registry costs O(N²) for N writes), then
   read back by the app's registry with ``load_full()``. Last, the measured identities, both
   EDITOR on the middle tenant: the service account ``bench`` with a token, and the user
   ``bench-user`` with a password.
2. The registry's own costs at N (not per request, but on the event loop): one more grant
   through the app's registry; a second registry over the same storage (a replica) starting
   cold; that replica's ``refresh()`` with nothing new (median of 5) and after one binding
   changed; the first Basic verification (scrypt, before it is cached).
3. In process: ``await gateway.access.identify`` (a mocked request carrying
   ``Authorization``) then ``gateway.access.authorize`` against ``registry.snapshot`` for
   ``read`` on the tenant, in batches of 1,000, ``--iterations`` per N and scheme; the median
   of the batches' ns per check. Bearer (the token), and Basic once its verification is
   cached.
4. End to end: ``GET /api/v1/<tenant>/stats`` with the Bearer token, ``--requests`` per N, one
   after the other over one keep-alive ``aiohttp`` session per N: requests/s, median and 99th
   percentile latency (client and server share this process and its event loop).

Every N's app stays up while 3 and 4 run, and the batches (and chunks of 100 requests)
alternate between the Ns: load from elsewhere on the machine then weighs on every N alike
instead of on whichever ran at the time. The price: all Ns share one heap, so this cannot
show a garbage collector slowed by a larger heap; and with the background refreshes stopped,
4 is the request path alone (what a refresh takes is the rows of 2).

The table shows each measure for each N and the ratio largest N / smallest N. Exit status: 0;
1 if an in-process ratio (Bearer or Basic) exceeds ``--max-ratio`` (default 1.5); 2 if the
benchmark itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from backends.base import Backend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from gateway import config as gateway_config
from gateway.access import authorize, identify
from gateway.app import create_app
from gateway.errors import Forbidden
from gateway.keys import Scope, tenant_scope
from gateway.registry import Registry
from gateway.state import REGISTRY

T = TypeVar("T")

ACCOUNT: Final = "bench"
USER: Final = "bench-user"
PASSWORD: Final = "bench-user-password"
ADMIN_PASSWORD: Final = "bench-admin-password"
CHECK_BATCH: Final = 1000
REQUEST_CHUNK: Final = 100
WARM_UP_REQUESTS: Final = 100


class BenchError(Exception):
    """The benchmark could not measure what it meant to (not a slow result)."""


@dataclass
class Run:
    """What was measured for one tenant count."""

    tenants: int
    service_accounts: int = 0
    tokens: int = 0
    bindings: int = 0
    writes: int = 0
    create_tenants_s: float = 0.0
    create_identities_s: float = 0.0
    load_full_s: float = 0.0
    grant_ms: float = 0.0
    cold_start_s: float = 0.0
    replica_idle_refresh_ms: float = 0.0
    replica_grant_refresh_ms: float = 0.0
    basic_first_ms: float = 0.0
    bearer_check_ns: float = 0.0
    basic_check_ns: float = 0.0
    e2e_requests: int = 0
    e2e_rps: float = 0.0
    e2e_median_us: float = 0.0
    e2e_p99_us: float = 0.0


@dataclass
class Result:
    backend: str
    iterations: int
    requests: int
    max_ratio: float
    runs: list[Run] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    error: str | None = None


# (label, Run attribute, unit) of each row of the table; every ratio is largest N / smallest N.
ROWS: Final = (
    ("create N tenants", "create_tenants_s", "s"),
    ("create accounts, tokens, bindings", "create_identities_s", "s"),
    ("registry writes", "writes", ""),
    ("app's registry: load_full()", "load_full_s", "s"),
    ("app's registry: one more grant", "grant_ms", "ms"),
    ("cold Registry.start() (a replica)", "cold_start_s", "s"),
    ("replica refresh, nothing new", "replica_idle_refresh_ms", "ms"),
    ("replica refresh, 1 binding changed", "replica_grant_refresh_ms", "ms"),
    ("Basic, first verification", "basic_first_ms", "ms"),
    ("in-process Bearer identify+authorize", "bearer_check_ns", "ns"),
    ("in-process Basic (cached) id+authz", "basic_check_ns", "ns"),
    ("e2e GET stats, requests/s", "e2e_rps", "/s"),
    ("e2e median latency", "e2e_median_us", "us"),
    ("e2e p99 latency", "e2e_p99_us", "us"),
)
CHECKED: Final = ("bearer_check_ns", "basic_check_ns")


@dataclass
class Setup:
    """One N's running app and what its measures need."""

    run: Run
    server: TestServer
    registry: Registry
    target: str
    token: str
    bearer: web.Request
    basic: web.Request
    scope: Scope
    bearer_ns: list[float] = field(default_factory=list)
    basic_ns: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0


async def in_batches(items: Iterable[T], batch: int, make: Callable[[T], Awaitable[Any]]) -> int:
    """Await ``make(item)`` for every item, ``batch`` at a time; return how many there were."""
    pending: list[T] = []
    count = 0
    for item in items:
        pending.append(item)
        if len(pending) == batch:
            await asyncio.gather(*(make(i) for i in pending))
            count, pending = count + len(pending), []
    if pending:
        await asyncio.gather(*(make(i) for i in pending))
        count += len(pending)
    return count


def tenant_ids(n: int) -> list[str]:
    width = max(5, len(str(n)))
    return [f"t{i:0{width}d}" for i in range(n)]


async def populate(
    registry: Registry, backend: Backend, ids: list[str], args: argparse.Namespace, run: Run
) -> str:
    """Create the tenants, the filler and the measured identities; return the target tenant.

    The tenants go through ``registry`` (the app's). The filler goes through one more
    ``Registry`` per ``args.shard`` tenants, over the same backend: a registry copies the map
    an entity belongs to on every write (and re-sorts every binding on every grant), so N
    writes through one registry cost O(N²), and at 10,000 tenants minutes. ``registry`` then
    reads everything back with ``load_full``.
    """
    started = time.perf_counter()
    run.writes += await in_batches(ids, args.batch, lambda t: registry.create_tenant(t, t))
    run.create_tenants_s = time.perf_counter() - started

    async def fill(writer: Registry, tenants: list[str]) -> None:
        for tenant in tenants:
            name = f"sa-{tenant}"
            await writer.create_service_account(name, "filler")
            await writer.create_token(name, description="filler")
            await writer.grant(tenant, "service-account", name, "VIEWER")

    started = time.perf_counter()
    shard = args.shard or len(ids)
    chunks = [ids[i : i + shard] for i in range(0, len(ids), shard)]
    writers = [registry] if args.shard == 0 else [Registry(backend) for _ in chunks]
    await asyncio.gather(*(fill(w, c) for w, c in zip(writers, chunks, strict=True)))
    target = ids[len(ids) // 2]
    await registry.create_service_account(ACCOUNT, "measured")
    await registry.grant(target, "service-account", ACCOUNT, "EDITOR")
    await registry.create_user(USER, PASSWORD)
    await registry.grant(target, "user", USER, "EDITOR")
    run.create_identities_s = time.perf_counter() - started
    run.service_accounts = len(ids) + 1
    run.tokens = len(ids)
    run.bindings = len(ids) + 2
    run.writes += 3 * len(ids) + 4
    if args.shard:
        started = time.perf_counter()
        await registry.load_full()
        run.load_full_s = time.perf_counter() - started
    return target


def check_snapshot(registry: Registry, run: Run, target: str, token: str) -> None:
    """Raise unless the registry's snapshot holds every tenant, token and binding written."""
    snapshot = registry.snapshot
    if not (
        len(snapshot.tenants) == run.tenants
        and len(snapshot.tokens) == run.tokens
        and len(snapshot.service_accounts) == run.service_accounts
        and snapshot.role(target, "service-account", ACCOUNT) == "EDITOR"
        and snapshot.role(target, "user", USER) == "EDITOR"
        and registry.verify_token(token) is not None
    ):
        raise BenchError(
            f"the snapshot shows {len(snapshot.tenants)} of {run.tenants} tenants, "
            f"{len(snapshot.tokens)} of {run.tokens} tokens, or misses a binding"
        )


def mocked(app: web.Application, tenant: str, authorization: str) -> web.Request:
    """A request of ``app`` (its configuration, and the guard of its password checks)."""
    return make_mocked_request(
        "GET", f"/api/v1/{tenant}/stats", headers={"Authorization": authorization}, app=app
    )


async def set_up(
    n: int, args: argparse.Namespace, workdir: Path, stack: contextlib.AsyncExitStack
) -> Setup:
    """Start an app for N tenants, fill its registry, and check the measured identities."""
    run = Run(tenants=n)
    base = workdir / f"n{n}"
    (base / "data").mkdir(parents=True)
    backend: Backend = LocalBackend(base / "data") if args.backend == "local" else MemoryBackend()
    config = gateway_config.check(
        {
            "storage.type": args.backend,
            "storage.local.base-path": str(base / "data"),
            "tenants.enabled": True,
            "auth.enabled": True,
            "auth.cache-seconds": 1.0,
            "admin.username": "admin",
            "admin.password": ADMIN_PASSWORD,
            "admin.password-file": str(base / "admin-password.txt"),
        }
    )
    app = create_app(config, backend)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # starts the backend, then the registry
    stack.push_async_callback(server.close)  # closes the registry, then the backend
    registry = app[REGISTRY]
    # Its background refresh stops (its snapshot shows its own writes at once, and keeps
    # serving): what a refresh costs is measured apart, on a second registry, below.
    await registry.close()
    ids = tenant_ids(n)
    target = await populate(registry, backend, ids, args, run)
    _, token = await registry.create_token(ACCOUNT, description="measured")
    run.tokens += 1
    run.writes += 1
    check_snapshot(registry, run, target, token)

    replica = Registry(backend, refresh_interval=1.0)
    started = time.perf_counter()
    await replica.start()
    run.cold_start_s = time.perf_counter() - started
    await replica.close()  # no background refresh: the refreshes below are timed one by one
    check_snapshot(replica, run, target, token)
    idle = []
    for _ in range(5):
        started = time.perf_counter()
        await replica.refresh()
        idle.append(time.perf_counter() - started)
    run.replica_idle_refresh_ms = statistics.median(idle) * 1e3
    filler = ids[-1]
    started = time.perf_counter()
    await registry.grant(filler, "service-account", f"sa-{filler}", "EDITOR")
    run.grant_ms = (time.perf_counter() - started) * 1e3
    run.writes += 1
    started = time.perf_counter()
    await replica.refresh()
    run.replica_grant_refresh_ms = (time.perf_counter() - started) * 1e3
    if replica.snapshot.role(filler, "service-account", f"sa-{filler}") != "EDITOR":
        raise BenchError("the replica's refresh did not show the new role")

    scope = tenant_scope(target)
    bearer = mocked(app, target, f"Bearer {token}")
    basic = mocked(app, target, "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    # The check passes on the target, and refuses a tenant without a binding.
    authorize(registry.snapshot, await identify(bearer, registry), scope, "write")
    other = ids[0] if ids[0] != target else ids[-1]
    if other != target:
        with contextlib.suppress(Forbidden):
            authorize(
                registry.snapshot, await identify(bearer, registry), tenant_scope(other), "read"
            )
            raise BenchError(f"the token may read {other!r}, where it has no binding")
    started = time.perf_counter()
    await identify(basic, registry)  # the first verification: scrypt, then cached
    run.basic_first_ms = (time.perf_counter() - started) * 1e3
    return Setup(run, server, registry, target, token, bearer, basic, scope)


async def time_batch(registry: Registry, request: web.Request, scope: Scope) -> float:
    """Return the mean ns of ``CHECK_BATCH`` ``identify`` + ``authorize`` calls."""
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(CHECK_BATCH):
        authorize(registry.snapshot, await identify(request, registry), scope, "read")
    return (clock() - started) / CHECK_BATCH


async def in_process(setups: list[Setup], iterations: int) -> None:
    """Time the checks, alternating batches between the Ns (and their order each round)."""
    gc.collect()
    for round_ in range(max(1, iterations // CHECK_BATCH)):
        for setup in setups if round_ % 2 == 0 else reversed(setups):
            setup.bearer_ns.append(await time_batch(setup.registry, setup.bearer, setup.scope))
            setup.basic_ns.append(await time_batch(setup.registry, setup.basic, setup.scope))
    for setup in setups:
        setup.run.bearer_check_ns = statistics.median(setup.bearer_ns)
        setup.run.basic_check_ns = statistics.median(setup.basic_ns)


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    async with session.get(url, headers=headers) as response:
        await response.read()
        if response.status != 200:
            raise BenchError(f"GET {url}: {response.status} {await response.text()}")


async def end_to_end(setups: list[Setup], requests: int) -> None:
    """Send the requests in chunks, alternating between the Ns; one session per N."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for setup in setups:
            connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            url = str(setup.server.make_url(f"/api/v1/{setup.target}/stats"))
            headers = {"Authorization": f"Bearer {setup.token}"}
            for _ in range(min(WARM_UP_REQUESTS, requests)):
                await get(session, url, headers)
            clients.append((setup, session, url, headers))
        clock = time.perf_counter
        done = 0
        while done < requests:
            chunk = min(REQUEST_CHUNK, requests - done)
            order = clients if (done // REQUEST_CHUNK) % 2 == 0 else clients[::-1]
            for setup, session, url, headers in order:
                started = clock()
                for _ in range(chunk):
                    sent = clock()
                    await get(session, url, headers)
                    setup.latencies.append(clock() - sent)
                setup.elapsed += clock() - started
            done += chunk
    for setup in setups:
        latencies = sorted(setup.latencies)
        run = setup.run
        run.e2e_requests = len(latencies)
        run.e2e_rps = len(latencies) / setup.elapsed
        run.e2e_median_us = statistics.median(latencies) * 1e6
        run.e2e_p99_us = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6


def ratio(small: float, large: float) -> float:
    return large / small if small else float("inf")


def table(result: Result) -> str:
    small, large = result.runs[0], result.runs[-1]
    head = f"{'measure':42}" + "".join(f"{f'N={run.tenants:,}':>14}" for run in result.runs)
    head += f"{f'{large.tenants:,}/{small.tenants:,}':>14}"
    lines = [
        f"access bench: backend {result.backend}, {result.iterations:,} in-process checks per "
        f"N and scheme, {result.requests:,} HTTP requests per N",
        head,
        "-" * len(head),
    ]
    for label, attribute, unit in ROWS:
        values = [getattr(run, attribute) for run in result.runs]
        precise = unit in ("s", "ms")
        shown = "".join(f"{v:>14.3f}" if precise else f"{v:>14,.0f}" for v in values)
        name = f"{label} ({unit})" if unit else label
        lines.append(f"{name:42}{shown}{result.ratios[attribute]:>14.2f}")
    worst = max(result.ratios[a] for a in CHECKED)
    lines.append(
        f"{'PASS' if result.passed else 'FAIL'}: in-process ratio {worst:.2f} "
        f"(limit {result.max_ratio:g}); per tenant 1 filler service account, token and binding"
    )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, result: Result) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-access-", dir=args.workdir))
    try:
        async with contextlib.AsyncExitStack() as stack:
            setups = []
            for n in sorted(set(args.tenants)):
                print(f"N={n:,}: populating ...", file=sys.stderr, flush=True)
                setups.append(await set_up(n, args, workdir, stack))
            print("in-process checks ...", file=sys.stderr, flush=True)
            await in_process(setups, args.iterations)
            print("HTTP requests ...", file=sys.stderr, flush=True)
            await end_to_end(setups, args.requests)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.runs = [setup.run for setup in setups]
    small, large = result.runs[0], result.runs[-1]
    for _, attribute, _ in ROWS:
        result.ratios[attribute] = ratio(getattr(small, attribute), getattr(large, attribute))
    result.passed = all(result.ratios[a] <= args.max_ratio for a in CHECKED)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.access",
        description="Per-request cost of authentication + access check, few vs many tenants.",
    )
    parser.add_argument(
        "--tenants",
        type=int,
        nargs="+",
        default=[10, 10_000],
        metavar="N",
        help="tenant counts; the smallest and the largest are compared (default 10 10000)",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="HTTP requests per N (default 2000)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=200_000,
        help="in-process checks per N and scheme, in batches of 1000 (default 200000)",
    )
    parser.add_argument(
        "--batch", type=int, default=256, help="registry writes issued at once (default 256)"
    )
    parser.add_argument(
        "--shard",
        type=int,
        default=250,
        help="filler writes go through one more Registry per this many tenants (default "
        "250; 0: all through the app's registry, O(N^2): minutes at 10000)",
    )
    parser.add_argument(
        "--backend",
        choices=["memory", "local"],
        default="memory",
        help="where the registry's documents go (default memory; local: a temp dir)",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=1.5,
        help="exit 1 if an in-process check is slower than this at the largest N (default 1.5)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary files go")
    args = parser.parse_args(argv)
    if len(set(args.tenants)) < 2 or min(args.tenants) < 1:
        parser.error("--tenants needs at least two different counts, each at least 1")
    if args.shard < 0:
        parser.error("--shard must be 0 or more")
    for name in ("requests", "iterations", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = Result(
        backend=args.backend,
        iterations=args.iterations,
        requests=args.requests,
        max_ratio=args.max_ratio,
    )
    try:
        asyncio.run(bench(args, result))
    except KeyboardInterrupt:
        result.error = "interrupted"
    except Exception as exc:  # the report says what failed; the exit status says it failed
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None:
        print(table(result))
    else:
        print(f"python -m bench.access: failed: {result.error}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    if result.error is not None:
        return 2
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
