"""The tenant and identity registry: tenants, users, service accounts, tokens, role bindings.

Everything lives in the gateway's own storage, under the reserved system prefix (DESIGN.md, "The
gateway's own data"), one compact JSON document per entity, so every replica over one store sees
the same registry::

    .gateway/registry/tenants/<id>.json
    .gateway/registry/users/<username>.json
    .gateway/registry/service-accounts/<name>.json
    .gateway/registry/tokens/<token id>.json
    .gateway/registry/bindings/<kind>/<subject>/<tenant id, or "~" for the null tenant>.json
    .gateway/registry/changes/<time_ns:020d>-<random>.json      {"kind": ..., "id": ...}
    .gateway/registry/bootstrap.json                           who bootstraps the first admin

A binding's key starts with its subject, so deleting a user or a service account finds every
binding it holds with one listing; ``~`` is outside the tenant-id grammar, so no tenant can
collide with the null tenant.

Creation is a create-only write (``exclusive=True``): of two processes creating the same
tenant, one wins and the other answers 409. Updates overwrite the document.

Each process keeps a :class:`Snapshot` in memory: immutable, rebuilt (copy-on-write) and
swapped in one assignment, so the request hot path reads ``registry.snapshot`` with no I/O and
no lock. Bounded staleness across processes comes from the change feed: every mutation also
writes a change record naming the entity; ``refresh`` (every ``refresh_interval``) lists only the
records written since the newest it saw (minus a clock-skew margin) and re-reads only the
entities they name, a missing document meaning a deleted entity. Records older than
``CHANGE_RETENTION`` are pruned by any process, now and then; a process that has not listed the
feed for nearly that long (storage down, process suspended) reloads everything instead, and
every process reloads everything every ``FULL_RELOAD_INTERVAL`` as a safety net (a change
record whose write failed, a clock skewed beyond the margin).

Secrets: passwords are hashed with scrypt (memory-hard); tokens are ``gwt_<id>_<secret>`` with a
256-bit secret of which only the SHA-256 is stored. Both are compared in constant time. No
message, log line or ``to_json`` ever holds a password, a token or a hash.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, cast

from backends.base import SYSTEM_PREFIX, Backend

from .documents import one, read_whole, write_json
from .errors import BadRequest, Conflict, NotFound
from .keys import TENANT_ID_RE, check_tenant_id

logger = logging.getLogger(__name__)

ROLES: Final = ("ADMIN", "EDITOR", "VIEWER")  # ADMIN > EDITOR > VIEWER
ROLE_RANK: Final[Mapping[str, int]] = MappingProxyType({"ADMIN": 3, "EDITOR": 2, "VIEWER": 1})
NULL_TENANT: Final = None  # a binding's scope for the null (default) tenant
KINDS: Final = ("user", "service-account")

Kind: TypeAlias = Literal["user", "service-account"]

REGISTRY_PREFIX: Final = f"{SYSTEM_PREFIX}/registry"
CHANGES_PREFIX: Final = f"{REGISTRY_PREFIX}/changes"
BOOTSTRAP_KEY: Final = f"{REGISTRY_PREFIX}/bootstrap.json"
# entity kind (as a change record names it) -> its folder under REGISTRY_PREFIX
ENTITY_FOLDERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "tenant": "tenants",
        "user": "users",
        "service-account": "service-accounts",
        "token": "tokens",
        "binding": "bindings",
    }
)
NULL_TENANT_SEGMENT: Final = "~"

CHANGE_RETENTION: Final = 600.0
"""Seconds a change record is kept; a process silent for longer reloads everything."""
SKEW_MARGIN: Final = 10.0
"""Seconds the feed listing reaches back before the newest record seen (clocks, slow listings)."""
FULL_RELOAD_INTERVAL: Final = 600.0
PRUNE_INTERVAL: Final = 60.0
_NS: Final = 1_000_000_000

USERNAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
SERVICE_ACCOUNT_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
TOKEN_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
TOKEN_RE: Final = re.compile(r"gwt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
TOKEN_PREFIX: Final = "gwt_"

MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 1024
MAX_TENANT_NAME: Final = 200
MAX_DESCRIPTION: Final = 1000
MAX_EXPIRES_IN: Final = 100 * 365 * 86400.0
MAX_DOCUMENT_BYTES: Final = 64 * 1024
MAX_QUOTA: Final = 2**63 - 1
UNCHANGED: Final = object()  # "leave this field as it is" (None means "no limit")
DEFAULT_ADMIN: Final = "admin"

# scrypt (RFC 7914): n=2**14, r=8, p=1 is 16 MiB and about 50 ms per hash.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_SALT_BYTES: Final = 16
SCRYPT_KEY_BYTES: Final = 32
VERIFY_CACHE_TTL: Final = 60.0
VERIFY_CACHE_SIZE: Final = 4096

_READ_CONCURRENCY: Final = 32
_LIST_PAGE: Final = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """Given an aware datetime, return it as ISO-8601 UTC with milliseconds and a ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- entities ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    deleted: bool
    created: str
    updated: str
    max_bytes: int | None = None
    """Quota: the most bytes the tenant's objects may hold in all (``None``: no limit)."""
    max_object_size: int | None = None
    """Quota: the largest object the tenant may upload (``None``: the gateway's limit)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "deleted": self.deleted,
            "created": self.created,
            "updated": self.updated,
            "quota": {"maxBytes": self.max_bytes, "maxObjectSize": self.max_object_size},
        }


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    super_admin: bool
    can_create_tenants: bool
    created: str
    updated: str

    def to_json(self) -> dict[str, Any]:
        """The public view: never the password hash."""
        return {
            "username": self.username,
            "superAdmin": self.super_admin,
            "canCreateTenants": self.can_create_tenants,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    name: str
    description: str
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "created": self.created}


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    account: str
    secret_hash: str
    description: str
    created: str
    expires: str | None
    revoked: bool

    def to_json(self) -> dict[str, Any]:
        """The public view: never the secret or its hash."""
        return {
            "id": self.id,
            "serviceAccount": self.account,
            "description": self.description,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
        }

    def active(self, now: float) -> bool:
        """Given POSIX seconds, say whether the token is neither revoked nor expired then."""
        if self.revoked:
            return False
        if self.expires is None:
            return True
        try:
            return now < datetime.fromisoformat(self.expires).timestamp()
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Binding:
    tenant: str | None
    kind: Kind
    subject: str
    role: str

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "kind": self.kind,
            "subject": self.subject,
            "role": self.role,
        }


Entity: TypeAlias = Tenant | User | ServiceAccount | Token | Binding
BindingKey: TypeAlias = tuple[str | None, str, str]  # (tenant, kind, subject)


class _Bad(enum.Enum):
    """A document that exists but cannot be parsed: the snapshot keeps what it had."""

    DOCUMENT = enum.auto()


Update: TypeAlias = tuple[str, str, Entity | None]  # (entity kind, entity id, new value or gone)


def role_at_least(role: str | None, minimum: str) -> bool:
    """Given a role (or ``None``) and a minimum role, say whether the first reaches the second."""
    return role is not None and ROLE_RANK.get(role, 0) >= ROLE_RANK[minimum]


def _binding_sort_key(binding: Binding) -> tuple[bool, str, str, str]:
    return (binding.tenant is not None, binding.tenant or "", binding.kind, binding.subject)


# -- the snapshot ------------------------------------------------------------------------------


class Snapshot:
    """An immutable view of the registry: every look-up the hot path needs, O(1), no I/O.

    Never changed once built: a refresh or a mutation builds a new one (copying only the maps
    it changes) and swaps it in.
    """

    __slots__ = (
        "_binding_map",
        "_by_subject",
        "_by_tenant",
        "_maps",
        "service_accounts",
        "tenants",
        "tokens",
        "users",
    )

    tenants: Mapping[str, Tenant]
    users: Mapping[str, User]
    service_accounts: Mapping[str, ServiceAccount]
    tokens: Mapping[str, Token]

    def __init__(
        self,
        tenants: dict[str, Tenant],
        users: dict[str, User],
        service_accounts: dict[str, ServiceAccount],
        tokens: dict[str, Token],
        bindings: dict[BindingKey, Binding],
        *,
        _index: tuple[dict[tuple[str, str], list[Binding]], dict[str | None, list[Binding]]]
        | None = None,
    ) -> None:
        self._maps: dict[str, dict[Any, Any]] = {
            "tenant": tenants,
            "user": users,
            "service-account": service_accounts,
            "token": tokens,
            "binding": bindings,
        }
        self.tenants = MappingProxyType(tenants)
        self.users = MappingProxyType(users)
        self.service_accounts = MappingProxyType(service_accounts)
        self.tokens = MappingProxyType(tokens)
        self._binding_map = bindings
        if _index is None:
            by_subject: dict[tuple[str, str], list[Binding]] = {}
            by_tenant: dict[str | None, list[Binding]] = {}
            for binding in sorted(bindings.values(), key=_binding_sort_key):
                by_subject.setdefault((binding.kind, binding.subject), []).append(binding)
                by_tenant.setdefault(binding.tenant, []).append(binding)
            _index = (by_subject, by_tenant)
        self._by_subject, self._by_tenant = _index

    @classmethod
    def empty(cls) -> Snapshot:
        return cls({}, {}, {}, {}, {})

    def _subject_exists(self, kind: str, subject: str) -> bool:
        if kind == "user":
            return subject in self.users
        return kind == "service-account" and subject in self.service_accounts

    def role(self, tenant: str | None, kind: str, subject: str) -> str | None:
        """Given a scope (``None``: the null tenant) and an identity, return its role there."""
        binding = self._binding_map.get((tenant, kind, subject))
        if binding is None or not self._subject_exists(kind, subject):
            return None
        return binding.role

    def bindings_of(self, kind: str, subject: str) -> list[Binding]:
        """Given an identity, return its bindings, the null tenant's first, then by tenant id."""
        if not self._subject_exists(kind, subject):
            return []
        return list(self._by_subject.get((kind, subject), ()))

    def members(self, tenant: str | None) -> list[Binding]:
        """Given a scope (``None``: the null tenant), return its bindings by kind and subject."""
        return [
            binding
            for binding in self._by_tenant.get(tenant, ())
            if self._subject_exists(binding.kind, binding.subject)
        ]

    def apply(self, updates: Iterable[Update]) -> Snapshot:
        """Given updates (kind, id, new value or ``None`` for gone), return the new snapshot."""
        changed: dict[str, dict[Any, Any]] = {}
        for kind, ident, value in updates:
            if kind not in changed:
                changed[kind] = dict(self._maps[kind])
            target = changed[kind]
            key: Any = _binding_key(ident) if kind == "binding" else ident
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        if not changed:
            return self
        maps = {**self._maps, **changed}
        index = None if "binding" in changed else (self._by_subject, self._by_tenant)
        return Snapshot(
            maps["tenant"],
            maps["user"],
            maps["service-account"],
            maps["token"],
            maps["binding"],
            _index=index,
        )


