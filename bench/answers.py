"""Who answers the human's phone: one "warm handoff" call per answer scenario, and what each
one costs the human and whether anything about the caller reached a machine.

The scenarios are ``standins.voices``'s (spliced from the bench's two recordings, with each
scenario's lengths and pauses): a short hello (today's), a long greeting with a 0.4 s pause
mid-sentence, a voicemail (8 s greeting then the beep), a PBX auto-attendant with the person 6 s
later (the destination has an extension), and a person who says nothing. The far end's audio
goes into the real consult session in real time, heard by the real Silero VAD and by
``LineSTT`` (final transcripts 0.3 s after each spoken part: before the VAD's end of speech),
and the worker's own screening runs on it: answering-machine detection (``voice.amd.AMD``) on
the consult session, the neutral opener played outside the session, the details after a person
is confirmed. The AMD classifier's model is scripted (``bench.calls.amd_by_words``): mailbox
words -> ``machine-vm``, anything else -> ``human``; so the classifier's accuracy is NOT
measured here, only the timing and the ordering around its verdict.

The human's ear hears two tracks, as on LiveKit: the consult session's (``FarEnd.ear``) and the
room's other track, where ``play_to_human`` plays the opener (``AnswerLine.room_ear``). Every
frame is timestamped when it is sent and when it plays; the fake TTS's tag says which sentence
it belongs to.

Each scenario rings as long as it says (``AnswerScenario.ring``: 4 s, the voicemail 22 s, the
PBX 0 s), whatever ``--ring`` says for the orderings. The ring is not a figure, but its length
matters: the caller's "please hold" (about 5 s at the bench's speaking rate) plays while the
phone rings, and a phone answered before it ends is answered before the screening starts
listening (see bench/README.md). ``--quick`` shortens every ring to its ``knobs.ring``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession

import warm_handoff as wh
from bench.calls import CALLER_SAYS, MAX_CALL, SETTINGS, WARM, hang_up, models_for, quiet
from bench.sim import BenchLine, Knobs, Mouth, Trace, wait_until
from standins.models import UTTERANCES
from standins.voices import AnswerScenario, Ear, FarEnd, scenario

ANSWERS = ("person", "long_greeting", "voicemail", "pbx", "silent")
MACHINES = ("voicemail",)  # what never presses a key nor says yes
EXTENSION = "123"  # the PBX scenario's destination is dialled with an extension
TARGET = 0.1  # s: the opener after the cue, the details after the later of opener end and confirm
DETAILS_AFTER_HELLO = 2.2  # s: a person's details after the end of their hello (issue 19)


class TimedEar(Ear):
    """An ``Ear`` that also keeps every frame as it was sent (time, tag), even those a
    ``clear_buffer`` took back before they played: a frame sent to a recorder counts."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.sent: list[tuple[float, int]] = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        self.sent.append((time.monotonic(), abs(int(frame.data[0])) if len(frame.data) else 0))
        await super().capture_frame(frame)


