"""The authorization matrix: every identity against every route, checked against a table.

One gateway (local backend, tenants enabled with the null tenant served, auth on) is built for
the module and set up through its registry:

- tenants ``acme`` (the target), ``other``, ``gone`` (soft-deleted after some identities held
  roles there); ``nosuch`` is never created;
- users ``viewer`` (VIEWER on acme and on the null tenant), ``editor`` (EDITOR on acme and gone,
  nothing on the null tenant), ``admin`` (ADMIN on acme, the null tenant and gone),
  ``otheradmin`` (ADMIN on other), ``root`` (the bootstrap super admin, no binding), ``creator``
  (may create tenants, no binding); bystanders ``nobody`` and ``victim``;
- service account ``worker`` (EDITOR on acme and gone) with a valid token (``token``), a revoked
  one and an expired one (both were used successfully first, so no cache can remember them).

``EXPECTED`` below is the table, written out: one row per route (tenant routes once per tenant),
one column per identity, the status each cell must answer. A cell is *denied* when its status
is 401 or 403; for every denied cell the test also checks that the storage (every file and
directory under the base path, registry documents included) is unchanged and that the answer
holds no tenant's canary. A 403 about a tenant carries the same body as one about a tenant that
does not exist. Each cell is its own test; the matrix of actual statuses is printed in the
terminal summary (``!`` marks a cell that differed from the table).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from backends.base import Backend
from gateway import config
from gateway.app import ACTIONS, create_app
from gateway.registry import Registry, Snapshot
from gateway.state import BACKEND, REGISTRY, USAGE
from tests.backends.helpers import put as backend_put

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client = TestClient[web.Request, web.Application]

# -- identities ----------------------------------------------------------------------------------

ROOT_PASSWORD: Final = "root-matrix-password-7f3a"
WRONG_PASSWORD: Final = "not-the-admin-password-1"
# short column label -> identity
COLUMNS: Final = {
    "anon": "anonymous",
    "malf": "malformed",
    "wrpw": "wrong-password",
    "revk": "revoked-token",
    "expd": "expired-token",
    "view": "viewer",
    "edit": "editor",
    "admn": "admin",
    "oadm": "otheradmin",
    "root": "root",
    "crea": "creator",
    "tokn": "token",
}
IDENTITIES: Final = tuple(COLUMNS.values())
# identity -> (kind, name) it stands for, where a route names "the caller"
SUBJECTS: Final[Mapping[str, tuple[str, str]]] = {
    "anonymous": ("user", "anonymous"),
    "malformed": ("user", "nobody"),
    "wrong-password": ("user", "admin"),
    "revoked-token": ("service-account", "worker"),
    "expired-token": ("service-account", "worker"),
    "viewer": ("user", "viewer"),
    "editor": ("user", "editor"),
    "admin": ("user", "admin"),
    "otheradmin": ("user", "otheradmin"),
    "root": ("user", "root"),
    "creator": ("user", "creator"),
    "token": ("service-account", "worker"),
}
USERS: Final = ("viewer", "editor", "admin", "otheradmin", "creator", "nobody", "victim")
TENANTS: Final = ("acme", "other", "gone")  # created; "nosuch" never is
# (tenant or None for the null tenant, kind, subject) -> role, before "gone" is deleted
BINDINGS: Final[Mapping[tuple[str | None, str, str], str]] = {
    ("acme", "user", "viewer"): "VIEWER",
    (None, "user", "viewer"): "VIEWER",
    ("acme", "user", "editor"): "EDITOR",
    ("gone", "user", "editor"): "EDITOR",
    ("acme", "user", "admin"): "ADMIN",
    (None, "user", "admin"): "ADMIN",
    ("gone", "user", "admin"): "ADMIN",
    ("other", "user", "otheradmin"): "ADMIN",
    ("acme", "service-account", "worker"): "EDITOR",
    ("gone", "service-account", "worker"): "EDITOR",
}
SCOPES: Final = (None, "acme", "other", "gone", "nosuch")

# -- the expected table ------------------------------------------------------------------------
#
# Rules: anonymous, malformed, wrong password, revoked and expired tokens get 401 everywhere;
# VIEWER reads, EDITOR reads and writes, ADMIN also manages the tenant's bindings and name;
# another tenant's ADMIN gets 403 (body as for a tenant that does not exist); the super admin
# gets 403 on every tenant's files (no binding) and is allowed on every admin route; a deleted
# tenant's files are 403 for everyone. Allowed cells name their exact status.

EXPECTED_TABLE: Final = """
route                      anon malf wrpw revk expd view edit admn oadm root crea tokn
files.get @acme             401  401  401  401  401  200  200  200  403  403  403  200
files.get @null             401  401  401  401  401  200  403  200  403  403  403  403
files.get @other            401  401  401  401  401  403  403  403  200  403  403  403
files.get @gone             401  401  401  401  401  403  403  403  403  403  403  403
files.get @nosuch           401  401  401  401  401  403  403  403  403  403  403  403
files.head @acme            401  401  401  401  401  200  200  200  403  403  403  200
files.head @null            401  401  401  401  401  200  403  200  403  403  403  403
files.head @other           401  401  401  401  401  403  403  403  200  403  403  403
files.head @gone            401  401  401  401  401  403  403  403  403  403  403  403
files.head @nosuch          401  401  401  401  401  403  403  403  403  403  403  403
files.put @acme             401  401  401  401  401  403  201  201  403  403  403  201
files.put @null             401  401  401  401  401  403  403  201  403  403  403  403
files.put @other            401  401  401  401  401  403  403  403  201  403  403  403
files.put @gone             401  401  401  401  401  403  403  403  403  403  403  403
files.put @nosuch           401  401  401  401  401  403  403  403  403  403  403  403
files.delete @acme          401  401  401  401  401  403  204  204  403  403  403  204
files.delete @null          401  401  401  401  401  403  403  204  403  403  403  403
files.delete @other         401  401  401  401  401  403  403  403  204  403  403  403
files.delete @gone          401  401  401  401  401  403  403  403  403  403  403  403
files.delete @nosuch        401  401  401  401  401  403  403  403  403  403  403  403
stats.get @acme             401  401  401  401  401  200  200  200  403  403  403  200
stats.get @null             401  401  401  401  401  200  403  200  403  403  403  403
stats.get @other            401  401  401  401  401  403  403  403  200  403  403  403
stats.get @gone             401  401  401  401  401  403  403  403  403  403  403  403
stats.get @nosuch           401  401  401  401  401  403  403  403  403  403  403  403
list.get @acme              401  401  401  401  401  200  200  200  403  403  403  200
list.get @null              401  401  401  401  401  200  403  200  403  403  403  403
list.get @other             401  401  401  401  401  403  403  403  200  403  403  403
list.get @gone              401  401  401  401  401  403  403  403  403  403  403  403
list.get @nosuch            401  401  401  401  401  403  403  403  403  403  403  403
directories.post @acme      401  401  401  401  401  403  201  201  403  403  403  201
directories.post @null      401  401  401  401  401  403  403  201  403  403  403  403
directories.post @other     401  401  401  401  401  403  403  403  201  403  403  403
directories.post @gone      401  401  401  401  401  403  403  403  403  403  403  403
directories.post @nosuch    401  401  401  401  401  403  403  403  403  403  403  403
move.post @acme             401  401  401  401  401  403  200  200  403  403  403  200
move.post @null             401  401  401  401  401  403  403  200  403  403  403  403
move.post @other            401  401  401  401  401  403  403  403  200  403  403  403
move.post @gone             401  401  401  401  401  403  403  403  403  403  403  403
move.post @nosuch           401  401  401  401  401  403  403  403  403  403  403  403
usage.get @acme             401  401  401  401  401  403  403  200  403  200  403  403
usage.get @null             401  401  401  401  401  403  403  200  403  200  403  403
usage.get @other            401  401  401  401  401  403  403  403  200  200  403  403
usage.get @gone             401  401  401  401  401  403  403  403  403  403  403  403
usage.get @nosuch           401  401  401  401  401  403  403  403  403  403  403  403
purge.post @acme            401  401  401  401  401  403  403  200  403  200  403  403
purge.post @null            401  401  401  401  401  403  403  200  403  200  403  403
purge.post @other           401  401  401  401  401  403  403  403  200  200  403  403
purge.post @gone            401  401  401  401  401  403  403  403  403  403  403  403
purge.post @nosuch          401  401  401  401  401  403  403  403  403  403  403  403
tenants.create              401  401  401  401  401  403  403  403  403  201  201  403
tenants.create @acme        401  401  401  401  401  403  403  403  403  409  409  403
tenants.create @gone        401  401  401  401  401  403  403  403  403  409  409  403
tenants.list                401  401  401  401  401  200  200  200  200  200  200  200
tenant.get @acme            401  401  401  401  401  200  200  200  403  200  403  200
tenant.get @other           401  401  401  401  401  403  403  403  200  200  403  403
tenant.get @gone            401  401  401  401  401  403  403  403  403  200  403  403
tenant.get @nosuch          401  401  401  401  401  403  403  403  403  404  403  403
tenant.rename @acme         401  401  401  401  401  403  403  200  403  200  403  403
tenant.rename @other        401  401  401  401  401  403  403  403  200  200  403  403
tenant.rename @gone         401  401  401  401  401  403  403  403  403  200  403  403
tenant.rename @nosuch       401  401  401  401  401  403  403  403  403  404  403  403
tenant.softdelete @acme     401  401  401  401  401  403  403  403  403  200  403  403
tenant.softdelete @other    401  401  401  401  401  403  403  403  403  200  403  403
tenant.softdelete @nosuch   401  401  401  401  401  403  403  403  403  404  403  403
tenant.undelete @gone       401  401  401  401  401  403  403  403  403  200  403  403
tenant.delete @acme         401  401  401  401  401  403  403  403  403  200  403  403
tenant.delete @other        401  401  401  401  401  403  403  403  403  200  403  403
tenant.delete @gone         401  401  401  401  401  403  403  403  403  200  403  403
tenant.delete @nosuch       401  401  401  401  401  403  403  403  403  404  403  403
tenant.restore @acme        401  401  401  401  401  403  403  403  403  200  403  403
tenant.restore @other       401  401  401  401  401  403  403  403  403  200  403  403
tenant.restore @gone        401  401  401  401  401  403  403  403  403  200  403  403
tenant.restore @nosuch      401  401  401  401  401  403  403  403  403  404  403  403
tenant.purge @acme          401  401  401  401  401  403  403  403  403  400  403  403
tenant.purge @other         401  401  401  401  401  403  403  403  403  400  403  403
tenant.purge @gone          401  401  401  401  401  403  403  403  403  400  403  403
tenant.purge @nosuch        401  401  401  401  401  403  403  403  403  404  403  403
audit.get @acme             401  401  401  401  401  403  403  200  403  200  403  403
audit.get @other            401  401  401  401  401  403  403  403  200  200  403  403
audit.get @gone             401  401  401  401  401  403  403  403  403  200  403  403
audit.get @nosuch           401  401  401  401  401  403  403  403  403  404  403  403
audit.null                  401  401  401  401  401  403  403  200  403  200  403  403
bindings.list @acme         401  401  401  401  401  403  403  200  403  200  403  403
bindings.list @null         401  401  401  401  401  403  403  200  403  200  403  403
bindings.list @other        401  401  401  401  401  403  403  403  200  200  403  403
bindings.list @gone         401  401  401  401  401  403  403  403  403  200  403  403
bindings.list @nosuch       401  401  401  401  401  403  403  403  403  200  403  403
bindings.put @acme          401  401  401  401  401  403  403  200  403  200  403  403
bindings.put @null          401  401  401  401  401  403  403  200  403  200  403  403
bindings.put @other         401  401  401  401  401  403  403  403  200  200  403  403
bindings.put @gone          401  401  401  401  401  403  403  403  403  200  403  403
bindings.put @nosuch        401  401  401  401  401  403  403  403  403  404  403  403
bindings.put-self @acme     401  401  401  401  401  403  403  200  403  200  403  403
bindings.delete @acme       401  401  401  401  401  403  403  204  403  204  403  403
bindings.delete @null       401  401  401  401  401  403  403  204  403  204  403  403
bindings.delete @other      401  401  401  401  401  403  403  403  204  204  403  403
bindings.delete @gone       401  401  401  401  401  403  403  403  403  204  403  403
bindings.delete @nosuch     401  401  401  401  401  403  403  403  403  404  403  403
me                          401  401  401  401  401  200  200  200  200  200  200  200
session.get                 401  401  401  401  401  200  200  200  200  200  200  200
session.post                400  400  400  400  400  400  400  400  400  400  400  400
session.delete              401  401  401  401  401  401  401  401  401  401  401  401
users.list                  401  401  401  401  401  403  403  403  403  200  403  403
users.create                401  401  401  401  401  403  403  403  403  201  403  403
users.update                401  401  401  401  401  403  403  403  403  200  403  403
users.update-self           401  401  401  401  401  403  403  403  403  200  403  403
users.delete                401  401  401  401  401  403  403  403  403  204  403  403
service-accounts.list       401  401  401  401  401  403  403  403  403  200  403  403
service-accounts.create     401  401  401  401  401  403  403  403  403  201  403  403
service-accounts.delete     401  401  401  401  401  403  403  403  403  204  403  403
tokens.list                 401  401  401  401  401  403  403  403  403  200  403  403
tokens.create               401  401  401  401  401  403  403  403  403  201  403  403
tokens.revoke               401  401  401  401  401  403  403  403  403  200  403  403
"""


@dataclass(frozen=True)
class Row:
    index: int
    name: str
    kind: str
    tenant: str | None  # "null" for the null tenant, None for routes without a tenant
    expected: Mapping[str, int]


def _parse_table(text: str) -> tuple[Row, ...]:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    header = lines[0].split()[1:]
    assert tuple(header) == tuple(COLUMNS), header
    rows = []
    for index, line in enumerate(lines[1:]):
        route, _, cells = line.partition("  ")
        statuses = [int(cell) for cell in cells.split()]
        assert len(statuses) == len(COLUMNS), line
        kind, _, tenant = route.strip().partition(" @")
        rows.append(
            Row(
                index,
                route.strip(),
                kind,
                tenant or None,
                dict(zip(IDENTITIES, statuses, strict=True)),
            )
        )
    return tuple(rows)


ROWS: Final = _parse_table(EXPECTED_TABLE)
DENIED: Final = frozenset({401, 403})

# (row name, identity) -> (actual status, or None if the cell failed before answering; as expected)
RESULTS: dict[tuple[str, str], tuple[int | None, bool]] = {}


class _MatrixSummary:
    """Prints the matrix of actual statuses at the end of the run (a pytest plugin)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not RESULTS:
            return
        bad = sum(1 for _, ok in RESULTS.values() if not ok)
        write = terminalreporter.write_line
        terminalreporter.write_sep(
            "=", f"authorization matrix: {len(RESULTS)} cells, {bad} not as expected (!)"
        )
        write(f"{'route':26}" + "".join(f"{label:>6}" for label in COLUMNS))
        for row in ROWS:
            cells = []
            for identity in IDENTITIES:
                found = RESULTS.get((row.name, identity))
                if found is None:
                    cells.append(f"{'.':>6}")
                    continue
                status, ok = found
                text = "ERR" if status is None else str(status)
                cells.append(f"{text + ('' if ok else '!'):>6}")
            write(f"{row.name:26}" + "".join(cells))


