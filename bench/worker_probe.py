"""What one worker process costs: run in a fresh interpreter by ``handoff_bench.py``.

    python -m bench.worker_probe --agent warm|seed [--calls K]

1. ready: ``import`` the agent module and run its ``prewarm`` (the Silero VAD), timed from the
   top of this script; resident memory (VmRSS) and peak (VmHWM, what ``/usr/bin/time`` reports
   as maximum resident set size) at that point; and ``ready_wall_s``, from the moment the
   parent spawned this process (interpreter start-up included).
2. the framework's own warm-up (``livekit.agents.ipc._preload``: the local end-of-turn model's
   weights, the VAD runtime, the rtc library, the OpenAI SDK): what it adds, with the turn
   detector's weights measured on their own. A worker does this once in its forkserver and every
   job process shares it; a session with the default turn detection loads the weights anyway.
3. memory with K active calls: K simulated calls of that agent at once, RSS sampled when all
   are "talking" (greeting heard, the caller's VAD fed real speech) and again in "handoff" (the
   human has answered and said hello: in the consult room, or, for the seed, in the caller's
   room). ``handoff_bench.py`` runs two values of K in fresh processes and takes the slope.

Prints one JSON object per stage on stdout.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = {"warm": "warm_handoff", "seed": "bench.seed_agent"}


def memory() -> dict[str, float]:
    """Resident and peak resident memory of this process, MiB (Linux /proc)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return {"rss_mb": found.get("VmRSS", 0.0), "peak_rss_mb": found.get("VmHWM", 0.0)}


def emit(stage: str, **values: Any) -> None:
    print(json.dumps({"stage": stage, **values}), flush=True)


def ready(agent: str) -> Any:
    module = importlib.import_module(MODULES[agent])
    imported = time.perf_counter()
    proc = SimpleNamespace(userdata={})
    module.prewarm(proc)
    done = time.perf_counter()
    spawned = os.environ.get("BENCH_SPAWNED_AT")  # set by handoff_bench.py: wall time at spawn
    emit(
        "ready",
        import_s=imported - T0,
        prewarm_s=done - imported,
        ready_s=done - T0,
        ready_wall_s=time.time() - float(spawned) if spawned else None,  # with interpreter
        **memory(),
    )
    return proc.userdata["vad"]


def framework_preload() -> None:
    from livekit import local_inference

    before, started = memory()["rss_mb"], time.perf_counter()
    local_inference.init_eot()
    eot_s, eot_mb = time.perf_counter() - started, memory()["rss_mb"] - before
    started = time.perf_counter()
    import livekit.agents.ipc._preload  # noqa: F401

    emit(
        "preload",
        turn_detector_s=eot_s,
        turn_detector_mb=eot_mb,
        rest_s=time.perf_counter() - started,
        total_mb=memory()["rss_mb"] - before,
        **memory(),
    )


class Barrier:
    """Lets every call reach a phase, samples memory once, then lets them all go on."""

    def __init__(self, calls: int, settle: float = 0.5, timeout: float = 30.0) -> None:
        self.calls = calls
        self.settle = settle
        self.timeout = timeout
        self.arrived: dict[str, int] = {}
        self.released: dict[str, asyncio.Event] = {}
        self.samples: dict[str, float] = {}

    async def __call__(self, phase: str, trace: Any) -> None:
        release = self.released.setdefault(phase, asyncio.Event())
        self.arrived[phase] = self.arrived.get(phase, 0) + 1
        if self.arrived[phase] == self.calls:
            await asyncio.sleep(self.settle)  # let every call settle into the phase
            self.samples[phase] = memory()["rss_mb"]
            release.set()
        try:
            await asyncio.wait_for(release.wait(), self.timeout)
        except asyncio.TimeoutError:
            release.set()


async def per_call(agent: str, vad: Any, calls: int, quick: bool) -> None:
    """``calls`` calls at once; RSS when all are talking and when all are in the handoff. The
    parent runs this with two call counts, each in a fresh process, and takes the slope: a
    process keeps the memory it frees and reuses it, so a difference between two rounds in one
    process says little, and the first calls' one-time costs cancel out in the slope."""
    from bench.calls import SEED, WARM, run_call
    from bench.sim import Knobs
    from standins.voices import Speech, caller_request

    ordering = WARM if agent == "warm" else SEED
    knobs = Knobs(llm_ttft=0.05, tts_ttfa=0.05, ring=0.3, hello=0.5, chars_per_second=200)
    if quick:
        knobs = Knobs(llm_ttft=0.02, tts_ttfa=0.02, ring=0.2, hello=0.5, chars_per_second=400)
    talking = Speech("My printer shows error E4.", caller_request().pcm)  # not a transfer
    barrier = Barrier(calls, settle=0.1 if quick else 0.5)

    async def call(i: int) -> Any:
        await asyncio.sleep(0.02 * i)  # calls arrive one after another, not all at once
        return await run_call(ordering, knobs, vad, caller_speech=talking, on_phase=barrier)

    traces = await asyncio.gather(*(call(i) for i in range(calls)))
    emit(
        "per_call",
        calls=calls,
        reached_handoff=sum(t.outcome == "handoff" for t in traces),
        talking_rss_mb=barrier.samples.get("talking"),
        handoff_rss_mb=barrier.samples.get("handoff"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", choices=sorted(MODULES), required=True)
    parser.add_argument("--calls", type=int, default=0, help="concurrent calls for RSS per call")
    parser.add_argument("--quick", action="store_true", help="tiny latencies, no warm-up round")
    args = parser.parse_args()
    vad = ready(args.agent)
    if args.calls > 0:
        framework_preload()
        asyncio.run(per_call(args.agent, vad, args.calls, args.quick))


if __name__ == "__main__":
    main()
