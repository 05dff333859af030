"""``gateway serve --workers N``: N forked processes serving one port with ``SO_REUSEPORT``.

Real processes over real sockets:

- Two workers both answer (which process holds each accepted connection is read from
  ``/proc`` with psutil), and uploads then downloads across them are byte-exact.
- SIGTERM to the parent stops every worker; the parent exits 0.
- A worker killed once it has run more than 5 s is replaced, and the gateway keeps serving.
- ``/metrics``, whichever worker answers, counts the requests of every worker, and of a worker
  that was killed and replaced: no total goes down. The folder of their values goes when the
  gateway stops; one left by a parent killed with SIGKILL goes at the next start.
- ``server.workers`` out of range or not a number is refused at start, naming the key.
- A port already taken (by a socket without ``SO_REUSEPORT``, or by another ``serve --workers
  N``, whose sockets have it) is refused: "cannot listen on".
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_process import GatewayProcess
from tests.support.ports import HOST, free_port

pytestmark = pytest.mark.slow

TENANT: Final = "t1"
WORKERS: Final = 2
CRASH_LOOP_SECONDS: Final = 5.0  # gateway/cli.py: a worker younger than this is not restarted
SOCKET_TIMEOUT: Final = 30.0
START_TIMEOUT: Final = 30.0


def _config(base: Path) -> dict[str, Any]:
    return {
        "storage.type": "local",
        "storage.local.base-path": str(base),
        "auth.enabled": False,
        "server.shutdown-timeout": 5,
        "tenants": {"enabled": True, "ids": [TENANT]},
    }


def _path(key: str) -> str:
    return f"/api/v1/{TENANT}/files/{key}"


def _exchange(
    port: int, method: str, path: str, body: bytes = b""
) -> tuple[int, bytes, socket.socket]:
    """One request on a new connection; return the status, the body, and the still-open
    socket (so the process that accepted it can be found)."""
    sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed before the headers: {data!r}"
            data += chunk
        raw_head, rest = data.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(min(1 << 20, length - len(rest)))
            assert chunk, "the connection closed before the end of the body"
            rest += chunk
        return int(status_line.split()[1]), rest, sock
    except BaseException:
        sock.close()
        raise


def _owner(workers: list[psutil.Process], sock: socket.socket) -> int | None:
    """Return the pid of the worker holding the server side of ``sock``."""
    client = sock.getsockname()
    for worker in workers:
        try:
            connections = worker.net_connections(kind="tcp4")
        except psutil.Error:
            continue
        if any(c.raddr and (c.raddr.ip, c.raddr.port) == client for c in connections):
            return int(worker.pid)
    return None


def _listening(worker: psutil.Process, port: int) -> bool:
    try:
        connections = worker.net_connections(kind="tcp4")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _workers(
    gateway: GatewayProcess, count: int = WORKERS, timeout: float = 20.0
) -> list[psutil.Process]:
    """Wait until the parent has ``count`` children, each listening on the port; return them."""
    assert gateway.process is not None and gateway.port is not None
    parent = psutil.Process(gateway.process.pid)
    deadline = time.monotonic() + timeout
    while True:
        children = [c for c in parent.children() if c.status() != psutil.STATUS_ZOMBIE]
        if len(children) == count and all(_listening(c, gateway.port) for c in children):
            return children
        assert time.monotonic() < deadline, (
            f"children {[c.pid for c in children]} not all listening:\n"
            + gateway.log_text()[-3000:]
        )
        time.sleep(0.05)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(_config(tmp_path / "data"), args=["--workers", str(WORKERS)]) as process:
        yield process


def _round_trips(port: int, workers: list[psutil.Process], count: int, seed: int) -> set[int]:
    """Upload then download ``count`` objects, one new connection per request; return the pids
    that answered."""
    rng = random.Random(seed)
    bodies = {f"ns/w/{seed}-{i}.bin": rng.randbytes(rng.randint(1, 300_000)) for i in range(count)}
    answered: list[int | None] = []
    for key, body in bodies.items():
        status, reply, sock = _exchange(port, "PUT", _path(key), body)
        with sock:
            assert status == 201, reply
            answered.append(_owner(workers, sock))
    for key, body in bodies.items():
        status, reply, sock = _exchange(port, "GET", _path(key))
        with sock:
            assert status == 200
            assert hashlib.sha256(reply).digest() == hashlib.sha256(body).digest(), key
            answered.append(_owner(workers, sock))
    assert None not in answered, "a connection was held by no worker"
    return {pid for pid in answered if pid is not None}


def test_two_workers_both_serve_byte_exact(gateway: GatewayProcess) -> None:
    assert gateway.process is not None and gateway.port is not None
    workers = _workers(gateway)
    pids = {w.pid for w in workers}
    assert len(pids) == WORKERS and gateway.process.pid not in pids
    answered = _round_trips(gateway.port, workers, 25, seed=1)
    assert answered == pids, f"answered by {answered}, workers {pids}"
    # The parent only holds the port (bound, not listening): it serves nothing.
    assert not _listening(psutil.Process(gateway.process.pid), gateway.port)


def test_sigterm_to_the_parent_stops_every_worker(gateway: GatewayProcess) -> None:
    assert gateway.process is not None and gateway.port is not None
    workers = _workers(gateway)
    status, _, sock = _exchange(gateway.port, "GET", "/health/ready")
    sock.close()
    assert status == 200
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(10) == 0, gateway.log_text()[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=5)
    elapsed = time.monotonic() - started
    assert alive == [], f"workers still running: {alive}"
    assert elapsed < 8, elapsed
    with pytest.raises(OSError):
        socket.create_connection((HOST, gateway.port), timeout=2).close()


def test_a_worker_killed_after_its_start_is_replaced(gateway: GatewayProcess) -> None:
    assert gateway.process is not None and gateway.port is not None
    ready = time.monotonic()  # the workers were forked before the gateway answered
    workers = _workers(gateway)
    # (psutil's create_time is not precise enough here: /proc/stat's boot time is whole
    # seconds.)
    time.sleep(max(0.0, ready + CRASH_LOOP_SECONDS + 0.5 - time.monotonic()))
    victim = workers[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    deadline = time.monotonic() + 20
    while True:
        replaced = _workers(gateway, timeout=20)
        if victim.pid not in {w.pid for w in replaced}:
            break
        assert time.monotonic() < deadline, gateway.log_text()[-3000:]
        time.sleep(0.05)
    pids = {w.pid for w in replaced}
    assert len(pids) == WORKERS and workers[1].pid in pids
    assert gateway.alive()
    log = gateway.log_text()
    assert f"(pid {victim.pid}) exited with status -{int(signal.SIGKILL)}" in log, log[-3000:]
    assert "died right after its start" not in log
    answered = _round_trips(gateway.port, replaced, 20, seed=2)
    assert answered <= pids and answered, answered
    assert gateway.stop() == 0


def _uploads_counted(body: bytes) -> float:
    """Given a /metrics answer, the count of uploads answered 201 in the tenant."""
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gateway_requests_total" and (
                labels["tenant"],
                labels["method"],
                labels["status"],
            ) == (TENANT, "PUT", "201"):
                return sample.value
    return 0.0


def _scrapes(port: int, workers: list[psutil.Process]) -> dict[int | None, list[float]]:
    """Scrape /metrics, one new connection each, until every worker has answered one;
    return what each worker's answers counted (``_uploads_counted``)."""
    seen: dict[int | None, list[float]] = {}
    for _ in range(200):
        status, body, sock = _exchange(port, "GET", "/metrics")
        with sock:
            assert status == 200
            seen.setdefault(_owner(workers, sock), []).append(_uploads_counted(body))
        if set(seen) == {w.pid for w in workers}:
            return seen
    raise AssertionError(f"not every worker answered a scrape: {sorted(seen, key=str)}")


