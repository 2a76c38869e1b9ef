"""The simulated world a benchmarked call runs in: a microphone that speaks real recorded speech
in real time, a phone line that plays the human and records when things happen, and the
benchmark's fixed latencies (``Knobs``).

Nothing here replaces the framework: the calls run through the real ``AgentSession`` (with the
real Silero VAD and the framework's default turn detection) and the real handoff code. Only the
three network models (``standins/models.py``: STT, LLM, TTS, shared with the tests) and the media
server (``SimulatedPhoneLine``) are simulated; recorded speech and the ears that timestamp every
frame they play are ``standins/voices.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice import io

import warm_handoff as wh
from standins.voices import MIC_FRAME, MIC_RATE, SPOKEN_KEY, Ear, Speech, Spoken, human_hello

# ──────────────────────────────────────────────────────────────────────────────────────────────
# A phone's microphone
# ──────────────────────────────────────────────────────────────────────────────────────────────


class Mouth(io.AudioInput):
    """A phone's microphone: 20 ms frames at 16 kHz, delivered in real time (each one when its
    20 ms have passed). It sends silence unless ``say`` queued a recording; ``loop`` makes it
    repeat a recording with pauses (the capacity test's callers). Each frame of a recording
    carries its spoken part (``SPOKEN_KEY``), as the far end's do, so ``LineSTT`` hears what
    was said."""

    def __init__(self, label: str) -> None:
        super().__init__(label=label)
        self._queue: deque[tuple[np.ndarray, Spoken | None, asyncio.Future[float]]] = deque()
        self._loop_with: tuple[Speech, float] | None = None
        self._deadline: float | None = None
        self._silence = np.zeros(MIC_FRAME, dtype=np.int16)

    def say(self, speech: Speech) -> asyncio.Future[float]:
        """Speak ``speech``; the future resolves with the time its last frame was delivered."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.append((speech.pcm, Spoken(speech.text, 0, len(speech.pcm)), done))
        return done

    def loop(self, speech: Speech, pause: float) -> None:
        self._loop_with = (speech, pause)

    def hush(self) -> None:
        """Stop talking at once (and stop looping)."""
        self._loop_with = None
        while self._queue:
            _, _, done = self._queue.popleft()
            if not done.done():
                done.set_result(time.monotonic())

    async def __anext__(self) -> rtc.AudioFrame:
        now = time.monotonic()
        self._deadline = (now if self._deadline is None else self._deadline) + MIC_FRAME / MIC_RATE
        if self._deadline > now:
            await asyncio.sleep(self._deadline - now)
        if not self._queue and self._loop_with is not None:
            speech, pause = self._loop_with
            self.say(speech)
            silence = np.zeros(int(pause * MIC_RATE), dtype=np.int16)
            self._queue.append((silence, None, asyncio.get_running_loop().create_future()))
        chunk, spoken, last = self._silence, None, False
        if self._queue:
            pcm, spoken, done = self._queue[0]
            chunk, rest = pcm[:MIC_FRAME], pcm[MIC_FRAME:]
            if len(rest):
                self._queue[0] = (rest, spoken, done)
            else:
                last = True
                self._queue.popleft()
                if not done.done():
                    done.set_result(time.monotonic())
            if len(chunk) < MIC_FRAME:
                chunk = np.concatenate([chunk, self._silence[: MIC_FRAME - len(chunk)]])
        frame = rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, MIC_FRAME)
        if spoken is not None:
            frame.userdata[SPOKEN_KEY] = (spoken, last)
        return frame


# ──────────────────────────────────────────────────────────────────────────────────────────────
# The phone line, with a human who picks up, says hello, listens and presses 1
# ──────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Trace:
    """Everything that happened on one call, timestamped with ``time.monotonic()``."""

    ordering: str
    caller_ear: Ear
    human_ear: Ear | None = None  # the consult session's output (None in a conference)
    present: float | None = None  # the caller is on the line and the session starts
    decision: float | None = None  # the model emitted transfer_call
    dial_start: float | None = None
    answered: float | None = None
    hello_start: float | None = None
    hello_end: float | None = None
    turn_committed: float | None = None  # the consult session took the hello as a user turn
    brief_end: float | None = None
    opener: tuple[float, float] | None = None  # the neutral opener, played outside the session
    keypress: float | None = None
    merged: float | None = None  # the human is in the caller's room
    ended: float | None = None
    hold_starts: list[float] = field(default_factory=list)  # when each hold's music started
    hold_stops: list[float] = field(default_factory=list)  # and stopped, in the same order
    hold_pauses: list[tuple[float, bool]] = field(default_factory=list)  # (time, paused)
    human_heard_text: list[str] = field(default_factory=list)
    consult_turn_detection: str = ""  # the consult session's turn detection, as configured
    endpointing: dict[str, Any] = field(default_factory=dict)  # and its endpointing options
    outcome: str = ""


@dataclass(frozen=True)
class Knobs:
    """The simulated world's fixed latencies, in seconds."""

    llm_ttft: float = 0.5
    tts_ttfa: float = 0.2
    ring: float = 4.0
    hello: float = 0.8  # the human's hello ends this long after they pick up
    decide: float = 1.0  # the human presses 1 this long after the brief ends
    stt_final: float = 0.3  # the STT's final transcript this long after speech ends
    chars_per_second: float = 14.0  # the TTS's speaking rate
    caller_pause: float = 0.5  # the caller answers the greeting this long after it ends


