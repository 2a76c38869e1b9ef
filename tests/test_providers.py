"""The provider stand-ins (``standins/providers.py``) against the REAL clients: livekit-plugins
-openai/-deepgram/-elevenlabs 1.8.9 and the openai SDK, pointed at them by base URL. If a
stand-in drifted from a provider's wire protocol, the real client would fail here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
    stt,
    utils,
)
from livekit.agents.llm import (
    ChatContext,
    ChatMessage,
    FunctionCall,
    FunctionCallOutput,
    function_tool,
)
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.agents.voice.amd.classifier import AMD_PROMPT, AMDCategory
from livekit.plugins import deepgram, elevenlabs, openai

from standins.providers import MS_PER_CHAR, PROVIDERS, Provider, ProviderStandIns, Reply

RATE = 16000
NO_RETRY = APIConnectOptions(max_retry=0, timeout=0.5)
PATIENT = APIConnectOptions(max_retry=0, timeout=2.0)
Event = stt.SpeechEventType


@pytest.fixture
async def standins() -> AsyncIterator[ProviderStandIns]:
    async with ProviderStandIns() as s, utils.http_context.open():
        yield s


@pytest.fixture
async def gpt(standins: ProviderStandIns) -> AsyncIterator[openai.LLM]:
    model = openai.LLM(model="gpt-4o", base_url=standins.openai_base_url, api_key="x")
    yield model
    await model.aclose()


def listener(standins: ProviderStandIns) -> deepgram.STT:
    return deepgram.STT(base_url=standins.deepgram_base_url, api_key="x")


def voice(standins: ProviderStandIns, **kw: object) -> elevenlabs.TTS:
    options: dict = {"model": "eleven_multilingual_v2", "encoding": "pcm_44100", **kw}
    return elevenlabs.TTS(base_url=standins.eleven_base_url, api_key="x", **options)


@function_tool
async def transfer_call(destination: Literal["support", "billing"], reason: str) -> str:
    """Connect the caller with a person from one of the listed teams.

    Args:
        destination: The team.
        reason: What the caller needs, in a few words.
    """
    return "transferring"


def chat(*user: str, system: str = "You are Acme's receptionist.") -> ChatContext:
    ctx = ChatContext()
    ctx.add_message(role="system", content=system)
    for text in user:
        ctx.add_message(role="user", content=text)
    return ctx


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 200 * t) * 0.3 * 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.int16)


def frames(*parts: np.ndarray) -> list[rtc.AudioFrame]:
    """16 kHz mono in 20 ms frames, as a phone line gives it."""
    pcm = np.concatenate(parts)
    return [
        rtc.AudioFrame(pcm[at : at + 320].tobytes(), RATE, 1, len(pcm[at : at + 320]))
        for at in range(0, len(pcm), 320)
    ]


def push(stream: stt.RecognizeStream, *parts: np.ndarray) -> None:
    for frame in frames(*parts):
        stream.push_frame(frame)


async def events_until(stream: stt.RecognizeStream, last: Event) -> list[stt.SpeechEvent]:
    """The stream's events up to the first ``last`` (within 3 s), without the usage reports."""
    seen: list[stt.SpeechEvent] = []

    async def collect() -> list[stt.SpeechEvent]:
        async for event in stream:
            if event.type != Event.RECOGNITION_USAGE:
                seen.append(event)
            if event.type == last:
                return seen
        raise AssertionError(f"the stream ended before {last}: {[e.type for e in seen]}")

    return await asyncio.wait_for(collect(), 3.0)


async def wait_for(predicate: Callable[[], object], timeout: float = 2.0) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - polls the stand-ins' records
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def seconds(audio: list[rtc.AudioFrame]) -> float:
    return sum(f.samples_per_channel for f in audio) / 44100


# ── OpenAI ───────────────────────────────────────────────────────────────────────────────────