@pytest.fixture(scope="module", autouse=True)
def _matrix_summary(pytestconfig: pytest.Config) -> None:
    manager = pytestconfig.pluginmanager
    if manager.get_plugin("access-matrix-summary") is None:
        manager.register(_MatrixSummary(), "access-matrix-summary")


# -- the environment ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    data: bytes | None = None


@dataclass
class Env:
    client: Client
    app: web.Application
    base: Path
    headers: dict[str, dict[str, str]]  # identity -> request headers
    secrets: dict[str, tuple[str, ...]]  # identity -> what its header must never show
    all_secrets: tuple[str, ...]  # every password and token plaintext set up here
    canaries: dict[str, bytes]  # tenant ("null" too) -> content of its canary files
    markers: dict[str, str]  # tenant -> name of a file only it holds
    passwords: dict[str, str]
    valid_token: str
    baseline_tenants: dict[str, tuple[str, bool]] = field(default_factory=dict)
    baseline_bindings: dict[tuple[str | None, str, str], str] = field(default_factory=dict)
    baseline_users: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    _files: dict[tuple[int, int, int, int], tuple[str, ...]] = field(default_factory=dict)

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def backend(self) -> Backend:
        return self.app[BACKEND]

    async def request(self, identity: str, call: Call) -> Response:
        kwargs: dict[str, Any] = {"headers": self.headers[identity]}
        if call.json is not None:
            kwargs["json"] = call.json
        elif call.data is not None:
            kwargs["data"] = call.data
        async with self.client.request(call.method, call.path, **kwargs) as response:
            body = await response.read()
            return Response(response.status, dict(response.headers), body)

    def storage(self) -> dict[str, tuple[str, ...]]:
        """Every directory and file under the base path, with each file's content digest and
        extended attributes (where the local backend keeps metadata)."""
        state: dict[str, tuple[str, ...]] = {}
        pending = [(str(self.base), "")]
        while pending:
            folder, relative = pending.pop()
            state[relative + "/"] = ()
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = relative + "/" + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, name))
                        continue
                    info = entry.stat(follow_symlinks=False)
                    # a write (temporary file, rename), an xattr change: a new inode or ctime
                    signature = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                    found = self._files.get(signature)
                    if found is None:
                        found = self._files[signature] = _fingerprint(entry.path)
                    state[name] = found
        return state

    def physical(self, tenant: str, key: str) -> Path:
        return self.base / (key if tenant == "null" else f"tenants/{tenant}/{key}")


