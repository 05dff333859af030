"""Data lifecycle: move the default tenant's data into a tenant, purge old files, delete a
tenant with its data.

Everything goes through the key function (``keys.resolve``) and the ``Backend`` interface; the
same functions serve the CLI (``gateway migrate``, ``gateway purge``, ``gateway tenants delete
--purge``) and the admin API.

Migration (``migrate_default_tenant``): every file of the null tenant (the root minus the
reserved prefixes) goes to ``tenants/<id>/<same key>``. Where the backend moves a file in one
atomic step (``Backend.atomic_moves``: a rename on local disk) that is the move, checked by one
listing of the page's new places; elsewhere (S3) it is a server-side copy of the version listed,
a check of the copy (size, then ETag or SHA-256), then, for the page, a second listing of the
sources and one batch delete of those still the version copied (``delete_unchanged``, the ETag
checked by the store where it can). Moves run ``MOVE_CONCURRENCY`` at a time, a page (a listing
of up to 1,000 files) after another. What is left to move is always "what is still at the
root", so a killed run resumes by running again: an object copied but not yet deleted is found
at both places with the same content and only its source is deleted; a second run finds
nothing. The
journal (``JOURNAL_KEY``) holds the target tenant (a run into another tenant is refused while
one is unfinished) and the running totals. Both tenants' usage counters are recomputed at the
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from backends.base import SYSTEM_PREFIX, Backend, Info, same_version

from . import keys
from .audit import AuditLog, Pending, make_record, now_ns
from .documents import read_whole, write_json
from .errors import BadRequest, Conflict, InvalidKey, NotFound
from .keys import NULL_SCOPE, Scope
from .registry import Registry
from .usage import Usage, walk_files

log = logging.getLogger("gateway")

JOURNAL_KEY: Final = f"{SYSTEM_PREFIX}/migrations/default-tenant.json"
MOVE_CONCURRENCY: Final = 16
DELETE_CONCURRENCY: Final = 16
DURATION_RE: Final = re.compile(r"\s*(\d+)\s*([smhd]?)\s*", re.IGNORECASE)
SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION: Final = 100 * 365 * 86400

Progress = Callable[[int, int], None]
"""Called with the objects and bytes done since the last call."""


def parse_duration(text: str) -> int:
    """Given ``30d``, ``12h``, ``15m``, ``3600s`` or ``3600``, return seconds (above zero)."""
    match = DURATION_RE.fullmatch(text)
    if not match:
        raise BadRequest(f"{text!r} is not a duration such as 30d, 12h, 15m or 3600s")
    seconds = int(match[1]) * SECONDS[match[2].lower()]
    if not 0 < seconds <= MAX_DURATION:
        raise BadRequest("a duration must be above zero and at most 100 years")
    return seconds


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _sha256(backend: Backend, key: str) -> bytes:
    digest = hashlib.sha256()
    async with await backend.open_read(key) as reader:
        async for chunk in reader.chunks():
            digest.update(chunk)
    return digest.digest()


async def same_content(backend: Backend, a: Info, b: Info) -> bool:
    """Given two files, say whether they hold the same bytes (size, then ETag or SHA-256)."""
    if a.size != b.size:
        return False
    if a.etag is not None and a.etag == b.etag:
        return True
    return await _sha256(backend, a.name) == await _sha256(backend, b.name)


async def _info(backend: Backend, key: str) -> Info | None:
    try:
        info = await backend.info(key)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None if info.is_dir else info


async def audit(
    backend: Backend, tenant: str | None, action: str, key: str | None, status: int = 200
) -> None:
    """Record a command's mutation in the tenant's audit log, as the API records its own (the
    identity: the operator at the command line)."""
    records = AuditLog(backend)
    stamp = now_ns()
    identity = {"kind": "operator", "name": "gateway-cli"}
    records.submit(
        tenant, make_record(Pending(tenant, action, key), identity, status, stamp), stamp
    )
    await records.close()


# -- purge -------------------------------------------------------------------------------------


@dataclass(slots=True)
class PurgeReport:
    deleted: int = 0
    bytes: int = 0
    kept: int = 0
    """Files older than the bound when listed, rewritten or removed before their delete."""
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "bytes": self.bytes, "kept": self.kept,
                "dryRun": self.dry_run}  # fmt: skip


async def purge(
    backend: Backend,
    usage: Usage,
    scope: Scope,
    prefix: str,
    older_than: float,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> PurgeReport:
    """Delete the files of ``scope`` below the logical ``prefix`` (``""``: all) last modified
    more than ``older_than`` seconds ago; each delete happens only if the file is still the
    version that was listed (``delete_if_unchanged``), so a file rewritten meanwhile stays."""
    physical = keys.resolve_dir(scope, prefix)
    bound = (time.time() if now is None else now) - older_than
    report = PurgeReport(dry_run=dry_run)
    gate = asyncio.Semaphore(DELETE_CONCURRENCY)

    async def delete(entry: Info) -> bool:
        async with gate:
            return await backend.delete_if_unchanged(entry.name, entry)

    async for page in walk_files(backend, scope, physical):
        old = [e for e in page if e.mtime is not None and e.mtime < bound]
        if dry_run:
            report.deleted += len(old)
            report.bytes += sum(e.size for e in old)
            continue
        done = await asyncio.gather(*(delete(e) for e in old))
        gone = [e for e, ok in zip(old, done, strict=True) if ok]
        size = sum(e.size for e in gone)
        report.deleted += len(gone)
        report.bytes += size
        report.kept += len(old) - len(gone)
        usage.add(scope.tenant, -size, -len(gone))
    return report


# -- a tenant and its data -------------------------------------------------------------------


@dataclass(slots=True)
class TenantPurgeReport:
    tenant: str
    deleted: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "deleted": self.deleted, "bytes": self.bytes}


async def purge_tenant(
    backend: Backend, registry: Registry, usage: Usage, tenant_id: str, *, settle: float = 0.0
) -> TenantPurgeReport:
    """Soft-delete a tenant (every request for it is refused from then on), delete every
    object under ``tenants/<id>/``, its usage counters, its role bindings, then the tenant.

    Each step is repeatable, so an interrupted run is finished by running again. ``settle``:
    seconds to wait after the soft delete, so that replicas stop accepting uploads for it
    before its folder is emptied (their registry copies are that stale at most).
    """
    scope = keys.tenant_scope(tenant_id)
    tenant = registry.snapshot.tenants.get(tenant_id)
    if tenant is not None and not tenant.deleted:
        await registry.update_tenant(tenant_id, deleted=True)
        if settle > 0:
            await asyncio.sleep(settle)
    report = TenantPurgeReport(tenant_id)
    for _ in range(2):  # a second pass takes what uploads in flight at the soft delete left
        async for page in walk_files(backend, scope):
            report.bytes += sum(e.size for e in page)
        with contextlib.suppress(FileNotFoundError):  # nothing (left) there
            report.deleted += await backend.delete_prefix(scope.root)
    await usage.forget(tenant_id)
    if tenant is not None:
        with contextlib.suppress(NotFound):  # another run finished first
            await registry.delete_tenant(tenant_id)
    return report


# -- moving the default tenant's data ---------------------------------------------------------


Outcome = Literal["moved", "copied", "deduplicated", "conflict", "refused", "vanished"]


@dataclass(slots=True)
class MigrationReport:
    tenant: str
    moved: int = 0
    bytes: int = 0
    deduplicated: int = 0
    """Objects already at their new place with the same content (a resumed run): source deleted."""
    conflicts: list[str] = field(default_factory=list)
    """Keys whose new place holds other content: left at the root, untouched."""
    refused: list[str] = field(default_factory=list)
    """Keys the key function refuses in the tenant (too long once prefixed): left as they are."""
    granted: list[str] = field(default_factory=list)
    created_tenant: bool = False
    resumed: bool = False
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not (self.moved or self.deduplicated or self.granted or self.created_tenant)

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "moved": self.moved,
            "bytes": self.bytes,
            "deduplicated": self.deduplicated,
            "conflicts": self.conflicts,
            "refused": self.refused,
            "granted": self.granted,
            "createdTenant": self.created_tenant,
            "resumed": self.resumed,
            "dryRun": self.dry_run,
            "seconds": round(self.seconds, 3),
        }


async def read_journal(backend: Backend) -> dict[str, Any] | None:
    data = await read_whole(backend, JOURNAL_KEY)
    if data is None:
        return None
    doc = json.loads(data)
    return doc if isinstance(doc, dict) else None


async def _write_journal(backend: Backend, doc: dict[str, Any]) -> None:
    await write_json(backend, JOURNAL_KEY, doc, sort_keys=True)


async def _listed_range(
    backend: Backend, top: str, recursive: bool, first: str, last: str
) -> dict[str, Info]:
    """Given a directory and two keys below it, return the files listed from ``first`` to
    ``last`` (and a few around them), by key: one listing request per 1,000."""
    found: dict[str, Info] = {}
    cursor: str | None = first[:-1]  # just before ``first``
    while cursor is not None:
        try:
            page = await backend.list(top, recursive=recursive, limit=1000, start_after=cursor)
        except FileNotFoundError:
            break
        found.update((e.name, e) for e in page.entries if not e.is_dir)
        if not page.entries or page.entries[-1].name >= last:
            break
        cursor = page.next_cursor
    return found


def _sources_range(entries: list[Info]) -> dict[str, Any]:
    """Given a page of ``walk_files`` (the null tenant), return how to list its range again."""
    first = entries[0].name
    top, recursive = (first.split("/", 1)[0], True) if "/" in first else ("", False)
    return {"top": top, "recursive": recursive, "first": first, "last": entries[-1].name}


class _Mover:
    """Moves a page of the null tenant's files to their places in the tenant, verified."""

    def __init__(self, backend: Backend, scope: Scope) -> None:
        self.backend = backend
        self.scope = scope
        self.gate = asyncio.Semaphore(MOVE_CONCURRENCY)

    async def page(self, entries: list[Info]) -> list[tuple[Outcome, int]]:
        """Given a page of files, move each; return what happened to each, and its size."""
        targets: dict[str, str] = {}
        for entry in entries:
            with contextlib.suppress(InvalidKey):  # too long once prefixed: left in place
                targets[entry.name] = keys.resolve(
                    self.scope, keys.unresolve(NULL_SCOPE, entry.name)
                )
        existing = await self._targets(list(targets.values()))
        work = [e for e in entries if e.name in targets]

        async def one(entry: Info) -> tuple[Outcome, int]:
            target = targets[entry.name]
            async with self.gate:
                if target in existing:
                    return await self._dedupe(entry, existing[target])
                if self.backend.atomic_moves:
                    return await self._rename(entry, target)
                return await self._copy(entry, target)

        done = dict(zip([e.name for e in work], await asyncio.gather(*map(one, work)), strict=True))
        if self.backend.atomic_moves:
            await self._check_renamed(work, targets, done)
        else:
            await self._delete_copied(work, done)
        return [done.get(e.name, ("refused", 0)) for e in entries]

    async def _targets(self, names: list[str]) -> dict[str, Info]:
        """Given target keys in order, return the files already at any of them."""
        if not names:
            return {}
        listed = await _listed_range(self.backend, self.scope.root, True, names[0], names[-1])
        wanted = set(names)
        return {name: info for name, info in listed.items() if name in wanted}

    async def _dedupe(self, source: Info, existing: Info) -> tuple[Outcome, int]:
        """The target exists (a killed run's copy, or a tenant's own object): if it holds the
        source's bytes, the source goes; otherwise both stay, as a conflict."""
        if not await same_content(self.backend, existing, source):
            return "conflict", 0
        if await self.backend.delete_if_unchanged(source.name, source):
            return "deduplicated", source.size
        return "conflict", 0  # the source changed since: leave both for the operator

    async def _rename(self, entry: Info, target: str) -> tuple[Outcome, int]:
        try:
            await self.backend.move(entry.name, target)
        except FileNotFoundError:
            return "vanished", 0
        except FileExistsError:  # written by a client since the targets were listed
            existing = await _info(self.backend, target)
            source = await _info(self.backend, entry.name)
            if existing is None or source is None:
                return "conflict", 0  # a directory is there, or the source went meanwhile
            return await self._dedupe(source, existing)
        return "moved", entry.size

    async def _check_renamed(
        self, work: list[Info], targets: dict[str, str], done: dict[str, tuple[Outcome, int]]
    ) -> None:
        """Verify the renamed files at their new places (one listing for the page)."""
        moved = [e for e in work if done[e.name][0] == "moved"]
        if not moved:
            return
        names = [targets[e.name] for e in moved]
        listed = await _listed_range(self.backend, self.scope.root, True, names[0], names[-1])
        for entry, name in zip(moved, names, strict=True):
            found = listed.get(name)
            if found is None:
                raise OSError(f"{entry.name!r} was moved, yet nothing is at its new place")
            if found.size != entry.size or found.etag != entry.etag:
                # A rename keeps the inode and its times: the source was rewritten after it
                # was listed, and that newer version, whole, is what moved.
                log.info("%s changed after it was listed; its newer version moved", entry.name)
            done[entry.name] = ("moved", found.size)

    async def _copy(self, entry: Info, target: str) -> tuple[Outcome, int]:
        """Copy server-side, the version listed; verify the copy (ETag, else SHA-256)."""
        source: Info | None = entry
        for _ in range(3):
            if source is None:
                return "vanished", 0
            try:
                copied = await self.backend.copy(source.name, target, expected=source)
            except FileNotFoundError:
                return "vanished", 0
            except ConnectionError:  # rewritten since it was listed: copy the new version
                source = await _info(self.backend, entry.name)
                continue
            if copied.etag == source.etag or await same_content(self.backend, copied, source):
                return "copied", copied.size
            source = await _info(self.backend, entry.name)
        raise OSError(f"the object at {entry.name!r} kept changing while being copied")

    async def _delete_copied(self, work: list[Info], done: dict[str, tuple[Outcome, int]]) -> None:
        """Delete the sources of the verified copies that are still the version copied: the
        page's range is listed again, and the batch delete checks each ETag where the store
        supports it."""
        copied = [e for e in work if done[e.name][0] == "copied"]
        if not copied:
            return
        now = await _listed_range(self.backend, **_sources_range(copied))
        unchanged = [e for e in copied if e.name in now and same_version(now[e.name], e)]
        deleted = await self.backend.delete_unchanged(unchanged)
        gone = {e.name for e, ok in zip(unchanged, deleted, strict=True) if ok}
        for entry in copied:
            if entry.name in gone:
                done[entry.name] = ("moved", done[entry.name][1])
                continue
            # Rewritten since its copy was made (the copy is ours): copy it again, one by one.
            done[entry.name] = ("conflict", 0)
            for _ in range(3):
                source = await _info(self.backend, entry.name)
                if source is None:
                    done[entry.name] = ("vanished", 0)
                    break
                outcome, size = await self._copy(source, self._target_of(entry))
                if outcome == "copied" and await self.backend.delete_if_unchanged(
                    source.name, source
                ):
                    done[entry.name] = ("moved", size)
                    break

    def _target_of(self, entry: Info) -> str:
        return keys.resolve(self.scope, keys.unresolve(NULL_SCOPE, entry.name))


