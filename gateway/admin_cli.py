"""The admin commands: ``gateway tenants|users|service-accounts|tokens|auths ...``.

Like Kestra's CLI, they work directly on the configured storage: no gateway needs to be
running. Each command loads the configuration (``-c/--config`` and the ``GATEWAY_*``
environment), starts the backend and a ``Registry`` over it, does one operation, and closes
both; a running gateway sees the change within its staleness bound (``auth.cache-seconds``).

The rules are the admin API's (``gateway.admin``) for a super admin, since whoever can run
these commands can read the storage itself. Exit codes: 0 done, 1 refused (exists, not found,
invalid value; the message says what to do next), 2 usage error.

No password, token hash or token (except the one print when a token is created) is ever
written to any output.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import click

from .config import Config, ConfigError, load, parse_size
from .errors import BadRequest, Conflict, GatewayError, NotFound
from .keys import check_tenant_id
from .lifecycle import parse_duration
from .registry import ROLES, Registry

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

CONTEXT: Final = {"help_option_names": ["-h", "--help"]}
# Fields an entity's JSON may carry that no output shows, whatever the registry adds later.
SECRET_FIELD: Final = re.compile(r"hash|password|secret|salt|plaintext|^token$", re.IGNORECASE)

Hints = Mapping[type[GatewayError], str]


class Refused(click.ClickException):
    """The operation was refused (exit 1): the message says why and what to do next."""

    exit_code = 1


# -- plumbing ----------------------------------------------------------------------------------


def config_option(func: F) -> F:
    """Add ``-c/--config`` to a command (every command reads the storage it names)."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help=(
            "Path to a configuration file (YAML; a Kestra configuration file works as is). "
            "GATEWAY_* environment variables apply on top of it."
        ),
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def _load(config_path: str | None) -> Config:
    try:
        config = load(config_path)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    if config["storage.type"] == "memory":
        raise Refused(
            "storage.type is memory: nothing would outlive this command; "
            "point -c at the configuration of a local or s3 store"
        )
    return config


async def _with_registry(
    config: Config, operation: Callable[[Registry], Awaitable[T]], hints: Hints
) -> T:
    from .app import make_backend  # the aiohttp application is not needed for the rest

    backend = make_backend(config)
    await backend.start()
    try:
        registry = Registry(backend)
        await registry.start()
        try:
            return await operation(registry)
        except GatewayError as exc:
            raise Refused(_with_hint(exc, hints)) from None
        finally:
            await registry.close()
    finally:
        await backend.close()


def _with_hint(exc: GatewayError, hints: Hints) -> str:
    """Given a registry error, return its message and the first hint whose class matches."""
    for cls, hint in hints.items():
        if isinstance(exc, cls):
            return f"{exc.message}; {hint}"
    return exc.message


def run(
    config: Config,
    operation: Callable[[Registry], Awaitable[T]],
    hints: Hints | None = None,
) -> T:
    """Given the configuration and an operation on the registry, run it over the storage."""
    try:
        return asyncio.run(_with_registry(config, operation, hints or {}))
    except ValueError as exc:  # a backend refusing its configuration at start-up
        raise Refused(str(exc)) from None
    except (OSError, ConnectionError, TimeoutError) as exc:
        # Not str(exc): it may name a physical path or carry a provider's details.
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise Refused(
            f"the {config['storage.type']} storage failed ({reason}); "
            "check the storage.* configuration and try again"
        ) from None


def _public(entity: Any) -> dict[str, Any]:
    """Given a registry entity, return its JSON without any secret field."""
    data: dict[str, Any] = entity.to_json()
    return {k: v for k, v in data.items() if not SECRET_FIELD.search(k)}


def _print_json(items: Any) -> None:
    click.echo(json.dumps(items, indent=2, sort_keys=True, default=str))


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> None:
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _tenant_words(tenant: str | None) -> str:
    return "the default tenant" if tenant is None else f"tenant {tenant}"


def _subject_words(kind: str, subject: str) -> str:
    return f"user {subject}" if kind == "user" else f"service account {subject}"