# -- ids and keys ------------------------------------------------------------------------------


def _binding_id(tenant: str | None, kind: str, subject: str) -> str:
    return f"{kind}/{subject}/{NULL_TENANT_SEGMENT if tenant is None else tenant}"


def _binding_key(ident: str) -> BindingKey:
    kind, subject, tenant = ident.split("/")
    return (None if tenant == NULL_TENANT_SEGMENT else tenant, kind, subject)


def _valid_id(kind: str, ident: str) -> bool:
    """Given an entity kind and id, say whether the id is in that kind's grammar."""
    if kind == "tenant":
        return TENANT_ID_RE.fullmatch(ident) is not None
    if kind == "user":
        return USERNAME_RE.fullmatch(ident) is not None
    if kind == "service-account":
        return SERVICE_ACCOUNT_RE.fullmatch(ident) is not None
    if kind == "token":
        return TOKEN_ID_RE.fullmatch(ident) is not None
    if kind == "binding":
        parts = ident.split("/")
        if len(parts) != 3 or parts[0] not in KINDS or not _valid_id(parts[0], parts[1]):
            return False
        return parts[2] == NULL_TENANT_SEGMENT or _valid_id("tenant", parts[2])
    return False


def _entity_key(kind: str, ident: str) -> str:
    """Given an entity kind and a valid id, return the physical key of its document."""
    if not _valid_id(kind, ident):  # every caller checked; this guards the key space
        raise ValueError("invalid registry id")
    return f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS[kind]}/{ident}.json"


