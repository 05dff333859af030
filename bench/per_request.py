"""CPU per request of one gateway process: what `make bench`'s throughput hides.

Starts ``gateway serve`` (one process, tenants and auth on, a service-account Bearer token) on
a fresh folder, runs ``wrk -t1 -c32`` with 4 KiB GETs or PUTs for ``--seconds``, ``--rounds``
times, and prints per round: requests/s, the process's CPU time per request (user + system,
from psutil), and, where ``perf`` can count system calls, its ``futex`` calls and
context switches per request (a worker thread contends with the event loop for the GIL at each
of its system calls: the futex count shows it).

    python -m bench.per_request --op PUT [--dir /path/on/the/disk] [--rounds 3] [--seconds 6]

Run it from two checkouts in turn (``--rounds 1``, alternating) to compare two versions: on a
shared machine, CPU per request moves less than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench.compare import (
    GATEWAY_SERVE,
    LUA,
    TENANT,
    Servers,
    gateway_env,
    parse_wrk,
    populate,
    set_up_identities,
    wait_http,
)
from bench.rss import free_port

EVENTS = (("syscalls:sys_enter_futex", "futex"), ("context-switches", "context switches"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), in seconds."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def perf_counts(pid: int, seconds: float) -> subprocess.Popen[str] | None:
    """Start ``perf stat`` counting futex calls and context switches of ``pid``, if it can."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    events = ",".join(event for event, _ in EVENTS)
    argv = [perf, "stat", "-x", ",", "-e", events, "-p", str(pid), "--", "sleep", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def parse_perf(stderr: str) -> dict[str, int]:
    counts = {}
    for line in stderr.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and re.fullmatch(r"\d+", parts[0]):
            counts[parts[2]] = int(parts[0])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["GET", "PUT"], default="PUT")
    parser.add_argument("--dir", type=Path, help="where the gateway's folder goes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is needed (Debian package wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-per-request-", dir=args.dir))
    servers = Servers(workdir)
    try:
        port = free_port()
        storage = {"GATEWAY_STORAGE_TYPE": "local"}
        storage["GATEWAY_STORAGE_LOCAL_BASE_PATH"] = str(workdir / "data")
        env = gateway_env(workdir, storage, port)
        auth = f"Bearer {set_up_identities(env)}"
        server = servers.start("gateway", GATEWAY_SERVE, port, env)
        wait_http(server, "/health/live", ok=200)
        prefix = f"/api/v1/{TENANT}/files/per-request/"
        if args.op == "GET":
            asyncio.run(populate(f"{server.url}{prefix}get/", auth, (201,)))
        pid = server.proc.pid
        for number in range(1, args.rounds + 1):
            counting = perf_counts(pid, args.seconds - 1)
            before = cpu_seconds(pid)
            done = subprocess.run(
                [wrk, "-t1", "-c32", f"-d{args.seconds}s", "-s", str(LUA / "small.lua"),
                 server.url, "--", args.op, f"{prefix}{args.op.lower()}/", auth],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            used = cpu_seconds(pid) - before
            outcome = parse_wrk(done.stdout, f"wrk {args.op}")
            if outcome.requests == 0 or outcome.errors + outcome.non2xx:
                sys.exit(f"wrk: {outcome.non2xx} non-2xx answers, {outcome.errors} errors")
            line = (
                f"round {number}: {args.op} {outcome.ops:,.0f} req/s, "
                f"CPU {used * 1e6 / outcome.requests:,.0f} us per request"
            )
            if counting is not None:
                counts = parse_perf(counting.communicate()[1])
                # perf counted for seconds - 1 of the run: scale by its share of the requests
                share = outcome.requests * (args.seconds - 1) / args.seconds
                for event, name in EVENTS:
                    if event in counts:
                        line += f", {name} {counts[event] / share:,.0f} per request"
            print(line, flush=True)
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
