"""How many simultaneous calls one process holds before its event loop falls behind.

Each call is a full "warm handoff" caller session (the real ``AgentSession``, the shared real
Silero VAD, the framework's default turn detection, the scripted STT/LLM/TTS) whose caller
keeps talking: a recording of real speech (``standins/audio/caller.wav``), then a 2 s pause, over
and over, at real-time pace, so the VAD, the end-of-turn model and the agent's replies all run
as in a conversation. Nobody is transferred.

The event loop's lag is measured by a ticker that asks to wake every 5 ms: lag = how late it
wakes. Calls are added in steps; each step gets a settling second, then a measuring window;
the count doubles until a window's p99 lag reaches the limit (20 ms), then is bisected
between the last count under it and the first over it, while the time budget lasts. The
capacity is the largest count measured under the limit (a lower bound if the limit was never
reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from bench.calls import WARM, run_call
from bench.sim import Knobs
from standins.voices import Speech, caller_request

TICK = 0.005


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


class LoopLag:
    """Samples how late the event loop wakes a 5 ms ticker."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time, lag seconds)
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            self.samples.append((now, now - asked - TICK))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Capacity:
    limit_ms: float
    steps: list[dict[str, float]] = field(default_factory=list)  # calls, p50/p99 lag (ms)
    calls: int = 0  # the largest number of calls measured under the limit
    failed_at: int | None = None  # the smallest number measured at or over it
    reached_limit: bool = False  # False: the budget ran out first (calls is a lower bound)


async def measure_capacity(
    vad: Any,
    knobs: Knobs,
    *,
    budget: float = 10.0,
    limit_ms: float = 20.0,
    settle: float = 1.0,
    window: float = 1.5,
    start: int = 8,
    growth: float = 2.0,
) -> Capacity:
    """Grow the number of calls by ``growth`` from ``start`` until a window's p99 lag reaches
    ``limit_ms``, then bisect between the last good and the first bad count (hanging up calls
    to go down) while the ``budget`` lasts."""
    talking = Speech("My printer shows error E4.", caller_request().pcm)  # no transfer
    keep_talking = asyncio.Event()

    async def stay(phase: str, trace: Any) -> None:
        await keep_talking.wait()  # never set: the calls talk until hung up

    result = Capacity(limit_ms)
    ticker = LoopLag()
    ticker.start()
    calls: list[asyncio.Task[Any]] = []
    started = time.perf_counter()
    target = start
    try:
        while time.perf_counter() - started + settle + window <= budget:
            while len(calls) < target:
                calls.append(
                    asyncio.ensure_future(
                        run_call(WARM, knobs, vad, caller_speech=talking, on_phase=stay)
                    )
                )
                await asyncio.sleep(0.02)  # calls arrive one after another, not all at once
            while len(calls) > target:
                calls.pop().cancel()
            await asyncio.sleep(settle)
            since = time.perf_counter()
            await asyncio.sleep(window)
            lags = [late for at, late in ticker.samples if at >= since]
            p99, p50 = percentile(lags, 99) * 1000, percentile(lags, 50) * 1000
            result.steps.append({"calls": target, "p50_lag_ms": p50, "p99_lag_ms": p99})
            if p99 >= limit_ms:
                result.reached_limit = True
                result.failed_at = min(target, result.failed_at or target)
            else:
                result.calls = max(result.calls, target)
            if result.failed_at is None:
                target = max(target + 1, int(target * growth))
            else:
                target = (result.calls + result.failed_at) // 2
                if target <= result.calls:
                    break  # resolved to one call
    finally:
        await ticker.stop()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    return result