def _fingerprint(path: str) -> tuple[str, ...]:
    """Given a file, return the digest of its content and its extended attributes."""
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        attributes = [f"{a}={os.getxattr(path, a, follow_symlinks=False)!r}" for a in names]
    except OSError:
        attributes = []
    return (digest, *attributes)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def bindings_state(
    snapshot: Snapshot, scopes: tuple[str | None, ...] | None = None
) -> dict[tuple[str | None, str, str], str]:
    """Given a snapshot, return every binding in ``scopes`` (default: every tenant and the
    null tenant) as (tenant, kind, subject) -> role."""
    if scopes is None:
        scopes = (None, *sorted(snapshot.tenants), "nosuch")
    return {(b.tenant, b.kind, b.subject): b.role for s in scopes for b in snapshot.members(s)}


async def restore(env: Env) -> None:
    """Put the registry back as the matrix started: tenants' names and deleted flags, the
    bindings of the base scopes, the base users' flags. Cheap when nothing changed."""
    registry = env.registry
    for tenant_id, (name, deleted) in env.baseline_tenants.items():
        tenant = registry.snapshot.tenants.get(tenant_id)
        assert tenant is not None, f"tenant {tenant_id} vanished from the registry"
        if (tenant.name, tenant.deleted) != (name, deleted):
            await registry.update_tenant(tenant_id, name=name, deleted=deleted)
    for username, (super_admin, can_create) in env.baseline_users.items():
        user = registry.snapshot.users.get(username)
        if user is None:  # only a bug deletes a base user: bring it back
            await registry.create_user(
                username,
                env.passwords[username],
                super_admin=super_admin,
                can_create_tenants=can_create,
            )
        elif (user.super_admin, user.can_create_tenants) != (super_admin, can_create):
            await registry.update_user(
                username, super_admin=super_admin, can_create_tenants=can_create
            )
    current = bindings_state(registry.snapshot, SCOPES)
    for key, role in env.baseline_bindings.items():
        if current.get(key) != role:
            await registry.grant(*key, role)
    for key in current.keys() - env.baseline_bindings.keys():
        await registry.revoke(*key)
    assert registry.verify_token(env.valid_token) is not None, "the valid token stopped working"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("access-matrix")
    base = tmp / "data"
    cfg = config.check(
        {
            "storage.type": "local",
            "storage.local.base-path": str(base),
            "tenants.enabled": True,
            "tenants.default-tenant": True,
            "auth.enabled": True,
            "admin.username": "root",
            "admin.password": ROOT_PASSWORD,
            "admin.password-file": str(tmp / "admin-password.txt"),
            # The matrix sends hundreds of wrong passwords from one address; the budget of
            # failures that would answer them 429 is tested in tests/test_guard.py.
            "auth.sign-in-attempts": 0,
        }
    )
    app = create_app(cfg)
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield await _set_up(client, app, base)
    finally:
        await client.close()