class AnswerLine(BenchLine):
    """The bench line with the human's leg as audio: ``answer`` is played into the consult
    session from the moment the leg is active (the dial returns; with an extension, after the
    DTMF), and what is said to the leg is heard by ``far_end.ear`` (the session's track) and
    ``room_ear`` (the opener, played outside the session). The human presses a key ``decide``
    seconds after a question, and 1 ``decide`` seconds after the details, unless a machine."""

    def __init__(
        self, trace: Trace, knobs: Knobs, answer: AnswerScenario, ring: float | None = None
    ) -> None:
        super().__init__(trace, knobs)  # its Mouth stays silent: the far end speaks
        self.ring_time = answer.ring if ring is None else min(answer.ring, ring)
        self.answer = answer
        self.far_end = FarEnd(answer)
        self.far_end.ear = TimedEar("human")
        self.room_ear = TimedEar("room")
        self.agent: wh.WarmHandoffAgent | None = None
        self.handoff: wh.Handoff | None = None
        self.keys: list[tuple[float, str]] = []

    async def dial(self, dial: wh.Dial) -> wh.Leg:
        if self.agent is not None:
            self.handoff = self.agent.handoff
        leg = await super().dial(dial)
        self.far_end.active()
        return leg

    async def open_consult(self, room: str, human_identity: str, session: Any, agent: Any) -> None:
        self.far_end.attach(session)
        self.trace.human_ear = self.far_end.ear
        self.trace.consult_turn_detection = str(session.turn_detection)
        await wh.SimulatedPhoneLine.open_consult(self, room, human_identity, session, agent)

    async def play_to_human(self, room: str, text: str, audio: wh.PhraseAudio) -> None:
        """As ``SimulatedPhoneLine``'s, and its frames (prepared, or live as they come) reach
        the human's ear in real time."""
        self._log(f"human hears: {text}")
        async with contextlib.aclosing(wh.frames_of(audio)) as frames:
            async for frame in frames:
                await self.room_ear.capture_frame(frame)
        self.room_ear.flush()
        ends = self.room_ear.heard[-1].end if self.room_ear.heard else time.monotonic()
        await asyncio.sleep(max(0.0, ends - time.monotonic()))
        self._log("played to the human")

    def human_presses(self, digit: str) -> None:
        self.keys.append((time.monotonic(), digit))
        super().human_presses(digit)

    async def _human(self, room: str) -> None:
        if self.answer.name in MACHINES or self.handoff is None:
            return
        timings, consult = self.handoff.timings, None
        answered_question = False
        while "brief_end" not in timings:
            consult = consult or self.handoff.consult
            question = consult.question if consult is not None else None
            asked_until = _last_end(self.far_end.ear, question)
            if not answered_question and asked_until is not None:
                answered_question = True  # a person answers the question with a key
                await asyncio.sleep(max(0.0, asked_until + self.knobs.decide - time.monotonic()))
                if "brief_end" not in timings:
                    self.human_presses("5")
            await asyncio.sleep(0.01)
        self.trace.brief_end = timings["brief_end"]
        if self.decides:
            await asyncio.sleep(
                max(0.0, timings["brief_end"] + self.knobs.decide - time.monotonic())
            )
            self.human_presses("1")


def _last_end(ear: Ear, text: str | None) -> float | None:
    """When the last frame of ``text`` ended playing, once it has (None: not heard yet)."""
    if text is None:
        return None
    ends = [h.end for h in ear.heard if UTTERANCES.text(h.tag) == text]
    return ends[-1] if ends and time.monotonic() >= ends[-1] else None


def settings_for(name: str) -> wh.Settings:
    """The bench's settings; the PBX scenario's support line has an extension."""
    if name != "pbx":
        return SETTINGS
    support, *others = SETTINGS.destinations
    pbx = (dataclasses.replace(support, extension=EXTENSION), *others)
    return SETTINGS.model_copy(update={"destinations": pbx})


@dataclass
class AnswerCall:
    """One answer scenario's call, as it happened."""

    scenario: str
    outcome: str
    line: AnswerLine
    timings: dict[str, float] = field(default_factory=dict)
    amd: dict[str, Any] = field(default_factory=dict)
    opener: str = ""
    question: str = ""
    grace: float = 0.0


async def run_answer(
    name: str, knobs: Knobs, vad: Any, *, phrase_cache: str = "", ring: float | None = None
) -> AnswerCall:
    """One "warm handoff" call whose human's phone is answered as scenario ``name``: the caller
    is greeted, asks for support, the model transfers; measured until the caller hears the agent
    after the merge, or the handoff's result. ``ring``: at most this long (None: the
    scenario's own ring)."""
    answer = scenario(name)
    settings = settings_for(name)
    ear = Ear("caller")
    trace = Trace(WARM, ear)
    phrases = wh.PhraseCache(phrase_cache) if phrase_cache else None
    models, _ = models_for(knobs, vad, phrases)  # the caller's turns are text
    line = AnswerLine(trace, knobs, answer, ring)
    agent = wh.WarmHandoffAgent(settings, line, models)
    line.agent = agent
    session = AgentSession()  # as run_call builds it: the framework's defaults
    session.output.audio = ear
    session.input.audio = Mouth("caller")
    trace.present = time.monotonic()
    call = AnswerCall(name, "", line, grace=settings.hello_grace)
    try:
        await session.start(agent=agent)
        wh.say_fixed(session, settings.greeting, models.phrases)
        if not await wait_until(lambda: quiet(session, ear), 30):
            call.outcome = "no greeting"
            return call
        await asyncio.sleep(knobs.caller_pause)
        session.generate_reply(user_input=CALLER_SAYS)
        await wait_until(
            lambda: (
                trace.merged is not None
                and any(h.audible and h.start >= trace.merged for h in ear.heard)
                or bool(agent.results)
            ),
            MAX_CALL,
        )
        if agent.results:
            result = agent.results[0]
            call.outcome, call.amd, call.timings = result.outcome.value, result.amd, result.timings
        else:
            call.outcome = "connected" if trace.merged is not None else "timed out"
        if line.handoff is not None:
            call.timings = call.timings or line.handoff.timings
            call.amd = call.amd or line.handoff.consult_room.amd
            if line.handoff.consult is not None:
                call.opener = line.handoff.consult.opener
                call.question = line.handoff.consult.question
        return call
    finally:
        await hang_up(session, agent, line)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Figures, from the frames the human's ear received