async def _copy_roles(
    registry: Registry, tenant_id: str, report: MigrationReport, dry_run: bool
) -> None:
    """Give the default tenant's members the same roles on the tenant (keeping any role they
    already have there)."""
    snapshot = registry.snapshot
    for binding in sorted(snapshot.members(None), key=lambda b: (b.kind, b.subject)):
        if snapshot.role(tenant_id, binding.kind, binding.subject) is not None:
            continue
        if not dry_run:
            await registry.grant(tenant_id, binding.kind, binding.subject, binding.role)
        report.granted.append(f"{binding.kind}/{binding.subject}={binding.role}")


async def migrate_default_tenant(
    backend: Backend,
    registry: Registry,
    usage: Usage,
    tenant_id: str,
    *,
    name: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_key: Callable[[str, Outcome], None] | None = None,
) -> MigrationReport:
    """Move every file of the null tenant into ``tenant_id`` (created if missing), give the
    default tenant's members the same roles there; resumable, idempotent. ``on_key`` is told
    each key and what happened to it (with ``dry_run``: each key that would move)."""
    scope = keys.tenant_scope(tenant_id)
    started = time.monotonic()
    report = MigrationReport(tenant_id, dry_run=dry_run)
    journal = await read_journal(backend)
    if journal is not None and journal.get("state") == "running":
        if journal.get("tenant") != tenant_id:
            raise Conflict(
                f"a migration of the default tenant into {journal.get('tenant')!r} is "
                "unfinished; finish it by running it again with that tenant id"
            )
        report.resumed = True
    tenant = registry.snapshot.tenants.get(tenant_id)
    if tenant is not None and tenant.deleted:
        raise Conflict(f"tenant {tenant_id!r} is deleted; restore it first")
    if dry_run:
        report.created_tenant = tenant is None
        await _copy_roles(registry, tenant_id, report, dry_run=True)
        async for page in walk_files(backend, NULL_SCOPE):
            for entry in page:
                try:
                    keys.resolve(scope, keys.unresolve(NULL_SCOPE, entry.name))
                except InvalidKey:
                    report.refused.append(entry.name)
                    continue
                report.moved += 1
                report.bytes += entry.size
                if on_key is not None:
                    on_key(entry.name, "moved")
        report.seconds = time.monotonic() - started
        return report
    if tenant is None:
        await registry.create_tenant(tenant_id, name or tenant_id)
        report.created_tenant = True
    await _copy_roles(registry, tenant_id, report, dry_run=False)
    state: dict[str, Any] = {
        "tenant": tenant_id,
        "state": "running",
        "started": _iso(time.time()),
        "moved": 0,
        "bytes": 0,
    }
    if report.resumed and journal is not None:
        state.update({k: journal[k] for k in ("started", "moved", "bytes") if k in journal})
    await _write_journal(backend, state)
    mover = _Mover(backend, scope)
    async for page in walk_files(backend, NULL_SCOPE):
        outcomes = await mover.page(page)
        done = size = 0
        for entry, (outcome, moved_bytes) in zip(page, outcomes, strict=True):
            if on_key is not None:
                on_key(entry.name, outcome)
            if outcome == "moved":
                report.moved += 1
            elif outcome == "deduplicated":
                report.deduplicated += 1
            elif outcome == "conflict":
                report.conflicts.append(entry.name)
            elif outcome == "refused":
                report.refused.append(entry.name)
            if outcome in ("moved", "deduplicated"):
                done += 1
                size += moved_bytes
        report.bytes += size
        state["moved"] += done
        state["bytes"] += size
        state["updated"] = _iso(time.time())
        await _write_journal(backend, state)
        if progress is not None:
            progress(len(page), sum(e.size for e in page))
    state["state"] = "done" if not report.conflicts else "running"
    state["finished"] = _iso(time.time())
    state["conflicts"] = len(report.conflicts)
    await _write_journal(backend, state)
    # Exact counters for both, whatever a killed run had counted or not.
    await usage.recompute(None)
    await usage.recompute(tenant_id)
    report.seconds = time.monotonic() - started
    return report