async def _set_up(client: Client, app: web.Application, base: Path) -> Env:
    registry = app[REGISTRY]
    assert "root" in registry.snapshot.users, "the bootstrap super admin was not created"
    for tenant_id in TENANTS:
        await registry.create_tenant(tenant_id, f"{tenant_id} tenant")
    passwords = {name: f"{name}-pw-{secrets.token_hex(6)}" for name in USERS}
    passwords["root"] = ROOT_PASSWORD
    await asyncio.gather(
        *(
            registry.create_user(name, passwords[name], can_create_tenants=name == "creator")
            for name in USERS
        )
    )
    for account in ("worker", "spare", "victim-sa"):
        await registry.create_service_account(account, f"{account} account")
    for (tenant, kind, subject), role in BINDINGS.items():
        await registry.grant(tenant, kind, subject, role)
    _, valid = await registry.create_token("worker", description="valid")
    revoked_token, revoked = await registry.create_token("worker", description="to revoke")
    _, expired = await registry.create_token("worker", description="short", expires_in=1.5)
    expires_at = time.time() + 1.5
    canaries = {t: f"CANARY-{t}-{secrets.token_hex(8)}".encode() for t in ("null", *TENANTS)}
    markers = {t: f"only-{t}-{secrets.token_hex(4)}.txt" for t in canaries}
    for tenant, content in canaries.items():
        prefix = "" if tenant == "null" else f"tenants/{tenant}/"
        await backend_put(app[BACKEND], f"{prefix}canary/secret.txt", content)
        await backend_put(app[BACKEND], f"{prefix}canary/{markers[tenant]}", content)

    headers: dict[str, dict[str, str]] = {
        "anonymous": {},
        "malformed": {"Authorization": "Basic !!!not*base64!!!"},
        "wrong-password": {"Authorization": _basic("admin", WRONG_PASSWORD)},
        "revoked-token": {"Authorization": f"Bearer {revoked}"},
        "expired-token": {"Authorization": f"Bearer {expired}"},
        "token": {"Authorization": f"Bearer {valid}"},
    }
    for name in ("viewer", "editor", "admin", "otheradmin", "root", "creator"):
        headers[name] = {"Authorization": _basic(name, passwords[name])}
    identity_secrets: dict[str, tuple[str, ...]] = {}
    for identity, sent in headers.items():
        value = sent.get("Authorization", "")
        parts = {value, value.partition(" ")[2]}
        name = SUBJECTS[identity][1]
        parts |= {passwords.get(name, ""), WRONG_PASSWORD if identity == "wrong-password" else ""}
        identity_secrets[identity] = tuple(p for p in parts if len(p) >= 8)
    env = Env(
        client=client,
        app=app,
        base=base,
        headers=headers,
        secrets=identity_secrets,
        all_secrets=(*passwords.values(), WRONG_PASSWORD, valid, revoked, expired),
        canaries=canaries,
        markers=markers,
        passwords=passwords,
        valid_token=valid,
    )

    # Every credential works once (warming any cache), the revoked and expired tokens too.
    for identity in ("viewer", "editor", "admin", "otheradmin", "root", "creator", "token"):
        response = await env.request(identity, Call("GET", "/api/v1/me"))
        assert response.status == 200, (identity, response)
    for identity in ("revoked-token", "expired-token"):
        response = await env.request(identity, Call("GET", "/api/v1/acme/files/canary/secret.txt"))
        assert (response.status, response.body) == (200, canaries["acme"]), identity
    response = await env.request("wrong-password", Call("GET", "/api/v1/me"))
    assert response.status == 401
    # Those who hold roles on gone use them, then gone is deleted.
    for identity in ("admin", "editor", "token"):
        response = await env.request(identity, Call("GET", "/api/v1/gone/files/canary/secret.txt"))
        assert (response.status, response.body) == (200, canaries["gone"]), identity
    await registry.revoke_token(revoked_token.id)
    await registry.update_tenant("gone", deleted=True)
    await asyncio.sleep(max(0.0, expires_at - time.time() + 0.2))
    for identity in ("revoked-token", "expired-token"):
        response = await env.request(identity, Call("GET", "/api/v1/me"))
        assert response.status == 401, identity

    snapshot = registry.snapshot
    env.baseline_tenants = {
        t: (snapshot.tenants[t].name, snapshot.tenants[t].deleted) for t in TENANTS
    }
    env.baseline_bindings = bindings_state(snapshot, SCOPES)
    assert env.baseline_bindings == dict(BINDINGS)
    env.baseline_users = {
        name: (snapshot.users[name].super_admin, snapshot.users[name].can_create_tenants)
        for name in (*USERS, "root")
        if name != "victim"
    }
    return env


# -- the routes --------------------------------------------------------------------------------


@dataclass
class Cell:
    env: Env
    row: Row
    identity: str
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"r{self.row.index}-{self.identity}"

    @property
    def tenant(self) -> str:
        assert self.row.tenant is not None
        return self.row.tenant

    @property
    def caller(self) -> tuple[str, str]:
        return SUBJECTS[self.identity]


CallMaker = Callable[[Cell, str], Call]
Hook = Callable[[Cell], Awaitable[None]]
After = Callable[[Cell, Response], Awaitable[None]]


@dataclass(frozen=True)
class Kind:
    """What a row's requests are: the route it covers, how to build the request for a tenant,
    what to prepare, and what an allowed answer must have done (then undo it)."""

    route: tuple[str, str]  # (method, "files" | registered admin path)
    make: CallMaker
    setup: Hook | None = None
    after_allowed: After | None = None
    cleanup: Hook | None = None
    object_route: bool = False
    compare_nosuch: bool = True  # a 403 about a tenant has the body of one about "nosuch"
    changes_bindings: bool = False


def _api(tenant: str) -> str:
    return "/api/v1/" if tenant == "null" else f"/api/v1/{tenant}/"


def _scope(tenant: str) -> str | None:
    return None if tenant == "null" else tenant


async def _write(cell: Cell, key: str, data: bytes) -> None:
    if cell.tenant != "nosuch":
        prefix = "" if cell.tenant == "null" else f"tenants/{cell.tenant}/"
        await backend_put(cell.env.backend, prefix + key, data)


def _remove(cell: Cell, *keys: str) -> None:
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            cell.env.physical(cell.tenant, key).unlink()


async def _check_read(cell: Cell, response: Response) -> None:
    assert response.body == cell.env.canaries[cell.tenant]


async def _check_head(cell: Cell, response: Response) -> None:
    assert response.body == b""
    assert response.headers["Content-Length"] == str(len(cell.env.canaries[cell.tenant]))


async def _check_put(cell: Cell, response: Response) -> None:
    path = cell.env.physical(cell.tenant, f"matrix/put-{cell.tag}.txt")
    assert path.read_bytes() == cell.tag.encode()


async def _cleanup_put(cell: Cell) -> None:
    _remove(cell, f"matrix/put-{cell.tag}.txt")


async def _setup_delete(cell: Cell) -> None:
    await _write(cell, f"victims/del-{cell.tag}.txt", b"victim")


async def _check_delete(cell: Cell, response: Response) -> None:
    assert not cell.env.physical(cell.tenant, f"victims/del-{cell.tag}.txt").exists()


async def _cleanup_delete(cell: Cell) -> None:
    _remove(cell, f"victims/del-{cell.tag}.txt")


async def _check_stat(cell: Cell, response: Response) -> None:
    body = response.json()
    assert (body["key"], body["size"]) == ("canary/secret.txt", len(cell.env.canaries[cell.tenant]))


async def _check_list(cell: Cell, response: Response) -> None:
    keys = {entry["key"] for entry in response.json()["entries"]}
    assert {"canary/secret.txt", f"canary/{cell.env.markers[cell.tenant]}"} <= keys


