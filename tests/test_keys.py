"""The key function, called directly (HTTP clients normalise ``..``; this does not).

Classes are numbered as in issue 2 and in ``gateway.keys``; ``tests/test_api_keys.py`` sends
the same classes over HTTP with the raw bytes on the request line.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import keys
from gateway.errors import InvalidKey, InvalidTenant
from gateway.keys import NULL_SCOPE, Scope, decode_path, parse_uri, resolve, unresolve

ACME = Scope("acme")


def refused(scope: Scope, key: str) -> str:
    with pytest.raises(InvalidKey) as info:
        resolve(scope, key)
    return info.value.rule


# -- what is accepted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "key", "physical"),
    [
        (ACME, "ns/flow/out.csv", "tenants/acme/ns/flow/out.csv"),
        (NULL_SCOPE, "ns/flow/out.csv", "ns/flow/out.csv"),
        (ACME, "tenants/other/x", "tenants/acme/tenants/other/x"),
        (ACME, ".gateway/x", "tenants/acme/.gateway/x"),
        (NULL_SCOPE, ".hidden/file", ".hidden/file"),
        (NULL_SCOPE, "a..b/c.d", "a..b/c.d"),
        (NULL_SCOPE, "données/été ☃.txt", "données/été ☃.txt"),
        (NULL_SCOPE, "50%/x", "50%/x"),
        (NULL_SCOPE, "tenantsx/y", "tenantsx/y"),
        (NULL_SCOPE, "ns/tenants/x", "ns/tenants/x"),
        (NULL_SCOPE, "emoji/👩‍💻.txt", "emoji/👩‍💻.txt"),
    ],
)
def test_valid_key_resolves_into_the_scope_prefix(scope: Scope, key: str, physical: str) -> None:
    assert resolve(scope, key) == physical
    assert unresolve(scope, physical) == key


# -- 1. dot segments ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["..", ".", "../x", "a/../b", "a/./b", "a/..", "...", "a/.../b"])
def test_dot_segment_is_refused(key: str) -> None:
    assert refused(ACME, key) == "dot-segment"
    assert refused(NULL_SCOPE, key) == "dot-segment"


@pytest.mark.parametrize("raw", ["%2e%2e/x", ".%2e/x", "%2E./x", "a/%2e"])
def test_dot_segment_after_the_one_decoding_is_refused(raw: str) -> None:
    assert refused(ACME, decode_path(raw)) == "dot-segment"


# -- 2. double encoding -------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["%252e%252e/x", "a%252fb", "%255c", "a/%2500", "x%25%32%65"])
def test_percent_escape_left_after_decoding_is_refused(raw: str) -> None:
    assert refused(ACME, decode_path(raw)) == "double-encoding"


@pytest.mark.parametrize("raw", ["%", "a%2", "a%zz", "a%-1", "a%+1"])
def test_malformed_percent_is_refused_by_the_decoding(raw: str) -> None:
    with pytest.raises(InvalidKey) as info:
        decode_path(raw)
    assert info.value.rule == "malformed-percent"


# -- 3. backslash -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a\\b", "\\x", "x\\", "..\\..\\x", "\\\\server\\share"])
def test_backslash_is_refused(key: str) -> None:
    assert refused(ACME, key) == "backslash"


def test_encoded_backslash_is_refused_after_decoding() -> None:
    assert refused(ACME, decode_path("a%5cb")) == "backslash"
    assert refused(ACME, decode_path("%5C..%5Cx")) == "backslash"


# -- 4. control characters ----------------------------------------------------------------


@pytest.mark.parametrize("code", [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)])
def test_control_character_is_refused(code: int) -> None:
    assert refused(ACME, f"a{chr(code)}b") == "control-character"


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200f"])
def test_bidirectional_override_is_refused(char: str) -> None:
    assert refused(ACME, f"invoice{char}fdp.exe") == "control-character"


def test_encoded_nul_is_refused() -> None:
    assert refused(ACME, decode_path("a%00.txt")) == "control-character"


# -- 5. invalid UTF-8 and surrogates ------------------------------------------------------


@pytest.mark.parametrize("raw", ["%c0%ae", "%ff", "%c0%af", "%e0%80%ae", "a%80", "%ed%a0%80"])
def test_invalid_utf8_is_refused_by_the_decoding(raw: str) -> None:
    with pytest.raises(InvalidKey) as info:
        decode_path(raw)
    assert info.value.rule == "invalid-utf8"


def test_raw_non_utf8_byte_on_the_request_line_is_refused() -> None:
    # aiohttp hands raw bytes over surrogate-escaped; they must not decode.
    with pytest.raises(InvalidKey) as info:
        decode_path("a\udcffb")
    assert info.value.rule == "invalid-utf8"


@pytest.mark.parametrize("key", ["a\ud800b", "\udfff", "x/\udc80"])
def test_lone_surrogate_is_refused(key: str) -> None:
    assert refused(ACME, key) == "invalid-utf8"


# -- 6. look-alikes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "\uff0e\uff0e/x",  # fullwidth full stops
        "\u2025/x",  # two dot leader
        "\u2024",  # one dot leader
        "\u2026",  # ellipsis
        "a\uff0fb",  # fullwidth solidus
        "a\ufe68b",  # small reverse solidus
        "a\uff3cb",  # fullwidth reverse solidus
        "a\uff05\uff12\uff45",  # fullwidth %2e
        "\ufe52\ufe52",  # small full stops
    ],
)
def test_lookalike_that_normalises_to_a_separator_or_dots_is_refused(key: str) -> None:
    assert refused(ACME, key) == "lookalike"


def test_lookalike_that_normalises_to_something_harmless_is_kept() -> None:
    # "ﬁ" (U+FB01) normalises to "fi": not dangerous, and the key is stored as sent.
    assert resolve(ACME, "\ufb01le") == "tenants/acme/\ufb01le"


# -- 7. absolute paths, empty segments, drives --------------------------------------------


@pytest.mark.parametrize("key", ["/x", "//x", "/", "///etc/passwd"])
def test_absolute_path_is_refused(key: str) -> None:
    assert refused(ACME, key) == "empty-segment"


@pytest.mark.parametrize("key", ["a//b", "a/", "a/b/"])
def test_empty_segment_is_refused(key: str) -> None:
    assert refused(ACME, key) == "empty-segment"


@pytest.mark.parametrize("key", ["C:", "c:/windows", "Z:x"])
def test_drive_path_is_refused(key: str) -> None:
    assert refused(ACME, key) == "drive-path"


def test_empty_key_is_refused() -> None:
    assert refused(ACME, "") == "empty-key"


# -- 9. lengths ---------------------------------------------------------------------------


def test_segment_over_255_bytes_is_refused() -> None:
    assert resolve(ACME, "a" * 255) == "tenants/acme/" + "a" * 255
    assert refused(ACME, "a" * 256) == "segment-too-long"
    assert refused(ACME, "é" * 128) == "segment-too-long"  # 256 bytes in UTF-8


def test_physical_key_over_1024_bytes_is_refused_after_the_prefix() -> None:
    key = "/".join(["a" * 200] * 5) + "/" + "b" * 9  # 1,014 bytes
    assert len(key) == 1014
    assert resolve(NULL_SCOPE, key) == key  # fits at the root
    assert refused(ACME, key) == "key-too-long"  # "tenants/acme/" makes it 1,027


# -- 10. reserved prefixes of the null tenant ---------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["tenants", "tenants/acme/x", "Tenants/acme/x", "TENANTS/x", ".gateway/x", ".GATEWAY",
     "\uff54\uff45\uff4e\uff41\uff4e\uff54\uff53/x", "\uff0egateway/x"],
)  # fmt: skip
def test_null_tenant_cannot_name_a_reserved_prefix(key: str) -> None:
    assert refused(NULL_SCOPE, key) == "reserved-prefix"


def test_encoded_reserved_prefix_is_refused_after_decoding() -> None:
    assert refused(NULL_SCOPE, decode_path("%74enants/acme/x")) == "reserved-prefix"
    assert refused(NULL_SCOPE, decode_path("%2egateway/x")) == "reserved-prefix"


def test_unresolve_refuses_keys_outside_the_scope() -> None:
    with pytest.raises(ValueError):
        unresolve(ACME, "tenants/other/x")
    with pytest.raises(ValueError):
        unresolve(NULL_SCOPE, "tenants/acme/x")
    with pytest.raises(ValueError):
        unresolve(ACME, "tenants/acme/")


def test_visible_hides_reserved_prefixes_and_other_scopes() -> None:
    assert keys.visible(NULL_SCOPE, "ns/a")
    assert not keys.visible(NULL_SCOPE, "tenants")
    assert not keys.visible(NULL_SCOPE, "tenants/acme/x")
    assert not keys.visible(NULL_SCOPE, ".gateway/tmp")
    assert keys.visible(ACME, "tenants/acme/x")
    assert not keys.visible(ACME, "tenants/acmex/y")
    assert not keys.visible(ACME, "tenants/other/x")


# -- 11. tenant ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tenant",
    ["ACME", "Acme", "ac.me", "a/b", "..", ".", "", "-acme", "_x", "a" * 64, "ac%6de",
     "acme%2f..", "acme ", "tenants", "files", "null", "api", "list", "ac\u0000me", "ａｃｍｅ",
     "acmé"],
)  # fmt: skip
def test_tenant_id_outside_the_grammar_is_refused(tenant: str) -> None:
    with pytest.raises(InvalidTenant) as info:
        keys.tenant_scope(tenant)
    assert info.value.rule == "tenant-id"


@pytest.mark.parametrize("tenant", ["acme", "a", "0", "team-1_prod", "a" * 63])
def test_tenant_id_in_the_grammar_is_accepted(tenant: str) -> None:
    assert keys.tenant_scope(tenant).prefix == f"tenants/{tenant}/"


# -- 12. kestra:// URIs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["kestra:///ns/flow/file.csv", "kestra://ns/flow/file.csv", "KESTRA:///ns/flow/file.csv"],
)
def test_legacy_and_canonical_uris_name_the_same_key(uri: str) -> None:
    assert parse_uri(uri) == "ns/flow/file.csv"


def test_uri_is_decoded_once() -> None:
    assert parse_uri("kestra:///ns/a%20b.csv") == "ns/a b.csv"
    with pytest.raises(InvalidKey) as info:
        parse_uri("kestra:///ns/a%252e")
    assert info.value.rule == "double-encoding"


@pytest.mark.parametrize(
    "uri",
    ["kestra://user@ns/f", "kestra://u:p@ns/f", "kestra://ns:8080/f", "kestra:///ns/f?x=1",
     "kestra:///ns/f#frag", "s3://bucket/ns/f", "file:///etc/passwd", "kestra:/ns/f", "ns/f"],
)  # fmt: skip
def test_uri_with_user_info_port_query_fragment_or_other_scheme_is_refused(uri: str) -> None:
    with pytest.raises(InvalidKey) as info:
        parse_uri(uri)
    assert info.value.rule == "uri"


@pytest.mark.parametrize(
    ("uri", "rule"),
    [
        ("kestra://../etc/passwd", "dot-segment"),
        ("kestra://..", "dot-segment"),
        ("kestra://%2e%2e/x", "dot-segment"),
        ("kestra:////etc/passwd", "empty-segment"),
        ("kestra://", "empty-key"),
        ("kestra://ns/../../x", "dot-segment"),
        ("kestra://ns\\x/f", "backslash"),
    ],
)
def test_uri_authority_is_folded_into_the_path_before_checking(uri: str, rule: str) -> None:
    with pytest.raises(InvalidKey) as info:
        parse_uri(uri)
    assert info.value.rule == rule


def test_make_uri_round_trips() -> None:
    for key in ["ns/a b.csv", "ns/50%.txt", "données/é#?.txt", "a/b:c@d"]:
        uri = keys.make_uri(key)
        assert uri.startswith("kestra:///")
        assert uri.isascii()
        assert parse_uri(uri) == key


# -- property ------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(
    [*"abz09.-_/\\%2eEfF~ :@", "\x00", "\x1f", "\x7f", "\x85", "\u2025", "\uff0e", "\uff0f",
                                     "é", "☃", "\ud800", "\u202e", "\ufe68", "T", "t"]
)  # fmt: skip
_KEYS = st.one_of(
    st.text(_ALPHABET, max_size=40),
    st.text(max_size=40),
    st.lists(st.sampled_from(["..", ".", "", "tenants", ".gateway", "a", "%2e", "ns"]),
             max_size=6).map("/".join),
)  # fmt: skip
_SCOPES = st.sampled_from([NULL_SCOPE, ACME, Scope("other")])


@settings(max_examples=3000, deadline=None)
@given(scope=_SCOPES, key=_KEYS)
def test_resolve_refuses_or_stays_inside_the_scope(scope: Scope, key: str) -> None:
    try:
        physical = resolve(scope, key)
    except InvalidKey:
        return
    assert physical.startswith(scope.prefix)
    assert keys.visible(scope, physical)
    assert unresolve(scope, physical) == key
    segments = physical.split("/")
    assert all(seg and seg.strip(".") for seg in segments)
    if scope.tenant is None:
        assert segments[0].casefold() not in {"tenants", ".gateway"}
    else:
        assert segments[:2] == ["tenants", scope.tenant]
    assert len(physical.encode()) <= keys.MAX_PHYSICAL_KEY_BYTES


@settings(max_examples=1000, deadline=None)
@given(raw=st.text(_ALPHABET, max_size=30))
def test_decoded_request_path_refuses_or_stays_inside_the_scope(raw: str) -> None:
    try:
        physical = resolve(ACME, decode_path(raw))
    except InvalidKey:
        return
    assert physical.startswith("tenants/acme/")
    assert ".." not in physical.split("/")