async def test_llm_streams_text_word_by_word_with_usage(standins, gpt):
    async with gpt.chat(chat_ctx=chat("What are your hours?"), tools=[transfer_call]) as stream:
        chunks = [chunk async for chunk in stream]

    words = [c.delta.content for c in chunks if c.delta and c.delta.content]
    assert words == ["Sure,", " how", " can", " I", " help?"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].total_tokens > 0
    request = standins.llm_requests[-1]
    assert request.stream and request.body["stream_options"] == {"include_usage": True}
    assert request.model == "gpt-4o" and request.tools == ["transfer_call"]
    assert request.system_prompt == "You are Acme's receptionist."
    assert request.last_user_text == "What are your hours?"
    assert request.reply == Reply.say("Sure, how can I help?")


async def test_llm_calls_transfer_call_to_the_team_named_then_answers_its_output(standins, gpt):
    asked = "Can I talk to someone in billing about my invoice?"
    ctx = chat("Hi.", asked)
    response = await gpt.chat(chat_ctx=ctx, tools=[transfer_call]).collect()

    [call] = response.tool_calls
    assert call.name == "transfer_call" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"destination": "billing", "reason": asked}
    schema = standins.llm_requests[-1].tool("transfer_call")
    assert schema is not None
    assert schema["parameters"]["properties"]["destination"]["enum"] == ["support", "billing"]

    ctx.items.append(FunctionCall(call_id=call.call_id, name=call.name, arguments=call.arguments))
    ctx.items.append(
        FunctionCallOutput(call_id=call.call_id, name=call.name, output="ok", is_error=False)
    )
    after = await gpt.chat(chat_ctx=ctx, tools=[transfer_call]).collect()
    assert (after.text, after.tool_calls) == ("Sure, how can I help?", [])
    assert standins.llm_requests[-1].after_tool


async def test_llm_streams_parallel_tool_calls_from_a_replaced_script(standins, gpt):
    standins.llm_script = lambda request: (
        Reply.call("transfer_call", destination="support", reason="printer")
        + Reply.call("transfer_call", destination="billing", reason="refund")
    )
    response = await gpt.chat(chat_ctx=chat("Help"), tools=[transfer_call]).collect()

    assert [json.loads(c.arguments)["destination"] for c in response.tool_calls] == [
        "support",
        "billing",
    ]
    assert len({c.call_id for c in response.tool_calls}) == 2


@pytest.mark.parametrize(
    ("greeting", "label"),
    [
        ("Hi, you've reached Sam. Please leave a message after the tone.", "machine-vm"),
        ("Hello? This is Lisa.", "human"),
    ],
)
async def test_amd_classifier_request_gets_save_prediction(standins, gpt, greeting, label):
    async def save_prediction(label: AMDCategory) -> None:
        """Save the prediction to the verdict."""

    # as livekit-agents voice/amd/classifier.py _classify_user_speech._run asks it
    ctx = ChatContext(
        items=[
            ChatMessage(role="system", content=[AMD_PROMPT]),
            ChatMessage(role="user", content=[greeting]),
        ]
    )
    stream = gpt.chat(chat_ctx=ctx, tools=[function_tool(save_prediction)], tool_choice="required")
    response = await stream.collect()

    assert [(c.name, json.loads(c.arguments)) for c in response.tool_calls] == [
        ("save_prediction", {"label": label})
    ]
    assert standins.llm_requests[-1].tool_choice == "required"


async def test_llm_without_tools_composes_the_brief(standins, gpt):
    ctx = chat("Reason for transfer: refund\n\nCaller: I was charged twice.", system="Summarise.")
    response = await gpt.chat(chat_ctx=ctx).collect()

    assert response.text == "The caller wants help with their account."
    assert "tools" not in standins.llm_requests[-1].body


