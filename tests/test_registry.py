"""The tenant and identity registry (``gateway.registry``) over every backend.

Two ``Registry`` objects over one store stand for two gateway processes: what one writes, the
other sees through its change feed within a bounded time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

import gateway.registry as registry_module
from backends.base import Backend
from gateway.errors import BadRequest, Conflict, InvalidTenant, NotFound
from gateway.registry import (
    CHANGES_PREFIX,
    REGISTRY_PREFIX,
    Registry,
    Snapshot,
    Token,
    role_at_least,
)
from tests.backends.helpers import get, put

pytestmark = pytest.mark.asyncio(loop_scope="session")

PASSWORD = "correct horse battery"
Make = Callable[..., Awaitable[Registry]]


# Every test runs on the memory and local backends; the ones marked ``ALL_BACKENDS`` on S3
# (moto) too, and pure validation tests on memory only. S3 costs about a second a test.
ALL_BACKENDS = pytest.mark.parametrize("store", ["memory", "local", "s3"], indirect=True)
MEMORY_ONLY = pytest.mark.parametrize("store", ["memory"], indirect=True)


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash with n=2**10 here (2**14 costs ~0.1 s a hash); ``test_password_hash_format``
    checks the real parameters."""
    monkeypatch.setattr(registry_module, "SCRYPT_N", 2**10)


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest) -> Backend:
    """An empty, started backend (the conftest's fixtures, by name)."""
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


@pytest_asyncio.fixture(loop_scope="session")
async def make(store: Backend) -> AsyncIterator[Make]:
    """Return a function that starts a ``Registry`` over ``store`` (closed after the test)."""
    made: list[Registry] = []

    async def start(*, refresh_interval: float = 0.05) -> Registry:
        registry = Registry(store, refresh_interval=refresh_interval)
        await registry.start()
        made.append(registry)
        return registry

    yield start
    for registry in made:
        await registry.close()


async def doc(store: Backend, key: str) -> Any:
    return json.loads(await get(store, f"{REGISTRY_PREFIX}/{key}"))


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``check()`` holds, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not visible in time"
        await asyncio.sleep(0.02)


