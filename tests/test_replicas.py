"""Two gateway processes over one S3 bucket: what one changes, the other obeys within 2 s.

Each replica keeps an in-memory snapshot of tenants, identities, tokens and bindings, refreshed
every ``auth.cache-seconds`` (1 s here, at most 2) from the change feed in the storage. These
tests drive replica A through its admin API and watch replica B: B must accept a new token,
refuse a revoked one (401), refuse a soft-deleted tenant (403) and accept it again once
restored, each within the staleness bound (2 s, plus the time of a request: polled up to
2.5 s). The observed delays are printed (``pytest -s``).

Both replicas start at the same moment with the same ``admin.*`` settings: the bootstrap admin
is a create-only write, so exactly one of them creates it and both then accept it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import aiohttp
import pytest

from tests.support.gateway_process import GatewayProcess

if TYPE_CHECKING:
    from tests.support.moto import MotoServer

pytestmark = pytest.mark.slow

CACHE_SECONDS: Final = 1.0
BOUND: Final = 2.0  # the configured maximum of auth.cache-seconds
POLL_LIMIT: Final = BOUND + 0.5  # the bound plus the time of a request or two
POLL_EVERY: Final = 0.02
ADMIN_USER: Final = "root"
ADMIN_PASSWORD: Final = "replica-admin-password"
ADMIN: Final = {
    "Authorization": "Basic "
    + base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode("ascii")
}
TENANT: Final = "t1"
ACCOUNT: Final = "ci-bot"
FILE: Final = f"/api/v1/{TENANT}/files/x"

Probe = Callable[[], Awaitable[int]]


class Replicas(NamedTuple):
    a: str
    b: str
    ready: float  # time.monotonic() when both answered /health/ready


@pytest.fixture(scope="module")
def replicas(moto_server: MotoServer) -> Iterator[Replicas]:
    """Start gateways A and B at the same time over one new bucket; return their URLs."""
    from tests.support.moto import ACCESS_KEY, REGION, SECRET_KEY, make_bucket

    assert moto_server.endpoint is not None
    bucket = f"replicas-{secrets.token_hex(6)}"
    make_bucket(moto_server.endpoint, bucket)
    config: dict[str, Any] = {
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
        "tenants": {"enabled": True},
        "auth": {"enabled": True, "cache-seconds": CACHE_SECONDS},
        "admin": {"username": ADMIN_USER, "password": ADMIN_PASSWORD},
    }
    gateways = [GatewayProcess(config), GatewayProcess(config)]
    try:
        with ThreadPoolExecutor(2) as pool:  # both race for the bootstrap admin
            url_a, url_b = pool.map(lambda gateway: gateway.start(), gateways)
        yield Replicas(url_a, url_b, time.monotonic())
    finally:
        codes = [gateway.stop() for gateway in gateways]
        logs = [gateway.log_text() for gateway in gateways]
    for name, code, log in zip("AB", codes, logs, strict=True):
        assert code == 0, f"gateway {name} exited with {code}:\n{log[-3000:]}"
        assert "Traceback" not in log, f"gateway {name} logged a traceback:\n{log[-3000:]}"
    # The generated-password notice appears only when no password is configured.
    assert not any("generated password" in log for log in logs)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    expect: int,
    headers: dict[str, str] = ADMIN,
    **kwargs: Any,
) -> Any:
    """Send one request (as the super admin by default), assert its status, return its JSON."""
    async with session.request(method, url, headers=headers, **kwargs) as response:
        text = await response.text()
        assert response.status == expect, f"{method} {url}: {response.status} {text}"
        return await response.json() if text and response.content_type.endswith("json") else None


async def status(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


async def converges(
    what: str, probe: Probe, *, want: int, meanwhile: frozenset[int], since: float
) -> float:
    """Poll ``probe`` until it answers ``want``; return the delay counted from ``since``.

    ``since`` is when the change was acknowledged by the replica that made it. Any answer
    outside ``meanwhile | {want}`` fails at once; still no ``want`` after ``POLL_LIMIT`` fails.
    """
    seen: list[int] = []
    while True:
        got = await probe()
        delay = time.monotonic() - since
        if got == want:
            print(f"{what}: {want} after {delay:.3f} s ({len(seen)} earlier answers {set(seen)})")
            return delay
        assert got in meanwhile, f"{what}: answered {got} while converging to {want}"
        seen.append(got)
        assert delay < POLL_LIMIT, f"{what}: still {got} after {delay:.3f} s, not {want}"
        await asyncio.sleep(POLL_EVERY)


async def test_a_change_on_a_binds_b_within_the_staleness_bound(
    replicas: Replicas,
) -> None:
    a, b, _ = replicas
    async with aiohttp.ClientSession() as http:
        # The bootstrap admin exists once, and both replicas accept it: the one that lost the
        # create-only write may learn of it from the feed, within the bound of its start.
        for name, url in (("A", a), ("B", b)):

            async def me_status(url: str = url) -> int:
                return await status(http, "GET", f"{url}/api/v1/me", headers=ADMIN)

            await converges(
                f"{name} accepts the bootstrap admin",
                me_status,
                want=200,
                meanwhile=frozenset({401}),
                since=replicas.ready,
            )
            me = await call(http, "GET", f"{url}/api/v1/me", expect=200)
            assert me["superAdmin"] is True and me["name"] == ADMIN_USER
        users = await call(http, "GET", f"{a}/api/v1/users", expect=200)
        assert [u["username"] for u in users].count(ADMIN_USER) == 1

        # On A: tenant, service account, two tokens, an EDITOR binding.
        await call(http, "POST", f"{a}/api/v1/tenants", json={"id": TENANT}, expect=201)
        await call(http, "POST", f"{a}/api/v1/service-accounts", json={"name": ACCOUNT}, expect=201)
        tokens = [
            await call(
                http, "POST", f"{a}/api/v1/service-accounts/{ACCOUNT}/tokens", json={}, expect=201
            )
            for _ in range(2)
        ]
        revoked, kept = tokens[0], tokens[1]
        binding = {"tenant": TENANT, "kind": "service-account", "subject": ACCOUNT}
        await call(
            http, "PUT", f"{a}/api/v1/bindings", json={**binding, "role": "EDITOR"}, expect=200
        )
        since = time.monotonic()

        # B accepts the token for PUT, then GET, within the bound.
        async def put_on_b() -> int:
            return await status(
                http, "PUT", f"{b}{FILE}", data=b"from B", headers=bearer(revoked["token"])
            )

        delays = {
            "token, tenant, binding -> B": await converges(
                "B accepts the new token (PUT)",
                put_on_b,
                want=201,
                meanwhile=frozenset({401, 403}),
                since=since,
            )
        }
        for url in (b, a):  # one bucket: A reads what B wrote
            async with http.get(f"{url}{FILE}", headers=bearer(revoked["token"])) as response:
                assert response.status == 200, await response.text()
                assert await response.read() == b"from B"
        assert await status(http, "GET", f"{b}{FILE}", headers=bearer(kept["token"])) == 200
        # EDITOR on t1 only: no other tenant, no admin API.
        assert await status(http, "GET", f"{b}/api/v1/users", headers=bearer(kept["token"])) == 403

        # Revoke the first token on A: B answers 401 for it, the other token still works.
        await call(http, "DELETE", f"{a}/api/v1/tokens/{revoked['id']}", expect=200)
        since = time.monotonic()

        def get_on(url: str, token: str) -> Probe:
            async def probe() -> int:
                return await status(http, "GET", f"{url}{FILE}", headers=bearer(token))

            return probe

        delays["revoked token -> A"] = await converges(
            "A refuses the revoked token",
            get_on(a, revoked["token"]),
            want=401,
            meanwhile=frozenset({200}),
            since=since,
        )
        delays["revoked token -> B"] = await converges(
            "B refuses the revoked token",
            get_on(b, revoked["token"]),
            want=401,
            meanwhile=frozenset({200}),
            since=since,
        )
        assert await status(http, "GET", f"{b}{FILE}", headers=bearer(kept["token"])) == 200

        # Soft-delete t1 on A: B refuses the tenant (403) to a valid token.
        deleted = await call(http, "DELETE", f"{a}/api/v1/tenants/{TENANT}", expect=200)
        assert deleted["deleted"] is True
        since = time.monotonic()
        delays["deleted tenant -> B"] = await converges(
            "B refuses the deleted tenant",
            get_on(b, kept["token"]),
            want=403,
            meanwhile=frozenset({200}),
            since=since,
        )
        put_status = await status(
            http, "PUT", f"{b}{FILE}", data=b"refused", headers=bearer(kept["token"])
        )
        assert put_status == 403

        # Restore on A: B serves the tenant again, with its file.
        restored = await call(http, "POST", f"{a}/api/v1/tenants/{TENANT}/restore", expect=200)
        assert restored["deleted"] is False
        since = time.monotonic()
        delays["restored tenant -> B"] = await converges(
            "B serves the restored tenant",
            get_on(b, kept["token"]),
            want=200,
            meanwhile=frozenset({403}),
            since=since,
        )
        async with http.get(f"{b}{FILE}", headers=bearer(kept["token"])) as response:
            assert await response.read() == b"from B"

    print("observed delays (s): " + ", ".join(f"{k} {v:.3f}" for k, v in delays.items()))
    # converges() already failed past POLL_LIMIT; the bound itself holds up to request time.
    assert max(delays.values()) < POLL_LIMIT


async def test_a_tenant_created_on_b_is_listed_on_a(replicas: Replicas) -> None:
    a, b, _ = replicas
    async with aiohttp.ClientSession() as http:
        created = await call(http, "POST", f"{b}/api/v1/tenants", json={"id": "t2"}, expect=201)
        assert created["id"] == "t2"
        since = time.monotonic()

        async def listed_on_a() -> int:
            tenants = await call(http, "GET", f"{a}/api/v1/tenants", expect=200)
            return 200 if "t2" in {t["id"] for t in tenants} else 404

        await converges(
            "A lists the tenant created on B",
            listed_on_a,
            want=200,
            meanwhile=frozenset({404}),
            since=since,
        )
        # A super admin sees the tenant but holds no binding on it: no files.
        assert await status(http, "GET", f"{a}/api/v1/t2/stats", headers=ADMIN) == 403
