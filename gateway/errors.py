"""Errors the gateway answers with, each carrying its HTTP status.

One middleware (``gateway.app.answer_middleware``) turns these, and the builtin exceptions
backends raise, into JSON ``{"error": code, "message": text}`` answers. Messages are written
for the caller: they name the rule that was broken, never a physical path, a stack trace or
another tenant's name.

Tree::

    GatewayError (500 internal)
    ├── BadRequest (400 bad_request)
    │   ├── InvalidKey (400 invalid_key)            a key broke a rule of gateway.keys
    │   ├── InvalidTenant (400 invalid_tenant)      a tenant id outside the grammar
    │   └── ChecksumMismatch (400 checksum_mismatch)
    ├── Unauthorized (401 unauthorized)             with WWW-Authenticate
    │   └── SignInRequired (401 unauthorized)       no session or an ended one (web UI)
    ├── Forbidden (403 forbidden)
    │   └── CsrfRefused (403 csrf_token_required)
    ├── NotFound (404 not_found)
    │   └── TenantNotFound (404 tenant_not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── RequestTimeout (408 request_timeout)        a client stopped sending its body
    ├── Conflict (409 conflict)
    ├── PreconditionFailed (412 precondition_failed)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── RangeNotSatisfiable (416 range_not_satisfiable)
    ├── TooManyAttempts (429 too_many_attempts)     with Retry-After (gateway.guard)
    ├── SignInsBusy (503 sign_ins_busy)             with Retry-After (gateway.guard)
    ├── InsufficientStorage (507 insufficient_storage)
    └── StorageUnavailable (503 storage_unavailable)
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class InvalidKey(BadRequest):
    """A key (or ``kestra://`` URI) broke one of the rules of ``gateway.keys``."""

    code = "invalid_key"

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule

    def body(self) -> dict[str, object]:
        return {**super().body(), "rule": self.rule}


class InvalidTenant(InvalidKey):
    code = "invalid_tenant"


class ChecksumMismatch(BadRequest):
    code = "checksum_mismatch"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    code = "request_timeout"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class PreconditionFailed(GatewayError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(GatewayError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class _TryLater(GatewayError):
    """A refusal that says when to try again (the ``Retry-After`` header, in seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyAttempts(_TryLater):
    """429: this address spent its budget of failed password checks."""

    status = 429
    code = "too_many_attempts"


class SignInsBusy(_TryLater):
    """503: too many password checks are waiting to be hashed."""

    status = 503
    code = "sign_ins_busy"


class StorageUnavailable(GatewayError):
    status = 503
    code = "storage_unavailable"


class InsufficientStorage(GatewayError):
    status = 507
    code = "insufficient_storage"


class Unauthorized(GatewayError):
    """No credentials, or credentials that do not hold (RFC 9110, 15.5.2: with a challenge)."""

    status = 401
    code = "unauthorized"
    CHALLENGE = 'Basic realm="gateway", charset="UTF-8", Bearer realm="gateway"'


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class SignInRequired(Unauthorized):
    """No session, or one that ended: the web UI signs in again.

    Its challenge names no scheme a browser knows, so a page's request gets no password dialog.
    """

    CHALLENGE = 'Session realm="gateway"'


class CsrfRefused(Forbidden):
    """A mutating request authenticated by the session cookie without its CSRF token."""

    code = "csrf_token_required"