def test_metrics_count_every_worker_and_no_total_goes_down(gateway: GatewayProcess) -> None:
    assert gateway.port is not None
    ready = time.monotonic()
    workers = _workers(gateway)
    answered: set[int | None] = set()
    uploads = 0
    while uploads < 20 or len(answered) < WORKERS:  # until both workers have taken some
        status, reply, sock = _exchange(gateway.port, "PUT", _path(f"m/{uploads}"), b"x")
        with sock:
            assert status == 201, reply
            answered.add(_owner(workers, sock))
        uploads += 1
        assert uploads < 500, answered
    seen = _scrapes(gateway.port, workers)
    assert {pid: set(counts) for pid, counts in seen.items()} == {w.pid: {uploads} for w in workers}
    # A worker killed (once past the crash-loop window) and replaced: its uploads still count.
    time.sleep(max(0.0, ready + CRASH_LOOP_SECONDS + 0.5 - time.monotonic()))
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(5)
    deadline = time.monotonic() + 20
    while True:
        replaced = _workers(gateway)
        if workers[0].pid not in {w.pid for w in replaced}:
            break
        assert time.monotonic() < deadline, gateway.log_text()[-3000:]
        time.sleep(0.05)
    status, reply, sock = _exchange(gateway.port, "PUT", _path("m/after"), b"x")
    sock.close()
    assert status == 201, reply
    seen = _scrapes(gateway.port, replaced)
    assert {pid: set(counts) for pid, counts in seen.items()} == {
        w.pid: {uploads + 1} for w in replaced
    }


