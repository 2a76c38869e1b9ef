"""The scripted models a call runs with offline: shared by the tests (``tests/conftest.py``)
and the benchmark.

- ``ScriptedLLM``: an ``llm.LLM`` whose answer to each request (text, a tool call, several, or
  nothing) is chosen by a ``respond(request)`` function, ``delay`` seconds after the request.
- ``ToneTTS``: a non-streaming TTS that renders each sentence as a quiet square wave whose
  amplitude is a tag unique to that sentence (``UTTERANCES``), so an ear (``standins.voices.Ear``)
  finds "the first frame of the brief" in the audio the listener actually received.
- ``LineSTT``: a streaming STT timed like Deepgram's live API. It knows what was said from the
  frames themselves: every frame a simulated phone sends carries, in its ``userdata``, the
  spoken part it belongs to (``standins.voices.SPOKEN_KEY``), so tones, silence and frames the
  framework replaced by silence are never transcribed.

Nothing here replaces the framework: the sessions these models run in are real
``AgentSession``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from livekit.agents import APIConnectOptions, llm, stt, tts
from livekit.agents.language import LanguageCode
from livekit.agents.llm import ChatChunk, ChoiceDelta, FunctionToolCall
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from standins.voices import MIC_FRAME, MIC_RATE, SPOKEN_KEY, Spoken

# ──────────────────────────────────────────────────────────────────────────────────────────────
# The language model
# ──────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Call:
    """A tool call the scripted model emits."""

    name: str
    arguments: dict[str, Any]


Reply = str | Call | list[Call]


@dataclass
class Request:
    """One request to the model, and (once answered) what it answered and when."""

    chat_ctx: llm.ChatContext
    tools: list[str]
    at: float
    reply: Reply | None = None
    answered_at: float | None = None

    @property
    def purpose(self) -> str:
        if "save_prediction" in self.tools:  # answering-machine detection (voice/amd)
            return "amd"
        if "connect_to_caller" in self.tools:
            return "consult"
        if "transfer_call" in self.tools:
            return "caller"
        return "brief"

    @property
    def after_tool(self) -> bool:
        """This request follows a tool's output, not something the caller said."""
        items = self.chat_ctx.items
        return bool(items) and items[-1].type == "function_call_output"

    def user_texts(self) -> list[str]:
        return [
            m.text_content for m in self.chat_ctx.messages() if m.role == "user" and m.text_content
        ]

    def last_user_text(self) -> str:
        return (self.user_texts() or [""])[-1]


class ScriptedLLM(llm.LLM):
    """An ``llm.LLM`` whose answers are scripted: ``respond(request)`` returns text, a tool
    call, several, or None for an empty answer, emitted whole ``delay`` seconds (the time to
    first token) after the request. Several calls go in one chunk, or with ``gap`` one chunk
    each, ``gap`` seconds apart, as the OpenAI plugin streams each tool call once its arguments
    are complete (livekit-plugins-openai llm.py). ``requests`` keeps every request in order."""

    def __init__(
        self,
        respond: Callable[[Request], Reply | None],
        *,
        delay: float = 0.0,
        gap: float | None = None,
    ) -> None:
        super().__init__()
        self.respond = respond
        self.delay = delay
        self.gap = gap
        self.requests: list[Request] = []

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **_):
        names = [getattr(t, "id", "") or getattr(t, "name", "") for t in tools or []]
        request = Request(chat_ctx.copy(), names, time.monotonic())
        self.requests.append(request)
        return _ScriptedStream(
            self, request, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )

    def of(self, purpose: str) -> list[Request]:
        return [r for r in self.requests if r.purpose == purpose]


