"""Who answers the human's phone, as audio: shared by the tests and the benchmark.

- Recorded speech (``Speech``, ``standins/audio``) and an earpiece that plays what a session says
  in real time (``Ear``).
- The answer scenarios (``AnswerScenario``, ``scenario(name)``, ``SCENARIOS``): what the far
  end of the human's leg sends once the call is answered, spliced from the two recordings, with
  tones where the line carries tones. Each says how long the phone rings before the far end
  answers, the audio after the answer, and the text a speech-to-text hears in each spoken part.
- The far end of the leg (``FarEnd``): plays a scenario into a consult ``AgentSession`` in real
  time from the moment the leg is ``active`` and hears what the session says.

Plugging a scenario into a consult session (the phone-line fake does this)::

    far_end = FarEnd(scenario("voicemail"))
    far_end.attach(session)   # session.input.audio / session.output.audio
    ...                       # the fake server waits scenario.ring, then the leg answers
    far_end.active()          # at sip.callStatus == "active" (after the DTMF, if any)

The session needs ``stt=LineSTT()`` (``standins/models.py``, the scripted models) and a real VAD
(``silero.VAD.load()``).

The words and the audio. Only two recordings exist (``hello.wav``: "Hello?", 0.45 s;
``caller.wav``: "My printer shows error E4. Can I talk to support?", 3.15 s), so longer speech
is spliced from their parts: the VAD hears real speech with each scenario's lengths and pauses,
and the words come from the script. Every frame the far end sends carries, in its
``userdata``, the spoken part it belongs to (``SPOKEN_KEY``); ``LineSTT`` reads that to know
what was said and when each part ended, so tones and silence are never transcribed, and a frame
the framework replaces by silence (speech discarded while the agent's speech is
uninterruptible) is not heard.
"""

from __future__ import annotations

import asyncio
import functools
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice import io

AUDIO_DIR = Path(__file__).resolve().parent / "audio"
MIC_RATE = 16_000  # what the simulated phones send (16 kHz mono, 20 ms frames)
MIC_FRAME = MIC_RATE // 50


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Recorded speech
# ──────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Speech:
    """A short recording (16 kHz mono int16) and what is said in it."""

    text: str
    pcm: np.ndarray

    @property
    def duration(self) -> float:
        return len(self.pcm) / MIC_RATE

    @classmethod
    def load(cls, name: str, text: str) -> Speech:
        with wave.open(str(AUDIO_DIR / name), "rb") as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (MIC_RATE, 1, 2):
                raise ValueError(f"{name} must be 16 kHz mono 16-bit")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return cls(text, pcm)

    def cut(self, start: float, end: float | None, text: str) -> Speech:
        """The part of the recording from ``start`` to ``end`` seconds, said as ``text``."""
        stop = None if end is None else int(end * MIC_RATE)
        return Speech(text, self.pcm[int(start * MIC_RATE) : stop])

    def saying(self, text: str) -> Speech:
        """The same audio, scripted to say ``text``."""
        return Speech(text, self.pcm)


def human_hello() -> Speech:
    return Speech.load("hello.wav", "Hello?")


def caller_request() -> Speech:
    return Speech.load("caller.wav", "My printer shows error E4. Can I talk to support?")


# caller.wav has one long pause, 1.53-1.90 s (digital silence), between its two sentences
SENTENCE_BREAK = (1.53, 1.90)


@functools.cache
def _sentences() -> tuple[Speech, Speech]:
    """caller.wav's two sentences: 1.53 s and 1.25 s of speech, no silence at either end."""
    whole = caller_request()
    return (
        whole.cut(0.0, SENTENCE_BREAK[0], "My printer shows error E4."),
        whole.cut(SENTENCE_BREAK[1], None, "Can I talk to support?"),
    )


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Ears
# ──────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Heard:
    """One frame as the listener heard it: when it started and ended playing, and its tag."""

    start: float
    end: float
    tag: int

    @property
    def audible(self) -> bool:
        """Speech from the bench's fake TTS (tags start at 1000); the framework's padding and
        other audio (e.g. a clip played in a room) have other first samples."""
        return self.tag >= 1000


@dataclass
class _Segment:
    start: float
    pushed: float = 0.0
    end: float = 0.0
    interrupted: bool = False
    task: asyncio.Task[None] | None = None


