"""Side-by-side benchmark: the gateway against the raw disk and other servers, on one machine.

Run from the project root::

    python -m bench.compare                                 # everything, 3 runs (~8 min)
    python -m bench.compare --runs 1 --size 256MiB --s3-size 64MiB --small-duration 3
    python -m bench.compare --only large,small --json bench/results/compare.json
    make bench BENCH_ARGS="--runs 5"

Every server listens on 127.0.0.1 and every client runs on this machine too. The gateway is
``python -m gateway serve`` in a subprocess, with every ``GATEWAY_*`` variable of the calling
environment dropped, tenants enabled and auth on (the default): before it starts, the admin CLI
(``gateway tenants create``, ``service-accounts create``/``grant`` EDITOR, ``tokens create``)
sets up the tenant ``acme`` and a service account whose token goes as ``Authorization: Bearer``
on every request to ``/api/v1/acme/files/<key>``. It gets ``--workers W`` (``--workers``,
default the CPU count) if ``gateway serve --help`` lists that flag; if not, it runs as one
process and the report says so. All files live in one work directory (``--workdir``, default a
new directory under /work or the system temp directory, whichever has the free space; checked
before anything starts, removed at the end).

Sections (``--only``; all by default), in this order:

1. ``large``: a ``--size`` (1 GiB) source file of random bytes is written once, so it is in the
   page cache for every peer alike (nothing drops caches). Uploads and downloads go through
   ``curl`` (C, not the bottleneck; ``Expect:`` off, status codes checked, the downloaded byte
   count checked against the size). Peers, in this order within each run: the gateway (local
   backend) ``PUT`` (201: fsynced, durable; the size in its answer checked), ``dd
   conv=fdatasync bs=1M`` of the source into the same directory (dd's own time), ``rclone
   serve webdav`` ``PUT`` (it does not fsync), then ``GET`` of the gateway's object through
   the gateway, a bare aiohttp server (``web.run_app``, default asyncio loop, one route
   returning ``web.FileResponse``), ``rclone serve http`` and ``rclone serve webdav``, all
   over the same directory and the same file; each peer's download is made ``GET_ROUNDS``
   (3) times, interleaved with the others', and the run counts their median. The rclone
   servers start anew each run (their directory cache never shows a file of an earlier run);
   every object is deleted at the end of its run. Reported in MB/s (10**6 bytes per second).
2. ``small``: 4 KiB objects, ``wrk -t2 -c32 -d<--small-duration>s --latency --timeout 10s``
   with ``bench/lua/small.lua`` (PUT: each thread over its own 1,000 keys; GET: random GETs
   of 1,000 objects uploaded beforehand through each peer's own HTTP API, 32 at a time),
   against the gateway and ``rclone serve webdav`` (Basic auth), the peers in turn (which goes
   first swaps from run to run), a ``sync`` before each PUT run. The script prints one JSON
   line (requests, duration, socket errors, statuses, p50/p99); a run with more than 0.1 % of
   non-2xx answers or socket errors fails the benchmark.
   Reported: requests/s, p50 and p99 latency in microseconds.
3. ``s3``: moto's S3 server (``tests.support.moto``) on a free port with one bucket, and a
   second gateway with ``storage.type s3`` on it (same CLI set-up). ``--s3-size`` (256 MiB)
   PUT and GET through that gateway with curl, against s3fs straight to the same server:
   ``put_file`` then ``get_file``, each timed inside a fresh Python subprocess per run, after
   a first request that opens its connection. (``get_file`` writes its parts concurrently
   into a file, which cannot be ``/dev/null``: it goes to the work directory's page cache,
   a small cost that curl's download to ``/dev/null`` does not pay.)
4. ``memory``: a thread samples the RSS of each gateway and all its children (workers) every
   20 ms (``bench.rss.Sampler``); each run of every section above reports the gateway's peak
   during it. Then dedicated round trips through the local gateway (``--memory-sizes``, 1 GiB
   and 4 GiB): an upload streamed from generated data and a streamed download, sizes and
   SHA-256 verified end to end (``bench.rss.upload``/``download``), free disk checked first,
   with the peak RSS over each round trip.
5. ``growth``: (a) 1k, 10k and 100k (``--growth-counts``) small files written straight into
   the local backend's directory (``tenants/acme/<prefix>/``, one directory each), then listed
   through ``GET /api/v1/acme/list/<prefix>?limit=1000``, following ``cursor`` until null (the
   entry count checked; a directory smaller than 20,000 entries listed as many times as it
   takes to list 20,000); reported as milliseconds per 1,000 entries. (b) ``python -m
   bench.access --iterations 50000 --requests 1000 --json FILE`` in a subprocess: the cost of
   the access check with 10 and with 10,000 tenants, and its ratios.

Runs are interleaved: run 1 of every peer of a section, then run 2 of every peer, and so on,
so that noise from elsewhere on the machine weighs on every peer alike. Each table shows, for
each peer, the median over the runs and every run's value. A ratio is median(gateway) /
median(peer) of the same measure; next to it, the same ratio within each run (gateway run i
/ peer run i), which shows how steady it is. The growth ratios are median(largest count) /
median(smallest count) of a time per item (flat: 1; lower is better); the access ones are
bench.access's own (one run of its, which alternates the counts itself). Targets, checked on
the ratio of the medians:

- large: gateway GET / FileResponse GET >= 0.8; gateway GET / rclone http GET >= 2.0;
  gateway PUT / dd fdatasync >= 0.8; gateway PUT / rclone webdav PUT >= 1.0
- small: gateway / rclone webdav requests/s, GET >= 1.5, PUT >= 1.0
- s3: gateway / s3fs, PUT and GET >= 0.85
- memory: peak RSS of the largest round trip < 200 MiB, and largest / smallest <= 1.2 (flat)
- growth: listing time per 1,000 entries, 100k / 1k <= 1.2; the in-process access checks
  (Bearer, Basic), 10,000 / 10 tenants <= bench.access's ``--max-ratio`` (1.5)

Exit status: 0 if every target passed; 1 if some target failed; 2 if the benchmark itself
failed (a tool missing, a server that did not start, a wrong status, size or checksum, too
many errors under wrk, not enough disk): the message says what.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp
import psutil

from bench.rss import MIB, Sampler, download, free_port, parse_size, upload

ROOT: Final = Path(__file__).resolve().parent.parent
LUA: Final = ROOT / "bench" / "lua"
TENANT: Final = "acme"
ACCOUNT: Final = "bench"
SECTIONS: Final = ("large", "small", "s3", "memory", "growth")
DURABLE: Final = "durable 4 KiB writes, 32 threads (disk limit)"
GIB: Final = 1 << 30
SMALL_SIZE: Final = 4096
# Downloads of the large object per peer and run, interleaved; the run's figure is their
# median. One transfer of a GiB from the page cache moved by up to 1.8x between minutes here.
GET_ROUNDS: Final = 3
SMALL_KEYS: Final = 1000
MAX_ERROR_RATE: Final = 0.001
DISK_MARGIN: Final = 512 * MIB
MAX_RSS_MIB: Final = 200.0
FLAT: Final = 1.2
LIST_SAMPLE: Final = 20_000  # entries listed at least, per directory and run (growth)
SAMPLE_INTERVAL: Final = 0.02
READY_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
ACCESS_FLAGS: Final = ("--iterations", "50000", "--requests", "1000")
ACCESS_TIMEOUT: Final = 300.0
NO_PROXY: Final = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
CURL_FORMAT: Final = "%{http_code} %{time_total} %{size_download} %{size_upload}"
# urllib honours HTTP(S)_PROXY; the local servers must be reached directly.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))

GATEWAY_SERVE: Final = (sys.executable, "-m", "gateway", "serve")

# The durable limit of the "small" section: what 32 threads get from this disk when each
# 4 KiB object is made durable (temporary file, write, fsync, rename, fsync of the directory),
# in plain Python with no HTTP at all: bench.fs_writes's "plain" writer, in its own process.
DURABLE_WRITER: Final = (
    "import sys; from pathlib import Path; from bench.fs_writes import Writers, rate; "
    "print(rate(Writers(Path(sys.argv[1])).plain, int(sys.argv[3]), float(sys.argv[2])))"
)

# The bare aiohttp server of the "large" section: plain web.run_app, default asyncio loop.
FILE_SERVER: Final = """
import sys
from aiohttp import web