def _id_from_key(kind: str, key: str) -> str | None:
    """Given a listed key in a kind's folder, return the entity id it holds, or ``None``."""
    prefix = f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS[kind]}/"
    if not key.startswith(prefix) or not key.endswith(".json"):
        return None
    ident = key[len(prefix) : -len(".json")]
    return ident if _valid_id(kind, ident) else None


def _change_time(key: str) -> int | None:
    """Given a change record's key, return its time (ns), or ``None`` if it is not one."""
    prefix = f"{CHANGES_PREFIX}/"
    if not key.startswith(prefix):
        return None
    stamp = key[len(prefix) :].partition("-")[0]
    if len(stamp) != 20 or not stamp.isdigit():
        return None
    return int(stamp)


def _change_cursor(time_ns: int) -> str:
    """Given a time (ns), return the listing cursor just before every record from then on."""
    return f"{CHANGES_PREFIX}/{max(time_ns, 0):020d}"


# -- documents ---------------------------------------------------------------------------------


def _str(doc: Mapping[str, Any], field: str) -> str:
    value = doc[field]
    if not isinstance(value, str):
        raise ValueError(field)
    return value


def _bool(doc: Mapping[str, Any], field: str) -> bool:
    value = doc[field]
    if not isinstance(value, bool):
        raise ValueError(field)
    return value


def _document(entity: Entity) -> dict[str, Any]:
    """Given an entity, return its stored document (the public view plus any secret hash)."""
    if isinstance(entity, User):
        return {**entity.to_json(), "passwordHash": entity.password_hash}
    if isinstance(entity, Token):
        return {**entity.to_json(), "secretHash": entity.secret_hash}
    return entity.to_json()


def _parse(kind: str, ident: str, doc: Any) -> Entity:
    """Given a kind, the id its key names and a loaded document, return the entity.

    Raises ``ValueError`` (or ``KeyError``) for a document of the wrong shape, or one whose
    content names another entity than its key.
    """
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    entity: Entity
    if kind == "tenant":
        quota = doc.get("quota") or {}  # absent in documents written before quotas
        if not isinstance(quota, dict):
            raise ValueError("quota")
        entity = Tenant(
            _str(doc, "id"),
            _str(doc, "name"),
            _bool(doc, "deleted"),
            _str(doc, "created"),
            _str(doc, "updated"),
            _limit(quota.get("maxBytes"), "quota.maxBytes"),
            _limit(quota.get("maxObjectSize"), "quota.maxObjectSize"),
        )
        same = entity.id == ident
    elif kind == "user":
        entity = User(
            _str(doc, "username"),
            _str(doc, "passwordHash"),
            _bool(doc, "superAdmin"),
            _bool(doc, "canCreateTenants"),
            _str(doc, "created"),
            _str(doc, "updated"),
        )
        same = entity.username == ident
    elif kind == "service-account":
        entity = ServiceAccount(_str(doc, "name"), _str(doc, "description"), _str(doc, "created"))
        same = entity.name == ident
    elif kind == "token":
        expires = doc["expires"]
        if expires is not None and not isinstance(expires, str):
            raise ValueError("expires")
        entity = Token(
            _str(doc, "id"),
            _str(doc, "serviceAccount"),
            _str(doc, "secretHash"),
            _str(doc, "description"),
            _str(doc, "created"),
            expires,
            _bool(doc, "revoked"),
        )
        same = entity.id == ident
    elif kind == "binding":
        tenant = doc["tenant"]
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError("tenant")
        binding_kind = _str(doc, "kind")
        role = _str(doc, "role")
        if binding_kind not in KINDS or role not in ROLES:
            raise ValueError("kind or role")
        entity = Binding(tenant, cast(Kind, binding_kind), _str(doc, "subject"), role)
        same = _binding_id(entity.tenant, entity.kind, entity.subject) == ident
    else:
        raise ValueError("unknown kind")
    if not same:
        raise ValueError("the document names another entity than its key")
    return entity


# -- validation --------------------------------------------------------------------------------


def _check_username(username: object) -> str:
    if not isinstance(username, str) or USERNAME_RE.fullmatch(username) is None:
        raise BadRequest(
            "username: must be 1 to 64 characters from letters, digits, '.', '_', '@' and '-', "
            "starting with a letter or a digit"
        )
    return username


def _check_account_name(name: object) -> str:
    if not isinstance(name, str) or SERVICE_ACCOUNT_RE.fullmatch(name) is None:
        raise BadRequest(
            "name: must be 1 to 63 characters from lowercase a-z, digits, '-' and '_', "
            "starting with a letter or a digit"
        )
    return name


def _check_password(password: object) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"password: must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def _check_tenant_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_TENANT_NAME
        or not name.isprintable()
        or not name.strip()
    ):
        raise BadRequest(f"name: must be 1 to {MAX_TENANT_NAME} printable characters, not blank")
    return name