def test_in_thread_serves_a_process_configured_by_env():
    with ProviderStandIns.in_thread() as s:
        s.llm_script = lambda request: Reply.say(f"You said: {request.last_user_text}")
        code = (
            "from openai import OpenAI\n"
            "reply = OpenAI().chat.completions.create(\n"
            "    model='gpt-4o', messages=[{'role': 'user', 'content': 'hi there'}])\n"
            "print(reply.choices[0].message.content)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **s.env()},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

        assert done.stdout.strip() == "You said: hi there"
        assert not s.llm_requests[-1].stream
        base = f"http://127.0.0.1:{s.port}"
        assert s.env() == {
            "OPENAI_BASE_URL": f"{base}/openai/v1",
            "OPENAI_API_KEY": "stand-in",
            "DEEPGRAM_API_KEY": "stand-in",
            "DEEPGRAM_BASE_URL": f"{base}/deepgram/v1/listen",
            "ELEVEN_API_KEY": "stand-in",
            "ELEVEN_BASE_URL": f"{base}/elevenlabs/v1",
        }


# ── Deepgram ─────────────────────────────────────────────────────────────────────────────────


async def test_deepgram_stream_times_its_results_to_the_speech(standins):
    standins.stt_says("Hello, is anyone there?")
    stream = listener(standins).stream()
    push(stream, tone(0.8), silence(1.0))

    events = await events_until(stream, Event.END_OF_SPEECH)
    assert [e.type for e in events] == [
        Event.START_OF_SPEECH,
        Event.INTERIM_TRANSCRIPT,
        Event.FINAL_TRANSCRIPT,
        Event.END_OF_SPEECH,
    ]
    interim, final = events[1].alternatives[0], events[2].alternatives[0]
    assert interim.text == "Hello, is"
    assert final.text == "Hello, is anyone there?"
    assert [str(w) for w in final.words or []] == ["Hello,", "is", "anyone", "there?"]
    assert (final.start_time, final.end_time) == pytest.approx((0.0, 0.8), abs=0.001)

    stream.end_input()  # Finalize, then CloseStream: Deepgram closes the socket
    [session] = standins.stt_sessions
    await wait_for(lambda: session.closed_at is not None)
    await stream.aclose()
    assert session.audio_seconds == pytest.approx(1.8)
    assert session.controls == ["KeepAlive", "Finalize", "CloseStream"]
    assert session.transcripts == ["Hello, is anyone there?"]
    assert session.query["encoding"] == "linear16" and session.query["sample_rate"] == "16000"
    assert session.query["vad_events"] == "true" and session.query["endpointing"] == "25"


async def test_deepgram_takes_one_scripted_transcript_an_utterance(standins):
    standins.stt_says("hello?", "I need billing")
    stream = listener(standins).stream()
    push(stream, *[part for _ in range(3) for part in (tone(0.4), silence(0.4))])

    finals = []
    while len(finals) < 3:
        events = await events_until(stream, Event.END_OF_SPEECH)
        finals += [e for e in events if e.type == Event.FINAL_TRANSCRIPT]
    assert [e.alternatives[0].text for e in finals] == ["hello?", "I need billing", "hello"]
    assert [round(e.alternatives[0].start_time, 2) for e in finals] == [0.0, 0.8, 1.6]
    await stream.aclose()


async def test_deepgram_finalize_flushes_the_utterance(standins):
    stream = listener(standins).stream()
    push(stream, tone(0.5))
    stream.flush()  # the plugin sends {"type": "Finalize"}

    events = await events_until(stream, Event.FINAL_TRANSCRIPT)
    assert events[-1].alternatives[0].text == "hello"
    assert "Finalize" in standins.stt_sessions[0].controls
    await stream.aclose()


async def test_deepgram_prerecorded_recognize(standins):
    standins.stt_says("I'd like", "a refund.")
    audio = rtc.combine_audio_frames(frames(tone(0.6), silence(0.5), tone(0.6), silence(0.4)))

    event = await listener(standins).recognize(audio, conn_options=NO_RETRY)
    assert event.type == Event.FINAL_TRANSCRIPT
    assert event.alternatives[0].text == "I'd like a refund."
    assert event.alternatives[0].end_time == pytest.approx(1.7)
    assert [s.kind for s in standins.stt_sessions] == ["prerecorded"]


async def test_deepgram_closes_an_idle_socket(standins):
    standins.deepgram_idle_timeout = 0.3
    stream = listener(standins).stream(conn_options=NO_RETRY)  # sends no audio

    with pytest.raises(APIStatusError) as closed:
        await events_until(stream, Event.START_OF_SPEECH)
    assert closed.value.status_code == 1011  # NET-0001


# ── ElevenLabs ───────────────────────────────────────────────────────────────────────────────


async def test_elevenlabs_synthesize_gives_pcm_as_long_as_the_text(standins):
    tts = voice(standins)
    lengths = {}
    for text in ("Hi.", "Thanks for calling Acme, how can I help you today?"):
        async with tts.synthesize(text) as stream:
            audio = [event.frame async for event in stream]
        assert {f.sample_rate for f in audio} == {44100}
        lengths[text] = seconds(audio)
        pcm = np.frombuffer(b"".join(bytes(f.data) for f in audio), np.int16)
        assert np.abs(pcm).max() > 5000  # a tone, not silence

    # the plugin's emitter ends the audio with 10 ms of its own
    assert lengths == {text: pytest.approx(len(text) * MS_PER_CHAR / 1000 + 0.01, abs=0.001)
                       for text in lengths}  # fmt: skip
    assert [(t.protocol, t.text, t.model, t.output_format) for t in standins.tts_texts] == [
        ("http", text, "eleven_multilingual_v2", "pcm_44100") for text in lengths
    ]
    await tts.aclose()


async def test_elevenlabs_stream_gives_audio_and_word_timings(standins):
    tts = voice(standins)
    text = "Thanks for calling Acme. How can I help you today?"
    async with tts.stream() as stream:
        stream.push_text(text)
        stream.flush()
        stream.end_input()
        audio = [event.frame async for event in stream]

    [record] = standins.tts_texts
    assert (record.protocol, record.text, record.socket) == ("ws", text, 1)
    # the text as the plugin sends it: a sentence, flushed, then a space ending it
    assert record.audio_seconds == pytest.approx((len(text) + 1) * MS_PER_CHAR / 1000, abs=1e-4)
    assert seconds(audio) == pytest.approx(record.audio_seconds, abs=0.001)
    words = [w for f in audio for w in f.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]
    assert "".join(w for w in words).strip() == text
    assert (words[0].start_time, words[1].start_time) == pytest.approx((0.0, 0.455))
    await tts.aclose()


async def test_elevenlabs_shares_one_socket_until_it_is_idle(standins):
    tts = voice(standins, inactivity_timeout=1)
    for pause in (0.0, 1.2):  # ElevenLabs closes a socket idle for inactivity_timeout s
        await asyncio.sleep(pause)
        await first_tts_ws(standins, PATIENT, tts)
        await first_tts_ws(standins, PATIENT, tts)

    assert [t.socket for t in standins.tts_texts] == [1, 1, 2, 2]
    await tts.aclose()


async def test_elevenlabs_declines_mp3(standins):
    tts = voice(standins, encoding="mp3_44100_128")
    with pytest.raises(APIStatusError) as declined:
        async with tts.synthesize("Hello.", conn_options=NO_RETRY) as stream:
            [_ async for _ in stream]
    assert declined.value.status_code == 422


# ── Faults ───────────────────────────────────────────────────────────────────────────────────


async def first_llm(standins: ProviderStandIns, options: APIConnectOptions) -> None:
    model = openai.LLM(model="gpt-4o", base_url=standins.openai_base_url, api_key="x")
    try:
        async with model.chat(chat_ctx=chat("Hello?"), conn_options=options) as stream:
            async for chunk in stream:
                if chunk.delta and chunk.delta.content:
                    return
    finally:
        await model.aclose()


async def first_stt(standins: ProviderStandIns, options: APIConnectOptions) -> None:
    async with listener(standins).stream(conn_options=options) as stream:
        push(stream, tone(0.4), silence(0.4))
        await events_until(stream, Event.START_OF_SPEECH)


async def first_tts_http(standins: ProviderStandIns, options: APIConnectOptions) -> None:
    tts = voice(standins)
    async with tts.synthesize("Hello there.", conn_options=options) as stream:
        await stream.__anext__()


async def first_tts_ws(
    standins: ProviderStandIns, options: APIConnectOptions, tts: elevenlabs.TTS | None = None
) -> None:
    own = tts or voice(standins)
    try:
        async with own.stream(conn_options=options) as stream:
            stream.push_text("Hello there.")
            stream.end_input()
            audio = [event async for event in stream]
        assert audio
    finally:
        if tts is None:
            await own.aclose()


FIRST_OUTPUT = {
    "llm": first_llm,
    "stt": first_stt,
    "tts_http": first_tts_http,
    "tts_ws": first_tts_ws,
}


async def timed(
    provider: Provider, standins: ProviderStandIns, options: APIConnectOptions
) -> float:
    """Seconds from the real client's request to the provider's first output: a text chunk,
    a speech event, the first audio (over the websocket: all of its 0.8 s, sent at once)."""
    started = time.monotonic()
    await FIRST_OUTPUT[provider](standins, options)
    return time.monotonic() - started


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_fail_makes_the_client_raise_the_status_at_once(standins, provider):
    standins.fault(provider, "fail")
    started = time.monotonic()
    with pytest.raises(APIStatusError) as failed:
        await timed(provider, standins, NO_RETRY)
    assert failed.value.status_code == 500
    assert time.monotonic() - started < 0.4


@pytest.mark.parametrize(
    ("provider", "error"),
    [("llm", APITimeoutError), ("stt", APIConnectionError), ("tts_ws", APITimeoutError)],
)
async def test_stall_times_out_after_the_conn_options_timeout(standins, provider, error):
    standins.fault(provider, "stall")
    started = time.monotonic()
    with pytest.raises(error) as stalled:
        await timed(provider, standins, NO_RETRY)
    assert type(stalled.value) is error
    assert 0.45 < time.monotonic() - started < 1.0


async def test_stall_of_the_tts_http_stream_outlasts_the_conn_options_timeout(standins):
    """livekit-plugins-elevenlabs ChunkedStream bounds its POST by aiohttp's total=30 s only
    (``sock_connect`` is the conn_options timeout): a stalled answer holds it for 30 s."""
    standins.fault("tts_http", "stall")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(timed("tts_http", standins, NO_RETRY), 1.0)
    assert [t.text for t in standins.tts_texts] == ["Hello there."]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_slow_delays_the_first_output_by_its_seconds(standins, provider):
    on_time = await timed(provider, standins, PATIENT)
    assert on_time < 0.3
    standins.fault(provider, "slow", 0.6)
    # by its 0.6 s once, not twice (a busy machine adds to both runs alike)
    assert 0.6 <= await timed(provider, standins, PATIENT) < on_time + 0.6 + 0.5


async def test_faults_reach_open_sockets(standins):
    tts = voice(standins)
    await first_tts_ws(standins, PATIENT, tts)  # opens the shared socket
    standins.fault("tts_ws", "stall")
    started = time.monotonic()
    with pytest.raises(APIStatusError) as stalled:  # the plugin wraps its own timeout so
        await first_tts_ws(standins, NO_RETRY, tts)
    assert 0.45 < time.monotonic() - started < 1.0
    assert isinstance(stalled.value.__cause__, APITimeoutError)
    standins.fault("tts_ws", "fail")
    with pytest.raises(APIStatusError) as closed:
        await first_tts_ws(standins, NO_RETRY, tts)
    assert closed.value.status_code == 1011
    assert [t.socket for t in standins.tts_texts] == [1, 1, 1]
    await tts.aclose()

    async with listener(standins).stream(conn_options=NO_RETRY) as stream:
        push(stream, tone(0.2))
        await events_until(stream, Event.START_OF_SPEECH)
        standins.fault("stt", "fail")
        push(stream, tone(0.4))
        with pytest.raises(APIStatusError) as closed:
            await events_until(stream, Event.FINAL_TRANSCRIPT)
    assert closed.value.status_code == 1011
