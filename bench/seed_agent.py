"""A seed-style phone agent: the reference the benchmark compares the worker against.

This is how a first LiveKit phone receptionist with a transfer usually looks: the model writes
the greeting, and ``transfer_call`` dials the human straight into the caller's room and waits
until they answer. There is no hold audio, no brief and no private consult; once the human
answers, the model tells both of them they are connected.

It is a complete worker module (same framework, same plugins, same prewarmed Silero VAD as
``warm_handoff.py``) so that ``bench/worker_probe.py`` can measure what it costs to import,
prewarm and run, side by side with ``warm_handoff``. It deliberately does not import
``warm_handoff``. In the benchmark the dialling is injected (``transfer=``), so the same agent
runs on the simulated phone line.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from livekit import api
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobProcess,
    RunContext,
    cli,
    function_tool,
)
from livekit.plugins import deepgram, elevenlabs, openai, silero

INSTRUCTIONS = """\
You are the phone receptionist for {business}. Answer in one or two short sentences.
When the caller wants a person, call transfer_call with the team: support or billing.
"""
GREETING_INSTRUCTIONS = "Greet the caller and ask how you can help."

Transfer = Callable[[str], Awaitable[None]]


class SeedAgent(Agent):
    """The receptionist. ``transfer(team)`` dials the team into the caller's room and returns
    once they answer."""

    def __init__(self, *, transfer: Transfer, business: str = "our company", **models: Any):
        super().__init__(instructions=INSTRUCTIONS.format(business=business), **models)
        self._transfer = transfer
        self.connected = False

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions=GREETING_INSTRUCTIONS)

    @function_tool
    async def transfer_call(self, context: RunContext, destination: str, reason: str) -> str:
        """Connect the caller with a person.

        Args:
            destination: The team: support or billing.
            reason: What the caller needs, in a few words.
        """
        await self._transfer(destination)
        self.connected = True
        return f"The caller is now connected with the {destination} team. Say so in one sentence."


server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm

TEAMS = {
    "support": os.environ.get("SEED_SUPPORT_NUMBER", "+15550100100"),
    "billing": os.environ.get("SEED_BILLING_NUMBER", "+15550100200"),
}


@server.rtc_session(agent_name="seed-agent")
async def entrypoint(ctx: JobContext) -> None:
    async def transfer(team: str) -> None:
        await ctx.api.sip.create_sip_participant(
            api.CreateSIPParticipantRequest(
                sip_trunk_id=os.environ.get("SIP_TRUNK_ID", ""),
                sip_call_to=TEAMS.get(team, TEAMS["support"]),
                room_name=ctx.room.name,
                participant_identity=f"human-{team}",
                wait_until_answered=True,
            )
        )

    session = AgentSession(
        stt=deepgram.STT(),
        llm=openai.LLM(),
        tts=elevenlabs.TTS(),
        vad=ctx.proc.userdata["vad"],
    )
    await session.start(agent=SeedAgent(transfer=transfer), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(server)
