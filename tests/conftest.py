"""Call fixtures: the real AgentSession, driven offline by the scripted models
(``standins/models.py``, shared with the benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from livekit.agents import AgentSession, utils
from livekit.agents.testing import fake_job_context
from livekit.agents.voice.io import AudioOutput, TextOutput
from livekit.plugins import silero

import warm_handoff as wh
from standins.fake_livekit import API_KEY, API_SECRET, FakeLiveKitServer, RoomEvent
from standins.models import Call, Reply, Request, ScriptedLLM  # shared with the benchmark


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - polls state the framework owns
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def settings_for(**overrides: Any) -> wh.Settings:
    destinations = (
        wh.Destination(  # a direct line (an extension's DTMF: tests/test_handoff_on_livekit.py)
            "support",
            "+15105550100",
            "Technical support",
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


def brief_model_down(req: Request) -> Reply | None:
    """The receptionist, with the model that writes the brief failing."""
    if req.purpose == "brief":
        raise RuntimeError("model down")
    return receptionist()(req)


def callback_request(
    reason: str = "router keeps rebooting", summary: str = "Dana's router reboots."
) -> wh.CallbackRequest:
    """Dana's callback request (room, name, number, best time, reason, summary, source)."""
    return wh.CallbackRequest(
        "room-1", "Dana", "+15105550199", "after 5pm", reason, summary, "caller"
    )


def records_kept_in(path: Path) -> wh.CallRecords:
    """Room-1's records, with no webhook: callback requests go to the file at ``path``."""
    return wh.CallRecords("room-1", "job-1", wh.RecordDelivery("", "", str(path)))


def saved(path: Path) -> list[dict[str, Any]]:
    """The records in a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


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


class RecordingLine(wh.SimulatedPhoneLine):
    """The simulated line, keeping what tests read and the console does not need: every dial
    (and which were cancelled while ringing), deleted room and attribute set, and when the
    human's phone is answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dials: list[wh.Dial] = []
        self.cancelled_dials: list[str] = []  # identities whose phone stopped ringing
        self.deleted_rooms: list[str] = []
        self.attributes: dict[str, dict[str, str]] = {}  # room -> the agent's attributes there
        self.answered = asyncio.Event()

    async def dial(self, dial: wh.Dial) -> wh.Leg:
        self.dials.append(dial)
        try:
            leg = await super().dial(dial)
        except asyncio.CancelledError:
            self.cancelled_dials.append(dial.identity)
            raise
        self.answered.set()
        return leg

    async def delete_room(self, room: str) -> None:
        existed = room in self.rooms
        await super().delete_room(room)
        if existed:
            self.deleted_rooms.append(room)

    async def set_attributes(self, room: str, attributes: Mapping[str, str]) -> None:
        self.attributes.setdefault(room, {}).update(attributes)

    @property
    def on_hold(self) -> bool:
        return self.hold_music != "off"

    def human_heard(self) -> list[str]:
        """Everything said to the human so far, in order."""
        said = [e.text for e in self.events]
        return [t.removeprefix("human hears: ") for t in said if t.startswith("human hears: ")]

    def human_heard_anything(self) -> bool:
        return bool(self.human_heard())

    def legs(self) -> list[str]:
        """Every human leg still connected anywhere."""
        return sorted(
            i for members in self.rooms.values() for i in members if i != self.caller_identity
        )

    async def human_answers(self, hello: str = "Hello?") -> None:
        """The human's phone is answered and they say ``hello``; returns once they are told
        something new (the brief)."""
        await wait_for(self.answered.is_set)
        heard = len(self.human_heard())
        self.human_says(hello)
        await wait_for(lambda: len(self.human_heard()) > heard)

    async def human_accepts(self, hello: str = "Hello?") -> None:
        """The human answers, hears the brief and presses 1."""
        await self.human_answers(hello)
        self.human_presses("1")


@dataclass
class CallUnderTest:
    session: AgentSession
    agent: wh.WarmHandoffAgent
    line: RecordingLine
    model: ScriptedLLM
    transcript: CallerTranscript = field(default_factory=CallerTranscript)

    @property
    def spoken(self) -> list[str]:
        return self.transcript.lines

    def caller_heard(self) -> list[str]:
        return [text for text in assistant_said(self.session) if text]

    def human_heard(self) -> list[str]:
        return self.line.human_heard()


