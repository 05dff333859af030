"""Durable 4 KiB writes, three ways, with a rest before each: is it the file-system work or the
disk's flush rate that bounds small uploads?

- ``plain``: write, fsync, rename and fsync of the directory, all in one directory (the
  ``durable`` peer of ``bench.compare``);
- ``gateway``: the local backend's exact sequence: the key's directories walked with
  ``O_NOFOLLOW`` (three times), a temporary file in a folder of its own, ``setxattr``,
  ``fsync``, a cross-directory rename, ``fsync`` of the destination directory;
- ``tmpfile``: an unnamed ``O_TMPFILE`` in the destination directory, given its name with
  ``linkat`` (or a same-directory rename over an existing object);
- ``spare``: the local backend's sequence since it keeps replaced files: the body written over
  a spare (a file an earlier write replaced), ``fsync``, ``renameat2(RENAME_EXCHANGE)`` with
  the object, ``fsync`` of the directory; the replaced file becomes the next spare. No inode
  or block is freed or allocated once every key exists.

Each writer overwrites ``--keys`` keys per thread in turn: with fewer keys than writes, most
writes replace an object, which is where the sequences differ (on ext4 without a journal,
freeing an inode and its blocks and allocating new ones cost more than the flushes).

Each runs ``--threads`` threads for ``--seconds``, after ``--rest`` seconds of quiet, in
``--rounds`` rounds whose order rotates (a throttled virtual disk gives a burst to whichever
writer follows a pause). Prints ops/s per round and the median of each.

    python -m bench.fs_writes --dir /path/on/the/disk [--rounds 3] [--seconds 4] [--rest 8]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

PAYLOAD = b"d" * 4096
AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def _linkat(fd: int, dir_fd: int, name: str) -> None:
    if _libc.linkat(fd, b"", dir_fd, name.encode(), AT_EMPTY_PATH) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), name)


_RENAME_EXCHANGE = 2


class Writers:
    def __init__(self, base: Path, keys: int = 1000) -> None:
        self.base = base
        self.keys = keys
        self.spares: dict[int, list[str]] = {}
        for folder in ("tmp", "obj/a/b"):
            (base / folder).mkdir(parents=True, exist_ok=True)

    def _walk(self, parts: list[str]) -> int:
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)
        for part in parts:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd

    def plain(self, thread: int, number: int) -> None:
        folder = self.base / "obj/a/b"
        temp = folder / f"t{thread}-{number}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, PAYLOAD)
        os.fsync(fd)
        os.close(fd)
        os.rename(temp, folder / f"p{thread}-{number % self.keys}")
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(directory)
        os.close(directory)

    def gateway(self, thread: int, number: int) -> None:
        name = f"g{thread}-{number % self.keys}"
        check = self._walk(["obj", "a", "b"])
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=check, follow_symlinks=False)
        os.close(check)
        tmp = self._walk(["tmp"])
        temp = secrets.token_hex(16) + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(temp, flags, 0o666, dir_fd=tmp)
        os.writev(fd, [PAYLOAD])
        os.setxattr(fd, "user.bench", b'{"c":"x"}')
        os.fsync(fd)
        parent = self._walk(["obj", "a", "b"])
        os.rename(temp, name, src_dir_fd=tmp, dst_dir_fd=parent)
        os.fstat(fd)
        os.fsync(parent)
        for descriptor in (fd, tmp, parent):
            os.close(descriptor)

    def tmpfile(self, thread: int, number: int) -> None:
        name = f"f{thread}-{number % self.keys}"
        parent = self._walk(["obj", "a", "b"])
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
            exists = True
        except FileNotFoundError:
            exists = False
        fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o666, dir_fd=parent)
        os.writev(fd, [PAYLOAD])
        os.setxattr(fd, "user.bench", b'{"c":"x"}')
        os.fsync(fd)
        if exists:
            temp = f".bench-{secrets.token_hex(8)}"
            _linkat(fd, parent, temp)
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        else:
            _linkat(fd, parent, name)
        os.fsync(parent)
        os.close(fd)
        os.close(parent)

    def spare(self, thread: int, number: int) -> None:
        name = f"s{thread}-{number % self.keys}"
        spares = self.spares.setdefault(thread, [])
        tmp = self._walk(["tmp"])
        if spares:
            temp = spares.pop()
            fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp)
        else:
            temp = secrets.token_hex(16) + ".tmp"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(temp, flags, 0o666, dir_fd=tmp)
        os.pwrite(fd, PAYLOAD, 0)
        os.setxattr(fd, "user.bench", b'{"c":"x"}')
        os.fsync(fd)
        parent = self._walk(["obj", "a", "b"])
        src, dst = temp.encode(), name.encode()
        if _libc.renameat2(tmp, src, parent, dst, _RENAME_EXCHANGE) == 0:
            spares.append(temp)  # the replaced file, now under the temporary name
        else:
            os.rename(temp, name, src_dir_fd=tmp, dst_dir_fd=parent)
        os.fsync(parent)
        for descriptor in (fd, tmp, parent):
            os.close(descriptor)


def rate(write: Callable[[int, int], None], threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(thread: int) -> None:
        number = 0
        while time.monotonic() < stop:
            write(thread, number)
            number += 1
        counts[thread] = number

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="a scratch folder on the disk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rest", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--keys", type=int, default=100, help="keys per thread (overwritten)")
    args = parser.parse_args()
    base = args.dir / "fs-writes"
    shutil.rmtree(base, ignore_errors=True)
    writers = Writers(base, args.keys)
    names = ["plain", "gateway", "tmpfile", "spare"]
    results: dict[str, list[float]] = {name: [] for name in names}
    try:
        for number in range(args.rounds):
            order = names[number % len(names) :] + names[: number % len(names)]
            for name in order:
                time.sleep(args.rest)
                ops = rate(getattr(writers, name), args.threads, args.seconds)
                results[name].append(ops)
                print(f"round {number + 1}: {name:8} {ops:8,.0f} ops/s", flush=True)
        for name in names:
            print(f"median   {name:8} {statistics.median(results[name]):8,.0f} ops/s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