async def _check_mkdir(cell: Cell, response: Response) -> None:
    assert cell.env.physical(cell.tenant, f"matrix/dir-{cell.tag}").is_dir()


async def _cleanup_mkdir(cell: Cell) -> None:
    with contextlib.suppress(OSError):
        cell.env.physical(cell.tenant, f"matrix/dir-{cell.tag}").rmdir()


async def _setup_move(cell: Cell) -> None:
    await _write(cell, f"victims/mv-{cell.tag}.txt", b"to move")


async def _check_move(cell: Cell, response: Response) -> None:
    assert not cell.env.physical(cell.tenant, f"victims/mv-{cell.tag}.txt").exists()
    assert cell.env.physical(cell.tenant, f"moved/mv-{cell.tag}.txt").read_bytes() == b"to move"


async def _cleanup_move(cell: Cell) -> None:
    _remove(cell, f"victims/mv-{cell.tag}.txt", f"moved/mv-{cell.tag}.txt")


def _object(method: str, word: str, make: CallMaker, **hooks: Any) -> Kind:
    return Kind((method, word), make, object_route=True, **hooks)


def _binding_body(cell: Cell, tenant: str, role: str | None = "VIEWER") -> dict[str, Any]:
    body: dict[str, Any] = {"tenant": _scope(tenant), "kind": "user", "subject": "nobody"}
    if role is not None:
        body["role"] = role
    return body


async def _setup_unbind(cell: Cell) -> None:
    if cell.tenant != "nosuch":
        await cell.env.registry.grant(_scope(cell.tenant), "user", "nobody", "VIEWER")


def _role(cell: Cell, tenant: str, kind: str, subject: str) -> str | None:
    return cell.env.registry.snapshot.role(_scope(tenant), kind, subject)


async def _check_bound(cell: Cell, response: Response) -> None:
    assert _role(cell, cell.tenant, "user", "nobody") == "VIEWER"


async def _check_self_bound(cell: Cell, response: Response) -> None:
    assert _role(cell, cell.tenant, *cell.caller) == "ADMIN"


async def _check_unbound(cell: Cell, response: Response) -> None:
    assert _role(cell, cell.tenant, "user", "nobody") is None


async def _check_created_tenant(cell: Cell, response: Response) -> None:
    tenant_id = f"t-{cell.tag}"
    assert response.json()["id"] == tenant_id
    role = _role(cell, tenant_id, *cell.caller)
    # The seed: the creator gets the Admin role, except a super admin.
    assert role == (None if cell.identity == "root" else "ADMIN")


async def _check_tenant(cell: Cell, response: Response) -> None:
    assert response.json()["id"] == cell.tenant


async def _check_renamed(cell: Cell, response: Response) -> None:
    assert cell.env.registry.snapshot.tenants[cell.tenant].name == f"renamed {cell.tag}"


def _deleted_is(flag: bool) -> After:
    async def check(cell: Cell, response: Response) -> None:
        assert cell.env.registry.snapshot.tenants[cell.tenant].deleted is flag

    return check


async def _check_me(cell: Cell, response: Response) -> None:
    body = response.json()
    assert (body["kind"], body["name"]) == cell.caller


async def _cleanup_new_user(cell: Cell) -> None:
    if f"new-{cell.tag}" in cell.env.registry.snapshot.users:
        await cell.env.registry.delete_user(f"new-{cell.tag}")


async def _check_nobody_can_create(cell: Cell, response: Response) -> None:
    assert cell.env.registry.snapshot.users["nobody"].can_create_tenants is True


async def _ensure_victim(cell: Cell) -> None:
    if "victim" not in cell.env.registry.snapshot.users:
        await cell.env.registry.create_user("victim", cell.env.passwords["victim"])


async def _check_victim_gone(cell: Cell, response: Response) -> None:
    assert "victim" not in cell.env.registry.snapshot.users


async def _cleanup_new_account(cell: Cell) -> None:
    if f"new-{cell.tag}" in cell.env.registry.snapshot.service_accounts:
        await cell.env.registry.delete_service_account(f"new-{cell.tag}")


async def _ensure_victim_account(cell: Cell) -> None:
    if "victim-sa" not in cell.env.registry.snapshot.service_accounts:
        await cell.env.registry.create_service_account("victim-sa")


async def _check_victim_account_gone(cell: Cell, response: Response) -> None:
    assert "victim-sa" not in cell.env.registry.snapshot.service_accounts


async def _check_new_token(cell: Cell, response: Response) -> None:
    body = response.json()
    cell.state["new_token"] = body["id"]
    found = cell.env.registry.verify_token(body["token"])
    assert found is not None and found[1].name == "worker"


async def _cleanup_new_token(cell: Cell) -> None:
    for token in cell.env.registry.snapshot.tokens.values():
        if token.description == cell.tag and not token.revoked:
            await cell.env.registry.revoke_token(token.id)


async def _setup_spare_token(cell: Cell) -> None:
    token, plaintext = await cell.env.registry.create_token("spare", description=cell.tag)
    cell.state["token_id"], cell.state["plaintext"] = token.id, plaintext


async def _check_spare_revoked(cell: Cell, response: Response) -> None:
    assert cell.env.registry.verify_token(cell.state["plaintext"]) is None


def _tenants_query(tenant: str) -> str:
    return "/api/v1/bindings" if tenant == "null" else f"/api/v1/bindings?tenant={tenant}"


