"""Call fixtures: the real AgentSession, driven offline by the scripted models
(``bench/models.py``, shared with the benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fake_livekit import API_KEY, API_SECRET, FakeLiveKitServer, RoomEvent
from livekit.agents import AgentSession, utils
from livekit.agents.testing import fake_job_context
from livekit.agents.voice.io import TextOutput
from livekit.plugins import silero

import warm_handoff as wh
from bench.models import Call, Reply, Request, ScriptedLLM  # shared with the benchmark


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - polls state the framework owns
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def settings_for(**overrides: Any) -> wh.Settings:
    destinations = (
        wh.Destination(
            "support",
            "+15105550100",
            "Technical support",
            extension="1234",
            spoken_name="our support team",
        ),
        wh.Destination(
            "billing",
            "sip:billing@pbx.example.com",
            "Invoices and refunds",
            ring_timeout=12.0,
            spoken_name="our billing team",
        ),
    )
    base: dict[str, Any] = dict(
        livekit_url="http://127.0.0.1:7880",
        livekit_api_key="devkey",
        livekit_api_secret="secret",
        sip_trunk_id="ST_trunk123",
        caller_id="+15105550999",
        destinations=destinations,
        handoff_mode=wh.HandoffMode.CONSULT,
        ring_timeout=20.0,
        hello_grace=0.5,
        max_hold=10.0,
        business_name="Acme",
        greeting="Thanks for calling Acme.",
        rejoin_window=0.0,  # the safety net after the merge: tests/test_safety_net.py
    )
    base.update(overrides)
    return wh.Settings(**base)


def receptionist(
    transfer_to: str = "support",
    reason: str = "printer is broken",
    *,
    brief: str | None = None,
    consult: Callable[[Request], Reply | None] | None = None,
    amd_label: str = "human",
):
    """A model that: asks the caller to confirm, transfers on 'yes', echoes the caller's words as
    the brief, and lets ``consult`` answer the human."""

    def respond(req: Request) -> Reply | None:
        if req.purpose == "brief":
            said = req.chat_ctx.messages()[-1].text_content or ""
            callers = [line for line in said.splitlines() if line.startswith("Caller:")]
            return brief if brief is not None else "Summary: " + " ".join(callers)
        if req.purpose == "amd":  # what the answering-machine detection's model concludes
            return Call("save_prediction", {"label": amd_label})
        if req.purpose == "consult":
            return consult(req) if consult else "Anything else?"
        text = req.last_user_text().lower()
        if text.startswith("yes") and not req.after_tool:
            return Call("transfer_call", {"destination": transfer_to, "reason": reason})
        return "Shall I connect you with our support team?"

    return respond


@pytest.fixture
def text_models():
    def make(
        respond: Callable[[Request], Reply | None], **kw: Any
    ) -> tuple[wh.Models, ScriptedLLM]:
        model = ScriptedLLM(respond, **kw)
        return wh.Models(llm=model, turn_handling={"turn_detection": "manual"}), model

    return make


class CallerTranscript(TextOutput):
    """Everything the caller hears, as text, including words kept out of the chat context."""

    def __init__(self) -> None:
        super().__init__(label="caller-transcript", next_in_chain=None)
        self.lines: list[str] = []
        self._current = ""

    async def capture_text(self, text: str) -> None:
        self._current += text

    def flush(self) -> None:
        if self._current:
            self.lines.append(self._current)
        self._current = ""


@dataclass
class CallUnderTest:
    session: AgentSession
    agent: wh.WarmHandoffAgent
    line: wh.SimulatedPhoneLine
    model: ScriptedLLM
    transcript: CallerTranscript = field(default_factory=CallerTranscript)

    @property
    def spoken(self) -> list[str]:
        return self.transcript.lines

    def caller_heard(self) -> list[str]:
        return [
            m.text_content
            for m in self.session.history.messages()
            if m.role == "assistant" and m.text_content
        ]

    def human_heard(self) -> list[str]:
        return self.line.human_heard()


@pytest.fixture
async def start_call():
    """Start a caller session on the simulated line with a scripted model."""
    opened: list[CallUnderTest] = []

    async def start(
        respond,
        *,
        line: wh.SimulatedPhoneLine | None = None,
        settings: wh.Settings | None = None,
        delay: float = 0.0,
    ) -> CallUnderTest:
        model = ScriptedLLM(respond, delay=delay)
        models = wh.Models(llm=model, turn_handling={"turn_detection": "manual"})
        line = line or wh.SimulatedPhoneLine(None, ring_time=0.05)
        agent = wh.WarmHandoffAgent(settings or settings_for(), line, models)
        session = AgentSession()
        call = CallUnderTest(session, agent, line, model)
        session.output.transcription = call.transcript
        await session.start(agent=agent)
        opened.append(call)
        return call

    yield start
    for call in opened:
        await call.agent.shutdown_handoff("the test is over")
        await call.line.aclose()
        await call.session.aclose()


CALLER_ROOM = "fake-room"  # the fake job's room


class LiveKitBackedLine(wh.SimulatedPhoneLine):
    """The simulated line on the fake LiveKit server: every server call (dial, hang up, move,
    delete room) goes through ``LiveKitPhoneLine`` and the real client to the fake, and who is
    in which room is what the server's participant events say, as the agent's room connections
    would see them (a SIP participant present from the INVITE, gone on BYE or removal, a moving
    human absent from both rooms for a moment). Media (hold audio, the consult session's
    audio) stays simulated: there is no media server here."""

    def __init__(self, lk: wh.LiveKitPhoneLine, server: FakeLiveKitServer) -> None:
        super().__init__(None, caller_room=lk.caller_room)
        self.lk = lk
        self.server = server
        self.hooks: dict[str, Callable[[], Any]] = {}  # "dial" / "answered" / "move"
        self.rooms = {
            room: set(members) for room, members in server.rooms.items() if self._ours(room)
        }
        self._unsubscribe = server.subscribe(None, self._on_event)

    def _ours(self, room: str) -> bool:
        """This call's rooms: the caller's and its consult rooms (other calls share the server)."""
        return room == self.caller_room or room.startswith(f"{self.caller_room}-consult-")

    def _on_event(self, ev: RoomEvent) -> None:
        if not self._ours(ev.room):
            return
        if ev.kind == "participant_connected":
            self.rooms.setdefault(ev.room, set()).add(ev.identity)
            self._left.pop(ev.identity, None)
        elif ev.kind == "participant_disconnected":
            self._remove(ev.room, ev.identity)
        elif ev.kind == "room_deleted":
            for identity in list(self.rooms.get(ev.room, ())):
                self._remove(ev.room, identity)
            self.rooms.pop(ev.room, None)
            self.deleted_rooms.append(ev.room)
        elif ev.changed.get("sip.callStatus") == "active":
            self.answered.set()

    async def _hook(self, name: str) -> None:
        if (hook := self.hooks.pop(name, None)) is not None:
            result = hook()
            if asyncio.iscoroutine(result):
                await result

    async def dial(self, dial):
        self.dials.append(dial)
        try:
            await self._hook("dial")
            leg = await self.lk.dial(dial)
        except asyncio.CancelledError:
            self.cancelled_dials.append(dial.identity)
            raise
        await self._hook("answered")
        return leg

    async def hang_up(self, leg):
        await self.lk.hang_up(leg)

    async def move(self, leg, room):
        await self._hook("move")
        await self.lk.move(leg, room)

    async def delete_room(self, room):
        await self.lk.delete_room(room)

    def hang_up_human(self) -> None:
        """The human's phone hangs up (BYE)."""
        for room, members in list(self.server.rooms.items()):
            if not self._ours(room):
                continue
            for identity in [i for i in members if i.startswith("transfer_")]:
                self._log("the human hangs up")
                self.server.far_end_hangs_up(room, identity)

    def hang_up_caller(self) -> None:
        self._log("the caller hangs up")
        if self.caller_identity in self.server.rooms.get(self.caller_room, {}):
            self.server.remove_participant(self.caller_room, self.caller_identity)

    async def settle(self, timeout: float = 2 * wh.SERVER_CALL_BOUND) -> None:
        """Clean-up steps run on this line and on the LiveKit line it wraps (stop ringing)."""
        await asyncio.gather(super().settle(timeout), self.lk.settle(timeout))

    async def aclose(self) -> None:
        self._unsubscribe()
        await super().aclose()


