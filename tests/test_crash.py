"""Crashes and disconnects mid-upload: nothing partial is ever visible, leftovers are cleaned up.

``test_sigkill_mid_upload_leaves_no_partial_object`` runs, per backend, a loop of kills: start
the real gateway (one storage across restarts), stream several large uploads at a moderate pace
over raw sockets (some keys overwrite a known previous version, some are new), SIGKILL the
process at a random moment, then check the raw storage and, after a restart, the HTTP API:
every object is byte for byte (sha256) its previous version or a completely sent new one, an
acknowledged (201) upload is the new one, and no object exists that was never completely sent.
Local: the dead process's temporary folder is gone after the restart. S3: uploads cut short
leave pending multipart uploads that never show as objects; the gateway's start aborts those
S3 dates more than ``STALE_UPLOAD_AGE`` (24 h) back and leaves younger ones alone (a live
replica's upload must survive another's start). moto dates every upload 2010-11-10, so against
moto every leftover counts as stale and the restart must abort them all.

The random moments come from ``random.Random(SEED)``; ``CRASH_SEED=n`` replays another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil
import pytest

from backends.s3 import STALE_UPLOAD_AGE
from tests.support.gateway_process import GatewayProcess

if TYPE_CHECKING:
    from tests.support.moto import MotoServer

pytestmark = pytest.mark.slow

SEED: Final = int(os.environ.get("CRASH_SEED", "20261128"))
MiB: Final = 1 << 20
KILLS: Final = 20
SEND_CHUNK: Final = 256 * 1024
PREFIX: Final = "ns/crash"
HEADER: Final = 64

_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Stamp = tuple[int, object]
"""An object's size and what changes with each new version (local: inode and times; S3: ETag)."""


# -- content ------------------------------------------------------------------------------------


class Contents:
    """Distinct, reproducible bodies cut from one random pool (``randbytes`` per body is slow)."""

    def __init__(self, rng: random.Random, pool_size: int) -> None:
        self.rng = rng
        self.pool = rng.randbytes(pool_size)
        self.count = 0

    def make(self, key: str, size: int) -> bytes:
        self.count += 1
        header = f"{key} version {self.count} ".encode().ljust(HEADER, b".")[:HEADER]
        start = self.rng.randrange(0, len(self.pool) - size)
        return header + self.pool[start : start + size - HEADER]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- raw HTTP -----------------------------------------------------------------------------------


@dataclass
class Upload:
    key: str
    data: bytes = field(repr=False)
    digest: str
    duration: float
    last_piece_started: bool = False
    """Set before the last byte is handed to the kernel: from then on the server may commit."""
    sent: int = 0
    status: int | None = None
    error: str | None = None

    def allowed(self, previous: str | None) -> set[str | None]:
        """Given the key's version before this upload, return the versions it may now hold."""
        if self.status == 201:
            return {self.digest}
        if self.last_piece_started and self.status is None:  # no answer: it may have landed
            return {previous, self.digest}
        return {previous}


