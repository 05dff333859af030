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
        403: "The storage refused the operation.",
        404: "No such object, tenant or route.",
        405: "Method not allowed.",
        409: "A file or directory is in the way.",
        412: "A precondition failed.",
        413: "The body is larger than limits.max-object-size.",
        416: "The range starts past the end of the object.",
        503: "The storage is unavailable.",
        507: "The storage is full.",
    }
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
                **_errors(400, 403, 404, 409, 412, 413, 503, 507),
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


def _scoped(base: str, tenant: bool, op: dict[str, Any], key: bool) -> tuple[str, dict[str, Any]]:
    op = copy.deepcopy(op)
    params = ([_TENANT_PARAM] if tenant else []) + ([_KEY_PARAM] if key else [])
    if params:
        op["parameters"] = params
    prefix = "/api/v1/{tenant}" if tenant else "/api/v1"
    return prefix + base + ("/{key}" if key else ""), op


@cache
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
        ):
            path, item = _scoped(base, tenant, op, key)
            for operation in item.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["tags"] = ["tenant" if tenant else "null tenant"]
            paths[path] = item
    paths["/health/live"] = {
        "get": {
            "summary": "The process is up.",
            "responses": {"200": _json({"type": "object"}, "Up.")},
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
