"""Password hashing (argon2id via argon2-cffi) and the failed-login limiter.

The limiter is per client address and account name, in memory: a login form answers 429 after
``attempts`` failures within ``window`` seconds, so guessing is slow; one process serves the console,
so no shared store is needed.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def dummy_verify(password: str) -> None:
    """Spend the time of one verification for an unknown account, so timing does not reveal which exist."""
    verify_password(_dummy_hash(), password)


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash("not-a-real-account-password")


class LoginLimiter:
    """Counts failed logins per key in a sliding window; thread-safe (the API runs sync routes on a pool)."""

    def __init__(self, attempts: int, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._attempts = attempts
        self._window = window_seconds
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        return failures

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: allowed now)."""
        with self._lock:
            now = self._clock()
            failures = self._recent(key, now)
            if len(failures) < self._attempts:
                return 0.0
            return max(failures[0] + self._window - now, 0.0)

    def failed(self, key: str) -> int:
        """Record one failure; returns how many fall within the window."""
        with self._lock:
            failures = self._recent(key, self._clock())
            failures.append(self._clock())
            return len(failures)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