# ──────────────────────────────────────────────────────────────────────────────────────────────

FIGURES = (
    "vad_end",
    "opener",
    "opener_after_cue",
    "opener_end",
    "verdict",
    "confirmed",
    "details",
    "details_after_ready",
)
FIGURE_TITLES = {
    "vad_end": "the VAD's end of speech",
    "opener": "opener's first frame heard",
    "opener_after_cue": "opener's first frame - its cue (VAD end / grace)",
    "opener_end": "opener's last frame heard",
    "verdict": "AMD verdict",
    "confirmed": "a person confirmed (AMD human / key)",
    "details": "first frame of the details heard",
    "details_after_ready": "details - later of opener end and confirmation",
}


def measure_answer(call: AnswerCall) -> dict[str, Any]:
    """The figures for one call, in seconds from the end of the utterance that cues the opener
    (the far end's last spoken sample of the scenario's speech: a short greeting, the long
    greeting's second part, the voicemail greeting's last part, the hello after the PBX's
    ringback); for the silent person, from the end of the grace time after the answer."""
    line, t = call.line, call.timings
    spoken = line.far_end.spoken  # the scenario's speech: the bench's human only presses keys
    answered = t.get("answered")
    if spoken and spoken[-1].ended_at is not None:
        reference, cue = spoken[-1].ended_at, "utterance end"
    elif answered is not None:
        reference, cue = answered + call.grace, "grace"
    else:
        return {"outcome": call.outcome, "reference": None}
    opener = [h for h in line.room_ear.heard if h.audible]
    opener_start = opener[0].start if opener else None
    opener_end = opener[-1].end if opener else None
    session_frames = [h for h in line.far_end.ear.heard if h.audible]
    question = [h for h in session_frames if UTTERANCES.text(h.tag) == call.question]
    details = [h for h in session_frames if UTTERANCES.text(h.tag) not in (call.question, "")]
    details_start = details[0].start if details else None
    # a person is confirmed by AMD's human or a key press (the bench's human never says yes)
    confirmed, confirmed_by = None, ""
    if call.amd.get("category") == "human" and "verdict" in t:
        confirmed, confirmed_by = t["verdict"], f"amd human ({call.amd.get('reason')})"
    if line.keys and (confirmed is None or line.keys[0][0] < confirmed):
        confirmed, confirmed_by = line.keys[0][0], f"key press ({line.keys[0][1]})"
    cue_at = t.get("hello_end") if cue == "utterance end" else reference
    ready = max(opener_end or -math.inf, confirmed or -math.inf)
    sent_early = [
        at
        for at, tag in line.far_end.ear.sent + line.room_ear.sent
        if tag >= 1000
        and UTTERANCES.text(tag) not in (call.opener, call.question)
        and (confirmed is None or at < confirmed)
    ]

    def since(at: float | None) -> float | None:
        return None if at is None else round(at - reference, 4)

    return {
        "outcome": call.outcome,
        "cue": cue,
        "amd": call.amd,
        "confirmed_by": confirmed_by or None,
        "question_heard": bool(question),
        "reference_after_active": _minus(reference, line.far_end.active_at),
        "vad_end": since(t.get("hello_end")),
        "opener": since(opener_start),
        "opener_after_cue": _minus(opener_start, cue_at),
        "opener_end": since(opener_end),
        "verdict": since(t.get("verdict")),
        "confirmed": since(confirmed),
        "details": since(details_start),
        "details_after_ready": _minus(details_start, ready if confirmed is not None else None),
        "details_before_confirmation": len(sent_early),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)