path, port = sys.argv[1], int(sys.argv[2])


async def serve(request):
    return web.FileResponse(path)


app = web.Application()
app.router.add_get("/file", serve)
web.run_app(app, host="127.0.0.1", port=port)
"""

# s3fs straight to the S3 server: argv endpoint bucket key source destination; one JSON line.
S3FS_CLIENT: Final = """
import json, os, sys, time
import s3fs

endpoint, bucket, key, source, destination = sys.argv[1:6]
fs = s3fs.S3FileSystem(
    key=os.environ["AWS_ACCESS_KEY_ID"],
    secret=os.environ["AWS_SECRET_ACCESS_KEY"],
    endpoint_url=endpoint,
    client_kwargs={"region_name": os.environ["AWS_REGION"]},
    config_kwargs={"s3": {"addressing_style": "path"}},
)
fs.ls(bucket)  # opens the session and its connection before anything is timed
path = f"{bucket}/{key}"
started = time.perf_counter()
fs.put_file(source, path)
put_s = time.perf_counter() - started
stored = fs.info(path)["size"]
started = time.perf_counter()
fs.get_file(path, destination)
get_s = time.perf_counter() - started
fs.rm_file(path)
received = os.path.getsize(destination)
os.unlink(destination)
print(json.dumps({"put_s": put_s, "get_s": get_s, "stored": stored, "received": received}))
"""


class BenchError(Exception):
    """The benchmark could not run or could not verify what it measured (exit status 2)."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def human(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def count_label(count: int) -> str:
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else str(count)


# -- results -----------------------------------------------------------------------------------


@dataclass
class Measure:
    """One peer's measure in a section: a value per run."""

    section: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


@dataclass
class Ratio:
    """median(numerator) / median(denominator), and the same ratio within each run."""

    section: str
    name: str
    value: float
    per_run: list[float]
    target: float | None = None
    at_least: bool = True  # the target is a floor (True) or a ceiling (False)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target


@dataclass
class Target:
    section: str
    name: str
    value: float
    comparison: str
    limit: float
    passed: bool


@dataclass
class Result:
    command: str
    date: str
    runs: int
    sections: list[str]
    options: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    measures: list[Measure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    access: dict[str, Any] | None = None
    wall_s: float = 0.0
    error: str | None = None

    def measure(self, section: str, name: str, unit: str) -> Measure:
        for measure in self.measures:
            if measure.section == section and measure.name == name:
                return measure
        measure = Measure(section, name, unit)
        self.measures.append(measure)
        return measure

    def record(self, section: str, name: str, unit: str, value: float) -> None:
        self.measure(section, name, unit).values.append(value)

    def find(self, section: str, name: str) -> Measure | None:
        for measure in self.measures:
            if measure.section == section and measure.name == name:
                return measure
        return None

    def ratio(
        self,
        section: str,
        numerator: str,
        denominator: str,
        target: float | None = None,
        at_least: bool = True,
        name: str | None = None,
    ) -> None:
        """Add median(numerator) / median(denominator) if both were measured."""
        top, bottom = self.find(section, numerator), self.find(section, denominator)
        if top is None or bottom is None or not top.values or not bottom.values:
            return
        per_run = [
            t / b if b else float("inf") for t, b in zip(top.values, bottom.values, strict=True)
        ]
        value = top.median / bottom.median if bottom.median else float("inf")
        label = name or f"{numerator} / {denominator}"
        self.ratios.append(Ratio(section, label, value, per_run, target, at_least))


# -- processes ---------------------------------------------------------------------------------


def run_tool(
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise ``BenchError`` with its stderr unless it exits 0."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what or argv[0]} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        raise BenchError(f"{what or shlex.join(argv)} exited with {done.returncode}: {tail}")
    return done


@dataclass
class Server:
    """A server subprocess in its own process group, its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Servers:
    """Every server this benchmark started; ``stop_all`` ends them (also on errors, Ctrl-C)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[Server] = []

    def start(
        self, name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> Server:
        log = self.logs / f"{name}-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: workers are stopped with it
            )
        server = Server(name, proc, log, port)
        self.running.append(server)
        return server

    def stop(self, server: Server, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout``; return the status."""
        if server in self.running:
            self.running.remove(server)
        proc = server.proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            status: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        if status is None:
            proc.wait()
        return status

    def dead(self) -> list[str]:
        """Describe every server that exited while it should have been running."""
        return [
            f"{server.name} (pid {server.proc.pid}) had exited with status {server.proc.returncode}"
            for server in self.running
            if server.proc.poll() is not None
        ]

    def stop_all(self) -> None:
        for server in list(reversed(self.running)):
            self.stop(server, timeout=5.0)


def wait_http(server: Server, path: str, timeout: float = READY_TIMEOUT, ok: int = 0) -> None:
    """Wait until the server answers ``path`` (any status, or ``ok`` when given)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.proc.returncode} before it was "
                f"ready; its log:\n{server.log_tail()}"
            )
        try:
            with _OPENER.open(server.url + path, timeout=2) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
            time.sleep(0.05)
            continue
        if not ok or status == ok:
            return
        last = f"status {status}"
        time.sleep(0.05)
    raise BenchError(f"{server.name} was not ready within {timeout:g} s ({last})")


# -- tools and machine -------------------------------------------------------------------------


def find_tools() -> dict[str, str]:
    """Return the paths of rclone, wrk, curl and dd; install the first three if root."""
    wanted = ("rclone", "wrk", "curl")
    missing = [tool for tool in wanted if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        progress(f"installing {', '.join(missing)} with apt-get ...")
        install = ["apt-get", "install", "-y", *missing]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        missing = [tool for tool in wanted if shutil.which(tool) is None]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)}; install them (Debian/Ubuntu: "
            f"apt-get install {' '.join(missing)}) and run again"
        )
    tools = {tool: str(shutil.which(tool)) for tool in (*wanted, "dd")}
    if tools["dd"] == "None":
        raise BenchError("dd (coreutils) is missing")
    return tools


