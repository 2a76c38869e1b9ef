"""The simulated world a benchmarked call runs in: scripted models with fixed latencies, ears
that play audio in real time and timestamp every frame, a microphone that speaks real recorded
speech in real time, and a phone line that records when things happen.

Nothing here replaces the framework: the calls run through the real ``AgentSession`` (with the
real Silero VAD and the framework's default turn detection) and the real handoff code. Only the
three network models (STT, LLM, TTS) and the media server (``SimulatedPhoneLine``) are simulated.

How audio is identified. The fake TTS renders each sentence as a quiet square wave whose
amplitude is a tag unique to that sentence (``UTTERANCES``). An ear reads the tag back from
every frame it plays, so "the first frame of the brief" is found in the audio the listener
actually received, not in a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectOptions, llm, stt, tts
from livekit.agents.language import LanguageCode
from livekit.agents.llm import ChatChunk, ChoiceDelta, FunctionToolCall
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr
from livekit.agents.voice import io

import warm_handoff as wh
from bench.voices import (  # noqa: F401 - re-exported: the bench imports them from here
    AUDIO_DIR,
    MIC_FRAME,
    MIC_RATE,
    Ear,
    Heard,
    Speech,
    caller_request,
    human_hello,
)

TTS_RATE = 24_000


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Tags and mouths (recorded speech and ears: bench/voices.py)
# ──────────────────────────────────────────────────────────────────────────────────────────────


class Utterances:
    """Tags for the sentences the fake TTS renders; an ear reads them back from the audio."""

    def __init__(self) -> None:
        self._texts: dict[int, str] = {}
        self._count = 0

    def tag(self, text: str) -> int:
        self._count += 1
        tag = 1000 + self._count % 30_000
        self._texts[tag] = text
        return tag

    def text(self, tag: int) -> str:
        return self._texts.get(tag, "")


UTTERANCES = Utterances()


class Mouth(io.AudioInput):
    """A phone's microphone: 20 ms frames at 16 kHz, delivered in real time (each one when its
    20 ms have passed). It sends silence unless ``say`` queued a recording; ``loop`` makes it
    repeat a recording with pauses (the capacity test's callers)."""

    def __init__(self, label: str, stt: ScriptedSTT | None = None) -> None:
        super().__init__(label=label)
        self._stt = stt
        self._queue: deque[tuple[np.ndarray, asyncio.Future[float]]] = deque()
        self._loop_with: tuple[Speech, float] | None = None
        self._deadline: float | None = None
        self._silence = np.zeros(MIC_FRAME, dtype=np.int16)

    def say(self, speech: Speech) -> asyncio.Future[float]:
        """Speak ``speech``; the future resolves with the time its last frame was delivered."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self._stt is not None:
            self._stt.expect(speech.text)
        self._queue.append((speech.pcm, done))
        return done

    def loop(self, speech: Speech, pause: float) -> None:
        self._loop_with = (speech, pause)

    def hush(self) -> None:
        """Stop talking at once (and stop looping)."""
        self._loop_with = None
        while self._queue:
            _, done = self._queue.popleft()
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
            self._queue.append((silence, asyncio.get_running_loop().create_future()))
        chunk = self._silence
        if self._queue:
            pcm, done = self._queue[0]
            chunk, rest = pcm[:MIC_FRAME], pcm[MIC_FRAME:]
            if len(rest):
                self._queue[0] = (rest, done)
            else:
                self._queue.popleft()
                if not done.done():
                    done.set_result(time.monotonic())
            if len(chunk) < MIC_FRAME:
                chunk = np.concatenate([chunk, self._silence[: MIC_FRAME - len(chunk)]])
        return rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, MIC_FRAME)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Scripted models with fixed latencies
# ──────────────────────────────────────────────────────────────────────────────────────────────


class ToneTTS(tts.TTS):
    """A non-streaming TTS (the framework splits text into sentences and synthesises each):
    after ``ttfa`` seconds it returns the whole sentence as a tagged square wave lasting
    ``len(text) / chars_per_second`` seconds."""

    def __init__(self, *, ttfa: float, chars_per_second: float = 14.0) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=TTS_RATE,
            num_channels=1,
        )
        self.ttfa = ttfa
        self.chars_per_second = chars_per_second

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _ToneStream(tts=self, input_text=text, conn_options=conn_options)


class _ToneStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        model: ToneTTS = self._tts  # type: ignore[assignment]
        output_emitter.initialize(
            request_id=uuid.uuid4().hex[:12],
            sample_rate=TTS_RATE,
            num_channels=1,
            mime_type="audio/pcm",
        )
        await asyncio.sleep(model.ttfa)
        text = self.input_text.strip()
        if text:
            tag = UTTERANCES.tag(text)
            samples = max(MIC_FRAME, int(TTS_RATE * len(text) / model.chars_per_second))
            wave_ = np.full(samples, tag, dtype=np.int16)
            wave_[(np.arange(samples) // 12) % 2 == 1] *= -1  # a 1 kHz square wave
            output_emitter.push(wave_.tobytes())
        output_emitter.flush()


class ScriptedSTT(stt.STT):
    """A streaming STT that hears when someone speaks (energy in the frames it receives) and,
    ``final_delay`` seconds after the speech ends, returns the text the speaker's script said."""

    def __init__(self, *, final_delay: float) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))
        self.final_delay = final_delay
        self._texts: deque[str] = deque()

    def expect(self, text: str) -> None:
        self._texts.append(text)

    def next_text(self) -> str:
        return self._texts.popleft() if self._texts else ""

    async def _recognize_impl(
        self,
        buffer: Any,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        return _final(self.next_text())

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.RecognizeStream:
        return _STTStream(self, conn_options)


def _final(text: str) -> stt.SpeechEvent:
    return stt.SpeechEvent(
        type=stt.SpeechEventType.FINAL_TRANSCRIPT,
        alternatives=[stt.SpeechData(language=LanguageCode("en"), text=text, confidence=1.0)],
    )


class _STTStream(stt.RecognizeStream):
    LOUD = 400  # int16 peak above which a frame counts as speech
    HANGOVER = 0.06  # silence that ends an utterance, seconds
    CLOSING_FRAME = 0.15  # microphones send 20 ms frames; a closing session sends 200 ms ones

    def __init__(self, model: ScriptedSTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=model, conn_options=conn_options, sample_rate=MIC_RATE)
        self._model = model
        self._pending: set[asyncio.Task[None]] = set()

    async def _run(self) -> None:
        speaking, quiet = False, 0.0
        try:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    continue
                if item.duration >= self.CLOSING_FRAME and not speaking:
                    # the session is closing: it pushes a burst of long silent frames and waits
                    # for a final transcript, as a real STT sends once it has heard silence
                    self._event_ch.send_nowait(_final(""))
                    continue
                samples = np.frombuffer(item.data, dtype=np.int16)
                loud = len(samples) > 0 and int(np.abs(samples).max()) > self.LOUD
                if loud:
                    if not speaking:
                        self._event_ch.send_nowait(
                            stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH)
                        )
                    speaking, quiet = True, 0.0
                elif speaking:
                    quiet += item.duration
                    if quiet >= self.HANGOVER:
                        speaking = False
                        task = asyncio.create_task(self._finalise(self.HANGOVER))
                        self._pending.add(task)
                        task.add_done_callback(self._pending.discard)
        finally:
            for task in self._pending:
                task.cancel()

    async def _finalise(self, already: float) -> None:
        await asyncio.sleep(max(0.0, self._model.final_delay - already))
        text = self._model.next_text()
        if text:
            self._event_ch.send_nowait(_final(text))
        self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Request:
    chat_ctx: llm.ChatContext
    tools: list[str]
    at: float

    @property
    def purpose(self) -> str:
        if "save_prediction" in self.tools:  # answering-machine detection (voice/amd)
            return "amd"
        if "connect_to_caller" in self.tools:
            return "consult"
        if "transfer_call" in self.tools:
            return "caller"
        return "brief"

    def user_texts(self) -> list[str]:
        return [
            m.text_content for m in self.chat_ctx.messages() if m.role == "user" and m.text_content
        ]

    def after_tool(self) -> bool:
        items = [i for i in self.chat_ctx.items if i.type in ("message", "function_call_output")]
        return bool(items) and items[-1].type == "function_call_output"


