"""Hold music pauses and resumes where it left off, and loops at the end of the clip.

``HoldMusic`` is the stream the real line hands once to ``OwnTrack.play``; there is
no media server here, so its frames are read directly and compared with the framework's own
decoding of the same file."""

import math

import numpy as np
import pytest
from conftest import write_wav
from livekit.agents.utils.audio import audio_frames_from_file
from livekit.agents.voice.background_audio import BuiltinAudioClip

import warm_handoff as wh


def samples(frame) -> np.ndarray:
    return np.frombuffer(frame.data, dtype=np.int16).copy()


async def decoded(path: str) -> np.ndarray:
    """The whole file, as the framework decodes it for the track (48 kHz mono)."""
    return np.concatenate([samples(f) async for f in audio_frames_from_file(path, 48000, 1)])


async def play(music: wh.HoldMusic, frames: int) -> np.ndarray:
    return np.concatenate([samples(await music.__anext__()) for _ in range(frames)])


@pytest.fixture
def ramp(tmp_path) -> str:
    """Half a second whose every sample differs: a sample's value says where in the clip it is."""
    return write_wav(tmp_path / "ramp.wav", np.arange(24000) - 12000)


async def test_a_pause_yields_silence_and_the_music_resumes_where_it_left_off(ramp):
    clip = await decoded(ramp)
    music = wh.HoldMusic(ramp)
    try:
        before = await play(music, 2)
        music.paused = True
        paused = await play(music, 25)  # half a second of silence
        music.paused = False
        after = await play(music, 2)
    finally:
        await music.aclose()
    assert not paused.any() and len(paused) == 24000
    heard = np.concatenate([before, after])
    assert np.array_equal(heard, clip[: len(heard)])  # the pause cut nothing and repeated nothing
    assert after[0] == before[-1] + 1  # the next sample of the ramp, not its opening


async def test_the_clip_loops_at_its_end_and_pauses_keep_their_place_across_the_loop(ramp):
    clip = await decoded(ramp)
    music = wh.HoldMusic(ramp)
    heard = []
    try:
        for _ in range(8):
            heard.append(await play(music, 3))
            music.paused = True
            assert not (await play(music, 3)).any()
            music.paused = False
    finally:
        await music.aclose()
    heard = np.concatenate(heard)
    rounds = len(heard) // len(clip) + 1
    assert rounds > 2  # went round the clip more than twice
    assert np.array_equal(heard, np.tile(clip, rounds)[: len(heard)])


async def test_the_builtin_hold_clip_resumes_where_it_left_off():
    path = BuiltinAudioClip.HOLD_MUSIC.path()  # the packaged .ogg, 44.1 kHz stereo
    music = wh.HoldMusic(path)
    try:
        before = await play(music, 400)
        music.paused = True
        await play(music, 10)
        music.paused = False
        after = await play(music, 400)
    finally:
        await music.aclose()
    frames = [f async for f in audio_frames_from_file(path, 48000, 1)]
    audible = next(i for i, f in enumerate(frames) if wh.rms(f) >= wh.HoldMusic.LEAD_IN_RMS)
    lead_in = sum(f.samples_per_channel for f in frames[:audible]) / 48000
    assert 1.0 < lead_in < wh.HoldMusic.LEAD_IN_MAX  # its fade-in is skipped, no more
    reference = np.concatenate([samples(f) for f in frames[audible : audible + 800]])
    heard = np.concatenate([before, after])
    assert heard.any() and np.array_equal(heard, reference)


@pytest.mark.parametrize(("quiet_seconds", "bounded"), [(1.0, False), (5.0, True)])
async def test_a_quiet_opening_is_skipped_up_to_its_bound(tmp_path, quiet_seconds, bounded):
    """A fade-in reads as silence on a phone right after "please hold": the music starts where
    it is heard, but a clip that is quiet throughout still plays (after LEAD_IN_MAX)."""
    quiet = np.full(int(48000 * quiet_seconds), 100)  # -50 dBFS
    loud = np.tile([3000, -3000], 24000)
    music = wh.HoldMusic(write_wav(tmp_path / "fade.wav", np.concatenate([quiet, loud])))
    try:
        first = await play(music, 1)
    finally:
        await music.aclose()
    clip = np.concatenate([quiet, loud])
    n = len(first)  # the decoder's frame: the music starts at the frame where it is heard
    skipped = wh.HoldMusic.LEAD_IN_MAX if bounded else quiet_seconds
    start = (math.ceil if bounded else math.floor)(skipped * 48000 / n) * n
    assert np.array_equal(first, clip[start : start + n])
    assert (first == 100).all() if bounded else (first[-1] != 100)
