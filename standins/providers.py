"""Local stand-ins for the worker's three cloud model providers, on one aiohttp server at
``127.0.0.1:<OS-chosen port>``, speaking their real wire protocols so that the real plugin
clients (livekit-plugins-openai, -deepgram, -elevenlabs 1.8.9; the ``openai`` SDK 3.60) work
against them unmodified, pointed at them by base URL:

* OpenAI chat completions, ``<base>/openai/v1`` (``OPENAI_BASE_URL``): streamed (SSE) or not,
  answered by a Python script (``llm_script(ChatRequest) -> Reply``).
* Deepgram live transcription, ``<base>/deepgram/v1/listen`` (websocket; and the prerecorded
  POST): results timed to the speech in the PCM it receives, words from a queue (``stt_says``).
* ElevenLabs text to speech, ``<base>/elevenlabs/v1``: the HTTP stream and the
  ``multi-stream-input`` websocket, answering with real PCM, ``MS_PER_CHAR`` ms a character.

Each of ``llm``, ``stt``, ``tts_http`` and ``tts_ws`` can be made to ``fail``, ``stall`` or be
``slow`` at runtime (``fault``), and what arrived is recorded (``llm_requests``,
``stt_sessions``, ``tts_texts``), with ``time.monotonic()`` stamps::

    async with ProviderStandIns() as s:                     # in the test's event loop
        s.stt_says("I need someone in billing")
        s.fault("tts_http", "slow", 1.0)
        llm = openai.LLM(model="gpt-4o", base_url=s.openai_base_url, api_key="x")

    with ProviderStandIns.in_thread() as s:                 # for a worker in a subprocess
        subprocess.Popen([...], env={**os.environ, **s.env()})

Setters (``fault``, ``stt_says``, assigning ``llm_script``) only replace a dict item or an
attribute, or append to a deque, so they are safe from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import re
import socket
import threading
import time
import uuid
import wave
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from standins import Served

Provider = Literal["llm", "stt", "tts_http", "tts_ws"]
FaultMode = Literal["ok", "fail", "stall", "slow"]
PROVIDERS: tuple[Provider, ...] = ("llm", "stt", "tts_http", "tts_ws")
FAULT_MODES: tuple[FaultMode, ...] = ("ok", "fail", "stall", "slow")

MS_PER_CHAR = 65  # synthetic speech: every character of the text is 65 ms of audio
TONE_HZ = 200.0
TONE_LEVEL = 0.3  # of full scale, at the peak of a word's envelope
VOICE_RMS = 500.0  # int16 RMS over a 20 ms window above which the recogniser hears speech
WINDOW = 0.02
INTERIM_AFTER = 0.3  # seconds of speech before the first interim result
MIN_ENDPOINT = 0.3  # the least silence that ends an utterance, whatever ``endpointing`` says
DEEPGRAM_IDLE_TIMEOUT = 10.0  # Deepgram closes a socket with no audio nor message (NET-0001)
ELEVEN_SCHEDULE = [120, 160, 250, 290]  # ElevenLabs' default chunk_length_schedule
CONFIDENCE = 0.98


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ── OpenAI: requests, replies, the default script ─────────────────────────────────────────────


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """The scripted model's answer: text (``Reply.say``), tool calls (``Reply.call``), or both
    (``Reply.call("a", x=1) + Reply.call("b")``: parallel calls, streamed one after the other)."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def say(cls, text: str) -> Reply:
        return cls(text=text)

    @classmethod
    def call(cls, name: str, **arguments: Any) -> Reply:
        return cls(tool_calls=(ToolCall(name, arguments),))

    def __add__(self, other: Reply) -> Reply:
        return Reply(self.text + other.text, self.tool_calls + other.tool_calls)


def _text(content: Any) -> str:
    """A message's text: the OpenAI format allows a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    parts = content or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


@dataclass
class ChatRequest:
    """One POST /chat/completions as it arrived (``body``, the JSON the openai SDK sent), with
    the script's ``reply`` once answered."""

    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    reply: Reply | None = None

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def tools(self) -> list[str]:
        """The names of the offered tools."""
        return [t["function"]["name"] for t in self.body.get("tools", [])]

    def tool(self, name: str) -> dict[str, Any] | None:
        """An offered tool's function schema (``name``, ``description``, ``parameters``)."""
        return next(
            (t["function"] for t in self.body.get("tools", []) if t["function"]["name"] == name),
            None,
        )

    @property
    def tool_choice(self) -> Any:
        return self.body.get("tool_choice")

    @property
    def system_prompt(self) -> str:
        return "\n".join(
            _text(m.get("content")) for m in self.messages if m["role"] in ("system", "developer")
        )

    @property
    def user_texts(self) -> list[str]:
        return [_text(m.get("content")) for m in self.messages if m["role"] == "user"]

    @property
    def last_user_text(self) -> str:
        return (self.user_texts or [""])[-1]

    @property
    def after_tool(self) -> bool:
        """The request follows a tool's output (the model is asked to go on after a call)."""
        return bool(self.messages) and self.messages[-1]["role"] == "tool"


