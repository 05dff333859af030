"""Typed keys for what the application holds (aiohttp ``AppKey``)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from backends.base import Backend

from .config import Config
from .tenancy import Tenancy

CONFIG: Final = web.AppKey("config", Config)
BACKEND: Final = web.AppKey("backend", Backend)
TENANCY: Final = web.AppKey("tenancy", Tenancy)