class Ear(io.AudioOutput):
    """A phone's earpiece: the session's audio output, played at real-time pace.

    A frame of N ms starts playing when it arrives or when the previous frame ends, whichever is
    later, and ends N ms after that. Each segment reports ``playback_finished`` when its last
    frame has played (or at once, interrupted, on ``clear_buffer``), as a real sink does, so the
    framework's speech handles complete at the right time."""

    def __init__(self, label: str, *, record: bool = True) -> None:
        super().__init__(
            label=label,
            capabilities=io.AudioOutputCapabilities(pause=False),
            sample_rate=None,  # no resampling: frames arrive exactly as the TTS made them
        )
        self.heard: list[Heard] = []
        self._record = record
        self._playhead = 0.0
        self._current: _Segment | None = None
        self._playing: list[_Segment] = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        now = time.monotonic()
        start = max(now, self._playhead)
        if self._current is None:
            self._current = _Segment(start)
            self.on_playback_started(created_at=time.time() + (start - now))
        end = start + frame.duration
        if self._record:
            self.heard.append(Heard(start, end, abs(int(frame.data[0])) if len(frame.data) else 0))
        self._playhead = end
        self._current.pushed += frame.duration

    def flush(self) -> None:
        super().flush()
        segment, self._current = self._current, None
        if segment is None:
            return
        if segment.interrupted:
            self.on_playback_finished(playback_position=0.0, interrupted=True)
            return
        segment.end = self._playhead
        segment.task = asyncio.get_running_loop().create_task(self._finish(segment))
        self._playing.append(segment)

    async def _finish(self, segment: _Segment) -> None:
        await asyncio.sleep(max(0.0, segment.end - time.monotonic()))
        self._playing.remove(segment)
        self.on_playback_finished(playback_position=segment.pushed, interrupted=False)

    def clear_buffer(self) -> None:
        now = time.monotonic()
        if self._record:
            while self.heard and self.heard[-1].start >= now:
                self.heard.pop()
            if self.heard and self.heard[-1].end > now:
                self.heard[-1].end = now
        self._playhead = min(self._playhead, now)
        for segment in self._playing:
            if segment.task is not None:
                segment.task.cancel()
            played = max(0.0, min(now, segment.end) - segment.start)
            self.on_playback_finished(playback_position=played, interrupted=True)
        self._playing.clear()
        if self._current is not None:
            self._current.interrupted = True  # reported when the framework flushes it


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Answer scenarios
# ──────────────────────────────────────────────────────────────────────────────────────────────

RINGBACK_HZ = (440.0, 480.0)  # North American ringback: 440 + 480 Hz, 2 s on, 4 s off
RINGBACK_CADENCE = (2.0, 4.0)
RINGBACK_LEVEL = 0.08  # per tone, of full scale (about -19 dBm0 each)
BEEP_HZ = 1000.0  # a voicemail's record tone
BEEP_SECONDS = 0.5
BEEP_LEVEL = 0.25
LINE_NOISE = 10.0  # the line's noise floor: Gaussian, in int16 units (about -70 dBFS)


@dataclass(frozen=True)
class Sound:
    """Something the far end sends, ``at`` seconds after the leg is active. ``text`` is what a
    speech-to-text hears in it; None for a tone (ringback and beeps are never transcribed)."""

    at: float
    pcm: np.ndarray
    text: str | None

    @property
    def end(self) -> float:
        return self.at + len(self.pcm) / MIC_RATE


@dataclass(frozen=True)
class AnswerScenario:
    """Who answers the human's phone. ``ring``: seconds from the INVITE to the answer (the fake
    server's 200 OK); ``sounds``: what the far end sends after the leg is ``active`` (times from
    then); after the last sound the line carries only its noise floor."""

    name: str
    ring: float
    sounds: tuple[Sound, ...]
    about: str

    @property
    def transcripts(self) -> tuple[str, ...]:
        """The final transcripts ``LineSTT`` returns, one per spoken part, in order."""
        return tuple(s.text for s in self.sounds if s.text is not None)

    @property
    def duration(self) -> float:
        """Seconds from ``active`` to the end of the last sound."""
        return max((s.end for s in self.sounds), default=0.0)

    def speech(self) -> list[tuple[float, float, str]]:
        """The spoken parts: (start, end, text), seconds from ``active``."""
        return [(s.at, s.end, s.text) for s in self.sounds if s.text is not None]

    def audio(self, *, noise: bool = True) -> np.ndarray:
        """The far end's audio from ``active`` to the end of the last sound (int16)."""
        line = _mix(np.zeros(int(round(self.duration * MIC_RATE)), np.float32), self.sounds)
        if noise:
            line += np.random.default_rng(0).normal(0.0, LINE_NOISE, len(line))
        return _pcm16(line)