Script = Callable[[ChatRequest], Reply]

# the labels of livekit-agents voice/amd/classifier.py AMDCategory, by what the greeting says
# (its AMD_PROMPT's examples); checked in order, anything else is a person
_AMD_LABELS = (
    ("machine-unavailable", ("mailbox is full", "not been set up", "hasn't been set up")),
    ("machine-ivr", ("press 1", "press one", "state your name")),
    ("machine-vm", ("leave a message", "after the tone", "after the beep", "voicemail", "mailbox")),
)
_ASKS_FOR_PERSON = re.compile(
    r"\b(person|someone|somebody|human|agent|transfer|representative|operator)\b", re.I
)


def amd_label(transcript: str) -> str:
    said = transcript.lower()
    return next((label for label, words in _AMD_LABELS if any(w in said for w in words)), "human")


def receptionist_script(
    *,
    destination: str = "support",
    teams: Sequence[str] | None = None,
    reason: str | None = None,
    summary: str = "The caller wants help with their account.",
    answer: str = "Sure, how can I help?",
) -> Script:
    """The default model. (a) The answering-machine classifier (offered ``save_prediction``,
    livekit-agents voice/amd/classifier.py ``_run``): ``save_prediction(label=...)`` by the
    greeting's words (``amd_label``). (b) No tools (a plain completion, e.g. the brief):
    ``summary``. (c) The caller asks for a person and ``transfer_call`` is offered (and the last
    message is not a tool's output): ``transfer_call`` to the first of ``teams`` (default: the
    ``destination`` enum of the offered schema) named in the caller's words, else
    ``destination``, with ``reason`` (default: the caller's words). (d) Otherwise ``answer``."""

    def script(request: ChatRequest) -> Reply:
        if "save_prediction" in request.tools:
            return Reply.call("save_prediction", label=amd_label(request.last_user_text))
        if not request.tools:
            return Reply.say(summary)
        said = request.last_user_text
        if "transfer_call" in request.tools and not request.after_tool:
            if _ASKS_FOR_PERSON.search(said):
                schema = request.tool("transfer_call") or {}
                offered = schema["parameters"]["properties"].get("destination", {}).get("enum", [])
                names = offered if teams is None else teams
                team = next(
                    (t for t in names if re.search(rf"\b{re.escape(t)}\b", said, re.I)),
                    destination,
                )
                return Reply.call("transfer_call", destination=team, reason=reason or said)
        return Reply.say(answer)

    return script


