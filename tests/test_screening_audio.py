"""The audio model of who answers the human's phone (standins/voices.py), checked against the real
Silero VAD and a real AgentSession, so the model cannot drift from what the framework hears.

Two kinds of test. The first feeds each scenario's audio through a Silero VAD stream as fast as
it runs (its timestamps are audio time): every scenario, in a fraction of a second. The second
plays scenarios into real consult-style sessions (``turn_detection: "vad"``) in real time; they
run side by side in one module fixture, so the whole file takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import pytest_asyncio
from livekit import rtc
from livekit.agents import Agent, AgentSession, StopResponse, stt
from livekit.agents import vad as agents_vad
from livekit.plugins import silero

from standins.models import FINAL_DELAY, LineSTT
from standins.voices import (
    LONG_GREETING_PAUSE,
    MAILBOX_OPENING,
    MAILBOX_PAUSES,
    MAILBOX_WORDS,
    MIC_FRAME,
    MIC_RATE,
    PBX_PICKUP,
    RINGBACK_HZ,
    SCENARIOS,
    VOICEMAIL_GREETING,
    FarEnd,
    human_hello,
    scenario,
)

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the module fixture's loop

SILERO_MIN_SILENCE = 0.55  # livekit/plugins/silero/vad.py: min_silence_duration's default


# ──────────────────────────────────────────────────────────────────────────────────────────────
# What each scenario is
# ──────────────────────────────────────────────────────────────────────────────────────────────


def test_each_scenario_says_when_it_answers_and_what_is_said():
    assert {name: scenario(name).ring for name in SCENARIOS} == {
        "person": 4.0,
        "long_greeting": 4.0,
        "voicemail": 22.0,
        "pbx": 0.0,
        "silent": 4.0,
        "sam_speaking": 4.0,
        **{f"mailbox_pause_{pause:g}": 4.0 for pause in MAILBOX_PAUSES},
    }
    assert scenario("person").speech() == [pytest.approx((0.35, 0.8, "Hello?"), abs=0.01)]
    (a0, a1, first), (b0, b1, second) = scenario("long_greeting").speech()
    assert f"{first} {second}" == "Acme support, this is Dave, how can I help?"
    assert b0 - a1 == pytest.approx(LONG_GREETING_PAUSE, abs=0.001)
    assert b1 - a0 == pytest.approx(3.2, abs=0.05)
    greeting = scenario("voicemail").speech()
    assert tuple(text for _, _, text in greeting) == VOICEMAIL_GREETING
    assert greeting[0][2].startswith("Hi, you've reached Sam Jones")
    assert greeting[-1][1] - greeting[0][0] == pytest.approx(8.0, abs=0.1)
    assert scenario("pbx").speech() == [pytest.approx((6.35, 6.8, "Hello?"), abs=0.01)]
    assert scenario("silent").sounds == ()
    assert scenario("sam_speaking").speech() == [pytest.approx((0.5, 1.3, "Sam speaking"))]
    for pause in MAILBOX_PAUSES:  # the same opening as a person's, then a mailbox's words
        mailbox = scenario(f"mailbox_pause_{pause:g}")
        (a0, a1, opening), (b0, b1, words) = mailbox.speech()
        assert (opening, words) == (MAILBOX_OPENING, MAILBOX_WORDS)
        assert b0 - a1 == pytest.approx(pause, abs=0.001)
        assert mailbox.sounds[-1].text is None and mailbox.sounds[-1].at == pytest.approx(b1 + 0.5)


def _loudest_hz(pcm: np.ndarray, count: int) -> set[float]:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    hz = np.fft.rfftfreq(len(pcm), 1 / MIC_RATE)
    return {round(float(hz[i])) for i in np.argsort(spectrum)[-count:]}


def test_pbx_line_carries_ringback_until_the_person_picks_up():
    audio = scenario("pbx").audio(noise=False)
    second = MIC_RATE

    def level(start: float, end: float) -> float:
        return float(np.abs(audio[int(start * second) : int(end * second)]).max(initial=0))

    assert level(0.0, 2.0) > 3000 and level(2.0, PBX_PICKUP) == 0  # 2 s on, 4 s off
    assert _loudest_hz(audio[: 2 * second], 2) == set(RINGBACK_HZ)


def test_voicemail_beeps_after_its_greeting():
    answer = scenario("voicemail")
    beep = answer.sounds[-1]
    assert beep.text is None and beep.at - answer.speech()[-1][1] == pytest.approx(0.5)
    assert _loudest_hz(beep.pcm, 1) == {1000}


# ──────────────────────────────────────────────────────────────────────────────────────────────
# What the real Silero VAD hears in each scenario (audio time, faster than real time)
# ──────────────────────────────────────────────────────────────────────────────────────────────


def _expected_speech_runs(name: str) -> list[tuple[float, float]]:
    """The scenario's spoken parts, joined where the pause between them is shorter than the
    VAD's silence: what the VAD should report as speech."""
    runs: list[tuple[float, float]] = []
    for start, end, _ in scenario(name).speech():
        if runs and start - runs[-1][1] < SILERO_MIN_SILENCE:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