def _roles_cell(registry: Registry, kind: str, subject: str) -> str:
    bindings = registry.snapshot.bindings_of(kind, subject)
    cells = sorted(f"{b.tenant or '(default)'}={b.role}" for b in bindings)
    return ",".join(cells) or "-"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


TENANT_OPTION_HELP: Final = "Tenant identifier (omit for the default, null tenant)."
ROLE_OPTION: Final = click.option(
    "--role",
    required=True,
    type=click.Choice(ROLES, case_sensitive=False),
    help="Role to grant: ADMIN manages the tenant's members, EDITOR writes, VIEWER reads.",
)


# -- tenants -----------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def tenants() -> None:
    """Create, list, rename, delete and restore tenants."""


def _tenant_hints(tenant_id: str) -> Hints:
    return {
        NotFound: "see `gateway tenants list`",
        Conflict: f"see `gateway tenants get --tenant {tenant_id}`",
    }


@tenants.command("create", context_settings=CONTEXT)
@click.option("--tenant", "tenant_id", required=True, help="tenant identifier")
@click.option("--name", help="tenant description (default: the tenant identifier)")
@click.option(
    "--admin-username",
    help="Username of an existing admin user that will be admin of this tenant",
)
@config_option
def tenants_create(
    tenant_id: str, name: str | None, admin_username: str | None, config_path: str | None
) -> None:
    """create a tenant and assign admin roles to an existing admin user"""

    async def operation(registry: Registry) -> None:
        snapshot = registry.snapshot
        existing = snapshot.tenants.get(tenant_id)
        if existing is not None:
            how = (
                f"restore it with `gateway tenants restore --tenant {tenant_id}`"
                if existing.deleted
                else f"see `gateway tenants get --tenant {tenant_id}`"
            )
            state = "exists (deleted)" if existing.deleted else "exists"
            raise Refused(f"tenant {tenant_id!r} {state}; {how}")
        if admin_username is not None and admin_username not in snapshot.users:
            raise Refused(
                f"user {admin_username!r} does not exist, so no tenant was created; create "
                f"the user first with `gateway users create --username {admin_username}`"
            )
        tenant = await registry.create_tenant(tenant_id, name or tenant_id)
        click.echo(f"created tenant {tenant.id} ({tenant.name})")
        if not config["tenants.enabled"]:
            click.echo(
                "note: tenants.enabled is false in this configuration; the gateway serves "
                "named tenants only once it is true",
                err=True,
            )
        if admin_username is not None:
            try:
                await registry.grant(tenant.id, "user", admin_username, "ADMIN")
            except GatewayError as exc:
                raise Refused(
                    f"tenant {tenant.id!r} was created, but granting ADMIN to "
                    f"{admin_username!r} failed: {exc.message}; run `gateway users grant "
                    f"--username {admin_username} --tenant {tenant.id} --role ADMIN`"
                ) from None
            click.echo(f"granted ADMIN on tenant {tenant.id} to user {admin_username}")

    config = _load(config_path)
    run(config, operation, _tenant_hints(tenant_id))


@tenants.command("list", context_settings=CONTEXT)
@json_option
@config_option
def tenants_list(as_json: bool, config_path: str | None) -> None:
    """List every tenant, deleted ones included."""

    async def operation(registry: Registry) -> None:
        found = sorted(registry.snapshot.tenants.values(), key=lambda t: t.id)
        if as_json:
            _print_json([_public(t) for t in found])
            return
        _table(
            ("ID", "NAME", "STATUS"),
            ((t.id, t.name, "deleted" if t.deleted else "active") for t in found),
        )

    run(_load(config_path), operation)


@tenants.command("get", context_settings=CONTEXT)
@click.option("--tenant", "tenant_id", required=True, help="tenant identifier")
@json_option
@config_option
def tenants_get(tenant_id: str, as_json: bool, config_path: str | None) -> None:
    """Show one tenant and its members."""

    async def operation(registry: Registry) -> None:
        snapshot = registry.snapshot
        tenant = snapshot.tenants.get(tenant_id)
        if tenant is None:
            raise Refused(f"no tenant {tenant_id!r}; see `gateway tenants list`")
        members = sorted(snapshot.members(tenant_id), key=lambda b: (b.kind, b.subject))
        if as_json:
            _print_json({**_public(tenant), "members": [_public(b) for b in members]})
            return
        click.echo(f"id:      {tenant.id}")
        click.echo(f"name:    {tenant.name}")
        click.echo(f"status:  {'deleted' if tenant.deleted else 'active'}")
        click.echo("members:" + ("" if members else " none"))
        for b in members:
            click.echo(f"  {b.role:7} {_subject_words(b.kind, b.subject)}")

    run(_load(config_path), operation)


