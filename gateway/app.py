"""The aiohttp application: ``create_app(config) -> web.Application``.

A request for ``/api/v1/...`` goes: observability (in-flight count, metrics, access log, audit
record) -> answers (503 until the storage is ready, errors as JSON) -> ``dispatch`` (the scope
from the URL's tenant segment as sent, the key decoded once from the request line) -> a handler
of ``gateway.files``, whose first step is ``keys.resolve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Final

from aiohttp import web

from backends.base import Backend
from backends.local import LocalBackend
from backends.registry import backend_class

from . import admin, files, keys, lifecycle_api, observability, webui, zerocopy
from .access import Action, authorize, identify
from .audit import AuditLog
from .config import Config
from .errors import Conflict, GatewayError, InsufficientStorage, NotFound, Unauthorized
from .guard import SignInGuard, hashing_places
from .keys import Scope
from .observability import AUDIT, METRICS, Metrics, metrics_handler, observability_middleware
from .openapi import openapi_document
from .registry import Registry
from .sessions import SESSIONS, Sessions
from .state import BACKEND, CONFIG, GUARD, IN_FLIGHT, REGISTRY, STARTED, TENANCY, USAGE, InFlight
from .tenancy import Tenancy
from .usage import Usage

log = logging.getLogger("gateway")

Handler = Callable[[web.Request, Scope, str | None], Awaitable[web.StreamResponse]]

# Route word -> method -> (handler, what the caller's role must allow).
ACTIONS: Final[Mapping[str, Mapping[str, tuple[Handler, Action]]]] = MappingProxyType(
    {
        "files": {
            "GET": (files.get_file, "read"),
            "HEAD": (files.get_file, "read"),
            "PUT": (files.put_file, "write"),
            "DELETE": (files.delete, "write"),
        },
        "stats": {"GET": (files.stat, "read")},
        "list": {"GET": (files.list_dir, "read")},
        "directories": {"POST": (files.make_directory, "write")},
        "move": {"POST": (files.move, "write")},
        "usage": {"GET": (lifecycle_api.usage, "manage")},
        "purge": {"POST": (lifecycle_api.purge, "manage")},
    }
)
API_PREFIX: Final = "/api/v1/"
# The key may hold any character once decoded (even a newline, to be refused): match all.
CATCH_ALL_PATTERN: Final = r"/api/v1/{tail:[\s\S]*}"
CATCH_ALL: Final = "/api/v1/{tail}"
READY_TIMEOUT: Final = 5.0
START_WAIT: Final = 5.0  # seconds start-up waits for the store before serving regardless
RETRY_MAX: Final = 5.0  # longest pause between attempts to reach the store
ALWAYS_SERVED: Final = frozenset({"/health/live", "/health/ready", "/openapi.json", "/metrics"})


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _from_exception(exc: BaseException) -> web.Response | None:
    """Given an exception from a handler or a backend, return its JSON answer.

    Most specific class first; a backend's builtin exceptions keep their meaning, and a
    message never carries what the exception said (it may hold a physical path).
    """
    if isinstance(exc, GatewayError):
        response = web.json_response(exc.body(), status=exc.status)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = exc.CHALLENGE
        size = getattr(exc, "size", None)
        if size is not None:  # RFC 9110, 14.4: 416 says how large the object is
            response.headers["Content-Range"] = f"bytes */{size}"
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:  # 429 and 503 of gateway.guard: when to try again
            response.headers["Retry-After"] = str(retry_after)
        return response
    if isinstance(exc, FileNotFoundError):
        return _error(404, "not_found", "no file or directory at this key")
    if isinstance(exc, FileExistsError):
        return _error(409, "conflict", "something already exists at this key")
    if isinstance(exc, IsADirectoryError):
        return _error(409, "is_a_directory", "a directory is at this key")
    if isinstance(exc, NotADirectoryError):
        return _error(409, "not_a_directory", "a file is where this key needs a directory")
    if isinstance(exc, PermissionError):
        return _error(403, "storage_refused", "the storage refused this operation")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        error = InsufficientStorage("the storage is full; nothing was stored")
        return web.json_response(error.body(), status=error.status)
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return _error(503, "storage_unavailable", "the storage failed; try again later")
    return None


@web.middleware
async def answer_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The inner middleware (one layer, not three, on every request): 503 until the storage
    is ready; every error turned into its JSON answer (``_answer``); then a connection whose
    body was taken closed (``zerocopy.after_taken_body``)."""
    if not request.app[STARTED].is_set() and request.path not in ALWAYS_SERVED:
        return _error(503, "storage_unavailable", "the storage is not ready yet; try again")
    return await zerocopy.after_taken_body(request, await _answer(request, handler))


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _error(exc.status, code, exc.reason, headers={
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")
        })  # fmt: skip
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        response = _from_exception(exc)
        if response is None:
            log.exception("unexpected error on %s %s", request.method, request.path)
            return _error(500, "internal", "internal error")
        if response.status >= 500:
            log.warning("%s %s: %r", request.method, request.path, exc)
        return response


