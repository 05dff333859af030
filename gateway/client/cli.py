"""``gateway files``: the object API from the shell, against a running gateway.

Every command takes the gateway's URL, tenant and credentials as options or from
``GATEWAY_URL``, ``GATEWAY_TENANT``, ``GATEWAY_TOKEN`` (or ``GATEWAY_USERNAME`` /
``GATEWAY_PASSWORD``). Transfers of ``PROGRESS_MIN`` bytes or more show a progress bar (tqdm)
when stderr is a terminal, never otherwise. ``--json`` prints the answer as JSON on stdout.

Exit codes (``EXIT_CODES``), for scripts: 0 done; 1 any other error; 2 usage; 3 not found;
4 unauthorized or forbidden; 5 exists or conflict (create-only upload, move onto something);
6 refused key or bad request; 7 the gateway is unreachable or its storage unavailable.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import click

from ._async import AsyncClient, FileInfo, Progress
from .errors import (
    APIError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    TransportError,
    Unauthorized,
    Unavailable,
)

F = TypeVar("F", bound=Callable[..., Any])

PROGRESS_MIN: Final = 4 * 1024 * 1024
"""Transfers at least this large show a progress bar (on a terminal)."""
STDIO_CHUNK: Final = 1 << 20
# Most specific first: the first class an error is an instance of gives its exit code.
EXIT_CODES: Final[tuple[tuple[type[ClientError], int], ...]] = (
    (NotFound, 3),
    (Unauthorized, 4),
    (Forbidden, 4),
    (Conflict, 5),
    (PreconditionFailed, 5),
    (BadRequest, 6),
    (RangeNotSatisfiable, 6),
    (Unavailable, 7),
    (TransportError, 7),
)


class FilesError(click.ClickException):
    """A client error, shown on stderr, with the exit code of its kind."""

    def __init__(self, error: ClientError) -> None:
        message = error.message if isinstance(error, APIError) else str(error)
        if isinstance(error, APIError):
            detail = error.code + (f", rule {error.rule}" if error.rule else "")
            message = f"{message} ({error.http_status} {detail})"
        super().__init__(message)
        # click reads the code from the instance; here it depends on the error, not the class.
        code = next((code for cls, code in EXIT_CODES if isinstance(error, cls)), 1)
        self.exit_code = code  # type: ignore[misc]


def _client(ctx: click.Context) -> AsyncClient:
    options: dict[str, Any] = ctx.obj
    try:
        return AsyncClient(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    try:
        return asyncio.run(coroutine)
    except ClientError as exc:
        raise FilesError(exc) from None
    except OSError as exc:  # a local file: unreadable source, target in no directory
        raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}") from None


def _command(function: F) -> F:
    """Run the decorated coroutine function with an ``AsyncClient`` made from the group's
    options; errors become exit codes."""

    @functools.wraps(function)
    @click.pass_context
    def wrapper(ctx: click.Context, /, **kwargs: Any) -> Any:
        async def run() -> Any:
            async with _client(ctx) as client:
                return await function(client, **kwargs)

        return _run(run())

    return wrapper  # type: ignore[return-value]


@contextmanager
def _progress(total: int | None, label: str, enabled: bool | None) -> Iterator[Progress | None]:
    """Yield a progress callback drawing a bar on stderr, or ``None`` where none belongs:
    not a terminal (unless forced), or under ``PROGRESS_MIN`` bytes."""
    if enabled is None:
        enabled = sys.stderr.isatty() and (total is None or total >= PROGRESS_MIN)
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        **_screen(),
    ) as bar:
        yield bar.update


def _screen() -> dict[str, int]:
    """Return tqdm's ``ncols``/``nrows`` for stderr's terminal, 80x24 where it reports 0x0 (a
    new pseudo-terminal): tqdm would draw nothing at all in a zero-sized one."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=True))


def _line(info: FileInfo) -> str:
    kind = "d" if info.is_dir else "-"
    return f"{kind} {info.size:>14} {info.key}" + ("/" if info.is_dir else "")


_URL = click.option("--url", envvar="GATEWAY_URL", help="Gateway base URL [GATEWAY_URL].")
_PROGRESS = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (default: on a terminal, for transfers of 4 MiB or more).",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_URL
@click.option("--tenant", envvar="GATEWAY_TENANT", help="Tenant id; none: the default tenant.")
@click.option("--token", envvar="GATEWAY_TOKEN", help="Service-account token [GATEWAY_TOKEN].")
@click.option("--username", envvar="GATEWAY_USERNAME", help="Basic auth user [GATEWAY_USERNAME].")
@click.option(
    "--password", envvar="GATEWAY_PASSWORD", help="Basic auth password [GATEWAY_PASSWORD]."
)
@click.option("--retries", type=click.IntRange(0, 10), default=3, show_default=True)
@click.pass_context
def files(ctx: click.Context, /, **options: Any) -> None:
    """Files on a running gateway: put, get, ls, stat, rm, mv (keys or kestra:// URIs).

    Exit codes: 0 done, 1 other error, 2 usage, 3 not found, 4 unauthorized or forbidden,
    5 exists or conflict, 6 refused key or bad request, 7 gateway or storage unavailable.
    """
    ctx.obj = options