def _limit(value: object, field: str) -> int | None:
    """Given a quota value from a document or a request, return it (``None``: no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA:
        raise BadRequest(f"{field}: must be a number of bytes from 0 to {MAX_QUOTA}, or null")
    return value


def _check_description(description: object) -> str:
    if (
        not isinstance(description, str)
        or len(description) > MAX_DESCRIPTION
        or not description.isprintable()
    ):
        raise BadRequest(f"description: must be at most {MAX_DESCRIPTION} printable characters")
    return description


def _check_flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field}: must be true or false")
    return value


def _check_kind(kind: object) -> Kind:
    if kind == "user" or kind == "service-account":
        return kind
    raise BadRequest("kind: must be user or service-account")


def _check_role(role: object) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"role: must be one of {', '.join(ROLES)}")
    return role


def _check_expires_in(expires_in: object) -> float | None:
    if expires_in is None:
        return None
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or not 0 < expires_in <= MAX_EXPIRES_IN
    ):
        raise BadRequest("expires_in: must be a positive number of seconds (at most 100 years)")
    return float(expires_in)


def _check_scope(tenant: str | None) -> None:
    if tenant is not None:
        check_tenant_id(tenant)


# -- secrets -----------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    # surrogatepass: a password decoded from odd bytes must hash, not crash
    return text.encode("utf-8", "surrogatepass")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        _utf8(password), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p + 2**20, dklen=length
    )


def hash_password(password: str) -> str:
    """Given a password, return ``scrypt$n$r$p$salt_b64$hash_b64`` (about 50 ms of CPU)."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encoded[0]}${encoded[1]}"


def check_password_hash(password: str, stored: str) -> bool:
    """Given a password and a stored hash, say (in constant time) whether they match."""
    try:
        scheme, n_text, r_text, p_text, salt_text, digest_text = stored.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        digest = base64.b64decode(digest_text, validate=True)
    except ValueError:
        return False
    # Bounds: a tampered document must not make one login cost gigabytes.
    if (
        scheme != "scrypt"
        or not 2 <= n <= 2**20
        or n & (n - 1)
        or not 1 <= r <= 32
        or not 1 <= p <= 16
        or not 16 <= len(digest) <= 64
    ):
        return False
    try:
        candidate = _scrypt(password, salt, n, r, p, len(digest))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