@pytest.fixture
async def start_call():
    """Start a caller session on the simulated line with a scripted model."""
    opened: list[CallUnderTest] = []

    async def start(
        respond,
        *,
        line: RecordingLine | None = None,
        settings: wh.Settings | None = None,
        delay: float = 0.0,
        records: wh.CallRecords | None = None,
    ) -> CallUnderTest:
        model = ScriptedLLM(respond, delay=delay)
        models = wh.Models(llm=model, turn_handling={"turn_detection": "manual"})
        line = line or RecordingLine(None, ring_time=0.05)
        agent = wh.WarmHandoffAgent(settings or settings_for(), line, models, records)
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


ROOT = Path(__file__).resolve().parent.parent
CALLER_ROOM = "fake-room"  # the fake job's room
# What a worker writes beside a relative HANDOFF_CALLBACK_FILE (the default): a test writes
# them only under its temporary folders, never in the repository or where pytest runs.
WORKER_LEFTOVERS = ("callback_requests.jsonl", "outbox")


@pytest.fixture(autouse=True)
def nothing_left_in_the_repository():
    def present() -> set[Path]:
        return {
            f / name for f in {ROOT, Path.cwd()} for name in WORKER_LEFTOVERS if (f / name).exists()
        }

    before = present()
    yield
    assert present() <= before, f"left behind: {sorted(map(str, present() - before))}"


# What a call on the fake server waits out, shorter than production's where a test would sit
# through it: the remove retried after a cancelled dial that never joined (a late join, 0.5 s
# at most here, is still caught), the look for a human lost in a move (the fake moves in
# 0.2 s), the silence after "Is this ...?", and a closing session's wait for a last transcript
# that will not come; and the server is asked whether a dial rang as often as the fake's
# quick rings need (its phones ring 0.01 s after the INVITE, and the tests' fail 0.3 s later).
TEST_BOUNDS = wh.Bounds(remove_retry=1.0, locate=1.0, confirm=2.0, last_words=0.2, ring_check=0.05)


class LiveKitBackedLine(RecordingLine):
    """The simulated line on the fake LiveKit server: every server call (dial, hang up, move,
    delete room) goes through ``LiveKitPhoneLine`` and the real client to the fake, and who is
    in which room is what the server's participant events say, as the agent's room connections
    would see them (a SIP participant present from the INVITE, gone on BYE or removal, a moving
    human absent from both rooms for a moment). Media (hold audio, the consult session's
    audio) stays simulated: there is no media server here."""

    def __init__(self, lk: wh.LiveKitPhoneLine, server: FakeLiveKitServer) -> None:
        super().__init__(None, caller_room=lk.caller_room, bounds=lk.bounds)
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
            self.participant_joined(ev.room, ev.identity)
        elif ev.kind == "participant_disconnected":
            self.participant_left(ev.room, ev.identity)
        elif ev.kind == "room_deleted":
            for identity in list(self.rooms.get(ev.room, ())):
                self.participant_left(ev.room, identity)
            self.rooms.pop(ev.room, None)
            self.deleted_rooms.append(ev.room)
        elif ev.changed.get("sip.callStatus") == "active":
            self.answered.set()
        elif ev.changed.get("sip.callStatus") == "hangup":  # gone, as LiveKitPhoneLine has it
            self.participant_left(ev.room, ev.identity)

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

    @property
    def join_way(self) -> wh.JoinWay:
        """The LiveKit line's memory of a refusal (its marker file), else the test's
        ``first_way``: the fake's local URL would always bridge on the LiveKit line."""
        if self.move_refused or self.lk.move_refused:
            return wh.JoinWay.BRIDGE
        return self.first_way

    def move_unsupported(self) -> None:
        super().move_unsupported()
        self.lk.move_unsupported()

    async def move(self, leg, room):
        await self._hook("move")
        await self.lk.move(leg, room)

    async def bridge(self, leg, room):
        """The relays are media, simulated here; who is where is the server's."""
        await self._hook("bridge")
        await super().bridge(leg, room)

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

    async def settle(self, timeout: float | None = None) -> None:
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


