"""Password checks under guard (``gateway.guard``): each client address has a budget of failed
checks a minute, then 429 with Retry-After and no hashing; a bound on hashing at once, then 503.

The budget is tested on its own (a clock the test moves) and through the application: Basic
credentials and the web UI's sign-in form spend one budget, a remembered success passes a spent
budget, and behind a trusted proxy the address is the last ``X-Forwarded-For`` entry.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from gateway import config
from gateway.access import check_password
from gateway.app import create_app
from gateway.errors import SignInsBusy, TooManyAttempts
from gateway.guard import SignInGuard, address_key, forwarded_address, hashing_places
from gateway.registry import Registry
from gateway.sessions import COOKIE
from gateway.state import GUARD, REGISTRY
from tests.support.gateway_process import GatewayProcess
from tests.test_sessions import ALICE_PASSWORD, ROOT, ROOT_PASSWORD, _alice, _values

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the budget on its own ---------------------------------------------------------------------


def test_an_address_has_its_budget_of_failures_then_waits_for_it_to_refill() -> None:
    clock = Clock()
    guard = SignInGuard(3, clock=clock)
    for _ in range(3):
        guard.spend("203.0.113.7")  # each a failure: nothing given back
    with pytest.raises(TooManyAttempts) as refused:
        guard.spend("203.0.113.7")
    assert refused.value.status == 429
    assert refused.value.retry_after == 20  # one check back every 60 / 3 s
    assert "auth.sign-in-attempts" in refused.value.message
    assert "3 a minute" in refused.value.message
    guard.spend("198.51.100.1")  # another address has its own budget
    clock.now += 19
    with pytest.raises(TooManyAttempts) as refused:
        guard.spend("203.0.113.7")
    assert refused.value.retry_after == 1
    clock.now += 1
    guard.spend("203.0.113.7")  # one check's worth came back
    with pytest.raises(TooManyAttempts):
        guard.spend("203.0.113.7")
    clock.now += 60
    for _ in range(3):  # a whole minute: the whole budget, no more
        guard.spend("203.0.113.7")
    with pytest.raises(TooManyAttempts):
        guard.spend("203.0.113.7")


def test_a_success_or_a_check_never_made_gives_its_place_back() -> None:
    guard = SignInGuard(2, clock=Clock())
    for _ in range(10):  # spent and refunded: never short
        guard.spend("203.0.113.7")
        guard.refund("203.0.113.7")
    guard.spend("203.0.113.7")
    guard.spend("203.0.113.7")
    with pytest.raises(TooManyAttempts):
        guard.spend("203.0.113.7")
    guard.refund("203.0.113.7")
    guard.refund("203.0.113.7")
    guard.refund("203.0.113.7")  # never above the budget
    guard.spend("203.0.113.7")
    guard.spend("203.0.113.7")
    with pytest.raises(TooManyAttempts):
        guard.spend("203.0.113.7")


def test_no_budget_with_zero_attempts() -> None:
    guard = SignInGuard(0, clock=Clock())
    for _ in range(1000):
        guard.spend("203.0.113.7")


def test_ipv6_addresses_share_a_budget_per_64_and_mapped_ipv4_counts_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key(None) == address_key("") == "?"
    assert address_key("not an address") == "not an address"
    guard = SignInGuard(2, clock=Clock())
    guard.spend("2001:db8:1:2::1")
    guard.spend("2001:db8:1:2::2")
    with pytest.raises(TooManyAttempts):
        guard.spend("2001:db8:1:2:dead:beef::3")
    guard.spend("2001:db8:1:3::1")


def test_the_budgets_remembered_are_bounded_refilled_ones_go_first() -> None:
    clock = Clock()
    guard = SignInGuard(2, max_addresses=3, clock=clock)
    guard.spend("192.0.2.1")
    guard.spend("192.0.2.1")  # spent
    guard.spend("192.0.2.2")
    clock.now += 60  # .2 has refilled; .1 too, but .1 is spent again below
    guard.spend("192.0.2.1")
    guard.spend("192.0.2.1")
    guard.spend("192.0.2.3")
    guard.spend("192.0.2.4")  # a fourth: the refilled one (.2) goes
    assert len(guard._budgets) == 3
    assert "192.0.2.2" not in guard._budgets
    with pytest.raises(TooManyAttempts):
        guard.spend("192.0.2.1")  # still spent: kept
    for n in range(5, 10):
        guard.spend(f"192.0.2.{n}")
    assert len(guard._budgets) == 3  # none refilled: the oldest used go


def _holders(
    guard: SignInGuard,
) -> tuple[list[str], asyncio.Event, Callable[[str, str], Coroutine[Any, Any, None]]]:
    """Checks that, once they hold a hashing place, note their name and keep the place until
    the event is set."""
    order: list[str] = []
    release = asyncio.Event()

    async def check(name: str, address: str) -> None:
        async with guard.hashing(address):
            order.append(name)
            await release.wait()

    return order, release, check


async def test_hashing_is_bounded_and_the_queue_too() -> None:
    guard = SignInGuard(10, hashing=1, queued=1)
    order, release, check = _holders(guard)
    first = asyncio.create_task(check("first", "192.0.2.1"))
    await asyncio.sleep(0)
    second = asyncio.create_task(check("second", "192.0.2.2"))
    await asyncio.sleep(0)
    assert order == ["first"]  # the second waits for the place
    with pytest.raises(SignInsBusy) as busy:
        async with guard.hashing("192.0.2.3"):
            pass
    assert busy.value.status == 503 and busy.value.retry_after == 1
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    async with guard.hashing("192.0.2.3"):  # all places free again
        pass
    assert guard._turns == {}  # nothing kept for addresses with no check under way


async def test_an_address_checks_one_at_a_time_outside_the_queue() -> None:
    guard = SignInGuard(10, hashing=1, queued=1)
    order, release, check = _holders(guard)
    flood = [asyncio.create_task(check(f"a{n}", "203.0.113.7")) for n in range(5)]
    await asyncio.sleep(0)
    assert order == ["a0"]
    # Four more of the same address wait their turns, not in the queue: another address
    # still has its place there.
    other = asyncio.create_task(check("b", "198.51.100.1"))
    await asyncio.sleep(0)
    assert not other.done()
    with pytest.raises(SignInsBusy):  # a third address: the queue (of one) is taken by b
        async with guard.hashing("198.51.100.2"):
            pass
    release.set()
    await asyncio.gather(*flood, other)
    assert order[:2] == ["a0", "b"]  # b was next in the queue; a1 waited for a0's turn
    assert sorted(order) == ["a0", "a1", "a2", "a3", "a4", "b"]
    assert guard._turns == {}


async def test_a_check_gives_its_place_back_on_success_or_when_it_never_ran() -> None:
    guard = SignInGuard(2, hashing=1, queued=0, clock=Clock())
    async with guard.checking("192.0.2.1") as succeeded:
        succeeded()  # the password held
        with pytest.raises(SignInsBusy):  # no place free, none may wait: never ran
            async with guard.checking("192.0.2.2"):
                pass
    async with guard.checking("192.0.2.1"):
        pass  # a failure: spent
    guard.spend("192.0.2.1")  # .1: one place left, after its success and its failure
    with pytest.raises(TooManyAttempts):
        guard.spend("192.0.2.1")
    guard.spend("192.0.2.2")  # .2: both places, its busy check gave its own back
    guard.spend("192.0.2.2")
    with pytest.raises(TooManyAttempts):
        guard.spend("192.0.2.2")


def test_hashing_places_are_half_the_cores_over_all_workers() -> None:
    cores = len(os.sched_getaffinity(0))
    assert hashing_places(1) == max(1, cores // 2)
    assert hashing_places(2) == max(1, cores // 4)
    assert hashing_places(64) == 1  # at least one per worker


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["203.0.113.7"], "203.0.113.7"),
        (["198.51.100.9, 203.0.113.7"], "203.0.113.7"),  # the client wrote the first
        (["6.6.6.6", "203.0.113.7"], "203.0.113.7"),  # a line of the client's, then the proxy's
        (["203.0.113.7:51234"], "203.0.113.7"),
        (["[2001:db8::1]:443"], "2001:db8::1"),
        (["2001:db8::1"], "2001:db8::1"),
        (["203.0.113.7, unknown"], None),
        (["x" * 8000], None),
        ([""], None),
    ],
)
def test_the_forwarded_address_is_the_proxys_entry_and_an_address(
    lines: list[str], expected: str | None
) -> None:
    assert forwarded_address(lines) == expected


# -- through the application -------------------------------------------------------------------


async def _client(aiohttp_client: MakeClient, tmp_path: Path, **extra: Any) -> Client:
    """An application with a budget of 3 failures a minute behind a trusted proxy, and alice,
    an EDITOR of acme."""
    values = _values(tmp_path, **{"server.trust-proxy": True, "auth.sign-in-attempts": 3})
    client = await aiohttp_client(create_app(config.check({**values, **extra})))
    await _alice(client)
    return client


def _count_hashing(monkeypatch: pytest.MonkeyPatch, registry: Registry) -> list[str]:
    """Record the username of every password check that hashes."""
    checked: list[str] = []
    verify = registry.verify_password

    def counted(username: str, password: str) -> Any:
        checked.append(username)
        return verify(username, password)

    monkeypatch.setattr(registry, "verify_password", counted)
    return checked


async def _list(client: Client, password: str, forwarded: str) -> Any:
    headers = {"Authorization": _basic("alice", password), "X-Forwarded-For": forwarded}
    return await client.get("/api/v1/acme/list/", headers=headers)


async def test_wrong_basic_passwords_spend_the_budget_then_429_without_hashing(
    aiohttp_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    checked = _count_hashing(monkeypatch, client.app[REGISTRY])
    attacker = "203.0.113.7"
    for n in range(3):
        response = await _list(client, f"guess {n}", attacker)
        assert response.status == 401
    assert len(checked) == 3
    # The budget is spent: refused before any hashing, even the right password.
    for password in ("guess 3", ALICE_PASSWORD):
        response = await _list(client, password, attacker)
        assert response.status == 429
        assert response.headers["Retry-After"] == "20"
        body = await response.json()
        assert body["error"] == "too_many_attempts"
        assert "auth.sign-in-attempts" in body["message"]
    assert len(checked) == 3
    # Entries the client writes before the proxy's own are not believed, nor a line of its own.
    response = await _list(client, "guess 4", f"198.51.100.9, {attacker}")
    assert response.status == 429
    two_lines = [
        ("Authorization", _basic("alice", "guess 5")),
        ("X-Forwarded-For", "198.51.100.9"),
        ("X-Forwarded-For", attacker),
    ]
    response = await client.get("/api/v1/acme/list/", headers=two_lines)
    assert response.status == 429
    # Another address is not held back; its success is remembered ...
    response = await _list(client, ALICE_PASSWORD, "198.51.100.1")
    assert response.status == 200
    assert len(checked) == 4
    # ... and a remembered success is not a check: it passes the spent budget.
    response = await _list(client, ALICE_PASSWORD, attacker)
    assert response.status == 200
    assert len(checked) == 4


async def test_a_cancelled_check_holds_its_hashing_place_until_its_thread_ends(
    aiohttp_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    app, registry = client.app, client.app[REGISTRY]
    monkeypatch.setattr(app[GUARD], "_hashing", asyncio.Semaphore(1))  # one place
    release = threading.Event()
    hashed: list[str] = []

    def slow(username: str, password: str) -> None:
        hashed.append(username)
        release.wait(10)

    monkeypatch.setattr(registry, "verify_password", slow)

    def request(address: str) -> web.Request:
        return make_mocked_request("GET", "/", headers={"X-Forwarded-For": address}, app=app)

    first = asyncio.create_task(check_password(request("203.0.113.20"), registry, "alice", "a"))
    for _ in range(200):
        if hashed:
            break
        await asyncio.sleep(0.01)
    assert hashed == ["alice"]
    first.cancel()
    await asyncio.sleep(0.05)
    assert not first.done()  # it waits for its thread, which cannot be stopped
    second = asyncio.create_task(check_password(request("203.0.113.21"), registry, "bob", "b"))
    await asyncio.sleep(0.2)
    assert hashed == ["alice"]  # the place is still the first check's
    release.set()
    assert await asyncio.wait_for(second, 10) is None
    assert hashed == ["alice", "bob"]
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_sign_in_form_spends_the_same_budget(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    attacker = {"X-Forwarded-For": "203.0.113.8"}
    response = await _list(client, "guess", "203.0.113.8")
    assert response.status == 401
    for n in range(2):
        response = await client.post(
            "/api/v1/session", data={"username": "alice", "password": f"x{n}"}, headers=attacker
        )
        assert response.status == 401
    response = await client.post(
        "/api/v1/session", data={"username": "alice", "password": ALICE_PASSWORD}, headers=attacker
    )
    assert response.status == 429
    assert response.headers["Retry-After"] == "20"
    assert COOKIE not in response.cookies
    assert (await response.json())["error"] == "too_many_attempts"
    # From another address the same form signs in.
    response = await client.post(
        "/api/v1/session",
        data={"username": "alice", "password": ALICE_PASSWORD},
        headers={"X-Forwarded-For": "198.51.100.2"},
    )
    assert response.status == 200
    assert COOKIE in response.cookies


async def test_without_a_trusted_proxy_the_peer_address_counts(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path, **{"server.trust-proxy": False})
    for n in range(3):  # each from a "different" forwarded address: all the same peer
        assert (await _list(client, "wrong", f"198.51.100.{n}")).status == 401
    response = await _list(client, "wrong", "198.51.100.200")
    assert response.status == 429


async def test_zero_attempts_turns_the_budget_off(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path, **{"auth.sign-in-attempts": 0})
    for _ in range(6):
        assert (await _list(client, "wrong", "203.0.113.7")).status == 401
    assert (await _list(client, ALICE_PASSWORD, "203.0.113.7")).status == 200


async def test_checks_beyond_the_queue_get_503_with_retry_after(
    aiohttp_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _client(aiohttp_client, tmp_path, **{"auth.sign-in-attempts": 0})
    guard = client.app[GUARD]
    monkeypatch.setattr(guard, "_hashing", asyncio.Semaphore(1))  # one place, none waiting
    monkeypatch.setattr(guard, "_queued", 0)
    registry = client.app[REGISTRY]
    entered, release = threading.Event(), threading.Event()
    verify = registry.verify_password

    def slow(username: str, password: str) -> Any:
        entered.set()
        release.wait(10)
        return verify(username, password)

    monkeypatch.setattr(registry, "verify_password", slow)
    first = asyncio.ensure_future(_list(client, "wrong", "203.0.113.7"))
    deadline = time.monotonic() + 10
    while not entered.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert entered.is_set()
    busy = await _list(client, "wrong", "198.51.100.3")
    assert busy.status == 503
    assert busy.headers["Retry-After"] == "1"
    assert (await busy.json())["error"] == "sign_ins_busy"
    release.set()
    assert (await first).status == 401
    # A bearer token or a remembered password never waits for hashing.
    monkeypatch.setattr(registry, "verify_password", verify)
    assert (await _list(client, ALICE_PASSWORD, "198.51.100.3")).status == 200


def test_the_option_is_checked() -> None:
    assert config.check({"auth.sign-in-attempts": "25"})["auth.sign-in-attempts"] == 25
    for bad in ("-1", "ten", "100001"):
        with pytest.raises(config.ConfigError, match=r"auth\.sign-in-attempts"):
            config.check({"auth.sign-in-attempts": bad})


async def test_a_burst_sent_at_once_gets_no_more_checks_than_the_budget(
    aiohttp_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    checked = _count_hashing(monkeypatch, client.app[REGISTRY])
    answers = await asyncio.gather(*(_list(client, f"guess {n}", "203.0.113.9") for n in range(12)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [401] * 3 + [429] * 9
    assert len(checked) == 3


# -- a real gateway process ------------------------------------------------------------------


def test_a_flood_of_wrong_passwords_is_held_to_the_budget_while_tokens_work(
    tmp_path: Path,
) -> None:
    """``gateway serve`` with the default budget (10 a minute): a burst of 40 wrong Basic
    passwords from one address gets 10 answers of 401 and 30 of 429, and a service account's
    uploads go through meanwhile."""
    settings = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants": {"enabled": True, "ids": ["acme"]},
        "admin": {"username": "root", "password": ROOT_PASSWORD},
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(url: str, method: str, headers: dict[str, str], body: bytes | None = None) -> Any:
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    with GatewayProcess(settings) as gateway:
        root = {**ROOT, "Content-Type": "application/json"}
        assert gateway.url is not None
        api = gateway.url + "/api/v1"
        assert call(f"{api}/service-accounts", "POST", root, b'{"name": "worker"}')[0] == 201
        binding = b'{"tenant": "acme", "kind": "service-account", "subject": "worker", '
        binding += b'"role": "EDITOR"}'
        assert call(f"{api}/bindings", "PUT", root, binding)[0] == 200
        status, _, body = call(f"{api}/service-accounts/worker/tokens", "POST", root, b"{}")
        assert status == 201
        bearer = {"Authorization": "Bearer " + json.loads(body)["token"]}

        async def flood() -> list[tuple[int, dict[str, str]]]:
            wrong = {"Authorization": _basic("root", "not the password")}
            loop = asyncio.get_running_loop()
            guesses = [
                loop.run_in_executor(pool, call, f"{api}/acme/list/", "GET", wrong)
                for _ in range(40)
            ]
            uploads = [
                loop.run_in_executor(
                    pool, call, f"{api}/acme/files/out/{n}", "PUT", bearer, b"data %d" % n
                )
                for n in range(10)
            ]
            done = await asyncio.gather(*guesses, *uploads)
            return [(status, headers) for status, headers, _ in done]

        with ThreadPoolExecutor(50) as pool:
            answers = asyncio.run(flood())
        guesses, uploads = answers[:40], answers[40:]
        assert sorted(status for status, _ in guesses) == [401] * 10 + [429] * 30
        assert all(headers["Retry-After"] == "6" for status, headers in guesses if status == 429)
        assert [status for status, _ in uploads] == [201] * 10
        status, _, body = call(f"{api}/acme/files/out/3", "GET", bearer)
        assert (status, body) == (200, b"data 3")
        log = gateway.log_text()
    assert "Traceback" not in log
