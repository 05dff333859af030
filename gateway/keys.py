"""The key function: the one place where a tenant's key becomes a physical key.

Every byte the gateway stores or serves goes through :func:`resolve`; every key an answer
shows goes through :func:`unresolve`. A key is *refused, never cleaned*: anything that would
need fixing is an attack or a bug, and the caller learns which rule it broke.

Rules (the ``rule`` field of the 400 answer), numbered as in the test-suite:

1.  ``dot-segment``        a segment made only of dots (``.``, ``..``, ``...``)
2.  ``double-encoding``    a ``%XX`` sequence left after the one decoding the HTTP layer did
3.  ``backslash``          ``\\`` anywhere
4.  ``control-character``  C0, DEL, C1 controls, and bidirectional overrides
5.  ``invalid-utf8``       bytes that are not UTF-8, lone surrogates
    ``malformed-percent``  a ``%`` not followed by two hex digits, on the request line
6.  ``lookalike``          a segment whose NFKC form breaks rules 1-4 or holds ``/``
7.  ``empty-segment``      leading ``/``, ``//``, trailing ``/``; ``drive-path`` (``C:``)
9.  ``segment-too-long``   a segment over 255 UTF-8 bytes;
    ``key-too-long``       a physical key over 1,024 UTF-8 bytes (the S3 limit)
10. ``reserved-prefix``    the null tenant naming ``tenants`` or the system prefix, in any
                           case or NFKC spelling
11. ``tenant-id``          tenant ids outside ``[a-z0-9][a-z0-9_-]{0,62}`` or reserved
12. ``uri``                a ``kestra:`` URI with user info, a port, a query or a fragment

(Rule 8, symbolic links, is the local backend's: it never follows one.)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from backends.base import SYSTEM_PREFIX

from .errors import InvalidKey, InvalidTenant

TENANTS_PREFIX: Final = "tenants"
RESERVED_ROOT_SEGMENTS: Final = frozenset({TENANTS_PREFIX, SYSTEM_PREFIX})

MAX_SEGMENT_BYTES: Final = 255
MAX_PHYSICAL_KEY_BYTES: Final = 1024
MAX_TENANT_ID_LENGTH: Final = 63

TENANT_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Words that name routes beside /api/v1/{tenant}/..., or that read as "no tenant".
RESERVED_TENANT_IDS: Final = frozenset(
    {
        "api", "admin", "auths", "default", "files", "health", "login", "logout", "me",
        "metrics", "none", "null", "openapi", "roles", "service-accounts", "system",
        "tenants", "ui", "usage", "users", "audit", "docs", "static", "stats", "list",
        "directories", "move", "bindings", "tokens", "session", "purge",
    }
)  # fmt: skip

_PERCENT_TRIPLE: Final = re.compile(r"%[0-9A-Fa-f]{2}")
_DRIVE: Final = re.compile(r"[A-Za-z]:")
# Bidirectional controls reorder what a person reads (a file named "txt.exe" shown as
# "exe.txt"): refused with the controls, as in Trojan Source (CVE-2021-42574).
_BIDI: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# What _check_text refuses character by character, found in one scan (the loop runs only on
# a segment that holds one of them, to name the first).
_SUSPECT: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff" + "".join(sorted(_BIDI)) + "]")
_KESTRA_SCHEME: Final = "kestra:"


@dataclass(frozen=True, slots=True)
class Scope:
    """The null tenant (``tenant=None``) or one tenant id, fixed by the URL."""

    tenant: str | None = None

    @property
    def prefix(self) -> str:
        """The physical prefix of this scope, ending in ``/`` (``""`` for the null tenant)."""
        return "" if self.tenant is None else f"{TENANTS_PREFIX}/{self.tenant}/"

    @property
    def root(self) -> str:
        """The physical directory key of this scope's root (``""`` for the null tenant)."""
        return self.prefix.rstrip("/")

    def __str__(self) -> str:
        return "null tenant" if self.tenant is None else f"tenant {self.tenant}"