def test_the_metrics_folder_goes_with_the_gateway_and_orphans_are_removed(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = temp / f"gateway-metrics-{gone.pid}-abc"  # a parent killed with SIGKILL left it
    orphan.mkdir()
    (orphan / "counter_1.db").write_bytes(b"x")
    alive = temp / f"gateway-metrics-{os.getpid()}-def"  # a running process's: kept
    alive.mkdir()
    settings = _config(tmp_path / "data")
    with GatewayProcess(
        settings, args=["--workers", str(WORKERS)], env={"TMPDIR": str(temp)}
    ) as gateway:
        assert gateway.process is not None
        _workers(gateway)
        assert not orphan.exists()
        assert alive.exists()
        mine = list(temp.glob(f"gateway-metrics-{gateway.process.pid}-*"))
        assert len(mine) == 1 and mine[0].is_dir()
        assert gateway.stop() == 0
    assert not mine[0].exists()
    assert alive.exists()


def _serve(
    tmp_path: Path, args: list[str], env: dict[str, str] | None = None, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``gateway serve`` to its end (it is expected to refuse to start)."""
    config = {
        "storage": {"type": "local", "local": {"base-path": str(tmp_path / "data")}},
        "auth": {"enabled": False},
        "server": {"host": HOST, "port": port if port is not None else free_port()},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), *args],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--workers", "0"], {}),
        (["--workers", "65"], {}),
        ([], {"GATEWAY_SERVER_WORKERS": "abc"}),
    ],
    ids=["flag-0", "flag-65", "env-abc"],
)
def test_a_bad_server_workers_is_refused(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    result = _serve(tmp_path, args, env)
    assert result.returncode != 0, result.stderr
    assert "server.workers" in result.stderr, result.stderr
    assert "serving on" not in result.stderr


def test_a_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # no SO_REUSEPORT
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(tmp_path, ["--workers", str(WORKERS)], port=port)
    assert result.returncode != 0, result.stderr
    assert f"cannot listen on {HOST}:{port}" in result.stderr, result.stderr
    assert "serving on" not in result.stderr


def test_a_port_another_gateway_with_workers_serves_is_refused(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    # Its sockets have SO_REUSEPORT, as this one's would: without the check, the second
    # gateway would join the port and take half of the connections to its own storage.
    assert gateway.port is not None
    _workers(gateway)
    result = _serve(tmp_path, ["--workers", str(WORKERS)], port=gateway.port)
    assert result.returncode != 0, result.stderr
    assert f"cannot listen on {HOST}:{gateway.port}" in result.stderr, result.stderr
    assert "serving on" not in result.stderr
    assert gateway.alive()
    status, _, sock = _exchange(gateway.port, "PUT", _path("still-mine"), b"x")
    sock.close()
    assert status == 201


def test_sigterm_while_workers_are_still_starting_stops_them_all(tmp_path: Path) -> None:
    # The signal lands while the parent is still forking: every worker, also those forked
    # after it, must stop, and the parent must not wait forever for them.
    config = {
        "storage": {"type": "local", "local": {"base-path": str(tmp_path / "data")}},
        "auth": {"enabled": False},
        "server": {"host": HOST, "port": free_port()},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "16"],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        parent = psutil.Process(process.pid)
        deadline = time.monotonic() + 20
        while not parent.children() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert parent.children(), "no worker was started"
        process.send_signal(signal.SIGTERM)
        seen = {child.pid for child in parent.children()}
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            left = [child.pid for child in parent.children()]
            raise AssertionError(
                f"the gateway did not stop; workers still running: {left}"
            ) from None
        assert process.returncode == 0, stderr[-2000:]
        assert not [pid for pid in seen if psutil.pid_exists(pid) and _alive(pid)]
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children():
                child.kill()
            process.kill()
            process.wait()


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
        zombie: str = psutil.STATUS_ZOMBIE
        return status != zombie
    except psutil.NoSuchProcess:
        return False
