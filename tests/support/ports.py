"""Free ports for test servers, and whose server answers on one.

``free_port()`` returns a port that was free a moment ago; another process (another xdist
worker starting its own server) may take it before the server under test binds it. Until the
server under test has exited on its failed ``bind``, a readiness probe on that port is answered
by the other one, and a test would then run against a stranger (seen in CI: a fresh gateway
answered 409 to its first user, who existed on another test's gateway). So a launcher counts
its server ready only once ``listens_alone`` says that every socket listening on the port is
its process's (or its workers').
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Iterator
from typing import Final

import psutil

HOST: Final = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 where a connection is refused for as long as the block runs: it
    is bound here and never listened on, so no other process can listen there meanwhile (a
    port merely probed free could be taken by another test's server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


def listeners(port: int) -> set[int | None]:
    """The processes with a TCP socket listening on ``port`` (``None``: one not visible)."""
    return {
        connection.pid
        for connection in psutil.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
        and connection.laddr
        and connection.laddr.port == port
    }


def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants (none if it is gone)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def listens_alone(port: int, pids: Iterable[int]) -> bool | None:
    """Whether only the processes ``pids`` listen on ``port``: True if they do (at least one
    socket, all theirs), False if another process listens there too (the port is taken: start
    over on another), None if nobody does yet."""
    found = listeners(port)
    if not found:
        return None
    return found <= set(pids)
