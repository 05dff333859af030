"""Memory benchmark: does the gateway stream, or does it buffer whole objects?

Run from the project root::

    python -m bench.rss                          # 1 GiB, local backend, one run
    python -m bench.rss --size 256MiB --runs 3 --json out.json
    python -m bench.rss --size 4GiB              # needs ~4 GiB of free disk (checked first)
    make bench BENCH_ARGS="--size 256MiB"

What it does:

1. Starts the gateway as a subprocess (``sys.executable -m gateway serve``) on a free port of
   127.0.0.1, with the local backend in a new temporary directory (``--workdir`` chooses
   where; it is removed at the end) and tenants enabled with the single tenant ``acme``.
   Every ``GATEWAY_*`` variable of the calling environment is dropped first. The gateway's
   log goes to a file whose tail is printed if anything fails.
2. Waits for ``GET /health/ready`` to answer 200.
3. A background thread samples the RSS of the gateway process (plus its children, if any)
   and of this bench process every 20 ms (``--interval``).
4. Upload phase: ``PUT /api/v1/acme/files/bench/object-<run>.bin`` of ``--size`` bytes,
   generated on the fly as 1 MiB chunks (a fixed pseudo-random 1 MiB block with the chunk's
   number written into its first 8 bytes, so no two chunks are equal). The client never
   holds more than one chunk; the body goes with ``Content-Length`` (``--chunked``: with
   chunked transfer encoding instead). Expects 201 and the size in the answer.
5. Download phase: ``GET`` of the same key, read as a stream; the byte count and a SHA-256
   computed incrementally must equal those computed while uploading. The object is then
   deleted, so ``--runs N`` never needs more than one object's worth of disk.
6. Stops the gateway with SIGTERM and checks that it exits with status 0.

Reported for each phase: bytes, seconds, MB/s (10**6 bytes per second), the gateway's RSS
just before the phase (baseline) and its peak during the phase, and the same two numbers for
this bench process (the client, whose memory is not the gateway's). On Linux the gateway's
lifetime high-water mark (``VmHWM`` of ``/proc/<pid>/status``) is reported too: unlike the
20 ms samples it cannot miss a short spike.

Exit status: 0 if everything was verified and the gateway's peak RSS (the larger of the
sampled peak and VmHWM) stayed within ``--max-rss-mib`` (default 200); 1 if it did not;
2 if the benchmark itself failed (gateway did not start, wrong status, size or checksum
mismatch, gateway did not exit 0 on SIGTERM, not enough disk).

``--backend memory`` keeps objects in the gateway's memory: it is there to show the meter
works (its peak grows with ``--size``), not as something expected to pass the check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil

CHUNK: Final = 1 << 20
MIB: Final = 1 << 20
TENANT: Final = "acme"
ROOT: Final = Path(__file__).resolve().parent.parent
DISK_MARGIN: Final = 64 * MIB
"""Free space wanted beyond the object itself (the gateway's temporary file becomes the object)."""

_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Given ``1GiB``, ``256MiB``, ``500MB`` or ``1048576``, return a number of bytes."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB, 1048576)")
    number, prefix, binary = float(match[1]), match[2].upper(), bool(match[3])
    power = "KMGT".index(prefix) + 1 if prefix else 0
    size = int(number * (1024 if binary else 1000) ** power)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be above zero: {text!r}")
    return size


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


