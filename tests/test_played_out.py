"""What the real line plays outside a session, as the far end hears it: the opener has been
heard to its end when ``play_to_human`` returns (the consult session speaks next), and paused
hold music stops at once (the agent is speaking). No server is needed: a real
``rtc.AudioSource`` sends in real time to an ``rtc.AudioStream`` on its own local track."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import TEST_BOUNDS, livekit_settings, write_wav
from livekit import rtc
from livekit.agents.testing import fake_job_context
from test_consult_url import framework_job_context

import warm_handoff as wh


class LocalRoom:
    """An ``rtc.Room`` as the line uses it, connected to nothing: it keeps each published track,
    to be heard through ``rtc.AudioStream.from_track``."""

    def __init__(self) -> None:
        self.name = "fake-room"
        self.tracks: dict[str, rtc.LocalAudioTrack] = {}
        self.unpublished: list[str] = []
        self.local_participant = self
        self.remote_participants: dict[str, Any] = {}

    async def connect(self, url: str, token: str, *args: Any, **kwargs: Any) -> None:
        pass

    async def publish_track(self, track: rtc.LocalAudioTrack, options: Any = None) -> Any:
        self.tracks[track.name] = track
        return SimpleNamespace(sid=f"TR_{track.name}", name=track.name)

    async def unpublish_track(self, sid: str) -> None:
        self.unpublished.append(sid)

    async def disconnect(self) -> None:
        pass

    def isconnected(self) -> bool:
        return True

    def on(self, event: str, callback: Any = None) -> Any:
        return callback


class Ear:
    """Hears one track as the far end does: when each 10 ms of it arrives, and whether it was
    sound or silence."""

    def __init__(self, track: rtc.LocalAudioTrack) -> None:
        self.heard: list[tuple[float, bool]] = []
        self._stream = rtc.AudioStream.from_track(track=track, sample_rate=48000, num_channels=1)
        self._task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        async for event in self._stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            self.heard.append((time.monotonic(), bool(samples.size and np.abs(samples).max())))

    def sounds(self, after: float = 0.0) -> list[float]:
        return [at for at, sound in self.heard if sound and at > after]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._stream.aclose()


def tone(seconds: float, rate: int = 24000) -> list[rtc.AudioFrame]:
    """A prepared phrase (the TTS's rate, 20 ms frames), every sample audible."""
    frame = (np.ones(rate // 50, dtype=np.int16) * 3000).tobytes()
    return [rtc.AudioFrame(frame, rate, 1, rate // 50) for _ in range(round(seconds * 50))]


class ConsultSession:
    """The consult session, as far as opening the room goes."""

    async def start(self, **kwargs: Any) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_the_opener_has_been_heard_to_its_end_when_play_to_human_returns(
    livekit, monkeypatch
):
    """The consult session's next words must not start over the opener's tail. The framework's
    BackgroundAudioPlayer said "played" when its mixer had read the last frame, with ~0.6 s of
    it still queued (voice/background_audio.py)."""
    server, _ = livekit  # RoomService (closing the consult room deletes it)
    ctx = framework_job_context(server.url)  # a job's token: the agent's identity
    rooms: list[LocalRoom] = []
    monkeypatch.setattr(wh.rtc, "Room", lambda: rooms.append(LocalRoom()) or rooms[-1])
    line = wh.LiveKitPhoneLine(ctx, livekit_settings(server), bounds=TEST_BOUNDS)
    consult = "fake-room-consult-1"
    await line.open_consult(consult, "transfer_1", ConsultSession(), agent=None)  # type: ignore[arg-type]
    [track] = rooms[0].tracks.values()
    ear = Ear(track)
    try:
        started = time.monotonic()
        await line.play_to_human(consult, "Hello.", tone(1.0))
        returned = time.monotonic()
        await asyncio.sleep(0.8)  # whatever is still to come
    finally:
        await ear.aclose()
        await line.close_consult(consult)
    heard = ear.sounds()
    assert heard[0] - started < 0.1
    assert heard[-1] - heard[0] == pytest.approx(1.0, abs=0.05)  # all of it, in real time
    assert heard[-1] <= returned + 0.02  # heard to its end (to one 10 ms chunk) ...
    assert returned - heard[-1] < 0.1  # ... and the next words need not wait longer


@pytest.fixture
def loud_clip(tmp_path) -> str:
    """Hold music in which every sample is audible: two seconds of a constant level."""
    return write_wav(tmp_path / "hold.wav", np.full(96000, 3000))


async def test_paused_hold_music_stops_at_once_and_resumes(loud_clip):
    """Hold music pauses while the agent speaks: the music already queued must not sound over
    the speech. (The framework's player kept playing ~0.6 s of it.)"""
    room = LocalRoom()
    with fake_job_context(room=room) as ctx:  # type: ignore[arg-type]
        line = wh.LiveKitPhoneLine(ctx, wh.Settings(hold_audio_file=loud_clip), TEST_BOUNDS)
        await line.start_hold_music()
        [track] = room.tracks.values()
        ear = Ear(track)
        try:
            await asyncio.sleep(1.0)
            assert ear.sounds()  # the music is on
            paused = time.monotonic()
            line.pause_hold_music(True)
            await asyncio.sleep(1.0)
            resumed = time.monotonic()
            line.pause_hold_music(False)
            await asyncio.sleep(0.5)
        finally:
            await line.stop_hold_music()
            await ear.aclose()
    after_pause = [at for at in ear.sounds(after=paused) if at < resumed]
    assert not after_pause or after_pause[-1] - paused < 0.05, after_pause[-1] - paused
    assert ear.sounds(after=resumed)[0] - resumed < 0.1  # and it comes back at once
    assert room.unpublished == [f"TR_{track.name}"]  # a call may hold again: no stale track


async def test_an_announcement_is_heard_to_its_end_on_a_track_of_its_own():
    """At shutdown after the merge the caller's session can say nothing (parked or closed): the
    ending is played in the caller's room on a track of its own, heard in full in real time
    before ``announce`` returns, and the track leaves the room after it."""
    room = LocalRoom()
    with fake_job_context(room=room) as ctx:  # type: ignore[arg-type]
        line = wh.LiveKitPhoneLine(ctx, wh.Settings(), TEST_BOUNDS)
        played = asyncio.ensure_future(line.announce(line.caller_room, wh.CALL_ENDING, tone(1.0)))
        await asyncio.sleep(0)
        [track] = room.tracks.values()
        ear = Ear(track)
        try:
            started = time.monotonic()
            await asyncio.wait_for(played, 3)
            returned = time.monotonic()
            await asyncio.sleep(0.5)
        finally:
            await ear.aclose()
    heard = ear.sounds()
    assert heard[0] - started < 0.1
    assert heard[-1] - heard[0] == pytest.approx(1.0, abs=0.05)  # all of it, in real time
    assert heard[-1] <= returned + 0.02
    assert room.unpublished == [f"TR_{track.name}"]  # off the room once said