KINDS: Final[Mapping[str, Kind]] = {
    # object routes, on each tenant
    "files.get": _object(
        "GET",
        "files",
        lambda c, t: Call("GET", f"{_api(t)}files/canary/secret.txt"),
        after_allowed=_check_read,
    ),
    "files.head": _object(
        "HEAD",
        "files",
        lambda c, t: Call("HEAD", f"{_api(t)}files/canary/secret.txt"),
        after_allowed=_check_head,
    ),
    "files.put": _object(
        "PUT",
        "files",
        lambda c, t: Call("PUT", f"{_api(t)}files/matrix/put-{c.tag}.txt", data=c.tag.encode()),
        after_allowed=_check_put,
        cleanup=_cleanup_put,
    ),
    "files.delete": _object(
        "DELETE",
        "files",
        lambda c, t: Call("DELETE", f"{_api(t)}files/victims/del-{c.tag}.txt"),
        setup=_setup_delete,
        after_allowed=_check_delete,
        cleanup=_cleanup_delete,
    ),
    "stats.get": _object(
        "GET",
        "stats",
        lambda c, t: Call("GET", f"{_api(t)}stats/canary/secret.txt"),
        after_allowed=_check_stat,
    ),
    "list.get": _object(
        "GET",
        "list",
        lambda c, t: Call("GET", f"{_api(t)}list?recursive=true"),
        after_allowed=_check_list,
    ),
    "directories.post": _object(
        "POST",
        "directories",
        lambda c, t: Call("POST", f"{_api(t)}directories/matrix/dir-{c.tag}"),
        after_allowed=_check_mkdir,
        cleanup=_cleanup_mkdir,
    ),
    "move.post": _object(
        "POST",
        "move",
        lambda c, t: Call(
            "POST",
            f"{_api(t)}move",
            json={"from": f"victims/mv-{c.tag}.txt", "to": f"moved/mv-{c.tag}.txt"},
        ),
        setup=_setup_move,
        after_allowed=_check_move,
        cleanup=_cleanup_move,
    ),
    # usage and purge: the tenant's ADMIN or a super admin (a dry run: nothing goes)
    "usage.get": _object("GET", "usage", lambda c, t: Call("GET", f"{_api(t)}usage")),
    "purge.post": _object(
        "POST",
        "purge",
        lambda c, t: Call("POST", f"{_api(t)}purge", json={"olderThan": "1s", "dryRun": True}),
    ),
    # tenants
    "tenants.create": Kind(
        ("POST", "/api/v1/tenants"),
        lambda c, t: Call("POST", "/api/v1/tenants", json={"id": f"t-{c.tag}", "name": c.tag}),
        after_allowed=_check_created_tenant,
        changes_bindings=True,
    ),
    # an id that is taken (by a live or a soft-deleted tenant): no takeover, no role
    "tenants.create@": Kind(
        ("POST", "/api/v1/tenants"),
        lambda c, t: Call("POST", "/api/v1/tenants", json={"id": t, "name": "taken"}),
        compare_nosuch=False,  # POST {"id": "nosuch"} would create it
    ),
    "tenants.list": Kind(("GET", "/api/v1/tenants"), lambda c, t: Call("GET", "/api/v1/tenants")),
    "tenant.get": Kind(
        ("GET", "/api/v1/tenants/{tenant}"),
        lambda c, t: Call("GET", f"/api/v1/tenants/{t}"),
        after_allowed=_check_tenant,
    ),
    "tenant.rename": Kind(
        ("PUT", "/api/v1/tenants/{tenant}"),
        lambda c, t: Call("PUT", f"/api/v1/tenants/{t}", json={"name": f"renamed {c.tag}"}),
        after_allowed=_check_renamed,
    ),
    "tenant.softdelete": Kind(
        ("PUT", "/api/v1/tenants/{tenant}"),
        lambda c, t: Call("PUT", f"/api/v1/tenants/{t}", json={"deleted": True}),
        after_allowed=_deleted_is(True),
    ),
    "tenant.undelete": Kind(
        ("PUT", "/api/v1/tenants/{tenant}"),
        lambda c, t: Call("PUT", f"/api/v1/tenants/{t}", json={"deleted": False}),
        after_allowed=_deleted_is(False),
    ),
    "tenant.delete": Kind(
        ("DELETE", "/api/v1/tenants/{tenant}"),
        lambda c, t: Call("DELETE", f"/api/v1/tenants/{t}"),
        after_allowed=_deleted_is(True),
    ),
    "tenant.restore": Kind(
        ("POST", "/api/v1/tenants/{tenant}/restore"),
        lambda c, t: Call("POST", f"/api/v1/tenants/{t}/restore"),
        after_allowed=_deleted_is(False),
    ),
    # deleting a tenant with its data: a super admin only (here a wrong confirmation, 400:
    # past authorization, and every tenant of the table survives)
    "tenant.purge": Kind(
        ("POST", "/api/v1/tenants/{tenant}/purge"),
        lambda c, t: Call("POST", f"/api/v1/tenants/{t}/purge", json={"confirm": f"x{t}"}),
    ),
    # audit logs: the tenant's ADMIN or a super admin
    "audit.get": Kind(
        ("GET", "/api/v1/tenants/{tenant}/audit"),
        lambda c, t: Call("GET", f"/api/v1/tenants/{t}/audit"),
    ),
    "audit.null": Kind(("GET", "/api/v1/audit"), lambda c, t: Call("GET", "/api/v1/audit")),
    # bindings
    "bindings.list": Kind(("GET", "/api/v1/bindings"), lambda c, t: Call("GET", _tenants_query(t))),
    "bindings.put": Kind(
        ("PUT", "/api/v1/bindings"),
        lambda c, t: Call("PUT", "/api/v1/bindings", json=_binding_body(c, t)),
        after_allowed=_check_bound,
        changes_bindings=True,
    ),
    "bindings.put-self": Kind(
        ("PUT", "/api/v1/bindings"),
        lambda c, t: Call(
            "PUT",
            "/api/v1/bindings",
            json={
                "tenant": _scope(t),
                "kind": c.caller[0],
                "subject": c.caller[1],
                "role": "ADMIN",
            },
        ),
        after_allowed=_check_self_bound,
        changes_bindings=True,
    ),
    "bindings.delete": Kind(
        ("DELETE", "/api/v1/bindings"),
        lambda c, t: Call("DELETE", "/api/v1/bindings", json=_binding_body(c, t, None)),
        setup=_setup_unbind,
        after_allowed=_check_unbound,
        changes_bindings=True,
    ),
    # identities
    "me": Kind(
        ("GET", "/api/v1/me"), lambda c, t: Call("GET", "/api/v1/me"), after_allowed=_check_me
    ),
    # the web UI's session: GET answers any credential as /me does; a sign-in is a form (not
    # a header), and sign-out needs the session cookie
    "session.get": Kind(
        ("GET", "/api/v1/session"),
        lambda c, t: Call("GET", "/api/v1/session"),
        after_allowed=_check_me,
    ),
    "session.post": Kind(("POST", "/api/v1/session"), lambda c, t: Call("POST", "/api/v1/session")),
    "session.delete": Kind(
        ("DELETE", "/api/v1/session"), lambda c, t: Call("DELETE", "/api/v1/session")
    ),
    "users.list": Kind(("GET", "/api/v1/users"), lambda c, t: Call("GET", "/api/v1/users")),
    "users.create": Kind(
        ("POST", "/api/v1/users"),
        lambda c, t: Call(
            "POST", "/api/v1/users", json={"username": f"new-{c.tag}", "password": f"pw-{c.tag}"}
        ),
        cleanup=_cleanup_new_user,
    ),
    "users.update": Kind(
        ("PATCH", "/api/v1/users/{username}"),
        lambda c, t: Call("PATCH", "/api/v1/users/nobody", json={"canCreateTenants": True}),
        after_allowed=_check_nobody_can_create,
    ),
    "users.update-self": Kind(
        ("PATCH", "/api/v1/users/{username}"),
        lambda c, t: Call("PATCH", f"/api/v1/users/{c.caller[1]}", json={"superAdmin": True}),
    ),
    "users.delete": Kind(
        ("DELETE", "/api/v1/users/{username}"),
        lambda c, t: Call("DELETE", "/api/v1/users/victim"),
        setup=_ensure_victim,
        after_allowed=_check_victim_gone,
    ),
    "service-accounts.list": Kind(
        ("GET", "/api/v1/service-accounts"), lambda c, t: Call("GET", "/api/v1/service-accounts")
    ),
    "service-accounts.create": Kind(
        ("POST", "/api/v1/service-accounts"),
        lambda c, t: Call("POST", "/api/v1/service-accounts", json={"name": f"new-{c.tag}"}),
        cleanup=_cleanup_new_account,
    ),
    "service-accounts.delete": Kind(
        ("DELETE", "/api/v1/service-accounts/{name}"),
        lambda c, t: Call("DELETE", "/api/v1/service-accounts/victim-sa"),
        setup=_ensure_victim_account,
        after_allowed=_check_victim_account_gone,
    ),
    "tokens.list": Kind(
        ("GET", "/api/v1/service-accounts/{name}/tokens"),
        lambda c, t: Call("GET", "/api/v1/service-accounts/worker/tokens"),
    ),
    "tokens.create": Kind(
        ("POST", "/api/v1/service-accounts/{name}/tokens"),
        lambda c, t: Call(
            "POST", "/api/v1/service-accounts/worker/tokens", json={"description": c.tag}
        ),
        after_allowed=_check_new_token,
        cleanup=_cleanup_new_token,
    ),
    "tokens.revoke": Kind(
        ("DELETE", "/api/v1/tokens/{token}"),
        lambda c, t: Call("DELETE", f"/api/v1/tokens/{c.state['token_id']}"),
        setup=_setup_spare_token,
        after_allowed=_check_spare_revoked,
        cleanup=_cleanup_new_token,
    ),
}