async def _vad_runs(vad: silero.VAD, pcm: np.ndarray) -> list[tuple[float, float]]:
    """Speech runs (start of speech, end of speech) as Silero reports them, in audio time."""
    stream = vad.stream()
    for i in range(0, len(pcm) - MIC_FRAME + 1, MIC_FRAME):
        chunk = pcm[i : i + MIC_FRAME].tobytes()
        stream.push_frame(rtc.AudioFrame(chunk, MIC_RATE, 1, MIC_FRAME))
    stream.end_input()
    runs: list[tuple[float, float]] = []
    start = None
    async for event in stream:
        if event.type == agents_vad.VADEventType.START_OF_SPEECH:
            start = event.timestamp
        elif event.type == agents_vad.VADEventType.END_OF_SPEECH:
            runs.append((start, event.timestamp))
    await stream.aclose()
    return runs


@in_module_loop
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_silero_hears_speech_only_where_the_scenario_speaks(silero_vad, name):
    answer = scenario(name)
    after = np.zeros(2 * MIC_RATE, np.int16)  # the line goes on: room for the end of speech
    heard = await _vad_runs(silero_vad, np.concatenate([answer.audio(), after]))
    expected = _expected_speech_runs(name)
    assert len(heard) == len(expected), (heard, expected)  # tones and pauses start no speech
    for (vad_start, vad_end), (start, end) in zip(heard, expected, strict=True):
        assert start <= vad_start <= start + 0.3
        # the VAD ends speech after its silence; the STT's final comes well before that
        assert end + FINAL_DELAY + 0.15 < vad_end <= end + SILERO_MIN_SILENCE + 0.2


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Played into real sessions, in real time
# ──────────────────────────────────────────────────────────────────────────────────────────────


class Listener(Agent):
    """A consult agent that only listens: it keeps each user turn and does not reply."""

    def __init__(self, turns: list[str], turn_taken: asyncio.Event) -> None:
        super().__init__(instructions="Listen.")
        self.turns = turns
        self.turn_taken = turn_taken

    async def on_user_turn_completed(self, turn_ctx, new_message) -> None:
        self.turns.append(new_message.text_content or "")
        self.turn_taken.set()
        raise StopResponse()


@dataclass
class Hearing:
    """What a session heard from a far end: final transcripts, user states and turns, each
    with the monotonic time it was observed."""

    far_end: FarEnd
    finals: list[tuple[float, str]] = field(default_factory=list)
    states: list[tuple[float, str]] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)

    def ends_of_speech(self) -> list[float]:
        return [at for at, state in self.states if state == "listening"]


