"""What stands in for the world outside the worker, for the tests and the benchmark alike.

Both import from here (``from standins.models import ScriptedLLM``, ``from standins import
phones``), and nothing here imports ``tests`` or ``bench``: one home, one direction.

In process:

- ``fake_livekit``: LiveKit's server and SIP service, as their sources behave (the fast tests).
- ``models``: the scripted language model, speech-to-text and text-to-speech a call runs with
  offline (``ScriptedLLM``, ``LineSTT``, ``ToneTTS``).
- ``voices``: recorded speech (``audio/``), the earpiece (``Ear``), who answers the human's phone
  (``scenario``) and the far end of the human's leg (``FarEnd``).

Over the network, for a worker in its own process:

- ``providers``: OpenAI, Deepgram and ElevenLabs on one local server, speaking their protocols.
- ``phones``: SIP phones (SIPp) for the caller and the human; ``recordings`` reads what they
  heard from a packet capture.
- ``real_stack``: the real livekit-server and livekit-sip those phones and providers meet (the one
  thing here that is not a stand-in: it lives here because the benchmark at the phones runs on it
  too).
"""

from __future__ import annotations

from typing import Any, TypeVar

Service = TypeVar("Service", bound="Served")


class Served:
    """A local server the tests start and stop, or use as ``async with``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: Service) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
