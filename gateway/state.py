"""Typed keys for what the application holds (aiohttp ``AppKey``)."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from backends.base import Backend

from .config import Config
from .guard import SignInGuard
from .registry import Registry
from .tenancy import Tenancy
from .usage import Usage


class InFlight:
    """Counts the requests being handled, so a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; say if it happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


CONFIG: Final = web.AppKey("config", Config)
BACKEND: Final = web.AppKey("backend", Backend)
TENANCY: Final = web.AppKey("tenancy", Tenancy)
REGISTRY: Final = web.AppKey("registry", Registry)
STARTED: Final = web.AppKey("started", asyncio.Event)
IN_FLIGHT: Final = web.AppKey("in_flight", InFlight)
USAGE: Final = web.AppKey("usage", Usage)
GUARD: Final = web.AppKey("guard", SignInGuard)