class ScriptedLLM(llm.LLM):
    """An ``llm.LLM`` whose answer is chosen by ``respond``; the answer (text or tool call) is
    emitted whole ``ttft`` seconds after the request. ``emitted`` records (time, purpose,
    answer) for every answer."""

    def __init__(self, respond: Callable[[Request], str | ToolCall | None], *, ttft: float):
        super().__init__()
        self.respond = respond
        self.ttft = ttft
        self.emitted: list[tuple[float, str, str | ToolCall | None]] = []

    def chat(  # type: ignore[override]
        self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **_: Any
    ) -> llm.LLMStream:
        names = [getattr(t, "id", "") or getattr(t, "name", "") for t in tools or []]
        request = Request(chat_ctx.copy(), names, time.monotonic())
        return _ScriptedStream(
            self, request, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )


class _ScriptedStream(llm.LLMStream):
    def __init__(self, model: ScriptedLLM, request: Request, **kw: Any) -> None:
        super().__init__(model, **kw)
        self._model = model
        self._request = request

    async def _run(self) -> None:
        await asyncio.sleep(self._model.ttft)
        reply = self._model.respond(self._request)
        self._model.emitted.append((time.monotonic(), self._request.purpose, reply))
        if reply is None:
            return
        if isinstance(reply, str):
            delta = ChoiceDelta(role="assistant", content=reply)
        else:
            delta = ChoiceDelta(
                role="assistant",
                tool_calls=[
                    FunctionToolCall(
                        name=reply.name,
                        arguments=json.dumps(reply.arguments),
                        call_id=f"call_{uuid.uuid4().hex[:8]}",
                    )
                ],
            )
        self._event_ch.send_nowait(ChatChunk(id=uuid.uuid4().hex[:8], delta=delta))


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
    holds: list[wh.Hold] = field(default_factory=list)
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
        stt_model: ScriptedSTT,
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
        self.mouth = Mouth("human", stt_model)
        self.briefed = asyncio.Event()

    async def dial(self, dial: wh.Dial) -> wh.Leg:
        self.trace.dial_start = time.monotonic()
        leg = await super().dial(dial)
        self.trace.answered = time.monotonic()
        if self.conference:
            self.trace.merged = self.trace.answered
        self._start(self._human(dial.room))
        return leg

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._scripts.add(task)
        task.add_done_callback(self._scripts.discard)

    async def start_hold(self) -> wh.Hold:
        hold = await super().start_hold()
        self.trace.holds.append(hold)
        return hold

    async def _hold_paused(self, paused: bool) -> None:
        self.trace.hold_pauses.append((time.monotonic(), paused))
        await super()._hold_paused(paused)

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
    for hold in trace.holds:
        end = hold.stopped_at or until
        cursor: float | None = hold.started_at
        for at, paused in sorted(trace.hold_pauses):
            if not hold.started_at <= at <= end:
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
