"""Wait until a condition holds: the one polling loop of the tests, the benchmarks and the demo.

A test that sleeps a fixed time and then looks is slow when the machine is fast and flaky
when it is loaded; these wait exactly as long as the condition takes, up to a bound, and
say what they were waiting for when the bound is reached.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
Message = str | Callable[[], str]


def _timed_out(timeout: float, message: Message) -> TimeoutError:
    what = message() if callable(message) else message
    return TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def wait_until(cond: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: Message = "a condition") -> T:
    """Call ``cond`` every ``interval`` seconds until it returns a true value, and return that value.

    Raises :class:`TimeoutError` naming ``message`` (a string, or a callable for details known
    only at the end, such as the last state seen) once ``timeout`` seconds have passed.
    An exception from ``cond`` ends the wait at once: use it for "this can no longer happen".
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message)
        time.sleep(interval)


async def wait_until_async(cond: Callable[[], T | Awaitable[T]], timeout: float = 30.0, interval: float = 0.05,
                           message: Message = "a condition") -> T:
    """:func:`wait_until` for the event loop: ``cond`` may be a coroutine function, and the
    loop keeps serving between checks (a server under test may run on this very loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value: Any = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message)
        await asyncio.sleep(interval)
