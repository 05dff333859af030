"""Password checks under guard: a budget of failures per client address, and a bound on the
hashing running at once.

A password is checked with scrypt (about 50 ms of CPU and 16 MiB, ``gateway.registry``), so
that a stolen hash is slow to crack. Unchecked, the same cost would let anyone guess online
as fast as the cores hash, and let a flood of wrong passwords, from any number of clients,
starve every tenant's requests of CPU. So:

- each client address has a budget of ``auth.sign-in-attempts`` failed checks, refilled
  evenly over a minute (a token bucket). A check takes its place in the budget before it is
  hashed, and a success gives it back: a burst sent at once gets no more checks than the
  budget. An address whose budget is spent gets ``429`` with ``Retry-After`` for its next
  password check, unhashed, until the budget refills. IPv6 addresses count per ``/64`` (what
  one host is usually given).
- at most half the cores hash at once, over all the workers of ``serve --workers N`` (at
  least one check per worker: ``hashing_places``). An address's checks take turns, one at a
  time; up to ``QUEUED`` addresses' turns wait for a place, and any beyond get ``503`` with
  ``Retry-After``. Whatever the flood, the other cores keep serving. (Enough addresses
  together can still keep the queue full: their checks, and other clients' unremembered
  ones, then get ``503``; remembered passwords and tokens keep working.)

A remembered success (the registry's cache of recently verified passwords) is not a check:
it is answered without hashing and without the guard, so a signed-in client behind an address
whose budget someone else spent keeps working (on a worker that remembers it: each process has
its own memory). The budget is per process too: with ``--workers N`` an address gets up to N
budgets.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from .errors import SignInsBusy, TooManyAttempts

WINDOW: Final = 60.0  # seconds over which a spent budget refills
QUEUED: Final = 64
MAX_ADDRESSES: Final = 100_000  # budgets remembered; an evicted one starts full again


def hashing_places(workers: int) -> int:
    """How many checks one of ``workers`` processes may hash at once: together, half the
    cores this process may run on (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // (2 * workers))


def last_entry(values: list[str]) -> str:
    """Given the lines of an ``X-Forwarded-*`` header, return the entry the trusted proxy set
    or added: the last entry of the last line (any before it are the client's to write)."""
    return ",".join(values).rsplit(",", 1)[-1].strip()


def forwarded_address(values: list[str]) -> str | None:
    """Given the ``X-Forwarded-For`` lines of a request, return the address the trusted
    proxy added (``last_entry``), without a port; None if that entry is not an IP address."""
    entry = last_entry(values)
    if entry.startswith("["):  # [v6]:port
        entry = entry[1:].split("]", 1)[0]
    elif entry.count(":") == 1:  # v4:port
        entry = entry.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def address_key(address: str | None) -> str:
    """Given a client address as the request reports it, return what its budget is kept by:
    the address itself, its ``/64`` for IPv6 (IPv4-mapped ones as IPv4), or ``"?"``."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # not an IP address (a Unix socket's peer): kept as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SignInGuard:
    """The budgets of failed password checks, and the bound on hashing (see the module)."""

    def __init__(
        self,
        attempts: int,
        *,
        hashing: int = 1,
        queued: int = QUEUED,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts  # 0: no budget (every check is hashed)
        self._rate = attempts / WINDOW  # failures refilled per second
        self._clock = clock
        self._max_addresses = max_addresses
        # address key -> (budget left, when it was counted); oldest use first
        self._budgets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._hashing = asyncio.Semaphore(hashing)
        self._queued = queued
        self._waiting = 0
        # address key -> [its checks' turn, how many hold or wait for it]: while any do
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def _left(self, key: str, now: float) -> float:
        found = self._budgets.get(key)
        if found is None:
            return float(self.attempts)
        left, when = found
        return min(float(self.attempts), left + (now - when) * self._rate)

    def spend(self, address: str | None) -> None:
        """Take one check from the budget of ``address``, or raise ``TooManyAttempts`` if it
        has none left. Taken before the hashing, so that a burst of checks sent at once
        cannot all pass a budget that their failures have not spent yet; a success gives it
        back (``refund``)."""
        if self.attempts == 0:
            return
        now = self._clock()
        key = address_key(address)
        left = self._left(key, now)
        if left < 1:
            wait = max(1, math.ceil((1 - left) / self._rate))
            raise TooManyAttempts(
                f"too many failed sign-ins from this address: at most {self.attempts} a "
                f"minute (auth.sign-in-attempts); try again in {wait} s",
                wait,
            )
        self._budgets[key] = (left - 1, now)
        self._budgets.move_to_end(key)
        if len(self._budgets) > self._max_addresses:
            self._forget(now)

    def refund(self, address: str | None) -> None:
        """Give back what ``spend`` took: the check succeeded, or never ran."""
        if self.attempts == 0:
            return
        now = self._clock()
        key = address_key(address)
        if key in self._budgets:
            self._budgets[key] = (min(float(self.attempts), self._left(key, now) + 1), now)

    def _forget(self, now: float) -> None:
        """Drop the budgets that have refilled (they hold nothing a new one would not); if
        that is not enough, the oldest used."""
        for key in [k for k in self._budgets if self._left(k, now) >= self.attempts]:
            del self._budgets[key]
        while len(self._budgets) > self._max_addresses:
            self._budgets.popitem(last=False)

    @asynccontextmanager
    async def checking(self, address: str | None) -> AsyncIterator[Callable[[], None]]:
        """One password check from ``address`` under the guard: its place in the budget is
        taken (``spend``), then a hashing place is held (``hashing``). The check calls the
        function it is given when the password holds, and the budget gets its place back;
        a check that never ran (``SignInsBusy``) gets it back too. A check cancelled midway
        keeps it spent: its thread still hashes (and ``access.check_password`` holds the
        hashing place until that thread ends)."""
        self.spend(address)
        try:
            async with self.hashing(address):
                yield functools.partial(self.refund, address)
        except SignInsBusy:
            self.refund(address)
            raise

    @asynccontextmanager
    async def hashing(self, address: str | None) -> AsyncIterator[None]:
        """Hold one of the hashing places. An address's checks take their turns one at a
        time, and only the one whose turn it is waits for a place, among at most ``QUEUED``
        others (beyond them: ``SignInsBusy``): one address cannot fill the queue."""
        key = address_key(address)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = (asyncio.Lock(), [0])
        lock, users = turn
        users[0] += 1
        try:
            async with lock:
                if self._hashing.locked() and self._waiting >= self._queued:
                    raise SignInsBusy("too many sign-ins are being checked at once; try again", 1)
                self._waiting += 1
                try:
                    await self._hashing.acquire()
                finally:
                    self._waiting -= 1
                try:
                    yield
                finally:
                    self._hashing.release()
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._turns[key]
