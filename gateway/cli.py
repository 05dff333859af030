"""The ``gateway`` command: a thin click group over ``create_app``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn

import click
from aiohttp import web

from . import __version__
from .config import OPTIONS, ConfigError, env_name, load
from .state import IN_FLIGHT

# Seconds the handlers still running after the grace period get to react to cancellation.
CANCEL_GRACE = 2.0
# Bytes of a request body aiohttp buffers per connection before it stops reading the socket
# (its default is 64 KiB): larger reads, fewer wake-ups of an upload's handler.
READ_BUFSIZE = 1 << 18
# A worker that dies within this many seconds of its start is not restarted (it would only
# die again: the port taken, the configuration refused); the gateway exits instead.
CRASH_LOOP_SECONDS = 5.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# Worker threads for file system calls. Python's default (cores + 4) caps the fsyncs in
# flight at six, and small uploads then queue for them; the disk batches many concurrent
# fsyncs into one journal commit.
THREADS = 64


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works, a little slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(
    app: web.Application, host: str, port: int, grace: float, *, reuse_port: bool = False
) -> None:
    """Serve until SIGTERM or SIGINT, then let requests in flight finish for ``grace`` seconds.

    Not ``web.run_app``, nor ``runner.cleanup`` alone: both stop reading request bodies as
    soon as shutdown begins, so an upload in flight could never finish. Here the listener
    closes first, requests in flight get ``grace`` seconds, then ``runner.cleanup`` cancels
    what is left (an aborted upload stores nothing) and the backend is closed.
    """
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="gateway-io")
    )
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=CANCEL_GRACE,
        handle_signals=False,
        read_bufsize=READ_BUFSIZE,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        _settle_heap()
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


# The young generation's collection threshold while serving (CPython's default: 700). Each
# request leaves a few hundred container objects; collecting every 700 allocations spent
# about 2% of a small upload's CPU walking them.
GC_THRESHOLD: Final = (20_000, 20, 20)


def _settle_heap() -> None:
    """Once started: move everything made so far (modules, the app, the registry snapshot)
    out of the collector's sight, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


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
@click.option("--workers", type=int, help="Processes serving the one port (server.workers).")
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    storage_type: str | None,
    base_path: str | None,
    workers: int | None,
) -> None:
    """Serve the gateway until SIGTERM or Ctrl-C (in-flight requests finish or abort cleanly)."""
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
                "server.workers": workers,
            },
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    storage = config["storage.type"]
    where = config["storage.local.base-path"] if storage == "local" else config["storage.s3.bucket"]
    tenancy = "enabled" if config["tenants.enabled"] else "disabled"
    count = config["server.workers"]
    click.echo(
        f"gateway {__version__}: storage {storage} ({where}), multi-tenancy {tenancy}"
        + (f", {count} workers" if count > 1 else ""),
        err=True,
    )
    if count == 1:
        _run(config, config["server.port"], reuse_port=False)
    else:
        sys.exit(_supervise(config, count))


def _run(config: Any, port: int, *, reuse_port: bool) -> None:
    """Serve in this process until SIGTERM or SIGINT."""
    from .app import create_app

    _install_uvloop()
    app = create_app(config)
    host = config["server.host"]
    try:
        asyncio.run(
            _serve(app, host, port, config["server.shutdown-timeout"], reuse_port=reuse_port)
        )
    except ValueError as exc:  # a backend refusing its configuration at start-up
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket to ``host:port``: it resolves port
    0 to one free port for every worker, and holds the port while workers restart.

    A given port is first bound without ``SO_REUSEPORT``, and let go: that fails with
    ``EADDRINUSE`` if any process holds the port, even another ``serve --workers N`` (whose
    sockets have ``SO_REUSEPORT`` too, and would otherwise let this one join them silently:
    the kernel would then split the connections between two gateways, each with its own
    configuration and storage)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port != 0:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
            probe.bind(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


METRICS_FOLDER: Final = "gateway-metrics-"  # + the parent's pid + "-" + a random part


def _remove_orphaned_metrics() -> None:
    """Remove the metrics folders of parents that are gone without removing theirs (killed
    with SIGKILL): ``$TMPDIR/gateway-metrics-<pid>-*`` whose pid runs no process."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if not name.startswith(METRICS_FOLDER):
                continue
            pid = name[len(METRICS_FOLDER) :].split("-", 1)[0]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except OSError:
                pass  # someone else's process: alive


def _supervise(config: Any, count: int) -> int:
    """Run ``count`` worker processes on one port; return the exit status.

    Each worker is a whole gateway (its own event loop, registry snapshot and temporary
    folder; replicas over one store are safe by design) listening with ``SO_REUSEPORT``, so
    the kernel spreads connections among them. SIGTERM or SIGINT is passed on to every
    worker, which stops as a single gateway does. A worker that dies is restarted, unless it
    died right after its start.
    """
    host = config["server.host"]
    try:
        reserved = _reserve_port(host, config["server.port"])
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{config['server.port']}: {exc.strerror}"
        ) from None
    port = reserved.getsockname()[1]
    # The workers' metric values, summed by whichever answers /metrics (observability).
    _remove_orphaned_metrics()
    metrics_folder = tempfile.mkdtemp(prefix=f"{METRICS_FOLDER}{os.getpid()}-")
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, start time)
    stopping = False
    status = 0

    def spawn(number: int) -> None:
        if stopping:
            return
        # SIGTERM/SIGINT wait while the new worker is forked and recorded: stop() then sees
        # it, and the worker never runs the parent's handler.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _worker(mask)
            children[pid] = (number, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _worker(mask: set[int | signal.Signals]) -> NoReturn:
        code = 1
        try:
            reserved.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            from .observability import share_metrics

            share_metrics(metrics_folder)
            _run(config, port, reuse_port=True)
            code = 0
        except click.ClickException as exc:
            exc.show()
        except BaseException:
            traceback.print_exc()
        finally:
            logging.shutdown()  # the access lines still buffered
            sys.stderr.flush()
            os._exit(code)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for number in range(count):
            spawn(number)
        while children:
            pid, wait_status = os.wait()
            if pid not in children:
                continue
            number, started = children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                # Signalled before it set up its own handlers, a worker ends by the signal.
                clean = code == 0 or -code in STOP_SIGNALS
                status = max(status, 0 if clean else 1)
                continue
            click.echo(f"worker {number} (pid {pid}) exited with status {code}", err=True)
            if time.monotonic() - started < CRASH_LOOP_SECONDS:
                click.echo("it died right after its start: stopping the gateway", err=True)
                status = 1
                stop(signal.SIGTERM, None)
            else:
                spawn(number)
    finally:
        reserved.close()
        shutil.rmtree(metrics_folder, ignore_errors=True)
    return status


@main.command("config")
def show_config() -> None:
    """List every configuration key with its default and environment variable."""
    for key, option in OPTIONS.items():
        click.echo(f"{key:28} default {option.default!r:12} env {env_name(key)}\n    {option.help}")


from .admin_cli import register  # noqa: E402  (after main: the admin commands join it)
from .lifecycle_cli import register as register_lifecycle  # noqa: E402

register(main)
register_lifecycle(main)

from .client.cli import files  # noqa: E402  (the client's commands: `gateway files ...`)

main.add_command(files)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