def _change_tenant(config_path: str | None, tenant_id: str, verb: str, **change: Any) -> None:
    async def operation(registry: Registry) -> None:
        if tenant_id not in registry.snapshot.tenants:
            raise Refused(f"no tenant {tenant_id!r}; see `gateway tenants list`")
        tenant = await registry.update_tenant(tenant_id, **change)
        click.echo(f"{verb} tenant {tenant.id} ({tenant.name})")

    run(_load(config_path), operation, _tenant_hints(tenant_id))


NO_LIMIT: Final = -1


class Limit(click.ParamType[int, "str | int"]):
    """A size such as ``10GiB``, ``500MB`` or ``1048576``, or ``none`` (``NO_LIMIT``)."""

    name = "size"

    def convert(
        self, value: str | int, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        if value.strip().lower() == "none":
            return NO_LIMIT
        try:
            return parse_size(param.name if param and param.name else "size", value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


@tenants.command("update", context_settings=CONTEXT)
@click.option("--tenant", "tenant_id", required=True, help="tenant identifier")
@click.option("--name", help="new tenant description")
@click.option(
    "--max-bytes",
    type=Limit(),
    help="Quota: the most bytes the tenant may hold (10GiB, 500MB...; none: no limit).",
)
@click.option(
    "--max-object-size",
    type=Limit(),
    help="Quota: the largest object the tenant may upload (none: the gateway's limit).",
)
@config_option
def tenants_update(
    tenant_id: str,
    name: str | None,
    max_bytes: int | None,
    max_object_size: int | None,
    config_path: str | None,
) -> None:
    """Rename a tenant (its identifier never changes) or set its quotas."""
    change: dict[str, Any] = {}
    if max_bytes is not None:
        change["max_bytes"] = None if max_bytes == NO_LIMIT else max_bytes
    if max_object_size is not None:
        change["max_object_size"] = None if max_object_size == NO_LIMIT else max_object_size
    if name is None and not change:
        raise click.UsageError("name something to change: --name, --max-bytes, --max-object-size")
    _change_tenant(config_path, tenant_id, "updated", name=name, **change)


@tenants.command("delete", context_settings=CONTEXT)
@click.option("--tenant", "tenant_id", required=True, help="tenant identifier")
@click.option(
    "--purge",
    is_flag=True,
    help="Delete every object of the tenant, then the tenant and its roles, for good.",
)
@click.option("--yes", is_flag=True, help="With --purge: do not ask for confirmation.")
@config_option
def tenants_delete(tenant_id: str, purge: bool, yes: bool, config_path: str | None) -> None:
    """Soft-delete a tenant: it is refused from now on; its files and members are kept.

    With --purge: soft-delete it, delete every object under its folder, its usage counters,
    its role bindings, then the tenant itself. An interrupted purge is finished by running
    the same command again.
    """
    if not purge:
        _change_tenant(config_path, tenant_id, "deleted", deleted=True)
        return
    try:
        check_tenant_id(tenant_id)
    except GatewayError as exc:
        raise Refused(exc.message) from None
    config = _load(config_path)
    if not yes:
        click.confirm(
            f"Delete tenant {tenant_id!r} and every object it holds, for good?", abort=True
        )

    async def operation(registry: Registry) -> None:
        from .lifecycle import audit, purge_tenant
        from .usage import Usage

        usage = Usage(registry.backend)
        settle = 2 * float(config["auth.cache-seconds"])
        await audit(registry.backend, tenant_id, "tenant.purge", tenant_id)
        report = await purge_tenant(registry.backend, registry, usage, tenant_id, settle=settle)
        click.echo(
            f"purged tenant {tenant_id}: {report.deleted} object(s), {report.bytes} bytes "
            "deleted; the tenant and its roles are gone"
        )

    run(config, operation, _tenant_hints(tenant_id))


@tenants.command("restore", context_settings=CONTEXT)
@click.option("--tenant", "tenant_id", required=True, help="tenant identifier")
@config_option
def tenants_restore(tenant_id: str, config_path: str | None) -> None:
    """Restore a soft-deleted tenant, with its files and members."""
    _change_tenant(config_path, tenant_id, "restored", deleted=False)


# -- role bindings (users and service accounts) -------------------------------------------------


def _grant(config_path: str | None, kind: str, subject: str, tenant: str | None, role: str) -> None:
    role = role.upper()

    async def operation(registry: Registry) -> None:
        _check_subject(registry, kind, subject)
        _check_tenant(registry, tenant)
        binding = await registry.grant(tenant, kind, subject, role)
        click.echo(
            f"granted {binding.role} on {_tenant_words(tenant)} to {_subject_words(kind, subject)}"
        )

    run(
        _load(config_path),
        operation,
        {NotFound: "see `gateway tenants list` and `gateway users list`"},
    )


def _revoke(config_path: str | None, kind: str, subject: str, tenant: str | None) -> None:
    async def operation(registry: Registry) -> None:
        _check_subject(registry, kind, subject)
        role = registry.snapshot.role(tenant, kind, subject)
        if role is None:
            raise Refused(
                f"{_subject_words(kind, subject)} has no role on {_tenant_words(tenant)}; "
                f"see `gateway {_group_of(kind)} list`"
            )
        await registry.revoke(tenant, kind, subject)
        click.echo(
            f"revoked {role} on {_tenant_words(tenant)} from {_subject_words(kind, subject)}"
        )

    run(_load(config_path), operation, {NotFound: f"see `gateway {_group_of(kind)} list`"})


def _group_of(kind: str) -> str:
    return "users" if kind == "user" else "service-accounts"


def _check_subject(registry: Registry, kind: str, subject: str) -> None:
    snapshot = registry.snapshot
    known = snapshot.users if kind == "user" else snapshot.service_accounts
    if subject not in known:
        raise Refused(
            f"no {kind.replace('-', ' ')} {subject!r}; see `gateway {_group_of(kind)} list`"
        )


def _check_tenant(registry: Registry, tenant: str | None) -> None:
    """Refuse a tenant that does not exist; note one that is deleted (its roles are kept and
    count again once it is restored, as the registry and the admin API allow)."""
    if tenant is None:
        return
    check_tenant_id(tenant)
    found = registry.snapshot.tenants.get(tenant)
    if found is None:
        raise Refused(
            f"no tenant {tenant!r}; create it with `gateway tenants create --tenant {tenant}`"
        )
    if found.deleted:
        click.echo(
            f"note: tenant {tenant!r} is deleted; its roles count again once it is restored "
            f"with `gateway tenants restore --tenant {tenant}`",
            err=True,
        )


# -- users -------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def users() -> None:
    """Create, list and delete users, and grant or revoke their roles on tenants."""


def _read_password(password: str | None, from_stdin: bool) -> str:
    if password is not None and from_stdin:
        raise click.UsageError("give --password or --password-stdin, not both")
    if from_stdin:
        line = sys.stdin.readline()  # only the first line: a trailing newline is no part of it
        password = line.rstrip("\r\n")
    elif password is None:
        if not sys.stdin.isatty():
            raise click.UsageError(
                "no password: pass --password-stdin and write the password on standard input"
            )
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    return password


@users.command("create", context_settings=CONTEXT)
@click.option("--username", required=True, help="Username (what HTTP Basic authentication sends).")
@click.option(
    "--password",
    help="Password (visible in the shell history and process list: prefer --password-stdin).",
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input.",
)
@click.option("--super-admin", is_flag=True, help="Make the user a super admin (manages all).")
@click.option(
    "--can-create-tenants", is_flag=True, help="Let the user create tenants (and admin them)."
)
@config_option
def users_create(
    username: str,
    password: str | None,
    password_stdin: bool,
    super_admin: bool,
    can_create_tenants: bool,
    config_path: str | None,
) -> None:
    """Create a user. Without --password or --password-stdin, ask for it twice on a terminal."""
    config = _load(config_path)
    secret = _read_password(password, password_stdin)

    async def operation(registry: Registry) -> None:
        if username in registry.snapshot.users:  # before hashing: scrypt is slow on purpose
            raise Refused(f"user {username!r} exists; see `gateway users list`")
        user = await registry.create_user(
            username, secret, super_admin=super_admin, can_create_tenants=can_create_tenants
        )
        rights = [w for w, on in (("super admin", super_admin),
                                  ("can create tenants", can_create_tenants)) if on]  # fmt: skip
        click.echo(f"created user {user.username}" + (f" ({', '.join(rights)})" if rights else ""))

    run(config, operation, {Conflict: "see `gateway users list`"})


@users.command("list", context_settings=CONTEXT)
@json_option
@config_option
def users_list(as_json: bool, config_path: str | None) -> None:
    """List users with their rights and roles (never their passwords or hashes)."""

    async def operation(registry: Registry) -> None:
        found = sorted(registry.snapshot.users.values(), key=lambda u: u.username)
        if as_json:
            _print_json(
                [
                    {
                        **_public(u),
                        "bindings": [
                            _public(b) for b in registry.snapshot.bindings_of("user", u.username)
                        ],
                    }
                    for u in found
                ]
            )
            return
        _table(
            ("USERNAME", "SUPER-ADMIN", "CAN-CREATE-TENANTS", "ROLES"),
            (
                (
                    u.username,
                    _yes(u.super_admin),
                    _yes(u.can_create_tenants),
                    _roles_cell(registry, "user", u.username),
                )
                for u in found
            ),
        )

    run(_load(config_path), operation)


@users.command("delete", context_settings=CONTEXT)
@click.option("--username", required=True, help="Username of the user to delete.")
@config_option
def users_delete(username: str, config_path: str | None) -> None:
    """Delete a user and their roles."""

    async def operation(registry: Registry) -> None:
        _check_subject(registry, "user", username)
        await registry.delete_user(username)
        click.echo(f"deleted user {username}")

    run(_load(config_path), operation, {NotFound: "see `gateway users list`"})


@users.command("grant", context_settings=CONTEXT)
@click.option("--username", required=True, help="Username of an existing user.")
@click.option("--tenant", help=TENANT_OPTION_HELP)
@ROLE_OPTION
@config_option
def users_grant(username: str, tenant: str | None, role: str, config_path: str | None) -> None:
    """Give a user a role on a tenant (replacing the role they had there)."""
    _grant(config_path, "user", username, tenant, role)


@users.command("revoke", context_settings=CONTEXT)
@click.option("--username", required=True, help="Username of an existing user.")
@click.option("--tenant", help=TENANT_OPTION_HELP)
@config_option
def users_revoke(username: str, tenant: str | None, config_path: str | None) -> None:
    """Take away a user's role on a tenant."""
    _revoke(config_path, "user", username, tenant)


# -- service accounts --------------------------------------------------------------------------


@click.group("service-accounts", context_settings=CONTEXT)
def service_accounts() -> None:
    """Create, list and delete service accounts (for workers), and grant or revoke roles."""


@service_accounts.command("create", context_settings=CONTEXT)
@click.option("--name", required=True, help="Name of the service account.")
@click.option("--description", default="", help="What the account is for.")
@config_option
def service_accounts_create(name: str, description: str, config_path: str | None) -> None:
    """Create a service account; then give it a token with `gateway tokens create`."""

    async def operation(registry: Registry) -> None:
        if name in registry.snapshot.service_accounts:
            raise Refused(f"service account {name!r} exists; see `gateway service-accounts list`")
        account = await registry.create_service_account(name, description)
        click.echo(f"created service account {account.name}")

    run(_load(config_path), operation, {Conflict: "see `gateway service-accounts list`"})


@service_accounts.command("list", context_settings=CONTEXT)
@json_option
@config_option
def service_accounts_list(as_json: bool, config_path: str | None) -> None:
    """List service accounts with their roles."""

    async def operation(registry: Registry) -> None:
        snapshot = registry.snapshot
        found = sorted(snapshot.service_accounts.values(), key=lambda a: a.name)
        if as_json:
            _print_json(
                [
                    {
                        **_public(a),
                        "bindings": [
                            _public(b) for b in snapshot.bindings_of("service-account", a.name)
                        ],
                    }
                    for a in found
                ]
            )
            return
        _table(
            ("NAME", "DESCRIPTION", "ROLES"),
            (
                (a.name, a.description, _roles_cell(registry, "service-account", a.name))
                for a in found
            ),
        )

    run(_load(config_path), operation)


@service_accounts.command("delete", context_settings=CONTEXT)
@click.option("--name", required=True, help="Name of the service account to delete.")
@config_option
def service_accounts_delete(name: str, config_path: str | None) -> None:
    """Delete a service account, its tokens and its roles."""

    async def operation(registry: Registry) -> None:
        _check_subject(registry, "service-account", name)
        await registry.delete_service_account(name)
        click.echo(f"deleted service account {name}")

    run(_load(config_path), operation, {NotFound: "see `gateway service-accounts list`"})


@service_accounts.command("grant", context_settings=CONTEXT)
@click.option("--name", required=True, help="Name of an existing service account.")
@click.option("--tenant", help=TENANT_OPTION_HELP)
@ROLE_OPTION
@config_option
def service_accounts_grant(
    name: str, tenant: str | None, role: str, config_path: str | None
) -> None:
    """Give a service account a role on a tenant (replacing the role it had there)."""
    _grant(config_path, "service-account", name, tenant, role)


@service_accounts.command("revoke", context_settings=CONTEXT)
@click.option("--name", required=True, help="Name of an existing service account.")
@click.option("--tenant", help=TENANT_OPTION_HELP)
@config_option
def service_accounts_revoke(name: str, tenant: str | None, config_path: str | None) -> None:
    """Take away a service account's role on a tenant."""
    _revoke(config_path, "service-account", name, tenant)


# -- tokens ------------------------------------------------------------------------------------


class Duration(click.ParamType[int, "str | int"]):
    """``30d``, ``12h``, ``15m``, ``3600s`` or ``3600``: a positive number of seconds."""

    name = "duration"

    def convert(
        self, value: str | int, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        try:
            return parse_duration(str(value))
        except BadRequest as exc:
            self.fail(exc.message, param, ctx)


@click.group(context_settings=CONTEXT)
def tokens() -> None:
    """Create, list and revoke service-account tokens (Bearer authentication)."""


@tokens.command("create", context_settings=CONTEXT)
@click.option("--service-account", "account", required=True, help="Name of the service account.")
@click.option("--description", default="", help="What or who the token is for.")
@click.option(
    "--expires-in",
    type=Duration(),
    help="Lifetime: 30d, 12h, 15m or 3600s (default: never expires).",
)
@config_option
def tokens_create(
    account: str, description: str, expires_in: int | None, config_path: str | None
) -> None:
    """Create a token and print it once, alone on standard output (details on standard error).

    The token cannot be shown again: only its hash is stored. Capture it, e.g.
    TOKEN=$(gateway tokens create --service-account worker).
    """

    async def operation(registry: Registry) -> None:
        _check_subject(registry, "service-account", account)
        token, plaintext = await registry.create_token(
            account, description=description, expires_in=expires_in
        )
        click.echo(
            f"created token {token.id} for service account {account}"
            + (f", expiring {token.expires}" if token.expires else ", never expiring")
            + "; it is shown only this once",
            err=True,
        )
        click.echo(plaintext)  # the only time the token is ever written anywhere

    run(_load(config_path), operation, {NotFound: "see `gateway service-accounts list`"})


@tokens.command("list", context_settings=CONTEXT)
@click.option("--service-account", "account", required=True, help="Name of the service account.")
@json_option
@config_option
def tokens_list(account: str, as_json: bool, config_path: str | None) -> None:
    """List a service account's tokens (ids and dates; never the tokens or their hashes)."""

    async def operation(registry: Registry) -> None:
        _check_subject(registry, "service-account", account)
        found = sorted(
            (t for t in registry.snapshot.tokens.values() if t.account == account),
            key=lambda t: t.id,
        )
        now = time.time()
        if as_json:
            _print_json([{**_public(t), "active": t.active(now)} for t in found])
            return
        _table(
            ("ID", "DESCRIPTION", "CREATED", "EXPIRES", "STATUS"),
            (
                (
                    t.id,
                    t.description,
                    t.created,
                    t.expires or "never",
                    "revoked" if t.revoked else "active" if t.active(now) else "expired",
                )
                for t in found
            ),
        )

    run(_load(config_path), operation)


@tokens.command("revoke", context_settings=CONTEXT)
@click.option("--token-id", required=True, help="Id of the token (see `gateway tokens list`).")
@config_option
def tokens_revoke(token_id: str, config_path: str | None) -> None:
    """Revoke a token: it authenticates nothing from now on."""

    async def operation(registry: Registry) -> None:
        known = registry.snapshot.tokens.get(token_id)
        token = await registry.revoke_token(token_id)
        already = known is not None and known.revoked
        click.echo(
            f"{'token was already revoked:' if already else 'revoked token'} {token.id} "
            f"of service account {token.account}"
        )

    run(
        _load(config_path),
        operation,
        {NotFound: "see `gateway tokens list --service-account NAME`"},
    )


# -- auths users sync-access -------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def auths() -> None:
    """Access maintenance."""


@auths.group("users", context_settings=CONTEXT)
def auths_users() -> None:
    """Users' access."""


@auths_users.command("sync-access", context_settings=CONTEXT)
@click.option(
    "--tenant",
    help=(
        "Also copy each default-tenant role onto this existing tenant, for subjects that "
        "have no role there yet (when the default tenant is turned off and its data moves here)."
    ),
)
@click.option("--dry-run", is_flag=True, help="Print the changes without making them.")
@config_option
def sync_access(tenant: str | None, dry_run: bool, config_path: str | None) -> None:
    """Give users the access they had before multi-tenancy was turned on.

    Before tenants existed, access lived in role bindings on the default (null) tenant. Those
    bindings are kept as they are: every user and service account keeps its role on the
    default tenant, which the gateway keeps serving while tenants.default-tenant is true.

    With --tenant ID (for an instance turning the default tenant off and moving its data into
    tenant ID), each default-tenant binding is copied onto tenant ID when the user or service
    account has no role there yet; a role already on tenant ID is never changed. Subjects with
    no binding at all get nothing: grant them roles explicitly.

    Prints one line per change and "N change(s)"; running it again makes no change.
    """

    async def operation(registry: Registry) -> None:
        snapshot = registry.snapshot
        if tenant is not None:
            _check_tenant(registry, tenant)
        kept = sorted(snapshot.members(None), key=lambda b: (b.kind, b.subject))
        changes = 0
        if tenant is not None:
            for b in kept:  # members() holds only subjects that still exist
                if snapshot.role(tenant, b.kind, b.subject) is not None:
                    continue
                if not dry_run:
                    await registry.grant(tenant, b.kind, b.subject, b.role)
                verb = "would grant" if dry_run else "granted"
                click.echo(f"{verb} {b.role} on {tenant} to {_subject_words(b.kind, b.subject)}")
                changes += 1
        else:
            click.echo(f"{len(kept)} default-tenant role(s) kept as they are", err=True)
        summary = f"{changes} change(s)"
        click.echo(summary + (" (dry run: nothing was written)" if dry_run and changes else ""))

    config = _load(config_path)
    if tenant is None and config["tenants.enabled"] and not config["tenants.default-tenant"]:
        click.echo(
            "note: tenants.default-tenant is false, so default-tenant roles give no access; "
            "pass --tenant ID to copy them onto the tenant that now holds the data",
            err=True,
        )
    run(config, operation, {NotFound: "see `gateway tenants list`"})


COMMANDS: Final = (tenants, users, service_accounts, tokens, auths)


def register(group: click.Group) -> None:
    """Add the admin commands to the ``gateway`` click group."""
    for command in COMMANDS:
        group.add_command(command)