@files.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.argument("key")
@click.option("--content-type", help="Media type stored with the object.")
@click.option("--meta", multiple=True, metavar="NAME=VALUE", help="Metadata (repeatable).")
@click.option("--checksum", is_flag=True, help="Send the SHA-256 for the gateway to verify.")
@click.option("--create-only", is_flag=True, help="Fail (exit 5) if the key exists.")
@_PROGRESS
@_JSON
@_command
async def put(
    client: AsyncClient,
    source: str,
    key: str,
    content_type: str | None,
    meta: tuple[str, ...],
    checksum: bool,
    create_only: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Upload SOURCE (a file, or - for stdin) to KEY, streamed in constant memory."""
    metadata = {}
    for item in meta:
        name, equals, value = item.partition("=")
        if not equals:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--meta")
        metadata[name] = value
    body: Any = _stdin_chunks() if source == "-" else source
    size = None if source == "-" else os.stat(source).st_size
    with _progress(size, "put", progress) as bar:
        answer = await client.upload(
            key,
            body,
            content_type=content_type,
            metadata=metadata,
            checksum=checksum or None,
            create_only=create_only,
            progress=bar,
        )
    if as_json:
        _echo_json({"key": answer.key, "uri": answer.uri, "size": answer.size, "etag": answer.etag})
    else:
        click.echo(f"{answer.uri} {answer.size} bytes")


async def _stdin_chunks() -> AsyncIterator[bytes]:
    stream = sys.stdin.buffer
    while chunk := await asyncio.to_thread(stream.read, STDIO_CHUNK):
        yield chunk


@files.command()
@click.argument("key")
@click.argument("target", required=False, type=click.Path(dir_okay=True, allow_dash=True))
@_PROGRESS
@_JSON
@_command
async def get(
    client: AsyncClient, key: str, target: str | None, progress: bool | None, as_json: bool
) -> None:
    """Download KEY to TARGET (default: its file name here; a directory: into it; - stdout)."""
    if target == "-":
        async with await client.open(key) as download:
            out: IO[bytes] = sys.stdout.buffer
            with _progress(download.headers.length, "get", progress) as bar:
                async for chunk in download.chunks():
                    await asyncio.to_thread(out.write, chunk)
                    if bar is not None:
                        bar(len(chunk))
            out.flush()
        return
    info = await client.stat(key)
    path = Path(target or info.key.rsplit("/", 1)[-1])
    if path.is_dir():
        path = path / info.key.rsplit("/", 1)[-1]
    with _progress(info.size, "get", progress) as bar:
        headers = await client.download(key, path, progress=bar)
    if as_json:
        _echo_json({"key": info.key, "path": str(path), "size": headers.length})
    else:
        click.echo(f"{path} {headers.length} bytes")


@files.command("ls")
@click.argument("key", default="")
@click.option("-r", "--recursive", is_flag=True, help="Every file below, not one level.")
@_JSON
@_command
async def ls(client: AsyncClient, key: str, recursive: bool, as_json: bool) -> None:
    """List the directory KEY (default: the root), page after page.

    Lines: d or -, size, key. --json: one JSON object per line (a listing may be long).
    """
    async for info in client.list(key, recursive=recursive):
        click.echo(json.dumps(info.to_json(), sort_keys=True) if as_json else _line(info))


@files.command()
@click.argument("key", default="")
@_JSON
@_command
async def stat(client: AsyncClient, key: str, as_json: bool) -> None:
    """Show the attributes of KEY."""
    info = await client.stat(key)
    if as_json:
        _echo_json(info.to_json())
        return
    for name, value in info.to_json().items():
        click.echo(f"{name}: {value}")


@files.command()
@click.argument("key")
@click.option("-r", "--recursive", is_flag=True, help="Delete a directory and all it holds.")
@_JSON
@_command
async def rm(client: AsyncClient, key: str, recursive: bool, as_json: bool) -> None:
    """Delete KEY (a directory only with -r)."""
    count = await client.delete(key, recursive=recursive)
    if as_json:
        _echo_json({"deleted": count})
    else:
        click.echo(f"deleted {count}")


@files.command()
@click.argument("source")
@click.argument("destination")
@_JSON
@_command
async def mv(client: AsyncClient, source: str, destination: str, as_json: bool) -> None:
    """Move SOURCE to DESTINATION (a file or a directory; exit 5 if it exists)."""
    key = await client.move(source, destination)
    if as_json:
        _echo_json({"key": key})
    else:
        click.echo(key)
