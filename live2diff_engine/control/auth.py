"""The API's token, kept out of URLs, and a brake on guessing it.

A browser page (/studio) trades the token once for a cookie: ``POST /api/login`` with
``Authorization: Bearer TOKEN`` answers with ``Set-Cookie`` (HttpOnly, SameSite=Strict, Path=/,
Secure over HTTPS). A cookie rather than a header the page adds itself: the page's script never
has to keep the token (HttpOnly: no script can read the cookie, so a page that loads later cannot
either), a reload does not ask again, the browser sends it on every request of this origin, the
WebSocket's included (which cannot carry an Authorization header), and never in a URL, so it stays
out of the address bar, the history and proxy logs. SameSite=Strict keeps other sites' pages from
using it; a request that rests on the cookie must also come from this server's own origin.
The cookie holds a value derived from the token (an HMAC), not the token itself.

Wrong tokens are slowed down per client address: the first few answer at once, then each further
wrong one waits, longer each time (doubling up to a cap), and one address's wrong tokens are
answered one at a time at that pace, however many it sends at once. A right token is never slowed,
and does not wipe its address's count either (another machine behind the same NAT may be guessing);
the count is forgotten after FORGET_S without a wrong token.
The memory is bounded: at most MAX_ADDRESSES addresses are remembered (the oldest forgotten first)
and at most MAX_WAITING wrong answers are held at a time (beyond that, 429 at once). IPv6 clients
are counted by their /64, as one machine usually holds a whole /64.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from collections import OrderedDict

COOKIE_PREFIX = "live2diff_auth_"  # + the API's port: two engines on one host keep their cookies apart
FREE_FAILURES = 5  # wrong tokens from one address answered at once (typos, a stale token)
FIRST_DELAY_S = 0.5  # the next wrong one waits this long, the one after twice that, ...
MAX_DELAY_S = 8.0
MAX_WAIT_S = 60.0  # the longest one wrong answer is held
FORGET_S = 600.0  # an address with no wrong token for this long starts afresh
MAX_ADDRESSES = 4096
MAX_WAITING = 256


def cookie_value(token: str) -> str:
    """What the cookie holds for ``token``: derived from it, so the browser's cookie jar does not
    hold the token itself; stateless, so nothing grows on the server."""
    return hmac.new(token.encode(), b"live2diff api cookie v1", hashlib.sha256).hexdigest()


def cookie_ok(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), cookie_value(token).encode())


def client_key(remote: str | None) -> str:
    """The address a client is counted by: IPv4 as it is (an IPv4-mapped IPv6 one too), IPv6 by its /64."""
    if not remote:
        return "?"
    try:
        addr = ipaddress.ip_address(remote.strip("[]").split("%", 1)[0])
    except ValueError:
        return remote[:64]
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        return str(mapped)
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class _Record:
    __slots__ = ("failures", "last", "next_at")

    def __init__(self, now: float):
        self.failures, self.last, self.next_at = 0, now, now


class WrongTokenBrake:
    """Counts wrong tokens per client address and says how long the answer to each must wait."""

    def __init__(self, *, free: int = FREE_FAILURES, first_delay: float = FIRST_DELAY_S, max_delay: float = MAX_DELAY_S,
                 max_wait: float = MAX_WAIT_S, forget_s: float = FORGET_S, max_addresses: int = MAX_ADDRESSES,
                 max_waiting: int = MAX_WAITING, clock=time.monotonic):
        self.free, self.first_delay, self.max_delay, self.max_wait = free, first_delay, max_delay, max_wait
        self.forget_s, self.max_addresses, self.max_waiting, self.clock = forget_s, max_addresses, max_waiting, clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self.waiting = 0

    def __len__(self) -> int:
        return len(self._records)

    def failed(self, key: str) -> float:
        """One more wrong token from ``key``: the seconds its answer must wait (0: at once)."""
        now = self.clock()
        rec = self._records.pop(key, None)
        if rec is None or now - rec.last > self.forget_s:
            rec = _Record(now)
        self._records[key] = rec  # the most recent last: the oldest is forgotten first
        while len(self._records) > self.max_addresses:
            self._records.popitem(last=False)
        rec.failures += 1
        rec.last = now
        if rec.failures <= self.free:
            return 0.0
        delay = min(self.first_delay * 2 ** (rec.failures - self.free - 1), self.max_delay)
        # One address's wrong answers go out one per delay: sending many at once gains nothing.
        rec.next_at = min(max(rec.next_at, now) + delay, now + self.max_wait)
        return rec.next_at - now

    async def hold(self, wait: float) -> bool:
        """Waits ``wait`` seconds before a wrong answer; False (at once) when MAX_WAITING are held already."""
        if wait <= 0:
            return True
        if self.waiting >= self.max_waiting:
            return False
        self.waiting += 1
        try:
            await asyncio.sleep(wait)
        finally:
            self.waiting -= 1
        return True
