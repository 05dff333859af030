"""The ``gateway`` command: a thin click group over ``create_app``."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
from aiohttp import web

from . import __version__
from .config import OPTIONS, ConfigError, env_name, load


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works, a little slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


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

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
        web.run_app(
            app,
            host=config["server.host"],
            port=config["server.port"],
            shutdown_timeout=config["server.shutdown-timeout"],
            access_log=None,
            print=lambda text: click.echo(text.strip(), err=True),
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
