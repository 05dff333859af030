"""Bodies the kernel moves: ``sendfile(2)`` for downloads, ``splice(2)`` for uploads.

Downloads. aiohttp's ``FileResponse`` relies on ``loop.sendfile``, which uvloop does not
implement (it falls back to reading chunks into Python). Here the same system call runs in
worker threads, one slice at a time, on *duplicates* of the socket and file descriptors: if
the connection is closed or the reader released meanwhile, the numbers cannot be reused for
another client or another file under a running call. The socket stays non-blocking: a slice
ends when the client's receive window is full, and the event loop waits for the socket to
become writable again (bounded by a timeout), so a slow client holds no thread.

Uploads. ``take_body`` takes the rest of a large request body away from aiohttp: what it has
buffered becomes the body's head, the transport stops reading, and the backend splices the
remaining ``Content-Length`` bytes from a duplicate of the socket into its file. aiohttp's
parser never sees those bytes, so the connection cannot carry another request: the response
says ``Connection: close`` (``after_taken_body``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from backends.base import SocketBody, close_when_idle

from .errors import BadRequest, RequestTimeout

SLICE: Final = 16 << 20
"""Bytes one worker-thread call may send at most before it hands back to the event loop."""
SPLICE_MIN: Final = 1 << 20
"""Bodies of fewer bytes go through aiohttp (and their connection stays open for more)."""
LINGER_SECONDS: Final = 10.0
"""After a failed upload whose body was taken, how long the rest of it is read and dropped
before the connection closes (as aiohttp does for the bodies it reads): closing a socket with
unread bytes sends a reset, which can destroy the error answer before the client reads it."""


@dataclass(slots=True)
class Taken:
    """A request body taken from aiohttp: its length, and whether it was all stored."""

    length: int
    body: SocketBody
    stored: bool = False


TAKEN: Final = web.RequestKey("gateway.body_taken", Taken)


def usable(request: web.Request) -> bool:
    """Say if the response to ``request`` may go out with ``sendfile``: a plain TCP socket."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return False  # TLS: the bytes must be encrypted in user space
    sock = transport.get_extra_info("socket")
    return sock is not None and hasattr(os, "sendfile")


class _Descriptors:
    """Duplicated socket and file descriptors, closed once no thread uses them."""

    def __init__(self, sock_fd: int, file_fd: int) -> None:
        self.out = os.dup(sock_fd)
        try:
            self.src = os.dup(file_fd)
        except BaseException:
            os.close(self.out)
            raise
        self._lock = threading.Lock()
        self._closed = False

    def send(self, offset: int, count: int) -> int:
        """Send up to ``count`` bytes from ``offset``; stop early when the socket is full."""
        sent = 0
        with self._lock:
            if self._closed:
                raise ValueError("send on closed descriptors")
            while sent < count:
                try:
                    n = os.sendfile(self.out, self.src, offset + sent, count - sent)
                except BlockingIOError:
                    break
                if n == 0:
                    raise OSError(errno.EIO, "the file is shorter than its size")
                sent += n
        return sent

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.out)
            os.close(self.src)

    async def close(self) -> None:
        # A slice may still run in its thread (the task was cancelled): it waits for it.
        await close_when_idle(self._lock, self._close_locked)


async def _ready(fd: int, timeout: float, *, write: bool) -> None:
    """Wait until ``fd`` is writable (``write``) or readable; raise ``TimeoutError``."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        remove(fd)


async def _flushed(transport: asyncio.Transport, timeout: float) -> None:
    """Wait until what aiohttp wrote (the status line and headers) has left the transport."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while transport.get_write_buffer_size():
        if transport.is_closing() or loop.time() > deadline:
            raise ConnectionResetError(errno.ECONNRESET, "the connection closed")
        await asyncio.sleep(0.001)


