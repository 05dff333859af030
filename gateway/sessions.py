"""Browser sessions: a sign-in with a username and password gives an opaque session cookie.

A session is a random 256-bit id (the cookie's value) that maps to a document in the gateway's
own storage, under the reserved system prefix, like the registry::

    .gateway/sessions/<SHA-256 of the id, hex>.json     {"user", "csrf", "expires"}

Why sessions in the store rather than a signed cookie: sign-out must end a session everywhere,
at once, and a signed token stays valid until it expires unless every process keeps a list of
revoked ones, which is server-side state again. A document in the store is seen by every worker
(``serve --workers N``) and every replica over that store, and deleting it ends the session.
Only the hash of the id is stored, so a reader of the store cannot take over a session.

Each process caches a session it read for at most ``auth.cache-seconds`` (the registry's
staleness bound): a sign-out in another process is honoured within it, in this one at once.
Expired documents are deleted by any process now and then (``prune``).

CSRF: each session has its own random token, given to the signed-in page; a mutating request
authenticated by the cookie must send it in ``X-CSRF-Token`` (``gateway.access``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from backends.base import SYSTEM_PREFIX, Backend

from .documents import read_whole, write_json

SESSIONS_PREFIX: Final = f"{SYSTEM_PREFIX}/sessions"
COOKIE: Final = "gateway_session"
CSRF_HEADER: Final = "X-CSRF-Token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# secrets.token_urlsafe(32): 43 characters; anything else is refused without a storage read.
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
PRUNE_INTERVAL: Final = 600.0
MAX_CACHED: Final = 10_000
MAX_DOCUMENT_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    csrf: str
    expires: float  # seconds since the epoch


def _key(session_id: str) -> str:
    digest = hashlib.sha256(session_id.encode("ascii")).hexdigest()
    return f"{SESSIONS_PREFIX}/{digest}.json"


class Sessions:
    """The sessions of one store; ``lifetime`` seconds from sign-in, cached ``cache_seconds``."""

    def __init__(self, backend: Backend, *, lifetime: float, cache_seconds: float) -> None:
        self._backend = backend
        self.lifetime = lifetime
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[Session, float]] = {}
        self._next_prune = 0.0

    async def create(self, username: str) -> tuple[str, Session]:
        """Store a new session of ``username``; return its id (the cookie) and the session."""
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            await self.prune()
        session_id = secrets.token_urlsafe(32)
        session = Session(username, secrets.token_urlsafe(32), time.time() + self.lifetime)
        doc = {"user": username, "csrf": session.csrf, "expires": session.expires}
        await write_json(self._backend, _key(session_id), doc, exclusive=True)
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """Given a cookie's value, return its live session, or ``None``."""
        if SESSION_ID_RE.fullmatch(session_id) is None:
            return None
        now = time.monotonic()
        cached = self._cache.get(session_id)
        if cached is not None and now - cached[1] < self._cache_seconds:
            session: Session | None = cached[0]
        else:
            session = await self._read(_key(session_id))
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            if session is None:
                self._cache.pop(session_id, None)
            else:
                self._cache[session_id] = (session, now)
        if session is None or session.expires <= time.time():
            return None
        return session

    async def delete(self, session_id: str) -> None:
        """End a session (sign-out); no error if it is already gone."""
        self._cache.pop(session_id, None)
        if SESSION_ID_RE.fullmatch(session_id) is None:
            return
        with contextlib.suppress(FileNotFoundError):
            await self._backend.delete(_key(session_id))

    async def prune(self) -> int:
        """Delete the documents of sessions older than ``lifetime``; return how many."""
        deleted = 0
        cursor: str | None = None
        while True:
            try:
                page = await self._backend.list(
                    SESSIONS_PREFIX, recursive=True, limit=1000, start_after=cursor
                )
            except FileNotFoundError:
                return deleted
            # A document is written once, at sign-in: its date says when the session ends.
            bound = time.time() - self.lifetime
            for entry in page.entries:
                if entry.mtime is not None and entry.mtime < bound:
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        await self._backend.delete(entry.name)
                        deleted += 1
            if page.next_cursor is None:
                return deleted
            cursor = page.next_cursor

    async def _read(self, key: str) -> Session | None:
        try:
            data = await read_whole(self._backend, key, MAX_DOCUMENT_BYTES)
            if data is None:
                return None
            doc = json.loads(data)
            return Session(str(doc["user"]), str(doc["csrf"]), float(doc["expires"]))
        except (ValueError, KeyError, TypeError):  # DocumentTooLarge too
            return None


SESSIONS: Final = web.AppKey("sessions", Sessions)