class LiveKitCall(NamedTuple):
    session: wh.CallerSession
    agent: wh.WarmHandoffAgent
    line: LiveKitBackedLine


def livekit_settings(server: FakeLiveKitServer, **overrides: Any) -> wh.Settings:
    """The test settings, pointed at the fake LiveKit server."""
    return settings_for(
        livekit_url=server.url, livekit_api_key=API_KEY, livekit_api_secret=API_SECRET, **overrides
    )


@pytest.fixture
async def livekit_call(livekit, tmp_path, monkeypatch):
    """Start a caller's session on the LiveKit-backed line, through the fake server; every call
    started is closed when the test ends. ``caller_room``: a room of its own (other calls share
    the server); ``models``: instead of the scripted ``respond``; ``caller_audio``: where the
    caller's audio goes (set before the session starts); ``line_type``: a ``LiveKitBackedLine``
    that does more; ``bounds``: the line's, instead of ``TEST_BOUNDS``. A server's refusal of
    moves is remembered under the test's own folder (``MoveRefusals``: the system's temporary
    folder)."""
    server, ctx = livekit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opened: list[LiveKitCall] = []

    async def start(
        respond: Callable[[Request], Reply | None] | None = None,
        *,
        caller_number: str | None = None,
        caller_room: str | None = None,
        models: wh.Models | None = None,
        caller_audio: AudioOutput | None = None,
        line_type: Callable[[wh.LiveKitPhoneLine, FakeLiveKitServer], LiveKitBackedLine] = (
            LiveKitBackedLine
        ),
        join_way: wh.JoinWay = wh.JoinWay.MOVE,
        bounds: wh.Bounds = TEST_BOUNDS,
        **settings: Any,
    ) -> LiveKitCall:
        config = livekit_settings(server, **settings)
        lk = wh.LiveKitPhoneLine(ctx, config, bounds=bounds)
        if caller_room is not None:
            server.add_participant(caller_room, "caller")
            lk.caller_room = caller_room
        line = line_type(lk, server)
        line.first_way = join_way
        if caller_number is not None:
            line.caller_number = caller_number
        model = ScriptedLLM(respond or receptionist())
        models = models or wh.Models(llm=model, turn_handling={"turn_detection": "manual"})
        agent = wh.WarmHandoffAgent(config, line, models)
        session = wh.CallerSession(session_close_transcript_timeout=line.bounds.last_words)
        if caller_audio is not None:
            session.output.audio = caller_audio
        await session.start(agent=agent)
        opened.append(LiveKitCall(session, agent, line))
        return opened[-1]

    yield start
    for call in opened:
        await call.line.aclose()
        await call.session.aclose()


async def agree_to_transfer(
    session: AgentSession, asked: str = "a person please", yes: str = "yes"
) -> asyncio.Future[Any]:
    """The caller asks for a person, then agrees; returns the running turn (the transfer tool
    runs inside it)."""
    await session.run(user_input=asked)
    return asyncio.ensure_future(session.run(user_input=yes))


def write_wav(path: Path, pcm: Any, rate: int = 48000) -> str:
    """``pcm`` (int16 samples, mono) as a WAV file at ``path``; returns the path as a string."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm).astype(np.int16).tobytes())
    return str(path)


def assistant_said(session: AgentSession) -> list[str]:
    """What the caller's session said, in order (what the caller heard)."""
    return [m.text_content for m in session.history.messages() if m.role == "assistant"]