async def _play(vad: silero.VAD, name: str, *, talks: bool, within: float) -> Hearing:
    """Play scenario ``name`` into a fresh session (real Silero VAD, ``LineSTT``, VAD turn
    detection) from the moment the leg is active: until the session has taken a user turn
    (then 0.3 s more) if the far end ``talks``, and for at most ``within`` seconds."""
    far_end = FarEnd(scenario(name))
    heard = Hearing(far_end)
    session = AgentSession(
        stt=LineSTT(),
        vad=vad,
        turn_handling={"turn_detection": "vad"},
        session_close_transcript_timeout=0.2,  # closing waits for no final (none will come)
    )
    session.on(
        "user_input_transcribed",
        lambda ev: ev.is_final and heard.finals.append((time.monotonic(), ev.transcript)),
    )
    session.on(
        "user_state_changed",
        lambda ev: heard.states.append((time.monotonic(), ev.new_state)),
    )
    far_end.attach(session)
    turn_taken = asyncio.Event()
    await session.start(agent=Listener(heard.turns, turn_taken))
    try:
        far_end.active()
        if not talks:
            await asyncio.sleep(within)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(turn_taken.wait(), within)
            await asyncio.sleep(0.3)  # anything more the session would take
    finally:
        await session.aclose()
    return heard


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def played(silero_vad) -> dict[str, Hearing]:
    """person, long_greeting, silent and the PBX's first ringback burst, side by side."""
    cases = {
        "person": dict(talks=True, within=5.0),
        "long_greeting": dict(talks=True, within=8.0),
        "silent": dict(talks=False, within=2.5),
        "pbx": dict(talks=False, within=2.5),  # ringback 0-2 s, then 0.5 s of the off phase
    }
    heard = await asyncio.gather(*(_play(silero_vad, name, **case) for name, case in cases.items()))
    return dict(zip(cases, heard, strict=True))


@in_module_loop
async def test_a_person_hello_is_transcribed_before_the_vad_ends_speech(played):
    person = played["person"]
    assert [text for _, text in person.finals] == ["Hello?"]
    assert person.turns == ["Hello?"]
    (final_at, _), (end_of_speech,) = person.finals[0], person.ends_of_speech()
    assert final_at < end_of_speech  # as Deepgram's: the text is there when the VAD ends
    (hello,) = person.far_end.spoken
    assert hello.ended_at is not None and final_at - hello.ended_at < SILERO_MIN_SILENCE


@in_module_loop
async def test_a_pause_mid_greeting_does_not_end_the_turn(played):
    greeting = played["long_greeting"]
    assert [text for _, text in greeting.finals] == [
        "Acme support, this is Dave,",
        "how can I help?",
    ]
    assert len(greeting.ends_of_speech()) == 1
    assert greeting.turns == ["Acme support, this is Dave, how can I help?"]
    assert greeting.finals[-1][0] < greeting.ends_of_speech()[0]


@in_module_loop
@pytest.mark.parametrize("name", ["silent", "pbx"])
async def test_silence_and_ringback_are_neither_speech_nor_text(played, name):
    heard = played[name]
    sent = heard.far_end.mouth.position / MIC_RATE
    assert sent >= 2.0  # the far end's audio did reach the session
    assert heard.finals == [] and heard.turns == []
    assert "speaking" not in [state for _, state in heard.states]


@in_module_loop
async def test_the_far_end_sends_nothing_until_the_leg_is_active():
    far_end = FarEnd(scenario("person"))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(far_end.mouth), 0.1)  # pre-answer audio is dropped
    far_end.active()
    frame = await asyncio.wait_for(anext(far_end.mouth), 0.1)
    assert (frame.sample_rate, frame.samples_per_channel) == (MIC_RATE, MIC_FRAME)
    assert far_end.mouth.position == MIC_FRAME


@in_module_loop
async def test_what_the_human_says_later_is_transcribed_in_deepgram_order():
    far_end = FarEnd(scenario("silent"))
    transcriber = LineSTT(final_delay=0.05)
    stream = transcriber.stream()
    far_end.active()
    yes = far_end.say(human_hello().saying("Yes."), after=0.1)
    while not yes.done.is_set():
        stream.push_frame(await anext(far_end.mouth))
    assert yes.started_at - far_end.active_at == pytest.approx(0.1, abs=0.03)
    assert yes.ended_at - yes.started_at == pytest.approx(human_hello().duration, abs=0.03)
    events = []
    async for event in stream:
        events.append((event.type, event.alternatives[0].text if event.alternatives else ""))
        if event.type == stt.SpeechEventType.END_OF_SPEECH:
            break
    await stream.aclose()
    kinds = stt.SpeechEventType
    assert events == [
        (kinds.START_OF_SPEECH, ""),
        (kinds.FINAL_TRANSCRIPT, "Yes."),
        (kinds.END_OF_SPEECH, ""),
    ]


@in_module_loop
async def test_audio_sent_before_the_session_listens_is_lost():
    far_end = FarEnd(scenario("person"))
    far_end.active()
    await asyncio.sleep(0.3)  # no one reads: no subscriber, nothing buffered
    await anext(far_end.mouth)
    assert far_end.mouth.position / MIC_RATE == pytest.approx(0.3, abs=0.04)
