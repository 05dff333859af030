"""Metrics, access logs and the audit hook: one middleware, outermost, sees every request.

Metrics (Prometheus text exposition at ``GET /metrics``, a super admin when auth is on: the
labels name tenants), in a registry of the application's own (several applications in one
process do not collide)::

    gateway_requests_total{tenant, route, method, status}
    gateway_request_duration_seconds{tenant, route, method}     histogram
    gateway_bytes_received_total{tenant, route}                 request bodies
    gateway_bytes_sent_total{tenant, route}                     response bodies (Content-Length)
    gateway_audit_failures_total, gateway_audit_dropped_total

With ``--workers N`` the workers count into one set of totals: each worker's values live in
memory-mapped files of a folder the parent makes (prometheus_client's multiprocess mode,
``share_metrics``), and ``/metrics``, whichever worker answers it, sums every worker's, those of
workers that have exited too, so no total ever goes down. (Otherwise each scrape would see
the one worker the kernel handed its connection to, and the totals would jump up and down.)

Every label value is bounded: ``route`` is an object route word (``files``, ``stats``, ``list``,
``directories``, ``move``), a registered route template (``/api/v1/tenants/{tenant}``) or
``other``; ``tenant`` is a tenant id only if the registry knows it, ``""`` for the null tenant
and routes without one, ``-`` for anything else (a hostile URL cannot add label values);
``method`` is a standard method or ``OTHER``.

Access log: one JSON line per request on the logger ``gateway.access`` (time, method, path as
sent, status, duration_ms, bytes_in, bytes_out, route, tenant, identity kind and name). Never a
header value, a password or a token. Under ``gateway serve`` the lines go straight into the
batching handler's buffer: a ``logging`` record per request cost more than the rest of the
bookkeeping (measured: 42 us a record, 6 us a line added directly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .access import Identity, identify
from .audit import WAIT_BEFORE_RESPONSE, AuditLog, Pending, iso_time, make_record, now_ns
from .documents import encode_text
from .errors import Forbidden
from .state import CONFIG, IN_FLIGHT, REGISTRY
from .zerocopy import TAKEN

access_log = logging.getLogger("gateway.access")

METHODS: Final = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})
NULL_TENANT_LABEL: Final = ""
UNKNOWN_TENANT_LABEL: Final = "-"
OTHER_ROUTE: Final = "other"
CATCH_ALL: Final = "/api/v1/{tail}"
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# (route word, method) of the object API -> the audit record's action
OBJECT_MUTATIONS: Final = {
    ("files", "PUT"): "file.write",
    ("files", "DELETE"): "file.delete",
    ("directories", "POST"): "directory.create",
    ("move", "POST"): "file.move",
    ("purge", "POST"): "files.purge",
}


_shared_folder: str | None = None  # set by share_metrics in a worker of ``serve --workers N``


def share_metrics(folder: str) -> None:
    """In a worker process (before its application is made): keep every metric's values in
    memory-mapped files in ``folder``, one set per process, which every worker's ``/metrics``
    sums (prometheus_client's multiprocess mode). ``folder`` is the parent's, new and empty
    when it starts, removed when it ends."""
    global _shared_folder
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # where the files go (read by the library)
    pid = os.getpid()  # this worker's, fixed: no system call per increment to ask again
    values.ValueClass = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]
    _shared_folder = folder


class Metrics:
    """The application's Prometheus collectors, in a registry of its own (in a worker of
    ``serve --workers N``, their values go to the shared files: ``share_metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by tenant, route, method and status.",
            ["tenant", "route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time to decide the response (downloads: to send it), by tenant, route and method.",
            ["tenant", "route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.received = Counter(
            "gateway_bytes_received",
            "Request body bytes read, by tenant and route.",
            ["tenant", "route"],
            registry=self.registry,
        )
        self.sent = Counter(
            "gateway_bytes_sent",
            "Response body bytes, by tenant and route.",
            ["tenant", "route"],
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "gateway_audit_failures",
            "Audit records the store did not take.",
            registry=self.registry,
        )
        self.audit_dropped = Counter(
            "gateway_audit_dropped",
            "Audit records dropped because too many were waiting to be written.",
            registry=self.registry,
        )
        self.journal_batches = Counter(
            "gateway_journal_batches",
            "Batches of the local backend's journal, each made durable by one flush.",
            registry=self.registry,
        )
        self.journal_records = Counter(
            "gateway_journal_records",
            "Records in those batches (small writes, markers of other changes, checkpoints).",
            registry=self.registry,
        )
        self.journal_checkpoints = Counter(
            "gateway_journal_checkpoints",
            "Checkpoints of the journal (a syncfs of the store, after which a replay ignores "
            "older records).",
            registry=self.registry,
        )

        # Children of the labelled collectors, by label values: ``labels()`` validates and
        # locks on every call, a dictionary lookup does not. As bounded as the labels.
        self._children: dict[tuple[str, str, str, str], _Children] = {}

    def observe(
        self,
        tenant: str,
        route: str,
        method: str,
        status: int,
        elapsed: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Count one answered request."""
        key = (tenant, route, method, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(
                self.requests.labels(*key),
                self.duration.labels(tenant, route, method),
                self.received.labels(tenant, route),
                self.sent.labels(tenant, route),
            )
        children.requests.inc()
        children.duration.observe(elapsed)
        if bytes_in:
            children.received.inc(bytes_in)
        if bytes_out:
            children.sent.inc(bytes_out)

    def observe_journal(self, kind: str, count: int) -> None:
        """The local backend journal's observer (``LocalBackend.journal_observer``)."""
        if kind == "batch":
            self.journal_batches.inc()
            self.journal_records.inc(count)
        elif kind == "checkpoint":
            self.journal_checkpoints.inc(count)

    def exposition(self) -> bytes:
        if _shared_folder is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=_shared_folder)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)


@dataclass(frozen=True, slots=True)
class _Children:
    requests: Counter
    duration: Histogram
    received: Counter
    sent: Counter


@dataclass(slots=True)
class RequestInfo:
    """What the middleware learns about a request from the code that handles it."""

    route: str = OTHER_ROUTE
    tenant: str = NULL_TENANT_LABEL
    identity: Identity | None = None
    audit: Pending | None = None


METRICS: Final = web.AppKey("metrics", Metrics)
AUDIT: Final = web.AppKey("audit", AuditLog)
REQUEST_INFO: Final = web.RequestKey("gateway_request_info", RequestInfo)


def _info(request: web.Request) -> RequestInfo | None:
    return request.get(REQUEST_INFO)


def tenant_label(request: web.Request, tenant: str | None) -> str:
    """Given a tenant id as sent (``None``: the null tenant), return its bounded label."""
    if tenant is None:
        return NULL_TENANT_LABEL
    return tenant if tenant in request.app[REGISTRY].snapshot.tenants else UNKNOWN_TENANT_LABEL


def note_route(request: web.Request, word: str, raw_tenant: str | None) -> None:
    """Called by ``dispatch``: the object route word and the URL's tenant segment."""
    info = _info(request)
    if info is not None:
        info.route = word
        info.tenant = tenant_label(request, raw_tenant)


def note_identity(request: web.Request, identity: Identity | None) -> None:
    info = _info(request)
    if info is not None:
        info.identity = identity


def note_mutation(
    request: web.Request, tenant: str | None, action: str, key: str | None = None
) -> Pending | None:
    """Called once a mutation passed authorization: its record is written with the status."""
    info = _info(request)
    if info is None:
        return None
    info.audit = Pending(tenant, action, key)
    return info.audit


def note_key(request: web.Request, key: str) -> None:
    """Set the key of the mutation being recorded (a move: ``from -> to``)."""
    info = _info(request)
    if info is not None and info.audit is not None:
        info.audit.key = key


def _bytes_out(request: web.Request, response: web.StreamResponse | None, status: int) -> int:
    if response is None or request.method == "HEAD" or status in (204, 304):
        return 0
    return response.content_length or 0


def _iso_now() -> str:
    """The time now, ISO 8601 in UTC with milliseconds (``2026-11-28T13:35:12.345Z``)."""
    return iso_time(time.time_ns())


def _finish(
    request: web.Request,
    info: RequestInfo,
    status: int,
    response: web.StreamResponse | None,
    started: float,
) -> asyncio.Future[bool] | None:
    """Record the metrics and the access line; start the audit record's write (if any)."""
    elapsed = time.perf_counter() - started
    method = request.method if request.method in METHODS else "OTHER"
    taken = request.get(TAKEN)
    bytes_in = taken.length if taken is not None else getattr(request.content, "total_bytes", 0)
    bytes_out = _bytes_out(request, response, status)
    metrics = request.app[METRICS]
    metrics.observe(info.tenant, info.route, method, status, elapsed, bytes_in, bytes_out)
    identity = info.identity
    who = None if identity is None else {"kind": identity.kind, "name": identity.name}
    if access_log.isEnabledFor(logging.INFO):
        line = {
            "time": _iso_now(),
            "method": method,
            "path": request.raw_path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "route": info.route,
            "tenant": info.tenant,
            "identity": who,
            "remote": request.remote,
        }
        text = encode_text(line)
        writer = _access_writer
        if writer is not None and access_log.handlers == [writer] and not access_log.filters:
            writer.add(text)  # nobody else listens: no record needed
        else:
            access_log.info(text)
    pending = info.audit
    if pending is None:
        return None
    snapshot = request.app[REGISTRY].snapshot
    if pending.tenant is not None and pending.tenant not in snapshot.tenants:
        return None  # a record only for a tenant that exists (no folder per hostile id)
    audit = request.app[AUDIT]
    stamp = now_ns()
    task = audit.submit(pending.tenant, make_record(pending, who, status, stamp), stamp)
    if task is None:
        metrics.audit_dropped.inc()
        return None
    task.add_done_callback(lambda done: _count_audit(metrics, done))
    return task


def _count_audit(metrics: Metrics, task: asyncio.Future[bool]) -> None:
    if task.cancelled() or not task.result():
        metrics.audit_failures.inc()


@web.middleware
async def observability_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The outer middleware: the request counted in flight (shutdown waits for it) until its
    answer and its audit record's wait end; metrics, the access line, the audit record."""
    tracker = request.app[IN_FLIGHT]
    tracker.enter()
    try:
        started = time.perf_counter()
        info = RequestInfo()
        resource = request.match_info.route.resource
        canonical = None if resource is None else resource.canonical
        if canonical is not None and canonical != CATCH_ALL:
            info.route = canonical
            if "tenant" in request.match_info:
                info.tenant = tenant_label(request, request.match_info["tenant"])
        request[REQUEST_INFO] = info
        try:
            response = await handler(request)
        except BaseException as exc:
            if isinstance(exc, web.HTTPException):
                status = exc.status
            elif isinstance(exc, asyncio.CancelledError):
                status = 499  # the client went away (nginx's word for it)
            else:
                status = 500
            _finish(request, info, status, None, started)
            raise
        task = _finish(request, info, response.status, response, started)
        if task is not None:
            # Bounded: a slow store delays the answer by WAIT_BEFORE_RESPONSE at most, and
            # the write goes on in the background (the audit log tracks it; shutdown flushes
            # it).
            await _wait_at_most(task, WAIT_BEFORE_RESPONSE)
        return response
    finally:
        tracker.leave()


async def _wait_at_most(future: asyncio.Future[Any], timeout: float) -> None:
    """``asyncio.wait({future}, timeout=timeout)``, with less to make on every request."""
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(timeout, wake)
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: the text exposition (a super admin when auth is on)."""
    if request.app[CONFIG]["auth.enabled"]:
        identity = await identify(request, request.app[REGISTRY])
        note_identity(request, identity)
        if not identity.super_admin:
            raise Forbidden("metrics need a super admin")
    metrics = request.app[METRICS]
    body = await asyncio.to_thread(metrics.exposition)  # with workers: reads their files
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- logging -----------------------------------------------------------------------------------


class BadRequestLogFilter(logging.Filter):
    """aiohttp logs every request its parser rejects at ERROR with a traceback: anyone could
    flood the log. This makes each one a single WARNING line, without the traceback (nor the
    parser's message, which may quote header bytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if not exc_info or not isinstance(exc_info[1], HttpProcessingError):
            return True
        exc = exc_info[1]
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "rejected a malformed request from %s: %s (%s)"
        record.args = (remote, type(exc).__name__, exc.code)
        record.levelno = logging.WARNING
        record.levelname = logging.getLevelName(logging.WARNING)
        record.exc_info = None
        record.exc_text = None
        return True


def install_log_filters() -> None:
    """Install ``BadRequestLogFilter`` on ``aiohttp.server`` (once)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestLogFilter) for f in server.filters):
        server.addFilter(BadRequestLogFilter())


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes its lines in batches: at most ``max_bytes`` buffered, and
    none kept longer than ``max_seconds`` (a timer thread writes them).

    One write per request to a log file costs more than the rest of a small request (two
    workers appending to one file contend on it); a batch costs one write. What a killed
    process had buffered, at most ``max_seconds`` of lines, is lost.
    """

    def __init__(self, stream: Any, max_seconds: float = 0.2, max_bytes: int = 1 << 16) -> None:
        super().__init__(stream)
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self._pending: list[str] = []
        self._size = 0
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, message: str) -> None:
        """Write ``message`` as a line, as ``emit`` would a record that formats to it, without
        making a record (most of the cost of a line)."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self._add(message)
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": message}))

    def _add(self, message: str) -> None:
        line = message + self.terminator
        self._pending.append(line)
        self._size += len(line)
        if self._size >= self.max_bytes:
            self._write()
        elif self._timer is None:
            self._timer = threading.Timer(self.max_seconds, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self.stream.write("".join(self._pending))
            self._pending.clear()
            self._size = 0
        self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()


def configure_logging(level: int = logging.INFO) -> None:
    """``gateway serve``'s logging: text lines on stderr, access lines as bare JSON on stderr
    (written in batches, at most 0.2 s late)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    global _access_writer
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    _access_writer = handler
    install_log_filters()


# Set by ``configure_logging``: the access lines go straight to this handler's batch, without a
# ``logging`` record each. Unset (the gateway embedded in another program, tests), they go to
# the ``gateway.access`` logger.
_access_writer: BatchingStreamHandler | None = None
