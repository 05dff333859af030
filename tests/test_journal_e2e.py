"""The journal of small writes, end to end: a real gateway (two worker processes) takes small
uploads, overwrites and deletes, and is killed; the machine's crash is then made by hand (the
dead processes' folders are relabelled as an earlier boot's, and every journaled object is
emptied, as a lost writeback leaves it); a new gateway starts on the store and must serve
every acknowledged write again, and no deleted one."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from pathlib import Path

import aiohttp
import psutil

from tests.support.gateway_process import GatewayProcess

PREFIX = "/api/v1/files/runs"


def _config(base: Path) -> dict[str, object]:
    return {
        "storage": {"type": "local", "local": {"base-path": str(base)}},
        "auth": {"enabled": False},
    }


async def _exercise(url: str) -> dict[str, bytes | None]:
    """Upload, overwrite and delete small objects; return what each key must hold."""
    expected: dict[str, bytes | None] = {}
    async with aiohttp.ClientSession() as session:

        async def put(name: str, data: bytes) -> None:
            async with session.put(f"{url}{PREFIX}/{name}", data=data) as response:
                assert response.status in (200, 201), await response.text()
            expected[name] = data

        async def delete(name: str) -> None:
            async with session.delete(f"{url}{PREFIX}/{name}") as response:
                assert response.status == 204, await response.text()
            expected[name] = None

        await put("first", b"makes the directory")
        await asyncio.gather(*(put(f"k{n}", secrets.token_bytes(4096)) for n in range(120)))
        await asyncio.gather(*(put(f"k{n}", secrets.token_bytes(3000)) for n in range(0, 120, 2)))
        await asyncio.gather(*(delete(f"k{n}") for n in range(0, 120, 5)))
        await asyncio.gather(*(put(f"k{n}", b"after its delete") for n in range(0, 120, 15)))
    return expected


def _kill(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    parent = psutil.Process(gateway.process.pid)
    for process in [*parent.children(recursive=True), parent]:
        process.send_signal(signal.SIGKILL)
    gateway.process.wait(10)


async def _read_all(url: str, names: list[str]) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    async with aiohttp.ClientSession() as session:
        for name in names:
            async with session.get(f"{url}{PREFIX}/{name}") as response:
                assert response.status in (200, 404), await response.text()
                found[name] = await response.read() if response.status == 200 else None
    return found


def test_a_gateway_killed_by_a_crash_serves_every_acknowledged_small_write_again(
    tmp_path: Path,
) -> None:
    base = tmp_path / "data"
    gateway = GatewayProcess(_config(base), args=["--workers", "2"])
    url = gateway.start()
    try:
        expected = asyncio.run(_exercise(url))
    finally:
        _kill(gateway)
        gateway.stop()
    tmp = base / ".gateway" / "tmp"
    folders = [p for p in tmp.iterdir() if p.is_dir()]
    journals = [j for folder in folders for j in folder.glob("journal-*")]
    assert journals, "the workers journaled their small writes"
    for folder in folders:
        (folder / "lock").write_text("an-earlier-boot")  # the machine restarted since
    damaged = 0
    for name, data in expected.items():
        path = base / "runs" / name
        if data is not None and name != "first":  # (its write was flushed: no record)
            with path.open("r+b") as file:
                file.truncate(0)  # its body never reached the disk
            os.setxattr(path, "user.gateway", b'{"content_type":"text/x-stale"}')
            damaged += 1
    assert damaged > 60
    with GatewayProcess(_config(base)) as after:
        assert after.url is not None
        found = asyncio.run(_read_all(after.url, sorted(expected)))
        assert found == expected
        assert "replayed the journals of 2 process(es)" in after.log_text()
    assert not any(tmp.glob("*/journal-*"))  # spent, removed
