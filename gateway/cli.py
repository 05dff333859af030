"""The ``gateway`` command: a thin click group over ``create_app``."""

from __future__ import annotations

import asyncio
import signal
import sys

import click
from aiohttp import web

from . import __version__
from .config import OPTIONS, ConfigError, env_name, load
from .state import IN_FLIGHT

# Seconds the handlers still running after the grace period get to react to cancellation.
CANCEL_GRACE = 2.0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works, a little slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(app: web.Application, host: str, port: int, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then let requests in flight finish for ``grace`` seconds.

    Not ``web.run_app``, nor ``runner.cleanup`` alone: both stop reading request bodies as
    soon as shutdown begins, so an upload in flight could never finish. Here the listener
    closes first, requests in flight get ``grace`` seconds, then ``runner.cleanup`` cancels
    what is left (an aborted upload stores nothing) and the backend is closed.
    """
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=CANCEL_GRACE, handle_signals=False
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            click.echo(f"serving on http://{_url_host(address[0])}:{address[1]}", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        click.echo(f"stopping: {app[IN_FLIGHT].count} request(s) in flight", err=True)
        for running in list(runner.sites):
            await running.stop()
        if not await app[IN_FLIGHT].wait_idle(grace):
            click.echo(f"stopping: aborting {app[IN_FLIGHT].count} request(s)", err=True)
    finally:
        await runner.cleanup()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gateway")
def main() -> None:
    """A tenant-isolating storage gateway (local disk or any S3-compatible store)."""


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML configuration file (a Kestra configuration file works as is).",
)
@click.option("--host", help="Address to listen on (server.host).")
@click.option("--port", type=int, help="Port to listen on (server.port).")
@click.option("--storage", "storage_type", help="Storage type: local, s3 or memory (storage.type).")
@click.option("--base-path", help="Directory of the local backend (storage.local.base-path).")
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    storage_type: str | None,
    base_path: str | None,
) -> None:
    """Serve the gateway until SIGTERM or Ctrl-C (in-flight requests finish or abort cleanly)."""
    from .app import create_app
    from .observability import configure_logging

    configure_logging()  # text lines, and the access log as JSON lines, on stderr
    try:
        config = load(
            config_path,
            overrides={
                "server.host": host,
                "server.port": port,
                "storage.type": storage_type,
                "storage.local.base-path": base_path,
            },
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _install_uvloop()
    app = create_app(config)
    storage = config["storage.type"]
    where = config["storage.local.base-path"] if storage == "local" else config["storage.s3.bucket"]
    tenancy = "enabled" if config["tenants.enabled"] else "disabled"
    click.echo(
        f"gateway {__version__}: storage {storage} ({where}), multi-tenancy {tenancy}", err=True
    )
    try:
        asyncio.run(
            _serve(
                app,
                config["server.host"],
                config["server.port"],
                config["server.shutdown-timeout"],
            )
        )
    except ValueError as exc:  # a backend refusing its configuration at start-up
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {config['server.host']}:{config['server.port']}: {exc.strerror}"
        ) from None


@main.command("config")
def show_config() -> None:
    """List every configuration key with its default and environment variable."""
    for key, option in OPTIONS.items():
        click.echo(f"{key:28} default {option.default!r:12} env {env_name(key)}\n    {option.help}")


from .admin_cli import register  # noqa: E402  (after main: the admin commands join it)

register(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
