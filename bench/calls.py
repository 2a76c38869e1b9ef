"""One simulated call, end to end, in each ordering; and the metrics read from its audio.

A call: the caller is on the line and the session starts; the caller hears the greeting, asks
for support (a text turn: the caller's own endpointing is not what is measured) and the model
decides to transfer at once. Then the ordering under test runs against ``BenchLine``: the human
picks up after ``ring`` seconds, says "Hello?" (recorded speech, ending ``hello`` seconds after
pickup), hears the brief and presses 1 ``decide`` seconds after it ends. The call is measured
until the caller hears the first frame of "You're now connected" (or the handoff's result).

The orderings:

- ``warm handoff``: ``warm_handoff.WarmHandoffAgent`` and ``Handoff`` exactly as shipped;
- ``sequential``: the same agent, whose handoffs are ``bench.orderings.SequentialHandoff``
  (LiveKit WarmTransferTask's order), plugged in through ``handoff_factory``;
- ``seed``: ``bench.seed_agent.SeedAgent`` (model greeting, dial into the room, no hold, no brief).

Every session is built as ``run_call`` builds it in production: ``AgentSession()`` with the
framework's defaults (so the default turn detector and endpointing), the models on the agent.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from livekit.agents import AgentSession

import warm_handoff as wh
from bench.orderings import SequentialHandoff
from bench.seed_agent import SeedAgent
from bench.sim import BenchLine, Knobs, Mouth, Trace, close_quietly, hold_intervals, wait_until
from standins.models import UTTERANCES, Call, LineSTT, Request, ScriptedLLM, ToneTTS
from standins.voices import Ear, Speech

WARM = "warm handoff"
SEQUENTIAL = "sequential"
SEED = "seed"
ORDERINGS = (WARM, SEQUENTIAL, SEED)

SETTINGS = wh.Settings(
    destinations=(
        wh.Destination(
            "support",
            "+15550100100",
            "Technical support for products and accounts",
            spoken_name="our support team",
        ),
        wh.Destination(
            "billing",
            "+15550100200",
            "Invoices, payments and refunds",
            spoken_name="our billing team",
        ),
    ),
    handoff_mode=wh.HandoffMode.CONSULT,
    business_name="Acme",
    greeting="Thanks for calling Acme. How can I help?",
)
CALLER_SAYS = (
    "Hi, my printer shows error E4 since the update, and a restart didn't help. "
    "Can I talk to someone in support?"
)
SUMMARY = "Printer error E4 since an update."
CONNECTED = "You're now connected with our support team."
MAX_CALL = 120.0  # seconds: a call that takes longer is reported as failed
MAILBOX = re.compile(r"reached|message|mailbox|voicemail|not available", re.I)


def receptionist(req: Request) -> str | Call | None:
    """The scripted model, for every ordering: transfers once the caller has asked for support
    (in any of their turns); writes the brief's summary; greets (the seed's greeting comes from
    the model)."""
    if req.purpose == "brief":
        return SUMMARY
    if req.purpose == "amd":  # the classifier is scripted: its accuracy is not measured
        return amd_by_words(req)
    if req.purpose == "consult":
        return "I don't know more than that, sorry."
    if req.after_tool:
        return CONNECTED
    said = " ".join(req.user_texts()).lower()
    if "support" in said:
        return Call("transfer_call", {"destination": "support", "reason": "printer error E4"})
    if not said:
        return SETTINGS.greeting
    return "I can help with that. What seems to be the problem?"


def amd_by_words(req: Request) -> Call:
    """The answering-machine classifier's model, scripted as in tests/test_screening.py: the
    transcript so far has words of a mailbox -> ``machine-vm``, anything else -> ``human``."""
    heard = (req.user_texts() or [""])[-1]
    return Call("save_prediction", {"label": "machine-vm" if MAILBOX.search(heard) else "human"})


def models_for(
    knobs: Knobs, vad: Any, phrases: wh.PhraseCache | None = None
) -> tuple[wh.Models, ScriptedLLM]:
    """The bench's scripted models with the knobs' latencies and the real VAD; and the LLM."""
    model = ScriptedLLM(receptionist, delay=knobs.llm_ttft)
    models = wh.Models(
        stt=LineSTT(final_delay=knobs.stt_final),
        llm=model,
        tts=ToneTTS(ttfa=knobs.tts_ttfa, chars_per_second=knobs.chars_per_second),
        vad=vad,
        phrases=phrases,
    )
    return models, model


def build_agent(ordering: str, line: BenchLine, models: wh.Models) -> Any:
    if ordering == WARM:
        return wh.WarmHandoffAgent(SETTINGS, line, models)
    if ordering == SEQUENTIAL:
        return wh.WarmHandoffAgent(SETTINGS, line, models, handoff_factory=SequentialHandoff)

    async def transfer(team: str) -> None:
        destination = SETTINGS.destination(team) or SETTINGS.destinations[0]
        await line.dial(
            wh.Dial(
                room=line.caller_room,
                identity=f"transfer_{uuid.uuid4().hex[:8]}",
                destination=destination,
                ring_timeout=SETTINGS.ring_timeout,
            )
        )

    return SeedAgent(transfer=transfer, business=SETTINGS.business_name, **models.options())


def quiet(session: AgentSession, ear: Ear) -> bool:
    """The caller has heard something and nothing is playing or queued."""
    return (
        bool(ear.heard)
        and time.monotonic() >= ear.heard[-1].end
        and session.current_speech is None
        and session.agent_state != "speaking"
    )


Phase = Callable[[str, Trace], Awaitable[None]]


async def run_call(
    ordering: str,
    knobs: Knobs,
    vad: Any,
    *,
    caller_speech: Speech | None = None,
    on_phase: Phase | None = None,
    phrase_cache: str = "",
) -> Trace:
    """Run one call; returns its ``Trace`` (``outcome`` says how it ended).

    The caller's phone sends silence (``caller_speech``: loops that recording instead) so the
    caller's VAD runs as on a real call. ``on_phase`` (the worker probe's barrier) is awaited
    at "talking" (greeting heard, before the transfer) and at "handoff" (the human has answered
    and said hello: in the consult room, or in the seed in the caller's room); with it the human
    never decides and the call ends after "handoff". ``phrase_cache``: the worker host's
    phrase cache folder (as ``build_models`` gives each job its ``PhraseCache``), "" for none."""
    ear = Ear("caller")
    trace = Trace(ordering, ear)
    phrases = wh.PhraseCache(phrase_cache) if phrase_cache else None
    models, model = models_for(knobs, vad, phrases)
    line = BenchLine(trace, knobs, conference=ordering == SEED, decides=on_phase is None)
    agent = build_agent(ordering, line, models)
    session = AgentSession()  # as run_call builds it: the framework's defaults
    session.output.audio = ear
    mouth = Mouth("caller")
    if caller_speech is not None:
        mouth.loop(caller_speech, pause=2.0)
    session.input.audio = mouth
    trace.present = time.monotonic()
    try:
        await session.start(agent=agent)
        if ordering != SEED:
            # as run_call does; the seed's model greets on_enter
            wh.say_fixed(session, SETTINGS.greeting, models.phrases)
        if not await wait_until(lambda: quiet(session, ear), 30):
            trace.outcome = "no greeting"
            return trace
        if on_phase is not None:
            await on_phase("talking", trace)
            mouth.hush()  # the caller stops talking to ask for a person
        await asyncio.sleep(knobs.caller_pause)
        session.generate_reply(user_input=CALLER_SAYS)
        if on_phase is not None:
            reached = await wait_until(lambda: trace.hello_end is not None, MAX_CALL)
            trace.outcome = "handoff" if reached else "timed out"
            await on_phase("handoff", trace)
            return trace
        # the call is measured until the caller hears the agent after the merge ("connected")
        heard_after_merge = await wait_until(
            lambda: (
                trace.merged is not None
                and any(h.audible and h.start >= trace.merged for h in ear.heard)
                or bool(getattr(agent, "results", None))
            ),
            MAX_CALL,
        )
        results = getattr(agent, "results", None)
        if results:
            trace.outcome = results[0].outcome.value
        else:
            trace.outcome = "connected" if heard_after_merge else "timed out"
        trace.decision = min(
            (r.answered_at for r in model.requests if isinstance(r.reply, Call)), default=None
        )
        trace.ended = time.monotonic()
        return trace
    finally:
        await hang_up(session, agent, line)


async def hang_up(session: AgentSession, agent: Any, line: BenchLine) -> None:
    """End the call as people do: both hang up (a handoff still running cleans up after
    itself), then the session closes."""
    line.hang_up_human()
    line.hang_up_caller()
    await wait_until(lambda: getattr(agent, "handoff", None) is None, 5)
    await close_quietly(line.aclose, lambda: asyncio.wait_for(session.aclose(), 10))


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Metrics, from the frames each listener heard
# ──────────────────────────────────────────────────────────────────────────────────────────────

METRICS = ("greeting", "announce", "longest_silence", "human_wait", "overhead")
METRIC_TITLES = {
    "greeting": "greeting: caller present -> first greeting frame",
    "announce": "announce: transfer decision -> first 'please hold' frame",
    "longest_silence": "longest caller silence, decision -> merge",
    "human_wait": "human wait: end of hello -> first brief frame",
    "overhead": "overhead: (merge-decision)-ring-brief-human",
}


@dataclass
class CallMetrics:
    """The five handoff figures for one call, in seconds (None: does not apply)."""

    greeting: float | None
    announce: float | None
    longest_silence: float | None
    human_wait: float | None
    overhead: float | None
    detail: dict[str, float | None]


def _first_start(ear: Ear | None, after: float) -> float | None:
    if ear is None:
        return None
    return next((h.start for h in ear.heard if h.audible and h.start >= after - 1e-3), None)


def _longest_gap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The longest stretch of [start, end] covered by none of ``intervals``."""
    longest, cursor = 0.0, start
    for a, b in sorted(intervals):
        if b <= cursor:
            continue
        if a >= end:
            break
        if a > cursor:
            longest = max(longest, a - cursor)
        cursor = max(cursor, b)
    return max(longest, end - cursor)


def caller_audible(trace: Trace) -> list[tuple[float, float]]:
    """What the caller hears: the session's frames, hold audio from start to stop and, in a
    conference, the human's own hello."""
    heard = [(h.start, h.end) for h in trace.caller_ear.heard if h.audible]
    heard += hold_intervals(trace, trace.ended or time.monotonic())
    if trace.ordering == SEED and trace.hello_start is not None:
        heard.append((trace.hello_start, trace.hello_end or trace.hello_start))
    return heard


def measure(trace: Trace, knobs: Knobs) -> CallMetrics:
    ear = trace.caller_ear
    present, decision = trace.present, trace.decision
    first = _first_start(ear, -math.inf)
    greeting = first - present if first is not None and present is not None else None
    announce = silence = human_wait = overhead = None
    detail: dict[str, float | None] = {}
    if decision is not None:
        first = _first_start(ear, decision)
        announce = first - decision if first is not None else None
        merged = trace.merged
        # the window ends when the caller hears the agent again after the merge ("connected")
        window_end = _first_start(ear, merged) if merged is not None else None
        detail["connected_after_merge"] = _minus(window_end, merged)
        window_end = window_end or trace.ended
        if window_end is not None:
            silence = _longest_gap(caller_audible(trace), decision, window_end)
        detail["dial_delay"] = _minus(trace.dial_start, decision)
        detail["merge_after_decision"] = _minus(merged, decision)
    brief_start = None
    if trace.ordering != SEED and trace.hello_end is not None:
        brief_start = _first_start(trace.human_ear, trace.hello_end)
        if brief_start is None and trace.human_ear and trace.human_ear.heard:
            brief_start = trace.human_ear.heard[0].start  # the brief began before the hello ended
        human_wait = max(0.0, brief_start - trace.hello_end) if brief_start is not None else None
        detail["endpointing"] = _minus(trace.turn_committed, trace.hello_end)
        detail["brief_after_turn"] = _minus(brief_start, trace.turn_committed)
    if decision is not None and trace.merged is not None:
        brief = _minus(trace.brief_end, brief_start) or 0.0
        answer = 0.0
        if trace.ordering != SEED:
            answer = (_minus(trace.hello_end, trace.answered) or 0.0) + (
                _minus(trace.keypress, trace.brief_end) or 0.0
            )
        overhead = (trace.merged - decision) - knobs.ring - brief - answer
        detail.update(brief_duration=brief, human_answer_time=answer)
        detail["merge_after_keypress"] = _minus(trace.merged, trace.keypress)
    return CallMetrics(greeting, announce, silence, human_wait, overhead, detail)


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def label_of(text: str) -> str:
    """A short name for what a sentence is, for the timeline."""
    lowered = text.lower()
    if "please hold" in lowered or "let me connect you" in lowered:
        return "please hold"
    if "now connected" in lowered:
        return "connected"
    if lowered.startswith("thanks for calling") or "how can i help" in lowered:
        return "greeting"
    return "speech"


def spans(ear: Ear | None, since: float = -math.inf) -> list[tuple[float, float, str]]:
    """The ear's frames merged into runs of one sentence: (start, end, text)."""
    runs: list[tuple[float, float, str]] = []
    for h in ear.heard if ear else []:
        if h.end <= since or not h.audible:
            continue
        text = UTTERANCES.text(h.tag)
        if runs and runs[-1][2] == text and h.start - runs[-1][1] < 0.05:
            runs[-1] = (runs[-1][0], h.end, text)
        else:
            runs.append((h.start, h.end, text))
    return runs