def tasks_still_running(*prefixes: str) -> list[asyncio.Task[Any]]:
    """This loop's tasks not yet done whose coroutine's qualified name starts with one of
    ``prefixes`` (``"Handoff."``: a method of ``Handoff``)."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().__qualname__.startswith(prefixes)
    ]


@dataclass
class FrameworkShutdown:
    """When a job shutdown in the framework's order got where (``time.monotonic()``):
    ``started`` (the shutdown request), ``closed`` (the caller's session closed: the job
    reports ShuttingDown and the supervisor's kill clock starts), ``ended`` (the process ends:
    its shutdown callbacks returned, or it was killed: ``killed``)."""

    started: float
    closed: float = 0.0
    ended: float = 0.0
    killed: bool = False


async def shut_down_like_the_framework(
    session: AgentSession,
    line: wh.PhoneLine,
    callbacks=(),
    *,
    kill_after: float = wh.JOB_SHUTDOWN_TIMEOUT,
) -> FrameworkShutdown:
    """A job shutdown in livekit-agents 1.8.9's order (``ipc/job_proc_lazy_main.py``,
    ``_shutdown_job``): the primary session is closed first (``session.aclose()``, given up to
    60 s, ``_SESSION_ACLOSE_TIMEOUT``), then the job reports ShuttingDown and the room is
    disconnected (no participant-left events follow), then the shutdown callbacks run, all at
    once (``asyncio.gather``). The worker's supervisor kills the process ``kill_after``
    (``shutdown_process_timeout``) after ShuttingDown (``ipc/supervised_proc.py``,
    ``SupervisedProc.aclose``): callbacks still running then are cancelled. It returns when the
    process ends; nothing of the job runs after that, so what is left of the call on the
    server then is what the test reads."""
    shutdown = FrameworkShutdown(time.monotonic())
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(session.aclose(), 60)
    shutdown.closed = time.monotonic()
    if isinstance(line, wh.SimulatedPhoneLine):
        line.drop_connection(line.caller_room)
    running = [asyncio.ensure_future(callback("shutdown")) for callback in callbacks]
    if running:
        _, killed = await asyncio.wait(running, timeout=kill_after)
        shutdown.killed = bool(killed)
        for task in killed:
            task.cancel()
        for task in running:
            if not task.cancelled() and task.done():
                task.result()  # a callback that raised fails the test
    shutdown.ended = time.monotonic()
    return shutdown


def run_worker(command: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python warm_handoff.py <command> [args]`` with only ``env`` configured, in a temporary
    folder of its own (a relative HANDOFF_CALLBACK_FILE, the default, lands there)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LIVEKIT", "HANDOFF", "SIP_", "DEEPGRAM", "OPENAI", "ELEVEN"))
    }
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(
            [sys.executable, str(ROOT / "warm_handoff.py"), command, *args],
            env={**clean, "DOTENV_FILE": os.devnull, **env},
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
        )


# The worker started in a clean process without registering, asked over HTTP what it reports:
# livekit-agents' worker serves ``GET /worker`` with the agent name it registers (worker.py).
_REPORTED_NAME = """
import asyncio, json, socket, urllib.request
import warm_handoff

# an IPv4-only host: the worker's HTTP server (all interfaces, port 0) reports the port of
# its first socket, which on a dual-stack host may be the IPv6 one
_getaddrinfo = socket.getaddrinfo
socket.getaddrinfo = lambda *a, **k: [r for r in _getaddrinfo(*a, **k) if r[0] == socket.AF_INET]

async def main():
    server = warm_handoff.server
    run = asyncio.ensure_future(server.run(devmode=True, unregistered=True))
    while not server.worker_info.http_port:
        if run.done():
            run.result()
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{server.worker_info.http_port}/worker"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    print(json.dumps(json.loads(body).get("agent_name", "")))
    await server.aclose()
    await run

asyncio.run(main())
"""


def name_the_worker_registers(env: Mapping[str, str]) -> str:
    """The agent name the worker registers with LiveKit's dispatcher, read from its HTTP
    endpoint in a clean process (the name is read at import) with ``env`` on top of this
    process's environment, less the framework's own name variables."""
    ours = ("AGENT_NAME", "LIVEKIT_AGENT_NAME", "LIVEKIT_AGENT_NAME_OVERRIDE", "DOTENV_FILE")
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", _REPORTED_NAME],
        env={"DOTENV_FILE": os.devnull, **clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def silero_vad() -> silero.VAD:
    """The real Silero VAD, loaded once: the ear of a session that hears a far end
    (``standins.voices.FarEnd``), with its default silence (0.55 s)."""
    return silero.VAD.load()
