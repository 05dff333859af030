"""Tenant-escape attacks, sent as raw HTTP to the real gateway process, on every tenancy mode.

This suite does not reuse the key function's own test cases: its corpus is built here from
public knowledge of path traversal (OWASP's path traversal page and its encodings: dot-dot-slash,
``%2e%2e%2f``, double and triple encoding, overlong UTF-8 such as ``%c0%af`` and ``%e0%80%ae``,
IIS ``%u002e``, backslashes, NUL bytes), of Unicode look-alikes that NFKC folds into ``.`` ``/``
or ``\\`` (one-dot leader, two-dot leader, fraction slash, division slash, big solidus, small
reverse solidus, fullwidth forms), of Windows paths (drive letters, UNC, ``::$DATA``, trailing
dots and spaces), of URL structure (``;`` path parameters, ``?`` and ``#``), of ``kestra://``
URI authority tricks, and of tenant-segment tricks (case, encoding, ``%2f``).

Every request is written byte for byte on a socket (HTTP/1.1, ``Connection: close``), so no
client normalises it. Setup, per backend (local directory, S3 through moto) and per tenancy
mode (A: tenants disabled, B: tenants and the null tenant, C: tenants only), one gateway process:

- canaries with random contents, planted straight into the storage: null-tenant keys
  ``secret.txt`` and ``ns/secret.txt``, tenant ``other``'s ``secret.txt`` and ``ns/secret.txt``,
  tenant ``acme``'s ``ns/mine.txt``, the system prefix's ``.gateway/canary`` and, on disk, a
  file in a sibling directory of the base (``base-sibling/outside.txt``); on disk also symbolic
  links from the attackers' scopes to other tenants and outside the base;
- attackers: tenant ``acme`` (modes B, C) and the null tenant (modes A, B).

Each attacker sends every corpus key through every action (upload, download, stat, list,
``?uri=kestra://`` on files and stats, move with the key in the JSON as sent and as decoded,
delete, make directory), plus kestra URIs, forged listing cursors and limits, JSON that
attacks through JSON itself (lone surrogates, wrong types, duplicate names), and methods no
route serves. A separate run tries tenant segments and whole request targets that are not
exactly an existing tenant id.

What each run checks:

1. no answer is a 5xx, and every request gets an answer;
2. no answer (status line, headers, body) holds a canary's content, except the attacker's own
   canaries (acme: ``tenants/acme/ns/mine.txt``; the null tenant: ``secret.txt`` and
   ``ns/secret.txt``), nor a physical location (the temporary directory, the bucket name,
   ``tenants/other``, ``tenants/acme``, ``.gateway/tmp``), nor ``Traceback``; an answer may
   echo its own request (aiohttp's 400 for a bad request line does). The keys a 2xx answer
   shows (``key``/``uri``/``fileName`` fields, cursors) are checked structurally instead:
   each is a key the attacker made itself, an own canary, or a parent of one;
3. after the run every canary is present and byte-identical, and the storage differs from
   before only inside the attacker's own physical prefix (``tenants/acme/`` for acme; for the
   null tenant the root minus ``tenants/`` and ``.gateway/``, in any case or NFKC form; a
   physical key with an empty, ``.`` or ``..`` segment counts as outside);
4. every status is 400, 404, 405 or 409, or a 2xx whose object lies inside the attacker's
   prefix (checked in the storage right after the uploads); 403 only for requests through a
   planted symbolic link; the tenant-segment run allows no 2xx and no change at all. The
   histogram of every run is printed in pytest's terminal summary.

Time: the whole file is meant to take well under 90 s on two cores. Requests that take the
same path through the gateway (GET/HEAD, DELETE with or without ``recursive``, stats/list)
alternate by key and mode, so each key meets both over the modes; on S3, whose stand-in (moto)
serves about a hundred calls a second, the keys the gateway *accepts* take the actions after
the upload by turns (one in three per run, a different one in each mode), while every refused key
still takes every action in every run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote

import pytest

from tests.support.gateway_process import GatewayProcess

if TYPE_CHECKING:
    from tests.support.moto import MotoServer

pytestmark = pytest.mark.slow
T = TypeVar("T")

MODES: Final = {
    "A": {"enabled": False, "default-tenant": True},
    "B": {"enabled": True, "default-tenant": True},
    "C": {"enabled": True, "default-tenant": False},
}
ATTACKERS: Final = {"A": ("null",), "B": ("acme", "null"), "C": ("acme",)}
BACKENDS: Final = ("local", "s3")
SIBLING: Final = "base-sibling"
RESERVED: Final = frozenset({"tenants", ".gateway"})
CONCURRENCY: Final = 32
REQUEST_TIMEOUT: Final = 30.0
S3_ACCEPTED_SHARE: Final = 3
ALLOWED_REFUSALS: Final = frozenset({400, 404, 405, 409})
S3_ACCESS = {"access-key": "testing", "secret-key": "testing", "region": "us-east-1"}

# Per (backend, mode, attacker): request count and status histogram, printed at the end.
SUMMARY: list[SummaryRow] = []


# ==============================================================================================
# The corpus
# ==============================================================================================


def _u(text: str) -> str:
    """Given text, return it with every non-ASCII character percent-encoded as UTF-8."""
    return "".join(
        ch if ch.isascii() else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in text
    )


# One step up, spelled every way a parser somewhere has been fooled into reading as "../".
UPS: Final[tuple[str | bytes, ...]] = (
    # OWASP dot-dot-slash, percent-encoded in part or whole, either case
    "../", "..%2f", "..%2F", "%2e%2e/", "%2e%2e%2f", "%2E%2E%2F", ".%2e/", "%2e./", "%2e.%2f",
    # backslashes and mixed separators
    "..\\", "..%5c", "..%5C", "%2e%2e%5c", "..\\/", "../\\", ".\\..\\",
    # dot runs, padding and terminators some systems strip
    ".../", "..../", "....//", "..%20/", ".%20./", "..%09/", "..%00/", "..%0a/", "..%0d%0a/",
    "..;/", "..%3b/", "..%3f/", "..%23/", "..%c2%a0/",
    # double and triple encoding, nested and IIS %u escapes
    "%252e%252e%252f", "..%252f", "..%255c", "%252e%252e/", "%25252e%25252e%25252f",
    "%%32%65%%32%65/", "%2%65%2%65/", "%u002e%u002e/", "..%u002f", "..%u2215", "%uff0e%uff0e/",
    # overlong UTF-8 (CVE-2000-0884 style) for ".", "/" and "\\"
    "%c0%ae%c0%ae/", "..%c0%af", "%c0%ae%c0%ae%c0%af", "..%c1%9c", "..%c1%1c", "%c0%2e%c0%2e/",
    "%e0%80%ae%e0%80%ae/", "..%e0%80%af", "%f0%80%80%ae%f0%80%80%ae/", "..%f0%80%80%af",
    # Unicode look-alikes: two-dot leader, one-dot leader, fullwidth, small forms, slashes
    _u("‥/"), _u("․․/"), _u("︰/"), _u("﹒﹒/"), _u("．．/"), _u("．．／"), _u("..／"),
    _u("..⁄"), _u("..∕"), _u("..⧸"), _u("..﹨"), _u("..＼"), _u("..⧵"), _u("‥∕"), _u(".․/"),
    _u("…/"), _u("︙/"), _u("..\u0338"),
    # raw bytes on the request line
    b"\xe2\x80\xa5/", b"..\xc0\xaf", b"..\xef\xbc\x8f", b"\xc0\xae\xc0\xae/", b"..\x5c",
    # empty and dot segments around the step
    "./../", ".//../", "..//", "..%2f%2f", "x/../../",
)  # fmt: skip

# (steps up, target) after each step: another tenant's files from acme's root, and, taking
# turns, the same through the null root, the sibling of the base from acme's root, and the
# sibling of the base from the null root.
TARGET: Final = (1, "other/secret.txt")
TURNS: Final = (
    (2, "tenants/other/ns/secret.txt"),
    (3, f"{SIBLING}/outside.txt"),
    (1, f"{SIBLING}/outside.txt"),
)

EXTRA_KEYS: Final[tuple[str | bytes, ...]] = (
    # cross-tenant, written plainly
    "../other/secret.txt", "../../tenants/other/secret.txt", "%2e%2e%2fother",
    "..%2f..%2ftenants%2fother",
    "../other", "../other/", "../acme/ns/mine.txt", "../../secret.txt", "../../ns/secret.txt",
    "ns/../../other/secret.txt", "ns/../../../tenants/other/secret.txt",
    "ns/%2e%2e/%2e%2e/other/secret.txt",
    "ns/..%2f..%2f..%2ftenants%2fother%2fsecret.txt", "a/b/c/../../../../other/secret.txt",
    "../" * 12 + "etc/passwd", "..%2f" * 12 + "etc%2fpasswd", "..\\" * 8 + "windows\\win.ini",
    # the null tenant's reserved first segments, in every case and spelling
    "tenants/other/secret.txt", "tenants/other/ns/secret.txt", "tenants/acme/ns/mine.txt",
    "tenants/other", "tenants", "tenants/", "Tenants/other/secret.txt", "TENANTS/other/secret.txt",
    "tEnAnTs/other/secret.txt", "%74enants/other/secret.txt", "%54ENANTS/other/secret.txt",
    "tenants%2fother%2fsecret.txt", "tenants%2Fother/secret.txt",
    "%74%65%6e%61%6e%74%73/other/secret.txt",
    "%2574enants/other/secret.txt", "tenan%74s/other/secret.txt",
    _u("ｔｅｎａｎｔｓ/other/secret.txt"),
    _u("tenantſ/other/secret.txt"), _u("tenantˢ/other/secret.txt"), _u("ᵗenants/other/secret.txt"),
    _u("𝐭𝐞𝐧𝐚𝐧𝐭𝐬/other/secret.txt"), _u("ⓣⓔⓝⓐⓝⓣⓢ/other/secret.txt"),
    _u("ＴＥＮＡＮＴＳ/other/secret.txt"),
    "tenants%00/other/secret.txt", "tenants%20/other/secret.txt", "tenants./other/secret.txt",
    "tenants%09/other/secret.txt", "./tenants/other/secret.txt", "ns/../tenants/other/secret.txt",
    "ns/%2e%2e/tenants/other/secret.txt", "tenants/./other/secret.txt", "tenants//other/secret.txt",
    "tenants/other/../acme/ns/mine.txt", "tenants\\other\\secret.txt",
    "tenants%5cother%5csecret.txt",
    _u("tenants\u200b/other/secret.txt"), "tenants%252fother%252fsecret.txt",
    "tenants/other/%2e%2e/other/secret.txt",
    ".gateway/canary", ".gateway", ".gateway/tmp", ".gateway/tmp/x", ".GATEWAY/canary",
    ".Gateway/canary",
    "%2egateway/canary", "%2Egateway%2Fcanary", ".gateway%2fcanary", _u("．gateway/canary"),
    _u("․gateway/canary"), _u("﹒gateway/canary"), _u(".gatewaｙ/canary"), _u(".𝗀ateway/canary"),
    ".gateway./canary", ".gateway%00/canary", ".gateway%20/canary", "./.gateway/canary",
    "ns/../.gateway/canary", ".gateway/../secret.txt", ".%67ateway/canary", ".%2567ateway/canary",
    "%252egateway/canary", ".gateway\\canary",
    # Windows: drives, UNC, devices, streams, 8.3 names, trailing dots and spaces
    "C:/Windows/win.ini", "C:%5cWindows%5cwin.ini", "c:", "C:secret.txt", "C:..\\..\\secret.txt",
    "z:%2f..%2fsecret.txt", "%5c%5cserver%5cshare%5csecret.txt", "\\\\server\\share\\secret.txt",
    "%5c%5c%3f%5cC:%5csecret.txt", "%5c%5c.%5cpipe%5cx", "\\\\?\\UNC\\server\\share", "CON", "NUL",
    "con.txt", "COM1", "secret.txt::$DATA", "ns/secret.txt::$DATA", "secret.txt.", "secret.txt%20",
    "secret.txt...", "secret~1.txt", "ns/secret.txt%20%20",
    "ns\\..\\..\\tenants\\other\\secret.txt",
    "..\\..\\tenants\\other\\secret.txt", "..%5c..%5ctenants%5cother%5csecret.txt",
    "..%2f..%5c..%2fsecret.txt",
    # absolute paths and URLs as keys
    "/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", "%2f%2fserver/share", "/%2e%2e/secret.txt",
    "%2f..%2fother%2fsecret.txt", "file:///etc/passwd", "file:%2f%2f%2fetc%2fpasswd",
    "kestra:%2f%2f..%2fother%2fsecret.txt", "kestra:///../other/secret.txt", "http://evil/x",
    "~/secret.txt", "~root/.ssh/id_rsa", "%7e/secret.txt", "/proc/self/environ",
    "%2fproc%2fself%2fenviron",
    # dot and empty segments alone
    "/..", "/.", ".", "..", "...", "%2e", "%2e%2e", ".%2e", "%2e.", "ns/.", "ns/..", "ns/...",
    "ns/", "ns//secret.txt", "//", "/", "%2f", "%2f%2f", "ns/./secret.txt", "ns/%2e/secret.txt",
    # NUL, controls, bidirectional overrides
    "secret.txt%00", "secret.txt%00.png", "%00", "%00/../secret.txt", "ns%00/..%00/..", "..%00",
    "%0a", "secret%0d%0aSet-Cookie:%20x=1", "%1b%5b31m", "%7f", "%c2%80", "%c2%9f",
    "%e2%80%aetxt.exe",
    "%e2%81%a6x", "%e2%80%8fx", "%09secret.txt", "%0b", "%0c", "%1f", "ns/%00", "%c0%80",
    "%e0%80%80",
    b"secret.txt\x00", b"..\x00/other", b"a\x01b", b"a\x7fb", b"..\tother",
    # broken escapes and invalid UTF-8
    "%", "%%", "%2", "%zz", "%g0", "%2g", "..%", "..%2", "%%2e%2e", "%u002e", "%ff", "%c0",
    "%c0%af", "%e0%80", "%ed%a0%80", "%ed%b0%80", "%f4%90%80%80", "%f8%88%80%80%80", "%fe%ff",
    "%80", "ns/%c3", "%c3%28", "%e2%28%a1", "..%ef%bb%bf/other", "%ef%bb%bf../other/secret.txt",
    b"\xff", b"\xc3\x28", b"..\xed\xa0\x80",
    # path parameters, queries and fragments inside keys
    "secret.txt;x=1", "..;/other/secret.txt", "ns;/..;/..;/other", "x?/../../other/secret.txt",
    "x#/../../other/secret.txt", "..%23/other/secret.txt", "x%3f/../../other", "%3f", "%23",
    "x;jsessionid=../../other", "..%3bx/other/secret.txt",
    # look-alikes for whole segments
    _u("‥"), _u("․"), _u("…"), _u("︰"), _u("．"), _u("．．"), _u("‥/other/secret.txt"),
    _u("‥∕other∕secret.txt"), _u("..⁄other⁄secret.txt"), _u("ns∕‥∕‥∕tenants∕other∕secret.txt"),
    _u("ｎｓ/ｓｅｃｒｅｔ.ｔｘｔ"), _u("..\uff3cother\uff3csecret.txt"),
    _u("\u2024\u2024\u2215other"),
    # NFD: a dot followed by a combining mark, and decomposed/precomposed twins
    _u(".\u0301./other"), _u("e\u0301"), _u("\u00e9"), _u("\u212b"),
    # long segments and long keys
    "a" * 255, "a" * 256, _u("€" * 85), _u("€" * 86), "d/" * 505 + "z",
    ("b" * 100 + "/") * 10 + "c",
    "x" * 1011, "x" * 1012, "y/" * 505 + "zz", "../" * 300 + "x", "%2e%2e%2f" * 200 + "x",
    "a" * 9000,
)  # fmt: skip

# kestra:// URIs for ?uri= and for the JSON of a move (already in their wire form: a query
# value is decoded once by the HTTP layer, then the URI's path once more by the gateway).
URIS: Final[tuple[str, ...]] = (
    "kestra://../other/secret.txt", "kestra:///../other/secret.txt",
    "kestra://..%2fother%2fsecret.txt",
    "kestra://%2e%2e/other/secret.txt", "kestra://%252e%252e/other/secret.txt",
    "kestra:///%2e%2e%2fother%2fsecret.txt", "kestra://../../tenants/other/secret.txt",
    "kestra:///tenants/other/secret.txt", "kestra://tenants/other/secret.txt",
    "kestra://.gateway/canary",
    "kestra:///.gateway/canary", "kestra://user@ns/secret.txt", "kestra://user:pw@ns/secret.txt",
    "kestra://other@ns/secret.txt", "kestra://ns:8080/secret.txt", "kestra://ns:/secret.txt",
    "kestra://:80/secret.txt", "kestra://[::1]/secret.txt", "kestra://ns/secret.txt%3fx=1",
    "kestra://ns/secret.txt%23frag", "KESTRA://../other/secret.txt", "Kestra:///..%2fother",
    "kestra:/../other/secret.txt", "kestra:../other/secret.txt", "kestra:////etc/passwd",
    "kestra:////../other", "kestra://./other/secret.txt", "kestra://./../other",
    "kestra://ns%2f..%2f..%2fother/x",
    "kestra://ns%5c..%5c..%5cother/x", "kestra://%5c..%5cother/x", "kestra://..%5c..%5cother/x",
    "kestra:///C:/x", "kestra://C:/x", "kestra://%e2%80%a5/other/secret.txt",
    "kestra://%ef%bc%8e%ef%bc%8e/other/secret.txt", "kestra:///%00", "kestra://ns%00/x",
    "kestra://ns/x%00",
    "file:///etc/passwd", "s3://bucket/tenants/other/secret.txt",
    "http://127.0.0.1/api/v1/other/files/secret.txt",
    "kestra:", "kestra://", "kestra:///", "", "../other/secret.txt",
    "kestra://%2e%2e%2f%2e%2e%2ftenants%2fother/secret.txt",
    "kestra://..%252f..%252ftenants/other", "kestra://a@b:c/../x", "kestra:///%ed%a0%80",
    "kestra:///%ff",
    "kestra:///%c0%ae%c0%ae/other/secret.txt", "kestra://%u002e%u002e/other", "kestra:///%",
    "kestra:///%zz",
    "kestra:\\\\..\\other", "kestra://\\..\\other/secret.txt", "kestra://ns/../../other/secret.txt",
)  # fmt: skip

# Tenant segments that are not exactly an existing tenant id.
TENANT_SEGMENTS: Final[tuple[str | bytes, ...]] = (
    "ACME", "Acme", "acmE", "ac%6de", "%61cme", "%61%63%6d%65", "acme%2f..%2fother",
    "acme%2F..%2Fother",
    "..%2fother", "%2e%2e%2fother", "..", ".", "tenants", "tenants%2fother", "other%00", "%6fther",
    "OTHER", "Other", _u("ｏｔｈｅｒ"), _u("ａｃｍｅ"), "acme%00", "acme%20", "acme.", "acme;",
    "acme;jsessionid=x",
    "acme%3b", "acme%5c..%5cother", "acme\\..\\other", "other\\", "acme%09", "null", "none",
    "default",
    "%2f", "%2e", "%252e%252e%252fother", "acme%252f..%252fother", _u("acme\u200b"), _u("acmé"),
    "*", "%2a",
    "acme,other", "acme%2cother", "%", "%zz", "", "acme%0a", "api", "health", "openapi.json",
    b"acm\xc3\xa9", b"other\x00", "acme%2fother", "0ther", "acme-", "-acme", "_acme", "a" * 64,
)  # fmt: skip

# Whole request targets that try to reach another tenant through the route itself.
ROUTE_TARGETS: Final[tuple[str, ...]] = (
    "/api/v1/acme/../other/files/secret.txt", "/api/v1/acme/%2e%2e/other/files/secret.txt",
    "/api/v1/./other/files/secret.txt", "/api/v1/./acme/files/ns/mine.txt",
    "/api/v1/./acme/files/../../other/files/secret.txt", "/api/v1//other/files/secret.txt",
    "/api/v1/acme//files/secret.txt",
    "/api/v1/%2e%2e/%2e%2e/api/v1/other/files/secret.txt",
    "/api/v1/acme/files/%2e%2e/%2e%2e/other/files/secret.txt",
    "/%2e%2e/api/v1/other/files/secret.txt", "/API/V1/other/files/secret.txt",
    "/api/v1/files/../other/files/secret.txt",
    "/api/v1/acme/files/secret.txt/../../../other/files/secret.txt",
    "/api/v1/acme%2f..%2fother/files/secret.txt",
    "/api/v1;/other/files/secret.txt",
    "/api/v1%2fother/files/secret.txt", "/api%2fv1%2fother%2ffiles%2fsecret.txt",
    "/api/v1/acme\\..\\other/files/secret.txt",
    "/api/v1/other%2ffiles%2fsecret.txt", "/api/v1/acme?/../other/files/secret.txt",
    "/api/v1/acme#/../other/files/secret.txt",
    "http://127.0.0.1/api/v1/acme/files/../../other/files/secret.txt",
    "//api/v1/acme/../other/files/secret.txt",
    "/api/v1/tenants/other/files/secret.txt", "/api/v1/files/tenants/other/secret.txt",
    "/api/v1/stats/../other/stats/secret.txt",
    "/api/v1/ACME/files/ns/mine.txt", "/api/v1/acme/FILES/secret.txt",
    "/api/v1/acme/Files/ns/mine.txt",
)  # fmt: skip

# Methods that are not routes (WebDAV's COPY/MOVE carry a Destination in another tenant).
ODD_METHODS: Final = (
    "PATCH",
    "OPTIONS",
    "TRACE",
    "PROPFIND",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "POST",
)


def _compose(up: str | bytes, count: int, target: str) -> bytes:
    step = up if isinstance(up, bytes) else up.encode("ascii")
    return step * count + target.encode("ascii")


def _wire(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("ascii")


def build_corpus() -> list[bytes]:
    """Return the attack keys, as the bytes put after ``/files/`` on the request line."""
    keys: dict[bytes, None] = {}
    for i, up in enumerate(UPS):
        for count, target in (TARGET, TURNS[i % len(TURNS)]):
            keys[_compose(up, count, target)] = None
    for key in EXTRA_KEYS:
        keys[_wire(key)] = None
    return list(keys)


CORPUS: Final = build_corpus()


def decode_once(wire: bytes) -> str | None:
    """Given a key as sent, return it percent-decoded once (strict), or None if it cannot be."""
    path = wire.split(b"?", 1)[0].split(b"#", 1)[0]
    out = bytearray()
    i = 0
    while i < len(path):
        if path[i : i + 1] == b"%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(path[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def loose_text(wire: bytes) -> str:
    """Given a key as sent, return it decoded once where possible, bad bytes as surrogates."""
    out = bytearray()
    i = 0
    while i < len(wire):
        pair = wire[i + 1 : i + 3]
        if (
            wire[i : i + 1] == b"%"
            and len(pair) == 2
            and all(c in b"0123456789abcdefABCDEF" for c in pair)
        ):
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(wire[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


# ==============================================================================================
# Raw HTTP
# ==============================================================================================


@dataclass
class Probe:
    """One request, as bytes, and what is known of it."""

    phase: str
    method: str
    target: bytes
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    symlink: bool = False
    expect_key: str | None = None  # the logical key a 2xx must name, when known
    retry_with_source: str | None = None  # move: the scratch source to create for a retry
    key: bytes | None = None  # the corpus key this probe carries

    def raw(self, port: int) -> bytes:
        lines = [self.method.encode("ascii") + b" " + self.target + b" HTTP/1.1"]
        lines.append(f"Host: 127.0.0.1:{port}".encode("ascii"))
        lines.append(b"Connection: close")
        for name, value in self.headers:
            lines.append(f"{name}: {value}".encode("latin-1"))
        if self.body or self.method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(self.body)}".encode("ascii"))
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


@dataclass
class Answer:
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    error: str | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        if not (self.header("Content-Type") or "").startswith("application/json"):
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        line, _, rest = body.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            return bytes(out) + body
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def parse_answer(data: bytes, error: str | None = None) -> Answer:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status: int | None = None
    parts = lines[0].split(b" ", 2) if lines and lines[0] else []
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        status = int(parts[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    answer = Answer(status, headers, body if sep else b"", data, error)
    if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
        answer.body = _dechunk(answer.body)
    return answer


async def send(port: int, probe: Probe) -> Answer:
    """Given a probe, send it on a new connection and return the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    error = None
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(probe.raw(port))
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
        except ConnectionError as exc:
            error = f"connection error: {exc!r}"
        except TimeoutError:
            error = f"no complete answer within {REQUEST_TIMEOUT} s"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_answer(data, error)