def _head(method: str, key: str, length: int | None = None) -> bytes:
    lines = [f"{method} /api/v1/files/{key} HTTP/1.1", "Host: gateway", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_status(sock: socket.socket) -> int | None:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def _stream(port: int, upload: Upload) -> None:
    """Send ``upload`` at its pace (in a thread); record how far it got and the status."""
    pieces = range(0, len(upload.data), SEND_CHUNK)
    pause = upload.duration / len(pieces)
    view = memoryview(upload.data)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(_head("PUT", upload.key, len(upload.data)))
            for start in pieces:
                end = start + SEND_CHUNK
                if end >= len(upload.data):
                    upload.last_piece_started = True
                sock.sendall(view[start:end])
                upload.sent = min(end, len(upload.data))
                if end < len(upload.data):
                    time.sleep(pause)
            upload.status = _read_status(sock)
    except OSError as exc:
        upload.error = repr(exc)


def _url(gateway: GatewayProcess, path: str) -> str:
    assert gateway.url is not None
    return f"{gateway.url}/api/v1/{path}"


def http_put(gateway: GatewayProcess, key: str, data: bytes) -> None:
    # urllib's default Content-Type for a body is x-www-form-urlencoded, and moto's server
    # parses such a body as a form: S3 objects would come out empty.
    request = urllib.request.Request(
        _url(gateway, f"files/{key}"),
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with _OPENER.open(request, timeout=60) as response:
        assert response.status == 201


def http_digest(gateway: GatewayProcess, key: str) -> str | None:
    """Return the sha256 of the object at ``key`` as the API serves it (``None``: 404)."""
    try:
        with _OPENER.open(_url(gateway, f"files/{key}"), timeout=60) as response:
            length = int(response.headers["Content-Length"])
            data = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    assert len(data) == length
    return sha(data)


def http_listing(gateway: GatewayProcess, prefix: str) -> dict[str, int]:
    """Return ``{key: size}`` of the files below ``prefix`` as the API lists them."""
    found: dict[str, int] = {}
    cursor = None
    while True:
        query = "recursive=true&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        try:
            with _OPENER.open(_url(gateway, f"list/{prefix}?{query}"), timeout=30) as response:
                page = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return found
            raise
        for entry in page["entries"]:
            if entry["type"] == "File":
                found[entry["key"]] = entry["size"]
        cursor = page.get("cursor")
        if not cursor:
            return found


# -- raw storage --------------------------------------------------------------------------------


class LocalStore:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.tmp = base / ".gateway" / "tmp"

    def objects(self) -> dict[str, Stamp]:
        found: dict[str, Stamp] = {}
        for path in (self.base / PREFIX).rglob("*"):
            if path.is_file():
                st = path.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                found[path.relative_to(self.base).as_posix()] = (st.st_size, stamp)
        return found

    def digest(self, key: str) -> str:
        return sha((self.base / key).read_bytes())

    def tmp_folders(self) -> dict[str, list[str]]:
        if not self.tmp.exists():
            return {}
        # (folders only: the store's checkpoint of the journal is a file there)
        return {
            p.name: sorted(c.name for c in p.iterdir()) for p in self.tmp.iterdir() if p.is_dir()
        }


class S3Store:
    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def objects(self) -> dict[str, Stamp]:
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{PREFIX}/"
        ):
            for item in page.get("Contents", ()):
                found[item["Key"]] = (item["Size"], item["ETag"])
        return found

    def digest(self, key: str) -> str:
        return sha(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def pending_uploads(self) -> list[tuple[str, str, float]]:
        """Return ``(key, upload id, initiated)`` of the multipart uploads in progress."""
        pending = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket
        ):
            for upload in page.get("Uploads", ()):
                at = upload["Initiated"].timestamp()
                pending.append((upload["Key"], upload["UploadId"], at))
        return pending


# -- the kill loop ------------------------------------------------------------------------------


@dataclass
class Stats:
    kills: int = 0
    uploads: int = 0
    cut_mid_body: int = 0
    sent_unacknowledged: int = 0
    acknowledged: int = 0
    new_version_landed_unacknowledged: int = 0
    landed_after_kill: int = 0
    """S3: iterations where a request of the dead process completed after the kill."""
    leftovers_at_kill: int = 0
    """Local: temporary files of the dead process; S3: pending multipart uploads."""


@dataclass
class Round:
    """What one kill may have left: each upload's allowed versions, the other objects' stamps."""

    uploads: list[Upload]
    allowed: dict[str, set[str | None]]
    known: set[str]
    stamps: dict[str, Stamp]
    note: str
    digests: dict[tuple[str, Stamp], str]

    def raw(
        self, store: LocalStore | S3Store, when: str
    ) -> tuple[dict[str, Stamp], dict[str, str | None]]:
        """Check the raw storage holds old or whole new versions, nothing else, nothing partial;
        return its objects' stamps and the sha256 of each upload's key (``None``: absent)."""
        note = self.note
        raw = store.objects()
        assert set(raw) <= self.known, f"{when}: unknown objects {set(raw) - self.known}; {note}"
        for key in self.known - set(self.allowed):
            assert raw.get(key) == self.stamps.get(key), f"{when}: {key} changed; {note}"
        seen: dict[str, str | None] = {}
        for u in self.uploads:
            if u.key not in raw:
                seen[u.key] = None
            else:
                if (u.key, raw[u.key]) not in self.digests:
                    self.digests[u.key, raw[u.key]] = store.digest(u.key)
                seen[u.key] = self.digests[u.key, raw[u.key]]
            assert seen[u.key] in self.allowed[u.key], f"{when}: {u.key} is partial; {note}"
        return raw, seen


@dataclass
class Plan:
    sizes: tuple[int, int]
    overwrite_keys: int
    new_keys: int
    durations: tuple[float, float]
    kill_window: tuple[float, float]


def _kill_loop(
    gateway: GatewayProcess,
    store: LocalStore | S3Store,
    plan: Plan,
    rng: random.Random,
    after_kill: Callable[[int], int],
    after_restart: Callable[[int], None],
) -> Stats:
    contents = Contents(rng, plan.sizes[1] + 8 * MiB)
    stats = Stats()
    state: dict[str, str | None] = {}  # key -> sha256 of the version it must hold (None: absent)
    gateway.start()
    old_keys = [f"{PREFIX}/old-{i}" for i in range(plan.overwrite_keys)]
    for key in old_keys[: max(1, len(old_keys) - 1)]:  # one of them starts absent
        data = contents.make(key, rng.randint(*plan.sizes))
        http_put(gateway, key, data)
        state[key] = sha(data)
        assert http_digest(gateway, key) == state[key] == store.digest(key), key
    for key in old_keys:
        state.setdefault(key, None)
    stamps = store.objects()
    digests: dict[tuple[str, Stamp], str] = {}  # raw versions already read
    served: dict[str, Stamp] = {}  # the version of each key the API last served whole

    for iteration in range(KILLS):
        assert gateway.process is not None and gateway.port is not None
        new_keys = [f"{PREFIX}/new-{iteration}-{j}" for j in range(plan.new_keys)]
        uploads = []
        for key in old_keys + new_keys:
            data = contents.make(key, rng.randint(*plan.sizes))
            uploads.append(Upload(key, data, sha(data), rng.uniform(*plan.durations)))
        kill_after = rng.uniform(*plan.kill_window)
        port = gateway.port
        threads = [threading.Thread(target=_stream, args=(port, u), daemon=True) for u in uploads]
        for thread in threads:
            thread.start()
        time.sleep(kill_after)
        gateway.process.kill()
        assert gateway.process.wait(10) == -9
        stats.kills += 1
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        gateway.stop()  # the process is gone: this only closes the log

        allowed = {u.key: u.allowed(state.get(u.key)) for u in uploads}
        for u in uploads:
            stats.uploads += 1
            if u.status == 201:
                stats.acknowledged += 1
            elif u.last_piece_started:
                stats.sent_unacknowledged += 1
            else:
                stats.cut_mid_body += 1
        note = f"seed {SEED}, iteration {iteration}, kill after {kill_after:.3f} s: {uploads}"

        known = set(state) | set(new_keys)

        # Right after the kill, then after the restart: on S3 a request the dead process
        # had sent (a CompleteMultipartUpload) may still land in between.
        check = Round(uploads, allowed, known, stamps, note, digests)
        at_kill, _ = check.raw(store, "after the kill")
        stats.leftovers_at_kill += after_kill(iteration)
        gateway.start()
        after_restart(iteration)
        raw, seen = check.raw(store, "after the restart")
        if raw != at_kill:
            assert isinstance(store, S3Store), f"files changed with no process; {note}"
            stats.landed_after_kill += 1
        listing = http_listing(gateway, PREFIX)
        sizes = {key: stamp[0] for key, stamp in raw.items()}
        assert listing == sizes, f"the API lists {listing}, the store holds {sizes}; {note}"
        for u in uploads:
            if u.key not in raw or served.get(u.key) != raw[u.key]:  # else: read whole before
                assert http_digest(gateway, u.key) == seen[u.key], f"{u.key} via the API; {note}"
                if u.key in raw:
                    served[u.key] = raw[u.key]
            if seen[u.key] == u.digest and u.status != 201:
                stats.new_version_landed_unacknowledged += 1
            state[u.key] = seen[u.key]
        stamps = raw
        for key in [k for k, v in state.items() if v is None and k not in old_keys]:
            del state[key]

    # Each version was read whole, through the API and raw, when it appeared, and every round
    # checked the untouched objects' stamps: the store is what the last round left.
    assert store.objects() == stamps, f"seed {SEED}"
    assert http_listing(gateway, PREFIX) == {key: stamp[0] for key, stamp in stamps.items()}
    return stats


def _report(backend: str, stats: Stats, started: float) -> None:
    print(
        f"\n[crash {backend}] seed {SEED}: {stats.kills} SIGKILLs, {stats.uploads} uploads "
        f"({stats.cut_mid_body} cut mid-body, {stats.sent_unacknowledged} fully sent but "
        f"unacknowledged, of which {stats.new_version_landed_unacknowledged} landed, "
        f"{stats.landed_after_kill} after the kill; "
        f"{stats.acknowledged} acknowledged), {stats.leftovers_at_kill} leftovers at kill, "
        f"0 partial objects, {time.monotonic() - started:.1f} s"
    )


def test_sigkill_mid_upload_leaves_no_partial_object_local(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    base = tmp_path / "data"
    store = LocalStore(base)
    gateway = GatewayProcess(
        {"storage.type": "local", "storage.local.base-path": str(base), "auth.enabled": False},
        workdir=tmp_path / "work",
    )
    plan = Plan(
        sizes=(6 * MiB, 24 * MiB),
        overwrite_keys=2,
        new_keys=2,
        durations=(0.2, 0.6),
        kill_window=(0.05, 0.75),
    )
    dead_folder: list[str] = []

    def after_kill(iteration: int) -> int:
        folders = store.tmp_folders()
        assert len(folders) == 1, folders  # the dead process's, which it never cleaned
        ((dead, files),) = folders.items()
        dead_folder[:] = [dead]
        return len([f for f in files if f.endswith(".tmp")])

    def after_restart(iteration: int) -> None:
        folders = store.tmp_folders()
        assert dead_folder[0] not in folders, f"iteration {iteration}: {folders}"
        own = [[n for n in f if not n.startswith("journal-")] for f in folders.values()]
        assert own == [["lock"]], folders  # only the live process's own (and its journal)

    try:
        stats = _kill_loop(gateway, store, plan, rng, after_kill, after_restart)
    finally:
        gateway.stop()
    _report("local", stats, started)
    assert stats.kills >= KILLS
    assert stats.cut_mid_body > 0 and stats.leftovers_at_kill > 0


@pytest.fixture
def crash_bucket(moto_server: MotoServer) -> Iterator[tuple[str, Any]]:
    """A new bucket on the session's moto server and a boto3 client; emptied and removed after."""
    from tests.support.moto import s3_client

    assert moto_server.endpoint is not None
    client = s3_client(moto_server.endpoint)
    bucket = f"crash-{random.Random().getrandbits(40):010x}"
    client.create_bucket(Bucket=bucket)
    try:
        yield bucket, client
    finally:
        store = S3Store(client, bucket)
        for key, upload_id, _ in store.pending_uploads():
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
        client.close()


def test_sigkill_mid_upload_leaves_no_partial_object_s3(
    moto_server: MotoServer,
    crash_bucket: tuple[str, Any],
    tmp_path: Path,
) -> None:
    from tests.support.moto import ACCESS_KEY, REGION, SECRET_KEY

    started = time.monotonic()
    rng = random.Random(SEED + 1)
    bucket, client = crash_bucket
    store = S3Store(client, bucket)
    storage = {
        "bucket": bucket,
        "endpoint": moto_server.endpoint,
        "region": REGION,
        "access-key": ACCESS_KEY,
        "secret-key": SECRET_KEY,
        "force-path-style": True,
    }
    gateway = GatewayProcess(
        {"storage.type": "s3", "storage.s3": storage, "auth.enabled": False},
        workdir=tmp_path / "work",
    )
    plan = Plan(
        sizes=(6 * MiB, 12 * MiB),  # the gateway's part size is 8 MiB: many are multipart
        overwrite_keys=2,
        new_keys=1,
        durations=(0.2, 0.6),
        kill_window=(0.05, 0.8),
    )
    pending_at_kill: set[tuple[str, str, float]] = set()
    survivors: set[tuple[str, str, float]] = set()  # young uploads an earlier start left alone

    def after_kill(iteration: int) -> int:
        # A pending upload is never an object: a new key that has one holds nothing. (Objects
        # first: an upload completing in between then shows as neither, not as both.)
        objects = store.objects()
        pending = set(store.pending_uploads())
        for key, _, _ in pending:
            if "/new-" in key:
                assert key not in objects, f"{key}: a pending upload shows as an object"
        pending_at_kill.clear()
        pending_at_kill.update(pending)
        return len(pending - survivors)

    def after_restart(iteration: int) -> None:
        # Start aborts the uploads S3 dates more than STALE_UPLOAD_AGE back, and only those (a
        # live replica's upload in flight must survive another replica's start).
        # moto dates every upload 2010-11-10, so there every leftover is stale and must go.
        cutoff = time.time() - STALE_UPLOAD_AGE
        stale = {upload for upload in pending_at_kill if upload[2] < cutoff}
        young = pending_at_kill - stale
        now = set(store.pending_uploads())
        assert not stale & now, f"iteration {iteration}: stale uploads survived the start"
        assert young <= now, f"iteration {iteration}: young uploads were aborted"
        survivors.clear()
        survivors.update(now)

    try:
        stats = _kill_loop(gateway, store, plan, rng, after_kill, after_restart)
    finally:
        gateway.stop()
    _report("s3", stats, started)
    assert stats.kills >= KILLS
    assert stats.cut_mid_body > 0 and stats.leftovers_at_kill > 0


# -- client disconnects -------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _abort_upload(
    port: int, key: str, total: int, body: bytes, *, reset: bool, in_flight: Callable[[], bool]
) -> None:
    """Send ``body`` of an upload of ``total`` bytes, wait until it is ``in_flight``, close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_head("PUT", key, total) + body)
    assert _wait_for(in_flight), "the upload never got under way"
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _abort_download(
    port: int, key: str, keep: int, *, reset: bool, in_flight: Callable[[], bool]
) -> None:
    """Read ``keep`` bytes of a download, check it is ``in_flight``, close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(_head("GET", key))
    received = 0
    while received < keep:
        chunk = sock.recv(65536)
        assert chunk
        received += len(chunk)
    assert in_flight(), "the download is not under way"
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_client_disconnect_mid_upload_and_mid_download(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    contents = Contents(rng, 40 * MiB)
    base = tmp_path / "data"
    store = LocalStore(base)
    gateway = GatewayProcess(
        {"storage.type": "local", "storage.local.base-path": str(base), "auth.enabled": False},
        workdir=tmp_path / "work",
    )
    gateway.start()
    try:
        assert gateway.process is not None and gateway.port is not None
        port = gateway.port
        proc = psutil.Process(gateway.process.pid)
        old_key, new_key = f"{PREFIX}/kept.bin", f"{PREFIX}/never.bin"
        old = contents.make(old_key, 16 * MiB)
        http_put(gateway, old_key, old)
        assert http_digest(gateway, old_key) == sha(old)  # warms up the paths we exercise
        time.sleep(0.3)
        baseline: int = proc.num_fds()

        def settled() -> bool:
            folders = store.tmp_folders()
            # the lock, files of replaced objects kept for later writes (usage documents), the
            # journal of small writes
            kept = [
                [n for n in f if not n.endswith(".spare") and not n.startswith("journal-")]
                for f in folders.values()
            ]
            return proc.num_fds() <= baseline and all(f == ["lock"] for f in kept)

        def writing() -> bool:  # a temporary file holds some of the body
            files = [f for fs in store.tmp_folders().values() for f in fs if f.endswith(".tmp")]
            return bool(files) and proc.num_fds() > baseline

        def reading() -> bool:
            count: int = proc.num_fds()
            return count > baseline

        for reset in (False, True):
            for key in (old_key, new_key):
                body = contents.make(key, 12 * MiB)
                total = len(body) + 4 * MiB
                _abort_upload(port, key, total, body, reset=reset, in_flight=writing)
                assert _wait_for(settled), (proc.num_fds(), baseline, store.tmp_folders())
                assert http_digest(gateway, old_key) == sha(old)
                assert store.digest(old_key) == sha(old)
                assert http_digest(gateway, new_key) is None
                assert list(store.objects()) == [old_key]
            for keep in (1, 4 * MiB):
                _abort_download(port, old_key, keep, reset=reset, in_flight=reading)
                assert _wait_for(lambda: proc.num_fds() <= baseline), (proc.num_fds(), baseline)
                assert http_digest(gateway, old_key) == sha(old)
        # still serving: a whole upload and download go through, and no descriptor leaked
        fresh = contents.make(new_key, 9 * MiB)
        http_put(gateway, new_key, fresh)
        assert http_digest(gateway, new_key) == sha(fresh)
        assert _wait_for(settled), (proc.num_fds(), baseline)
    finally:
        gateway.stop()
