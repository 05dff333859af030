"""The data-lifecycle commands: ``gateway migrate default-tenant``, ``gateway purge``,
``gateway tenants usage``.

Like the admin commands (``gateway.admin_cli``, whose plumbing they use), they work directly on
the configured storage; a gateway may keep serving meanwhile. A progress bar (rich) is drawn
only when standard error is a terminal.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import click

from . import keys
from .admin_cli import CONTEXT, Duration, Refused, _load, _print_json, _table, config_option, run
from .admin_cli import tenants as tenants_group
from .errors import Conflict, GatewayError, NotFound
from .keys import NULL_SCOPE
from .lifecycle import (
    MOVE_CONCURRENCY,
    Outcome,
    Progress,
    audit,
    migrate_default_tenant,
    purge,
)
from .registry import Registry
from .usage import Usage, walk_files

T = TypeVar("T")
SHOWN_KEYS: Final = 20  # conflicts or refused keys listed in a summary; the rest are counted


@contextmanager
def _progress_bar(objects: int, size: int) -> Iterator[Progress | None]:
    """Yield a callback that advances a bar of objects and bytes (rate, time left), or
    ``None`` when standard error is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        BarColumn(),
        TextColumn("{task.fields[objects]}/{task.fields[total_objects]} objects"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("moving", total=size or 1, objects=0, total_objects=objects)
        done = 0

        def advance(count: int, nbytes: int) -> None:
            nonlocal done
            done += count
            bar.update(task, advance=nbytes, objects=done)

        yield advance


def _check(function: Callable[..., T], *args: Any) -> T:
    """Call a check of ``gateway.keys``; a refusal becomes the command's (exit 1)."""
    try:
        return function(*args)
    except GatewayError as exc:
        raise Refused(exc.message) from None


def _keys_list(title: str, found: list[str]) -> None:
    click.echo(f"{title} ({len(found)}):", err=True)
    for key in found[:SHOWN_KEYS]:
        click.echo(f"  {key}", err=True)
    if len(found) > SHOWN_KEYS:
        click.echo(f"  ... and {len(found) - SHOWN_KEYS} more", err=True)


# -- migrate -----------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def migrate() -> None:
    """Move data between tenants."""


@migrate.command("default-tenant", context_settings=CONTEXT)
@click.option("--tenant-id", required=True, help="The tenant that receives the data.")
@click.option("--tenant-name", help="Its name, if it is created (default: the id).")
@click.option("--dry-run", is_flag=True, help="List what would move; change nothing.")
@config_option
def migrate_default(
    tenant_id: str, tenant_name: str | None, dry_run: bool, config_path: str | None
) -> None:
    """Move every object of the default (null) tenant into tenants/<ID>/.

    Creates the tenant if missing and gives the default tenant's members the same roles
    there. Each object is verified at its new place before its old copy goes. Interrupted,
    it resumes by running it again; run again once done, it reports nothing to do.
    """
    _check(keys.check_tenant_id, tenant_id)
    config = _load(config_path)

    async def operation(registry: Registry) -> dict[str, Any]:
        # Renames and their fsyncs run in threads: as many as the moves in flight.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(MOVE_CONCURRENCY))
        backend = registry.backend
        usage = Usage(backend)

        def show(key: str, outcome: Outcome) -> None:
            if dry_run:
                click.echo(f"would move {key}")

        if dry_run or not sys.stderr.isatty():
            report = await migrate_default_tenant(
                backend, registry, usage, tenant_id, name=tenant_name, dry_run=dry_run,
                on_key=show,
            )  # fmt: skip
        else:
            objects = size = 0
            async for page in walk_files(backend, NULL_SCOPE):
                objects += len(page)
                size += sum(e.size for e in page)
            with _progress_bar(objects, size) as advance:
                report = await migrate_default_tenant(
                    backend, registry, usage, tenant_id, name=tenant_name, progress=advance
                )
        if not dry_run and not report.nothing_to_do:
            status = 409 if report.conflicts or report.refused else 200
            for scope in (None, tenant_id):
                await audit(backend, scope, "tenant.migrate", f"default -> {tenant_id}", status)
        return report.to_json()

    found = run(config, operation, {Conflict: "see `gateway tenants list`"})
    verb = "would move" if dry_run else "moved"
    words = [f"{verb} {found['moved']} object(s) ({found['bytes']} bytes) into {tenant_id}"]
    if found["deduplicated"]:
        words.append(f"{found['deduplicated']} already there (their old copy deleted)")
    if found["createdTenant"]:
        words.append(("would create" if dry_run else "created") + f" tenant {tenant_id}")
    if found["granted"]:
        roles = ", ".join(found["granted"])
        words.append(("would grant" if dry_run else "granted") + f" roles: {roles}")
    if found["resumed"]:
        words.append("resumed an unfinished run")
    if not dry_run:
        words.append(f"{found['seconds']:.1f} s")
    nothing = not (
        found["moved"] or found["deduplicated"] or found["createdTenant"] or found["granted"]
    )
    click.echo("nothing to do: " + "; ".join(words) if nothing else "; ".join(words))
    if found["conflicts"]:
        _keys_list("left at the root, their new place holds other content", found["conflicts"])
    if found["refused"]:
        _keys_list("left at the root, refused as keys of the tenant", found["refused"])
    if found["conflicts"] or found["refused"]:
        raise Refused("some objects were not moved; see the lists above")


# -- purge -------------------------------------------------------------------------------------


@click.command("purge", context_settings=CONTEXT)
@click.option("--tenant", help="Tenant identifier (omit for the default, null tenant).")
@click.option("--prefix", default="", help="Only below this key (a directory), e.g. ns/flow.")
@click.option(
    "--older-than",
    required=True,
    type=Duration(),
    help="Delete files last modified longer ago than this: 30d, 12h, 15m, 3600s.",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@config_option
def purge_command(
    tenant: str | None, prefix: str, older_than: int, dry_run: bool, config_path: str | None
) -> None:
    """Delete the files of a tenant last modified before a bound (as Kestra's PurgeStorage)."""
    scope = NULL_SCOPE if tenant is None else _check(keys.tenant_scope, tenant)
    _check(keys.resolve_dir, scope, prefix)  # a refused prefix stops here, before the storage
    config = _load(config_path)

    async def operation(registry: Registry) -> dict[str, Any]:
        if tenant is not None and tenant not in registry.snapshot.tenants:
            raise Refused(f"no tenant {tenant!r}; see `gateway tenants list`")
        usage = Usage(registry.backend)
        try:
            report = await purge(
                registry.backend, usage, scope, prefix, older_than, dry_run=dry_run
            )
        finally:
            await usage.close()
        if not dry_run:
            await audit(registry.backend, tenant, "files.purge", prefix or None)
        return report.to_json()

    found = run(config, operation)
    where = "the default tenant" if tenant is None else f"tenant {tenant}"
    verb = "would delete" if dry_run else "deleted"
    line = f"{verb} {found['deleted']} file(s) ({found['bytes']} bytes) of {where}"
    if found["kept"]:
        line += f"; {found['kept']} kept (rewritten since they were listed)"
    click.echo(line)


# -- usage -------------------------------------------------------------------------------------


@tenants_group.command("usage", context_settings=CONTEXT)
@click.option("--tenant", help="One tenant (default: every tenant and the default tenant).")
@click.option("--recompute", is_flag=True, help="Count by listing the storage, and keep that.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@config_option
def tenants_usage(
    tenant: str | None, recompute: bool, as_json: bool, config_path: str | None
) -> None:
    """Bytes and objects per tenant, with its quotas."""
    if tenant is not None:
        _check(keys.check_tenant_id, tenant)

    async def operation(registry: Registry) -> list[dict[str, Any]]:
        snapshot = registry.snapshot
        if tenant is not None and tenant not in snapshot.tenants:
            raise NotFound(f"no tenant {tenant!r}")
        targets: list[str | None] = (
            [tenant] if tenant is not None else [None, *sorted(snapshot.tenants)]
        )
        usage = Usage(registry.backend)
        rows = []
        for target in targets:
            totals = await (usage.recompute(target) if recompute else usage.read(target))
            found = None if target is None else snapshot.tenants[target]
            rows.append(
                {
                    "tenant": target,
                    **totals.to_json(),
                    "maxBytes": None if found is None else found.max_bytes,
                    "maxObjectSize": None if found is None else found.max_object_size,
                }
            )
        return rows

    rows = run(_load(config_path), operation, {NotFound: "see `gateway tenants list`"})
    if as_json:
        _print_json(rows)
        return

    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    _table(
        ("TENANT", "BYTES", "OBJECTS", "MAX-BYTES", "MAX-OBJECT-SIZE"),
        (
            (
                row["tenant"] or "(default)",
                str(row["bytes"]),
                str(row["objects"]),
                cell(row["maxBytes"]),
                cell(row["maxObjectSize"]),
            )
            for row in rows
        ),
    )


COMMANDS: Final = (migrate, purge_command)


def register(group: click.Group) -> None:
    """Add the data-lifecycle commands to the ``gateway`` click group (``tenants usage``
    joins the ``tenants`` group when this module is imported)."""
    for command in COMMANDS:
        group.add_command(command)
