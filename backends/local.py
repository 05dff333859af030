"""A backend over a directory of the local file system.

The object at key ``tenants/acme/a/b.csv`` is the plain file ``<base>/tenants/acme/a/b.csv``;
directories are real directories. Its content type and user metadata are one extended
attribute (``user.gateway``, compact JSON) of the file itself, so they appear, move and vanish
with it.

Writes land in a temporary file under ``<base>/.gateway/tmp/<process>/``, are fsynced, get
their metadata, and are renamed into place (then the directory is fsynced): a reader sees the
old object or the whole new one. On a disk, small writes are made durable by the process's
journal instead of those two flushes (``backends._journal``): many writes share one. On a
local disk, the file a small object replaces is kept as a spare and becomes a later write's
temporary file (see ``_Spares``). Each backend instance holds an ``flock`` on its own
temporary folder; a crash leaves at most temporary files in a folder nobody holds, and
``start`` removes those folders, and only those, so several processes can share one base
path.

Symbolic links are never followed (rule 8 of ``gateway.keys``). Every path is opened one
segment at a time from a descriptor of the base directory with ``O_NOFOLLOW``, and every
change is made relative to a directory descriptor, so a link planted, or swapped in midway,
cannot lead outside the base: the operation fails with ``PermissionError(ELOOP)`` instead,
and listings skip links altogether.

Blocking calls run in worker threads, a megabyte at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import operator
import os
import secrets
import signal
import stat
import sys
import threading
import time
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar, cast

from . import _journal, _uring
from ._metadata import normalise_metadata
from .base import (
    DIRECTORY,
    EMPTY_METADATA,
    FILE,
    SYSTEM_PREFIX,
    Appendable,
    Backend,
    Info,
    Page,
    Reader,
    SocketBody,
    close_when_idle,
    same_version,
)

_T = TypeVar("_T")

CHUNK_SIZE: Final = 1024 * 1024
"""Writes are buffered, and reads are cut, to this size: one thread hop per megabyte."""
_IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
SPLICE_SLICE: Final = 16 * CHUNK_SIZE
"""Bytes one worker-thread call moves at most from a socket before it hands back."""
WHOLE_READ_MAX: Final = 64 * 1024
"""Files up to this size are read whole when opened (one trip to a worker thread in all)."""
SMALL_WRITE_MAX: Final = 64 * 1024
"""Bodies up to this size have the checks at their key made on the event loop (``write``)."""
PIPE_SIZE: Final = CHUNK_SIZE
"""Capacity asked for the pipe between a socket and a file (``F_SETPIPE_SZ``)."""
LOCAL_FILE_SYSTEMS: Final = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "bcachefs"}
)
"""File systems on a local block device (or in memory): opening a file there does not wait
on a network. On these, small reads and writes are served on the event loop when they can be
(see ``open_read`` and ``write``)."""
MEMORY_FILE_SYSTEMS: Final = frozenset({"tmpfs", "ramfs"})
"""File systems whose files live in memory: a read there never waits for a disk."""

TMP_DIR: Final = f"{SYSTEM_PREFIX}/tmp"
"""Key of the directory of temporary files; no operation and no listing reaches into it."""

LOCK_NAME: Final = "lock"
"""In each process's temporary folder: the file it holds an ``flock`` on while it runs. It
holds the machine's boot id (``_boot_id``), which ``start`` compares when the folder is left
over."""

RESTARTED_SUFFIX: Final = ".restarted"
"""A left-over temporary folder of a process that ran before the machine restarted is kept,
renamed so, rather than removed (``LocalBackend._remove_leftovers``)."""

_BOOT_ID_FILE: Final = "/proc/sys/kernel/random/boot_id"

CHECKPOINT_NAME: Final = "checkpoint"
"""In ``TMP_DIR``: ``<boot id> <stamp>``, every change made before that moment of that boot is
durable. Written (under the lock of ``TMP_DIR``) by a process that ran ``syncfs`` before
removing a journal (its own at shutdown, a dead process's, or spent ones after a replay): the
records it removed may be the ones that supersede other journals' older records, so a replay
ignores every record older than it (``_journal``)."""

log = logging.getLogger(__name__)

XATTR: Final = "user.gateway"
"""The extended attribute that holds an object's content type and user metadata."""
_XATTR_NAME: Final = XATTR.encode() + b"\0"  # for io_uring: a C string

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone planted must not hang a worker thread.
_ENTRY_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_XATTR: Final = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})

_RENAME_NOREPLACE: Final = 1  # linux/fs.h
_RENAME_EXCHANGE: Final = 2

SPARES_MAX: Final = 4096
"""Files of replaced small objects a backend instance keeps for later writes, at most."""
SPARE_MIN_AGE: Final = 0.2
"""Seconds a replaced file stays a spare, out of every key, before a write may reuse it.

Writes that find no spare old enough make a new file, and on ext4 without a journal a new
inode costs about as much as the rest of a small upload (see ``_Spares``): under a steady
stream of overwrites, about ``SPARE_MIN_AGE`` seconds' worth of writes make new files before
the first spares are ready. (A fresh gateway's first 6 s of 4 KiB PUTs, new keys and then
overwrites: 1,283-1,500 us of CPU per request at 0.2, 1,526-1,873 at 1.0; three alternating
pairs.) Long enough still for any ``open`` that found the file at its key to have completed,
and for the ring's ``_MTIME_MARGIN_NS``."""
SPARE_SUFFIX: Final = ".spare"
"""Spares' names end so in a process's temporary folder; temporary files' in ``.tmp``."""
_NO_LEASE: Final = frozenset({errno.EAGAIN, errno.EBUSY})  # open elsewhere: not "unsupported"


# -- keys and errors ---------------------------------------------------------------------------


def _split(key: str) -> list[str]:
    """Given a key, return its segments; raise unless it is well formed and outside ``TMP_DIR``.

    The gateway never passes a malformed key; refusing one here as well means a bug there can
    never turn ``..`` into a path outside the base.
    """
    segments = key.split("/")
    if not key or "\0" in key or any(seg in ("", ".", "..") for seg in segments):
        raise ValueError(f"invalid key {key!r}")
    if key == TMP_DIR or key.startswith(f"{TMP_DIR}/"):
        raise PermissionError(errno.EACCES, "reserved for the local backend", key)
    return segments


def _boot_id() -> str:
    """This boot of the machine (Linux), or "" where it cannot be told."""
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as file:
            return file.read().strip()
    except (OSError, ValueError):
        return ""


def _left_this_boot(folder: int, boot: str) -> bool:
    """Given the temporary folder of a process that is gone, say whether that process ran
    during this boot (its lock file names it). True where boots cannot be told apart, or the
    folder never got its lock file (it holds nothing else then); False for an older boot's,
    or an unreadable one's (the boot id may not have reached the disk)."""
    if not boot:
        return True
    written = _folder_boot(folder)
    return written is None or written == boot


def _read_note(folder: int, name: str) -> str | None:
    """The text of the small bookkeeping file ``name`` in ``folder`` (a lock file, the
    checkpoint); None if there is none."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def _folder_boot(folder: int) -> str | None:
    """The boot id a temporary folder's lock file holds; None without a lock file."""
    return _read_note(folder, LOCK_NAME)


def _read_checkpoint(tmp: int) -> tuple[str, int]:
    """The boot id and stamp of ``CHECKPOINT_NAME`` in ``tmp``; ("", 0) if there is none."""
    try:
        boot, stamp = (_read_note(tmp, CHECKPOINT_NAME) or "").split()
        return boot, int(stamp)
    except (OSError, ValueError):
        return "", 0


