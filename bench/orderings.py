"""The "sequential" reference ordering: the order LiveKit's ``WarmTransferTask`` uses.

Announce ("please hold"), then hold audio and the consult session, then dial; once the human
has said hello, ask the model for the brief, then speak it.

Only the order differs from "warm handoff": everything else (the consult session, hold, the
keypad, the merge, the clean-up) is the project's own ``Handoff`` running unchanged. It plugs in
through the module's two seams: the receptionist builds its attempts with
``WarmHandoffAgent(..., handoff_factory=SequentialHandoff)``, and a handoff builds its consult
agent with ``Handoff.consult_agent``. The order is imposed from outside, so this keeps working
as ``warm_handoff.py`` evolves:

- the phone line the handoff sees holds the consult room until the announcement has been
  spoken and hold audio started, and holds the dial until the consult session is up;
- the consult agent ignores the brief composed while ringing and asks the model when the human
  has said hello.

The "seed" ordering is ``bench/seed_agent.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from livekit.agents import llm

import warm_handoff as wh


class SequentialConsultAgent(wh.ConsultAgent):
    """A ``ConsultAgent`` that composes the brief with the model only once the human has said
    hello (``compose`` is set by ``_InOrder.open_consult``, once the caller has been told)."""

    compose: Any = None  # () -> Awaitable[str]
    _composing = False

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any
    ) -> Any:
        if not self.brief_started.is_set() and not self._composing and self.compose:
            self._composing = True
            self._brief = asyncio.ensure_future(self.compose())
        async for chunk in super().llm_node(chat_ctx, tools, model_settings):
            yield chunk


class _InOrder:
    """The handoff's view of the phone line, imposing the sequential order on it."""

    def __init__(self, line: wh.PhoneLine, handoff: wh.Handoff) -> None:
        self._line = line
        self._handoff = handoff
        self.announced = asyncio.Event()
        self._opened = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._line, name)

    async def open_consult(self, room: str, human_identity: str, session: Any, agent: Any) -> None:
        await self.announced.wait()
        h = self._handoff
        if isinstance(agent, SequentialConsultAgent):
            agent._brief.cancel()  # composed while ringing: not in this ordering
            transcript = wh.conversation_transcript(h.session.history)
            agent.compose = lambda: wh.compose_brief(
                h.models.llm, transcript, h.reason, h.settings, h.destination, h.ring_timeout
            )
        try:
            await self._line.open_consult(room, human_identity, session, agent)
        finally:
            self._opened.set()

    async def dial(self, dial: wh.Dial) -> wh.Leg:
        await self.announced.wait()
        await self._opened.wait()
        return await self._line.dial(dial)


class SequentialHandoff(wh.Handoff):
    """A ``Handoff`` run in the sequential order (``handoff_factory`` of the receptionist)."""

    def __init__(self, *, line: wh.PhoneLine, **kwargs: Any) -> None:
        self.in_order = _InOrder(line, self)
        super().__init__(line=self.in_order, **kwargs)  # type: ignore[arg-type]
        self.hold.announce_and_hold = self._hold_then_dial  # type: ignore[method-assign]

    async def _hold_then_dial(self) -> None:
        """The caller's hold, letting the consult room open and the dial go out once
        announced."""
        try:
            await wh.CallerHold.announce_and_hold(self.hold)
        finally:
            self.in_order.announced.set()

    def consult_agent(self, brief: asyncio.Future[str], transcript: str) -> wh.ConsultAgent:
        return SequentialConsultAgent.for_attempt(self, brief, transcript)