def _kind_of(row: Row) -> Kind:
    # "tenants.create @acme" is the taken-id variant of "tenants.create"
    if row.kind == "tenants.create" and row.tenant is not None:
        return KINDS["tenants.create@"]
    return KINDS[row.kind]


# -- the cells ---------------------------------------------------------------------------------


def _describe(identity: str, call: Call) -> str:
    body = "" if call.json is None else f" {json.dumps(call.json)}"
    body += "" if call.data is None else f" <{len(call.data)} bytes>"
    return f"{call.method} {call.path}{body} as {identity}"


def _leaks(text: bytes, needles: list[bytes]) -> list[bytes]:
    return [needle for needle in needles if needle and needle in text]


def _storage_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return f"added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"


def _is_member(env: Env, identity: str, tenant: str) -> bool:
    kind, name = SUBJECTS[identity]
    return (_scope(tenant), kind, name) in env.baseline_bindings


@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize("row", ROWS, ids=[row.name.replace(" ", "") for row in ROWS])
async def test_cell(env: Env, row: Row, identity: str) -> None:
    kind = _kind_of(row)
    expected = row.expected[identity]
    cell = Cell(env, row, identity)
    tenant = row.tenant or "-"
    RESULTS[(row.name, identity)] = (None, False)
    try:
        if kind.setup is not None:
            await kind.setup(cell)
        call = kind.make(cell, tenant)
        where = _describe(identity, call)
        await env.app[USAGE].flush()  # the usage counts of earlier requests, written now
        storage_before = env.storage()
        bindings_before = bindings_state(env.registry.snapshot)
        response = await env.request(identity, call)
        RESULTS[(row.name, identity)] = (response.status, response.status == expected)
        answer = response.body[:400].decode(errors="replace")
        assert response.status == expected, (
            f"{where}: expected {expected}, got {response.status}: {answer}"
        )

        # What an answer shows, allowed or not: never a secret the caller sent, nor any other
        # password or token; never another tenant's data.
        shown = response.body + "\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode()
        sent = [s.encode() for s in (*env.secrets[identity], *env.all_secrets)]
        assert not _leaks(shown, sent), f"{where}: the answer shows a credential"
        others = [t for t in env.canaries if t != row.tenant or not kind.object_route]
        if expected in DENIED:
            others = list(env.canaries)
        foreign = [env.canaries[t] for t in others] + [env.markers[t].encode() for t in others]
        assert not _leaks(shown, foreign), f"{where}: the answer shows a tenant's canary: {answer}"

        if response.status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            if row.kind.startswith("session.") and (
                identity == "anonymous" or row.kind == "session.delete"
            ):
                # The web UI's routes without a session: a challenge that opens no browser
                # password dialog.
                assert challenge == 'Session realm="gateway"', f"{where}: {challenge!r}"
            else:
                assert "Basic" in challenge and "Bearer" in challenge, f"{where}: {challenge!r}"

        if expected in DENIED:
            if (
                response.status == 403
                and kind.compare_nosuch
                and row.tenant in ("acme", "other", "gone")
                and (
                    kind.object_route
                    or row.tenant == "gone"
                    or not _is_member(env, identity, row.tenant)
                )
            ):
                twin = kind.make(cell, "nosuch")
                unknown = await env.request(identity, twin)
                assert (unknown.status, unknown.body) == (response.status, response.body), (
                    f"{where} answers {response.body!r}, but {_describe(identity, twin)} "
                    f"answers {unknown.status} {unknown.body!r}: the tenant's existence leaks"
                )
            storage_after = env.storage()
            assert storage_after == storage_before, (
                f"{where} was refused ({response.status}) but changed the storage: "
                f"{_storage_diff(storage_before, storage_after)}"
            )
            assert bindings_state(env.registry.snapshot) == bindings_before, where
        else:
            if kind.after_allowed is not None and 200 <= response.status < 300:
                await kind.after_allowed(cell, response)
            if not kind.changes_bindings:
                assert bindings_state(env.registry.snapshot) == bindings_before, (
                    f"{where} changed role bindings"
                )
    finally:
        if kind.cleanup is not None:
            await kind.cleanup(cell)
        await restore(env)


# -- the table covers every route --------------------------------------------------------------


async def test_table_covers_every_route_for_every_tenant() -> None:
    app = create_app(config.check({"storage.type": "memory", "tenants.enabled": True}))
    registered = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"  # aiohttp's automatic HEAD of each GET: test_head_*
        and route.resource.canonical.startswith("/api/v1/")
        and "{tail}" not in route.resource.canonical
    }
    covered = {_kind_of(row).route for row in ROWS}
    assert registered - covered == set(), "admin routes missing from the table"
    tenants = {"acme", "null", "other", "gone", "nosuch"}
    for word, methods in ACTIONS.items():
        for method in methods:
            seen = {row.tenant for row in ROWS if _kind_of(row).route == (method, word)}
            assert seen == tenants, (method, word, seen)
    assert len(ROWS) * len(IDENTITIES) >= 1000


async def test_head_of_admin_get_routes_answers_like_get(env: Env) -> None:
    paths = [
        "/api/v1/tenants",
        "/api/v1/tenants/acme",
        "/api/v1/bindings?tenant=acme",
        "/api/v1/me",
        "/api/v1/users",
        "/api/v1/service-accounts",
        "/api/v1/service-accounts/worker/tokens",
    ]
    for path in paths:
        for identity in ("anonymous", "expired-token", "viewer", "otheradmin", "root"):
            get = await env.request(identity, Call("GET", path))
            head = await env.request(identity, Call("HEAD", path))
            assert head.status == get.status, (path, identity)
            assert head.body == b""
            if head.status == 401:
                assert "Bearer" in head.headers.get("WWW-Authenticate", "")


# -- around the matrix -------------------------------------------------------------------------