async def send_all(port: int, probes: list[Probe]) -> list[Answer]:
    """Given probes, send them all, at most ``CONCURRENCY`` at a time, answers in order."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(probe: Probe) -> Answer:
        async with gate:
            return await send(port, probe)

    return list(await asyncio.gather(*(one(p) for p in probes)))


def show(probe: Probe, answer: Answer | None = None) -> str:
    text = f"request {probe.raw(0)[:400]!r}"
    if answer is not None:
        text += f"\n      answer {answer.status} {answer.raw[:400]!r}"
        if answer.error:
            text += f" ({answer.error})"
    return text


# ==============================================================================================
# Storage: canaries and snapshots
# ==============================================================================================


@dataclass(frozen=True)
class Canary:
    owner: str  # "null", "acme", "other", "system", "outside"
    location: str  # physical key, relative to the base ("../x" for outside it)
    content: bytes


def new_canaries(local: bool) -> list[Canary]:
    def secret(tag: str) -> bytes:
        return f"CANARY-{tag}-{secrets.token_hex(16)}".encode("ascii")

    canaries = [
        Canary("null", "secret.txt", secret("null")),
        Canary("null", "ns/secret.txt", secret("null-ns")),
        Canary("other", "tenants/other/secret.txt", secret("other")),
        Canary("other", "tenants/other/ns/secret.txt", secret("other-ns")),
        Canary("acme", "tenants/acme/ns/mine.txt", secret("acme")),
        Canary("system", ".gateway/canary", secret("system")),
    ]
    if local:
        canaries.append(Canary("outside", f"../{SIBLING}/outside.txt", secret("outside")))
    return canaries


# Symbolic links planted in the attackers' own scopes, pointing out of them (local only).
SYMLINKS: Final = {
    "tenants/acme/link-other": "../other",
    "tenants/acme/link-file": "../other/secret.txt",
    "tenants/acme/link-root": "../..",
    "link-out": f"../{SIBLING}",
    "link-file-out": f"../{SIBLING}/outside.txt",
    "link-tenants": "tenants",
}
SYMLINK_KEYS: Final = {
    "acme": ("link-other/secret.txt", "link-other/ns/secret.txt", "link-other", "link-file",
             "link-root/secret.txt", "link-root/tenants/other/secret.txt",
             "link-root/.gateway/canary",
             "link-root", "link-other/pwned.txt", "link-root/pwned.txt"),
    "null": ("link-out/outside.txt", "link-out", "link-file-out", "link-tenants/other/secret.txt",
             "link-tenants/other", "link-out/pwned.txt", "link-tenants/other/pwned.txt"),
}  # fmt: skip


def in_prefix(attacker: str | None, location: str) -> bool:
    """Given an attacker and a physical location, say whether it lies in the attacker's scope.

    A location with an empty, ``.`` or ``..`` segment counts as outside: S3 stores such a key
    literally, but a file-backed store (MinIO, Ceph's file layers) or a later copy to disk
    would resolve it.
    """
    segments = location.removesuffix("/").split("/")  # S3: "d/" is a directory marker
    if attacker is None or any(seg in ("", ".", "..") for seg in segments):
        return False
    if attacker == "acme":
        return location.startswith("tenants/acme/")
    first = location.split("/", 1)[0]
    return unicodedata.normalize("NFKC", first).casefold() not in RESERVED


Snapshot = dict[str, tuple[str, ...]]


@dataclass
class Storage:
    backend: str
    root: Path | None = None  # local: holds base/ and the sibling
    base: Path | None = None
    bucket: str | None = None
    endpoint: str | None = None
    client: Any = None

    def put(self, location: str, content: bytes) -> None:
        if self.base is not None:
            path = self.base / location
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        else:
            self.client.put_object(Bucket=self.bucket, Key=location, Body=content)

    def read(self, location: str) -> bytes | None:
        if self.base is not None:
            path = self.base / location
            if path.is_symlink() or not path.is_file():
                return None
            return path.read_bytes()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=location)["Body"].read()  # type: ignore[no-any-return]
        except self.client.exceptions.NoSuchKey:
            return None

    def digest(self, content: bytes) -> tuple[str, ...]:
        """Given content, return the first two fields its entry in a snapshot would have."""
        if self.base is not None:
            return ("file", hashlib.sha256(content).hexdigest())
        return ("object", f'"{hashlib.md5(content, usedforsecurity=False).hexdigest()}"')

    def _walk(self, directory: bytes, rel: str, result: Snapshot) -> None:
        """Record every entry below ``directory`` (never following a link) under ``rel/``."""
        with os.scandir(directory) as entries:
            for entry in entries:
                key = f"{rel}/{os.fsdecode(entry.name)}"
                if entry.is_symlink():
                    result[key] = ("link", os.fsdecode(os.readlink(entry.path)))
                elif entry.is_dir(follow_symlinks=False):
                    result[key] = ("dir",)
                    self._walk(entry.path, key, result)
                else:
                    with open(entry.path, "rb") as handle:
                        result[key] = ("file", hashlib.sha256(handle.read()).hexdigest())

    def snapshot(self) -> Snapshot:
        """Return every object (and, on disk, directory and link) with a digest of its content."""
        result: Snapshot = {}
        if self.root is not None and self.base is not None:
            # relative to the base; what lies beside it starts with "../"
            self._walk(os.fsencode(self.root), "..", result)
            result.pop("../base", None)
            return {k.removeprefix("../base/"): v for k, v in result.items()}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                result[item["Key"]] = ("object", item["ETag"], str(item["Size"]))
        return result


# The gateway's own documents, written for every mutation: only these exact names, so a key
# that escaped into the system prefix is still reported. First its audit records (gateway.audit)
AUDIT_RECORD: Final = re.compile(
    r"\.gateway/audit(/(~|[a-z0-9][a-z0-9_-]{0,62})(/[0-9]{20}-[0-9a-f]{12}\.json)?)?"
    # and its usage counters (gateway.usage): one document per tenant and process
    r"|\.gateway/usage(/(~|[a-z0-9][a-z0-9_-]{0,62})(/(base|p-[0-9a-f]+-[0-9a-f]{12})\.json)?)?"
    # and the local backend's temporary files: a write's own (named by the backend, caught
    # in flight by a snapshot: the usage counters are written in the background) and the
    # files of replaced objects it keeps for later writes (_Spares), renamed from the former,
    # and the segments of its journal of small writes (backends._journal)
    r"|\.gateway/tmp/[0-9a-f]{16}/([0-9a-f]{32}\.(spare|tmp)|journal-[0-9]+)"
    # and the checkpoint its processes record when they remove a journal
    r"|\.gateway/tmp/checkpoint"
)


def storage_changes(before: Snapshot, after: Snapshot) -> list[tuple[str, str]]:
    changes = [
        (k, "new" if k not in before else "changed") for k in after if before.get(k) != after[k]
    ]
    changes += [(k, "removed") for k in before if k not in after]
    return [(k, change) for k, change in changes if not AUDIT_RECORD.fullmatch(k)]


# ==============================================================================================
# The environments: one gateway process per (backend, mode)
# ==============================================================================================


@dataclass
class Env:
    backend: str
    mode: str
    gateway: GatewayProcess
    port: int
    storage: Storage
    canaries: list[Canary]
    markers: list[bytes]  # physical details no answer may show

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.mode}"

    def route(self, attacker: str) -> bytes:
        return b"/api/v1/" if attacker == "null" else f"/api/v1/{attacker}/".encode("ascii")


@pytest.fixture(scope="module")
def moto_endpoint(moto_server: MotoServer) -> str:
    """The endpoint of the session's moto server (``tests/conftest.py``); one bucket per mode."""
    assert moto_server.endpoint is not None
    return moto_server.endpoint


@dataclass
class SummaryRow:
    env: str
    run: Run


class _SummaryPlugin:
    """Prints the attack summary in pytest's terminal summary, after every test has run."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in summary_lines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("attack-summary"):
        manager.register(_SummaryPlugin(), "attack-summary")


def summary_lines() -> list[str]:
    if not SUMMARY:
        return []
    total = Counter[str]()
    lines = [
        "",
        f"attack summary: {len(CORPUS)} corpus keys, {len(URIS)} kestra URIs, "
        f"{len(TENANT_SEGMENTS)} tenant segments, {len(ROUTE_TARGETS)} route targets",
    ]
    for row in SUMMARY:
        run = row.run
        total.update(run.histogram)
        who = run.attacker or "tenant-seg"
        statuses = " ".join(f"{s}:{n}" for s, n in sorted(run.histogram.items()))
        sampled = (
            f" (s3: {run.sampled_out} accepted keys left to other modes)" if run.sampled_out else ""
        )
        head = f"  {row.env:8} {who:10} {run.count:6} requests {run.seconds:5.1f} s"
        lines.append(f"{head}  {statuses}{sampled}")
    key_runs = [row for row in SUMMARY if row.run.attacker is not None]
    backends = sorted({row.env.split("-")[0] for row in SUMMARY})
    lines.append(
        f"  {len(CORPUS)} keys x {len(key_runs)} (backend, mode, attacker) runs "
        f"over {len(backends)} backend(s) {backends}, plus {len(SUMMARY) - len(key_runs)} "
        "tenant-segment runs"
    )
    lines.append(
        f"  total: {len(SUMMARY)} runs, {sum(total.values())} requests: "
        + " ".join(f"{s}:{n}" for s, n in sorted(total.items()))
    )
    return lines


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Given a coroutine, run it to the end in a new event loop (uvloop's where installed)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


ENV_PARAMS: Final = [(b, m) for b in BACKENDS for m in MODES]


@pytest.fixture(scope="module", params=ENV_PARAMS, ids=[f"{b}-{m}" for b, m in ENV_PARAMS])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    backend, mode = request.param
    tenants = {**MODES[mode], "ids": ["acme", "other"]}
    if backend == "local":
        root = tmp_path_factory.mktemp(f"attacks-{mode}-")
        base = root / "base"
        base.mkdir()
        (root / SIBLING).mkdir()
        storage = Storage("local", root=root, base=base)
        config: dict[str, Any] = {"storage": {"type": "local", "local": {"base-path": str(base)}}}
        markers = [str(root).encode(), str(base).encode()]
    else:
        from tests.support.moto import make_bucket, s3_client

        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = f"attacks-{mode.lower()}-{secrets.token_hex(6)}"
        make_bucket(endpoint, bucket)
        storage = Storage("s3", bucket=bucket, endpoint=endpoint, client=s3_client(endpoint))
        s3 = {"bucket": bucket, "endpoint": endpoint, "force-path-style": True, **S3_ACCESS}
        config = {"storage": {"type": "s3", "s3": s3}}
        markers = [bucket.encode()]
    config["tenants"] = tenants
    # Keys, not identities, are under attack here; access control has its own matrix test.
    config["auth"] = {"enabled": False}
    canaries = new_canaries(local=backend == "local")
    for canary in canaries:
        storage.put(canary.location, canary.content)
    if storage.base is not None:
        for link, target in SYMLINKS.items():
            path = storage.base / link
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
    markers += [b"tenants/other", b"tenants/acme", b".gateway/tmp", b"Traceback"]
    gateway = GatewayProcess(config)
    gateway.start()
    assert gateway.port is not None
    try:
        yield Env(backend, mode, gateway, gateway.port, storage, canaries, markers)
    finally:
        code = gateway.stop()
        log = gateway.log_text()
        if storage.client is not None:
            storage.client.close()
        tracebacks = gateway_tracebacks(log)
        assert not tracebacks, "the gateway logged a traceback:\n" + "\n".join(tracebacks[:3])
        assert code == 0, f"the gateway exited with {code}:\n{log[-3000:]}"


def gateway_tracebacks(log: str) -> list[str]:
    """Given the gateway's log, return its tracebacks, less aiohttp's for unparsable requests.

    aiohttp's server logs a traceback at ERROR for every request line its parser refuses
    (and answers 400): noise an attacker can cause, but not the gateway's code failing.
    """
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        block = re.split(r"^\d{4}-\d\d-\d\d ", block, maxsplit=1, flags=re.MULTILINE)[0]
        if "aiohttp.http_exceptions." not in block:
            found.append(block[-2000:])
    return found


def check_canaries(env: Env) -> list[str]:
    """Return a problem for each canary that is gone or changed, saying where copies lie."""
    problems = []
    snapshot: Snapshot | None = None
    for canary in env.canaries:
        if env.storage.read(canary.location) == canary.content:
            continue
        snapshot = snapshot or env.storage.snapshot()
        digest = env.storage.digest(canary.content)
        copies = sorted(k for k, v in snapshot.items() if v[:2] == digest)
        problems.append(
            f"canary {canary.location} ({canary.owner}) is gone or changed; "
            f"its content is now at {copies or 'no location'}"
        )
    return problems


# ==============================================================================================
# Checks on one answer
# ==============================================================================================


KEY_FIELDS: Final = frozenset({"key", "uri", "fileName"})


def _strip_keys(value: Any, found: list[str]) -> Any:
    """Given a JSON value, return it without key-naming fields, collecting their values."""
    if isinstance(value, dict):
        kept = {}
        for name, item in value.items():
            if name in KEY_FIELDS and isinstance(item, str):
                found.append(f"{name}:{item}")
            elif name == "cursor" and isinstance(item, str):
                found.append(f"cursor:{item}")
            else:
                kept[name] = _strip_keys(item, found)
        return kept
    if isinstance(value, list):
        return [_strip_keys(item, found) for item in value]
    return value


def decode_cursor(value: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass(repr=False)  # asyncio's task bookkeeping would repr every answer it holds
class Run:
    """What one attacker did in one environment, and what it may have made."""

    env: Env
    attacker: str | None  # None: nobody's scope (tenant-segment attacks)
    problems: list[str] = field(default_factory=list)
    histogram: Counter[str] = field(default_factory=Counter)
    made: set[str] = field(default_factory=set)  # logical keys the attacker's 2xx answers named
    sampled_out: int = 0  # S3: accepted keys left out of the phases after the upload
    seconds: float = 0.0
    forbidden: list[tuple[bytes, str]] = field(init=False, default_factory=list)
    shown: list[tuple[str, Probe, Answer]] = field(default_factory=list)
    count: int = 0

    @property
    def own(self) -> set[str]:
        return {c.location for c in self.env.canaries if c.owner == self.attacker}

    @property
    def prefix(self) -> str:
        return "tenants/acme/" if self.attacker == "acme" else ""

    def __repr__(self) -> str:
        return f"Run({self.env.name}, {self.attacker}, {self.count} requests)"

    def __post_init__(self) -> None:
        self.forbidden = [
            (c.content, c.location) for c in self.env.canaries if c.owner != self.attacker
        ]

    def check(self, probe: Probe, answer: Answer) -> None:
        self.count += 1
        status = answer.status
        self.histogram["none" if status is None else str(status)] += 1

        def fail(what: str) -> None:
            self.problems.append(f"{what}: {show(probe, answer)}")

        if status is None:
            fail(f"no answer ({answer.error or 'connection closed'})")
            return
        allowed = ALLOWED_REFUSALS | ({403} if probe.symlink else set())
        if status >= 500:
            fail("5xx")
        elif not (200 <= status < 300 and self.attacker is not None) and status not in allowed:
            fail(f"unexpected status {status}")
        raw = answer.raw
        for content, location in self.forbidden:
            if content in raw:
                fail(f"LEAK of canary {location}")
        data = answer.json() if 200 <= status < 300 else None
        found: list[str] = []
        if data is not None and 200 <= status < 300:
            head = raw.partition(b"\r\n\r\n")[0]
            raw = head + json.dumps(_strip_keys(data, found), ensure_ascii=False).encode()
        for marker in self.env.markers:
            # an answer may echo the request (aiohttp's 400 for a bad request line does)
            if marker in raw and marker not in probe.raw(self.env.port):
                fail(f"physical detail {marker!r} in an answer")
        if status == 400 and probe.method != "HEAD" and b"application/json" in raw[:400]:
            body = answer.json()
            if not (isinstance(body, dict) and {"error", "message"} <= set(body)):
                fail("400 without error and message")
        self.shown += [(item, probe, answer) for item in found]
        if 200 <= status < 300 and isinstance(data, dict):
            key = data.get("key")
            if probe.phase in ("put", "mkdir", "move") and isinstance(key, str):
                self.made.add(key)
                if probe.expect_key is not None and key != probe.expect_key:
                    fail(f"answer names key {key!r}, not {probe.expect_key!r}")

    def check_shown(self) -> None:
        """Every key or cursor an answer showed is one the attacker may know."""
        known = {""}
        logical = {loc[len(self.prefix) :] for loc in self.own if loc.startswith(self.prefix)}
        if self.env.storage.base is not None:
            logical |= {k[len(self.prefix) :] for k in SYMLINKS if in_prefix(self.attacker, k)}
        for key in self.made | logical:
            parts = key.split("/")
            known.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for item, probe, answer in self.shown:
            kind, _, value = item.partition(":")
            if kind == "uri":
                value = unquote(value.removeprefix("kestra:///"))
            elif kind == "fileName":
                continue
            elif kind == "cursor":
                decoded = decode_cursor(value)
                if decoded is None:
                    self.problems.append(f"undecodable cursor {value!r}: {show(probe, answer)}")
                    continue
                # a directory's cursor is its key and "/", where S3 puts a common prefix
                value = decoded.removesuffix("/")
                # the null tenant's listing skips a reserved prefix with "<prefix>/U+10FFFF"
                top, _, rest = value.partition("/")
                if self.attacker == "null" and top in RESERVED and rest == "\U0010ffff":
                    continue
            if self.attacker == "null" and not in_prefix("null", value or "x"):
                self.problems.append(
                    f"null tenant shown reserved {kind} {value!r}: {show(probe, answer)}"
                )
            elif value not in known:
                self.problems.append(
                    f"{kind} {value!r} shown, never made by {self.attacker}: {show(probe, answer)}"
                )


# ==============================================================================================
# The probes
# ==============================================================================================


def key_probes(
    env: Env, attacker: str, keys: list[bytes], symlink_keys: tuple[str, ...]
) -> dict[str, list[Probe]]:
    """Given an attacker and its keys, return its probes by phase, in the order to send them.

    Every key goes through every action. Where two requests take the same path through the
    gateway (GET and HEAD; DELETE with and without ``recursive``; stats and a listing, both
    of which accept the root; ``?uri=`` on files and on stats), a key gets one of the two,
    alternating with the key's index and the tenancy mode, so that over the modes every key
    meets both, and each run stays short.
    """
    route = env.route(attacker)
    files, stats, listing = route + b"files/", route + b"stats/", route + b"list/"
    json_type = (("Content-Type", "application/json"),)
    phases: dict[str, list[Probe]] = {p: [] for p in ("put", "read", "move", "delete", "mkdir")}
    entries = [(k, False) for k in keys] + [(k.encode(), True) for k in symlink_keys]
    own = next(c.location for c in env.canaries if c.owner == attacker)
    own_key = own.removeprefix("tenants/acme/")
    rot = list(MODES).index(env.mode)
    for i, (wire, link) in enumerate(entries):
        odd = (i + rot) % 2 == 1
        kw: dict[str, Any] = {"symlink": link, "expect_key": decode_once(wire), "key": wire}
        text = loose_text(wire)
        uri_key = wire.replace(b"?", b"%3F").replace(b"#", b"%23").replace(b"&", b"%26")
        payload = f"payload:{attacker}:{i}".encode()
        phases["put"].append(Probe("put", "PUT", files + wire, payload, **kw))
        turn = (i // 2 + rot) % 2 == 1  # a second alternation, independent of the first
        phases["read"] += [
            Probe("read", "HEAD" if odd else "GET", files + wire, **kw),
            Probe("read", "GET", listing + wire + (b"?recursive=true" if odd else b""), **kw)
            if turn
            else Probe("read", "GET", stats + wire, **kw),
            Probe("read", "GET", stats.rstrip(b"/") + b"?uri=kestra://" + uri_key, **kw)
            if odd
            else Probe("read", "GET", files.rstrip(b"/") + b"?uri=kestra:///" + uri_key, **kw),
        ]
        # JSON carries keys undecoded: the key as sent (escapes and all) and decoded once
        raw_text = wire.decode("utf-8", "surrogateescape")
        moves: list[tuple[dict[str, str], str | None]] = [
            ({"from": f"scratch/{i}", "to": text}, f"scratch/{i}")
        ]
        if turn:
            moves.append(({"from": text, "to": f"moved/{i}"}, None))
        elif raw_text != text:
            moves.append(({"from": f"scratch/{i}b", "to": raw_text}, f"scratch/{i}b"))
        for body, source in moves:
            phases["move"].append(
                Probe("move", "POST", route + b"move", json.dumps(body).encode(), json_type,
                      symlink=link, retry_with_source=source, key=wire)
            )  # fmt: skip
        delete = files + wire + (b"?recursive=true" if odd else b"")
        phases["delete"].append(Probe("delete", "DELETE", delete, **kw))
        phases["mkdir"].append(Probe("mkdir", "POST", route + b"directories/" + wire, **kw))
    # kestra:// URIs in the query, with every action that takes one
    own_uri = b"uri=kestra:///" + own_key.encode()
    for i, uri in enumerate(URIS):
        odd = (i + rot) % 2 == 1
        query = b"?uri=" + uri.encode("ascii").replace(b"&", b"%26").replace(b"#", b"%23")
        on_files = files.rstrip(b"/") + query
        phases["put"].append(Probe("put", "PUT", on_files, b"uri-payload"))
        phases["read"] += [
            Probe("read", "HEAD" if odd else "GET", on_files),
            Probe("read", "GET", stats.rstrip(b"/") + query),
            # the first ?uri= wins: the attack first, or a harmless one first
            Probe(
                "read",
                "GET",
                on_files + b"&" + own_uri
                if odd
                else files.rstrip(b"/") + b"?" + own_uri + b"&" + query[1:],
            ),
        ]
        phases["delete"].append(
            Probe("delete", "DELETE", on_files + (b"&recursive=true" if odd else b""))
        )
        for body, source in (
            ({"from": uri, "to": "stolen.txt"}, None),
            ({"from": "scratch/u", "to": uri}, "scratch/u"),
        ):
            phases["move"].append(
                Probe("move", "POST", route + b"move", json.dumps(body).encode(), json_type,
                      retry_with_source=source)
            )  # fmt: skip
    phases["move"] += [
        Probe("move", "POST", route + b"move", body, (("Content-Type", "application/json"),))
        for body in json_bodies(attacker, own_key)
    ]
    phases["read"] += list_probes(route)
    phases["read"] += method_probes(route, own_key)
    return phases


def json_bodies(attacker: str, own_key: str) -> list[bytes]:
    """Move bodies that attack through JSON itself: lone surrogates, escapes, wrong types."""
    texts = [
        r'{"from": "\ud800", "to": "x"}', r'{"from": "scratch/j", "to": "\ud800"}',
        r'{"from": "scratch/j", "to": "\udc2e\udc2e/other/secret.txt"}',
        r'{"from": "scratch/j", "to": "..\udcc0\udcaf../other/secret.txt"}',
        r'{"from": "scratch/j", "to": "ns/\ud83d"}', r'{"from": "scratch/j", "to": "\udfff/x"}',
        r'{"from": "scratch/j", "to": "\u002e\u002e/other/secret.txt"}',
        r'{"from": "scratch/j", "to": "..\u002fother\u002fsecret.txt"}',
        r'{"from": "scratch/j", "to": "..\u005cother\u005csecret.txt"}',
        r'{"from": "scratch/j", "to": "\u2025/other/secret.txt"}',
        r'{"from": "scratch/j", "to": "\u0000"}', r'{"from": "scratch/j", "to": "a\u0000/../../x"}',
        r'{"from": "scratch/j", "to": "x", "to": "../other/secret.txt"}',
        r'{"from": "../other/secret.txt", "from": "scratch/j", "to": "../other/x"}',
        r'{"from": ["../other/secret.txt"], "to": "x"}',
        r'{"from": {"key": "../other"}, "to": "x"}',
        r'{"from": null, "to": "x"}', r'{"from": 1, "to": "x"}', r'{"from": true}', "{}", "[]",
        r'"../other/secret.txt"', "null", r'{"from": "../other/secret.txt"',
        r'{"from": "scratch/j", "to": 1e999}',
        r'{"from": "../other/secret.txt", "to": "stolen.txt"}',
        r'{"from": "../../tenants/other/secret.txt", "to": "stolen.txt"}',
        r'{"from": "tenants/other/secret.txt", "to": "stolen.txt"}',
        r'{"from": ".gateway/canary", "to": "stolen.txt"}',
        r'{"from": "../../.gateway/canary", "to": "stolen.txt"}',
        r'{"from": "kestra://../other/secret.txt", "to": "stolen.txt"}',
        r'{"from": "kestra:///../../tenants/other/secret.txt", "to": "stolen.txt"}',
        r'{"from": "../' + SIBLING + r'/outside.txt", "to": "stolen.txt"}',
        r'{"from": "../../../' + SIBLING + r'/outside.txt", "to": "stolen.txt"}',
    ]  # fmt: skip
    bodies = [t.encode("utf-8") for t in texts]
    bodies += [b"\xff\xfe{}", b'{"from": "\xc0\xae\xc0\xae/other", "to": "x"}', b"", b"\x00"]
    # the attacker's own canary as the source: only a refused destination keeps it in place
    for dest in ("../other/pwned.txt", "../../tenants/other/pwned.txt", "tenants/other/pwned.txt",
                 ".gateway/pwned", f"../{SIBLING}/pwned.txt", f"../../../{SIBLING}/pwned.txt",
                 "..%2fother%2fpwned.txt", "kestra://../other/pwned.txt", "/tmp/pwned", "C:/pwned",
                 "\u2025/other/pwned.txt", "..\\other\\pwned.txt", "\ud800",
                 "../acme/pwned.txt"):  # fmt: skip
        if attacker == "acme" and dest in ("tenants/other/pwned.txt", ".gateway/pwned"):
            continue  # keys of acme's own scope: the move would be legitimate
        bodies.append(json.dumps({"from": own_key, "to": dest}).encode())
    return bodies


def list_probes(route: bytes) -> list[Probe]:
    """Listings with cursors and limits an attacker forged."""
    probes = []

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    cursors = [
        b64(b"../other/secret.txt"), b64(b"../../tenants/other/"), b64(b"tenants/other/"), b64(b""),
        b64(b"\x00"), b64(b"\xff\xfe"), b"!!!", b"%2e%2e", b"a" * 5000, b64(b"/"),
        b64(b".gateway/"),
        b64("\U0010ffff".encode()), b64(b"tenants/other/ns/secret.txt"), b64(b".."), b64(b"..\x00"),
        b64(b"/" * 10), b64(b"tenants/"), b64(b"tenants/acme/"), b"====", b64(b"\\..\\other"),
    ]  # fmt: skip
    for cursor in cursors:
        for query in (b"?cursor=", b"?recursive=true&limit=1&cursor=", b"?limit=2&cursor="):
            probes.append(Probe("read", "GET", route + b"list" + query + cursor))
    queries = (
        b"?limit=0", b"?limit=-1", b"?limit=1001", b"?limit=1e3", b"?limit=%31",
        b"?recursive=maybe", b"?recursive=true&recursive=false",
        b"?limit=99999999999999999999999", b"?limit=1&limit=1000",
    )  # fmt: skip
    for query in queries:
        probes.append(Probe("read", "GET", route + b"list" + query))
        probes.append(Probe("read", "GET", route + b"list/ns" + query))
    probes.append(Probe("read", "GET", route + b"list?recursive=true"))
    probes.append(Probe("read", "GET", route + b"stats"))
    return probes


def method_probes(route: bytes, own_key: str) -> list[Probe]:
    """Methods no route serves, some carrying a Destination in another tenant (WebDAV)."""
    probes = []
    for method in ODD_METHODS:
        for target in (route + b"files/" + own_key.encode(), route + b"stats/" + own_key.encode()):
            headers = (("Destination", "/api/v1/other/files/pwned.txt"), ("Overwrite", "T"))
            probes.append(Probe("read", method, target, b"", headers))
    override = (
        ("X-HTTP-Method-Override", "MOVE"),
        ("Destination", "/api/v1/other/files/pwned.txt"),
    )
    probes.append(Probe("read", "GET", route + b"files/" + own_key.encode(), b"", override))
    return probes


async def paginate(env: Env, run: Run, route: bytes, limit: int) -> None:
    """Walk a whole recursive listing page by page, checking each page."""
    cursor: str | None = None
    for _ in range(5000):
        target = route + b"list?recursive=true&limit=" + str(limit).encode()
        if cursor:
            target += b"&cursor=" + cursor.encode()
        probe = Probe("read", "GET", target)
        answer = await send(env.port, probe)
        run.check(probe, answer)
        data = answer.json()
        if answer.status != 200 or not isinstance(data, dict):
            return
        cursor = data.get("cursor")
        if not cursor:
            return
    run.problems.append(f"pagination of {route!r} never ended")


def tenant_probes() -> list[Probe]:
    probes = []
    for segment in TENANT_SEGMENTS:
        seg = _wire(segment)
        base = b"/api/v1/" + seg + b"/"
        probes += [
            Probe("tenant", "GET", base + b"files/secret.txt"),
            Probe("tenant", "HEAD", base + b"files/ns/mine.txt"),
            Probe("tenant", "GET", base + b"stats/ns/secret.txt"),
            Probe("tenant", "GET", base + b"list?recursive=true"),
            Probe("tenant", "PUT", base + b"files/pwned.txt", b"pwned"),
            Probe("tenant", "DELETE", base + b"files/ns?recursive=true"),
            Probe("tenant", "POST", base + b"directories/pwned"),
            Probe("tenant", "POST", base + b"move", b'{"from": "secret.txt", "to": "stolen.txt"}',
                  (("Content-Type", "application/json"),)),
        ]  # fmt: skip
    for target in ROUTE_TARGETS:
        for method in ("GET", "HEAD", "DELETE", "PUT"):
            probes.append(
                Probe("tenant", method, target.encode("ascii"), b"x" if method == "PUT" else b"")
            )
    return probes


# ==============================================================================================
# The tests
# ==============================================================================================


def test_corpus_is_large_and_distinct() -> None:
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) == len(CORPUS)
    assert len(URIS) >= 50 and len(TENANT_SEGMENTS) >= 50


def test_canaries_are_where_the_layout_says(env: Env) -> None:
    """Controls: each attacker reads its own canaries through the API, so a 404 means refusal."""
    run_async(_controls(env))


async def _controls(env: Env) -> None:
    for attacker in ATTACKERS[env.mode]:
        for canary in env.canaries:
            if canary.owner != attacker:
                continue
            key = canary.location.removeprefix("tenants/acme/").encode()
            answer = await send(
                env.port, Probe("control", "GET", env.route(attacker) + b"files/" + key)
            )
            assert answer.status == 200, show(Probe("control", "GET", key), answer)
            assert answer.body == canary.content
    if env.mode in ("B", "C"):  # tenant "other" exists and is served: its canary is where we put it
        answer = await send(env.port, Probe("control", "GET", b"/api/v1/other/files/ns/secret.txt"))
        assert answer.status == 200
        assert answer.body == next(
            c.content for c in env.canaries if c.location.endswith("other/ns/secret.txt")
        )
    if env.mode == "A":
        answer = await send(env.port, Probe("control", "GET", b"/api/v1/acme/files/ns/mine.txt"))
        assert answer.status == 404
    if env.mode == "C":
        answer = await send(env.port, Probe("control", "GET", b"/api/v1/files/secret.txt"))
        assert answer.status == 404


def s3_skipped(env: Env, puts: list[Probe], answers: list[Answer]) -> set[bytes]:
    """Given the uploads of a run on S3, return the accepted keys to leave out of later phases.

    moto serves about a hundred S3 calls a second, so on S3 the keys the gateway accepted
    (their requests reach the store) take the remaining actions by turns: one in
    ``S3_ACCEPTED_SHARE`` per run, a different share in each mode; refused keys, which never
    reach the store, still take every action in every run.
    """
    accepted: dict[str, bytes] = {}
    for probe, answer in zip(puts, answers, strict=True):
        if probe.key is not None and answer.status != 400:
            accepted.setdefault(decode_once(probe.key) or repr(probe.key), probe.key)
    rot = list(MODES).index(env.mode)
    keep = {w for j, w in enumerate(accepted.values()) if (j + rot) % S3_ACCEPTED_SHARE == 0}
    return {p.key for p in puts if p.key is not None and p.key not in keep} - {
        p.key for p, a in zip(puts, answers, strict=True) if a.status == 400
    }


async def _attack(env: Env, attacker: str) -> Run:
    started = time.monotonic()
    run = Run(env, attacker)
    links = SYMLINK_KEYS[attacker] if env.storage.base is not None else ()
    phases = key_probes(env, attacker, CORPUS, links)
    before = env.storage.snapshot()
    skip: set[bytes] = set()
    for name, probes in phases.items():
        probes = [p for p in probes if p.key not in skip]
        answers = await send_all(env.port, probes)
        for probe, answer in zip(probes, answers, strict=True):
            run.check(probe, answer)
        if name == "put":
            after_put = env.storage.snapshot()
            for probe, answer in zip(probes, answers, strict=True):
                data = answer.json()
                if (
                    answer.status == 201
                    and isinstance(data, dict)
                    and isinstance(data.get("key"), str)
                ):
                    location = run.prefix + data["key"]
                    if location not in after_put or not in_prefix(attacker, location):
                        run.problems.append(
                            f"accepted upload not at {location!r}: {show(probe, answer)}"
                        )
            if env.backend == "s3":
                skip = s3_skipped(env, probes, answers)
                run.sampled_out = len(skip)
        if name == "move":
            # a move that passed the keys and failed for a missing source: again, with one
            retries = [
                (p, a) for p, a in zip(probes, answers, strict=True)
                if p.retry_with_source and a.status is not None and a.status not in (400, 405)
            ]  # fmt: skip
            sources = sorted({p.retry_with_source for p, _ in retries if p.retry_with_source})
            route = env.route(attacker)
            setup = [
                Probe("setup", "PUT", route + b"files/" + s.encode(), b"scratch") for s in sources
            ]
            for probe, answer in zip(setup, await send_all(env.port, setup), strict=True):
                assert answer.status == 201, show(probe, answer)
            run.made.update(sources)
            again = [p for p, _ in retries]
            for probe, answer in zip(again, await send_all(env.port, again), strict=True):
                run.check(probe, answer)
        if name == "read":
            await paginate(env, run, env.route(attacker), limit=7)
    after = env.storage.snapshot()
    for location, change in storage_changes(before, after):
        if not in_prefix(attacker, location):
            run.problems.append(f"ESCAPE: {change} {location!r} outside {attacker}'s scope")
    run.problems += check_canaries(env)
    run.check_shown()
    run.seconds = time.monotonic() - started
    return run


SEVERITY: Final = ("LEAK", "ESCAPE", "canary", "accepted upload", "5xx", "physical detail",
                   "no answer", "null tenant shown", "shown", "unexpected status")  # fmt: skip


def _severity(problem: str) -> int:
    """Given a problem line, return its rank: leaks and escapes first."""
    text = problem.split("] ", 1)[-1]
    return next((i for i, word in enumerate(SEVERITY) if word in text[:80]), len(SEVERITY))


def _report(env: Env, runs: list[Run]) -> None:
    problems: list[str] = []
    for run in runs:
        SUMMARY.append(SummaryRow(env.name, run))
        problems += [f"[{env.name} {run.attacker or 'tenant segments'}] {p}" for p in run.problems]
    if problems:
        problems.sort(key=_severity)
        shown = "\n".join(problems[:40])
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        log = env.gateway.log_text()[-3000:]
        pytest.fail(
            f"{len(problems)} problem(s):\n{shown}{more}\n--- gateway log tail ---\n{log}",
            pytrace=False,
        )


def test_key_attacks_stay_in_the_attacker_scope(env: Env) -> None:
    runs = [run_async(_attack(env, attacker)) for attacker in ATTACKERS[env.mode]]
    _report(env, runs)


async def _attack_tenant_segments(env: Env) -> Run:
    started = time.monotonic()
    run = Run(env, None)
    before = env.storage.snapshot()
    probes = tenant_probes()
    for probe, answer in zip(probes, await send_all(env.port, probes), strict=True):
        run.check(probe, answer)
    for location, change in storage_changes(before, env.storage.snapshot()):
        run.problems.append(f"ESCAPE: {change} {location!r} after tenant-segment attacks")
    run.problems += check_canaries(env)
    run.seconds = time.monotonic() - started
    return run


def test_tenant_segment_attacks_are_refused(env: Env) -> None:
    """Tenant segments other than an exact tenant id name no scope: no 2xx, no change at all."""
    _report(env, [run_async(_attack_tenant_segments(env))])