def tone(hz: Iterable[float], seconds: float, level: float) -> np.ndarray:
    """A sum of sine waves, each at ``level`` of full scale (int16)."""
    t = np.arange(int(seconds * MIC_RATE)) / MIC_RATE
    wave_ = sum(np.sin(2 * np.pi * f * t) for f in hz) * level * 32767
    return _pcm16(np.asarray(wave_, dtype=np.float32))


def ringback(until: float) -> tuple[Sound, ...]:
    """Ringback from ``active`` until ``until`` seconds: 2 s of 440 + 480 Hz every 6 s."""
    on, off = RINGBACK_CADENCE
    bursts, at = [], 0.0
    while at < until:
        bursts.append(Sound(at, tone(RINGBACK_HZ, min(on, until - at), RINGBACK_LEVEL), None))
        at += on + off
    return tuple(bursts)


def _spoken(at: float, speech: Speech, text: str) -> Sound:
    return Sound(at, speech.pcm, text)


def person() -> AnswerScenario:
    """A person picks up after 4 s of ringing and says "Hello?" (0.45 s), ending 0.8 s after
    the answer; then listens in silence."""
    hello = human_hello()
    return AnswerScenario(
        "person",
        ring=4.0,
        sounds=(_spoken(0.8 - hello.duration, hello, "Hello?"),),
        about="a person: 'Hello?' ending 0.8 s after the answer",
    )


LONG_GREETING_PAUSE = 0.4


def long_greeting() -> AnswerScenario:
    """A person picks up after 4 s and, from 0.5 s, says "Acme support, this is Dave," (1.53 s:
    caller.wav's first sentence), pauses 0.4 s, then "how can I help?" (1.25 s: its second):
    3.18 s of greeting ending 3.68 s after the answer. Two spoken parts, so two finals; the pause
    is shorter than the VAD's default silence, so the VAD hears one turn."""
    first, second = _sentences()
    tail_at = 0.5 + first.duration + LONG_GREETING_PAUSE
    return AnswerScenario(
        "long_greeting",
        ring=4.0,
        sounds=(
            _spoken(0.5, first, "Acme support, this is Dave,"),
            _spoken(tail_at, second, "how can I help?"),
        ),
        about="a person: 'Acme support, this is Dave, how can I help?', 3.2 s with a 0.4 s pause",
    )


VOICEMAIL_RING = 22.0
VOICEMAIL_GREETING = (
    "Hi, you've reached Sam Jones.",
    "I can't take your call right now.",
    "Please leave your name, your number",
    "and a short message after the tone,",
    "and I'll get back to you as soon as I can.",
)


def voicemail() -> AnswerScenario:
    """The voicemail server answers after 22 s of ringing. From 0.5 s its greeting plays: five
    parts ("Hi, you've reached Sam Jones." ...), caller.wav's sentences in turn (1.53, 1.25,
    1.53, 1.25, 1.53 s) with 0.25 s between them: 8.09 s, ending at 8.59 s. The pauses are
    shorter than the VAD's silence, so the VAD hears one 8 s utterance; the STT sends a final per
    part. Then 0.5 s of silence and the beep (1 kHz, 0.5 s), then silence while it records."""
    first, second = _sentences()
    sounds, at = [], 0.5
    for i, text in enumerate(VOICEMAIL_GREETING):
        speech = first if i % 2 == 0 else second
        sounds.append(_spoken(at, speech, text))
        at += speech.duration + 0.25
    beep_at = sounds[-1].end + 0.5
    sounds.append(Sound(beep_at, tone((BEEP_HZ,), BEEP_SECONDS, BEEP_LEVEL), None))
    return AnswerScenario(
        "voicemail",
        ring=VOICEMAIL_RING,
        sounds=tuple(sounds),
        about="a voicemail: answers after 22 s, 8 s greeting, then the beep",
    )


PBX_PICKUP = 6.0


def pbx() -> AnswerScenario:
    """A PBX auto-attendant answers at once (ring 0 s). After the DTMF (the extension) the leg is
    ``active`` while the PBX rings the extension: the line carries ringback (440 + 480 Hz, 2 s on,
    4 s off). The person picks up 6 s after ``active``, as the second ring would start, and says
    "Hello?", ending 0.8 s later (6.8 s)."""
    hello = human_hello()
    return AnswerScenario(
        "pbx",
        ring=0.0,
        sounds=(
            *ringback(PBX_PICKUP),
            _spoken(PBX_PICKUP + 0.8 - hello.duration, hello, "Hello?"),
        ),
        about="a PBX: answers at once, ringback, the person says hello 6 s later",
    )


