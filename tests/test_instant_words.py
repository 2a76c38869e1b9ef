"""Instant words: the fixed sentences play from a cache folder on the worker host.

Every call here is a real ``AgentSession`` whose TTS is ``ToneTTS`` (standins/models.py: a tone
tagged per sentence after a fixed time to first audio), counting what it is asked to synthesise,
and whose caller hears through ``Ear`` (standins/voices.py: real-time playback, each frame
timestamped). A call is one job process: it gets its own ``PhraseCache`` object and its own
TTS; only the folder is shared between calls, as on a worker host.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    CallerTranscript,
    RecordingLine,
    ScriptedLLM,
    receptionist,
    settings_for,
    wait_for,
)
from livekit.agents import Agent, AgentSession, APIConnectOptions, APIStatusError, tts
from livekit.agents.testing import fake_job_context
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.plugins import elevenlabs
from test_records_off_the_loop import MAX_LAG, LoopLag

import warm_handoff as wh
from standins.models import TTS_RATE, UTTERANCES, ToneTTS
from standins.voices import Ear

TTFA = 0.15  # the fake TTS's time to first audio
GREETING = "Thanks for calling Acme. How can I help?"


class CountingTTS(ToneTTS):
    """``ToneTTS`` that records every text it is asked to synthesise; the first ``fail``
    requests fail as ElevenLabs does on a rejected key or exhausted quota: HTTP 401, which
    the framework does not retry (livekit-agents ``_exceptions.py`` ``APIStatusError``)."""

    def __init__(self, *, voice: str = "alice", fail: int = 0) -> None:
        super().__init__(ttfa=TTFA, chars_per_second=300)
        self.voice = voice  # the TTS_VOICE_ID it was configured with
        self.synthesized: list[str] = []
        self.fail = fail

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        self.synthesized.append(text)
        if self.fail:
            self.fail -= 1
            return _Refused(tts=self, input_text=text, conn_options=conn_options)
        return super().synthesize(text, conn_options=conn_options)


class _Refused(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=uuid.uuid4().hex[:12],
            sample_rate=TTS_RATE,
            num_channels=1,
            mime_type="audio/pcm",
        )
        await asyncio.sleep(0.01)
        raise APIStatusError("quota exceeded", status_code=401)


@dataclass
class Greeted:
    session: wh.CallerSession
    ear: Ear
    tts: CountingTTS
    first_frame: float | None  # seconds from the greeting's say() to its first frame heard
    line: wh.SimulatedPhoneLine

    async def end(self) -> None:
        """The caller hangs up, then the session closes (nobody is left to tell anything)."""
        self.line.hang_up_caller()
        await self.session.aclose()

    @property
    def heard(self) -> tuple[list[str], int]:
        """What the caller heard: the sentences (read from each frame's tag), and for how long
        in all (ms)."""
        tags: list[int] = []
        for h in self.ear.heard:
            if h.audible and (not tags or tags[-1] != h.tag):
                tags.append(h.tag)
        duration = sum(h.end - h.start for h in self.ear.heard)
        return [UTTERANCES.text(tag) for tag in tags], round(duration * 1000)


async def greet(folder, tts_model: CountingTTS, greeting: str = GREETING) -> Greeted:
    """One call on the worker host: ``run_call`` answers and greets; the caller listens until
    the greeting is over (it is in the history once played, or once it failed)."""
    settings = settings_for(
        greeting=greeting, phrase_cache=str(folder), tts_voice_id=tts_model.voice
    )
    models = wh.Models(
        llm=ScriptedLLM(lambda req: "Sure."),
        tts=tts_model,
        turn_handling={"turn_detection": "manual"},
        phrases=wh.PhraseCache(settings.phrase_cache, wh.voice_of(settings)),
    )
    ear = Ear("caller")
    with fake_job_context() as ctx:
        session = await wh.run_call(ctx, settings, models)
        line = session.current_agent.line
        assert isinstance(line, wh.SimulatedPhoneLine)  # a fake job's, as the console's
        # The greeting is scheduled; its speech task reads the session's audio output when it
        # first runs, which is after this line (a room's output is set at start, like this).
        session.output.audio = ear
        said = time.monotonic()
        # over: it played (or its synthesis began), and nothing is being said any more
        await wait_for(
            lambda: (ear.heard or tts_model.synthesized) and session.current_speech is None, 5
        )
        await wait_for(lambda: not ear.heard or time.monotonic() >= ear.heard[-1].end, 5)
    audible = [h for h in ear.heard if h.audible]
    first = audible[0].start - said if audible else None
    return Greeted(session, ear, tts_model, first, line)


def saved(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix == ".pcm")


async def test_the_first_call_synthesises_live_and_saves_a_later_call_plays_it_at_once(tmp_path):
    first = await greet(tmp_path, CountingTTS())
    await first.end()
    assert first.tts.synthesized == ["Thanks for calling Acme.", "How can I help?"]
    assert first.first_frame >= TTFA  # not ready yet: the caller waits for the synthesis
    assert len(saved(tmp_path)) == 1
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # renamed into place

    later = await greet(tmp_path, CountingTTS())  # another job process on the same host
    await later.end()
    assert later.tts.synthesized == []  # no synthesis at all
    assert later.first_frame <= 0.03  # the goal for a later call
    assert later.heard == first.heard  # the same audio: first call's tags, as long
    assert later.heard[0] == ["Thanks for calling Acme.", "How can I help?"]
    assert [m.text_content for m in later.session.history.messages()] == [GREETING]


async def test_a_changed_greeting_or_voice_never_plays_a_stale_sentence(tmp_path):
    await (await greet(tmp_path, CountingTTS(voice="alice"))).end()

    other_voice = await greet(tmp_path, CountingTTS(voice="bob"))
    await other_voice.end()
    assert other_voice.tts.synthesized == ["Thanks for calling Acme.", "How can I help?"]

    changed = await greet(tmp_path, CountingTTS(voice="alice"), "Acme, good morning.")
    await changed.end()
    assert changed.tts.synthesized == ["Acme, good morning."]
    assert len(saved(tmp_path)) == 3

    again = await greet(tmp_path, CountingTTS(voice="bob"))
    await again.end()
    assert again.tts.synthesized == []  # each voice keeps its own


async def test_a_failed_synthesis_saves_nothing_and_the_call_goes_on(tmp_path):
    call = await greet(tmp_path, CountingTTS(fail=1))
    try:
        assert call.tts.synthesized == ["Thanks for calling Acme."]  # refused, not retried
        assert call.ear.heard == []  # as a failed say(text): nothing to hear, nothing said
        assert list(tmp_path.iterdir()) == []  # nothing saved, no temporary file left
        # the call goes on: the next fixed sentence is synthesised live, heard and saved
        speech = wh.say_fixed(call.session, GREETING, call.session.current_agent.models.phrases)
        await asyncio.wait_for(speech.wait_for_playout(), 5)
        assert any(h.audible for h in call.ear.heard)
        assert [m.text_content for m in call.session.history.messages()] == [GREETING]
        assert len(saved(tmp_path)) == 1
    finally:
        await call.end()


async def test_a_partial_or_corrupt_file_is_never_played(tmp_path):
    first = await greet(tmp_path, CountingTTS())
    await first.end()
    (path,) = saved(tmp_path)
    whole = path.read_bytes()

    path.write_bytes(whole[: len(whole) // 2])  # cut short
    cut = await greet(tmp_path, CountingTTS())
    await cut.end()
    assert cut.tts.synthesized == ["Thanks for calling Acme.", "How can I help?"]
    assert cut.heard == first.heard  # all of it, live
    assert len(path.read_bytes()) == len(whole)  # and the file replaced by a whole one

    flipped = bytearray(whole)
    flipped[-1] ^= 0x01  # the right length, one bit wrong
    path.write_bytes(bytes(flipped))
    corrupt = await greet(tmp_path, CountingTTS())
    await corrupt.end()
    assert corrupt.tts.synthesized == ["Thanks for calling Acme.", "How can I help?"]

    fine = await greet(tmp_path, CountingTTS())
    await fine.end()
    assert fine.tts.synthesized == []


async def test_a_cache_that_cannot_be_written_still_lets_the_caller_hear_the_sentence(tmp_path):
    folder = tmp_path / "phrases"
    settings = settings_for(phrase_cache=str(folder))
    phrases = wh.PhraseCache(settings.phrase_cache)
    folder.rmdir()
    folder.write_text("not a folder any more")  # the disk, not the code, refuses the write
    tts_model = CountingTTS()
    models = wh.Models(llm=ScriptedLLM(lambda req: "Sure."), tts=tts_model, phrases=phrases)
    session = wh.CallerSession()
    ear = Ear("caller")
    session.output.audio = ear
    await session.start(agent=wh.WarmHandoffAgent(settings, wh.SimulatedPhoneLine(None), models))
    try:
        speech = wh.say_fixed(session, GREETING, phrases)
        await asyncio.wait_for(speech.wait_for_playout(), 5)
        assert len([h for h in ear.heard if h.audible]) > 0
        assert [m.text_content for m in session.history.messages()] == [GREETING]
        assert not phrases.usable  # the rest of this call speaks live, without trying again
    finally:
        await session.aclose()


async def test_a_folder_others_can_write_to_is_not_used(tmp_path, caplog):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)  # anyone on the host could choose what callers hear
    caplog.set_level(logging.WARNING, logger="warm-handoff")
    assert not wh.PhraseCache(str(folder)).usable
    assert any("phrase cache off" in r.getMessage() for r in caplog.records)
    call = await greet(folder, CountingTTS())
    await call.end()
    assert call.tts.synthesized and list(folder.iterdir()) == []


# ── the handoff's sentences ─────────────────────────────────────────────────────────────────


async def hold_then_hang_up(folder, tts_model: CountingTTS) -> list[str]:
    """A transfer to support that rings long enough for one check-in; the caller then hangs
    up. Returns what the caller was told, as text."""
    settings = settings_for(hold_reassure_every=0.3, phrase_cache=str(folder))
    line = RecordingLine(None, ring_time=3)
    models = wh.Models(
        llm=ScriptedLLM(receptionist()),
        tts=tts_model,
        turn_handling={"turn_detection": "manual"},
        phrases=wh.PhraseCache(settings.phrase_cache),
    )
    agent = wh.WarmHandoffAgent(settings, line, models)
    session = wh.CallerSession()
    session.output.audio = Ear("caller")
    told = CallerTranscript()  # what the caller is told, check-ins (not in the history) too
    session.output.transcription = told
    await session.start(agent=agent)
    try:
        await session.run(user_input="a person please")
        turn = asyncio.ensure_future(session.run(user_input="yes please"))
        await wait_for(lambda: line.on_hold)
        check_in = wh.HOLD_CHECK_IN.format(team="our support team")
        await wait_for(lambda: check_in in told.lines, 5)
        line.hang_up_caller()
        await asyncio.wait_for(turn, 5)
        return told.lines
    finally:
        await agent.shutdown_handoff("the test is over")
        await line.aclose()
        await session.aclose()


async def test_please_hold_and_the_check_in_play_from_the_cache_on_a_later_call(tmp_path):
    hold = wh.PLEASE_HOLD.format(team="our support team")
    check_in = wh.HOLD_CHECK_IN.format(team="our support team")

    def fixed(synthesized: list[str]) -> list[str]:
        return [t for t in synthesized if t in hold or t in check_in]

    first = CountingTTS()
    told = await hold_then_hang_up(tmp_path, first)
    assert hold in told
    assert fixed(first.synthesized) == [
        "Let me connect you with our support team.",
        "Please hold for a moment.",
        check_in,
    ]
    later = CountingTTS()
    told = await hold_then_hang_up(tmp_path, later)
    assert hold in told
    assert fixed(later.synthesized) == []  # both from the folder
    assert "Shall I connect you with our support team?" in later.synthesized  # the rest: live


async def test_the_opener_to_the_human_plays_from_the_cache_where_the_tts_is_the_sessions(
    tmp_path,
):
    """The consult session carries the TTS itself (``ConsultRoom.session_options``), not its agent:
    the cache keys and synthesises with the TTS that ``say`` would use."""
    opener = wh.OPENER.format(business="Acme")
    heard: list[list] = []
    voices = [CountingTTS(), CountingTTS()]
    for voice in voices:  # two calls on the host
        session = AgentSession(tts=voice)
        ear = Ear("human")
        session.output.audio = ear
        await session.start(agent=Agent(instructions="You brief a colleague."))
        try:
            speech = wh.say_fixed(session, opener, wh.PhraseCache(str(tmp_path)))
            await asyncio.wait_for(speech.wait_for_playout(), 5)
            heard.append([h.tag for h in ear.heard if h.audible])
        finally:
            await session.aclose()
    assert voices[0].synthesized == [opener] and voices[1].synthesized == []
    assert heard[1] and set(heard[1]) == set(heard[0])


# ── a slow disk: the cache is read and checked off the call's event loop ────────────────────

SLOW_READ = 0.2  # reading one cached sentence on a slow disk


@pytest.fixture
def slow_reads(monkeypatch):
    """Reading a cached sentence takes ``SLOW_READ``; returns the threads that read one, and
    those that hashed audio (more than a key's few hundred bytes)."""
    threads: dict[str, set[int]] = {"read": set(), "hashed": set()}
    read_bytes, sha256 = Path.read_bytes, hashlib.sha256

    def slow_read(path: Path) -> bytes:
        if path.suffix == ".pcm":
            threads["read"].add(threading.get_ident())
            time.sleep(SLOW_READ)
        return read_bytes(path)

    def noted_sha256(data: bytes = b"", **kw):
        if len(data) > 4096:
            threads["hashed"].add(threading.get_ident())
        return sha256(data, **kw)

    monkeypatch.setattr(Path, "read_bytes", slow_read)
    monkeypatch.setattr(hashlib, "sha256", noted_sha256)
    return threads


async def test_a_cached_sentence_is_read_and_checked_off_the_loop(tmp_path, slow_reads):
    """Playing a sentence from the cache on a slow disk never holds the call's loop (the
    caller's audio, the hold music): its file is read and its hash checked on a worker thread.
    (The question to the human: its audio is larger than the key that ``slow_reads`` skips.)"""
    opener = wh.ASK_PERSON.format(team="our support team")
    heard: list[list] = []
    voices = [CountingTTS(), CountingTTS()]
    for voice in voices:  # two calls on the host: the first saves, the second plays the file
        session = AgentSession(tts=voice)
        ear = Ear("human")
        session.output.audio = ear
        await session.start(agent=Agent(instructions="You brief a colleague."))
        try:
            async with LoopLag() as lag:
                speech = wh.say_fixed(session, opener, wh.PhraseCache(str(tmp_path)))
                await asyncio.wait_for(speech.wait_for_playout(), 5)
            heard.append([h.tag for h in ear.heard if h.audible])
        finally:
            await session.aclose()
        assert lag.worst < MAX_LAG, f"the loop was held for {lag.worst * 1000:.0f} ms"
    assert voices[1].synthesized == []  # played from the cache
    assert heard[1] and set(heard[1]) == set(heard[0])
    loop_thread = threading.get_ident()
    assert slow_reads["read"] and loop_thread not in slow_reads["read"]
    assert slow_reads["hashed"] and loop_thread not in slow_reads["hashed"]


async def test_the_humans_phrases_are_read_from_the_cache_off_the_loop(tmp_path, slow_reads):
    """``ConsultAgent.prepare_voice`` takes the opener, the question and the introduction from
    the cache while the phone rings; on a slow disk that never holds the call's loop."""
    settings = settings_for(phrase_cache=str(tmp_path))
    support = settings.destination("support")
    assert support is not None
    voices = [CountingTTS(), CountingTTS()]
    for voice in voices:  # two calls: the first saves the opener, question and introduction
        handoff = wh.Handoff(
            settings=settings,
            line=wh.SimulatedPhoneLine(None),
            session=AgentSession(),
            destination=support,
            reason="router keeps rebooting",
            models=wh.Models(tts=voice, phrases=wh.PhraseCache(str(tmp_path))),
        )
        brief: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        brief.set_result("Dana's router keeps rebooting.")
        consult = handoff.consult_agent(brief, "")
        async with LoopLag() as lag:
            await consult.prepare_voice(voice)
        assert set(consult.voice) == {"opener", "question", "introduction", "brief"}
    assert voices[1].synthesized == ["Dana's router keeps rebooting."]  # the rest: cached
    assert lag.worst < MAX_LAG, f"the loop was held for {lag.worst * 1000:.0f} ms"
    loop_thread = threading.get_ident()
    assert slow_reads["read"] and loop_thread not in slow_reads["read"]
    assert loop_thread not in slow_reads["hashed"]


# ── the human's phrases, said live when they could not be prepared ──────────────────────────
# (the screening end to end: tests/test_screening.py, a phrase that could not be prepared)

OPENER = wh.OPENER.format(business="Acme")


async def test_a_live_phrase_reaches_the_consult_rooms_track_at_its_rate():
    """On LiveKit the opener plays outside the consult session, on the room's ``OwnTrack``
    (its source takes 48 kHz mono): live, it is synthesised once, with one try, and all of it
    reaches the track."""
    voice = CountingTTS()  # 24 kHz, 300 characters a second
    frames = [f async for f in wh.for_the_track(wh.live_speech(voice, OPENER))]
    assert voice.synthesized == [OPENER]
    assert {(f.sample_rate, f.num_channels) for f in frames} == {(48000, 1)}
    assert sum(f.duration for f in frames) == pytest.approx(len(OPENER) / 300, abs=0.02)


async def test_live_speech_that_never_answers_is_given_up_after_the_phrases_length():
    """A live phrase with no audio in the time it takes to say is given up: the line goes on
    (the screening is never held by it) and does not claim the human heard it."""
    line = wh.SimulatedPhoneLine(None)
    started = time.monotonic()
    await line.play_to_human("consult", "Hello.", wh.live_speech(ToneTTS(ttfa=60), "Hello."))
    assert time.monotonic() - started == pytest.approx(wh.spoken_seconds("Hello."), abs=0.3)
    assert [e.text for e in line.events] == ["no audio for the human: Hello."]


# ── the key and the configuration ───────────────────────────────────────────────────────────


def test_the_key_follows_the_text_and_every_voice_setting_but_not_the_api_key(
    tmp_path, monkeypatch
):
    """The key is what ``build_models`` sets up the TTS with (``voice_of``), read from the
    configuration, never from the plugin's private options."""

    def path(text: str = GREETING, **env: str) -> str:
        settings = wh.load_settings({"ELEVEN_API_KEY": "key-one", **env}, telephony=False)
        return wh.PhraseCache(str(tmp_path), wh.voice_of(settings)).path_for(text).name

    base = path()
    assert path() == base
    assert path(ELEVEN_API_KEY="key-two") == base  # a rotated key keeps the cache
    changed = {
        "text": path("Thanks for calling Acme!"),
        "voice": path(TTS_VOICE_ID="voice-b"),
        "model": path(TTS_MODEL="eleven_flash_v2_5"),
        "encoding": path(TTS_ENCODING="pcm_24000"),
        "address": path(ELEVEN_BASE_URL="https://api.eu.residency.elevenlabs.io/v1"),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)
    monkeypatch.setattr(elevenlabs, "__version__", "9.9.9")  # the plugin's defaults may change
    assert path() != base
    settings = wh.load_settings({"ELEVEN_API_KEY": "secret-value"}, telephony=False)
    assert "secret-value" not in str(wh.voice_of(settings))


def test_the_cache_folder_is_configured_shown_and_can_be_turned_off(tmp_path, monkeypatch):
    env = {"DOTENV_FILE": "/dev/null"}
    assert wh.load_settings(env, telephony=False).phrase_cache == wh.DEFAULT_PHRASE_CACHE
    on = wh.load_settings({"HANDOFF_PHRASE_CACHE": str(tmp_path)}, telephony=False)
    off = wh.load_settings({"HANDOFF_PHRASE_CACHE": "off"}, telephony=False)
    assert (on.phrase_cache, off.phrase_cache) == (str(tmp_path), "")
    assert ("HANDOFF_PHRASE_CACHE", str(tmp_path)) in on.shown_by_check()
    assert ("HANDOFF_PHRASE_CACHE", "off") in off.shown_by_check()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(wh.ConfigError, match="HANDOFF_PHRASE_CACHE must name a folder"):
        wh.load_settings({"HANDOFF_PHRASE_CACHE": str(a_file)}, telephony=False)

    for key in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "ELEVEN_API_KEY"):
        monkeypatch.setenv(key, "test-key")
    models = wh.build_models(on, vad=None)
    assert models.phrases is not None and models.phrases.folder == tmp_path
    assert wh.build_models(off, vad=None).phrases is None