class Counter:
    """Counts the calls of one backend method (patched on the instance)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Backend, name: str) -> None:
        self.calls: list[str] = []
        original = getattr(store, name)

        async def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(key)
            return await original(key, *args, **kwargs)

        monkeypatch.setattr(store, name, counted)


# -- tenants -----------------------------------------------------------------------------------


@ALL_BACKENDS
async def test_second_create_tenant_conflicts_and_keeps_the_original(
    make: Make, store: Backend
) -> None:
    registry = await make()
    first = await registry.create_tenant("acme", "Acme")
    with pytest.raises(Conflict, match="a tenant with this id exists"):
        await registry.create_tenant("acme", "Impostor")
    assert registry.snapshot.tenants["acme"] == first
    assert await doc(store, "tenants/acme.json") == first.to_json()
    assert first.to_json() == {
        "id": "acme",
        "name": "Acme",
        "deleted": False,
        "created": first.created,
        "updated": first.created,
        "quota": {"maxBytes": None, "maxObjectSize": None},
    }
    assert first.created.endswith("Z")


@pytest.mark.parametrize("tenant_id", ["Acme", "a/b", "..", "", "admin", "x" * 64, "-a"])
@MEMORY_ONLY
async def test_create_tenant_refuses_a_bad_id(make: Make, tenant_id: str) -> None:
    registry = await make()
    with pytest.raises(InvalidTenant):
        await registry.create_tenant(tenant_id, "name")
    assert not registry.snapshot.tenants


@pytest.mark.parametrize("name", ["", " ", "x" * 201, "a\nb", "tab\there"])
@MEMORY_ONLY
async def test_create_tenant_refuses_a_bad_name(make: Make, name: str) -> None:
    registry = await make()
    with pytest.raises(BadRequest, match=r"^name: "):
        await registry.create_tenant("acme", name)


async def test_update_tenant_renames_soft_deletes_and_restores(make: Make, store: Backend) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    renamed = await registry.update_tenant("acme", name="Acme Corp")
    assert (renamed.name, renamed.deleted) == ("Acme Corp", False)
    deleted = await registry.update_tenant("acme", deleted=True)
    assert (deleted.name, deleted.deleted) == ("Acme Corp", True)
    assert registry.snapshot.tenants["acme"].deleted
    assert (await doc(store, "tenants/acme.json"))["deleted"] is True
    restored = await registry.update_tenant("acme", deleted=False)
    assert not restored.deleted
    assert restored.created == renamed.created
    assert restored.updated >= deleted.updated
    with pytest.raises(NotFound, match="no such tenant"):
        await registry.update_tenant("nope", name="x")
    with pytest.raises(BadRequest, match=r"^name: "):
        await registry.update_tenant("acme", name="")


# -- users and passwords -----------------------------------------------------------------------


async def test_password_is_stored_hashed_and_never_shown(make: Make, store: Backend) -> None:
    registry = await make()
    user = await registry.create_user("alice@example.com", PASSWORD, can_create_tenants=True)
    raw = await get(store, f"{REGISTRY_PREFIX}/users/alice@example.com.json")
    assert PASSWORD.encode() not in raw
    stored = json.loads(raw)
    assert stored["passwordHash"].startswith("scrypt$")
    assert stored["passwordHash"] == user.password_hash
    assert user.to_json() == {
        "username": "alice@example.com",
        "superAdmin": False,
        "canCreateTenants": True,
        "created": user.created,
        "updated": user.updated,
    }
    with pytest.raises(Conflict, match="a user with this username exists") as conflict:
        await registry.create_user("alice@example.com", "another password")
    assert "another password" not in str(conflict.value)


async def test_password_hash_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "SCRYPT_N", 2**14)
    stored = registry_module.hash_password(PASSWORD)
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert registry_module.check_password_hash(PASSWORD, stored)
    assert not registry_module.check_password_hash(PASSWORD + "x", stored)
    assert stored != registry_module.hash_password(PASSWORD)  # a new salt each time
    for tampered in ["", "md5$x", stored.replace("$16384$", "$16385$"), "scrypt$1$1$1$$"]:
        assert not registry_module.check_password_hash(PASSWORD, tampered)


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [
        ("", PASSWORD, "username"),
        (".alice", PASSWORD, "username"),
        ("a/b", PASSWORD, "username"),
        ("a" * 65, PASSWORD, "username"),
        ("alice", "short", "password"),
        ("alice", "x" * 1025, "password"),
    ],
)
@MEMORY_ONLY
async def test_create_user_refuses_bad_fields_without_echoing_the_password(
    make: Make, username: str, password: str, field: str
) -> None:
    registry = await make()
    with pytest.raises(BadRequest, match=f"^{field}: ") as refused:
        await registry.create_user(username, password)
    assert password not in str(refused.value)


async def test_verify_password_accepts_the_right_one_only(make: Make) -> None:
    registry = await make()
    await registry.create_user("alice", PASSWORD, super_admin=True)
    user = registry.verify_password("alice", PASSWORD)
    assert user is not None and user.super_admin
    assert registry.verify_password("alice", PASSWORD) == user  # from the cache
    assert registry.verify_password("alice", PASSWORD + "!") is None
    assert registry.verify_password("alice", "") is None
    assert registry.verify_password("bob", PASSWORD) is None
    assert await registry.verify_password_async("alice", PASSWORD) == user


async def test_changed_password_makes_the_cached_old_one_fail(make: Make) -> None:
    registry = await make()
    await registry.create_user("alice", PASSWORD)
    assert registry.verify_password("alice", PASSWORD) is not None  # cached now
    updated = await registry.update_user("alice", password="a new password", super_admin=True)
    assert updated.super_admin
    assert registry.verify_password("alice", PASSWORD) is None
    assert registry.verify_password("alice", "a new password") == updated
    with pytest.raises(NotFound, match="no such user"):
        await registry.update_user("bob", super_admin=True)


async def test_a_deleted_user_cannot_log_in_even_when_cached(make: Make) -> None:
    registry = await make()
    await registry.create_user("alice", PASSWORD)
    assert registry.verify_password("alice", PASSWORD) is not None
    await registry.delete_user("alice")
    assert registry.verify_password("alice", PASSWORD) is None
    with pytest.raises(NotFound, match="no such user"):
        await registry.delete_user("alice")


# -- service accounts and tokens ---------------------------------------------------------------


async def test_token_is_shown_once_stored_hashed_and_verified(make: Make, store: Backend) -> None:
    registry = await make()
    account = await registry.create_service_account("ci-worker", "uploads outputs")
    assert account.to_json() == {
        "name": "ci-worker",
        "description": "uploads outputs",
        "created": account.created,
    }
    token, plaintext = await registry.create_token("ci-worker", description="main")
    prefix = f"gwt_{token.id}_"
    assert plaintext.startswith(prefix) and len(token.id) == 16
    secret = plaintext[len(prefix) :]
    assert len(secret) >= 43  # 32 random bytes
    raw = await get(store, f"{REGISTRY_PREFIX}/tokens/{token.id}.json")
    assert secret.encode() not in raw
    assert json.loads(raw)["secretHash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert token.to_json() == {
        "id": token.id,
        "serviceAccount": "ci-worker",
        "description": "main",
        "created": token.created,
        "expires": None,
        "revoked": False,
    }
    assert registry.verify_token(plaintext) == (token, account)
    with pytest.raises(NotFound, match="no such service account"):
        await registry.create_token("ghost")


async def test_revoked_token_is_refused(make: Make) -> None:
    registry = await make()
    await registry.create_service_account("ci")
    token, plaintext = await registry.create_token("ci")
    assert registry.verify_token(plaintext) is not None
    revoked = await registry.revoke_token(token.id)
    assert revoked.revoked and not revoked.active(time.time())
    assert registry.verify_token(plaintext) is None
    with pytest.raises(NotFound, match="no such token"):
        await registry.revoke_token("0123456789abcdef")


async def test_expired_token_is_refused(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = await make()
    await registry.create_service_account("ci")
    token, plaintext = await registry.create_token("ci", expires_in=60)
    assert token.expires is not None
    assert registry.verify_token(plaintext) is not None
    # a minute later, as the registry's clock sees it
    later = SimpleNamespace(
        time=lambda: time.time() + 61, time_ns=time.time_ns, monotonic=time.monotonic
    )
    monkeypatch.setattr(registry_module, "time", later)
    assert registry.verify_token(plaintext) is None
    monkeypatch.undo()
    assert registry.verify_token(plaintext) is not None
    with pytest.raises(BadRequest, match=r"^expires_in: "):
        await registry.create_token("ci", expires_in=0)
    with pytest.raises(BadRequest, match=r"^expires_in: "):
        await registry.create_token("ci", expires_in=float("inf"))


@MEMORY_ONLY
async def test_malformed_or_forged_tokens_are_refused(make: Make) -> None:
    registry = await make()
    await registry.create_service_account("ci")
    token, plaintext = await registry.create_token("ci")
    secret = plaintext.rsplit("_", 1)[-1] if plaintext.count("_") == 2 else None
    forged = f"gwt_{token.id}_{'A' * 43}"
    other_id = f"gwt_{'0' * 16}_{plaintext[len('gwt_') + 17 :]}"
    bad_tokens = [
        "",
        "gwt_",
        plaintext + "x",
        plaintext[:-1],
        plaintext.upper(),
        forged,
        other_id,
        f"Bearer {plaintext}",
        plaintext.replace("gwt_", "gwx_"),
        secret or "x",
    ]
    assert registry.verify_token(plaintext) is not None
    for bad in bad_tokens:
        assert registry.verify_token(bad) is None, bad
    assert registry.verify_token(plaintext) is not None


async def test_delete_service_account_revokes_its_tokens_and_bindings(make: Make) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    await registry.create_service_account("ci")
    await registry.create_service_account("other")
    token, plaintext = await registry.create_token("ci")
    _, other_plaintext = await registry.create_token("other")
    await registry.grant("acme", "service-account", "ci", "EDITOR")
    assert registry.verify_token(plaintext) is not None
    await registry.delete_service_account("ci")
    assert "ci" not in registry.snapshot.service_accounts
    assert registry.snapshot.tokens[token.id].revoked
    assert registry.verify_token(plaintext) is None
    assert registry.snapshot.members("acme") == []
    # an account made again under the name inherits nothing
    await registry.create_service_account("ci")
    assert registry.verify_token(plaintext) is None
    assert registry.snapshot.role("acme", "service-account", "ci") is None
    assert registry.verify_token(other_plaintext) is not None


# -- bindings ----------------------------------------------------------------------------------


async def test_grant_replaces_the_role_and_revoke_removes_it(make: Make) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    await registry.create_tenant("beta", "Beta")
    await registry.create_user("alice", PASSWORD)
    await registry.create_service_account("ci")
    snapshot: Snapshot = registry.snapshot
    assert snapshot.role("acme", "user", "alice") is None
    binding = await registry.grant("acme", "user", "alice", "VIEWER")
    assert binding.to_json() == {
        "tenant": "acme",
        "kind": "user",
        "subject": "alice",
        "role": "VIEWER",
    }
    await registry.grant("acme", "user", "alice", "EDITOR")
    await registry.grant(None, "user", "alice", "ADMIN")
    await registry.grant("acme", "service-account", "ci", "VIEWER")
    snapshot = registry.snapshot
    assert snapshot.role("acme", "user", "alice") == "EDITOR"
    assert snapshot.role(None, "user", "alice") == "ADMIN"
    assert snapshot.role("beta", "user", "alice") is None
    assert snapshot.role("acme", "service-account", "alice") is None
    assert [(b.tenant, b.role) for b in snapshot.bindings_of("user", "alice")] == [
        (None, "ADMIN"),
        ("acme", "EDITOR"),
    ]
    assert [(b.kind, b.subject) for b in snapshot.members("acme")] == [
        ("service-account", "ci"),
        ("user", "alice"),
    ]
    assert [b.subject for b in snapshot.members(None)] == ["alice"]
    assert role_at_least("EDITOR", "VIEWER") and not role_at_least("VIEWER", "EDITOR")

    await registry.revoke("acme", "user", "alice")
    assert registry.snapshot.role("acme", "user", "alice") is None
    assert registry.snapshot.role(None, "user", "alice") == "ADMIN"
    with pytest.raises(NotFound, match="no such binding"):
        await registry.revoke("acme", "user", "alice")


async def test_grant_refuses_unknown_subjects_tenants_and_roles(make: Make) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    await registry.create_user("alice", PASSWORD)
    with pytest.raises(NotFound, match="no such tenant"):
        await registry.grant("ghost", "user", "alice", "VIEWER")
    with pytest.raises(NotFound, match="no such user"):
        await registry.grant("acme", "user", "bob", "VIEWER")
    with pytest.raises(NotFound, match="no such service account"):
        await registry.grant("acme", "service-account", "ci", "VIEWER")
    with pytest.raises(NotFound, match="no such user"):
        await registry.grant("acme", "user", "../../tenants/acme", "VIEWER")
    with pytest.raises(BadRequest, match=r"^role: "):
        await registry.grant("acme", "user", "alice", "OWNER")
    with pytest.raises(BadRequest, match=r"^kind: "):
        await registry.grant("acme", "group", "alice", "VIEWER")
    with pytest.raises(InvalidTenant):
        await registry.grant("../x", "user", "alice", "VIEWER")
    # a soft-deleted tenant keeps (and takes) bindings: a restore brings access back
    await registry.update_tenant("acme", deleted=True)
    await registry.grant("acme", "user", "alice", "VIEWER")
    assert registry.snapshot.role("acme", "user", "alice") == "VIEWER"


async def test_delete_user_removes_its_bindings(make: Make, store: Backend) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    await registry.create_user("alice", PASSWORD)
    await registry.create_user("bob", PASSWORD)
    await registry.grant("acme", "user", "alice", "ADMIN")
    await registry.grant(None, "user", "alice", "VIEWER")
    await registry.grant("acme", "user", "bob", "VIEWER")
    await registry.delete_user("alice")
    assert registry.snapshot.bindings_of("user", "alice") == []
    assert [b.subject for b in registry.snapshot.members("acme")] == ["bob"]
    assert not await store.exists(f"{REGISTRY_PREFIX}/bindings/user/alice/acme.json")
    assert not await store.exists(f"{REGISTRY_PREFIX}/bindings/user/alice/~.json")
    await registry.create_user("alice", PASSWORD)  # the name again: no old bindings
    await registry.load_full()
    assert registry.snapshot.role("acme", "user", "alice") is None


# -- bootstrap ---------------------------------------------------------------------------------


async def test_bootstrap_creates_one_admin_with_a_private_secret_file(
    make: Make, tmp_path: Path
) -> None:
    registry = await make()
    secret_file = tmp_path / "admin.secret"
    password = await registry.ensure_bootstrap_admin(None, None, secret_file)
    assert password is not None and len(password) >= 24
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert secret_file.read_text() == f"admin:{password}\n"
    admin = registry.verify_password("admin", password)
    assert admin is not None and admin.super_admin
    # users exist now: nothing happens, the file stays
    assert await registry.ensure_bootstrap_admin(None, None, tmp_path / "again") is None
    assert not (tmp_path / "again").exists()
    assert list(registry.snapshot.users) == ["admin"]


@MEMORY_ONLY
async def test_bootstrap_with_a_given_password_writes_no_file(make: Make, tmp_path: Path) -> None:
    registry = await make()
    secret_file = tmp_path / "admin.secret"
    assert await registry.ensure_bootstrap_admin("root", PASSWORD, secret_file) is None
    assert not secret_file.exists()
    assert registry.verify_password("root", PASSWORD) is not None


@MEMORY_ONLY
async def test_bootstrap_tightens_an_existing_secret_file(make: Make, tmp_path: Path) -> None:
    registry = await make()
    secret_file = tmp_path / "admin.secret"
    secret_file.write_text("old content that is longer than the new one\n")
    secret_file.chmod(0o644)
    password = await registry.ensure_bootstrap_admin(None, None, secret_file)
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert secret_file.read_text() == f"admin:{password}\n"


async def test_bootstrap_does_nothing_when_users_exist(make: Make, tmp_path: Path) -> None:
    registry = await make()
    await registry.create_user("alice", PASSWORD)
    assert await registry.ensure_bootstrap_admin(None, None, tmp_path / "secret") is None
    assert list(registry.snapshot.users) == ["alice"]
    assert not (tmp_path / "secret").exists()


@pytest.mark.parametrize(
    ("store", "names"),
    [
        ("memory", (None, None)),
        ("local", (None, None)),
        ("s3", (None, None)),
        ("memory", ("alice", "bob")),
        ("local", ("alice", "bob")),
    ],
    indirect=["store"],
)
async def test_two_processes_bootstrapping_at_once_make_one_admin(
    make: Make, tmp_path: Path, names: tuple[str | None, str | None]
) -> None:
    first, second = await make(), await make()
    results = await asyncio.gather(
        first.ensure_bootstrap_admin(names[0], None, tmp_path / "first"),
        second.ensure_bootstrap_admin(names[1], None, tmp_path / "second"),
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    await first.load_full()
    assert len(first.snapshot.users) == 1
    [(username, user)] = first.snapshot.users.items()
    assert user.super_admin
    assert first.verify_password(username, winners[0]) is not None
    winner_file = tmp_path / ("first" if results[0] else "second")
    assert winner_file.read_text() == f"{username}:{winners[0]}\n"


# -- two processes over one store --------------------------------------------------------------


@ALL_BACKENDS
async def test_two_processes_creating_one_tenant_at_once_make_one(make: Make) -> None:
    one, two = await make(), await make()
    results = await asyncio.gather(
        one.create_tenant("acme", "One"),
        two.create_tenant("acme", "Two"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Tenant"]
    [winner] = [r for r in results if isinstance(r, registry_module.Tenant)]
    # the loser learns of it through the feed
    await eventually(lambda: two.snapshot.tenants.get("acme") == winner)
    await eventually(lambda: one.snapshot.tenants.get("acme") == winner)


@ALL_BACKENDS
async def test_changes_reach_another_process_within_two_seconds(make: Make) -> None:
    one, two = await make(), await make()
    await one.create_tenant("acme", "Acme")
    await one.create_user("alice", PASSWORD)
    await one.create_service_account("ci")
    token, plaintext = await one.create_token("ci")
    await one.grant("acme", "user", "alice", "VIEWER")
    await eventually(lambda: two.snapshot.role("acme", "user", "alice") == "VIEWER")
    assert two.snapshot.tenants["acme"] == one.snapshot.tenants["acme"]
    assert two.verify_token(plaintext) is not None
    assert two.verify_password("alice", PASSWORD) is not None

    await one.update_tenant("acme", deleted=True)
    await eventually(lambda: two.snapshot.tenants["acme"].deleted)
    await one.revoke_token(token.id)
    await eventually(lambda: two.verify_token(plaintext) is None)
    await one.update_user("alice", password="a new password")
    await eventually(lambda: two.verify_password("alice", PASSWORD) is None)
    await one.delete_user("alice")
    await eventually(lambda: "alice" not in two.snapshot.users)
    assert two.snapshot.members("acme") == []
    # and the other way round
    await two.create_tenant("beta", "Beta")
    await eventually(lambda: "beta" in one.snapshot.tenants)


@ALL_BACKENDS
async def test_a_refresh_reads_only_the_changed_entities(
    make: Make, store: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = await make()
    for tenant_id in ("a", "b", "c", "d"):
        await one.create_tenant(tenant_id, tenant_id.upper())
    two = await make(refresh_interval=3600)  # refreshed by hand here
    assert set(two.snapshot.tenants) == {"a", "b", "c", "d"}
    await one.create_tenant("e", "E")
    await one.update_tenant("a", name="Alpha")
    reads = Counter(monkeypatch, store, "open_read")
    await two.refresh()
    assert set(two.snapshot.tenants) == {"a", "b", "c", "d", "e"}
    assert two.snapshot.tenants["a"].name == "Alpha"
    # two change records, two tenant documents: nothing else
    assert len(reads.calls) == 4
    assert sum(key.startswith(f"{CHANGES_PREFIX}/") for key in reads.calls) == 2
    reads.calls.clear()
    before = two.snapshot
    await two.refresh()
    assert reads.calls == []
    assert two.snapshot is before


async def test_a_process_silent_past_the_retention_reloads_everything(
    make: Make, store: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = await make()
    await one.create_tenant("acme", "Acme")
    two = await make(refresh_interval=3600)
    await one.create_tenant("beta", "Beta")
    await one.prune_changes(older_than=0)  # the records two has not read are gone
    monkeypatch.setattr(two, "_listed_mono", time.monotonic() - 3600)
    await two.refresh()
    assert set(two.snapshot.tenants) == {"acme", "beta"}


async def test_a_storage_failure_during_refresh_keeps_the_old_snapshot(
    make: Make, store: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = await make()
    await one.create_tenant("acme", "Acme")
    two = await make()
    before = two.snapshot
    assert "acme" in before.tenants
    original_read = store.open_read

    async def broken(key: str) -> Any:
        raise ConnectionError("the store is down")

    # Two's lock held: its background refresh (every 50 ms) must not read beta's records
    # before the store breaks (it did once in CI, and the refresh below then had nothing new).
    async with two._lock:
        await one.create_tenant("beta", "Beta")
        monkeypatch.setattr(store, "open_read", broken)
    with pytest.raises(ConnectionError):
        await two.refresh()
    await asyncio.sleep(0.2)  # the background refresh fails a few times, and goes on
    assert two.snapshot is before
    monkeypatch.setattr(store, "open_read", original_read)
    await eventually(lambda: "beta" in two.snapshot.tenants)
    assert two.snapshot.tenants["acme"] == before.tenants["acme"]


async def test_pruned_change_records_do_not_stop_the_feed(make: Make, store: Backend) -> None:
    one, two = await make(), await make()
    for tenant_id in ("a", "b", "c"):
        await one.create_tenant(tenant_id, tenant_id)
    await eventually(lambda: len(two.snapshot.tenants) == 3)
    assert await one.prune_changes() == 0  # nothing is 10 minutes old
    assert await one.prune_changes(older_than=0) == 3
    assert await two.prune_changes(older_than=0) == 0
    await one.create_tenant("d", "d")
    await eventually(lambda: "d" in two.snapshot.tenants)


async def test_a_malformed_document_is_ignored(make: Make, store: Backend) -> None:
    registry = await make()
    await registry.create_tenant("acme", "Acme")
    await put(store, f"{REGISTRY_PREFIX}/tenants/broken.json", b"{not json")
    await put(store, f"{REGISTRY_PREFIX}/tenants/liar.json", b'{"id":"acme"}')
    await put(store, f"{REGISTRY_PREFIX}/tenants/UPPER.json", b"{}")
    await registry.load_full()
    assert set(registry.snapshot.tenants) == {"acme"}


async def test_token_activity_follows_revocation_and_expiry() -> None:
    token = Token("0" * 16, "ci", "h", "", "2024-01-01T00:00:00.000Z", None, False)
    assert token.active(time.time())
    expiring = Token("0" * 16, "ci", "h", "", "", "2024-01-01T00:00:00.000Z", False)
    assert expiring.active(0) and not expiring.active(time.time())
    assert not Token("0" * 16, "ci", "h", "", "", None, True).active(0)