def silent() -> AnswerScenario:
    """A person picks up after 4 s and says nothing: the line carries only its noise."""
    return AnswerScenario("silent", ring=4.0, sounds=(), about="a person who says nothing")


def sam_speaking() -> AnswerScenario:
    """A person picks up after 4 s and says "Sam speaking" (0.8 s: the start of caller.wav's
    first sentence), ending 1.3 s after the answer; then listens in silence."""
    first, _ = _sentences()
    return AnswerScenario(
        "sam_speaking",
        ring=4.0,
        sounds=(_spoken(0.5, first.cut(0.0, 0.8, "Sam speaking"), "Sam speaking"),),
        about="a person: 'Sam speaking' ending 1.3 s after the answer",
    )


MAILBOX_PAUSES = (0.5, 1.0, 1.5, 2.0)  # s: a mailbox that opens like a person, then its words
MAILBOX_OPENING = "Hi, this is Sam Jones at Acme support."
MAILBOX_WORDS = "Please leave a message after the tone."


def mailbox_like_a_person(pause: float) -> AnswerScenario:
    """A mailbox whose greeting opens like a person: the voicemail server answers after 4 s and,
    from 0.5 s, says "Hi, this is Sam Jones at Acme support." (1.53 s: caller.wav's first
    sentence, no mailbox words), pauses ``pause`` s, says "Please leave a message after the
    tone." (1.25 s: its second); then 0.5 s of silence, the beep, and silence while it
    records. A pause from 0.55 s (the VAD's silence) ends the VAD's turn after the first
    sentence; from 1.5 s (the detector's silence after speech) the detector may say "human"
    on the first sentence alone."""
    first, second = _sentences()
    words_at = 0.5 + first.duration + pause
    beep_at = words_at + second.duration + 0.5
    return AnswerScenario(
        f"mailbox_pause_{pause:g}",
        ring=4.0,
        sounds=(
            _spoken(0.5, first, MAILBOX_OPENING),
            _spoken(words_at, second, MAILBOX_WORDS),
            Sound(beep_at, tone((BEEP_HZ,), BEEP_SECONDS, BEEP_LEVEL), None),
        ),
        about=f"a mailbox opening like a person, {pause:g} s before its mailbox words",
    )


SCENARIOS: dict[str, Callable[[], AnswerScenario]] = {
    "person": person,
    "sam_speaking": sam_speaking,
    "long_greeting": long_greeting,
    "voicemail": voicemail,
    "pbx": pbx,
    "silent": silent,
    **{
        f"mailbox_pause_{pause:g}": functools.partial(mailbox_like_a_person, pause)
        for pause in MAILBOX_PAUSES
    },
}


def scenario(name: str) -> AnswerScenario:
    return SCENARIOS[name]()


def _mix(line: np.ndarray, sounds: Iterable[Sound], offset: int = 0) -> np.ndarray:
    for sound in sounds:
        start = offset + int(round(sound.at * MIC_RATE))
        line[start : start + len(sound.pcm)] += sound.pcm.astype(np.float32)
    return line


def _pcm16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples), -32768, 32767).astype(np.int16)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# The far end of the human's leg
# ──────────────────────────────────────────────────────────────────────────────────────────────

SPOKEN_KEY = "standins.voices.spoken"  # frame.userdata[SPOKEN_KEY] = (Spoken, is its last frame)


