"""A what-if, not a reference: "warm handoff" with further changes applied from outside, so
their gain is measured before they are made (``python bench/handoff_bench.py --proposed``).
Item 2 and, of item 1, the brief's first sentence (synthesised while the phone rings) are now
in ``warm_handoff.py`` (``Handoff.consult_options``, ``ConsultAgent.prepare_voice``); the rest
stays a what-if.

1. Fixed sentences are synthesised ahead of time and played from memory (``PhraseCacheTTS``):
   the greeting, and per destination "Let me connect you ... Please hold for a moment.", the
   brief's first sentence ("Hi, this is the ... assistant with a caller for ...") and "You're
   now connected with ...". Every one of them is known before the call starts, so none needs
   the TTS's first-audio latency on the caller's or the human's critical path. (In the worker:
   warmed in ``prewarm``, kept in ``proc.userdata``.)
2. The consult session ends the human's turn on the VAD (``turn_detection="vad"``, the
   framework's default VAD endpointing) instead of the default audio end-of-turn model, which
   scores a bare "Hello?" as unfinished and waits its maximum delay (2.5 s) before the brief.
3. Optionally (``--proposed-silence S``) the consult session gets its own Silero VAD that ends
   speech after S seconds of silence instead of the prewarmed VAD's 0.55 s, and an endpointing
   delay of S instead of the VAD mode's default 0.5 s: how close to the physical limit the
   hello's endpointing can go.

As in ``bench/orderings.py``, the project's own ``Handoff`` runs unchanged: this only changes
the TTS the sessions use and the turn handling the consult session is built with.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from livekit import rtc
from livekit.agents import APIConnectOptions, tokenize, tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

import warm_handoff as wh

PROPOSED = "proposed"


def fixed_phrases(settings: wh.Settings) -> list[str]:
    """The sentences the agent says whatever the caller said."""
    phrases = [settings.greeting]
    for d in settings.destinations:
        phrases += [
            f"Let me connect you with {d.said_as}. Please hold for a moment.",
            f"Hi, this is the {settings.business_name} assistant with a caller for {d.said_as}.",
            f"You're now connected with {d.said_as}.",
        ]
    return phrases


class PhraseCacheTTS(tts.TTS):
    """Wraps a non-streaming TTS; sentences synthesised by ``warm()`` are returned from memory
    at once, anything else goes to the wrapped TTS."""

    def __init__(self, inner: tts.TTS, phrases: list[str]) -> None:
        super().__init__(
            capabilities=inner.capabilities,
            sample_rate=inner.sample_rate,
            num_channels=inner.num_channels,
        )
        self._inner = inner
        tokenizer = tokenize.blingfire.SentenceTokenizer()
        self._sentences = [s.strip() for p in phrases for s in tokenizer.tokenize(p)]
        self._cache: dict[str, list[rtc.AudioFrame]] = {}

    async def warm(self) -> None:
        for sentence in self._sentences:
            if sentence not in self._cache:
                async with self._inner.synthesize(sentence) as stream:
                    self._cache[sentence] = [audio.frame async for audio in stream]

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        frames = self._cache.get(text.strip())
        if frames is None:
            return self._inner.synthesize(text, conn_options=conn_options)
        return _Cached(tts=self, input_text=text, conn_options=conn_options, frames=frames)


class _Cached(tts.ChunkedStream):
    def __init__(self, *, frames: list[rtc.AudioFrame], **kw: Any) -> None:
        super().__init__(**kw)
        self._frames = frames

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=uuid.uuid4().hex[:12],
            sample_rate=self._tts.sample_rate,
            num_channels=self._tts.num_channels,
            mime_type="audio/pcm",
        )
        for frame in self._frames:
            output_emitter.push(bytes(frame.data))
        output_emitter.flush()


class ProposedHandoff(wh.Handoff):
    def adopt(self, consult_vad: tuple[Any, float] | None) -> None:
        """``consult_vad``: (a Silero VAD, its min silence) for the consult session, or None."""
        turn_handling = dict(self.models.turn_handling or {})
        turn_handling["turn_detection"] = "vad"
        vad = self.models.vad
        if consult_vad is not None:  # its own silence, and the same endpointing delay
            vad, silence = consult_vad
            turn_handling["endpointing"] = {"min_delay": silence}
        self.models = replace(self.models, turn_handling=turn_handling, vad=vad)


class ProposedAgent(wh.WarmHandoffAgent):
    """The project's receptionist with the proposed consult session (see the module doc); its
    models should carry a warmed ``PhraseCacheTTS`` (``proposed_models``)."""

    consult_vad: tuple[Any, float] | None = None

    @property  # type: ignore[override]
    def handoff(self) -> wh.Handoff | None:
        return self.__dict__.get("_bench_handoff")

    @handoff.setter
    def handoff(self, value: wh.Handoff | None) -> None:
        if value is not None and type(value) is wh.Handoff:
            value.__class__ = ProposedHandoff
            value.adopt(self.consult_vad)  # type: ignore[attr-defined]
        self.__dict__["_bench_handoff"] = value


async def proposed_models(models: wh.Models, settings: wh.Settings) -> wh.Models:
    """``models`` with a phrase cache around the TTS, warmed (what ``prewarm`` would do)."""
    cached = PhraseCacheTTS(models.tts, fixed_phrases(settings))
    await cached.warm()
    return replace(models, tts=cached)
