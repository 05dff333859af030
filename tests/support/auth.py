"""Credentials as request headers, for tests."""

from __future__ import annotations

import base64


def basic(user: str, password: str) -> dict[str, str]:
    """Given a username and password, return the HTTP Basic ``Authorization`` header."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