NULL_SCOPE: Final = Scope()


def tenant_scope(tenant_id: str) -> Scope:
    """Given a tenant id as sent (not decoded), return its scope, or raise ``InvalidTenant``."""
    check_tenant_id(tenant_id)
    return Scope(tenant_id)


def check_tenant_id(tenant_id: str) -> None:
    """Raise ``InvalidTenant`` unless ``tenant_id`` is in the strict grammar and not reserved."""
    if not TENANT_ID_RE.fullmatch(tenant_id):
        raise InvalidTenant(
            "tenant-id",
            "a tenant id is 1 to 63 characters from lowercase a-z, digits, '-' and '_', "
            "starting with a letter or a digit",
        )
    if tenant_id in RESERVED_TENANT_IDS:
        raise InvalidTenant("tenant-id", "this word is reserved and cannot be a tenant id")


def _refuse(rule: str, message: str) -> InvalidKey:
    return InvalidKey(rule, message)


def _check_text(segment: str, *, lookalike: bool) -> None:
    """Raise unless ``segment`` is free of separators, controls, dots-only and escapes."""
    prefix = "a segment that normalises (NFKC) to " if lookalike else "a key with "
    rule = "lookalike" if lookalike else None
    if "/" in segment:  # only reachable in the NFKC form: raw segments are split on "/"
        raise _refuse("lookalike", prefix + "'/' is not allowed")
    if "\\" in segment:
        raise _refuse(rule or "backslash", prefix + "a backslash is not allowed")
    if _SUSPECT.search(segment):  # else no character below can be refused
        for ch in segment:
            code = ord(ch)
            if code < 0x20 or 0x7F <= code <= 0x9F or ch in _BIDI:
                raise _refuse(
                    rule or "control-character",
                    prefix + f"the control character U+{code:04X} is not allowed",
                )
            if 0xD800 <= code <= 0xDFFF:
                raise _refuse("invalid-utf8", "a key must be valid UTF-8 (no lone surrogates)")
    if segment.strip(".") == "":
        raise _refuse(
            rule or "dot-segment", prefix + "a segment made only of dots ('.', '..') is not allowed"
        )
    if _PERCENT_TRIPLE.search(segment):
        raise _refuse(
            rule or "double-encoding",
            prefix + "a percent-escape left after decoding (double encoding) is not allowed",
        )


def check_key(key: str) -> None:
    """Raise ``InvalidKey`` unless ``key`` is a well-formed logical key (any scope)."""
    if not key:
        raise _refuse("empty-key", "the key is empty")
    if key.startswith("/"):
        raise _refuse("empty-segment", "a key must not start with '/' (absolute paths are refused)")
    segments = key.split("/")
    if _DRIVE.match(segments[0]):
        raise _refuse("drive-path", "a key must not start with a drive letter such as 'C:'")
    for segment in segments:
        if not segment:
            raise _refuse(
                "empty-segment", "a key must not contain empty segments ('//' or a trailing '/')"
            )
        _check_text(segment, lookalike=False)
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise _refuse(
                "segment-too-long", f"a key segment must be at most {MAX_SEGMENT_BYTES} bytes"
            )
        if not segment.isascii():
            normal = unicodedata.normalize("NFKC", segment)
            if normal != segment:
                _check_text(normal, lookalike=True)


def _is_reserved_root(segment: str) -> bool:
    # Case and compatibility forms too: a case-insensitive file system (or a later NFKC step)
    # would otherwise turn "Tenants" or "ｔｅｎａｎｔｓ" into the tenants' folder.
    return unicodedata.normalize("NFKC", segment).casefold() in RESERVED_ROOT_SEGMENTS


def resolve(scope: Scope, key: str) -> str:
    """Given a scope and a logical key, return the physical key, or raise ``InvalidKey``."""
    check_key(key)
    if scope.tenant is None and _is_reserved_root(key.split("/", 1)[0]):
        raise _refuse(
            "reserved-prefix", "this first segment is reserved by the gateway for the null tenant"
        )
    physical = scope.prefix + key
    if len(physical.encode("utf-8")) > MAX_PHYSICAL_KEY_BYTES:
        raise _refuse(
            "key-too-long", f"the key is too long (at most {MAX_PHYSICAL_KEY_BYTES} bytes in all)"
        )
    return physical