async def _refuse_other_method(request: web.Request) -> None:
    """Raise 405 if a fixed route (the admin API) has this path but not this method.

    The catch-all object route takes every method, so aiohttp's own 405 never fires for the
    fixed routes registered before it (RFC 9110, 15.5.6: 405 with the Allow header).
    """
    for resource in request.app.router.resources():
        if resource.canonical == CATCH_ALL:
            continue
        match, allowed = await resource.resolve(request)
        if match is None and allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Given ``/api/v1/[{tenant}/]{action}[/{key}]``, call the action's handler.

    The tenant and the key are read from the request line as sent (``raw_path``), not from
    aiohttp's decoded path: the tenant must match its grammar without decoding, and the key
    is decoded exactly once, here, by ``keys.decode_path``.
    """
    path = request.raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith(API_PREFIX):
        raise NotFound("no such route")
    rest = path[len(API_PREFIX) :].split("/")
    raw_tenant: str | None = None
    if rest[0] not in ACTIONS:
        raw_tenant, rest = rest[0], rest[1:]
    if not rest or rest[0] not in ACTIONS:
        await _refuse_other_method(request)
        raise NotFound("no such route")
    methods = ACTIONS[rest[0]]
    if request.method not in methods:
        raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
    handler, action = methods[request.method]
    observability.note_route(request, rest[0], raw_tenant)
    registry = request.app[REGISTRY]
    tenancy = request.app[TENANCY]
    tenancy.check_mode(raw_tenant)
    identity = await identify(request, registry) if request.app[CONFIG]["auth.enabled"] else None
    observability.note_identity(request, identity)
    scope = tenancy.scope(raw_tenant)
    authorize(registry.snapshot, identity, scope, action)
    # Past authorization: a mutation is recorded in the tenant's audit log, whatever its answer.
    mutation = observability.OBJECT_MUTATIONS.get((rest[0], request.method))
    audited = None
    if mutation is not None:
        audited = observability.note_mutation(request, scope.tenant, mutation)
    tail = rest[1:]
    raw_key: str | None
    if tail:
        raw_key = keys.decode_path("/".join(tail))
    elif "uri" in request.query:
        raw_key = keys.parse_uri(request.query["uri"])
    else:
        raw_key = None
    if audited is not None and raw_key is not None:
        audited.key = raw_key
    return await handler(request, scope, raw_key)


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def health_ready(request: web.Request) -> web.Response:
    if not request.app[STARTED].is_set():
        return _error(503, "storage_unavailable", "the storage is not reachable yet")
    try:
        await asyncio.wait_for(request.app[BACKEND].ready(), READY_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        log.warning("readiness check failed: %r", exc)
        return _error(503, "storage_unavailable", "the storage is not reachable")
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def make_backend(config: Config) -> Backend:
    """Given the configuration, return the backend named by ``storage.type`` (not started)."""
    kind = config["storage.type"]
    cls = backend_class(kind)
    if kind == "local":
        return cls(  # type: ignore[call-arg]
            config["storage.local.base-path"],
            io_uring=config["storage.local.io-uring"],
            journal=config["storage.local.journal"],
        )
    if kind == "s3":
        return cls(  # type: ignore[call-arg]
            config["storage.s3.bucket"],
            endpoint=config["storage.s3.endpoint"],
            region=config["storage.s3.region"],
            access_key=config["storage.s3.access-key"],
            secret_key=config["storage.s3.secret-key"],
            path=config["storage.s3.path"],
            force_path_style=config["storage.s3.force-path-style"],
        )
    return cls()


async def _wait_for_tenant(registry: Registry, tenant_id: str, timeout: float = 10.0) -> None:
    """Refresh until the snapshot holds a tenant another replica created, so that this one
    does not answer "no such tenant" for it once ready."""
    async with asyncio.timeout(timeout):
        while tenant_id not in registry.snapshot.tenants:
            await registry.refresh()
            if tenant_id not in registry.snapshot.tenants:
                await asyncio.sleep(0.05)


async def start_registry(registry: Registry, config: Config) -> None:
    """Load the registry, create the configured tenants, and the first super admin."""
    await registry.start()
    for tenant_id in config["tenants.ids"]:
        if tenant_id not in registry.snapshot.tenants:
            try:
                await registry.create_tenant(tenant_id, tenant_id)
            except Conflict:  # another replica (or worker) created it meanwhile
                await _wait_for_tenant(registry, tenant_id)
    if not config["auth.enabled"]:
        log.warning("auth.enabled is false: every caller may read and write every tenant")
        return
    password = await registry.ensure_bootstrap_admin(
        config["admin.username"], config["admin.password"], config["admin.password-file"]
    )
    if password is not None:
        name = config["admin.username"] or "admin"
        # Shown once, on the console of the operator who started the first instance.
        print(
            f"created super admin {name!r} with a generated password (also written, mode 0600, "
            f"to {config['admin.password-file']}): {password}",
            file=sys.stderr,
            flush=True,
        )


async def _start_storage(app: web.Application, config: Config) -> None:
    """Start the backend and the registry, retrying while the store does not answer."""
    delay = 0.5
    backend_started = False
    while True:
        try:
            if not backend_started:
                await app[BACKEND].start()
                backend_started = True
            await start_registry(app[REGISTRY], config)
        except OSError as exc:
            log.warning("storage not ready (%s); retrying in %.0f s", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            continue
        app[STARTED].set()
        return


def create_app(config: Config, backend: Backend | None = None) -> web.Application:
    """Given a checked configuration (and optionally a backend), return the application."""
    app = web.Application(middlewares=[observability_middleware, answer_middleware])
    observability.install_log_filters()
    app[IN_FLIGHT] = InFlight()
    app[METRICS] = Metrics()
    app[CONFIG] = config
    app[BACKEND] = backend if backend is not None else make_backend(config)
    store = app[BACKEND]
    if isinstance(store, LocalBackend):  # its journal's batches and checkpoints
        store.journal_observer = app[METRICS].observe_journal
    app[TENANCY] = Tenancy(config)
    app[REGISTRY] = Registry(app[BACKEND], refresh_interval=config["auth.cache-seconds"])
    app[AUDIT] = AuditLog(app[BACKEND])
    app[SESSIONS] = Sessions(
        app[BACKEND],
        lifetime=config["auth.session-seconds"],
        cache_seconds=config["auth.cache-seconds"],
    )
    app[USAGE] = Usage(app[BACKEND])
    app[GUARD] = SignInGuard(
        config["auth.sign-in-attempts"], hashing=hashing_places(config["server.workers"])
    )

    app[STARTED] = asyncio.Event()

    async def storage(app: web.Application) -> AsyncIterator[None]:
        # A store that does not answer yet (MinIO still starting, a bucket made by a job) is
        # waited for in the background: the process serves /health/live, answers 503
        # elsewhere and keeps trying, rather than exiting into a crash loop. A configuration
        # the backend refuses (ValueError) still stops the start at once.
        starting = asyncio.create_task(_start_storage(app, config), name="storage-start")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(starting), START_WAIT)
        if starting.done() and starting.exception() is not None:
            raise starting.exception()  # type: ignore[misc]
        app[USAGE].start()
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            await app[AUDIT].close()  # the records of the last requests, before the store goes
            await app[USAGE].close()  # the last counts, too
            await app[REGISTRY].close()
            await app[BACKEND].close()

    app.cleanup_ctx.append(storage)
    app.router.add_get("/health/live", health_live)
    app.router.add_get("/health/ready", health_ready)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", metrics_handler)
    admin.add_routes(app.router)  # before the catch-all: these words are reserved tenant ids
    webui.add_routes(app)  # /ui/ and /api/v1/session
    app.router.add_route("*", CATCH_ALL_PATTERN, dispatch)
    return app
