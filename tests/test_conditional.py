"""HTTP dates of downloads: the cached formatting says what ``email.utils`` says."""

from __future__ import annotations

from email.utils import formatdate

from hypothesis import given
from hypothesis import strategies as st

from gateway.conditional import http_date


@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
def test_http_date_is_the_rfc_date_of_the_timestamp(timestamp: float) -> None:
    assert http_date(timestamp) == formatdate(timestamp, usegmt=True)


def test_http_date_of_no_time_is_none() -> None:
    assert http_date(None) is None