@dataclass(eq=False)
class Spoken:
    """A spoken part as it was sent: its text, its samples from ``active``, and when (monotonic
    clock) its first sample started and its last sample ended playing into the session."""

    text: str
    start: int
    end: int
    started_at: float | None = None
    ended_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class LineAudio(io.AudioInput):
    """The far end's audio as the session receives it. Nothing before ``start`` (the SIP bridge
    drops pre-answer audio: livekit/sip pkg/sip/outbound.go ``IgnorePreanswerData``), then 20 ms
    frames at 16 kHz, each when its 20 ms have passed, carrying the line's noise floor under
    whatever was mixed in, until ``stop``. Audio sent before the session first reads is lost (no
    one was subscribed); after that a late read gets the buffered frames at once (an
    ``rtc.AudioStream`` queues them), so the stream never drifts from the clock."""

    def __init__(self, label: str = "far-end", *, noise: float = LINE_NOISE) -> None:
        super().__init__(label=label)
        self.spoken: list[Spoken] = []
        self.started_at: float | None = None
        self._line = np.zeros(0, np.float32)  # what is to be sent, from ``start``
        self._sent = 0  # samples sent so far
        self._noise = noise
        self._rng = np.random.default_rng(0)
        self._started = asyncio.Event()
        self._stopped = False
        self._read = False

    @property
    def position(self) -> int:
        """The next sample to be sent, counted from ``start``."""
        return self._sent

    def mix(self, sounds: Iterable[Sound], offset: int = 0) -> list[Spoken]:
        """Mix ``sounds`` into the line ``offset`` samples after ``start``; returns the spoken
        ones, as they will be tracked."""
        sounds = list(sounds)
        end = max((offset + int(round(s.end * MIC_RATE)) for s in sounds), default=0)
        if end > len(self._line):
            self._line = np.concatenate([self._line, np.zeros(end - len(self._line), np.float32)])
        _mix(self._line, sounds, offset)
        added = []
        for sound in sounds:
            if sound.text is not None:
                start = offset + int(round(sound.at * MIC_RATE))
                added.append(Spoken(sound.text, start, start + len(sound.pcm)))
        self.spoken = sorted(self.spoken + added, key=lambda s: s.start)
        return added

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
            self._started.set()

    def stop(self) -> None:
        """No more frames (the far end hung up)."""
        self._stopped = True

    async def __anext__(self) -> rtc.AudioFrame:
        await self._started.wait()
        if self._stopped:
            await asyncio.get_running_loop().create_future()  # a hung-up leg sends nothing
        assert self.started_at is not None
        if not self._read:  # what played before anyone listened is gone
            self._read = True
            missed = int((time.monotonic() - self.started_at) * MIC_RATE) // MIC_FRAME
            self._sent = max(0, missed - 1) * MIC_FRAME
        begin, end = self._sent, self._sent + MIC_FRAME
        due = self.started_at + end / MIC_RATE
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        samples = np.zeros(MIC_FRAME, np.float32)
        if begin < len(self._line):
            chunk = self._line[begin:end]
            samples[: len(chunk)] = chunk
        if self._noise:
            samples += self._rng.normal(0.0, self._noise, MIC_FRAME)
        frame = rtc.AudioFrame(_pcm16(samples).tobytes(), MIC_RATE, 1, MIC_FRAME)
        self._sent = end
        now = time.monotonic()
        for spoken in self.spoken:
            if spoken.start < end and spoken.end > begin:
                last = spoken.end <= end
                frame.userdata[SPOKEN_KEY] = (spoken, last)
                if spoken.started_at is None:
                    spoken.started_at = now - (end - spoken.start) / MIC_RATE
                if last:
                    spoken.ended_at = now - (end - spoken.end) / MIC_RATE
                    spoken.done.set()
                break
        return frame


class FarEnd:
    """The far end of the human's leg: the scenario's audio into the consult session, from the
    moment the leg is ``active``, and an ``Ear`` for what the session says to it."""

    def __init__(self, answer: AnswerScenario, *, label: str = "human") -> None:
        self.answer = answer
        self.mouth = LineAudio(label)
        self.ear = Ear(label)
        self.mouth.mix(answer.sounds)

    def attach(self, session: Any) -> None:
        """Make this leg the session's audio: what it hears and where it speaks."""
        session.input.audio = self.mouth
        session.output.audio = self.ear

    def active(self) -> None:
        """The leg is active (``sip.callStatus`` became ``active``): the scenario starts now.
        Calling it again changes nothing."""
        self.mouth.start()

    @property
    def active_at(self) -> float | None:
        return self.mouth.started_at

    @property
    def spoken(self) -> list[Spoken]:
        """Every spoken part, the scenario's and ``say``'s, in order, with when it was sent."""
        return self.mouth.spoken

    def say(self, speech: Speech, *, after: float = 0.0) -> Spoken:
        """The human says ``speech`` (its ``text`` is what the STT hears) ``after`` seconds from
        now, over whatever the line is sending; ``await spoken.done.wait()`` for its end."""
        offset = self.mouth.position + int(after * MIC_RATE)
        (spoken,) = self.mouth.mix([_spoken(0.0, speech, speech.text)], offset)
        return spoken

    def hang_up(self) -> None:
        self.mouth.stop()
