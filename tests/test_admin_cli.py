"""The admin commands (``gateway tenants|users|service-accounts|tokens|auths``) on a local store.

Each command works directly on the storage named by ``-c``; the tests then open a ``Registry``
over the same directory to check what the command stored. Few users are created: every one
costs an scrypt hash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from backends.local import LocalBackend
from gateway.cli import main
from gateway.registry import Registry

T = TypeVar("T")
PASSWORD = "correct horse battery staple"


class Gateway:
    """Runs ``gateway ...`` with ``-c`` pointing at a local store in a temporary directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path / "data"
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(
            "storage:\n"
            "  type: local\n"
            "  local:\n"
            f"    base-path: {json.dumps(str(self.base))}\n"
            "tenants:\n"
            "  enabled: true\n",
            encoding="utf-8",
        )

    def __call__(self, *args: str, input: str | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(main, [*args, "-c", str(self.config)], input=input)

    def registry(self, read: Callable[[Registry], Awaitable[T]]) -> T:
        """Given a reader of a started registry over the same store, return what it read."""

        async def go() -> T:
            backend = LocalBackend(str(self.base))
            await backend.start()
            try:
                registry = Registry(backend)
                await registry.start()
                try:
                    return await read(registry)
                finally:
                    await registry.close()
            finally:
                await backend.close()

        return asyncio.run(go())

    def state(self) -> Any:
        """The registry's snapshot of the store, as it is now."""

        async def read(registry: Registry) -> Any:
            return registry.snapshot

        return self.registry(read)

    def create_user(self, username: str) -> None:
        result = self("users", "create", "--username", username, "--password-stdin",
                      input=PASSWORD + "\n")  # fmt: skip
        assert result.exit_code == 0, result.output


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


def assert_no_secret(result: Result) -> None:
    assert PASSWORD not in result.output
    assert "scrypt" not in result.output.lower()
    assert "hash" not in result.output.lower()


# -- the seed's walk-through -------------------------------------------------------------------


def test_tenants_create_help_lists_the_seeds_options() -> None:
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(main, ["tenants", "create", flag])
        assert result.exit_code == 0, result.output
        for option in ("--tenant", "--name", "--admin-username", "-c, --config", "-h, --help"):
            assert option in result.output
        assert "create a tenant and assign admin roles to an existing admin user" in result.output


def test_every_command_has_help() -> None:
    commands = (
        [["tenants", name] for name in ("create", "list", "get", "update", "delete", "restore")]
        + [["users", name] for name in ("create", "list", "delete", "grant", "revoke")]
        + [["service-accounts", name] for name in ("create", "list", "delete", "grant", "revoke")]
        + [["tokens", name] for name in ("create", "list", "revoke")]
        + [["auths", "users", "sync-access"]]
    )
    for command in commands:
        result = CliRunner().invoke(main, [*command, "-h"])
        assert result.exit_code == 0, (command, result.output)
        assert "-c, --config" in result.output


def test_create_tenant_with_admin_username_gives_that_user_admin(gateway: Gateway) -> None:
    gateway.create_user("alice")
    result = gateway("tenants", "create", "--tenant", "stage", "--name", "Staging",
                     "--admin-username", "alice")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "created tenant stage (Staging)" in result.stdout
    assert "granted ADMIN on tenant stage to user alice" in result.stdout
    state = gateway.state()
    assert state.tenants["stage"].name == "Staging"
    assert not state.tenants["stage"].deleted
    assert state.role("stage", "user", "alice") == "ADMIN"

    listed = gateway("tenants", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [(t["id"], t["name"]) for t in json.loads(listed.stdout)] == [("stage", "Staging")]
    got = gateway("tenants", "get", "--tenant", "stage")
    assert got.exit_code == 0, got.output
    assert "ADMIN   user alice" in got.stdout


def test_create_tenant_twice_exits_1_with_a_hint(gateway: Gateway) -> None:
    assert gateway("tenants", "create", "--tenant", "stage", "--name", "Staging").exit_code == 0
    result = gateway("tenants", "create", "--tenant", "stage", "--name", "Other")
    assert result.exit_code == 1
    assert "tenant 'stage' exists; see `gateway tenants get --tenant stage`" in result.stderr
    assert gateway.state().tenants["stage"].name == "Staging"


def test_unknown_admin_username_exits_1_and_creates_no_tenant(gateway: Gateway) -> None:
    result = gateway("tenants", "create", "--tenant", "stage", "--name", "Staging",
                     "--admin-username", "nobody")  # fmt: skip
    assert result.exit_code == 1
    assert "user 'nobody' does not exist" in result.stderr
    assert "gateway users create --username nobody" in result.stderr
    assert "stage" not in gateway.state().tenants


def test_invalid_tenant_id_exits_1(gateway: Gateway) -> None:
    result = gateway("tenants", "create", "--tenant", "Bad.Id", "--name", "x")
    assert result.exit_code == 1
    assert "tenant id" in result.stderr
    assert gateway.state().tenants == {}


def test_update_delete_and_restore_a_tenant(gateway: Gateway) -> None:
    assert gateway("tenants", "create", "--tenant", "stage", "--name", "Staging").exit_code == 0
    assert gateway("tenants", "update", "--tenant", "stage", "--name", "Stage 2").exit_code == 0
    assert gateway.state().tenants["stage"].name == "Stage 2"

    assert gateway("tenants", "delete", "--tenant", "stage").exit_code == 0
    assert gateway.state().tenants["stage"].deleted
    listed = gateway("tenants", "list")
    assert "deleted" in listed.stdout
    again = gateway("tenants", "create", "--tenant", "stage", "--name", "x")
    assert again.exit_code == 1
    assert "gateway tenants restore --tenant stage" in again.stderr

    assert gateway("tenants", "restore", "--tenant", "stage").exit_code == 0
    assert not gateway.state().tenants["stage"].deleted


def test_missing_tenant_exits_1(gateway: Gateway) -> None:
    for command in (
        ["tenants", "get", "--tenant", "nope"],
        ["tenants", "update", "--tenant", "nope", "--name", "x"],
        ["tenants", "delete", "--tenant", "nope"],
        ["tenants", "restore", "--tenant", "nope"],
    ):
        result = gateway(*command)
        assert result.exit_code == 1, (command, result.output)
        assert "no tenant 'nope'; see `gateway tenants list`" in result.stderr


# -- users -------------------------------------------------------------------------------------


def test_users_create_list_and_delete(gateway: Gateway) -> None:
    result = gateway("users", "create", "--username", "alice", "--password-stdin",
                     "--can-create-tenants", input=PASSWORD + "\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_no_secret(result)
    user = gateway.state().users["alice"]
    assert user.can_create_tenants and not user.super_admin

    async def check(registry: Registry) -> object:
        return registry.verify_password("alice", PASSWORD)

    assert gateway.registry(check) is not None

    twice = gateway("users", "create", "--username", "alice", "--password", "other-password")
    assert twice.exit_code == 1
    assert "user 'alice' exists; see `gateway users list`" in twice.stderr

    for args in (["users", "list"], ["users", "list", "--json"]):
        listed = gateway(*args)
        assert listed.exit_code == 0, listed.output
        assert "alice" in listed.stdout
        assert_no_secret(listed)
    (row,) = json.loads(gateway("users", "list", "--json").stdout)
    assert row["username"] == "alice"
    assert row["bindings"] == []

    assert gateway("users", "delete", "--username", "alice").exit_code == 0
    assert "alice" not in gateway.state().users
    gone = gateway("users", "delete", "--username", "alice")
    assert gone.exit_code == 1
    assert "see `gateway users list`" in gone.stderr


def test_users_create_without_a_password_off_a_terminal_exits_2(gateway: Gateway) -> None:
    result = gateway("users", "create", "--username", "alice")
    assert result.exit_code == 2
    assert "--password-stdin" in result.output
    both = gateway("users", "create", "--username", "alice", "--password", "x",
                   "--password-stdin", input="y\n")  # fmt: skip
    assert both.exit_code == 2
    empty = gateway("users", "create", "--username", "alice", "--password-stdin", input="\n")
    assert empty.exit_code == 1
    assert gateway.state().users == {}


def test_users_grant_and_revoke(gateway: Gateway) -> None:
    gateway.create_user("alice")
    assert gateway("tenants", "create", "--tenant", "stage", "--name", "Staging").exit_code == 0

    granted = gateway("users", "grant", "--username", "alice", "--tenant", "stage",
                      "--role", "editor")  # fmt: skip
    assert granted.exit_code == 0, granted.output
    assert "granted EDITOR on tenant stage to user alice" in granted.stdout
    default = gateway("users", "grant", "--username", "alice", "--role", "VIEWER")
    assert default.exit_code == 0, default.output
    assert "granted VIEWER on the default tenant to user alice" in default.stdout
    state = gateway.state()
    assert state.role("stage", "user", "alice") == "EDITOR"
    assert state.role(None, "user", "alice") == "VIEWER"
    assert "(default)=VIEWER,stage=EDITOR" in gateway("users", "list").stdout

    assert gateway("users", "revoke", "--username", "alice", "--tenant", "stage").exit_code == 0
    state = gateway.state()
    assert state.role("stage", "user", "alice") is None
    assert state.role(None, "user", "alice") == "VIEWER"
    again = gateway("users", "revoke", "--username", "alice", "--tenant", "stage")
    assert again.exit_code == 1
    assert "has no role on tenant stage" in again.stderr

    unknown_tenant = gateway("users", "grant", "--username", "alice", "--tenant", "nope",
                             "--role", "ADMIN")  # fmt: skip
    assert unknown_tenant.exit_code == 1
    assert "gateway tenants create --tenant nope" in unknown_tenant.stderr
    unknown_user = gateway("users", "grant", "--username", "bob", "--role", "ADMIN")
    assert unknown_user.exit_code == 1
    assert "no user 'bob'" in unknown_user.stderr
    bad_role = gateway("users", "grant", "--username", "alice", "--role", "OWNER")
    assert bad_role.exit_code == 2


# -- service accounts and tokens ---------------------------------------------------------------


def test_service_accounts_create_list_grant_revoke_delete(gateway: Gateway) -> None:
    created = gateway("service-accounts", "create", "--name", "worker", "--description", "ci")
    assert created.exit_code == 0, created.output
    assert gateway("service-accounts", "create", "--name", "worker").exit_code == 1
    assert gateway("tenants", "create", "--tenant", "stage", "--name", "Staging").exit_code == 0
    granted = gateway("service-accounts", "grant", "--name", "worker", "--tenant", "stage",
                      "--role", "EDITOR")  # fmt: skip
    assert granted.exit_code == 0, granted.output
    assert "granted EDITOR on tenant stage to service account worker" in granted.stdout
    listed = gateway("service-accounts", "list")
    assert "worker" in listed.stdout and "stage=EDITOR" in listed.stdout
    (row,) = json.loads(gateway("service-accounts", "list", "--json").stdout)
    assert row["name"] == "worker"
    assert gateway.state().role("stage", "service-account", "worker") == "EDITOR"

    revoked = gateway("service-accounts", "revoke", "--name", "worker", "--tenant", "stage")
    assert revoked.exit_code == 0, revoked.output
    assert gateway.state().role("stage", "service-account", "worker") is None
    assert gateway("service-accounts", "delete", "--name", "worker").exit_code == 0
    assert "worker" not in gateway.state().service_accounts
    assert gateway("service-accounts", "delete", "--name", "worker").exit_code == 1


def test_tokens_create_list_and_revoke(gateway: Gateway) -> None:
    assert gateway("service-accounts", "create", "--name", "worker").exit_code == 0
    created = gateway("tokens", "create", "--service-account", "worker",
                      "--description", "ci runner", "--expires-in", "12h")  # fmt: skip
    assert created.exit_code == 0, created.output
    plaintext = created.stdout.strip()
    assert plaintext and "\n" not in plaintext  # the token alone on stdout
    assert plaintext not in created.stderr
    assert "shown only this once" in created.stderr

    async def verify(registry: Registry) -> Any:
        return registry.verify_token(plaintext)

    found = gateway.registry(verify)
    assert found is not None
    token, account = found
    assert account.name == "worker"

    for args in ([], ["--json"]):
        listed = gateway("tokens", "list", "--service-account", "worker", *args)
        assert listed.exit_code == 0, listed.output
        assert token.id in listed.stdout
        assert plaintext not in listed.output
        assert "hash" not in listed.output.lower()
    (row,) = json.loads(gateway("tokens", "list", "--service-account", "worker", "--json").stdout)
    assert row["description"] == "ci runner"

    revoked = gateway("tokens", "revoke", "--token-id", token.id)
    assert revoked.exit_code == 0, revoked.output
    assert plaintext not in revoked.output
    assert gateway.registry(verify) is None
    missing = gateway("tokens", "revoke", "--token-id", "no-such-token")
    assert missing.exit_code == 1


def test_tokens_create_refuses_bad_input(gateway: Gateway) -> None:
    no_account = gateway("tokens", "create", "--service-account", "ghost")
    assert no_account.exit_code == 1
    assert "no service account 'ghost'" in no_account.stderr
    assert gateway("service-accounts", "create", "--name", "worker").exit_code == 0
    for bad in ("soon", "0s", "-1d", "12y"):
        result = gateway("tokens", "create", "--service-account", "worker", "--expires-in", bad)
        assert result.exit_code == 2, (bad, result.output)
    assert gateway.state().tokens == {}


# -- auths users sync-access -------------------------------------------------------------------


def test_sync_access_copies_default_tenant_roles_and_is_idempotent(gateway: Gateway) -> None:
    gateway.create_user("alice")
    for name in ("worker", "idle"):
        assert gateway("service-accounts", "create", "--name", name).exit_code == 0
    assert gateway("users", "grant", "--username", "alice", "--role", "VIEWER").exit_code == 0
    granted = gateway("service-accounts", "grant", "--name", "worker", "--role", "EDITOR")
    assert granted.exit_code == 0, granted.output
    assert gateway("tenants", "create", "--tenant", "stage", "--name", "Staging",
                   "--admin-username", "alice").exit_code == 0  # fmt: skip

    kept = gateway("auths", "users", "sync-access")
    assert kept.exit_code == 0, kept.output
    assert "0 change(s)" in kept.stdout

    dry = gateway("auths", "users", "sync-access", "--tenant", "stage", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would grant EDITOR on stage to service account worker" in dry.stdout
    assert gateway.state().role("stage", "service-account", "worker") is None

    synced = gateway("auths", "users", "sync-access", "--tenant", "stage")
    assert synced.exit_code == 0, synced.output
    assert synced.stdout.splitlines() == [
        "granted EDITOR on stage to service account worker",
        "1 change(s)",
    ]
    state = gateway.state()
    assert state.role("stage", "service-account", "worker") == "EDITOR"
    assert state.role("stage", "user", "alice") == "ADMIN"  # a role already there is kept
    assert state.role("stage", "service-account", "idle") is None  # no binding: nothing given
    assert state.role(None, "user", "alice") == "VIEWER"  # default-tenant roles are kept
    assert state.role(None, "service-account", "worker") == "EDITOR"

    again = gateway("auths", "users", "sync-access", "--tenant", "stage")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == ["0 change(s)"]


def test_sync_access_to_a_missing_tenant_exits_1(gateway: Gateway) -> None:
    result = gateway("auths", "users", "sync-access", "--tenant", "nope")
    assert result.exit_code == 1
    assert "gateway tenants create --tenant nope" in result.stderr


# -- usage and configuration errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tenants", "create", "--name", "x"],
        ["tenants", "frobnicate"],
        ["users", "grant", "--username", "alice"],
        ["tokens", "list"],
        ["auths", "users", "sync-access", "--bogus"],
    ],
)
def test_usage_errors_exit_2(gateway: Gateway, args: list[str]) -> None:
    assert gateway(*args).exit_code == 2


def test_a_bad_configuration_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("storage:\n  type: floppy\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tenants", "list", "-c", str(config)])
    assert result.exit_code == 1
    assert "storage.type" in result.stderr


def test_a_running_registry_sees_a_tenant_the_cli_created(gateway: Gateway) -> None:
    async def scenario() -> Any:
        backend = LocalBackend(str(gateway.base))
        await backend.start()
        registry = Registry(backend)
        await registry.start()
        try:
            result = await asyncio.to_thread(
                gateway, "tenants", "create", "--tenant", "stage", "--name", "Staging"
            )
            assert result.exit_code == 0, result.output
            await registry.refresh()  # what the running gateway does every auth.cache-seconds
            return registry.snapshot.tenants.get("stage")
        finally:
            await registry.close()
            await backend.close()

    tenant = asyncio.run(scenario())
    assert tenant is not None and tenant.name == "Staging"


def test_memory_storage_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "memory.yaml"
    config.write_text("storage:\n  type: memory\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tenants", "create", "--tenant", "x", "-c", str(config)])
    assert result.exit_code == 1
    assert "memory" in result.stderr