def first_line(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "?"
    return "?"


def machine(workdir: Path, tools: Mapping[str, str]) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "disk_free_gib": round(shutil.disk_usage(workdir).free / GIB, 1),
        "workdir": str(workdir),
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "rclone": first_line([tools["rclone"], "version"]),
        "wrk": first_line([tools["wrk"], "-v"]),
        "curl": " ".join(first_line([tools["curl"], "--version"]).split()[:2]),
    }


def disk_needed(args: argparse.Namespace) -> int:
    """Free disk the selected sections need at their peak (the sections run one at a time)."""
    needs = [0]
    if "large" in args.only:  # the source, the gateway's object, then dd's or webdav's copy
        needs.append(3 * args.size)
    if "s3" in args.only:  # the source (moto holds the objects in memory)
        needs.append(args.s3_size)
    if "memory" in args.only:  # one object at a time (its upload is generated, not a file)
        needs.append(max(args.memory_sizes) + ("large" in args.only) * args.size)
    if "growth" in args.only:  # a 4 KiB block per file, twice for the directory entries
        needs.append(sum(args.growth_counts) * 8192)
    return max(needs) + DISK_MARGIN


def check_disk(path: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise BenchError(
            f"not enough free disk in {path} for {what}: {free / GIB:.1f} GiB free, "
            f"{needed / GIB:.1f} GiB needed (choose --workdir or smaller sizes)"
        )


def make_workdir(args: argparse.Namespace) -> Path:
    needed = disk_needed(args)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        check_disk(args.workdir, needed, "the benchmark")
        return Path(tempfile.mkdtemp(prefix="gateway-compare-", dir=args.workdir))
    candidates = [Path("/work"), Path(tempfile.gettempdir())]
    for place in candidates:
        usable = place.is_dir() and os.access(place, os.W_OK)
        if usable and shutil.disk_usage(place).free >= needed:
            return Path(tempfile.mkdtemp(prefix="gateway-compare-", dir=place))
    raise BenchError(
        f"none of {', '.join(map(str, candidates))} has {needed / GIB:.1f} GiB free; "
        f"choose a place with --workdir or smaller sizes"
    )


# -- curl, dd, wrk -----------------------------------------------------------------------------


@dataclass
class Transfer:
    status: int
    seconds: float
    downloaded: int
    uploaded: int


def read_through(path: Path) -> None:
    """Read ``path`` to its end and drop the bytes."""
    with path.open("rb", buffering=0) as file:
        while file.read(8 * MIB):
            pass


def curl(tool: str, args: Sequence[str], timeout: float) -> Transfer:
    done = run_tool([tool, "-sS", "--noproxy", "*", "-w", CURL_FORMAT, *args], timeout, what="curl")
    try:
        status, seconds, down, up = done.stdout.strip().split()[-4:]
        return Transfer(int(status), float(seconds), int(down), int(up))
    except ValueError:
        raise BenchError(f"curl printed {done.stdout[-200:]!r}, not its -w line") from None


def transfer_timeout(size: int) -> float:
    return 120.0 + size / 5e6  # even at 5 MB/s


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else float("inf")


_DD_TIME: Final = re.compile(r"copied, ([\d.]+) s")


@dataclass
class WrkRun:
    requests: int
    seconds: float
    errors: int
    non2xx: int
    statuses: dict[str, int]
    p50_us: float
    p99_us: float

    @property
    def ops(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def parse_wrk(stdout: str, what: str) -> WrkRun:
    for line in stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            data = json.loads(line.removeprefix("BENCH-JSON "))
            errors = sum(
                int(data[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            return WrkRun(
                requests=int(data["requests"]),
                seconds=float(data["duration_us"]) / 1e6,
                errors=errors,
                non2xx=int(data["non2xx"]),
                statuses={str(k): int(v) for k, v in data["statuses"].items()},
                p50_us=float(data["p50_us"]),
                p99_us=float(data["p99_us"]),
            )
    raise BenchError(f"wrk ({what}) printed no BENCH-JSON line: {stdout[-500:]!r}")


# -- the gateway -------------------------------------------------------------------------------


def gateway_env(workdir: Path, storage: Mapping[str, str], port: int) -> dict[str, str]:
    """The environment of the gateway and of its admin CLI: no inherited ``GATEWAY_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(NO_PROXY)
    env.update(storage)
    env.update(
        GATEWAY_SERVER_HOST="127.0.0.1",
        GATEWAY_SERVER_PORT=str(port),
        GATEWAY_TENANTS_ENABLED="true",
        GATEWAY_AUTH_ENABLED="true",
        GATEWAY_ADMIN_USERNAME="admin",
        GATEWAY_ADMIN_PASSWORD=secrets.token_urlsafe(24),
        GATEWAY_ADMIN_PASSWORD_FILE=str(workdir / f"admin-password-{port}.txt"),
        PYTHONUNBUFFERED="1",
    )
    return env


def set_up_identities(env: Mapping[str, str]) -> str:
    """With the admin CLI on the gateway's storage: tenant, service account, role; the token."""
    cli = [sys.executable, "-m", "gateway"]
    steps = [
        ["tenants", "create", "--tenant", TENANT, "--name", "Acme"],
        ["service-accounts", "create", "--name", ACCOUNT],
        ["service-accounts", "grant", "--name", ACCOUNT, "--tenant", TENANT, "--role", "EDITOR"],
    ]
    for step in steps:
        run_tool([*cli, *step], 120, env, what=f"gateway {' '.join(step[:2])}")
    done = run_tool(
        [*cli, "tokens", "create", "--service-account", ACCOUNT], 120, env, "gateway tokens"
    )
    lines = done.stdout.strip().splitlines()
    if not lines or len(lines[-1].split()) != 1:
        raise BenchError("gateway tokens create printed no token")
    return lines[-1].strip()


def workers_supported() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--workers" in done.stdout


@dataclass
class Gateway:
    server: Server
    token: str
    sampler: Sampler

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> str:
        return f"Bearer {self.token}"

    def files(self, key: str) -> str:
        return f"{self.url}/api/v1/{TENANT}/files/{key}"


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(
        self, args: argparse.Namespace, result: Result, workdir: Path, tools: dict[str, str]
    ) -> None:
        self.args = args
        self.result = result
        self.workdir = workdir
        self.tools = tools
        logs = workdir / "logs"
        logs.mkdir()
        self.servers = Servers(logs)
        self.data = workdir / "data"
        self.tenant_dir = self.data / "tenants" / TENANT
        self.source = workdir / "source.bin"
        self.password = secrets.token_urlsafe(16)
        self.workers: int | None = None
        self.local: Gateway | None = None
        self.casualties: list[str] = []  # servers found dead when an error stopped the run

    # -- plumbing ------------------------------------------------------------------------------

    def start_gateway(self, name: str, storage: Mapping[str, str]) -> Gateway:
        port = free_port()
        env = gateway_env(self.workdir, storage, port)
        progress(f"{name}: setting up tenant {TENANT!r} and a token with the admin CLI ...")
        token = set_up_identities(env)
        argv = [*GATEWAY_SERVE]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        server = self.servers.start(name, argv, port, env)
        wait_http(server, "/health/ready", ok=200)
        sampler = Sampler(server.proc.pid, SAMPLE_INTERVAL)
        sampler.start()
        gateway = Gateway(server, token, sampler)
        # The token works (the registry the gateway loaded holds what the CLI wrote).
        status = self.curl(
            [
                "-o",
                os.devnull,
                "-H",
                f"Authorization: {gateway.auth}",
                f"{gateway.url}/api/v1/{TENANT}/list",
            ],
            30,
        ).status
        if status != 200:
            raise BenchError(f"{name}: listing tenant {TENANT} with the token answered {status}")
        return gateway

    def stop_gateway(self, gateway: Gateway) -> None:
        gateway.sampler.stop()
        status = self.servers.stop(gateway.server)
        if status != 0:
            self.result.notes.append(
                f"{gateway.server.name} exited with status {status} on SIGTERM (expected 0)"
            )

    def local_gateway(self) -> Gateway:
        if self.local is None:
            self.data.mkdir(exist_ok=True)
            self.local = self.start_gateway(
                "gateway-local",
                {
                    "GATEWAY_STORAGE_TYPE": "local",
                    "GATEWAY_STORAGE_LOCAL_BASE_PATH": str(self.data),
                },
            )
        return self.local

    def curl(self, args: Sequence[str], timeout: float) -> Transfer:
        return curl(self.tools["curl"], args, timeout)

    def put(
        self, url: str, source: Path, size: int, auth: Sequence[str], ok: Sequence[int]
    ) -> float:
        """curl -T; check the status and the bytes sent; return MB/s."""
        answer = self.workdir / "answer.json"
        t = self.curl(
            ["-T", str(source), "-H", "Expect:", *auth, "-o", str(answer), url],
            transfer_timeout(size),
        )
        if t.status not in ok or t.uploaded != size:
            body = answer.read_text(errors="replace")[:300] if answer.exists() else ""
            raise BenchError(f"PUT {url}: status {t.status}, sent {t.uploaded} of {size} {body}")
        stored: Any = size
        with contextlib.suppress(OSError, ValueError):  # the gateway answers with the size
            answered = json.loads(answer.read_text())
            stored = answered.get("size", size) if isinstance(answered, dict) else size
        if stored != size:
            raise BenchError(f"PUT {url}: the answer says {stored} bytes stored, not {size}")
        return mb_per_s(size, t.seconds)

    def get(self, url: str, size: int, auth: Sequence[str]) -> float:
        """curl to /dev/null; check the status and the byte count; return MB/s."""
        t = self.curl([*auth, "-o", os.devnull, url], transfer_timeout(size))
        if t.status != 200 or t.downloaded != size:
            raise BenchError(f"GET {url}: status {t.status}, {t.downloaded} of {size} bytes")
        return mb_per_s(size, t.seconds)

    def delete(self, gateway: Gateway, key: str) -> None:
        t = self.curl(
            [
                "-X",
                "DELETE",
                "-H",
                f"Authorization: {gateway.auth}",
                "-o",
                os.devnull,
                gateway.files(key),
            ],
            60,
        )
        if t.status != 204:
            raise BenchError(f"DELETE {key}: status {t.status}")

    def rclone(self, kind: str, directory: Path) -> Server:
        port = free_port()
        argv = [self.tools["rclone"], "serve", kind, str(directory), "--addr", f"127.0.0.1:{port}"]
        if kind == "webdav":
            argv += ["--user", ACCOUNT, "--pass", self.password]
        env = {**os.environ, **NO_PROXY, "RCLONE_CONFIG": str(self.workdir / "rclone.conf")}
        server = self.servers.start(f"rclone-{kind}", argv, port, env)
        wait_http(server, "/")
        return server

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{ACCOUNT}:{self.password}".encode()).decode()

    def phase_rss(self, gateway: Gateway, section: str, started: bool) -> None:
        """Start (``started`` False) or end a run's RSS phase; record the peak at its end."""
        if not started:
            gateway.sampler.start_phase()
            return
        peak, _, _ = gateway.sampler.end_phase()
        self.result.record("memory", f"gateway peak RSS during {section}", "MiB", peak / MIB)

    def write_random(self, path: Path, size: int) -> None:
        progress(f"writing {human(size)} of random bytes to {path.name} ...")
        with open(path, "wb") as out:
            left = size
            while left:
                n = min(left, 4 * MIB)
                out.write(os.urandom(n))
                left -= n

    # -- 1. large ------------------------------------------------------------------------------

    def large(self) -> None:
        args, record = self.args, self.result.record
        size = args.size
        check_disk(self.workdir, 3 * size + DISK_MARGIN, "the large section")
        self.write_random(self.source, size)
        gateway = self.local_gateway()
        directory = self.tenant_dir / "large"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "gateway.bin"
        port = free_port()
        file_server = self.servers.start(
            "aiohttp-fileresponse",
            [sys.executable, "-c", FILE_SERVER, str(target), str(port)],
            port,
            {**os.environ, **NO_PROXY},
        )
        wait_http(file_server, "/health")  # any answer (404) means it listens
        bearer = ["-H", f"Authorization: {gateway.auth}"]
        basic = ["-u", f"{ACCOUNT}:{self.password}"]
        for run in range(1, args.runs + 1):

            def say(peer: str, value: float, detail: str = "", run: int = run) -> None:
                progress(f"large run {run}/{args.runs}: {peer} {value:.0f} MB/s{detail}")
                record("large", peer, "MB/s", value)

            self.phase_rss(gateway, "large", started=False)
            ok = (201,)
            say(
                "gateway PUT",
                self.put(gateway.files("large/gateway.bin"), self.source, size, bearer, ok),
            )
            if not target.is_file() or target.stat().st_size != size:
                raise BenchError(f"the gateway's object is not at {target} with {size} bytes")
            say("dd conv=fdatasync write", self.dd(directory / "dd.bin", size))
            (directory / "dd.bin").unlink()
            webdav = self.rclone("webdav", directory)
            http = self.rclone("http", directory)
            try:
                dav = self.put(
                    f"{webdav.url}/webdav.bin", self.source, size, basic, (200, 201, 204)
                )
                say("rclone webdav PUT", dav)
                (directory / "webdav.bin").unlink()
                # The uploads above leave the kernel writing back a GiB or more: let it finish,
                # or whichever download comes first shares the machine with that writeback.
                os.sync()
                gets = [
                    ("gateway GET", gateway.files("large/gateway.bin"), bearer),
                    ("aiohttp FileResponse GET", f"{file_server.url}/file", []),
                    ("rclone http GET", f"{http.url}/gateway.bin", []),
                    ("rclone webdav GET", f"{webdav.url}/gateway.bin", basic),
                ]
                shift = (run - 1) % len(gets)  # no peer is always first
                order = gets[shift:] + gets[:shift]
                speeds: dict[str, list[float]] = {peer: [] for peer, _, _ in order}
                for _ in range(GET_ROUNDS):  # interleaved: no peer gets one quiet moment
                    for peer, url, auth in order:
                        # The first read of a file after another process read it is slower
                        # for any server (seen with rclone before the gateway, and before
                        # FileResponse): each peer gets the file just read by a plain reader.
                        read_through(target)
                        speeds[peer].append(self.get(url, size, auth))
                for peer, _, _ in order:
                    each = ", ".join(f"{value:.0f}" for value in speeds[peer])
                    say(peer, statistics.median(speeds[peer]), f" (median of {each})")
            finally:
                self.servers.stop(http)
                self.servers.stop(webdav)
            self.delete(gateway, "large/gateway.bin")
            self.phase_rss(gateway, "large", started=True)
        self.servers.stop(file_server)
        self.source.unlink()
        ratio = self.result.ratio
        ratio("large", "gateway GET", "aiohttp FileResponse GET", 0.8)
        ratio("large", "gateway GET", "rclone http GET", 2.0)
        ratio("large", "gateway PUT", "dd conv=fdatasync write", 0.8)
        ratio("large", "gateway PUT", "rclone webdav PUT", 1.0)
        ratio("large", "gateway GET", "rclone webdav GET")

    def dd(self, destination: Path, size: int) -> float:
        started = time.perf_counter()
        done = run_tool(
            [self.tools["dd"], f"if={self.source}", f"of={destination}", "bs=1M", "conv=fdatasync"],
            transfer_timeout(size),
            {**os.environ, "LC_ALL": "C"},
            what="dd",
        )
        elapsed = time.perf_counter() - started
        match = _DD_TIME.search(done.stderr)
        seconds = float(match[1]) if match else elapsed
        if destination.stat().st_size != size:
            raise BenchError(f"dd wrote {destination.stat().st_size} bytes, expected {size}")
        return mb_per_s(size, seconds)

    # -- 2. small ------------------------------------------------------------------------------

    def small(self) -> None:
        args = self.args
        gateway = self.local_gateway()
        for peer in ("small-webdav/get", "small-webdav/put"):
            (self.tenant_dir / peer).mkdir(parents=True, exist_ok=True)
        webdav = self.rclone("webdav", self.tenant_dir)
        try:
            progress(f"small: uploading {SMALL_KEYS} objects of 4 KiB through each peer ...")
            asyncio.run(
                populate(
                    f"{gateway.url}/api/v1/{TENANT}/files/small-gateway/get/", gateway.auth, (201,)
                )
            )
            asyncio.run(populate(f"{webdav.url}/small-webdav/get/", self.basic, (201, 204)))
            peers = [
                ("gateway", gateway.url, f"/api/v1/{TENANT}/files/small-gateway/", gateway.auth),
                ("rclone webdav", webdav.url, "/small-webdav/", self.basic),
            ]
            record = self.result.record
            for run in range(1, args.runs + 1):
                self.phase_rss(gateway, "small", started=False)
                # Each run swaps which peer goes first, and every PUT run starts with nothing
                # left for the kernel to write back (rclone does not fsync: otherwise the
                # next peer's run would pay for its writes).
                order = peers if run % 2 else peers[::-1]
                for op in ("GET", "PUT"):
                    for peer, url, prefix, auth in order:
                        where = prefix + op.lower() + "/"
                        if op == "PUT":
                            os.sync()
                        outcome = self.wrk(op, url, where, auth, f"{peer} {op}")
                        progress(
                            f"small run {run}/{args.runs}: {peer} {op} {outcome.ops:.0f} ops/s, "
                            f"p50 {outcome.p50_us:.0f} us, p99 {outcome.p99_us:.0f} us"
                        )
                        record("small", f"{peer} {op}", "ops/s", outcome.ops)
                        record("small", f"{peer} {op} p50", "us", outcome.p50_us)
                        record("small", f"{peer} {op} p99", "us", outcome.p99_us)
                durable = self.durable_writes()
                progress(f"small run {run}/{args.runs}: durable 4 KiB writes {durable:.0f} ops/s")
                record("small", DURABLE, "ops/s", durable)
                self.phase_rss(gateway, "small", started=True)
        finally:
            self.servers.stop(webdav)
        self.result.ratio("small", "gateway GET", "rclone webdav GET", 1.5)
        self.result.ratio("small", "gateway PUT", "rclone webdav PUT", 1.0)
        self.result.ratio("small", "gateway PUT", DURABLE)
        self.result.ratio("small", "gateway GET p99", "rclone webdav GET p99")
        self.result.ratio("small", "gateway PUT p99", "rclone webdav PUT p99")

    def durable_writes(self) -> float:
        """Ops/s of ``DURABLE_WRITER`` (32 threads) for ``--small-duration`` seconds."""
        folder = self.workdir / "durable"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        seconds = self.args.small_duration
        done = run_tool(
            [sys.executable, "-c", DURABLE_WRITER, str(folder), str(seconds), "32"],
            seconds + 60,
            what="durable 4 KiB writes",
        )
        shutil.rmtree(folder, ignore_errors=True)
        return float(done.stdout.strip().splitlines()[-1])

    def wrk(self, op: str, url: str, prefix: str, auth: str, what: str) -> WrkRun:
        duration = self.args.small_duration
        done = run_tool(
            [
                self.tools["wrk"],
                "-t2",
                "-c32",
                f"-d{duration}s",
                "--latency",
                "--timeout",
                "10s",
                "-s",
                str(LUA / "small.lua"),
                url,
                "--",
                op,
                prefix,
                auth,
            ],
            duration + 60,
            what=f"wrk ({what})",
        )
        outcome = parse_wrk(done.stdout, what)
        bad = outcome.errors + outcome.non2xx
        if outcome.requests == 0 or bad > MAX_ERROR_RATE * outcome.requests:
            raise BenchError(
                f"wrk ({what}): {outcome.non2xx} non-2xx answers and {outcome.errors} socket "
                f"errors in {outcome.requests} requests (at most {MAX_ERROR_RATE:.1%} allowed); "
                f"statuses {outcome.statuses}"
            )
        return outcome

    # -- 3. s3 ---------------------------------------------------------------------------------

    def s3(self) -> None:
        from tests.support.moto import (
            ACCESS_KEY,
            REGION,
            SECRET_KEY,
            MotoServer,
            clean_env,
            make_bucket,
        )

        args, size = self.args, self.args.s3_size
        check_disk(self.workdir, size + DISK_MARGIN, "the s3 section")
        source = self.workdir / "s3-source.bin"
        self.write_random(source, size)
        progress("s3: starting moto's S3 server ...")
        with MotoServer() as moto:
            endpoint = moto.start()
            bucket = "bench"
            make_bucket(endpoint, bucket)
            storage = {
                "GATEWAY_STORAGE_TYPE": "s3",
                "GATEWAY_STORAGE_S3_ENDPOINT": endpoint,
                "GATEWAY_STORAGE_S3_BUCKET": bucket,
                "GATEWAY_STORAGE_S3_ACCESS_KEY": ACCESS_KEY,
                "GATEWAY_STORAGE_S3_SECRET_KEY": SECRET_KEY,
                "GATEWAY_STORAGE_S3_REGION": REGION,
                "GATEWAY_STORAGE_S3_FORCE_PATH_STYLE": "true",
            }
            gateway = self.start_gateway("gateway-s3", {**clean_env(), **storage})
            try:
                bearer = ["-H", f"Authorization: {gateway.auth}"]
                client_env = clean_env(NO_PROXY)
                for run in range(1, args.runs + 1):
                    self.phase_rss(gateway, "s3", started=False)
                    url = gateway.files("s3/gateway.bin")
                    values = {
                        "gateway PUT": self.put(url, source, size, bearer, (201,)),
                        "gateway GET": self.get(url, size, bearer),
                    }
                    self.delete(gateway, "s3/gateway.bin")
                    self.phase_rss(gateway, "s3", started=True)
                    done = run_tool(
                        [
                            sys.executable,
                            "-c",
                            S3FS_CLIENT,
                            endpoint,
                            bucket,
                            "direct/s3fs.bin",
                            str(source),
                            str(self.workdir / "s3fs-download.bin"),
                        ],
                        2 * transfer_timeout(size),
                        client_env,
                        what="the s3fs client",
                    )
                    direct = json.loads(done.stdout.strip().splitlines()[-1])
                    if direct["stored"] != size or direct["received"] != size:
                        raise BenchError(
                            f"s3fs stored {direct['stored']} and got {direct['received']} "
                            f"bytes, expected {size}"
                        )
                    values["s3fs put_file"] = mb_per_s(size, direct["put_s"])
                    values["s3fs get_file"] = mb_per_s(size, direct["get_s"])
                    for peer, value in values.items():
                        progress(f"s3 run {run}/{args.runs}: {peer} {value:.0f} MB/s")
                        self.result.record("s3", peer, "MB/s", value)
            finally:
                self.stop_gateway(gateway)
        source.unlink()
        self.result.ratio("s3", "gateway PUT", "s3fs put_file", 0.85)
        self.result.ratio("s3", "gateway GET", "s3fs get_file", 0.85)

    # -- 4. memory -----------------------------------------------------------------------------

    def memory(self) -> None:
        gateway = self.local_gateway()
        peaks: list[tuple[int, float]] = []
        for size in sorted(set(self.args.memory_sizes)):
            check_disk(self.workdir, size + DISK_MARGIN, f"the {human(size)} round trip")
            progress(f"memory: {human(size)} upload + download through the gateway ...")
            gateway.sampler.start_phase()
            up, down = asyncio.run(round_trip(gateway, "memory/object.bin", size))
            peak, _, _ = gateway.sampler.end_phase()
            label = human(size)
            progress(
                f"memory: {label}: upload {up:.0f} MB/s, download {down:.0f} MB/s, "
                f"gateway peak RSS {peak / MIB:.1f} MiB"
            )
            self.result.record("memory", f"{label} round trip: gateway peak RSS", "MiB", peak / MIB)
            self.result.record("memory", f"{label} round trip: upload", "MB/s", up)
            self.result.record("memory", f"{label} round trip: download", "MB/s", down)
            peaks.append((size, peak / MIB))
        largest, top = peaks[-1]
        targets = self.result.targets
        targets.append(
            Target(
                "memory",
                f"gateway peak RSS, {human(largest)} round trip (MiB)",
                top,
                "<",
                MAX_RSS_MIB,
                top < MAX_RSS_MIB,
            )
        )
        if len(peaks) > 1:
            smallest = peaks[0][0]
            name = f"{human(largest)} round trip: gateway peak RSS"
            self.result.ratio(
                "memory",
                name,
                f"{human(smallest)} round trip: gateway peak RSS",
                1.2,
                False,
                name=f"peak RSS {human(largest)} / {human(smallest)} (flat)",
            )

    # -- 5. growth -----------------------------------------------------------------------------

    def growth(self) -> None:
        args = self.args
        gateway = self.local_gateway()
        counts = sorted(set(args.growth_counts))
        for count in counts:
            directory = self.tenant_dir / f"growth-{count_label(count)}"
            progress(f"growth: writing {count:,} files into {directory.name}/ ...")
            directory.mkdir(parents=True)
            for number in range(count):
                fd = os.open(directory / f"f{number:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    os.write(fd, b"x")
                finally:
                    os.close(fd)
        for run in range(1, args.runs + 1):
            self.phase_rss(gateway, "growth (listing)", started=False)
            for count in counts:
                prefix = f"growth-{count_label(count)}"
                # A small directory is listed several times (LIST_SAMPLE entries at least): one
                # 30 ms request is too short a sample on a shared machine.
                repeat = max(1, LIST_SAMPLE // count)
                seconds, pages = 0.0, 0
                for _ in range(repeat):
                    took, listed = asyncio.run(list_all(gateway, prefix, count))
                    seconds += took
                    pages += listed
                per_1000 = seconds * 1e3 / (repeat * count / 1000)
                progress(
                    f"growth run {run}/{args.runs}: list {count:,} entries {repeat} time(s), "
                    f"{pages} pages, {seconds:.2f} s, {per_1000:.1f} ms per 1,000"
                )
                self.result.record(
                    "growth", f"list {count_label(count)}: per 1,000 entries", "ms", per_1000
                )
            self.phase_rss(gateway, "growth (listing)", started=True)
        if len(counts) > 1:
            large, small = count_label(counts[-1]), count_label(counts[0])
            self.result.ratio(
                "growth",
                f"list {large}: per 1,000 entries",
                f"list {small}: per 1,000 entries",
                1.2,
                False,
                name=f"listing, time per 1,000 entries: {large} / {small} (flat)",
            )
        self.access()

    def access(self) -> None:
        progress(f"growth: python -m bench.access {' '.join(ACCESS_FLAGS)} ...")
        out = self.workdir / "access.json"
        started = time.perf_counter()
        argv = [sys.executable, "-m", "bench.access", *ACCESS_FLAGS, "--json", str(out)]
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=ACCESS_TIMEOUT, check=False
        )
        if done.returncode not in (0, 1) or not out.exists():
            raise BenchError(
                f"bench.access exited with {done.returncode}: {done.stderr.strip()[-1500:]}"
            )
        data = json.loads(out.read_text(encoding="utf-8"))
        self.result.access = data
        progress(f"growth: bench.access took {time.perf_counter() - started:.0f} s")
        runs = data["runs"]
        small, large = runs[0]["tenants"], runs[-1]["tenants"]
        limit = float(data["max_ratio"])
        rows = (
            ("bearer_check_ns", "in-process Bearer identify+authorize", "ns", limit),
            ("basic_check_ns", "in-process Basic (cached) identify+authorize", "ns", limit),
            ("e2e_rps", "e2e GET stats", "req/s", None),
            ("e2e_median_us", "e2e median latency", "us", None),
            ("e2e_p99_us", "e2e p99 latency", "us", None),
        )
        for attribute, label, unit, target in rows:
            for run in runs:
                self.result.record(
                    "growth", f"access: {label}, {run['tenants']:,} tenants", unit, run[attribute]
                )
            value = float(data["ratios"][attribute])
            self.result.ratios.append(
                Ratio(
                    "growth",
                    f"access: {label}, {large:,} / {small:,} tenants",
                    value,
                    [value],
                    target,
                    False,
                )
            )

    # -- all -----------------------------------------------------------------------------------

    def run(self) -> None:
        if workers_supported():
            self.workers = self.args.workers
            self.result.options["gateway_workers"] = self.workers
        else:
            self.result.options["gateway_workers"] = None
            self.result.notes.append(
                "`gateway serve --help` lists no --workers: the gateway ran as one process"
            )
            progress(f"note: {self.result.notes[-1]}")
        steps: dict[str, Callable[[], None]] = {
            "large": self.large,
            "small": self.small,
            "s3": self.s3,
            "memory": self.memory,
            "growth": self.growth,
        }
        try:
            for section in SECTIONS:
                if section in self.args.only:
                    started = time.perf_counter()
                    progress(f"== {section} ==")
                    steps[section]()
                    progress(f"{section}: done in {time.perf_counter() - started:.0f} s")
        except BaseException:
            self.casualties = self.servers.dead()
            raise
        finally:
            if self.local is not None:
                self.stop_gateway(self.local)
                self.local = None
            self.servers.stop_all()

    def log_tails(self) -> str:
        parts = []
        for log in sorted((self.workdir / "logs").glob("gateway-*.log")):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            lines = [line for line in lines if '"gateway.access"' not in line] or lines
            parts.append(f"--- {log.name}, last lines:\n" + "\n".join(lines[-15:]))
        return "\n".join(parts)


async def populate(prefix: str, auth: str, ok: Sequence[int]) -> None:
    """PUT ``SMALL_KEYS`` objects of 4 KiB at ``prefix`` + ``k<n>``, 32 at a time."""
    body = os.urandom(SMALL_SIZE)
    semaphore = asyncio.Semaphore(32)
    headers = {"Authorization": auth, "Content-Type": "application/octet-stream"}

    async def one(session: aiohttp.ClientSession, number: int) -> None:
        async with semaphore, session.put(f"{prefix}k{number}", data=body) as response:
            await response.read()
            if response.status not in ok:
                raise BenchError(f"populating {prefix}k{number}: status {response.status}")

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        await asyncio.gather(*(one(session, n) for n in range(SMALL_KEYS)))


async def round_trip(gateway: Gateway, key: str, size: int) -> tuple[float, float]:
    """Upload ``size`` generated bytes, download them, compare SHA-256; return both MB/s."""
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=120)
    headers = {"Authorization": gateway.auth}
    url = gateway.files(key)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        started = time.perf_counter()
        sent, sent_hash = await upload(session, url, size, chunked=False)
        up = time.perf_counter() - started
        started = time.perf_counter()
        received, received_hash = await download(session, url)
        down = time.perf_counter() - started
        async with session.delete(url) as response:
            if response.status != 204:
                raise BenchError(f"DELETE {key}: status {response.status}")
    if received != size or received_hash != sent_hash:
        raise BenchError(
            f"{key}: downloaded {received} bytes ({received_hash}), sent {sent} ({sent_hash})"
        )
    return mb_per_s(size, up), mb_per_s(size, down)


async def list_all(gateway: Gateway, prefix: str, count: int) -> tuple[float, int]:
    """List ``prefix`` page by page (1,000 a page); check ``count`` entries; return (s, pages)."""
    url = f"{gateway.url}/api/v1/{TENANT}/list/{prefix}"
    headers = {"Authorization": gateway.auth}
    timeout = aiohttp.ClientTimeout(total=600)
    entries = pages = 0
    names: set[str] = set()
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        async with session.get(f"{gateway.url}/health/live") as response:  # the connection
            await response.read()
        cursor: str | None = None
        started = time.perf_counter()
        while True:
            params = {"limit": "1000"} if cursor is None else {"limit": "1000", "cursor": cursor}
            async with session.get(url, params=params) as response:
                if response.status != 200:
                    raise BenchError(f"list {prefix}: status {response.status}")
                page = await response.json()
            pages += 1
            entries += len(page["entries"])
            names.update(str(entry["fileName"]) for entry in page["entries"])
            cursor = page["cursor"]
            if cursor is None:
                break
        seconds = time.perf_counter() - started
    if entries != count or len(names) != count:
        raise BenchError(
            f"list {prefix}: {entries} entries ({len(names)} distinct), expected {count}"
        )
    return seconds, pages


# -- report ------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def columns(rows: Sequence[tuple[str, ...]], left: int = 1) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < left or i == len(row) - 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


TITLES: Final = {
    "large": "large objects, local backend, curl (MB/s = 10**6 bytes/s)",
    "small": "4 KiB objects, wrk -t2 -c32",
    "s3": "S3 backend (moto server), curl vs s3fs",
    "memory": "gateway RSS (sum over its processes, sampled every 20 ms)",
    "growth": "listing one directory, and the access check vs the tenant count",
}


def section_report(result: Result, section: str) -> list[str]:
    measures = [m for m in result.measures if m.section == section]
    ratios = [r for r in result.ratios if r.section == section]
    if not measures and not ratios:
        return []
    lines = [f"== {section}: {TITLES[section]} =="]
    if measures:
        rows = [("peer / measure", "unit", "median", "runs")]
        rows += [
            (m.name, m.unit, fmt(m.median), ", ".join(fmt(v) for v in m.values)) for m in measures
        ]
        lines += columns(rows, left=2)
    if ratios:
        lines.append("")
        rows = [("ratio", "median", "runs", "target")]
        for r in ratios:
            if r.target is None:
                target = "-"
            else:
                target = f"{'>=' if r.at_least else '<='} {r.target:g} "
                target += "PASS" if r.passed else "FAIL"
            rows.append((r.name, fmt(r.value), ", ".join(fmt(v) for v in r.per_run), target))
        lines += columns(rows)
    lines.append("")
    return lines


def workers_text(workers: int | None) -> str:
    if workers is None:
        return "one process (gateway serve has no --workers)"
    return f"--workers {workers}"


def report(result: Result) -> str:
    lines = [
        f"gateway side-by-side benchmark, {result.date}",
        f"command: {result.command}",
        f"runs: {result.runs} (interleaved; medians; ratio = median(gateway) / median(peer))",
        f"gateway: {workers_text(result.options.get('gateway_workers'))}, tenants and auth on, "
        f"Bearer token",
        "",
    ]
    for section in SECTIONS:
        lines += section_report(result, section)
    if result.targets:
        lines.append("== targets ==")
        for t in result.targets:
            lines.append(
                f"{'PASS' if t.passed else 'FAIL'}  {t.section}: {t.name}: {fmt(t.value)} "
                f"(target {t.comparison} {t.limit:g})"
            )
        lines.append("")
    lines.append("== machine ==")
    lines += [f"{key}: {value}" for key, value in result.machine.items()]
    lines.append("")
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"wall time: {result.wall_s:.0f} s")
    if result.error:
        lines.append(f"FAILED: {result.error}")
    else:
        failed = [t for t in result.targets if not t.passed]
        lines.append(
            f"{len(result.targets) - len(failed)} of {len(result.targets)} targets passed"
            + (f"; failed: {', '.join(f'{t.section}: {t.name}' for t in failed)}" if failed else "")
        )
    return "\n".join(lines)


def collect_targets(result: Result) -> None:
    """Add a target for every ratio that has one; order all targets by section."""
    for r in result.ratios:
        if r.target is not None:
            comparison = ">=" if r.at_least else "<="
            passed = bool(r.passed)
            result.targets.append(Target(r.section, r.name, r.value, comparison, r.target, passed))
    result.targets.sort(key=lambda t: SECTIONS.index(t.section))


# -- main --------------------------------------------------------------------------------------


def size_list(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def count_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"counts must be at least 1: {text!r}")
    return counts


def section_list(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from {','.join(SECTIONS)}"
        )
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="The gateway side by side with the raw disk, rclone, aiohttp and s3fs.",
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    parser.add_argument(
        "--only",
        type=section_list,
        default=list(SECTIONS),
        help=f"comma-separated sections (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="large objects (1GiB)"
    )
    parser.add_argument(
        "--s3-size", type=parse_size, default=parse_size("256MiB"), help="S3 objects (256MiB)"
    )
    parser.add_argument(
        "--small-duration", type=int, default=8, help="seconds of each wrk run (default 8)"
    )
    parser.add_argument(
        "--memory-sizes",
        type=size_list,
        default=[GIB, 4 * GIB],
        help="round trips of the memory section (default 1GiB,4GiB)",
    )
    parser.add_argument(
        "--growth-counts",
        type=count_list,
        default=[1000, 10_000, 100_000],
        help="objects per listed directory (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gateway serve --workers, if it has that flag (default: the CPU count)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the work directory goes (default: /work or the system temp directory)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.small_duration < 1:
        parser.error("--small-duration must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.memory_sizes:
        parser.error("--memory-sizes needs at least one size")
    return args


def interpreter() -> str:
    """This Python, relative to the project root when it lives there (``.venv/bin/python``)."""
    path = Path(sys.executable)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = Result(
        command=shlex.join(
            [interpreter(), "-m", "bench.compare", *(sys.argv[1:] if argv is None else argv)]
        ),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        runs=args.runs,
        sections=list(args.only),
        options={
            "size": args.size,
            "s3_size": args.s3_size,
            "small_duration_s": args.small_duration,
            "memory_sizes": args.memory_sizes,
            "growth_counts": args.growth_counts,
            "workers": args.workers,
        },
    )
    workdir: Path | None = None
    bench: Bench | None = None
    with sigterm_as_interrupt():
        try:
            tools = find_tools()
            workdir = make_workdir(args)
            result.machine = machine(workdir, tools)
            progress(f"work directory: {workdir}")
            bench = Bench(args, result, workdir, tools)
            bench.run()
        except BenchError as exc:
            result.error = str(exc)
        except KeyboardInterrupt:
            result.error = "interrupted"
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            traceback.print_exc()
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if result.error and bench is not None and workdir is not None:
                dead = bench.casualties
                if dead:  # e.g. ended from outside: say so, it explains the error
                    result.error += f" ({'; '.join(dead)})"
                with contextlib.suppress(OSError):
                    progress(bench.log_tails())
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
    collect_targets(result)
    result.wall_s = time.perf_counter() - started
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(result)
        for measure, shown in zip(result.measures, data["measures"], strict=True):
            shown["median"] = measure.median
        for ratio, shown in zip(result.ratios, data["ratios"], strict=True):
            shown["passed"] = ratio.passed
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    if result.error:
        return 2
    return 0 if all(t.passed for t in result.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