def _burn_password_check(password: str) -> None:
    """Spend what a real check costs, so an unknown username answers as slowly as a known one."""
    _scrypt(password, b"\0" * SCRYPT_SALT_BYTES, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _open_secret_file(path: str | os.PathLike[str]) -> int:
    """Given a path, open it for writing, created 0600 (never world-readable), not following a
    symbolic link; an existing file is made 0600 before anything is written to it."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_secret(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    data = text.encode()
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


# -- the registry ------------------------------------------------------------------------------


class Registry:
    """The registry of one store, cached in this process as an immutable :class:`Snapshot`.

    Mutations are serialised in this process (one lock, shared with ``refresh``) and go to the
    store first; across processes, create-only writes settle races on creation.
    """

    def __init__(self, backend: Backend, *, refresh_interval: float = 1.0) -> None:
        if not refresh_interval > 0:
            raise ValueError("refresh_interval must be positive")
        self._backend = backend
        self._interval = refresh_interval
        self._snapshot = Snapshot.empty()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # the change feed: records already applied (key -> time), and where the next listing starts
        self._seen: dict[str, int] = {}
        self._cursor_ns = 0
        self._loaded = False
        self._listed_wall = 0.0
        self._listed_mono = 0.0
        self._full_mono = 0.0
        self._next_prune = 0.0
        self._failures = 0
        # verify_password's cache: HMAC(process key, username \0 password) -> (hash, expiry)
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._cache_lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load everything, then refresh every ``refresh_interval`` in the background."""
        await self.load_full()
        if self._task is None:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL * random.uniform(0.1, 1.0)
            self._task = asyncio.create_task(self._run(), name="registry-refresh")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def backend(self) -> Backend:
        """The store the registry lives in (and the data it governs)."""
        return self._backend

    @property
    def snapshot(self) -> Snapshot:
        """The current view (no I/O)."""
        return self._snapshot

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if time.monotonic() - self._full_mono >= FULL_RELOAD_INTERVAL:
                    await self.load_full()
                else:
                    await self.refresh()
            except OSError as exc:  # the store is down: keep serving the old snapshot
                self._failures += 1
                log = logger.warning if self._failures == 1 else logger.debug
                log("registry refresh failed (%s); retrying", type(exc).__name__)
            except Exception:
                self._failures += 1
                logger.exception("registry refresh failed; retrying")
            else:
                if self._failures:
                    logger.info("registry refresh recovered after %d failures", self._failures)
                    self._failures = 0
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL * random.uniform(0.5, 1.5)
                try:
                    await self.prune_changes()
                except OSError as exc:
                    logger.warning(
                        "pruning registry change records failed (%s)", type(exc).__name__
                    )

    # -- reading the store -------------------------------------------------------------------

    async def _list_files(self, prefix: str, start_after: str | None = None) -> list[str]:
        """Given a folder, return the keys of every file below it (none if it is missing)."""
        names: list[str] = []
        cursor = start_after
        while True:
            try:
                page = await self._backend.list(
                    prefix, recursive=True, limit=_LIST_PAGE, start_after=cursor
                )
            except FileNotFoundError:
                return names
            names.extend(entry.name for entry in page.entries if not entry.is_dir)
            if page.next_cursor is None:
                return names
            cursor = page.next_cursor

    async def _read_doc(self, key: str) -> Any:
        """Given a key, return its JSON document, ``None`` if missing, ``_Bad`` if unreadable."""
        try:
            data = await read_whole(self._backend, key, MAX_DOCUMENT_BYTES)
            return None if data is None else json.loads(data)
        except ValueError:  # DocumentTooLarge too
            return _Bad.DOCUMENT

    async def _read_entity(self, kind: str, ident: str) -> Entity | _Bad | None:
        doc = await self._read_doc(_entity_key(kind, ident))
        if doc is None or doc is _Bad.DOCUMENT:
            return None if doc is None else _Bad.DOCUMENT
        try:
            return _parse(kind, ident, doc)
        except (ValueError, KeyError):
            return _Bad.DOCUMENT

    async def _read_entities(self, targets: Iterable[tuple[str, str]]) -> list[Update]:
        """Given (kind, id) pairs, return their updates; an unreadable document keeps the
        snapshot's value (logged)."""
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def read(kind: str, ident: str) -> tuple[str, str, Entity | _Bad | None]:
            async with gate:
                return kind, ident, await self._read_entity(kind, ident)

        results = await asyncio.gather(*(read(kind, ident) for kind, ident in targets))
        updates: list[Update] = []
        for kind, ident, value in results:
            if value is _Bad.DOCUMENT:
                logger.error("registry: the %s document %r is malformed; ignored", kind, ident)
                continue
            updates.append((kind, ident, value))
        return updates

    # -- refreshing --------------------------------------------------------------------------

    async def load_full(self) -> None:
        """Re-read every registry document and rebuild the snapshot."""
        async with self._lock:
            await self._load_full_locked()

    async def refresh(self) -> None:
        """Apply the changes other processes recorded since the last refresh.

        Raises what the store raises; the old snapshot then stays in place.
        """
        async with self._lock:
            await self._refresh_locked()

    def _feed_too_old(self) -> bool:
        horizon = CHANGE_RETENTION - 2 * SKEW_MARGIN
        return (
            time.monotonic() - self._listed_mono > horizon
            or abs(time.time() - self._listed_wall) > horizon
        )

    async def _load_full_locked(self) -> None:
        listed_wall, listed_mono = time.time(), time.monotonic()
        # The feed first: a change recorded after this listing is read again by the next refresh.
        changes = await self._list_files(CHANGES_PREFIX)
        kinds = list(ENTITY_FOLDERS)
        listings = await asyncio.gather(
            *(self._list_files(f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS[kind]}") for kind in kinds)
        )
        targets = [
            (kind, ident)
            for kind, keys in zip(kinds, listings, strict=True)
            for key in keys
            if (ident := _id_from_key(kind, key)) is not None
        ]
        updates = await self._read_entities(targets)
        # Start from the old snapshot only to keep what a malformed document would lose.
        present = {(kind, ident) for kind, ident in targets}
        old = self._snapshot
        gone: list[Update] = [
            (kind, _binding_id(*key) if kind == "binding" else key, None)
            for kind, mapping in old._maps.items()
            for key in mapping
            if (kind, _binding_id(*key) if kind == "binding" else key) not in present
        ]
        self._snapshot = old.apply([*gone, *updates])
        stamps = {key: stamp for key in changes if (stamp := _change_time(key)) is not None}
        self._seen = stamps
        self._cursor_ns = min(max(stamps.values(), default=0), int(listed_wall * _NS))
        self._listed_wall, self._listed_mono = listed_wall, listed_mono
        self._full_mono = listed_mono
        self._loaded = True

    async def _refresh_locked(self) -> None:
        if not self._loaded or self._feed_too_old():
            # Records may have been pruned since the last listing: only a full read is sure.
            await self._load_full_locked()
            return
        listed_wall, listed_mono = time.time(), time.monotonic()
        start = (
            None
            if self._cursor_ns == 0
            else _change_cursor(self._cursor_ns - int(SKEW_MARGIN * _NS))
        )
        keys = await self._list_files(CHANGES_PREFIX, start)
        fresh = {
            key: stamp
            for key in keys
            if key not in self._seen and (stamp := _change_time(key)) is not None
        }
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def read(key: str) -> Any:
            async with gate:
                return await self._read_doc(key)

        records = await asyncio.gather(*(read(key) for key in fresh))
        targets: set[tuple[str, str]] = set()
        for key, record in zip(fresh, records, strict=True):
            if record is None:  # pruned meanwhile: it was long applied
                continue
            kind = record.get("kind") if isinstance(record, dict) else None
            ident = record.get("id") if isinstance(record, dict) else None
            if (
                not isinstance(kind, str)
                or not isinstance(ident, str)
                or not _valid_id(kind, ident)
            ):
                logger.error("registry: the change record %r is malformed; ignored", key)
                continue
            targets.add((kind, ident))
        updates = await self._read_entities(sorted(targets))
        # Commit only now: a failure above leaves the snapshot and the feed position as they were.
        self._snapshot = self._snapshot.apply(updates)
        self._seen.update(fresh)
        newest = max(fresh.values(), default=0)
        self._cursor_ns = max(self._cursor_ns, min(newest, int(listed_wall * _NS)))
        floor = self._cursor_ns - int(SKEW_MARGIN * _NS)
        self._seen = {key: stamp for key, stamp in self._seen.items() if stamp >= floor}
        self._listed_wall, self._listed_mono = listed_wall, listed_mono

    async def prune_changes(self, *, older_than: float = CHANGE_RETENTION) -> int:
        """Delete the change records older than ``older_than`` seconds; return how many.

        Any process may run it at any time: a record deleted twice is no error.
        """
        bound = _change_cursor(time.time_ns() - int(older_than * _NS))
        deleted = 0
        cursor: str | None = None
        while True:
            try:
                page = await self._backend.list(
                    CHANGES_PREFIX, recursive=True, limit=_LIST_PAGE, start_after=cursor
                )
            except FileNotFoundError:
                return deleted
            old = [entry.name for entry in page.entries if entry.name < bound]
            for name in old:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    await self._backend.delete(name)
                    deleted += 1
            if len(old) < len(page.entries) or page.next_cursor is None:
                return deleted
            cursor = page.next_cursor

    # -- writing the store -------------------------------------------------------------------

    async def _write_entity(self, entity: Entity, *, exclusive: bool) -> None:
        kind, ident = _identify(entity)
        data = json.dumps(_document(entity), separators=(",", ":"), ensure_ascii=False).encode()
        await self._backend.write(
            _entity_key(kind, ident),
            one(data),
            content_type="application/json",
            exclusive=exclusive,
        )

    async def _delete_entity(self, kind: str, ident: str) -> bool:
        """Given an entity, delete its document; say whether there was one."""
        try:
            await self._backend.delete(_entity_key(kind, ident))
        except FileNotFoundError:
            return False
        return True

    async def _commit(self, kind: str, ident: str, value: Entity | None) -> None:
        """Given a change already in the store, show it in this process's snapshot at once,
        then record it for the other processes."""
        self._snapshot = self._snapshot.apply([(kind, ident, value)])
        record = {"kind": kind, "id": ident}
        for _ in range(3):
            stamp = time.time_ns()
            key = f"{CHANGES_PREFIX}/{stamp:020d}-{secrets.token_hex(6)}.json"
            try:
                await write_json(self._backend, key, record, exclusive=True)
            except FileExistsError:
                continue
            self._seen[key] = stamp
            return
        raise FileExistsError("could not name a change record")  # 2**48 collisions, thrice

    # -- tenants -----------------------------------------------------------------------------

    async def create_tenant(self, tenant_id: str, name: str) -> Tenant:
        check_tenant_id(tenant_id)
        _check_tenant_name(name)
        now = _iso(_now())
        tenant = Tenant(tenant_id, name, False, now, now)
        async with self._lock:
            try:
                await self._write_entity(tenant, exclusive=True)
            except FileExistsError:
                raise Conflict("a tenant with this id exists") from None
            await self._commit("tenant", tenant_id, tenant)
        return tenant

    async def update_tenant(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        deleted: bool | None = None,
        max_bytes: object = UNCHANGED,
        max_object_size: object = UNCHANGED,
    ) -> Tenant:
        """Rename, soft-delete (``deleted=True``) or restore a tenant, or set its quotas
        (``None``: no limit; left out: unchanged)."""
        if TENANT_ID_RE.fullmatch(tenant_id) is None:
            raise NotFound("no such tenant")
        if name is not None:
            _check_tenant_name(name)
        if deleted is not None:
            _check_flag("deleted", deleted)
        new_max_bytes = None if max_bytes is UNCHANGED else _limit(max_bytes, "maxBytes")
        new_max_object_size = (
            None if max_object_size is UNCHANGED else _limit(max_object_size, "maxObjectSize")
        )
        async with self._lock:
            current = await self._read_entity("tenant", tenant_id)
            if not isinstance(current, Tenant):
                raise NotFound("no such tenant")
            tenant = dataclasses.replace(
                current,
                name=current.name if name is None else name,
                deleted=current.deleted if deleted is None else deleted,
                updated=_iso(_now()),
                max_bytes=current.max_bytes if max_bytes is UNCHANGED else new_max_bytes,
                max_object_size=(
                    current.max_object_size if max_object_size is UNCHANGED else new_max_object_size
                ),
            )
            await self._write_entity(tenant, exclusive=False)
            await self._commit("tenant", tenant_id, tenant)
        return tenant

    async def delete_tenant(self, tenant_id: str) -> None:
        """Delete a tenant for good, with its role bindings (the bindings first, so a crash
        leaves a tenant without members, never members of no tenant). Its data must be gone:
        ``gateway.lifecycle.purge_tenant`` does both."""
        if TENANT_ID_RE.fullmatch(tenant_id) is None:
            raise NotFound("no such tenant")
        async with self._lock:
            if not isinstance(await self._read_entity("tenant", tenant_id), Tenant):
                raise NotFound("no such tenant")
            bindings = f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS['binding']}"
            for key in await self._list_files(bindings):
                ident = _id_from_key("binding", key)
                if ident is None or _binding_key(ident)[0] != tenant_id:
                    continue
                if await self._delete_entity("binding", ident):
                    await self._commit("binding", ident, None)
            await self._delete_entity("tenant", tenant_id)
            await self._commit("tenant", tenant_id, None)

    # -- users -------------------------------------------------------------------------------

    async def create_user(
        self,
        username: str,
        password: str,
        *,
        super_admin: bool = False,
        can_create_tenants: bool = False,
    ) -> User:
        _check_username(username)
        _check_password(password)
        _check_flag("superAdmin", super_admin)
        _check_flag("canCreateTenants", can_create_tenants)
        password_hash = await asyncio.to_thread(hash_password, password)
        now = _iso(_now())
        user = User(username, password_hash, super_admin, can_create_tenants, now, now)
        async with self._lock:
            try:
                await self._write_entity(user, exclusive=True)
            except FileExistsError:
                raise Conflict("a user with this username exists") from None
            await self._commit("user", username, user)
        return user

    async def update_user(
        self,
        username: str,
        *,
        password: str | None = None,
        super_admin: bool | None = None,
        can_create_tenants: bool | None = None,
    ) -> User:
        if USERNAME_RE.fullmatch(username) is None:
            raise NotFound("no such user")
        if password is not None:
            _check_password(password)
        if super_admin is not None:
            _check_flag("superAdmin", super_admin)
        if can_create_tenants is not None:
            _check_flag("canCreateTenants", can_create_tenants)
        new_hash = None if password is None else await asyncio.to_thread(hash_password, password)
        async with self._lock:
            current = await self._read_entity("user", username)
            if not isinstance(current, User):
                raise NotFound("no such user")
            user = dataclasses.replace(
                current,
                password_hash=current.password_hash if new_hash is None else new_hash,
                super_admin=current.super_admin if super_admin is None else super_admin,
                can_create_tenants=(
                    current.can_create_tenants if can_create_tenants is None else can_create_tenants
                ),
                updated=_iso(_now()),
            )
            await self._write_entity(user, exclusive=False)
            await self._commit("user", username, user)
        return user

    async def delete_user(self, username: str) -> None:
        """Delete a user and every binding it holds (the bindings first)."""
        if USERNAME_RE.fullmatch(username) is None:
            raise NotFound("no such user")
        async with self._lock:
            if await self._read_entity("user", username) is None:
                raise NotFound("no such user")
            await self._delete_bindings_of("user", username)
            await self._delete_entity("user", username)
            await self._commit("user", username, None)

    async def _delete_bindings_of(self, kind: str, subject: str) -> None:
        folder = f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS['binding']}/{kind}/{subject}"
        for key in await self._list_files(folder):
            ident = _id_from_key("binding", key)
            if ident is not None and await self._delete_entity("binding", ident):
                await self._commit("binding", ident, None)

    # -- service accounts and tokens ---------------------------------------------------------

    async def create_service_account(self, name: str, description: str = "") -> ServiceAccount:
        _check_account_name(name)
        _check_description(description)
        account = ServiceAccount(name, description, _iso(_now()))
        async with self._lock:
            try:
                await self._write_entity(account, exclusive=True)
            except FileExistsError:
                raise Conflict("a service account with this name exists") from None
            await self._commit("service-account", name, account)
        return account

    async def delete_service_account(self, name: str) -> None:
        """Delete a service account: revoke its tokens, remove its bindings, then the account."""
        if SERVICE_ACCOUNT_RE.fullmatch(name) is None:
            raise NotFound("no such service account")
        async with self._lock:
            if await self._read_entity("service-account", name) is None:
                raise NotFound("no such service account")
            # From the store, not the snapshot: a token another process made a moment ago too,
            # or an account made again under this name would inherit it.
            for key in await self._list_files(f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS['token']}"):
                token_id = _id_from_key("token", key)
                if token_id is None:
                    continue
                known = self._snapshot.tokens.get(token_id)
                if known is not None and (known.account != name or known.revoked):
                    continue
                token = await self._read_entity("token", token_id)
                if isinstance(token, Token) and token.account == name and not token.revoked:
                    token = dataclasses.replace(token, revoked=True)
                    await self._write_entity(token, exclusive=False)
                    await self._commit("token", token_id, token)
            await self._delete_bindings_of("service-account", name)
            await self._delete_entity("service-account", name)
            await self._commit("service-account", name, None)

    async def create_token(
        self, account: str, *, description: str = "", expires_in: float | None = None
    ) -> tuple[Token, str]:
        """Return a new token of ``account`` and its plaintext, which is never shown again."""
        _check_description(description)
        lifetime = _check_expires_in(expires_in)
        if SERVICE_ACCOUNT_RE.fullmatch(account) is None:
            raise NotFound("no such service account")
        async with self._lock:
            if not isinstance(await self._read_entity("service-account", account), ServiceAccount):
                raise NotFound("no such service account")
            for _ in range(3):
                token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
                now = _now()
                expires = None if lifetime is None else _iso(now + timedelta(seconds=lifetime))
                token = Token(
                    token_id, account, _secret_hash(secret), description, _iso(now), expires, False
                )
                try:
                    await self._write_entity(token, exclusive=True)
                except FileExistsError:  # 2**64 ids: never, but never overwrite either
                    continue
                await self._commit("token", token_id, token)
                return token, f"{TOKEN_PREFIX}{token_id}_{secret}"
        raise Conflict("could not pick a token id")

    async def revoke_token(self, token_id: str) -> Token:
        if TOKEN_ID_RE.fullmatch(token_id) is None:
            raise NotFound("no such token")
        async with self._lock:
            current = await self._read_entity("token", token_id)
            if not isinstance(current, Token):
                raise NotFound("no such token")
            if current.revoked:
                return current
            token = dataclasses.replace(current, revoked=True)
            await self._write_entity(token, exclusive=False)
            await self._commit("token", token_id, token)
        return token

    # -- bindings ----------------------------------------------------------------------------

    async def grant(self, tenant: str | None, kind: str, subject: str, role: str) -> Binding:
        """Give ``subject`` the ``role`` in ``tenant`` (``None``: the null tenant), replacing
        the role it had there. The tenant may be soft-deleted (its bindings outlive a delete
        and come back with a restore); it and the subject must exist."""
        checked_kind = _check_kind(kind)
        _check_role(role)
        _check_scope(tenant)
        missing = "no such user" if checked_kind == "user" else "no such service account"
        if not _valid_id(checked_kind, subject):
            raise NotFound(missing)
        binding = Binding(tenant, checked_kind, subject, role)
        async with self._lock:
            if tenant is not None and not isinstance(
                await self._read_entity("tenant", tenant), Tenant
            ):
                raise NotFound("no such tenant")
            if not isinstance(
                await self._read_entity(checked_kind, subject), User | ServiceAccount
            ):
                raise NotFound(missing)
            await self._write_entity(binding, exclusive=False)
            await self._commit("binding", _binding_id(tenant, checked_kind, subject), binding)
        return binding

    async def revoke(self, tenant: str | None, kind: str, subject: str) -> None:
        checked_kind = _check_kind(kind)
        _check_scope(tenant)
        if not _valid_id(checked_kind, subject):
            raise NotFound("no such binding")
        ident = _binding_id(tenant, checked_kind, subject)
        async with self._lock:
            if not await self._delete_entity("binding", ident):
                raise NotFound("no such binding")
            await self._commit("binding", ident, None)

    # -- verifying credentials ---------------------------------------------------------------

    def _cache_slot(self, username: str, password: str) -> bytes:
        message = _utf8(username) + b"\0" + _utf8(password)
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def verify_password(self, username: str, password: str) -> User | None:
        """Given credentials, return the user they prove, or ``None``.

        Constant time in the password; an unknown username costs a full hash too. A success is
        remembered for ``VERIFY_CACHE_TTL`` seconds (keyed by an HMAC, never the plaintext, and
        only while the stored hash is unchanged): a cache miss costs ~50 ms of CPU, so on the
        event loop prefer :meth:`verify_password_async`, and for a request
        ``gateway.access.check_password``, which also keeps the hashing under the guard of
        failed sign-ins (``gateway.guard``).
        """
        if not isinstance(username, str) or not isinstance(password, str):
            return None
        if len(password) > MAX_PASSWORD:
            return None
        user = self._snapshot.users.get(username)
        if user is None:
            _burn_password_check(password)
            return None
        if self.remembered(username, password) is user:
            return user
        if not check_password_hash(password, user.password_hash):
            return None
        slot = self._cache_slot(username, password)
        now = time.monotonic()
        with self._cache_lock:
            if len(self._cache) >= VERIFY_CACHE_SIZE:
                for stale in [key for key, (_, expiry) in self._cache.items() if expiry <= now]:
                    del self._cache[stale]
                while len(self._cache) >= VERIFY_CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
            self._cache[slot] = (user.password_hash, now + VERIFY_CACHE_TTL)
        return user

    def remembered(self, username: str, password: str) -> User | None:
        """The user these credentials proved within ``VERIFY_CACHE_TTL`` seconds (while the
        stored hash is unchanged), answered without hashing; else ``None`` (not a refusal:
        :meth:`verify_password` decides then)."""
        if not isinstance(username, str) or not isinstance(password, str):
            return None
        user = self._snapshot.users.get(username)
        if user is None or len(password) > MAX_PASSWORD:
            return None
        slot = self._cache_slot(username, password)
        with self._cache_lock:
            hit = self._cache.get(slot)
        if (
            hit is not None
            and hit[1] > time.monotonic()
            and hmac.compare_digest(hit[0], user.password_hash)
        ):
            return user
        return None

    async def verify_password_async(self, username: str, password: str) -> User | None:
        """Like :meth:`verify_password`; a remembered success is answered on the loop, and
        only the hashing of a miss goes to a worker thread. (The request path goes through
        ``gateway.access.check_password``, which guards the hashing.)"""
        user = self.remembered(username, password)
        if user is not None:
            return user
        return await asyncio.to_thread(self.verify_password, username, password)

    def verify_token(self, plaintext: str) -> tuple[Token, ServiceAccount] | None:
        """Given a bearer token, return it and its account, or ``None`` if it is malformed,
        unknown, revoked or expired, or its account is gone."""
        if not isinstance(plaintext, str):
            return None
        match = TOKEN_RE.fullmatch(plaintext)
        if match is None:
            return None
        snapshot = self._snapshot
        token = snapshot.tokens.get(match[1])
        if token is None:
            return None
        if not hmac.compare_digest(_secret_hash(match[2]), token.secret_hash):
            return None
        if not token.active(time.time()):
            return None
        account = snapshot.service_accounts.get(token.account)
        if account is None:
            return None
        return token, account

    # -- bootstrap ---------------------------------------------------------------------------

    async def ensure_bootstrap_admin(
        self,
        username: str | None,
        password: str | None,
        secret_file: str | os.PathLike[str],
    ) -> str | None:
        """If the registry has no user, create a super admin; return its password if generated.

        A generated password is written as ``username:password`` to ``secret_file`` (mode
        0600) and returned for the caller to print once. Of processes starting together, the
        create-only writes decide: the first to write ``bootstrap.json`` names the admin, the
        first to write that user's document creates it, and every other process does nothing.
        """
        name = _check_username(DEFAULT_ADMIN if username is None else username)
        if password is not None:
            _check_password(password)
        generated = await self._bootstrap(name, password, secret_file)
        if generated is None and not self._snapshot.users:
            # Another process made the admin: load it now, so this replica does not answer
            # 401 to it until its next refresh.
            await self.load_full()
        return generated

    async def _bootstrap(
        self, name: str, password: str | None, secret_file: str | os.PathLike[str]
    ) -> str | None:
        users_folder = f"{REGISTRY_PREFIX}/{ENTITY_FOLDERS['user']}"
        if self._snapshot.users or await self._list_files(users_folder):
            return None
        marker = {"username": name, "created": _iso(_now())}
        try:
            await write_json(self._backend, BOOTSTRAP_KEY, marker, exclusive=True)
        except FileExistsError:
            # Another process bootstraps (or one crashed midway): go on only if it named the
            # same admin, so the user document's create-only write decides between us.
            other = await self._read_doc(BOOTSTRAP_KEY)
            if not isinstance(other, dict) or other.get("username") != name:
                logger.warning(
                    "another gateway process is creating the first admin under another name; "
                    "not creating %r",
                    name,
                )
                return None
        generated = password is None
        secret = secrets.token_urlsafe(18) if password is None else password
        # Opened before the user exists: a path we cannot write fails before the admin does.
        fd = _open_secret_file(secret_file) if generated else None
        try:
            try:
                await self.create_user(name, secret, super_admin=True, can_create_tenants=True)
            except Conflict:
                return None
            if fd is not None:
                _write_secret(fd, f"{name}:{secret}\n")
        finally:
            if fd is not None:
                os.close(fd)
        logger.info("created the first super admin %r", name)
        return secret if generated else None


def _identify(entity: Entity) -> tuple[str, str]:
    """Given an entity, return its kind and id as change records name them."""
    if isinstance(entity, Tenant):
        return "tenant", entity.id
    if isinstance(entity, User):
        return "user", entity.username
    if isinstance(entity, ServiceAccount):
        return "service-account", entity.name
    if isinstance(entity, Token):
        return "token", entity.id
    return "binding", _binding_id(entity.tenant, entity.kind, entity.subject)