def resolve_dir(scope: Scope, key: str) -> str:
    """Like :func:`resolve`, but ``""`` names the scope's root directory."""
    return scope.root if key == "" else resolve(scope, key)


def unresolve(scope: Scope, physical: str) -> str:
    """Given a physical key inside ``scope``, return the logical key the scope sees.

    Raises ``ValueError`` for a key outside the scope: that is a bug, never an answer.
    """
    prefix = scope.prefix
    if not physical.startswith(prefix) or physical == prefix:
        raise ValueError("physical key outside the scope")
    key = physical[len(prefix) :]
    if scope.tenant is None and _is_reserved_root(key.split("/", 1)[0]):
        raise ValueError("physical key in a reserved prefix")
    return key


def visible(scope: Scope, physical: str) -> bool:
    """Given a physical key from a listing of the scope, say whether the scope may see it."""
    if not physical.startswith(scope.prefix) or physical == scope.prefix:
        return False
    return scope.tenant is not None or not _is_reserved_root(physical.split("/", 1)[0])


# -- the HTTP layer's one decoding -------------------------------------------------------


def decode_path(raw: str) -> str:
    """Given a part of the request line as sent, percent-decode it once, strictly.

    ``raw`` is aiohttp's ``raw_path`` text (non-ASCII bytes arrive surrogate-escaped).
    A ``%`` must start a ``%XX`` escape; the bytes must be UTF-8. The result still goes
    through :func:`resolve`, which refuses any ``%XX`` left in it (double encoding).
    """
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte could have produced
        raise _refuse("invalid-utf8", "the key is not valid UTF-8") from None
    out = bytearray()
    i = 0
    while True:
        j = data.find(b"%", i)
        if j < 0:
            out += data[i:]
            break
        out += data[i:j]
        pair = data[j + 1 : j + 3]
        try:
            if len(pair) != 2 or not pair.isalnum():
                raise ValueError
            out.append(int(pair, 16))
        except ValueError:
            raise _refuse(
                "malformed-percent", "a '%' in the path must start a '%XX' escape"
            ) from None
        i = j + 3
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("invalid-utf8", "the key is not valid UTF-8") from None


# -- kestra:// URIs ----------------------------------------------------------------------

# What a path segment may hold unescaped in a URI (RFC 3986, section 3.3, "pchar").
_URI_SAFE: Final = "/!$&'()*+,;=:@-._~"


def parse_uri(uri: str) -> str:
    """Given ``kestra:///ns/f`` or ``kestra://ns/f``, return the logical key ``ns/f``.

    The authority (the canonical form's namespace) is folded into the path *before* the key
    is checked, so ``kestra://../etc/passwd`` is refused like ``../etc/passwd``.
    """
    if uri[: len(_KESTRA_SCHEME)].lower() != _KESTRA_SCHEME:
        raise _refuse("uri", "a URI must use the kestra scheme (kestra:///namespace/...)")
    rest = uri[len(_KESTRA_SCHEME) :]
    if not rest.startswith("//"):
        raise _refuse("uri", "a kestra URI starts with 'kestra://'")
    rest = rest[2:]
    if "?" in rest or "#" in rest:
        raise _refuse("uri", "a kestra URI must not have a query or a fragment")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise _refuse("uri", "a kestra URI must not carry user information")
    if ":" in authority:
        raise _refuse("uri", "a kestra URI must not carry a port")
    key = decode_path(authority + slash + path if authority else path)
    check_key(key)
    return key


def make_uri(key: str) -> str:
    """Given a logical key, return its legacy-form URI ``kestra:///<key>`` (escaped)."""
    return "kestra:///" + quote(key, safe=_URI_SAFE)