@pytest.fixture
async def livekit(monkeypatch):
    async with FakeLiveKitServer() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.add_participant(CALLER_ROOM, "caller")
        async with utils.http_context.open():
            with fake_job_context() as ctx:
                yield server, ctx


async def start_livekit_call(
    livekit, respond=None, *, caller_number: str | None = None, **settings
):
    """A caller's session on the LiveKit-backed line, through the fake server (the ``livekit``
    fixture): returns (session, agent, line); the test closes the session."""
    server, ctx = livekit
    config = settings_for(
        livekit_url=server.url, livekit_api_key=API_KEY, livekit_api_secret=API_SECRET, **settings
    )
    line = LiveKitBackedLine(wh.LiveKitPhoneLine(ctx, config), server)
    if caller_number is not None:
        line.caller_number = caller_number
    agent = wh.WarmHandoffAgent(
        config,
        line,
        wh.Models(
            llm=ScriptedLLM(respond or receptionist()), turn_handling={"turn_detection": "manual"}
        ),
    )
    session = wh.CallerSession()
    await session.start(agent=agent)
    return session, agent, line


async def shut_down_like_the_framework(session: AgentSession, line: wh.PhoneLine, callbacks=()):
    """A job shutdown in livekit-agents' order (``ipc/job_proc_lazy_main.py``,
    ``_shutdown_job``): the primary session is closed first (``session.aclose()``, given up to
    60 s), then the room is disconnected (no participant-left events follow), then the
    shutdown callbacks run."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(session.aclose(), 60)
    if isinstance(line, wh.SimulatedPhoneLine):
        line.drop_connection(line.caller_room)
    for callback in callbacks:
        await callback("shutdown")


@pytest.fixture(scope="session")
def silero_vad() -> silero.VAD:
    """The real Silero VAD, loaded once: the ear of a session that hears a far end
    (``bench.voices.FarEnd``), with its default silence (0.55 s)."""
    return silero.VAD.load()