class _ScriptedStream(llm.LLMStream):
    def __init__(self, model: ScriptedLLM, request: Request, **kw: Any) -> None:
        super().__init__(model, **kw)
        self._model = model
        self._request = request

    async def _run(self) -> None:
        if self._model.delay:
            await asyncio.sleep(self._model.delay)
        reply = self._model.respond(self._request)
        self._request.reply, self._request.answered_at = reply, time.monotonic()
        if reply is None:
            return
        if isinstance(reply, str):
            self._send(ChoiceDelta(role="assistant", content=reply))
            return
        calls = reply if isinstance(reply, list) else [reply]
        tool_calls = [
            FunctionToolCall(
                name=c.name,
                arguments=json.dumps(c.arguments),
                call_id=f"call_{i}_{len(self._model.requests)}",
            )
            for i, c in enumerate(calls)
        ]
        if self._model.gap is None:
            self._send(ChoiceDelta(role="assistant", tool_calls=tool_calls))
            return
        for i, tool_call in enumerate(tool_calls):
            if i:
                await asyncio.sleep(self._model.gap)
            self._send(ChoiceDelta(role="assistant", tool_calls=[tool_call]))

    def _send(self, delta: ChoiceDelta) -> None:
        self._event_ch.send_nowait(ChatChunk(id="scripted", delta=delta))


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Speech synthesis: tagged tones
# ──────────────────────────────────────────────────────────────────────────────────────────────

TTS_RATE = 24_000


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


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Speech-to-text, timed like Deepgram's
# ──────────────────────────────────────────────────────────────────────────────────────────────

FINAL_DELAY = 0.3  # a part's final transcript this long after its last sample


class LineSTT(stt.STT):
    """A streaming STT for what a simulated phone sends, with the event order of the Deepgram
    plugin (livekit/plugins/deepgram/stt.py ``_process_stream_event``, endpointing 25 ms, no
    interim results): START_OF_SPEECH when a spoken part starts (its ``SpeechStarted``), then
    ``final_delay`` after the part's last sample its FINAL_TRANSCRIPT and END_OF_SPEECH
    (``speech_final``), each part on its own. So a final arrives before the VAD's end of speech
    (Silero's default ``min_silence_duration`` is 0.55 s). Tones and silence send nothing, and
    an STT that heard nothing sends no empty final (the Deepgram plugin drops empty results), so
    a closing session waits its ``session_close_transcript_timeout`` as with Deepgram."""

    def __init__(self, *, final_delay: float = FINAL_DELAY) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))
        self.final_delay = final_delay

    async def _recognize_impl(
        self,
        buffer: Any,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        frames = buffer if isinstance(buffer, list) else [buffer]
        texts: list[str] = []
        for frame in frames:
            spoken, _ = frame.userdata.get(SPOKEN_KEY, (None, False))
            if spoken is not None and spoken.text not in texts:
                texts.append(spoken.text)
        return _final(" ".join(texts))

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.RecognizeStream:
        return _LineSTTStream(self, conn_options)


def _final(text: str) -> stt.SpeechEvent:
    return stt.SpeechEvent(
        type=stt.SpeechEventType.FINAL_TRANSCRIPT,
        request_id=uuid.uuid4().hex[:12],
        alternatives=[stt.SpeechData(language=LanguageCode("en"), text=text, confidence=1.0)],
    )


class _LineSTTStream(stt.RecognizeStream):
    def __init__(self, model: LineSTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=model, conn_options=conn_options, sample_rate=MIC_RATE)
        self._model = model
        self._speaking = False
        self._pending: set[asyncio.Task[None]] = set()

    async def _run(self) -> None:
        hearing: Spoken | None = None
        heard: set[Spoken] = set()
        try:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    continue
                spoken, last = item.userdata.get(SPOKEN_KEY, (None, False))
                if hearing is not None and spoken is not hearing:
                    self._endpoint(hearing)  # cut off (e.g. replaced by silence): what was heard
                    hearing = None
                if spoken is not None and hearing is None and spoken not in heard:
                    heard.add(spoken)
                    hearing = spoken
                    self._start_of_speech()
                if last and spoken is hearing and hearing is not None:
                    self._endpoint(hearing)
                    hearing = None
        finally:
            for task in self._pending:
                task.cancel()

    def _start_of_speech(self) -> None:
        if not self._speaking:
            self._speaking = True
            self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))

    def _endpoint(self, spoken: Spoken) -> None:
        task = asyncio.create_task(self._speech_final(spoken.text))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _speech_final(self, text: str) -> None:
        await asyncio.sleep(self._model.final_delay)
        with contextlib.suppress(Exception):  # the stream closed meanwhile
            self._start_of_speech()  # a transcript without SpeechStarted starts speech
            self._event_ch.send_nowait(_final(text))
            self._speaking = False
            self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))
