"""The OpenAPI 3.0 document the gateway serves at ``/openapi.json``.

Every object route exists twice: ``/api/v1/{tenant}/...`` for a named tenant and
``/api/v1/...`` for the null tenant (where the configuration serves it).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any, Final

from . import __version__

_ERROR_REF: Final = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid key, tenant id, header or body; `rule` names the broken rule.",
        401: "Authentication required (Basic for users, Bearer for tokens).",
        403: "No access (the same answer whether or not the tenant exists).",
        404: "No such object, tenant or route.",
        405: "Method not allowed.",
        408: "The client stopped sending its body (server.read-timeout); nothing was stored.",
        409: "A file or directory is in the way.",
        412: "A precondition failed.",
        413: "The body is larger than limits.max-object-size or the tenant's maxObjectSize.",
        416: "The range starts past the end of the object.",
        429: "Too many failed password checks from this address (auth.sign-in-attempts a "
        "minute); Retry-After says when to try again.",
        503: "The storage is unavailable, or too many password checks are waiting (with "
        "Retry-After).",
        507: "The storage is full, or the upload would cross the tenant's maxBytes quota.",
    }
    if 401 in statuses:  # a password sent with the request is checked under the guard
        statuses = (*statuses, 429)
    return {str(s): _json(_ERROR_REF, reasons[s]) for s in statuses}


_KEY_PARAM: Final = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "The object key, `/`-separated, percent-encoded once. See the key rules.",
    "schema": {"type": "string"},
}
_TENANT_PARAM: Final = {
    "name": "tenant",
    "in": "path",
    "required": True,
    "description": "Tenant id: 1-63 of `a-z`, `0-9`, `-`, `_`, starting with a letter or digit.",
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}
_BINARY: Final = {"type": "string", "format": "binary"}
_HEADERS_OUT: Final = {
    "ETag": {"schema": {"type": "string"}},
    "Last-Modified": {"schema": {"type": "string"}},
    "Content-Length": {"schema": {"type": "integer"}},
}


def _object_ops() -> dict[str, Any]:
    range_headers = [
        {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
        for h in ("Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since",
                  "If-Unmodified-Since")
    ]  # fmt: skip
    download = {
        "200": {
            "description": "The object's bytes.",
            "headers": _HEADERS_OUT,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        "206": {
            "description": "The requested range.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        "304": {"description": "Not modified."},
        **_errors(400, 404, 409, 412, 416, 503),
    }
    return {
        "get": {
            "summary": "Download an object (streamed; ranges and conditional requests).",
            "parameters": range_headers,
            "responses": download,
        },
        "head": {
            "summary": "The object's headers without its body.",
            "parameters": range_headers,
            "responses": {
                "200": {"description": "Headers of the object.", "headers": _HEADERS_OUT},
                "206": {"description": "Headers of the range."},
                "304": {"description": "Not modified."},
                **{
                    status: {"description": answer["description"]}
                    for status, answer in _errors(400, 404, 409, 412, 416, 503).items()
                },
            },
        },
        "put": {
            "summary": "Upload an object (streamed, atomic, durable on success).",
            "parameters": [
                {"name": "Content-MD5", "in": "header", "required": False,
                 "description": "Base64 MD5 of the body; a mismatch stores nothing (400).",
                 "schema": {"type": "string"}},
                {"name": "X-Checksum-Sha256", "in": "header", "required": False,
                 "description": "SHA-256 of the body, hex or base64; a mismatch stores nothing.",
                 "schema": {"type": "string"}},
                {"name": "If-None-Match", "in": "header", "required": False,
                 "description": "`*`: create only (412 if the key exists).",
                 "schema": {"type": "string", "enum": ["*"]}},
            ],
            "requestBody": {
                "required": False,
                "description": "The bytes; `Content-Type` and `X-Meta-<name>` headers are stored.",
                "content": {"application/octet-stream": {"schema": _BINARY}},
            },
            "responses": {
                "201": _json({"$ref": "#/components/schemas/Stored"}, "Stored."),
                **_errors(400, 403, 404, 408, 409, 412, 413, 503, 507),
            },
        },
        "delete": {
            "summary": "Delete a file, or a directory with ?recursive=true.",
            "parameters": [_RECURSIVE],
            "responses": {
                "204": {"description": "Deleted."},
                "200": _json(
                    {"type": "object", "properties": {"deleted": {"type": "integer"}}},
                    "A directory was deleted; `deleted` counts its files.",
                ),
                **_errors(400, 403, 404, 409, 503),
            },
        },
    }  # fmt: skip


_RECURSIVE: Final = {
    "name": "recursive",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
}


def _stat_op() -> dict[str, Any]:
    return {
        "get": {
            "summary": "File attributes (Kestra's FileAttributes) of a file or directory.",
            "responses": {
                "200": _json({"$ref": "#/components/schemas/FileAttributes"}, "Attributes."),
                **_errors(400, 404, 503),
            },
        }
    }


def _list_op() -> dict[str, Any]:
    return {
        "get": {
            "summary": "List a directory, one level or recursively, a page at a time.",
            "parameters": [
                _RECURSIVE,
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000}},
                {"name": "cursor", "in": "query", "required": False,
                 "description": "The `cursor` of the previous page.",
                 "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Listing"}, "One page."),
                **_errors(400, 404, 409, 503),
            },
        }
    }  # fmt: skip


def _mkdir_op() -> dict[str, Any]:
    return {
        "post": {
            "summary": "Make a directory (and its parents).",
            "responses": {
                "201": _json({"$ref": "#/components/schemas/Stored"}, "Created."),
                **_errors(400, 404, 409, 503),
            },
        }
    }


def _move_op() -> dict[str, Any]:
    return {
        "post": {
            "summary": "Move a file or directory within the scope.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["from", "to"],
                            "properties": {
                                "from": {"type": "string", "description": "Key or kestra:/// URI."},
                                "to": {"type": "string", "description": "Key or kestra:/// URI."},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Stored"}, "Moved."),
                **_errors(400, 404, 409, 503),
            },
        }
    }


_QUOTA: Final = {
    "type": "object",
    "properties": {
        "maxBytes": {"type": "integer", "minimum": 0, "nullable": True},
        "maxObjectSize": {"type": "integer", "minimum": 0, "nullable": True},
    },
}


def _usage_op() -> dict[str, Any]:
    return {
        "get": {
            "summary": "Bytes and objects of the scope, from its counters, with its quotas "
            "(its ADMIN or a super admin).",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["tenant", "bytes", "objects", "quota"],
                        "properties": {
                            "tenant": {"type": "string", "nullable": True},
                            "bytes": {"type": "integer"},
                            "objects": {"type": "integer"},
                            "quota": _QUOTA,
                        },
                    },
                    "Usage.",
                ),
                **_errors(400, 404, 503),
            },
        }
    }


def _purge_op() -> dict[str, Any]:
    return {
        "post": {
            "summary": "Delete the files last modified before a bound, as Kestra's "
            "PurgeStorage (its ADMIN or a super admin).",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["olderThan"],
                            "properties": {
                                "olderThan": {
                                    "description": "30d, 12h, 15m, 3600s, or seconds.",
                                    "oneOf": [{"type": "string"}, {"type": "integer"}],
                                },
                                "prefix": {"type": "string", "description": "A directory key."},
                                "dryRun": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["deleted", "bytes", "kept", "dryRun"],
                        "properties": {
                            "deleted": {"type": "integer"},
                            "bytes": {"type": "integer"},
                            "kept": {"type": "integer"},
                            "dryRun": {"type": "boolean"},
                        },
                    },
                    "Purged (or, with dryRun, what would be).",
                ),
                **_errors(400, 404, 409, 503),
            },
        }
    }


def _scoped(base: str, tenant: bool, op: dict[str, Any], key: bool) -> tuple[str, dict[str, Any]]:
    op = copy.deepcopy(op)
    params = ([_TENANT_PARAM] if tenant else []) + ([_KEY_PARAM] if key else [])
    if params:
        op["parameters"] = params
    prefix = "/api/v1/{tenant}" if tenant else "/api/v1"
    return prefix + base + ("/{key}" if key else ""), op


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(
    summary: str,
    ok: int,
    schema: dict[str, Any] | None,
    *errors: int,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): _json(schema, "Done.") if schema is not None else {"description": "Done."}
    }
    responses.update(_errors(*errors))
    operation: dict[str, Any] = {"summary": summary, "tags": ["admin"], "responses": responses}
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return operation


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_STR: Final = {"type": "string"}
_BOOL: Final = {"type": "boolean"}


_AUDIT_PARAMS: Final = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "cursor", "in": "query", "required": False,
     "description": "The `cursor` of the previous page.", "schema": {"type": "string"}},
]  # fmt: skip


def _admin_paths() -> dict[str, Any]:
    tenant_body = _obj(["id"], id=_STR, name=_STR, deleted=_BOOL)
    binding_target = _obj(
        ["kind", "subject"],
        tenant={"type": "string", "nullable": True},
        kind={"type": "string", "enum": ["user", "service-account"]},
        subject=_STR,
    )
    binding = {**binding_target, "required": ["kind", "subject", "role"]}
    binding["properties"] = {
        **binding_target["properties"],
        "role": {"type": "string", "enum": ["ADMIN", "EDITOR", "VIEWER"]},
    }
    tenant_id = [{"name": "tenant", "in": "path", "required": True, "schema": _STR}]
    deny = (400, 401, 403, 404, 409)
    return {
        "/api/v1/tenants": {
            "post": _op("Create a tenant (the seed's body). The creator gets ADMIN unless a "
                        "super admin.", 201, _ref("Tenant"), *deny, body=tenant_body),
            "get": _op("Tenants the caller can access (a super admin: all).", 200,
                       {"type": "array", "items": _ref("Tenant")}, 401),
        },
        "/api/v1/tenants/{tenant}": {
            "parameters": tenant_id,
            "get": _op("One tenant.", 200, _ref("Tenant"), 401, 403, 404),
            "put": _op("Rename (tenant ADMIN or super admin); deleted, quota (super admin).",
                       200, _ref("Tenant"), *deny,
                       body=_obj([], name=_STR, deleted=_BOOL, quota=_QUOTA)),
            "delete": _op("Soft delete (super admin).", 200, _ref("Tenant"), 401, 403, 404),
        },
        "/api/v1/tenants/{tenant}/restore": {
            "parameters": tenant_id,
            "post": _op("Restore a soft-deleted tenant (super admin).", 200, _ref("Tenant"),
                        401, 403, 404),
        },
        "/api/v1/tenants/{tenant}/purge": {
            "parameters": tenant_id,
            "post": _op("Delete the tenant with every object it holds, its roles and usage "
                        "counters, for good (super admin; `confirm` must be the tenant id).",
                        200, _obj(["tenant", "deleted", "bytes"], tenant=_STR,
                                  deleted={"type": "integer"}, bytes={"type": "integer"}),
                        *deny, body=_obj(["confirm"], confirm=_STR)),
        },
        "/api/v1/tenants/{tenant}/audit": {
            "parameters": tenant_id,
            "get": {**_op("The tenant's audit log, oldest first (its ADMIN or a super admin; "
                          "anyone else: the 403 of a tenant that does not exist).", 200,
                          _ref("AuditPage"), 400, 401, 403, 404),
                    "parameters": _AUDIT_PARAMS},
        },
        "/api/v1/audit": {
            "get": {**_op("The null tenant's audit log, oldest first (its ADMIN or a super "
                          "admin).", 200, _ref("AuditPage"), 400, 401, 403),
                    "parameters": _AUDIT_PARAMS},
        },
        "/api/v1/bindings": {
            "get": {**_op("Role bindings of a tenant (its ADMIN or a super admin).", 200,
                          {"type": "array", "items": binding}, 400, 401, 403),
                    "parameters": [{"name": "tenant", "in": "query", "required": False,
                                    "schema": _STR}]},
            "put": _op("Grant a role (replaces the previous one).", 200, binding, *deny,
                       body=binding),
            "delete": _op("Revoke a binding.", 204, None, *deny, body=binding_target),
        },
        "/api/v1/me": {"get": _op("The caller and its bindings.", 200, {"type": "object"}, 401)},
        "/api/v1/users": {
            "get": _op("Users (super admin).", 200, {"type": "array", "items": _ref("User")},
                       401, 403),
            "post": _op("Create a user (super admin).", 201, _ref("User"), *deny, body=_obj(
                ["username", "password"], username=_STR, password=_STR, superAdmin=_BOOL,
                canCreateTenants=_BOOL)),
        },
        "/api/v1/users/{username}": {
            "parameters": [{"name": "username", "in": "path", "required": True, "schema": _STR}],
            "patch": _op("Change a user (super admin).", 200, _ref("User"), *deny, body=_obj(
                [], password=_STR, superAdmin=_BOOL, canCreateTenants=_BOOL)),
            "delete": _op("Delete a user and its bindings (super admin).", 204, None,
                          401, 403, 404),
        },
        "/api/v1/service-accounts": {
            "get": _op("Service accounts (super admin).", 200, {"type": "array"}, 401, 403),
            "post": _op("Create a service account (super admin).", 201, {"type": "object"},
                        *deny, body=_obj(["name"], name=_STR, description=_STR)),
        },
        "/api/v1/service-accounts/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STR}],
            "delete": _op("Delete it, its tokens and bindings (super admin).", 204, None,
                          401, 403, 404),
        },
        "/api/v1/service-accounts/{name}/tokens": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STR}],
            "get": _op("Its tokens, never their secrets (super admin).", 200,
                       {"type": "array"}, 401, 403, 404),
            "post": _op("Create a token: `token` is shown this once (super admin).", 201,
                        {"type": "object"}, *deny,
                        body=_obj([], description=_STR, expiresIn={"type": "number"})),
        },
        "/api/v1/tokens/{token}": {
            "parameters": [{"name": "token", "in": "path", "required": True, "schema": _STR}],
            "delete": _op("Revoke a token (super admin).", 200, {"type": "object"}, 401, 403,
                          404),
        },
    }  # fmt: skip


@cache
def _session_paths() -> dict[str, Any]:
    """The web UI's sign-in: a session cookie (HttpOnly, SameSite=Strict) and a CSRF token."""
    session = _obj(
        ["kind", "name", "bindings", "csrfToken", "tenancy"],
        kind=_STR, name=_STR, superAdmin=_BOOL, canCreateTenants=_BOOL,
        bindings={"type": "array", "items": {"type": "object"}},
        csrfToken={"type": "string", "nullable": True},
        tenancy=_obj(["enabled", "nullTenant"], enabled=_BOOL, nullTenant=_BOOL),
    )  # fmt: skip
    sign_in = _op("Sign in (web UI): sets the session cookie; the answer holds the CSRF token "
                  "that every change made with the cookie sends as X-CSRF-Token.", 200, session,
                  400, 401, 403)  # fmt: skip
    sign_in["requestBody"] = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": _obj(["username", "password"], username=_STR, password=_STR)
            }
        },
    }
    sign_in["tags"] = ["session"]
    return {
        "post": sign_in,
        "get": {**_op("The signed-in caller, its bindings, the CSRF token and the tenancy "
                      "served.", 200, session, 401), "tags": ["session"]},
        "delete": {**_op("Sign out: the session ends in every process (with X-CSRF-Token).",
                         204, None, 400, 401, 403), "tags": ["session"]},
    }  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI document (built once)."""
    paths: dict[str, Any] = {}
    for tenant in (False, True):
        for base, op, key in (
            ("/files", _object_ops(), True),
            ("/stats", _stat_op(), True),
            ("/stats", _stat_op(), False),
            ("/list", _list_op(), True),
            ("/list", _list_op(), False),
            ("/directories", _mkdir_op(), True),
            ("/move", _move_op(), False),
            ("/usage", _usage_op(), False),
            ("/purge", _purge_op(), False),
        ):
            path, item = _scoped(base, tenant, op, key)
            for operation in item.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["tags"] = ["tenant" if tenant else "null tenant"]
                    for status, answer in _errors(401, 403).items():
                        operation["responses"].setdefault(status, answer)
            paths[path] = item
    paths.update(_admin_paths())
    paths["/api/v1/session"] = _session_paths()
    paths["/health/live"] = {
        "get": {
            "summary": "The process is up.",
            "responses": {"200": _json({"type": "object"}, "Up.")},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics, text exposition (a super admin when auth is on).",
            "responses": {
                "200": {
                    "description": "Per-tenant request, latency and byte counters.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors(401, 403),
            },
        }
    }
    paths["/health/ready"] = {
        "get": {
            "summary": "The storage answers.",
            "responses": {
                "200": _json({"type": "object"}, "Ready."),
                "503": _json(_ERROR_REF, "The storage does not answer."),
            },
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Tenant-isolating storage gateway",
            "version": __version__,
            "description": (
                "Every key is rewritten into its tenant's prefix; keys that could reach "
                "another tenant are refused with 400 and a `rule`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "rule": {"type": "string"},
                    },
                },
                "Stored": {
                    "type": "object",
                    "required": ["uri", "key"],
                    "properties": {
                        "uri": {"type": "string", "example": "kestra:///ns/flow/out.csv"},
                        "key": {"type": "string"},
                        "size": {"type": "integer"},
                        "etag": {"type": "string", "nullable": True},
                    },
                },
                "FileAttributes": {
                    "type": "object",
                    "required": ["fileName", "key", "type", "size"],
                    "properties": {
                        "fileName": {"type": "string"},
                        "key": {"type": "string"},
                        "uri": {"type": "string"},
                        "type": {"type": "string", "enum": ["File", "Directory"]},
                        "size": {"type": "integer"},
                        "lastModifiedTime": {"type": "integer", "nullable": True},
                        "creationTime": {"type": "integer", "nullable": True},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        "etag": {"type": "string", "nullable": True},
                        "contentType": {"type": "string", "nullable": True},
                    },
                },
                "Tenant": _obj(
                    ["id", "name", "deleted"],
                    id=_STR,
                    name=_STR,
                    deleted=_BOOL,
                    created=_STR,
                    updated=_STR,
                    quota=_QUOTA,
                ),
                "User": _obj(
                    ["username"],
                    username=_STR,
                    superAdmin=_BOOL,
                    canCreateTenants=_BOOL,
                    created=_STR,
                    updated=_STR,
                ),
                "AuditRecord": {
                    "type": "object",
                    "required": ["time", "tenant", "identity", "action", "key", "status"],
                    "properties": {
                        "time": {"type": "string", "format": "date-time"},
                        "tenant": {"type": "string", "nullable": True},
                        "identity": {
                            "type": "object",
                            "nullable": True,
                            "properties": {"kind": {"type": "string"}, "name": {"type": "string"}},
                        },
                        "action": {"type": "string", "example": "file.write"},
                        "key": {"type": "string", "nullable": True},
                        "status": {"type": "integer"},
                    },
                },
                "AuditPage": {
                    "type": "object",
                    "required": ["records", "cursor"],
                    "properties": {
                        "records": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/AuditRecord"},
                        },
                        "cursor": {"type": "string", "nullable": True},
                    },
                },
                "Listing": {
                    "type": "object",
                    "required": ["entries", "cursor"],
                    "properties": {
                        "entries": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/FileAttributes"},
                        },
                        "cursor": {"type": "string", "nullable": True},
                    },
                },
            }
        },
    }