# -- RSS sampling ------------------------------------------------------------------------------


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def vm_hwm(pid: int) -> int | None:
    """Given a pid, return its lifetime peak RSS (Linux ``VmHWM``), or ``None`` elsewhere."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """Samples the gateway's RSS (with its children) and this process's RSS periodically."""

    CHILDREN_EVERY: Final = 0.5  # seconds between scans for new child processes

    def __init__(self, gateway_pid: int, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.gateway = psutil.Process(gateway_pid)
        self.client = psutil.Process()
        self.interval = interval
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._children: list[psutil.Process] = []
        self._children_at = 0.0
        self.samples = 0
        self.gateway_peak = 0
        self.client_peak = 0

    def _gateway_rss(self) -> int:
        now = time.monotonic()
        if now - self._children_at >= self.CHILDREN_EVERY:
            self._children_at = now
            with contextlib.suppress(psutil.Error):
                self._children = self.gateway.children(recursive=True)
        return _rss(self.gateway) + sum(_rss(child) for child in self._children)

    def sample(self) -> tuple[int, int]:
        """Take one sample now; return (gateway RSS, client RSS) in bytes."""
        gateway, client = self._gateway_rss(), _rss(self.client)
        with self._lock:
            self.samples += 1
            self.gateway_peak = max(self.gateway_peak, gateway)
            self.client_peak = max(self.client_peak, client)
        return gateway, client

    def start_phase(self) -> tuple[int, int]:
        """Reset the peaks to a fresh sample; return that sample (the phase's baseline)."""
        gateway, client = self._gateway_rss(), _rss(self.client)
        with self._lock:
            self.gateway_peak, self.client_peak, self.samples = gateway, client, 1
        return gateway, client

    def end_phase(self) -> tuple[int, int, int]:
        """Take a last sample; return (gateway peak, client peak, samples) since start_phase."""
        self.sample()
        with self._lock:
            return self.gateway_peak, self.client_peak, self.samples

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# -- the gateway subprocess --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchError(Exception):
    """The benchmark could not run or could not verify what it measured (exit status 2)."""


@dataclass
class Gateway:
    backend: str
    base_path: Path
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_SERVER_HOST="127.0.0.1",
            GATEWAY_SERVER_PORT=str(self.port),
            GATEWAY_STORAGE_TYPE=self.backend,
            GATEWAY_STORAGE_LOCAL_BASE_PATH=str(self.base_path),
            GATEWAY_TENANTS_ENABLED="true",
            GATEWAY_TENANTS_IDS=TENANT,
            GATEWAY_AUTH_ENABLED="false",
            PYTHONUNBUFFERED="1",
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the gateway exited with status {self.proc.returncode} before it was ready"
                )
            try:
                async with session.get(f"{self.url}/health/ready") as response:
                    if response.status == 200:
                        return
                    last = f"status {response.status}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
        raise BenchError(f"the gateway was not ready within {timeout:g} s ({last})")

    def stop(self, timeout: float) -> int:
        """Send SIGTERM, wait, return the exit status (kill and raise after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError(
                f"the gateway did not exit within {timeout:g} s of SIGTERM; killed"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the client --------------------------------------------------------------------------------


def chunks(size: int, seed: int = 0) -> Iterator[bytes]:
    """Yield ``size`` bytes as 1 MiB chunks: one random block, each stamped with its number."""
    block = bytearray(random.Random(seed).randbytes(CHUNK))
    for number, offset in enumerate(range(0, size, CHUNK)):
        struct.pack_into("<Q", block, 0, number)
        yield bytes(block[: min(CHUNK, size - offset)])


async def body(size: int, digest: Any, counter: list[int]) -> AsyncIterator[bytes]:
    """The upload body: ``chunks(size)``, hashed and counted as it is sent."""
    for chunk in chunks(size):
        digest.update(chunk)
        counter[0] += len(chunk)
        yield chunk


@dataclass
class Phase:
    run: int
    phase: str
    bytes: int
    seconds: float
    mb_per_s: float
    gateway_baseline_rss: int
    gateway_peak_rss: int
    client_baseline_rss: int
    client_peak_rss: int
    samples: int
    sha256: str


@dataclass
class Result:
    size: int
    backend: str
    runs: int
    chunked: bool
    interval_s: float
    max_rss_mib: float
    python: str = sys.version.split()[0]
    aiohttp: str = aiohttp.__version__
    phases: list[Phase] = field(default_factory=list)
    gateway_idle_rss: int = 0
    gateway_vm_hwm: int | None = None
    gateway_exit_status: int | None = None
    gateway_peak_rss: int = 0
    passed: bool = False
    error: str | None = None


async def measured(
    sampler: Sampler, run: int, name: str, work: Coroutine[Any, Any, tuple[int, str]]
) -> Phase:
    gc.collect()
    gateway_base, client_base = sampler.start_phase()
    started = time.perf_counter()
    nbytes, digest = await work
    seconds = time.perf_counter() - started
    gateway_peak, client_peak, samples = sampler.end_phase()
    phase = Phase(
        run=run,
        phase=name,
        bytes=nbytes,
        seconds=round(seconds, 3),
        mb_per_s=round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0,
        gateway_baseline_rss=gateway_base,
        gateway_peak_rss=gateway_peak,
        client_baseline_rss=client_base,
        client_peak_rss=client_peak,
        samples=samples,
        sha256=digest,
    )
    return phase


async def upload(
    session: aiohttp.ClientSession, url: str, size: int, chunked: bool
) -> tuple[int, str]:
    digest, counter = hashlib.sha256(), [0]
    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(size)
    async with session.put(
        url, data=body(size, digest, counter), headers=headers, chunked=chunked or None
    ) as response:
        text = await response.text()
        if response.status != 201:
            raise BenchError(f"upload answered {response.status}: {text[:300]}")
    answer = json.loads(text)
    if counter[0] != size or answer.get("size") != size:
        raise BenchError(
            f"upload sent {counter[0]} bytes, gateway stored {answer.get('size')}, expected {size}"
        )
    return size, digest.hexdigest()


async def download(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    digest, received = hashlib.sha256(), 0
    async with session.get(url) as response:
        if response.status != 200:
            text = await response.text()
            raise BenchError(f"download answered {response.status}: {text[:300]}")
        async for chunk in response.content.iter_chunked(CHUNK):
            digest.update(chunk)
            received += len(chunk)
    return received, digest.hexdigest()


async def bench(args: argparse.Namespace, gateway: Gateway, result: Result) -> None:
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await gateway.wait_ready(session, args.ready_timeout)
        assert gateway.proc is not None
        sampler = Sampler(gateway.proc.pid, args.interval)
        sampler.start()
        try:
            await asyncio.sleep(0.2)
            result.gateway_idle_rss = sampler.sample()[0]
            for run in range(1, args.runs + 1):
                url = f"{gateway.url}/api/v1/{TENANT}/files/bench/object-{run}.bin"
                up = await measured(
                    sampler, run, "upload", upload(session, url, args.size, args.chunked)
                )
                result.phases.append(up)
                down = await measured(sampler, run, "download", download(session, url))
                result.phases.append(down)
                if down.bytes != args.size:
                    raise BenchError(f"downloaded {down.bytes} bytes, expected {args.size}")
                if down.sha256 != up.sha256:
                    raise BenchError(
                        f"sha256 mismatch: uploaded {up.sha256}, downloaded {down.sha256}"
                    )
                async with session.delete(url) as response:
                    if response.status != 204:
                        raise BenchError(f"delete answered {response.status}")
        finally:
            sampler.stop()
            result.gateway_vm_hwm = vm_hwm(gateway.proc.pid)


# -- report ------------------------------------------------------------------------------------


def table(result: Result) -> str:
    head = (
        "run",
        "phase",
        "bytes",
        "seconds",
        "MB/s",
        "gw base MiB",
        "gw peak MiB",
        "client base MiB",
        "client peak MiB",
        "samples",
    )
    rows = [head]
    for p in result.phases:
        rows.append(
            (
                str(p.run),
                p.phase,
                str(p.bytes),
                f"{p.seconds:.2f}",
                f"{p.mb_per_s:.1f}",
                mib(p.gateway_baseline_rss),
                mib(p.gateway_peak_rss),
                mib(p.client_baseline_rss),
                mib(p.client_peak_rss),
                str(p.samples),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(result: Result) -> str:
    lines = [
        f"gateway RSS benchmark: {result.size} bytes ({result.size / MIB:.0f} MiB), "
        f"backend {result.backend}, {result.runs} run(s), "
        f"{'chunked' if result.chunked else 'Content-Length'} upload, "
        f"sampling every {result.interval_s * 1000:.0f} ms",
        "",
        table(result),
        "",
        f"gateway idle RSS after start: {mib(result.gateway_idle_rss)} MiB; "
        f"lifetime peak (VmHWM): {mib(result.gateway_vm_hwm)} MiB; "
        f"exit status on SIGTERM: {result.gateway_exit_status}",
    ]
    if result.error:
        lines.append(f"FAILED: {result.error}")
    else:
        verdict = "PASS" if result.passed else "FAIL"
        lines.append(
            f"{verdict}: gateway peak RSS {mib(result.gateway_peak_rss)} MiB "
            f"(limit {result.max_rss_mib:g} MiB); sizes and sha256 verified"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rss",
        description="Measure the gateway's RSS while streaming one large object up and down.",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1GiB"),
        help="object size, e.g. 256MiB, 1GiB, 4GiB (default 1GiB); the local "
        "backend needs that much free disk (4GiB: ~4 GiB free)",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "memory"],
        default="local",
        help="gateway storage backend (default local; memory holds objects in "
        "RAM and is only a check of the meter)",
    )
    parser.add_argument("--runs", type=int, default=1, help="upload/download rounds (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--max-rss-mib",
        type=float,
        default=200.0,
        help="exit 1 if the gateway's peak RSS is above this (default 200)",
    )
    parser.add_argument(
        "--chunked",
        action="store_true",
        help="upload with chunked transfer encoding instead of Content-Length",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.02,
        help="RSS sampling interval in seconds (default 0.02)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary storage directory goes (default: system temp)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for /health/ready (default 30)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.interval <= 0:
        parser.error("--interval must be above zero")
    return args


def check_disk(path: Path, size: int) -> None:
    free = shutil.disk_usage(path).free
    needed = size + DISK_MARGIN
    if free < needed:
        raise BenchError(
            f"not enough free disk in {path}: {free / MIB:.0f} MiB free, "
            f"{needed / MIB:.0f} MiB needed for a {size / MIB:.0f} MiB object "
            f"(choose another place with --workdir or a smaller --size)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = Result(
        size=args.size,
        backend=args.backend,
        runs=args.runs,
        chunked=args.chunked,
        interval_s=args.interval,
        max_rss_mib=args.max_rss_mib,
    )
    if args.backend == "local":
        try:
            check_disk(args.workdir or Path(tempfile.gettempdir()), args.size)
        except (BenchError, OSError) as exc:
            print(f"python -m bench.rss: refusing to run: {exc}", file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix="gateway-bench-", dir=args.workdir)
    gateway = Gateway(args.backend, Path(workdir) / "data", Path(workdir) / "gateway.log")
    log_tail = None
    try:
        gateway.base_path.mkdir()
        gateway.start()
        try:
            asyncio.run(bench(args, gateway, result))
        finally:
            result.gateway_exit_status = gateway.stop(timeout=60)
        if result.gateway_exit_status != 0:
            raise BenchError(
                f"the gateway exited with status {result.gateway_exit_status} "
                f"on SIGTERM, expected 0"
            )
        sampled = max((p.gateway_peak_rss for p in result.phases), default=0)
        result.gateway_peak_rss = max(sampled, result.gateway_vm_hwm or 0)
        result.passed = result.gateway_peak_rss <= args.max_rss_mib * MIB
    except (BenchError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        result.error = str(exc) or repr(exc)
        log_tail = gateway.log_tail()
    except KeyboardInterrupt:
        result.error = "interrupted"
    finally:
        gateway.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(result))
    if log_tail is not None:
        print(f"gateway log, last lines:\n{log_tail}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    if result.error:
        return 2
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