def _usage(request: ChatRequest, reply: Reply) -> dict[str, Any]:
    """The usage object (about 4 characters a token), as openai types/completion_usage.py."""
    prompt = len(json.dumps(request.messages)) // 4
    completion = (len(reply.text) + len(json.dumps([c.arguments for c in reply.tool_calls]))) // 4
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _chunks(request: ChatRequest, reply: Reply) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a streamed answer, as OpenAI sends them and
    livekit-agents inference/llm.py ``LLMStream._run``/``_parse_choice`` read them: the role,
    the text word by word, each tool call as an ``id``+``name`` delta then its JSON arguments
    in pieces (``index`` telling parallel calls apart), ``finish_reason``, and, when
    ``stream_options.include_usage`` is asked, ``usage: null`` on every chunk and a last chunk
    with no choices and the usage."""
    base = {
        "id": _id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
        "service_tier": "default",
        "system_fingerprint": "fp_standin",
    }
    with_usage = bool((request.body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": None} if with_usage else {})}

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in re.findall(r"\s*\S+", reply.text):
        yield chunk({"content": piece})
    for index, call in enumerate(reply.tool_calls):
        function = {"name": call.name, "arguments": ""}
        yield chunk({"tool_calls": [{"index": index, "id": _id("call_"), "type": "function",
                                     "function": function}]})  # fmt: skip
        arguments = json.dumps(call.arguments)
        for at in range(0, len(arguments), 8):
            piece = {"index": index, "function": {"arguments": arguments[at : at + 8]}}
            yield chunk({"tool_calls": [piece]})
    yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
    if with_usage:
        yield {**base, "choices": [], "usage": _usage(request, reply)}


def _completion(request: ChatRequest, reply: Reply) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` (openai types/chat/chat_completion.py)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": _id("call_"), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in reply.tool_calls
        ]  # fmt: skip
    return {
        "id": _id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": _usage(request, reply),
        "service_tier": "default",
        "system_fingerprint": "fp_standin",
    }


def _openai_error(status: int, message: str, kind: str) -> web.Response:
    """OpenAI's error body; the openai SDK (_client.py ``_make_status_error``) reads
    ``body["error"]`` and raises by status (500: ``InternalServerError``)."""
    error = {"message": message, "type": kind, "param": None, "code": None}
    return web.json_response({"error": error}, status=status, headers={"x-request-id": _id("req_")})


# ── Deepgram: the recogniser ─────────────────────────────────────────────────────────────────


@dataclass
class STTSession:
    """One Deepgram request: a live websocket (``stream``) or a prerecorded POST."""

    kind: Literal["stream", "prerecorded"]
    query: dict[str, str]
    sample_rate: int
    channels: int
    at: float = field(default_factory=time.monotonic)
    audio_bytes: int = 0
    controls: list[str] = field(default_factory=list)  # KeepAlive, Finalize, CloseStream...
    transcripts: list[str] = field(default_factory=list)  # the final transcripts sent
    closed_at: float | None = None

    @property
    def audio_seconds(self) -> float:
        return self.audio_bytes / (2 * self.channels * self.sample_rate)


def _bare(word: str) -> str:
    return re.sub(r"[^\w']", "", word).lower()


class _Recognizer:
    """Deepgram's live recogniser as its client sees it, on the clock of the audio received
    (linear16): a 20 ms window whose RMS is over ``VOICE_RMS`` is speech. An utterance takes
    the next scripted transcript; ``SpeechStarted`` when it starts (``vad_events``), an interim
    ``Results`` (``interim_results``, ``is_final=false``, the first half of the words) after
    ``INTERIM_AFTER`` s of it, and the final one (``is_final=true``, ``speech_final=true``
    unless ``endpointing=false``) once ``max(endpointing, MIN_ENDPOINT)`` of silence follows
    it. ``finish`` finalises an utterance in progress (Finalize, CloseStream). The messages are
    shaped as livekit-plugins-deepgram 1.8.9 stt.py ``_process_stream_event`` and
    ``live_transcription_to_speech_data`` read them."""

    def __init__(
        self,
        session: STTSession,
        query: Mapping[str, str],
        next_transcript: Callable[[], str],
        request_id: str,
    ) -> None:
        self.session = session
        self.next_transcript = next_transcript
        self.request_id = request_id
        self.interim = query.get("interim_results") == "true"
        self.vad_events = query.get("vad_events") == "true"
        endpointing = query.get("endpointing", "10")  # Deepgram's default: 10 ms
        self.speech_final = endpointing != "false"
        endpoint = max(int(endpointing) / 1000 if self.speech_final else 0.0, MIN_ENDPOINT)
        self.endpoint = round(endpoint / WINDOW)  # in windows, as every count below
        self.interim_after = round(INTERIM_AFTER / WINDOW)
        self.formatted = "true" in (query.get("punctuate"), query.get("smart_format"))
        self.model = query.get("model", "base")
        self.window = round(session.sample_rate * WINDOW) * session.channels * 2
        self.pending = b""
        self.heard = 0  # windows of audio heard
        self.start: int | None = None  # where the utterance in progress started
        self.last_voice = 0  # where its speech last ended
        self.words: list[str] = []
        self.interim_sent = False

    @property
    def clock(self) -> float:
        return self.heard * WINDOW

    def feed(self, pcm: bytes) -> list[dict[str, Any]]:
        self.session.audio_bytes += len(pcm)
        self.pending += pcm
        out: list[dict[str, Any]] = []
        while len(self.pending) >= self.window:
            chunk, self.pending = self.pending[: self.window], self.pending[self.window :]
            samples = np.frombuffer(chunk, "<i2").astype(np.float64)
            if math.sqrt(float(np.mean(samples**2))) > VOICE_RMS:
                if self.start is None:
                    self.start, self.interim_sent = self.heard, False
                    self.words = self.next_transcript().split()
                    if self.vad_events:
                        out.append(
                            {"type": "SpeechStarted", "channel": [0, 1],
                             "timestamp": round(self.clock, 3)}
                        )  # fmt: skip
                self.last_voice = self.heard + 1
                if (
                    self.interim
                    and not self.interim_sent
                    and self.last_voice - self.start >= self.interim_after
                ):
                    self.interim_sent = True
                    out.append(self._results(self.last_voice, final=False))
            elif self.start is not None and self.heard + 1 - self.last_voice >= self.endpoint:
                out.append(self._results(self.last_voice, final=True, endpoint=self.speech_final))
            self.heard += 1
        return out

    def finish(self, *, from_finalize: bool) -> list[dict[str, Any]]:
        if self.start is None:
            return []
        return [self._results(self.last_voice, final=True, from_finalize=from_finalize)]

    def _results(
        self, until: int, *, final: bool, endpoint: bool = False, from_finalize: bool = False
    ) -> dict[str, Any]:
        assert self.start is not None
        start, end = self.start * WINDOW, until * WINDOW
        heard = self.words if final else self.words[: math.ceil(len(self.words) / 2)]
        step = (end - start) / max(len(heard), 1)
        words = [
            {
                "word": _bare(w),
                "start": round(start + i * step, 3),
                "end": round(start + (i + 1) * step, 3),
                "confidence": CONFIDENCE,
                **({"punctuated_word": w} if self.formatted else {}),
            }
            for i, w in enumerate(heard)
        ]
        transcript = " ".join(heard if self.formatted else [_bare(w) for w in heard])
        if final:
            self.start = None
            self.session.transcripts.append(transcript)
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": final,
            "speech_final": endpoint,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {"transcript": transcript, "confidence": CONFIDENCE, "words": words}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {"name": self.model, "version": "stand-in", "arch": self.model},
                "model_uuid": self.request_id,
            },
        }


def _deepgram_error(status: int, code: str, message: str) -> web.Response:
    """Deepgram's error: a JSON body and the ``dg-error`` header. On the websocket handshake
    the plugin (stt.py ``_connect_ws``) turns it into ``APIStatusError(status_code=status)``."""
    body = {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
    return web.json_response(body, status=status, headers={"dg-error": message})


# ── ElevenLabs: synthetic speech ─────────────────────────────────────────────────────────────


@dataclass
class TTSText:
    """Text that arrived for synthesis: one HTTP request, or one websocket context."""

    protocol: Literal["http", "ws"]
    voice_id: str
    model: str
    output_format: str
    context_id: str = ""
    socket: int = 0  # which multi-stream-input socket (1, 2, ...) carried it; 0: HTTP
    text: str = ""  # whitespace-normalised, all the text the request/context carried
    at: float = field(default_factory=time.monotonic)
    audio_seconds: float = 0.0  # of audio sent back

    def add(self, text: str) -> None:
        self.text = " ".join(f"{self.text} {text}".split())


def speech(text: str, sample_rate: int, start_ms: int = 0) -> tuple[bytes, dict[str, list[Any]]]:
    """16-bit mono PCM for ``text``, ``MS_PER_CHAR`` ms a character: a ``TONE_HZ`` tone under a
    half-sine envelope for each word, silence for the spaces between; and its character
    alignment (``chars``, ``charStartTimesMs`` from ``start_ms``, ``charsDurationsMs``), as
    ElevenLabs' websocket sends it."""
    bounds = [round(i * MS_PER_CHAR * sample_rate / 1000) for i in range(len(text) + 1)]
    audio = np.zeros(bounds[-1])
    for word in re.finditer(r"\S+", text):
        a, b = bounds[word.start()], bounds[word.end()]
        t = np.arange(b - a)
        envelope = np.sin(np.pi * (t + 0.5) / (b - a))
        audio[a:b] = np.sin(2 * np.pi * TONE_HZ * t / sample_rate) * envelope
    pcm = (audio * TONE_LEVEL * 32767).astype("<i2").tobytes()
    alignment = {
        "chars": list(text),
        "charStartTimesMs": [start_ms + i * MS_PER_CHAR for i in range(len(text))],
        "charsDurationsMs": [MS_PER_CHAR] * len(text),
    }
    return pcm, alignment