def _write_checkpoint(tmp: int, boot: str, stamp: int) -> None:
    """Durably record in ``tmp`` that every change of boot ``boot`` made before ``stamp`` is
    durable (``CHECKPOINT_NAME``), unless it says so of a later moment already. The caller
    holds the lock of ``tmp``."""
    known_boot, known = _read_checkpoint(tmp)
    if known_boot == boot and known >= stamp:
        return
    name = f"{CHECKPOINT_NAME}.new"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=tmp)  # fmt: skip
    try:
        os.write(fd, f"{boot} {stamp}".encode("ascii", "replace"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(name, CHECKPOINT_NAME, src_dir_fd=tmp, dst_dir_fd=tmp)
    os.fsync(tmp)


def _held_by_a_live_process(folder: int) -> bool:
    """Given a temporary folder, say whether a running process holds its lock."""
    try:
        lock = os.open(LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return False  # a folder being made (".new") or left half-made by a crash
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(lock)
    return False


def _symlink_error(key: str) -> PermissionError:
    return PermissionError(errno.ELOOP, "symbolic links are not followed", key)


def _not_found(key: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "no such object or directory", key)


def _file_system_type(fd: int) -> str | None:
    """Given a descriptor, return the type of the file system it is on (from the mount table),
    or ``None`` if it cannot be told."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) > 2 and parts[2] == device and rest:
                    return rest.split()[0]
    except OSError:
        return None
    return None


def _honours_nowait(tmp: int) -> bool:
    """Given the gateway's temporary folder, return whether its file system serves cached
    bytes to a read with ``RWF_NOWAIT`` (and refuses only reads that would wait)."""
    name = f"probe-{secrets.token_hex(8)}.tmp"
    fd = os.open(name, (_TEMP_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o600, dir_fd=tmp)
    try:
        os.write(fd, b"p")
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return False  # the byte was just written, so cached: refused, not honoured
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=tmp)


class _WouldBlock(Exception):
    """A read on the event loop would have waited for the disk: do it in a thread."""


def _is_symlink(dir_fd: int, name: str) -> bool:
    """Given a directory and a name in it, return whether the name is a symbolic link."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_child_dir(dir_fd: int, name: str, key: str) -> int:
    """Given a directory and a name in it, return a descriptor of that subdirectory.

    Raises ``PermissionError(ELOOP)`` for a symbolic link, ``NotADirectoryError`` for a file.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:
        # Linux answers ENOTDIR, not ELOOP, to O_DIRECTORY | O_NOFOLLOW on a link.
        if _is_symlink(dir_fd, name):
            raise _symlink_error(key) from None
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", key) from None
    except FileNotFoundError:
        raise _not_found(key) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(key) from None
        raise


# -- metadata and infos ------------------------------------------------------------------------


_OPEN_ATTEMPTS: Final = 100


def _open_in(parent: int, name: str, key: str) -> tuple[int, os.stat_result]:
    """Given a directory and a name in it, return a descriptor of the file or directory there
    and its status."""
    try:
        fd = os.open(name, _ENTRY_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise _not_found(key) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(key) from None
        if exc.errno == errno.ENXIO:  # a socket: not an object
            raise _not_found(key) from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _not_found(key)  # FIFOs and devices are not objects
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _still_at(parent: int, name: str, st: os.stat_result) -> bool:
    """Whether the file of status ``st`` is (still) the entry ``name`` of ``parent``."""
    try:
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _encode_xattr(content_type: str | None, metadata: Mapping[str, str]) -> bytes | None:
    """Given what a write records, return the attribute value (``None``: nothing to record)."""
    if not metadata:
        return _type_xattr(content_type)
    value = {"content_type": content_type, "metadata": dict(metadata)}
    return _encode_json(value).encode()


@functools.lru_cache(maxsize=256)
def _type_xattr(content_type: str | None) -> bytes | None:
    """``_encode_xattr`` of a content type and no metadata (most writes: worth keeping)."""
    if content_type is None:
        return None
    return _encode_json({"content_type": content_type, "metadata": {}}).encode()


_encode_json: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_NO_TYPE_XATTR: Final = _encode_json({"content_type": None, "metadata": {}}).encode()
# How long ago a spare's earlier object must have been written for a write over it by the
# ring (which sets no explicit time) to be sure of a later modification time: many ticks of
# the kernel's coarse clock. Spares wait SPARE_MIN_AGE anyway.
_MTIME_MARGIN_NS: Final = 100_000_000


def _read_xattr(fd: int) -> tuple[str | None, Mapping[str, str]]:
    """Given an open file, return its content type and user metadata (none if unrecorded)."""
    try:
        raw = os.getxattr(fd, XATTR)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return None, EMPTY_METADATA
        raise
    try:
        value = json.loads(raw)
        content_type = value.get("content_type")
        metadata = value.get("metadata") or {}
    except (ValueError, AttributeError):
        # Not written by this backend: the object stays readable, without metadata.
        return None, EMPTY_METADATA
    if not isinstance(content_type, str):
        content_type = None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        metadata = {}
    return content_type, MappingProxyType(metadata) if metadata else EMPTY_METADATA


def _etag(st: os.stat_result) -> str:
    """Given a file's status, return a validator that changes with each write, without hashing.

    Every write renames another inode into place, so the inode number changes; when it is one
    used before (the file system reused it, or a spare), its modification time is later.
    """
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _file_info(
    key: str,
    st: os.stat_result,
    content_type: str | None = None,
    metadata: Mapping[str, str] = EMPTY_METADATA,
) -> Info:
    return Info(
        name=key,
        type=FILE,
        size=st.st_size,
        mtime=st.st_mtime,
        ctime=getattr(st, "st_birthtime", st.st_mtime),
        etag=_etag(st),
        content_type=content_type,
        metadata=metadata,
    )


def _dir_info(key: str, st: os.stat_result) -> Info:
    return Info(name=key, type=DIRECTORY, mtime=st.st_mtime, ctime=st.st_mtime)


# -- renames that never replace ----------------------------------------------------------------


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    path, fd = ctypes.c_char_p, ctypes.c_int
    function.argtypes = [fd, path, fd, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2: Final = _load_renameat2()


def _rename_noreplace(
    src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, key: str, is_dir: bool
) -> None:
    """Given two (directory, name) pairs, rename the first to the second unless it exists.

    Race-free through ``renameat2(RENAME_NOREPLACE)``; where the file system or the C library
    lacks it, a file is linked then unlinked (also race-free) and a directory is checked then
    renamed (a narrow race, on such file systems only).

    Raises
    ------
    FileExistsError
        Something is at the destination.
    """
    if _renameat2 is not None:
        flags = _RENAME_NOREPLACE
        result = _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), key)
    if not is_dir:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
        os.unlink(src, dir_fd=src_dir_fd)
        return
    try:
        os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, "destination exists", key)


# -- one-call directory lookups ----------------------------------------------------------------


_SYS_OPENAT2: Final = 437  # the same number on every Linux architecture (since 5.6)
_RESOLVE_NO_SYMLINKS: Final = 0x04  # linux/openat2.h
_RESOLVE_BENEATH: Final = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_openat2() -> Callable[[int, bytes], int] | None:
    """``openat2(dir_fd, path)`` of a directory below ``dir_fd`` with no symbolic link on the
    way (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``): the whole ``O_NOFOLLOW`` walk in one
    system call. Returns the descriptor, or -1 with ``ctypes.get_errno()`` set."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    # No O_NOFOLLOW: a link as the last segment must fail as any other does (ELOOP), not
    # with the ENOTDIR that O_DIRECTORY | O_NOFOLLOW gives.
    how = _OpenHow(_DIR_FLAGS & ~os.O_NOFOLLOW, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
    how_ref, how_size = ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))
    number = ctypes.c_long(_SYS_OPENAT2)

    def openat2(dir_fd: int, path: bytes) -> int:
        # Variadic: every integer goes as a long, as syscall(2) reads them.
        return int(syscall(number, ctypes.c_long(dir_fd), path, how_ref, how_size))

    return openat2


_openat2: Final = _load_openat2()


def _open_beneath(base: int, segments: list[str], key: str) -> int | None:
    """Given the base directory and directory segments below it, return a descriptor of that
    directory, opened in one call; None if that call cannot be used here (the caller walks).

    Raises as ``_open_child_dir`` does, and ``FileNotFoundError`` for a missing segment.
    """
    if _openat2 is None:
        return None
    fd = _openat2(base, os.fsencode("/".join(segments)) if segments else b".")
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        raise _not_found(key)
    if code == errno.ENOTDIR:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", key)
    if code == errno.ELOOP:
        raise _symlink_error(key)
    if code == errno.EXDEV:  # ".." out of the base: keys have none, but never follow one
        raise PermissionError(errno.EXDEV, "outside the base directory", key)
    if code in (errno.ENOSYS, errno.EPERM, errno.EAGAIN, errno.EINVAL):
        return None  # an older kernel, a filter that forbids it, or a rename to retry
    raise OSError(code, os.strerror(code), key)


# -- reading -----------------------------------------------------------------------------------


class LocalReader(Reader):
    """An open file: ``info`` comes from ``fstat`` of the same descriptor the bytes come from,
    so both are of one version even if a write renames a new file over the key meanwhile."""

    def __init__(self, fd: int, info: Info) -> None:
        self.fd = fd
        self.info = info
        # A read in a worker thread may outlive a cancelled task: the lock keeps close() from
        # releasing the descriptor under it.
        self._lock = threading.Lock()
        self._closed = False

    def _pread(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed reader")
            return os.pread(self.fd, size, offset)

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        stop = self.info.size if end is None else end
        offset = start
        while offset < stop:
            data = await asyncio.to_thread(self._pread, min(CHUNK_SIZE, stop - offset), offset)
            if not data:
                raise OSError(errno.EIO, "the file is shorter than its size", self.info.name)
            offset += len(data)
            yield data

    def fileno(self) -> int | None:
        with self._lock:
            if self._closed:
                raise ValueError("fileno of a closed reader")
            return self.fd

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def _close(self) -> None:
        with self._lock:
            self._close_locked()

    async def close(self) -> None:
        await close_when_idle(self._lock, self._close_locked)

    def __del__(self) -> None:
        # A reader dropped without close() must not leak its descriptor.
        if not getattr(self, "_closed", True):
            self._close()


def _read_whole(fd: int, size: int, nowait: bool) -> bytes:
    """Read ``size`` bytes from the start of ``fd``; with ``nowait``, only from the page cache
    (raise ``_WouldBlock`` if any of it would have to come from the disk)."""
    if not nowait or size == 0:
        return os.pread(fd, size, 0)
    buffer = bytearray(size)
    try:
        count = os.preadv(fd, [buffer], 0, os.RWF_NOWAIT)
    except (BlockingIOError, OSError) as exc:
        if isinstance(exc, BlockingIOError) or exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            raise _WouldBlock from None
        raise
    if count != size:  # partly cached (or shorter than its size: the thread says which)
        raise _WouldBlock
    return bytes(buffer)


class _Flag:
    """Set once, by the event loop, and read by a worker thread (no lock needed: one store)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _ReplacedSize:
    """Where a write's checks leave the size of the file at its key (None: no file)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size: int | None = None


class _WriteCancelled(Exception):
    """The task of a write in a worker thread was cancelled before the write committed."""


class _WholeReader(Reader):
    """A small file read whole when it was opened: serving it needs no more system calls."""

    def __init__(self, data: bytes, info: Info) -> None:
        self.data = data
        self.info = info

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        yield self.data[start:end]

    async def close(self) -> None:
        pass


# -- writing -----------------------------------------------------------------------------------


class _TempFile:
    """A temporary file under ``TMP_DIR`` that becomes an object or disappears.

    ``discard`` may run at any moment (the writing task was cancelled, the upload failed): it
    waits for a write already running in a worker thread, then closes and removes the file.
    """

    def __init__(
        self, dir_fd: int, name: str, fd: int, stale: os.stat_result | None = None
    ) -> None:
        self._dir_fd = dir_fd
        self._name = name
        self._fd = fd
        self._size = 0
        # A spare (``_Spares``): the status of the earlier object still in the file, whose
        # tail and attribute go when the file is sealed. None for a new file.
        self._stale = stale
        # The file this one replaced (``install``), for ``settle`` to keep or remove.
        self._replaced: tuple[str, os.stat_result] | None = None
        # For a body spliced from a socket: the socket, then the pipe's read and write ends.
        self._source: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._finished = False  # installed or discarded: no more calls

    def _check(self) -> None:
        if self._finished:
            raise ValueError("temporary file already installed or discarded")

    def append(self, chunks: list[bytes], *, writeback: bool = True) -> None:
        with self._lock:
            self._check()
            views = [memoryview(chunk) for chunk in chunks if chunk]
            start = self._size
            self._size += sum(len(view) for view in views)
            while views:
                written = os.writev(self._fd, views[:_IOV_MAX])
                # A short write: drop what went out, keep the rest in order.
                while written:
                    if written >= len(views[0]):
                        written -= len(views.pop(0))
                    else:
                        views[0] = views[0][written:]
                        written = 0
            # Start writing these pages to the disk now, while the next batch arrives, so
            # the fsync at the end waits for the last batch rather than the whole object.
            if writeback:
                _start_writeback(self._fd, start, self._size - start)

    def attach_source(self, sock: int) -> None:
        """Take ownership of the socket ``sock`` (closed with this file) and make the pipe
        ``splice`` moves its bytes through."""
        with self._lock:
            try:
                self._check()
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
            except BaseException:
                os.close(sock)
                raise
            self._source = (sock, read_end, write_end)
            with contextlib.suppress(OSError):  # a smaller pipe only means more system calls
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def splice(self, want: int) -> int:
        """Move up to ``want`` bytes from the attached socket to the file; return how many.

        Stops early when the socket has nothing more for now; raises ``EOFError`` if the
        connection ended.
        """
        with self._lock:
            self._check()
            assert self._source is not None
            sock, read_end, write_end = self._source
            start = self._size
            moved = 0
            while moved < want:
                try:
                    count = os.splice(
                        sock, write_end, min(want - moved, PIPE_SIZE),
                        flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                    )  # fmt: skip
                except BlockingIOError:
                    break
                if count == 0:
                    raise EOFError("the connection closed before the end of the body")
                moved += count
                while count:  # empty the pipe into the file
                    count -= os.splice(read_end, self._fd, count, flags=os.SPLICE_F_MOVE)
            self._size += moved
            _start_writeback(self._fd, start, moved)
            return moved

    def _close_source(self) -> None:
        if self._source is not None:
            for fd in self._source:
                os.close(fd)
            self._source = None

    def seal(self, xattr: bytes | None) -> None:
        """Record the metadata and make the content durable, before the file gets its name."""
        with self._lock:
            self._check()
            stale = self._stale
            if stale is not None:  # a spare: nothing of the earlier object may remain
                if stale.st_size > self._size:
                    os.ftruncate(self._fd, self._size)
                if xattr is None:
                    with contextlib.suppress(OSError):  # ENODATA: it had none
                        os.removexattr(self._fd, XATTR)
                # A new modification time, later than the earlier object's even for an empty
                # body (no write) or a clock set back: with the inode, it makes the ETag.
                moment = max(time.time_ns(), stale.st_mtime_ns + 1)
                os.utime(self._fd, ns=(moment, moment))
            if xattr is not None:
                os.setxattr(self._fd, XATTR, xattr)
            os.fsync(self._fd)

    def flush(self) -> None:
        """``fsync`` the body sealed without one (``ring_seal(sync=False)``)."""
        with self._lock:
            self._check()
            os.fsync(self._fd)

    def ring_seal(
        self, data: list[bytes], xattr: bytes | None, sync: bool = True
    ) -> list[_uring.Op] | None:
        """``append(data)`` and ``seal(xattr)`` of a small body as io_uring operations, for
        ``sealed_by_ring`` to check; None where only ``seal`` can do it. Over a spare, that
        is an empty body, or an earlier object modified less than ``_MTIME_MARGIN_NS`` ago
        (or later: a clock set back): the write sets the modification time from the
        kernel's clock, a little coarse, and it must come out later than the earlier
        object's, or the ETag could come back. The descriptor stays open until the chain
        has run. Without ``sync``, no ``fsync``: the journal makes the body durable."""
        stale = self._stale
        body = b"".join(data)
        if stale is not None and (
            not body or time.time_ns() - stale.st_mtime_ns < _MTIME_MARGIN_NS
        ):
            return None
        self._check()
        ops = [_uring.write(self._fd, body)] if body else []
        if stale is not None and stale.st_size > len(body):
            ops.append(_uring.ftruncate(self._fd, len(body)))
        if stale is not None or xattr is not None:
            # Replaced, never removed (io_uring has no such operation): an attribute of no
            # content type and no metadata reads back as none.
            value = _NO_TYPE_XATTR if xattr is None else xattr
            ops.append(_uring.fsetxattr(self._fd, _XATTR_NAME, value))
        if sync:
            ops.append(_uring.fsync(self._fd))
        return ops or None  # an empty chain would never complete

    def sealed_by_ring(self, ops: list[_uring.Op], results: list[int]) -> bool:
        """Whether the operations of ``ring_seal`` all succeeded (the file then holds the
        body, sealed). If not, ``append`` and ``seal`` are to be made again, in a thread
        (the ring's write left the file offset at 0): they raise what fails."""
        size = 0
        for op, result in zip(ops, results, strict=True):
            expected = op.length if op.opcode == _uring.OP_WRITE else 0
            if result != expected:
                return False
            size += expected
        self._size = size
        return True

    def install(
        self,
        parent_fd: int,
        name: str,
        key: str,
        exclusive: bool,
        spares: _Spares | None = None,
        there: bool | None = None,
    ) -> os.stat_result:
        """Give the file the name ``name`` in ``parent_fd``; return its status. ``settle``
        must follow. With ``spares``, a file it replaces is kept there rather than dropped by
        the rename (or left for ``settle`` to remove). ``there``: False if the checks found
        nothing at the name (no exchange is tried: a plain rename; None: not looked)."""
        with self._lock:
            self._check()
            if exclusive:
                _rename_noreplace(self._dir_fd, self._name, parent_fd, name, key, is_dir=False)
            else:
                replaced = None
                if spares is not None and there is not False:
                    replaced = spares.exchange(self._dir_fd, self._name, parent_fd, name)
                if replaced is None:
                    os.rename(self._name, name, src_dir_fd=self._dir_fd, dst_dir_fd=parent_fd)
                else:
                    self._replaced = (self._name, replaced)
            self._finished = True
            try:
                return os.fstat(self._fd)
            finally:
                self._close_source()
                os.close(self._fd)

    def settle(self, parent_fd: int, spares: _Spares | None = None) -> None:
        """After ``install``: make the name durable (``fsync`` of its directory); then, and
        only then, keep the file it replaced as a spare, or remove it; close the temporary
        folder. (Were the replaced file reused before the directory is durable, a crash
        could leave the key naming it, with another object's bytes in it.)"""
        try:
            os.fsync(parent_fd)
            self.keep_replaced(spares)
        finally:
            os.close(self._dir_fd)

    def replaced_small(self) -> bool:
        """Whether ``keep_replaced`` frees no more than a small file (the event loop may)."""
        return self._replaced is None or self._replaced[1].st_size <= SMALL_WRITE_MAX

    def keep_replaced(self, spares: _Spares | None) -> None:
        """The end of ``settle``, after the directory's ``fsync``: keep the replaced file as
        a spare, or remove it. (The temporary folder stays open.)"""
        if self._replaced is not None:
            name, st = self._replaced
            if spares is None or not spares.keep(self._dir_fd, name, st):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._dir_fd)

    def close_folder(self) -> None:
        os.close(self._dir_fd)

    def discard(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            try:
                self._close_source()
                os.close(self._fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._name, dir_fd=self._dir_fd)
            finally:
                os.close(self._dir_fd)


def _reusable(st: os.stat_result) -> bool:
    """Whether a file of status ``st`` may be written over: a regular file with one link (a
    hard link elsewhere would see the new bytes)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


class _Spares:
    """Files of replaced small objects, kept to become the temporary files of later writes.

    Replacing an object by a rename frees the old file's inode and blocks, and the next write
    allocates new ones. On ext4 without a journal (this project's test machine) that is most
    of a small upload's cost: the inode allocator skips, one by one, every inode freed in the
    last minute, and with ``discard`` each freed block is trimmed on the spot. So a write that
    replaces an object exchanges the two files (``renameat2(RENAME_EXCHANGE)``): the old one
    lands under the temporary file's name, in this instance's own folder, and waits there.
    A later small write takes it, writes its body over the old bytes (no allocation), cuts
    what is left, replaces the attribute, and installs it the same way.

    A spare is reused only if nothing can still read the object it held:
    - it is a regular file with one link (a hard link elsewhere would see the new bytes);
    - it has been out of every key for ``SPARE_MIN_AGE``: an ``open`` that found it at its
      key just before it was replaced has long completed (and its next version cannot share
      its modification time, so ETags stay distinct);
    - no descriptor, in any process, has it open: the kernel grants a write lease only then
      (``F_SETLEASE``, dropped at once). The gateway's own readers also check, once they hold
      a descriptor, that the file is still the one at the key (``_open_entry``).
    A replaced file becomes a spare only once the exchange is durable (``settle``). Where
    exchange or leases are missing (other file systems), replaced files are removed; when the
    disk is full, spares are (``drop``).
    """

    def __init__(self) -> None:
        self._names: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()
        self.enabled = _renameat2 is not None

    def exchange(self, tmp: int, name: str, parent_fd: int, target: str) -> os.stat_result | None:
        """Install ``tmp/name`` as ``target`` in ``parent_fd`` by exchanging it with the file
        there, which lands under ``tmp/name``; return that file's status (for ``keep``, once
        the exchange is durable), or None if there was nothing to exchange with (or
        exchanges are unsupported), for the caller to rename."""
        if not self.enabled or _renameat2 is None:
            return None
        try:
            there = os.stat(target, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(there.st_mode):  # fail as the rename over it would have
            raise IsADirectoryError(errno.EISDIR, "is a directory", target)
        src, dst = os.fsencode(name), os.fsencode(target)
        if _renameat2(tmp, src, parent_fd, dst, _RENAME_EXCHANGE) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOSYS):
                self.enabled = False
            elif code != errno.ENOENT:
                raise OSError(code, os.strerror(code), target)
            return None
        st = os.stat(name, dir_fd=tmp, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            # A directory took the key's place since the look just above: put it back.
            if _renameat2(tmp, src, parent_fd, dst, _RENAME_EXCHANGE) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), target)
            raise IsADirectoryError(errno.EISDIR, "is a directory", target)
        return st

    def keep(self, tmp: int, name: str, st: os.stat_result) -> bool:
        """Keep ``tmp/name``, a replaced file of status ``st``, as a spare if it can be one
        and there is room; say if it was kept."""
        if not _reusable(st) or st.st_size > SMALL_WRITE_MAX:
            return False
        with self._lock:
            if len(self._names) >= SPARES_MAX:
                return False
        if not name.endswith(SPARE_SUFFIX):  # a spare's own name says what it is
            spare = name.removesuffix(".tmp") + SPARE_SUFFIX
            os.rename(name, spare, src_dir_fd=tmp, dst_dir_fd=tmp)
            name = spare
        with self._lock:
            self._names.append((time.monotonic(), name))
        return True

    def drop(self, tmp: int) -> None:
        """Remove every spare (the disk is full: they hold space)."""
        with self._lock:
            names = [name for _, name in self._names]
            self._names.clear()
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp)

    def ready(self) -> bool:
        """Whether a spare is there to take (no system call: a hint for ``take``)."""
        names = self._names
        return bool(names) and time.monotonic() - names[0][0] >= SPARE_MIN_AGE

    def take(self, tmp: int) -> _TempFile | None:
        """Given this instance's temporary folder (owned by the result), return a spare ready
        to be written over, or None (the caller keeps ``tmp``). Makes no call that waits for
        the disk: the event loop may call it. A spare open elsewhere waits its turn again."""
        with self._lock:
            if not self.ready():
                return None
            _, name = self._names.popleft()
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # e.g. out of descriptors: again later
                with self._lock:
                    self._names.append((time.monotonic(), name))
            return None
        try:
            st = os.fstat(fd)
            if _reusable(st) and self._unopened(fd):
                return _TempFile(tmp, name, fd, stale=st)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if self.enabled and _reusable(st):
            with self._lock:  # open elsewhere: again once SPARE_MIN_AGE has passed
                self._names.append((time.monotonic(), name))
        else:  # where leases are refused, spares end: a small file, freed at once
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp)
        return None

    def _unopened(self, fd: int) -> bool:
        """Whether ``fd`` is the only open descriptor of its file, in any process."""
        try:
            # Were an open to race with the lease, the kernel would signal its holder:
            # SIGURG, ignored by default, rather than SIGIO, which would end the process.
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            if exc.errno not in _NO_LEASE:
                self.enabled = False  # leases unsupported here (or not allowed)
            return False
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE: Final = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE: Final = 2  # <linux/fs.h>: start writeback, do not wait for it


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing a dirty range to the disk (Linux); a no-op elsewhere.

    Only a hint: durability still comes from the ``fsync`` before the file gets its name.
    """
    if _SYNC_FILE_RANGE is not None and size > 0:
        _SYNC_FILE_RANGE(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def _prepare(
    key: str, content_type: str | None, metadata: Mapping[str, str] | None
) -> tuple[list[str], Mapping[str, str], bytes | None]:
    """A write's key segments, checked metadata and extended attribute."""
    metadata = normalise_metadata(metadata)
    return _split(key), metadata, _encode_xattr(content_type, metadata)


async def _head(chunks: AsyncIterator[bytes], size: int) -> tuple[list[bytes], int, bool]:
    """Take chunks of ``chunks`` until they add up to ``size`` bytes or more, or it ends;
    return them, their size and whether ``chunks`` ended."""
    head: list[bytes] = []
    count = 0
    while count < size:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return head, count, True
        head.append(chunk)
        count += len(chunk)
    return head, count, False


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _fill(chunks: AsyncIterable[bytes], temp: _TempFile) -> list[bytes]:
    """Write ``chunks`` into ``temp``; return the last batch (under ``CHUNK_SIZE``) unwritten.

    Two stages: while a worker thread writes one batch of chunks (``writev``, no copy into a
    joined buffer), the event loop receives the next. At most one batch is in the thread and
    one is filling, so memory stays at about two ``CHUNK_SIZE``.
    """
    pending: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= CHUNK_SIZE:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(temp.append, batch))
                batch, size = [], 0
        if pending is not None:
            await pending
    except BaseException:
        if pending is not None:
            pending.add_done_callback(_retrieve)
        raise
    return batch


def _open_temp(tmp: int) -> _TempFile:
    """Given the temporary folder (closed with the file, or now on failure), open a new
    temporary file in it."""
    try:
        name = f"{secrets.token_hex(16)}.tmp"
        fd = os.open(name, _TEMP_FLAGS, 0o666, dir_fd=tmp)
    except BaseException:
        os.close(tmp)
        raise
    return _TempFile(tmp, name, fd)


def _fill_and_seal(temp: _TempFile, data: list[bytes], xattr: bytes | None) -> None:
    temp.append(data, writeback=False)  # the fsync follows at once
    temp.seal(xattr)


def _settle(temp: _TempFile, parent: int, spares: _Spares | None) -> None:
    try:
        temp.settle(parent, spares)
    finally:
        os.close(parent)


_Then = Callable[[Any], "asyncio.Future[Any] | None"]
"""Given what a change returned, the journal's record (or checkpoint) that must follow it."""


async def _to_the_end(
    function: Callable[..., _T],
    *args: Any,
    then: _Then | None = None,
    abandoned: Callable[[asyncio.Future[Any]], None] | None = None,
) -> _T:
    """Run ``function(*args)`` in a worker thread to its end, even if this task is cancelled
    meanwhile (what it does must not be left half done). ``then``: once it has succeeded,
    the journal's record that must follow (``LocalBackend._marks``), queued from the
    thread's completion, so that a cancelled task cannot skip it, and awaited here.
    ``abandoned``: what to do with the outcome once this task was cancelled."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    follows: list[asyncio.Future[Any]] = []
    if then is not None:
        future.add_done_callback(functools.partial(_follow, then, follows))
    try:
        result = await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(abandoned or _retrieve)
        raise
    try:
        for follow in follows:
            outcome = await asyncio.shield(follow)
            if isinstance(outcome, list):  # a record's (a checkpoint's is None)
                _journal.check(outcome)
    except BaseException:
        if abandoned is not None:
            abandoned(future)  # (e.g. the appendable's descriptor goes)
        raise
    return result


def _follow(then: _Then, follows: list[asyncio.Future[Any]], done: asyncio.Future[Any]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    try:
        follow = then(done.result())
    except Exception as exc:  # (an fstat): the change is not known to be recorded
        follow = asyncio.get_running_loop().create_future()
        follow.set_exception(exc)
    if follow is not None:
        follow.add_done_callback(_retrieve)  # seen, should this task be gone by then
        follows.append(follow)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the outcome of a write nobody awaits any more as seen (no "never retrieved")."""
    if not future.cancelled():
        future.exception()


def _settled_by_ring(
    temp: _TempFile,
    parent: int,
    spares: _Spares | None,
    settled: asyncio.Future[None],
    fsync: asyncio.Future[list[int]],
) -> None:
    """``_settle`` after the ring's ``fsync`` of the directory ``parent`` (or the journal's
    record of the write); its outcome goes to ``settled``. A replaced file larger than a small
    one is freed by a worker thread: the kernel drops its pages (200 ms for 1 GiB here)."""
    try:
        (result,) = fsync.result()
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        if not temp.replaced_small():
            freeing = asyncio.get_running_loop().run_in_executor(None, temp.keep_replaced, spares)
            freeing.add_done_callback(functools.partial(_freed, temp, parent, settled))
            return
        temp.keep_replaced(spares)  # a small file at most: no wait
    except Exception as exc:
        if not settled.done():
            settled.set_exception(exc)
    else:
        if not settled.done():
            settled.set_result(None)
    temp.close_folder()
    os.close(parent)


def _freed(
    temp: _TempFile, parent: int, settled: asyncio.Future[None], freeing: asyncio.Future[None]
) -> None:
    """The end of ``_settled_by_ring`` once a worker thread has freed a large replaced file."""
    try:
        if not settled.done():
            if freeing.cancelled():  # the executor went at shutdown: left for the next start
                settled.set_result(None)
            elif (error := freeing.exception()) is not None:
                settled.set_exception(error)
            else:
                settled.set_result(None)
    finally:
        temp.close_folder()
        os.close(parent)


def _inode(st: os.stat_result) -> int:
    return st.st_ino


def _no_inode(_: object) -> int:
    return 0


def _fsync_result(fd: int) -> list[int]:
    """``os.fsync(fd)`` as the ring reports it: ``[0]``, or ``[-errno]``."""
    try:
        os.fsync(fd)
    except OSError as exc:
        return [-(exc.errno or errno.EIO)]
    return [0]


class _DirectorySyncs:
    """Group commit of the directory ``fsync`` that ends a small write (``_write_small``).

    A rename is durable once an ``fsync`` of its directory that *started after it* has
    completed. While one runs for a directory, the renames made there meanwhile wait for the
    next one, started as soon as the running one ends: under load, one ``fsync`` per round
    for every write of the round, rather than one each. The ``fsync`` goes to the ring (a
    worker thread where it cannot take it).

    A round runs on the descriptor of its first write, which that write opened before its
    rename (it stays open until the round has ended). The kernel reports a writeback error
    once per open file, to an ``fsync`` on a file opened before the error: a descriptor kept
    from round to round could have had an error reported to the round before and miss it
    for the renames of the next; the first write's own does not (it was opened before any
    rename of its round). Directories are told apart by device and inode, which cannot be
    reused while a descriptor of the directory is open."""

    def __init__(self) -> None:
        self._running: dict[tuple[int, int], _DirectorySync] = {}

    def after(self, directory: int, ring: _uring.Ring) -> asyncio.Future[list[int]]:
        """Given the open descriptor of a directory in which a rename was just made (kept
        open by the caller until the future is done), a future of ``[result]`` (0, or
        ``-errno``) of an ``fsync`` of that directory that starts after this call, by
        ``ring`` (or a thread). The future is never cancelled."""
        st = os.fstat(directory)
        where = (st.st_dev, st.st_ino)
        sync = self._running.get(where)
        if sync is None:
            sync = self._running[where] = _DirectorySync(self._running, where)
        return sync.next_round(directory, ring)


class _DirectorySync:
    """The rounds of ``fsync`` of one directory (``_DirectorySyncs``): the one running, and
    the next, with the descriptor it will run on."""

    __slots__ = ("_next", "_next_fd", "_ring", "_running", "_syncs", "_where")

    def __init__(self, syncs: dict[tuple[int, int], _DirectorySync], where: tuple[int, int]):
        self._syncs = syncs
        self._where = where
        self._ring: _uring.Ring | None = None
        self._running = False
        self._next: asyncio.Future[list[int]] | None = None
        self._next_fd = -1

    def next_round(self, directory: int, ring: _uring.Ring) -> asyncio.Future[list[int]]:
        """The future of the next round (started now if none runs)."""
        self._ring = ring
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next_fd = directory
        future = self._next
        if not self._running:
            self._start()
        return future

    def _start(self) -> None:
        future, self._next = self._next, None
        assert future is not None
        fd, ring = self._next_fd, self._ring
        running: asyncio.Future[list[int]] | None = None
        try:
            if ring is not None and ring.usable(1):
                with contextlib.suppress(OSError):  # the kernel took none: a thread does it
                    running = ring.run([_uring.fsync(fd)])
            if running is None:
                running = asyncio.get_running_loop().run_in_executor(None, _fsync_result, fd)
        except Exception as exc:  # e.g. no executor any more: this round cannot run
            future.set_exception(exc)
            del self._syncs[self._where]
            return
        self._running = True
        running.add_done_callback(functools.partial(self._ended, future))

    def _ended(self, future: asyncio.Future[list[int]], running: asyncio.Future[list[int]]) -> None:
        if running.cancelled():  # a thread's queue dropped at shutdown: not known to be done
            future.set_result([-errno.ECANCELED])
        elif (error := running.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(running.result())
        self._running = False
        if self._next is not None:
            self._start()
        else:
            del self._syncs[self._where]


def _drop_opened(tmp: int, name: str, opening: asyncio.Future[list[int]]) -> None:
    """Once the ring's open of ``tmp/name`` for a cancelled write is done: undo it."""
    try:
        (fd,) = opening.result()
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=tmp)
    finally:
        os.close(tmp)


def _discard_when_opened(opening: asyncio.Future[_TempFile]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().discard()


# -- the backend -------------------------------------------------------------------------------


class _Appendable(Appendable):
    """A file that grows (``LocalBackend.create_appendable``). An append is a ``pwrite`` at
    its end and an ``fdatasync``, by the io_uring ring where there is one, else (or if the
    ring's attempt failed: written again at the same offset) in a worker thread: no new
    inode, no rename, no ``fsync`` of a directory, which are most of what a new small file
    costs."""

    def __init__(self, fd: int, ring: _uring.Ring | None) -> None:
        self.size = 0
        self._fd = fd
        self._ring = ring
        self._running: asyncio.Future[Any] | None = None  # the append in flight
        self._broken = False  # an append failed or was cancelled: the end is unknown
        self._closed = False

    async def append(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("appendable object already closed")
        if self._running is not None and not self._running.done():
            raise RuntimeError("one append at a time")
        if self._broken:
            raise OSError(errno.EIO, "an earlier append failed: the object's end is unknown")
        data = bytes(data)  # the kernel's threads read it after io_uring_enter returns
        offset = self.size
        try:
            if not await self._by_ring(data, offset):
                if self._closed:  # meanwhile, and its descriptor went with the ring's attempt
                    raise ValueError("appendable object closed during an append")
                await self._in_thread(data, offset)
        except BaseException:
            self._broken = True
            if not self._closed and (self._running is None or self._running.done()):
                # What a failed append left (e.g. written, then the fdatasync failed) is
                # not to be read as appended: cut it off, as far as the disk lets us.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, offset)
            raise
        self.size = offset + len(data)

    async def _by_ring(self, data: bytes, offset: int) -> bool:
        """The append by the ring; False if the ring could not take it or it failed."""
        ring = self._ring
        if ring is None or not data or not ring.usable(2):
            return False
        try:
            chain = ring.run([_uring.write(self._fd, data, offset), _uring.fdatasync(self._fd)])
        except OSError:  # the kernel took none
            return False
        self._running = chain
        try:
            written, synced = await asyncio.shield(chain)
        finally:
            if chain.done():  # else (cancelled) close() waits for it
                self._running = None
        return written == len(data) and synced == 0

    async def _in_thread(self, data: bytes, offset: int) -> None:
        running = asyncio.ensure_future(asyncio.to_thread(self._write_at, data, offset))
        self._running = running
        try:
            await asyncio.shield(running)
        finally:
            if running.done():
                self._running = None
            else:
                running.add_done_callback(_retrieve)

    def _write_at(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            count = os.pwrite(self._fd, view, offset)
            view, offset = view[count:], offset + count
        os.fdatasync(self._fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        running = self._running
        if running is not None and not running.done():
            # The ring or a thread still uses the descriptor: closed once they are done.
            running.add_done_callback(lambda _: os.close(self._fd))
        else:
            os.close(self._fd)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and (self._running is None or self._running.done()):
            self._closed = True
            os.close(self._fd)


def _close_created(future: asyncio.Future[int]) -> None:
    """Close the descriptor a cancelled ``create_appendable`` opened (its file stays: empty)."""
    if not future.cancelled() and future.exception() is None:
        os.close(future.result())


class LocalBackend(Backend):
    """Objects as plain files under ``base_path``, metadata in an extended attribute."""

    protocol = "local"
    empty_directories = True
    atomic_moves = True

    def __init__(
        self, base_path: str | os.PathLike[str], *, io_uring: bool = True, journal: bool = True
    ) -> None:
        self.base_path = os.fspath(base_path)
        self.io_uring = io_uring  # small writes over spares by io_uring, where it works
        self.journal = journal  # small writes made durable by the journal, on a disk
        self._tmp_segments = TMP_DIR.split("/")
        self._reads_on_loop = False  # set by start(): True on a local disk file system
        self._nowait = True  # set by start(): False where files live in memory
        self._tmp_lock: int | None = None
        self._spares: _Spares | None = None  # set by start(): on a local disk file system
        self._base: int | None = None  # set by start(): the base directory, kept open
        self._ring: _uring.Ring | None = None  # set by start() where spares are on
        self._own_tmp: int | None = None  # set by start(): this instance's temporary folder
        self._dir_syncs = _DirectorySyncs()
        self._journal: _journal.Journal | None = None  # set by start() where it serves
        # Given to the journal (``_journal.Journal.observer``): for the metrics.
        self.journal_observer: Callable[[str, int], None] | None = None

    # Every method below named ``_x`` runs in a worker thread and closes what it opens.

    def _open_base(self) -> int:
        return os.open(self.base_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open_dir(self, segments: list[str], key: str, *, create: bool = False) -> int:
        """Given directory segments below the base, return a descriptor of that directory.

        With ``create``, missing directories are made (and their creation made durable).
        Raises ``NotADirectoryError`` if a segment is a file, ``PermissionError`` at a link.
        """
        if self._base is not None:  # one call where the directory is there (no mkdir tries)
            try:
                found = _open_beneath(self._base, segments, key)
            except FileNotFoundError:
                if not create:
                    raise
                found = None  # made below
            if found is not None:
                return found
        fd = self._open_base()
        try:
            for segment in segments:
                if create:
                    try:
                        os.mkdir(segment, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    else:
                        os.fsync(fd)
                child = _open_child_dir(fd, segment, key)
                fd, parent = child, fd
                os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_own_tmp(self) -> int:
        """A descriptor of this instance's temporary folder (the caller's to close)."""
        if self._own_tmp is not None and self._tmp_lock is not None:  # started, not closed
            return os.dup(self._own_tmp)  # no path to look up
        return self._open_dir(self._tmp_segments, TMP_DIR)

    def _lookup_dir(self, segments: list[str], key: str) -> int:
        """As ``_open_dir``, for a lookup: a file where a directory should be means "not found"."""
        try:
            return self._open_dir(segments, key)
        except NotADirectoryError:
            raise _not_found(key) from None

    def _open_entry(self, key: str) -> tuple[int, os.stat_result]:
        """Given a key, return a descriptor of the file or directory there and its status.

        A file is returned only if, once open, it is still the one at the key: a file that
        a write replaced can become another write's temporary file (``_Spares``) unless it is
        open, and an ``open`` racing with that could otherwise return it.
        """
        segments = _split(key)
        parent = self._lookup_dir(segments[:-1], key)
        try:
            for _ in range(_OPEN_ATTEMPTS):
                fd, st = _open_in(parent, segments[-1], key)
                try:
                    if not stat.S_ISREG(st.st_mode) or _still_at(parent, segments[-1], st):
                        return fd, st
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # replaced meanwhile: open what is there now
        finally:
            os.close(parent)
        raise OSError(errno.EAGAIN, "the object kept changing while it was opened", key)

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._start)
        if self.io_uring and self._spares is not None and self._ring is None:
            self._ring = _uring.open_ring()  # small writes over spares: no worker threads
        if self.journal and self._spares is not None and self._journal is None and _boot_id():
            # Also without a ring (threads write it then): the markers of this process's
            # changes must reach the journals of processes that have one.
            assert self._own_tmp is not None
            self._journal = _journal.Journal(self._own_tmp, self._ring)
            self._journal.observer = self.journal_observer

    def _start(self) -> None:
        try:
            os.makedirs(self.base_path, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(
                f"storage.local.base-path: {self.base_path!r} is not a directory"
            ) from None
        if self._base is None:
            self._base = self._open_base()  # lookups below it: one openat2 each
        tmp = self._open_dir(TMP_DIR.split("/"), TMP_DIR, create=True)
        try:
            # One start at a time over a store: the first replays what a crash left.
            fcntl.flock(tmp, fcntl.LOCK_EX)
            kind = _file_system_type(tmp)
            boot = _boot_id()
            own = self._claim_tmp(tmp, boot)
            try:
                self._probe_xattr(own)
                self._set_read_mode(own, kind)
            except BaseException:
                os.close(own)
                self._close()
                raise
            if self._own_tmp is not None:  # started again after a close
                os.close(self._own_tmp)
            self._own_tmp = own  # kept: each write's temporary file is made through a dup
            try:
                self._remove_leftovers(tmp, boot)
            except BaseException:
                self._close()
                raise
        finally:
            os.close(tmp)

    def _remove_leftovers(self, tmp: int, boot: str) -> None:
        """Remove what processes that died during this boot were writing: every folder whose
        lock is free (their files are in the kernel's cache: a ``syncfs`` first makes what
        their journals recorded durable). The folders of processes that ran before the
        machine restarted: their journals are replayed (``_replay``), then the folders are
        kept (renamed ``*.restarted``) rather than removed. A write installs its file at the
        key by a rename or an exchange, which changes this folder too, and only the key's
        directory is flushed: after a power loss, a name here may still name the object at
        the key, and without ``fsck`` its link count can be one. Removing that name would
        free the object's blocks while the key still names them, for another object to get.
        ``boot``: this boot's id (``_boot_id``)."""
        with os.scandir(tmp) as entries:
            leftovers = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        kept = 0
        gone: list[str] = []  # of processes that died during this boot
        restarted: list[str] = []  # of processes that ran before the machine restarted
        journals = False
        for name, is_dir in leftovers:
            if not is_dir:
                if name != CHECKPOINT_NAME:
                    os.unlink(name, dir_fd=tmp)
                continue
            if name.endswith(RESTARTED_SUFFIX):
                kept += 1
                continue
            child = _open_child_dir(tmp, name, TMP_DIR)
            try:
                if _held_by_a_live_process(child):
                    continue
                if _left_this_boot(child, boot):
                    gone.append(name)
                    journals = journals or bool(_journal.segment_names(child))
                else:
                    restarted.append(name)
            finally:
                os.close(child)
        if restarted:
            self._replay(tmp, restarted)
        if journals:  # what their journals recorded is made durable: they can go
            moment = time.monotonic_ns()
            _journal.syncfs(tmp)
            _write_checkpoint(tmp, boot, moment)
        for name in gone:
            child = _open_child_dir(tmp, name, TMP_DIR)
            try:
                _remove_tree(child, f"{TMP_DIR}/{name}/")
            finally:
                os.close(child)
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(name, dir_fd=tmp)
        for name in restarted:
            os.rename(name, name + RESTARTED_SUFFIX, src_dir_fd=tmp, dst_dir_fd=tmp)
            kept += 1
        if kept:
            log.warning(
                "%d temporary folder(s) of processes that ran before the machine restarted "
                "are kept in %s (*%s): after a power loss, names in them may still name "
                "stored objects. Remove them once fsck has checked the file system.",
                kept, TMP_DIR, RESTARTED_SUFFIX,
            )  # fmt: skip

    def _replay(self, tmp: int, names: list[str]) -> None:
        """Replay the journals in the temporary folders ``names`` of processes that ran
        before the machine restarted (see ``_journal``), make that durable and record it
        (``CHECKPOINT_NAME``), then remove those journals: a later crash, even during the
        removals, must not replay them over newer changes."""
        folders: list[int] = []
        try:
            for name in names:
                folders.append(_open_child_dir(tmp, name, TMP_DIR))
            by_boot: dict[str, list[_journal.Record]] = {}
            for folder in folders:
                records = _journal.read_folder(folder)
                if records:
                    by_boot.setdefault(_folder_boot(folder) or "", []).extend(records)
            known_boot, known = _read_checkpoint(tmp)
            for boot, records in by_boot.items():  # one boot's, unless a replay never ran
                steps = _journal.plan(records, since=known if boot == known_boot else 0)
                written = sum(self._replay_one(record, marker) for record, marker in steps)
                _journal.syncfs(tmp)
                _write_checkpoint(tmp, boot, max(r.stamp for r in records) + 1)
                log.warning(
                    "replayed the journals of %d process(es) that ran before the machine "
                    "restarted: %d key(s) recorded, %d rewritten",
                    len(names), len(steps), written,
                )  # fmt: skip
            for folder in folders:
                for segment in _journal.segment_names(folder):
                    os.unlink(segment, dir_fd=folder)
                os.fsync(folder)
        finally:
            for folder in folders:
                os.close(folder)

    def _replay_one(self, record: _journal.Record, marker: _journal.Record | None) -> bool:
        """Make the key of ``record`` (a journal's last content record for it) hold that
        content, unless ``marker`` (a later change there, made durable) left what is there
        now (``_journal.plan``); say whether the file was written."""
        key = record.key
        try:
            segments = _split(key)
            st = self._lstat(segments, key)
        except (ValueError, OSError) as exc:
            log.warning("journal replay: %s is not writable (%s); skipped", key, exc)
            return False
        if marker is not None:
            if st is not None and st.st_ino == marker.inode:
                return False  # the later change's file is there
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_ino != record.inode:
                return False  # gone, or replaced, by the later change
        if (
            st is not None
            and stat.S_ISREG(st.st_mode)
            and st.st_size == len(record.body)
            and self._holds(key, record)
        ):
            return False
        temp = _open_temp(self._open_own_tmp())
        try:
            self._end_write(temp, [record.body], record.xattr, segments, key, False)
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            temp.discard()
            log.warning("journal replay: %s is not writable (%s); skipped", key, exc)
            return False
        except BaseException:
            temp.discard()
            raise
        return True

    def _holds(self, key: str, record: _journal.Record) -> bool:
        """Whether the file at ``key`` holds the body and attribute of ``record``."""
        try:
            fd, st = self._open_entry(key)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(st.st_mode):
                return False
            try:
                xattr: bytes | None = os.getxattr(fd, XATTR)
            except OSError:
                xattr = None
            if xattr == _NO_TYPE_XATTR:
                xattr = None
            return xattr == record.xattr and _read_whole(fd, st.st_size, False) == record.body
        finally:
            os.close(fd)

    def _claim_tmp(self, tmp: int, boot: str) -> int:
        """Make this instance's temporary folder, lock it, and return a descriptor of it.

        The folder gets its final name only once locked, so another process's ``start``
        never sees it unlocked.
        """
        name = secrets.token_hex(8)
        building = f"{name}.new"
        os.mkdir(building, 0o700, dir_fd=tmp)
        folder = _open_child_dir(tmp, building, TMP_DIR)
        lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=folder)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(lock, boot.encode("ascii", "replace"))  # for _left_this_boot
        os.fsync(lock)  # and for a replay, which groups journals by boot
        os.rename(building, name, src_dir_fd=tmp, dst_dir_fd=tmp)
        os.fsync(tmp)  # the journal's folder must be found after a crash
        self._tmp_lock = lock
        self._tmp_segments = [*TMP_DIR.split("/"), name]
        return folder

    async def close(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.close()
        ring, self._ring = self._ring, None
        if ring is not None:
            await ring.close()
        journaled = journal is not None and journal.used
        await asyncio.to_thread(self._close, journaled, journal is not None and journal.failed)

    def __del__(self) -> None:
        # Not in close(): a worker thread that outlived its cancelled request may still look
        # a key up, and a descriptor number closed under it could name another directory by
        # then. Nothing refers to this backend any more here.
        for name in ("_base", "_own_tmp"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(Exception):  # OSError; or os half gone at exit
                    os.close(fd)

    def _close(self, journaled: bool = False, failed: bool = False) -> None:
        """Remove this instance's temporary folder; ``journaled``: its journal has records,
        so the store is made durable first (``syncfs``), or, if that fails, or failed before
        (``failed``: a lost writeback), the folder is kept."""
        lock, self._tmp_lock = self._tmp_lock, None
        if lock is None:
            return
        own = self._tmp_segments[-1]
        self._tmp_segments = TMP_DIR.split("/")
        try:
            tmp = self._open_dir(self._tmp_segments, TMP_DIR)
        except OSError:
            os.close(lock)
            return
        if journaled:
            try:
                if failed:
                    raise OSError(errno.EIO, "a writeback failed earlier")
                fcntl.flock(tmp, fcntl.LOCK_EX)  # for _write_checkpoint
                moment = time.monotonic_ns()
                # On the folder opened at start: the kernel reports a writeback error to the
                # files open when it happened.
                _journal.syncfs(self._own_tmp if self._own_tmp is not None else tmp)
                _write_checkpoint(tmp, _boot_id(), moment)
            except OSError as exc:
                log.error("the store could not be made durable at shutdown (%s): the "
                          "journal is kept for the next start", exc)  # fmt: skip
                os.close(lock)
                os.close(tmp)
                return
        try:
            folder = _open_child_dir(tmp, own, TMP_DIR)
            try:
                _remove_tree(folder, f"{TMP_DIR}/{own}/")
            finally:
                os.close(folder)
            os.rmdir(own, dir_fd=tmp)
        except OSError:
            pass  # left for the next start, which removes unlocked folders
        finally:
            os.close(lock)
            os.close(tmp)

    def _probe_xattr(self, tmp: int) -> None:
        name = f"probe-{secrets.token_hex(8)}.tmp"
        fd = os.open(name, _TEMP_FLAGS, 0o600, dir_fd=tmp)
        try:
            os.setxattr(fd, XATTR, b"{}")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise ValueError(
                    f"storage.local.base-path: the file system at {self.base_path!r} does not "
                    "support extended attributes (user.*), which the local backend needs for "
                    "object metadata"
                ) from exc
            raise
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=tmp)

    def _set_read_mode(self, tmp: int, kind: str | None) -> None:
        """Decide where small reads happen: on the event loop if the file system is a local
        one and a read there cannot wait for a disk (the file system is in memory, or it
        honours ``RWF_NOWAIT``: tmpfs does not, and would refuse every such read); else in
        worker threads."""
        if kind not in LOCAL_FILE_SYSTEMS:
            self._reads_on_loop = False
            return
        self._nowait = kind not in MEMORY_FILE_SYSTEMS
        self._reads_on_loop = not self._nowait or _honours_nowait(tmp)
        if self._nowait:  # on a disk: in memory, freeing and allocating cost next to nothing
            self._spares = _Spares()

    # -- reads -------------------------------------------------------------------------------

    async def file_size(self, key: str) -> int | None:
        # Every upload asks (usage counters, quotas): a status, no descriptor, no metadata.
        if self._reads_on_loop:
            return self._file_size(key)
        return await asyncio.to_thread(self._file_size, key)

    def _file_size(self, key: str) -> int | None:
        try:
            st = self._lstat(_split(key), key)
        except NotADirectoryError:
            return None  # a file where a directory would be
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _symlink_error(key)  # as info() would
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    async def info(self, key: str) -> Info:
        if self._reads_on_loop:
            return self._info(key)  # metadata only: see open_read
        return await asyncio.to_thread(self._info, key)

    def _info(self, key: str) -> Info:
        if key == "":
            fd = self._open_base()
            try:
                return _dir_info("", os.fstat(fd))
            finally:
                os.close(fd)
        fd, st = self._open_entry(key)
        try:
            if stat.S_ISDIR(st.st_mode):
                return _dir_info(key, st)
            return _file_info(key, st, *_read_xattr(fd))
        finally:
            os.close(fd)

    async def open_read(self, key: str) -> Reader:
        # On a local disk, the file is opened on the event loop, as nginx does (the directory
        # walk, open, fstat and xattr hit the kernel's caches), and a small body is read there
        # only if it is in the page cache (RWF_NOWAIT), or always where files live in memory
        # (tmpfs); otherwise the read goes to a thread. A trip to a thread and back cost more
        # CPU than the rest of a small download.
        if self._reads_on_loop:
            try:
                return self._open_read(key, nowait=self._nowait)
            except _WouldBlock:
                pass
        return await asyncio.to_thread(self._open_read, key)

    def _open_read(self, key: str, nowait: bool = False) -> Reader:
        fd, st = self._open_entry(key)
        try:
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", key)
            info = _file_info(key, st, *_read_xattr(fd))
            if st.st_size <= WHOLE_READ_MAX:
                data = _read_whole(fd, st.st_size, nowait)
                if len(data) != st.st_size:
                    raise OSError(errno.EIO, "the file is shorter than its size", key)
                os.close(fd)
                return _WholeReader(data, info)
        except BaseException:
            os.close(fd)
            raise
        return LocalReader(fd, info)

    # -- writes ------------------------------------------------------------------------------

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        return await self._spares_go_when_full(
            self._write_body(key, chunks, content_type, metadata, exclusive)
        )

    async def write_replacing(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> tuple[Info, int | None]:
        # The size comes from the look at the key every write makes before it stores the
        # body: no look-up of its own.
        replaced = _ReplacedSize()
        info = await self._spares_go_when_full(
            self._write_body(key, chunks, content_type, metadata, exclusive, replaced)
        )
        return info, replaced.size

    async def _spares_go_when_full(self, writing: Awaitable[Info]) -> Info:
        """Await a write; if the disk was full, remove the spares (the next write may fit)."""
        try:
            return await writing
        except OSError as exc:
            if exc.errno == errno.ENOSPC and self._spares is not None:
                await asyncio.to_thread(self._drop_spares)
            raise

    def _drop_spares(self) -> None:
        if self._spares is not None:
            tmp = self._open_own_tmp()
            try:
                self._spares.drop(tmp)
            finally:
                os.close(tmp)

    async def _write_body(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        exclusive: bool,
        replaced: _ReplacedSize | None = None,
    ) -> Info:
        # A body that ends within the first CHUNK_SIZE bytes is written in one trip to a
        # worker thread (check, temporary file, write, fsync, rename, fsync); a longer one
        # streams, its first chunks included.
        iterator = aiter(chunks)
        head, size, ended = await _head(iterator, CHUNK_SIZE)
        if ended:
            segments, metadata, xattr = _prepare(key, content_type, metadata)
            # A small body on a local disk: the checks at the key (lookups, which only touch
            # the kernel's caches) run on the event loop, as for reads. Each system call of a
            # worker thread contends with the event loop for the GIL, and under load that cost
            # more CPU than a small upload itself. The key's directory is still looked up by
            # its path right before the rename: a directory moved since the write began must
            # not take the object with it.
            checked = self._reads_on_loop and size <= SMALL_WRITE_MAX
            if checked:
                there = self._check_writable(segments, key, exclusive, replaced)
                temp = self._take_spare()
                if temp is None and self._ring is not None:
                    temp = await self._new_temp_by_ring(self._ring)
                if temp is not None:
                    st = await self._write_small(temp, segments, key, exclusive, head, xattr, there)
                    return _file_info(key, st, content_type, metadata)
            cancelled = _Flag()
            try:
                st = await _to_the_end(
                    self._write_whole,
                    segments, key, exclusive, head, xattr, cancelled, checked, replaced,
                    then=self._marks(key, _inode),
                )  # fmt: skip
            except asyncio.CancelledError:
                cancelled.set()  # the thread drops the file, unless it was already renamed
                raise
            return _file_info(key, st, content_type, metadata)
        rest = _chain(head, iterator)
        return await self._write(
            key, functools.partial(_fill, rest), content_type, metadata, exclusive, replaced
        )

    def _write_whole(
        self,
        segments: list[str],
        key: str,
        exclusive: bool,
        data: list[bytes],
        xattr: bytes | None,
        cancelled: _Flag,
        checked: bool,
        replaced: _ReplacedSize | None,
    ) -> os.stat_result:
        if checked:  # _check_writable ran on the event loop (and found no spare ready)
            temp = _open_temp(self._open_own_tmp())
        else:
            temp = self._begin_write(segments, key, exclusive, replaced)
        try:
            return self._end_write(temp, data, xattr, segments, key, exclusive, cancelled)
        except BaseException:
            temp.discard()
            raise

    splices_sockets = True
    appends = True

    async def write_socket_body(
        self,
        key: str,
        body: SocketBody,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        """``write``, the bytes moved from the socket to the file by ``splice(2)`` through a
        pipe: the kernel hands over the received pages, nothing is copied into Python."""
        attached = False

        async def fill(temp: _TempFile) -> list[bytes]:
            nonlocal attached
            temp.attach_source(body.fd)  # from here on the temporary file closes it
            attached = True
            if body.head:
                await asyncio.to_thread(temp.append, [body.head])
            count = body.count
            while count:
                want = min(count, SPLICE_SLICE)
                moved = await asyncio.to_thread(temp.splice, want)
                body.received += moved
                count -= moved
                if moved < want:  # the socket has nothing more for now
                    await body.wait_readable(body.fd)
            return []

        try:
            writing = self._write(key, fill, content_type, metadata, exclusive)
            return await self._spares_go_when_full(writing)
        finally:
            if not attached:
                os.close(body.fd)

    async def _write(
        self,
        key: str,
        fill: Callable[[_TempFile], Awaitable[list[bytes]]],
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        exclusive: bool,
        replaced: _ReplacedSize | None = None,
    ) -> Info:
        """Open a temporary file, let ``fill`` write the body into it (it returns the bytes it
        left for the end), make it durable and give it its name; on any failure, remove it."""
        segments, metadata, xattr = _prepare(key, content_type, metadata)
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, self._begin_write, segments, key, exclusive, replaced)
        try:
            temp = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread still opens the temporary file: discard it once it has.
            opening.add_done_callback(_discard_when_opened)
            raise
        try:
            rest = await fill(temp)
            st = await _to_the_end(
                self._end_write, temp, rest, xattr, segments, key, exclusive,
                then=self._marks(key, _inode),
            )  # fmt: skip
        except BaseException:
            # Also on cancellation: discard() waits for a write still running in its thread.
            # Shielded: a second cancellation (shutdown) must not unqueue it before it ran.
            await asyncio.shield(asyncio.to_thread(temp.discard))
            raise
        return _file_info(key, st, content_type, metadata)

    def _begin_write(
        self, segments: list[str], key: str, exclusive: bool, replaced: _ReplacedSize | None = None
    ) -> _TempFile:
        """Refuse a write that cannot land before its body is read; open its temporary file."""
        self._check_writable(segments, key, exclusive, replaced)
        return _open_temp(self._open_own_tmp())

    def _check_writable(
        self, segments: list[str], key: str, exclusive: bool, replaced: _ReplacedSize | None = None
    ) -> bool:
        """Refuse a write that cannot land at ``key``; say whether an entry is there (a file
        the write is to replace; its size goes to ``replaced``)."""
        st = self._lstat(segments, key)
        if st is None:
            return False  # the write will create it (and what is missing above it)
        if stat.S_ISLNK(st.st_mode):
            raise _symlink_error(key)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        if exclusive:
            raise FileExistsError(errno.EEXIST, "object exists", key)
        if replaced is not None and stat.S_ISREG(st.st_mode):
            replaced.size = st.st_size
        return True

    def _lstat(self, segments: list[str], key: str) -> os.stat_result | None:
        """Given a key's segments, return the status of the entry there (a link not followed),
        or ``None`` if it, or a directory above it, is missing.

        Raises ``NotADirectoryError`` for a file above it, ``PermissionError`` at a link above it.
        """
        try:
            fd = self._open_dir(segments[:-1], key)
        except FileNotFoundError:
            return None
        try:
            return os.stat(segments[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def _end_write(
        self,
        temp: _TempFile,
        rest: list[bytes],
        xattr: bytes | None,
        segments: list[str],
        key: str,
        exclusive: bool,
        cancelled: _Flag | None = None,
    ) -> os.stat_result:
        """Make the temporary file durable and give it its name in the key's directory (made
        if missing), looked up now, right before the rename."""
        if rest:
            temp.append(rest, writeback=False)  # the fsync follows at once
        temp.seal(xattr)
        if cancelled is not None and cancelled.is_set():
            raise _WriteCancelled  # the last moment to drop it: the rename below commits
        return self._install(temp, segments, key, exclusive)

    def _install(
        self, temp: _TempFile, segments: list[str], key: str, exclusive: bool, flush: bool = False
    ) -> os.stat_result:
        """Give a sealed temporary file its name in the key's directory (made if missing),
        looked up now, right before the rename, and make that durable. ``flush``: its body
        was sealed without ``fsync``: first that."""
        if flush:
            temp.flush()
        parent = self._open_dir(segments[:-1], key, create=True)
        try:
            st = temp.install(parent, segments[-1], key, exclusive, self._spares)
            temp.settle(parent, self._spares)
            return st
        finally:
            os.close(parent)

    def _install_or_discard(
        self, temp: _TempFile, segments: list[str], key: str, exclusive: bool, flush: bool = False
    ) -> os.stat_result:
        try:
            return self._install(temp, segments, key, exclusive, flush)
        except BaseException:
            temp.discard()
            raise

    async def _new_temp_by_ring(self, ring: _uring.Ring) -> _TempFile | None:
        """A new temporary file, made by the ring (making an inode may wait for the disk);
        None if the ring cannot take it now (a worker thread makes it then)."""
        if not ring.usable(1):
            return None
        tmp = self._open_own_tmp()
        name = f"{secrets.token_hex(16)}.tmp"
        try:
            chain = ring.run([_uring.openat(tmp, os.fsencode(name) + b"\0", _TEMP_FLAGS, 0o666)])
        except OSError:  # the kernel took none: a thread makes it
            os.close(tmp)
            return None
        try:
            (fd,) = await asyncio.shield(chain)
        except asyncio.CancelledError:
            chain.add_done_callback(functools.partial(_drop_opened, tmp, name))
            raise
        if fd < 0:
            os.close(tmp)
            raise OSError(-fd, os.strerror(-fd))
        return _TempFile(tmp, name, fd)

    def _take_spare(self) -> _TempFile | None:
        """A spare to write over, if one is ready (on the event loop: lookups and an open in
        the kernel's caches; none is made when no spare is ready)."""
        if self._spares is None or not self._spares.ready():
            return None
        tmp = self._open_own_tmp()
        try:
            temp = self._spares.take(tmp)
        except BaseException:
            os.close(tmp)
            raise
        if temp is None:
            os.close(tmp)
        return temp

    async def _write_small(
        self,
        temp: _TempFile,
        segments: list[str],
        key: str,
        exclusive: bool,
        data: list[bytes],
        xattr: bytes | None,
        there: bool,
    ) -> os.stat_result:
        """A small write into a spare or a new temporary file, in two steps that may wait
        for the disk: the body, attribute and ``fsync``; then, after the lookup of the key's
        directory and the exchange, made here on the event loop, the directory's ``fsync``
        (shared by the writes renamed there meanwhile: ``_DirectorySyncs``). Both steps go
        to the io_uring ring where there is one (a worker thread's every system call
        contends with the event loop for the GIL, and under load that costs more than the
        write), else to worker threads; a step the ring could not finish is made again by a
        thread, which raises what fails. ``there``: whether the checks found a file at the
        key."""
        parent = None
        ring = self._ring
        journal = self._journal
        body = b"".join(data)
        data = [body]  # (joined once: for the ring's write and the journal's record)
        chain = None
        try:
            sync = journal is None  # else the journal's record makes the body durable
            ops = temp.ring_seal(data, xattr, sync) if ring is not None else None
            if ring is not None and ops is not None and ring.usable(len(ops)):
                with contextlib.suppress(OSError):  # the kernel took none: threads do it
                    chain = ring.run(ops)
            sealed = False
            if ops is not None and chain is not None:
                # Shielded: were the chain's future cancelled, its end could not be told.
                sealed = temp.sealed_by_ring(ops, await asyncio.shield(chain))
            if not sealed:
                await asyncio.to_thread(_fill_and_seal, temp, data, xattr)
            flushed = sync or not sealed  # the thread's seal has its fsync
            try:
                # Looked up now, right before the rename: a directory moved since the checks
                # must not take the object with it.
                parent = self._open_dir(segments[:-1], key)
            except FileNotFoundError:
                pass  # its directory is to be made: in the thread below
            else:
                try:
                    st = temp.install(parent, segments[-1], key, exclusive, self._spares, there)
                except BaseException:
                    os.close(parent)
                    raise
        except BaseException:
            # On cancellation too; discard() waits for a call still running in its thread,
            # and for a chain still in the ring: a linked operation looks its descriptor up
            # only when it runs, and the number, closed, could name another file by then.
            if chain is not None and not chain.done():
                chain.add_done_callback(lambda _: temp.discard())
            else:
                await asyncio.shield(asyncio.to_thread(temp.discard))
            raise
        if parent is None:
            # Its directory is to be made: durably, by a thread (which flushes the body first
            # if the ring did not); then, with the journal, a marker.
            return await _to_the_end(
                self._install_or_discard, temp, segments, key, exclusive, not flushed,
                then=self._marks(key, _inode),
            )  # fmt: skip
        syncing = None
        if journal is not None:
            # Durable once the record is: no fsync of the directory (nor, unless a thread
            # sealed it, of the file).
            syncing = journal.commit(_journal.CONTENT, key, st.st_ino, xattr, body)
        elif ring is not None and temp.replaced_small():
            with contextlib.suppress(OSError):  # (fstat) a thread settles it then
                syncing = self._dir_syncs.after(parent, ring)
        if syncing is None:  # (no journal here)
            await _to_the_end(_settle, temp, parent, self._spares)
            return st
        # The rest of _settle once the fsync has run, whatever becomes of this task: the
        # directory and the temporary folder stay open until then.
        settled = asyncio.get_running_loop().create_future()
        syncing.add_done_callback(
            functools.partial(_settled_by_ring, temp, parent, self._spares, settled)
        )
        try:
            await asyncio.shield(settled)
        except asyncio.CancelledError:
            settled.add_done_callback(_retrieve)
            raise
        return st

    def _marks(
        self, key: str, inode: Callable[[Any], int], when: Callable[[Any], bool] | None = None
    ) -> _Then | None:
        """With the journal on, for ``_to_the_end``: after a change at ``key`` made durable by
        other means (a large write, a delete), a marker record of the file now there
        (``inode(result)``, 0 for none), so that a replay does not undo it with an earlier
        record (``_journal``); ``when(result)``: whether a change was made."""
        journal = self._journal
        if journal is None:
            return None

        def record(result: Any) -> asyncio.Future[list[int]] | None:
            if when is not None and not when(result):
                return None
            return journal.commit(_journal.MARKER, key, inode(result))

        return record

    def _checkpoints(self) -> _Then | None:
        """With the journal on, for ``_to_the_end``: after a change of many keys at once (a
        move, a prefix deleted), a checkpoint: the store made durable, and a replay ignores
        every earlier record (``_journal.Journal.checkpoint``)."""
        journal = self._journal
        if journal is None:
            return None
        return lambda _: asyncio.ensure_future(journal.checkpoint())

    async def create_appendable(self, key: str, *, content_type: str | None = None) -> Appendable:
        segments, _, xattr = _prepare(key, content_type, None)
        # A new inode at the key (its number may be one a journaled write had there): marked.
        fd = await _to_the_end(
            self._create_appendable, segments, key, xattr,
            then=self._marks(key, lambda fd: os.fstat(fd).st_ino), abandoned=_close_created,
        )  # fmt: skip
        return _Appendable(fd, self._ring)

    def _create_appendable(self, segments: list[str], key: str, xattr: bytes | None) -> int:
        """Create the file at ``key`` (its directory made if missing), its name durable."""
        parent = self._open_dir(segments[:-1], key, create=True)
        try:
            fd = os.open(segments[-1], _TEMP_FLAGS, 0o666, dir_fd=parent)
            try:
                if xattr is not None:
                    os.setxattr(fd, XATTR, xattr)
                os.fsync(fd)
                os.fsync(parent)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(segments[-1], dir_fd=parent)
                raise
            return fd
        finally:
            os.close(parent)

    # -- listings ----------------------------------------------------------------------------

    async def list(
        self,
        key: str,
        *,
        recursive: bool = False,
        limit: int = 1000,
        start_after: str | None = None,
    ) -> Page:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await asyncio.to_thread(self._list, key, recursive, limit, start_after)

    def _list(self, key: str, recursive: bool, limit: int, start_after: str | None) -> Page:
        if key == "":
            fd = self._open_base()
        else:
            segments = _split(key)
            parent = self._lookup_dir(segments[:-1], key)
            try:
                fd = _open_child_dir(parent, segments[-1], key)
            finally:
                os.close(parent)
        prefix = f"{key}/" if key else ""
        if recursive:
            return _walk_files(fd, prefix, limit, start_after)  # closes fd
        try:
            return _list_children(fd, prefix, limit, start_after)
        finally:
            os.close(fd)

    # -- deletes, moves, directories ---------------------------------------------------------

    async def delete(self, key: str) -> None:
        await _to_the_end(self._delete, key, then=self._marks(key, _no_inode))

    def _delete(self, key: str) -> None:
        segments = _split(key)
        parent = self._lookup_dir(segments[:-1], key)
        try:
            try:
                st = os.stat(segments[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise _not_found(key) from None
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_error(key)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", key)
            if not stat.S_ISREG(st.st_mode):
                raise _not_found(key)
            try:
                os.unlink(segments[-1], dir_fd=parent)  # EISDIR if a directory took its place
            except FileNotFoundError:
                raise _not_found(key) from None
            os.fsync(parent)
        finally:
            os.close(parent)

    async def delete_if_unchanged(self, key: str, expected: Info) -> bool:
        return await _to_the_end(
            self._delete_if_unchanged, key, expected, then=self._marks(key, _no_inode, bool)
        )

    def _delete_if_unchanged(self, key: str, expected: Info) -> bool:
        """Compare and unlink in one worker-thread call: the window in which a new version
        renamed into place could go with the old one is the two system calls' gap."""
        segments = _split(key)
        try:
            parent = self._lookup_dir(segments[:-1], key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            try:
                st = os.stat(segments[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(st.st_mode) or not same_version(_file_info(key, st), expected):
                return False
            try:
                os.unlink(segments[-1], dir_fd=parent)
            except FileNotFoundError:
                return False
            os.fsync(parent)
            return True
        finally:
            os.close(parent)

    async def delete_prefix(self, key: str) -> int:
        return await _to_the_end(self._delete_prefix, key, then=self._checkpoints())

    def _delete_prefix(self, key: str) -> int:
        segments = _split(key)
        parent = self._lookup_dir(segments[:-1], key)
        try:
            fd = _open_child_dir(parent, segments[-1], key)
            try:
                count = _remove_tree(fd, f"{key}/")
            finally:
                os.close(fd)
            if not TMP_DIR.startswith(f"{key}/"):  # the temporary directory stays
                try:
                    os.rmdir(segments[-1], dir_fd=parent)
                except OSError as exc:
                    # A concurrent write put a new object there: it stays, with its directory.
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
            os.fsync(parent)
        finally:
            os.close(parent)
        return count

    async def move(self, src: str, dst: str) -> None:
        journal = self._journal
        if journal is None:
            return await _to_the_end(self._move, src, dst)
        # With the journal, what is moved may be durable only by records at the keys it
        # leaves. A file: flushed, then markers of both keys (the key it leaves will be
        # empty; the one it goes to will hold its inode: a replay leaves each as the rename
        # left it, or, if the rename did not reach the disk, the file where it was), then
        # the rename. A directory: a checkpoint before (everything in it durable) and after
        # (every earlier record ignored): a syncfs each, where a file costs an fsync.
        inode = await asyncio.to_thread(self._flush_file, src, dst)
        if inode is None:
            await asyncio.shield(journal.checkpoint())
            await _to_the_end(self._move, src, dst, then=self._checkpoints())
            return
        for marker in (
            journal.commit(_journal.MARKER, src, 0),
            journal.commit(_journal.MARKER, dst, inode),
        ):
            _journal.check(await asyncio.shield(marker))
        # Should the rename not happen after all (a race), the markers stand for nothing: a
        # checkpoint then makes them, and every record before them, ignored.
        try:
            await _to_the_end(self._move, src, dst, inode, abandoned=self._checkpoint_if_failed)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await asyncio.shield(journal.checkpoint())
            raise

    def _checkpoint_if_failed(self, moving: asyncio.Future[Any]) -> None:
        journal = self._journal
        if journal is not None and not moving.cancelled() and moving.exception() is not None:
            asyncio.ensure_future(journal.checkpoint()).add_done_callback(_retrieve)

    def _flush_file(self, key: str, dst: str) -> int | None:
        """Before a move to ``dst`` (checked as ``_move`` does, so that a move it refuses is
        refused before any marker): ``fsync`` the file at ``key`` and its directory (its
        name may not be durable yet) and return its inode; None for a directory, or a move
        to refuse (the checkpoint path, where ``_move`` raises)."""
        if dst.startswith(f"{key}/") or self._lstat(_split(dst), dst) is not None:
            return None
        segments = _split(key)
        parent = self._lookup_dir(segments[:-1], key)
        try:
            fd, st = _open_in(parent, segments[-1], key)
            try:
                if not stat.S_ISREG(st.st_mode):
                    return None
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(parent)
            return st.st_ino
        finally:
            os.close(parent)

    def _move(self, src: str, dst: str, inode: int | None = None) -> None:
        """``inode``: of the file ``move`` flushed and marked; another one there is refused."""
        src_segments = _split(src)
        dst_segments = _split(dst)
        if TMP_DIR.startswith(f"{src}/"):
            raise PermissionError(errno.EACCES, "holds the local backend's directory", src)
        src_parent = self._lookup_dir(src_segments[:-1], src)
        try:
            try:
                st = os.stat(src_segments[-1], dir_fd=src_parent, follow_symlinks=False)
            except FileNotFoundError:
                raise _not_found(src) from None
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_error(src)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise _not_found(src)
            if inode is not None and st.st_ino != inode:
                raise OSError(errno.EAGAIN, "the object changed while it was moved", src)
            if dst.startswith(f"{src}/"):
                raise OSError(errno.EINVAL, "cannot move a directory into itself", dst)
            dst_parent = self._open_dir(dst_segments[:-1], dst, create=True)
            try:
                _rename_noreplace(
                    src_parent,
                    src_segments[-1],
                    dst_parent,
                    dst_segments[-1],
                    dst,
                    is_dir=stat.S_ISDIR(st.st_mode),
                )
                os.fsync(dst_parent)
                os.fsync(src_parent)
            finally:
                os.close(dst_parent)
        finally:
            os.close(src_parent)

    async def mkdir(self, key: str) -> None:
        await asyncio.to_thread(self._mkdir, key)

    def _mkdir(self, key: str) -> None:
        segments = _split(key)
        parent = self._open_dir(segments[:-1], key, create=True)
        try:
            try:
                os.mkdir(segments[-1], 0o777, dir_fd=parent)
            except FileExistsError:
                st = os.stat(segments[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _symlink_error(key) from None
                if not stat.S_ISDIR(st.st_mode):
                    raise FileExistsError(errno.EEXIST, "a file is there", key) from None
                return
            os.fsync(parent)
        finally:
            os.close(parent)


# -- directory scans (in worker threads) -------------------------------------------------------


Child = tuple[str, str, bool]
"""``(sort key, name, is_dir)`` of a directory's entry; a directory's sort key ends in ``/``."""


@dataclass(frozen=True, slots=True)
class _Scan:
    """A directory's sorted children, valid while its status (``stamp``) is the same."""

    stamp: tuple[int, int, int, int]
    prefix: str
    children: list[Child]
    sort_keys: list[str]


class _ScanCache:
    """Sorted scans of large directories, so that paging through one costs a page, not a scan.

    A scan is reused only while the directory's modification and change times, size and link
    count are those it was made under (any entry created, removed or renamed, by this process
    or another, changes them). It is kept only if the directory had not changed for
    ``SETTLED_NS`` before the scan began: a change made within the file system clock's tick
    of that status would otherwise leave the stamp as it was. A modification time in whole
    seconds suggests a file system with a coarse clock (1 or 2 s), where that rule does not
    hold: such a scan is never kept.
    """

    SETTLED_NS: Final = 100_000_000
    MIN_ENTRIES: Final = 1000
    MAX_ENTRIES: Final = 250_000  # in all scans kept (about 200 bytes each)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scans: OrderedDict[tuple[int, int], _Scan] = OrderedDict()
        self._entries = 0

    def get(self, fd: int, prefix: str) -> _Scan:
        st = os.fstat(fd)
        where = (st.st_dev, st.st_ino)
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_nlink)
        with self._lock:
            scan = self._scans.get(where)
            if scan is not None and scan.stamp == stamp and scan.prefix == prefix:
                self._scans.move_to_end(where)
                return scan
        began = time.time_ns()
        children = _scan_children(fd, prefix)
        scan = _Scan(stamp, prefix, children, [child[0] for child in children])
        if (
            len(children) >= self.MIN_ENTRIES
            and began - st.st_mtime_ns > self.SETTLED_NS
            and st.st_mtime_ns % 1_000_000_000  # whole seconds: a coarse clock, never kept
        ):
            self._keep(where, scan)
        return scan

    def _keep(self, where: tuple[int, int], scan: _Scan) -> None:
        if len(scan.children) > self.MAX_ENTRIES:
            return
        with self._lock:
            old = self._scans.pop(where, None)
            if old is not None:
                self._entries -= len(old.children)
            self._scans[where] = scan
            self._entries += len(scan.children)
            while self._entries > self.MAX_ENTRIES:
                _, evicted = self._scans.popitem(last=False)
                self._entries -= len(evicted.children)


_SCANS: Final = _ScanCache()


def _children_after(
    fd: int, prefix: str, start_after: str | None, *, holder: bool = False
) -> Iterator[Child]:
    """Given an open directory whose key is ``prefix``, return its sorted children from the
    first one that sorts after ``start_after`` (found by bisection: a page deep into a large
    directory does not step over the ones before it); with ``holder``, from the subdirectory
    that holds ``start_after`` if there is one (a walk goes on inside it)."""
    scan = _SCANS.get(fd, prefix)
    children = scan.children
    if start_after is None:
        return iter(children)
    first = bisect_right(scan.sort_keys, start_after)
    # The one subdirectory that sorts before start_after and still holds keys after it is the
    # one start_after is in: no name has a "/", so nothing sorts between them.
    if (
        holder
        and first
        and children[first - 1][2]
        and start_after.startswith(children[first - 1][0])
    ):
        first -= 1
    return map(children.__getitem__, range(first, len(children)))


def _scan_children(fd: int, prefix: str) -> list[Child]:
    """Given an open directory whose key is ``prefix``, return ``(sort key, name, is_dir)`` of
    its files and subdirectories, sorted; links, special files and ``TMP_DIR`` are left out."""
    found: list[Child] = []
    append = found.append
    with os.scandir(fd) as entries:
        for entry in entries:
            name = entry.name
            try:  # from the directory entry's type: no system call on ext4, xfs, btrfs
                if entry.is_file(follow_symlinks=False):
                    is_dir = False
                elif entry.is_dir(follow_symlinks=False):
                    is_dir = True
                else:
                    continue
            except OSError:
                continue  # removed while we looked
            if not name.isascii():
                try:
                    name.encode()
                except UnicodeEncodeError:
                    continue  # not UTF-8 on disk: no key can name it
            if is_dir:
                full = prefix + name
                if full != TMP_DIR:
                    append((full + "/", name, True))
            else:
                append((prefix + name, name, False))
    found.sort(key=_sort_key)  # sort keys are unique: no need to compare the rest
    return found


_sort_key: Final = operator.itemgetter(0)


def _list_children(fd: int, prefix: str, limit: int, start_after: str | None) -> Page:
    entries: list[Info] = []
    last = None
    for sort_key, name, is_dir in _children_after(fd, prefix, start_after):
        if len(entries) == limit:
            return Page(entries=entries, next_cursor=last)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if is_dir and stat.S_ISDIR(st.st_mode):
            entries.append(_dir_info(prefix + name, st))
        elif not is_dir and stat.S_ISREG(st.st_mode):
            entries.append(_file_info(prefix + name, st))
        else:
            continue
        last = sort_key
    return Page(entries=entries, next_cursor=None)


def _walk_files(fd: int, prefix: str, limit: int, start_after: str | None) -> Page:
    """Given an open directory (closed on return), return a page of the files below it, in
    code-point order of their keys, by a depth-first walk over sorted children that skips every
    subtree wholly at or before ``start_after`` and stops after one entry past ``limit``."""
    stack: list[tuple[int, Iterator[Child]]] = []
    entries: list[Info] = []
    try:
        try:
            stack.append((fd, _children_after(fd, prefix, start_after, holder=True)))
        except BaseException:
            os.close(fd)
            raise
        while stack:
            top, children = stack[-1]
            child = next(children, None)
            if child is None:
                os.close(stack.pop()[0])
                continue
            sort_key, name, is_dir = child
            if is_dir:
                if (
                    start_after is not None
                    and start_after >= sort_key
                    and not start_after.startswith(sort_key)
                ):
                    continue  # every key below sorts before start_after
                try:
                    sub = _open_child_dir(top, name, sort_key)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    continue  # removed or replaced since the scan
                try:
                    stack.append((sub, _children_after(sub, sort_key, start_after, holder=True)))
                except BaseException:
                    os.close(sub)
                    raise
                continue
            if start_after is not None and sort_key <= start_after:
                continue
            try:
                st = os.stat(name, dir_fd=top, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if len(entries) == limit:
                return Page(entries=entries, next_cursor=entries[-1].name)
            entries.append(_file_info(sort_key, st))
        return Page(entries=entries, next_cursor=None)
    finally:
        for open_fd, _ in stack:
            os.close(open_fd)


def _remove_tree(fd: int, prefix: str) -> int:
    """Given an open directory whose key is ``prefix``, remove everything in it, links as links
    (never what they point to); return the regular files removed."""
    count = 0
    with os.scandir(fd) as scan:
        entries = [
            (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
            for e in scan
        ]
    for name, is_dir, is_file in entries:
        if prefix + name == TMP_DIR:
            continue
        if is_dir:
            try:
                sub = _open_child_dir(fd, name, prefix + name)
            except FileNotFoundError:
                continue
            except (NotADirectoryError, PermissionError):
                pass  # replaced by a file or a link since the scan: unlink that below
            else:
                try:
                    count += _remove_tree(sub, f"{prefix}{name}/")
                finally:
                    os.close(sub)
                try:
                    os.rmdir(name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
                continue
        try:
            os.unlink(name, dir_fd=fd)
        except (FileNotFoundError, IsADirectoryError):
            continue  # gone, or a directory took its place: left for its writer
        count += is_file
    return count
