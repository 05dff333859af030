"""``gateway files`` against a real gateway process: output, ``--json``, exit codes, and the
progress bar on a 100 MB transfer that shows on a terminal (a pseudo-terminal) and not on a
pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from tests.support.ports import refused_port
from tests.support.tenant_gateway import TenantGateway, tenant_gateway

BIG = 100 * 1000 * 1000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantGateway]:
    base = tmp_path_factory.mktemp("cli") / "data"
    with tenant_gateway({"storage": {"type": "local", "local": {"base-path": str(base)}}}) as gw:
        yield gw


def _files(gateway: TenantGateway, *args: str, tenant: str | None = None) -> tuple[int, str]:
    options = ["--url", gateway.url, "--tenant", tenant or gateway.tenant, "--token", gateway.token]
    result = CliRunner().invoke(main, ["files", *options, *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_files_commands_round_trip_with_json_output(gateway: TenantGateway, tmp_path: Path) -> None:
    source = tmp_path / "out.csv"
    source.write_bytes(b"a,b\n1,2\n")
    code, out = _files(
        gateway, "put", str(source), "ns/flow/out.csv", "--content-type", "text/csv",
        "--meta", "execution=e1", "--checksum", "--json",
    )  # fmt: skip
    assert code == 0, out
    put = json.loads(out)
    assert sorted(put) == ["etag", "key", "size", "uri"]
    assert (put["key"], put["uri"], put["size"]) == (
        "ns/flow/out.csv",
        "kestra:///ns/flow/out.csv",
        8,
    )
    code, out = _files(gateway, "stat", "kestra://ns/flow/out.csv", "--json")
    info = json.loads(out)
    assert info["etag"] == put["etag"] and put["etag"].startswith('"')
    assert (code, info["size"], info["contentType"], info["metadata"]) == (
        0, 8, "text/csv", {"execution": "e1"},
    )  # fmt: skip
    code, out = _files(gateway, "ls", "ns", "-r", "--json")
    assert code == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["ns/flow/out.csv"]
    code, out = _files(gateway, "mv", "ns/flow/out.csv", "kestra:///ns/archive/out.csv")
    assert (code, out.strip()) == (0, "ns/archive/out.csv")
    target = tmp_path / "copy.csv"
    code, out = _files(gateway, "get", "ns/archive/out.csv", str(target), "--json")
    assert code == 0, out
    assert json.loads(out) == {"key": "ns/archive/out.csv", "path": str(target), "size": 8}
    assert target.read_bytes() == source.read_bytes()
    code, out = _files(gateway, "ls", "ns")
    # One level: the two directories (the move left ns/flow behind, empty), sizes 0.
    assert (code, out.splitlines()) == (0, [f"d {0:>14} ns/archive/", f"d {0:>14} ns/flow/"])
    code, out = _files(gateway, "ls", "ns/archive")
    assert (code, out.splitlines()) == (0, [f"- {8:>14} ns/archive/out.csv"])
    code, out = _files(gateway, "rm", "ns", "-r", "--json")
    assert (code, json.loads(out)) == (0, {"deleted": 1})


def test_files_put_from_stdin_and_get_to_stdout(gateway: TenantGateway) -> None:
    options = ["--url", gateway.url, "--tenant", gateway.tenant, "--token", gateway.token]
    data = bytes(range(256)) * 5000
    runner = CliRunner()
    result = runner.invoke(main, ["files", *options, "put", "-", "ns/stdin.bin"], input=data)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["files", *options, "get", "ns/stdin.bin", "-"])
    assert (result.exit_code, result.stdout_bytes) == (0, data)
    assert _files(gateway, "rm", "ns/stdin.bin")[0] == 0


def test_files_exit_codes_name_the_kind_of_error(gateway: TenantGateway, tmp_path: Path) -> None:
    source = tmp_path / "x"
    source.write_bytes(b"x")
    assert _files(gateway, "stat", "ns/missing")[0] == 3
    assert _files(gateway, "get", "ns/missing", str(tmp_path / "y"))[0] == 3
    assert not (tmp_path / "y").exists()
    code, out = _files(gateway, "put", str(source), "ns/%2e%2e/x")
    assert code == 6 and "double-encoding" in out, out
    code, out = _files(gateway, "put", str(source), "ns/../x")
    assert code == 6 and "dot-segment" in out, out
    assert _files(gateway, "put", str(source), "ns/x")[0] == 0
    assert _files(gateway, "put", str(source), "ns/x", "--create-only")[0] == 5
    assert _files(gateway, "put", str(source), "ns/y")[0] == 0
    assert _files(gateway, "mv", "ns/x", "ns/y")[0] == 5
    code, out = _files(gateway, "get", "ns/x", str(tmp_path / "no-such-dir" / "x"))
    assert code == 1 and "No such file or directory" in out, out
    code, out = _files(gateway, "put", str(tmp_path / "missing"), "ns/z")
    assert code == 2 and "does not exist" in out, out
    # A tenant the token has no role on: 403, whether it exists or not.
    assert _files(gateway, "stat", "ns/x", tenant="other")[0] == 4
    # Nothing listens there: unreachable, after no retry.
    with refused_port() as port:
        dead = ["--url", f"http://127.0.0.1:{port}", "--retries", "0", "stat", "ns/x"]
        result = CliRunner().invoke(main, ["files", *dead])
    assert result.exit_code == 7, result.output
    result = CliRunner().invoke(main, ["files", "stat", "x"], env={"GATEWAY_URL": ""})
    assert result.exit_code == 2 and "GATEWAY_URL" in result.output


def _run_cli(gateway: TenantGateway, args: list[str], *, tty: bool) -> tuple[int, bytes, bytes]:
    """Run ``gateway files ARGS`` in a subprocess, its stderr a pseudo-terminal or a pipe;
    return its exit code, stdout and stderr."""
    env = {
        **os.environ,
        "GATEWAY_URL": gateway.url,
        "GATEWAY_TENANT": gateway.tenant,
        "GATEWAY_TOKEN": gateway.token,
        "COLUMNS": "100",
    }
    command = [sys.executable, "-m", "gateway", "files", *args]
    if not tty:
        done = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL
    )
    os.close(follower)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            process.kill()
            raise AssertionError("the CLI stalled")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.stdout is not None
    out = process.stdout.read()
    process.stdout.close()
    return process.wait(60), out, bytes(seen)


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_none_on_a_pipe(
    gateway: TenantGateway, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as file:
        file.write(os.urandom(1 << 20))
        file.truncate(BIG)  # the rest is a hole: read as zeros, transferred in full
    for tty in (True, False):
        code, out, err = _run_cli(gateway, ["put", str(big), f"ns/big-{tty}.bin"], tty=tty)
        assert code == 0, err
        assert out.decode().split() == [f"kestra:///ns/big-{tty}.bin", str(BIG), "bytes"]
        copy = tmp_path / f"copy-{tty}.bin"
        code, _, err2 = _run_cli(gateway, ["get", f"ns/big-{tty}.bin", str(copy)], tty=tty)
        assert code == 0, err2
        assert copy.stat().st_size == BIG
        if tty:
            # tqdm redraws the line with carriage returns; the last state is the whole size.
            for text, label in ((err, "put"), (err2, "get")):
                assert f"{label}: 100%".encode() in text, text[-500:]
                assert b"95.4M/95.4M" in text, text[-500:]
                assert text.count(b"\r") >= 2, text[-500:]
        else:
            assert err == b"" and err2 == b"", (err, err2)
    with open(big, "rb") as a, open(tmp_path / "copy-True.bin", "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)