def _pcm_rate(output_format: str) -> int | None:
    kind, _, rate = output_format.partition("_")
    return int(rate) if kind == "pcm" and rate.isdigit() else None


def _eleven_error(status: int, kind: str, message: str) -> web.Response:
    """ElevenLabs' error body (``detail``); the plugin's ``raise_for_status``
    (tts.py ``ChunkedStream._run``) and ws handshake make it ``APIStatusError(status)``."""
    body = {"detail": {"status": kind, "message": message}}
    return web.json_response(body, status=status, headers={"x-trace-id": uuid.uuid4().hex})


@dataclass
class _Context:
    """A multi-stream-input context: its record, its unsynthesised text, its audio clock."""

    record: TTSText
    schedule: list[int]
    buffer: str = ""
    chars: int = 0  # characters synthesised so far: the alignment's clock
    generations: int = 0
    stalled: bool = False


# ── the server ───────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Fault:
    mode: FaultMode = "ok"
    seconds: float = 0.0


class ProviderStandIns(Served):
    """The three providers on one local server; see the module docstring."""

    deepgram_idle_timeout = DEEPGRAM_IDLE_TIMEOUT  # a test may wait less

    def __init__(self, llm_script: Script | None = None, *, stt_default: str = "hello") -> None:
        self.llm_script: Script = llm_script or receptionist_script()
        self.stt_default = stt_default
        self.faults: dict[Provider, Fault] = {p: Fault() for p in PROVIDERS}
        self.llm_requests: list[ChatRequest] = []
        self.stt_sessions: list[STTSession] = []
        self.tts_texts: list[TTSText] = []
        self.tts_sockets = 0  # multi-stream-input sockets opened so far
        self.port = 0
        self._transcripts: deque[str] = deque()
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # -- lifecycle, addresses ---------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = asyncio.Event()  # bound to the loop the server runs in
        app = web.Application()
        app.add_routes(
            [
                web.post("/openai/v1/chat/completions", self._chat_completions),
                web.get("/openai/v1/models", self._models),
                web.get("/deepgram/v1/listen", self._listen_live),
                web.post("/deepgram/v1/listen", self._listen_prerecorded),
                web.post("/elevenlabs/v1/text-to-speech/{voice_id}/stream", self._tts_http),
                web.get(
                    "/elevenlabs/v1/text-to-speech/{voice_id}/multi-stream-input", self._tts_ws
                ),
                web.get("/elevenlabs/v1/voices", self._voices),
            ]
        )
        # handler_cancellation: a client that gives up cancels its handler (a stalled answer)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        self._closing.set()  # stalled answers end
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls, llm_script: Script | None = None, **kw: Any) -> Iterator[ProviderStandIns]:
        """The stand-ins on an event loop of their own in a daemon thread, for synchronous
        tests (a worker in a subprocess gets ``env()``)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="provider-stand-ins", daemon=True)
        thread.start()
        standins = cls(llm_script, **kw)
        try:
            asyncio.run_coroutine_threadsafe(standins.start(), loop).result(10)
            yield standins
        finally:
            asyncio.run_coroutine_threadsafe(standins.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # each provider's API root, as its plugin is given it
    openai_base_url = property(lambda self: f"{self.base_url}/openai/v1")
    deepgram_base_url = property(lambda self: f"{self.base_url}/deepgram/v1/listen")
    eleven_base_url = property(lambda self: f"{self.base_url}/elevenlabs/v1")

    def env(self) -> dict[str, str]:
        """What a worker process needs to use the stand-ins: the keys, the base URLs."""
        return {
            "OPENAI_BASE_URL": self.openai_base_url,  # read by the openai SDK itself
            "OPENAI_API_KEY": "stand-in",
            "DEEPGRAM_API_KEY": "stand-in",
            "DEEPGRAM_BASE_URL": self.deepgram_base_url,
            "ELEVEN_API_KEY": "stand-in",
            "ELEVEN_BASE_URL": self.eleven_base_url,
        }

    # -- scripting ----------------------------------------------------------------------------

    def fault(self, provider: Provider, mode: FaultMode = "ok", seconds: float = 0.0) -> None:
        """From now on ``provider`` answers ``ok``, or ``fail``s (its own error), ``stall``s
        (never answers) or is ``slow`` (``seconds`` before its first byte or message)."""
        if provider not in PROVIDERS or mode not in FAULT_MODES:
            raise ValueError(f"no fault {mode!r} for {provider!r}")
        self.faults[provider] = Fault(mode, seconds)

    def stt_says(self, *transcripts: str) -> None:
        """The transcripts of the next utterances heard, one an utterance; then ``stt_default``."""
        self._transcripts.extend(transcripts)

    def _next_transcript(self) -> str:
        try:
            return self._transcripts.popleft()
        except IndexError:
            return self.stt_default

    async def _before_answer(
        self, provider: Provider, error: Callable[[], web.Response], *, slow: bool = True
    ) -> web.Response | None:
        """The fault before the first byte of an answer: ``fail`` is ``error()``; ``stall``
        never answers (until the client gives up or the server stops); ``slow`` waits."""
        fault = self.faults[provider]
        if fault.mode == "fail":
            return error()
        if fault.mode == "stall":
            await self._closing.wait()
            return web.Response(status=503)
        if fault.mode == "slow" and slow:
            await asyncio.sleep(fault.seconds)
        return None

    async def _open_socket(
        self, request: web.Request, provider: Provider, error: Callable[[], web.Response]
    ) -> web.StreamResponse:
        """The websocket, unless the provider's fault refuses the upgrade first (``fail``,
        ``stall``); ``slow`` delays an open socket's messages instead, not the upgrade."""
        refused = await self._before_answer(provider, error, slow=False)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        return ws

    # -- OpenAI -------------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /chat/completions as openai 3.60 sends it (``Authorization: Bearer``, the JSON
        body of livekit-agents inference/llm.py ``LLMStream._run``: ``stream=True``,
        ``stream_options.include_usage``, ``tools``, ``tool_choice``); SSE ``data: {chunk}``
        events ending ``data: [DONE]``, as openai _streaming.py ``AsyncStream`` decodes them."""
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return _openai_error(401, "You didn't provide an API key.", "invalid_request_error")
        chat = ChatRequest(await request.json())
        self.llm_requests.append(chat)
        server_error = "The server had an error while processing your request. Sorry about that!"
        refused = await self._before_answer(
            "llm", lambda: _openai_error(500, server_error, "server_error")
        )
        if refused is not None:
            return refused
        reply = chat.reply = self.llm_script(chat)
        headers = {"x-request-id": _id("req_")}
        if not chat.stream:
            return web.json_response(_completion(chat, reply), headers=headers)
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"}
        )
        await response.prepare(request)
        for chunk in _chunks(chat, reply):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        """GET /models: livekit-plugins-openai llm.py ``_prewarm_impl`` lists the models."""
        model = {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"}
        return web.json_response({"object": "list", "data": [model]})

    # -- Deepgram -----------------------------------------------------------------------------

    @staticmethod
    def _deepgram_denied(request: web.Request) -> web.Response | None:
        """``Authorization: Token <key>`` (Bearer for temporary tokens), as
        livekit-plugins-deepgram stt.py sends it; Deepgram answers 401 INVALID_AUTH without."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme in ("Token", "Bearer") and key:
            return None
        return _deepgram_error(401, "INVALID_AUTH", "Invalid credentials.")

    async def _listen_live(self, request: web.Request) -> web.StreamResponse:
        """The live websocket, as livekit-plugins-deepgram 1.8.9 stt.py ``SpeechStream``
        (``_connect_ws``: the query of ``_utils._to_deepgram_url``; ``send_task``: binary
        linear16 in 50 ms chunks, ``{"type": "Finalize"}`` on flush, ``CloseStream`` at the end;
        ``keepalive_task``: ``KeepAlive`` every 5 s) uses it. Results come from ``_Recognizer``;
        ``CloseStream`` finalises, sends ``Metadata`` and closes 1000, as Deepgram does; with
        neither audio nor a message for ``deepgram_idle_timeout`` s, Deepgram closes 1011
        (NET-0001). A ``slow`` fault delays every message by its seconds; ``fail`` and
        ``stall`` set on an open socket close it 1011 / drop every message."""
        if (denied := self._deepgram_denied(request)) is not None:
            return denied
        query = dict(request.query)
        if query.get("encoding", "linear16") != "linear16":
            return _deepgram_error(400, "Bad Request", "The stand-in decodes linear16 only.")
        session = STTSession(
            "stream", query, int(query.get("sample_rate", 16000)), int(query.get("channels", 1))
        )
        self.stt_sessions.append(session)
        ws = await self._open_socket(
            request, "stt", lambda: _deepgram_error(500, "INTERNAL_SERVER_ERROR", "Internal error")
        )
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        request_id = str(uuid.uuid4())
        recognizer = _Recognizer(session, query, self._next_transcript, request_id)
        out: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()

        def send(messages: list[dict[str, Any]]) -> None:
            for message in messages:
                out.put_nowait((time.monotonic(), message))

        sender = asyncio.create_task(self._deepgram_sender(ws, out))
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=self.deepgram_idle_timeout)
                except asyncio.TimeoutError:
                    await ws.close(
                        code=WSCloseCode.INTERNAL_ERROR,
                        message=b"Deepgram did not receive audio data or a text message "
                        b"within the timeout window. See https://dpgr.am/net0001",
                    )
                    break
                if msg.type == WSMsgType.BINARY:
                    send(recognizer.feed(msg.data))
                elif msg.type == WSMsgType.TEXT:
                    kind = json.loads(msg.data).get("type", "")
                    session.controls.append(kind)
                    if kind == "Finalize":
                        send(recognizer.finish(from_finalize=True))
                    elif kind == "CloseStream":
                        send(recognizer.finish(from_finalize=False))
                        send([{"type": "Metadata", "transaction_key": "deprecated",
                               "request_id": request_id, "duration": round(recognizer.clock, 3),
                               "channels": session.channels}])  # fmt: skip
                        out.put_nowait((time.monotonic(), None))  # then close
                else:
                    break
        finally:
            sender.cancel()
            session.closed_at = time.monotonic()
            self._sockets.discard(ws)
        return ws

    async def _deepgram_sender(
        self, ws: web.WebSocketResponse, out: asyncio.Queue[tuple[float, dict[str, Any] | None]]
    ) -> None:
        """Sends the recogniser's messages in order, each when due, under the ``stt`` fault of
        the moment; ``None`` closes the socket normally."""
        while True:
            due, message = await out.get()
            fault = self.faults["stt"]
            if fault.mode == "stall":
                continue
            if fault.mode == "fail":
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal server error")
                return
            if fault.mode == "slow":
                await asyncio.sleep(max(0.0, due + fault.seconds - time.monotonic()))
            if message is None:
                await ws.close()
                return
            await ws.send_json(message)

    async def _listen_prerecorded(self, request: web.Request) -> web.Response:
        """The prerecorded POST that livekit-plugins-deepgram stt.py ``_recognize_impl`` makes
        (a WAV body): every utterance in it takes the next scripted transcript; the answer is
        shaped as ``prerecorded_transcription_to_speech_event`` reads it."""
        if (denied := self._deepgram_denied(request)) is not None:
            return denied
        try:
            with wave.open(io.BytesIO(await request.read())) as wav:
                rate, channels = wav.getframerate(), wav.getnchannels()
                pcm = wav.readframes(wav.getnframes())
        except (wave.Error, EOFError):
            return _deepgram_error(
                400,
                "Bad Request",
                "Bad Request: failed to process audio: corrupt or unsupported data",
            )
        query = {**request.query, "interim_results": "false", "vad_events": "false"}
        session = STTSession("prerecorded", dict(request.query), rate, channels)
        self.stt_sessions.append(session)
        refused = await self._before_answer(
            "stt", lambda: _deepgram_error(500, "INTERNAL_SERVER_ERROR", "Internal error")
        )
        if refused is not None:
            return refused
        request_id = str(uuid.uuid4())
        recognizer = _Recognizer(session, query, self._next_transcript, request_id)
        results = recognizer.feed(pcm) + recognizer.finish(from_finalize=False)
        session.closed_at = time.monotonic()
        alternatives = [r["channel"]["alternatives"][0] for r in results]
        alternative = {
            "transcript": " ".join(a["transcript"] for a in alternatives if a["transcript"]),
            "confidence": CONFIDENCE,
            "words": [w for a in alternatives for w in a["words"]],
        }
        metadata = {"transaction_key": "deprecated", "request_id": request_id,
                    "duration": round(session.audio_seconds, 3), "channels": channels}  # fmt: skip
        return web.json_response(
            {"metadata": metadata, "results": {"channels": [{"alternatives": [alternative]}]}}
        )

    # -- ElevenLabs ---------------------------------------------------------------------------

    @staticmethod
    def _eleven_denied(request: web.Request) -> web.Response | None:
        """The ``xi-api-key`` header livekit-plugins-elevenlabs tts.py sends
        (``AUTHORIZATION_HEADER``)."""
        if request.headers.get("xi-api-key"):
            return None
        return _eleven_error(401, "needs_authorization", "Missing the xi-api-key header.")

    @staticmethod
    def _unsupported_format(output_format: str) -> web.Response:
        return _eleven_error(
            422, "invalid_output_format", f"The stand-in renders pcm_* only, not {output_format}."
        )

    async def _tts_http(self, request: web.Request) -> web.StreamResponse:
        """POST /text-to-speech/{voice_id}/stream?output_format=...&enable_logging=..., JSON
        ``text``/``model_id``/``voice_settings``, as livekit-plugins-elevenlabs 1.8.9 tts.py
        ``_synthesize_url``/``_build_synthesize_body`` make it; raw PCM streamed back under an
        ``audio/*`` type (``ChunkedStream._run`` refuses anything else). mp3/opus: 422."""
        if (denied := self._eleven_denied(request)) is not None:
            return denied
        output_format = request.query.get("output_format", "mp3_44100_128")
        body = await request.json()
        record = TTSText(
            "http",
            request.match_info["voice_id"],
            body.get("model_id", ""),
            output_format,
        )
        record.add(body.get("text", ""))
        self.tts_texts.append(record)
        rate = _pcm_rate(output_format)
        if rate is None:
            return self._unsupported_format(output_format)
        refused = await self._before_answer(
            "tts_http", lambda: _eleven_error(500, "internal_server_error", "Internal error")
        )
        if refused is not None:
            return refused
        pcm, _ = speech(body.get("text", ""), rate)
        response = web.StreamResponse(
            headers={"Content-Type": "audio/pcm", "x-trace-id": uuid.uuid4().hex}
        )
        await response.prepare(request)
        step = rate // 10 * 2  # 100 ms a chunk
        for at in range(0, len(pcm), step):
            await response.write(pcm[at : at + step])
        record.audio_seconds = len(pcm) / (2 * rate)
        await response.write_eof()
        return response

    async def _tts_ws(self, request: web.Request) -> web.StreamResponse:
        """The multi-stream-input websocket, as livekit-plugins-elevenlabs 1.8.9 tts.py
        ``_Connection`` uses it (one socket, shared by the streams, one context each). In:
        ``{"text": " ", "voice_settings", "context_id"}`` opens a context (``generation_config.
        chunk_length_schedule`` optional), ``{"text", "context_id", "flush"?}``, ``{"context_id",
        "close_context": true}``; ``{"text": ""}`` without flush only keeps it alive. Text is
        synthesised on flush, close_context, with ``auto_mode=true`` at once, else when the
        buffer reaches the schedule. Out (``_recv_loop`` reads them): ``{"audio": base64,
        "normalizedAlignment", "alignment", "contextId"}`` and, after close_context,
        ``{"isFinal": true, "contextId"}``. No message for ``inactivity_timeout`` s: closed
        1008, as ElevenLabs does. Faults on an open socket: ``fail`` closes it 1011, ``stall``
        leaves the next context unanswered, ``slow`` delays a context's first audio."""
        if (denied := self._eleven_denied(request)) is not None:
            return denied
        query = request.query
        output_format = query.get("output_format", "mp3_44100")
        rate = _pcm_rate(output_format)
        if rate is None:
            return self._unsupported_format(output_format)
        ws = await self._open_socket(
            request, "tts_ws", lambda: _eleven_error(500, "internal_server_error", "Internal error")
        )
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        self.tts_sockets += 1
        serial = self.tts_sockets
        inactivity = float(query.get("inactivity_timeout", 20))
        auto_mode = query.get("auto_mode") == "true"
        contexts: dict[str, _Context] = {}
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=inactivity)
                except asyncio.TimeoutError:
                    await ws.close(
                        code=WSCloseCode.POLICY_VIOLATION,
                        message=f"Have not received a new text input within the timeout of "
                        f"{inactivity:g} seconds. Streaming input terminated.".encode(),
                    )
                    break
                if msg.type != WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data.get("close_socket"):
                    await ws.close()
                    break
                context_id = data.get("context_id", "")
                ctx = contexts.get(context_id)
                if ctx is None:
                    if "text" not in data:
                        continue  # flush or close of a context that is not open
                    config = data.get("generation_config") or {}
                    record = TTSText(
                        "ws",
                        request.match_info["voice_id"],
                        query.get("model_id", ""),
                        output_format,
                        context_id,
                        serial,
                    )
                    ctx = contexts[context_id] = _Context(
                        record, config.get("chunk_length_schedule") or ELEVEN_SCHEDULE
                    )
                    self.tts_texts.append(record)
                ctx.buffer += data.get("text", "")
                ctx.record.add(data.get("text", ""))
                threshold = ctx.schedule[min(ctx.generations, len(ctx.schedule) - 1)]
                closing = bool(data.get("close_context"))
                if data.get("flush") or closing or auto_mode or len(ctx.buffer) >= threshold:
                    if not await self._speak(ws, context_id, ctx, rate):
                        break
                if closing:
                    del contexts[context_id]
                    if not ctx.stalled:
                        await ws.send_json({"isFinal": True, "contextId": context_id})
        finally:
            self._sockets.discard(ws)
        return ws

    async def _speak(
        self, ws: web.WebSocketResponse, context_id: str, ctx: _Context, rate: int
    ) -> bool:
        """Synthesises a context's buffered text under the ``tts_ws`` fault of the moment;
        False once the socket is closed."""
        text, ctx.buffer = ctx.buffer.lstrip(), ""
        if not text.strip() or ctx.stalled:
            return True
        fault = self.faults["tts_ws"]
        if fault.mode == "fail":
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal server error")
            return False
        if fault.mode == "stall":
            ctx.stalled = True
            return True
        if fault.mode == "slow" and ctx.generations == 0:
            await asyncio.sleep(fault.seconds)
        pcm, alignment = speech(text, rate, start_ms=ctx.chars * MS_PER_CHAR)
        ctx.chars += len(text)
        ctx.generations += 1
        ctx.record.audio_seconds += len(pcm) / (2 * rate)
        await ws.send_json(
            {
                "audio": base64.b64encode(pcm).decode(),
                "normalizedAlignment": alignment,
                "alignment": alignment,
                "contextId": context_id,
            }
        )
        return True

    async def _voices(self, request: web.Request) -> web.Response:
        """GET /voices, as livekit-plugins-elevenlabs tts.py ``list_voices`` reads it."""
        if (denied := self._eleven_denied(request)) is not None:
            return denied
        voice = {"voice_id": "hpp4J3VqNfWAUOO0d1Us", "name": "Stand-in", "category": "premade"}
        return web.json_response({"voices": [voice]})