BODY_ROUTES: Final = (
    ("POST", "/api/v1/tenants"),
    ("PUT", "/api/v1/tenants/acme"),
    ("PUT", "/api/v1/bindings"),
    ("DELETE", "/api/v1/bindings"),
    ("POST", "/api/v1/users"),
    ("PATCH", "/api/v1/users/nobody"),
    ("POST", "/api/v1/service-accounts"),
    ("POST", "/api/v1/service-accounts/worker/tokens"),
    ("POST", "/api/v1/acme/move"),
    ("PUT", "/api/v1/acme/files/x.txt"),
)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"role": "OWNER", "kind": 5}'])
@pytest.mark.parametrize("method,path", BODY_ROUTES)
async def test_unauthenticated_request_with_a_bad_body_gets_401_not_a_validation_error(
    env: Env, method: str, path: str, body: bytes
) -> None:
    before = env.storage()
    for identity in ("anonymous", "malformed", "wrong-password", "revoked-token"):
        response = await env.request(identity, Call(method, path, data=body))
        assert response.status == 401, (
            f"{method} {path} with body {body!r} as {identity}: expected 401, got "
            f"{response.status}: {response.body[:300]!r}"
        )
        assert "Basic" in response.headers.get("WWW-Authenticate", "")
    assert env.storage() == before


MALFORMED: Final = (
    "Basic",
    "Basic ",
    "Basic !!!",
    "Basic " + base64.b64encode(b"no-colon-here").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
    "Basic " + base64.b64encode(b":").decode(),
    "Basic " + base64.b64encode(b"root:").decode(),
    "Basic " + base64.b64encode(f"root:{ROOT_PASSWORD}x".encode()).decode(),
    "Basic " + base64.b64encode(f"ROOT:{ROOT_PASSWORD}".encode()).decode(),
    "Basic " + base64.b64encode(f"root :{ROOT_PASSWORD}".encode()).decode(),
    "Bearer",
    "Bearer ",
    "Bearer gwt_",
    "Bearer gwt_0123456789abcdef_" + "A" * 43,
    "Bearer " + "x" * 5000,
    "Digest username=root",
    "Token abc",
    "Negotiate YIIB",
    f"{ROOT_PASSWORD}",
)


@pytest.mark.parametrize("value", MALFORMED)
async def test_malformed_or_wrong_authorization_gets_401_and_is_not_echoed(
    env: Env, value: str
) -> None:
    for path in ("/api/v1/acme/files/canary/secret.txt", "/api/v1/me", "/api/v1/users"):
        async with env.client.get(path, headers={"Authorization": value}) as response:
            body = await response.read()
            assert response.status == 401, (value, path, response.status, body)
            challenge = response.headers.get("WWW-Authenticate", "")
            assert "Basic" in challenge and "Bearer" in challenge
            shown = body + str(dict(response.headers)).encode()
            secret = value.partition(" ")[2].strip()
            assert len(secret) < 8 or secret.encode() not in shown, (value, body)
            assert ROOT_PASSWORD.encode() not in shown
            assert env.canaries["acme"] not in body


async def test_scheme_names_are_case_insensitive_and_still_authenticate(env: Env) -> None:
    value = env.headers["viewer"]["Authorization"].replace("Basic", "bAsIc", 1)
    async with env.client.get("/api/v1/me", headers={"Authorization": value}) as response:
        assert response.status == 200


async def test_other_tenant_admin_gets_the_body_of_a_tenant_that_does_not_exist(env: Env) -> None:
    object_rows = [r for r in ROWS if _kind_of(r).object_route and r.tenant == "acme"]
    for row in object_rows:
        pairs = [("otheradmin", "acme"), ("admin", "gone"), ("root", "acme")]
        if _kind_of(row).route[1] in ("usage", "purge"):
            pairs.pop()  # a super admin manages every tenant's usage and purges (not its files)
        for identity, tenant in pairs:
            cell = Cell(env, row, identity)
            known = await env.request(identity, _kind_of(row).make(cell, tenant))
            unknown = await env.request(identity, _kind_of(row).make(cell, "nosuch"))
            assert known.status == unknown.status == 403, (row.name, identity, tenant)
            assert known.body == unknown.body, (row.name, identity, known.body, unknown.body)
            assert "acme" not in known.body.decode() and "gone" not in known.body.decode()


async def test_tenant_listing_shows_only_the_tenants_the_caller_can_use(env: Env) -> None:
    visible = {}
    for identity in ("viewer", "editor", "admin", "otheradmin", "creator", "token", "root"):
        response = await env.request(identity, Call("GET", "/api/v1/tenants"))
        assert response.status == 200
        visible[identity] = {tenant["id"] for tenant in response.json()}
    for identity in ("viewer", "editor", "admin", "token"):
        assert visible[identity] == {"acme"}, identity
    assert visible["otheradmin"] == {"other"}
    assert not visible["creator"] & {"acme", "other", "gone"}
    assert {"acme", "other", "gone"} <= visible["root"]


async def test_changes_to_credentials_and_roles_apply_at_once(env: Env) -> None:
    """The verification cache and the snapshot never outlive a change."""
    registry = env.registry
    tag = secrets.token_hex(3)
    name, first, second = f"churn-{tag}", f"first-{tag}-pw", f"second-{tag}-pw"
    await registry.create_user(name, first)
    await registry.grant("acme", "user", name, "EDITOR")
    path = f"/api/v1/acme/files/churn-{tag}.txt"

    async def status(method: str, password: str) -> int:
        headers = {"Authorization": _basic(name, password)}
        async with env.client.request(method, path, headers=headers, data=b"x") as response:
            return response.status

    try:
        assert await status("PUT", first) == 201
        await registry.grant("acme", "user", name, "VIEWER")  # demoted
        assert await status("PUT", first) == 403
        assert await status("GET", first) == 200
        await registry.update_user(name, password=second)  # the old password, cached, must go
        assert await status("GET", first) == 401
        assert await status("GET", second) == 200
        await registry.revoke("acme", "user", name)
        assert await status("GET", second) == 403
        await registry.grant("acme", "user", name, "ADMIN")
        assert await status("GET", second) == 200
        await registry.update_tenant("acme", deleted=True)
        try:
            assert await status("GET", second) == 403
        finally:
            await registry.update_tenant("acme", deleted=False)
        assert await status("GET", second) == 200
        await registry.delete_user(name)  # its cached password must not outlive it
        assert await status("GET", second) == 401
        await registry.create_user(name, f"third-{tag}-pw")  # same name, no inherited roles
        headers = {"Authorization": _basic(name, f"third-{tag}-pw")}
        async with env.client.get(path, headers=headers) as response:
            assert response.status == 403
    finally:
        with contextlib.suppress(Exception):
            await registry.delete_user(name)
        _remove(Cell(env, ROWS[0], "admin"), f"churn-{tag}.txt")
        await restore(env)


async def test_a_deleted_service_account_s_token_stops_working(env: Env) -> None:
    registry = env.registry
    account = f"churn-{secrets.token_hex(3)}"
    await registry.create_service_account(account)
    await registry.grant("acme", "service-account", account, "VIEWER")
    _, plaintext = await registry.create_token(account)
    headers = {"Authorization": f"Bearer {plaintext}"}
    path = "/api/v1/acme/files/canary/secret.txt"
    async with env.client.get(path, headers=headers) as response:
        assert response.status == 200
    await registry.delete_service_account(account)
    async with env.client.get(path, headers=headers) as response:
        assert response.status == 401
    await registry.create_service_account(account)  # same name: the old token stays dead
    try:
        async with env.client.get(path, headers=headers) as response:
            assert response.status == 401
    finally:
        await registry.delete_service_account(account)
        await restore(env)