class BenchLine(wh.SimulatedPhoneLine):
    """The simulated line, recording what happens and playing the human: they pick up after
    ``ring`` seconds, say a recorded "Hello?" ending ``hello`` seconds later, listen to the
    brief, then press 1 ``decide`` seconds after it ends.

    In the consult orderings the human is heard by the consult session through a ``Mouth`` (so
    the real VAD, STT pipeline and turn detection decide when their hello is over) and hears it
    through an ``Ear``. With ``conference=True`` (the seed) the human is dialled straight into
    the caller's room: they hear the caller's session and the caller hears their hello."""

    def __init__(
        self,
        trace: Trace,
        knobs: Knobs,
        *,
        conference: bool = False,
        decides: bool = True,
    ) -> None:
        super().__init__(None, ring_time=knobs.ring, caller_room="caller-room")
        self.trace = trace
        self.knobs = knobs
        self.conference = conference
        self.decides = decides
        self.hello = human_hello()
        self.mouth = Mouth("human")
        self.briefed = asyncio.Event()

    async def dial(self, dial: wh.Dial) -> wh.Leg:
        self.trace.dial_start = time.monotonic()
        leg = await super().dial(dial)
        self.trace.answered = time.monotonic()
        if self.conference:
            self.trace.merged = self.trace.answered
        self._scripts.create_task(self._human(dial.room))
        return leg

    async def start_hold_music(self) -> None:
        self.trace.hold_starts.append(time.monotonic())
        await super().start_hold_music()

    def pause_hold_music(self, paused: bool) -> None:
        self.trace.hold_pauses.append((time.monotonic(), paused))
        super().pause_hold_music(paused)

    async def stop_hold_music(self) -> None:
        self.trace.hold_stops.append(time.monotonic())
        await super().stop_hold_music()

    async def open_consult(self, room: str, human_identity: str, session: Any, agent: Any) -> None:
        self.trace.human_ear = Ear("human")
        session.output.audio = self.trace.human_ear
        session.input.audio = self.mouth
        detection = session.turn_detection
        if isinstance(detection, str) or detection is None:
            self.trace.consult_turn_detection = str(detection)
        else:
            self.trace.consult_turn_detection = f"{type(detection).__name__}({detection.model})"
        self.trace.endpointing = dict(session.options.turn_handling.get("endpointing") or {})

        def on_item(ev: Any) -> None:
            role = getattr(ev.item, "role", None)
            if role == "user" and self.trace.turn_committed is None:
                self.trace.turn_committed = time.monotonic()
            elif role == "assistant" and ev.item.text_content:
                self.trace.human_heard_text.append(ev.item.text_content)
                # the details come in two utterances, the introduction then the brief: the
                # human decides once asked to (BRIEF_ASK), as a person would
                if wh.ASKED_TO_DECIDE.search(ev.item.text_content):
                    self.briefed.set()

        session.on("conversation_item_added", on_item)
        await super().open_consult(room, human_identity, session, agent)

    async def play_to_human(self, room: str, text: str, audio: list[Any]) -> None:
        start = time.monotonic()
        await super().play_to_human(room, text, audio)
        self.trace.opener = (start, time.monotonic())

    async def move(self, leg: wh.Leg, room: str) -> None:
        await super().move(leg, room)
        self.trace.merged = time.monotonic()

    def human_presses(self, digit: str) -> None:
        self.trace.keypress = time.monotonic()
        super().human_presses(digit)

    async def _human(self, room: str) -> None:
        answered = self.trace.answered or time.monotonic()
        starts_at = answered + self.knobs.hello - self.hello.duration
        await asyncio.sleep(max(0.0, starts_at - time.monotonic()))
        self.trace.hello_start = time.monotonic()
        if self.conference:  # heard by the caller, not transcribed by anyone
            self.trace.hello_end = self.trace.hello_start + self.hello.duration
            return
        self.trace.hello_end = await self.mouth.say(self.hello)
        await self.briefed.wait()
        ear = self.trace.human_ear
        self.trace.brief_end = ear.heard[-1].end if ear and ear.heard else time.monotonic()
        if not self.decides:
            return
        await asyncio.sleep(max(0.0, self.trace.brief_end + self.knobs.decide - time.monotonic()))
        self.human_presses("1")


def hold_intervals(trace: Trace, until: float) -> list[tuple[float, float]]:
    """When the caller heard hold audio: each hold from start to stop, less its pauses."""
    playing: list[tuple[float, float]] = []
    for i, started in enumerate(trace.hold_starts):
        end = trace.hold_stops[i] if i < len(trace.hold_stops) else until
        cursor: float | None = started
        for at, paused in sorted(trace.hold_pauses):
            if not started <= at <= end:
                continue
            if paused and cursor is not None:
                playing.append((cursor, at))
                cursor = None
            elif not paused and cursor is None:
                cursor = at
        if cursor is not None:
            playing.append((cursor, end))
    return playing


async def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def close_quietly(*closers: Callable[[], Any]) -> None:
    for close in closers:
        with contextlib.suppress(Exception):
            await close()