async def send_file(
    request: web.Request, file_fd: int, offset: int, count: int, timeout: float
) -> None:
    """Send ``count`` bytes of ``file_fd`` from ``offset`` on the connection of ``request``,
    after the response headers (already prepared). ``timeout``: seconds the client may read
    nothing before the send fails with ``ConnectionError``."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError(errno.ECONNRESET, "the connection closed")
    await _flushed(transport, timeout)
    if transport.is_closing() or request.transport is not transport:
        raise ConnectionResetError(errno.ECONNRESET, "the connection closed")
    sock = transport.get_extra_info("socket")
    fds = _Descriptors(sock.fileno(), file_fd)
    try:
        while count:
            want = min(count, SLICE)
            sent = await asyncio.to_thread(fds.send, offset, want)
            offset += sent
            count -= sent
            if sent < want:  # the client's window is full
                try:
                    await _ready(fds.out, timeout, write=True)
                except TimeoutError:
                    raise ConnectionError(
                        errno.ETIMEDOUT, f"the client read nothing for {timeout:g} s"
                    ) from None
    finally:
        await fds.close()


def take_body(request: web.Request, timeout: float) -> SocketBody | None:
    """Take the rest of the body of ``request`` from aiohttp, if it is worth it and safe.

    Worth it: a ``Content-Length`` of ``SPLICE_MIN`` bytes or more, not all received yet.
    Safe: a plain TCP connection whose body nobody has read. ``timeout``: seconds the client
    may send nothing before the upload fails with ``RequestTimeout`` (408).
    """
    length = request.content_length
    content = request.content
    if (
        length is None
        or length < SPLICE_MIN
        or "Transfer-Encoding" in request.headers
        or not usable(request)
        or content.is_eof()
        or content.exception() is not None
        or content.total_bytes >= length
    ):
        return None
    transport = request.transport
    assert transport is not None
    fd = os.dup(transport.get_extra_info("socket").fileno())
    # No await from here to pause_reading(): no read of the socket can slip in between.
    head = content.read_nowait(-1)  # what aiohttp buffered
    content.feed_eof()  # the body is over for aiohttp: no lingering read after the handler
    # Both calls above may resume the transport's reading; this stops it for good.
    transport.pause_reading()
    if transport.is_reading():  # pragma: no cover - a transport that ignores the pause
        raise RuntimeError("the transport kept reading after pause_reading()")

    async def wait_readable(sock: int) -> None:
        try:
            await _ready(sock, timeout, write=False)
        except TimeoutError:
            raise RequestTimeout(f"no body bytes for {timeout:g} s; nothing was stored") from None

    body = SocketBody(head=head, fd=fd, count=length - len(head), wait_readable=wait_readable)
    request[TAKEN] = Taken(length, body)
    return body


def body_ended_early() -> BadRequest:
    return BadRequest("the connection closed before the end of the body; nothing was stored")


async def after_taken_body(
    request: web.Request, response: web.StreamResponse
) -> web.StreamResponse:
    """Given a request and its answer: close a connection whose body was taken after its
    answer (it can carry no other request). If that body was not stored, send the answer
    first, then read and drop what the client still sends (for at most
    ``LINGER_SECONDS``) before the connection closes. (Called by the app's middleware.)"""
    taken = request.get(TAKEN)
    if taken is None:
        return response
    if not response.prepared:
        response.force_close()
    if taken.stored or response.prepared:
        return response
    await response.prepare(request)
    await response.write_eof()
    transport = request.transport
    if transport is None or transport.is_closing():
        return response
    fd = os.dup(transport.get_extra_info("socket").fileno())
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            left = taken.body.count - taken.body.received
            while left > 0:
                try:
                    data = os.read(fd, min(left, 1 << 18))
                except BlockingIOError:
                    await _ready(fd, LINGER_SECONDS, write=False)
                    continue
                if not data:
                    break
                left -= len(data)
    except (TimeoutError, OSError):
        pass
    finally:
        os.close(fd)
    return response
