"""The station service's throttle of failed token checks: an address that sends FAIL_LIMIT wrong tokens within
FAIL_WINDOW_S is refused (429) for LOCKOUT_S, its token not compared, so a device on the station network cannot try
DETECTOR_TOKEN as fast as it can send. Bounded: at most MAX_TRACKED addresses are kept, the least recently failed
dropped first, and entries past their window or lock-out are dropped as new failures arrive."""
from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

FAIL_LIMIT = 10        # wrong tokens from one address ...
FAIL_WINDOW_S = 60.0   # ... within this many seconds lock it out ...
LOCKOUT_S = 60.0       # ... for this long
MAX_TRACKED = 4096     # addresses kept at most (each a few hundred bytes): a flood from many cannot grow the process


@dataclass
class _Entry:
    """One address's recent failures (monotonic times, the newest FAIL_LIMIT) and the end of its lock-out."""

    fails: deque = field(default_factory=deque)
    locked_until: float = 0.0


class AuthThrottle:
    """Failed token checks per client address; every method runs on the event loop (no lock)."""

    def __init__(self, limit: int = FAIL_LIMIT, window_s: float = FAIL_WINDOW_S, lockout_s: float = LOCKOUT_S,
                 max_tracked: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.lockout_s, self.max_tracked = limit, window_s, lockout_s, max_tracked
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()   # least recently failed first

    def __len__(self) -> int:
        return len(self._entries)

    def locked_for(self, address: str) -> int:
        """Whole seconds (>= 1) until `address` may present a token again; 0 when it is not locked out."""
        entry = self._entries.get(address)
        left = entry.locked_until - self.clock() if entry else 0.0
        return max(1, math.ceil(left)) if left > 0 else 0

    def failed(self, address: str) -> bool:
        """Count one wrong token from `address`; True when it begins a lock-out (log it once, then)."""
        now = self.clock()
        self._drop_expired(now)
        entry = self._entries.pop(address, None) or _Entry(deque(maxlen=self.limit))
        while len(self._entries) >= self.max_tracked:   # a flood from many addresses: forget the stalest
            self._entries.popitem(last=False)
        self._entries[address] = entry
        entry.fails.append(now)
        if len(entry.fails) < self.limit or now - entry.fails[0] > self.window_s:
            return False
        entry.fails.clear()
        entry.locked_until = now + self.lockout_s
        return True

    def _drop_expired(self, now: float) -> None:
        """Forget addresses, stalest first, whose lock-out has ended and whose last failure left the window."""
        while self._entries:
            entry = next(iter(self._entries.values()))
            if entry.locked_until > now or (entry.fails and now - entry.fails[-1] <= self.window_s):
                return
            self._entries.popitem(last=False)
