"""A safety net after the merge: for HANDOFF_REJOIN_WINDOW seconds after the human is connected
the agent stays in the caller's room, parked (it hears and says nothing: no speech-to-text, no
model). A human who drops in that window while the caller is still there brings it back, to
offer the same team again, another, or a callback; a human who drops later, or a caller who
hangs up, ends the call as before (the caller's room is deleted).

Run on the LiveKit-backed test line (every dial, move and room deletion through livekit-api to
the fake server; the human's hang-up is a BYE there), with the window scaled down from 20 s to
1 s: "drops at 5 s" is a drop at 0.3 s, "drops at 30 s" one at 1.5 s."""

import asyncio
import json
import logging

import pytest
from conftest import (
    CALLER_ROOM,
    ScriptedLLM,
    agree_to_transfer,
    assistant_said,
    receptionist,
    shut_down_like_the_framework,
    tasks_still_running,
    wait_for,
)

import warm_handoff as wh
from standins.fake_livekit import dialled
from standins.models import LineSTT
from standins.voices import LineAudio, Sound, human_hello

Out = wh.HandoffOutcome
WINDOW = 1.0  # HANDOFF_REJOIN_WINDOW, scaled down
EARLY = 0.3  # the human drops in the window ("at 5 s")
LATE = 1.5  # and after it ("at 30 s")
CONNECTED = {
    "consult": "You're now connected with our billing team.",
    "conference": "Hello, this is the Acme assistant. I have a caller on the line about",
}
LOST = (
    "It looks like we lost our billing team. I can try them again, try our support team, "
    "or take your details for a callback."
)


@pytest.fixture
def start(livekit_call):
    """A call on the LiveKit-backed line, transferred to billing for a refund, with the window
    scaled down."""

    async def start(respond=None, **settings):
        respond = respond or receptionist("billing", "a refund")
        call = await livekit_call(respond, **{"rejoin_window": WINDOW, **settings})
        return (*call, call.agent.models.llm)

    return start


async def connect(session, line, mode: str, asked: str = "a person please") -> None:
    """The caller asks for a person and agrees; the human answers (and, consult, accepts)."""
    line.answered.clear()
    turn = await agree_to_transfer(session, asked)
    await wait_for(line.answered.is_set)
    if mode == "consult":
        await line.human_accepts()
    await asyncio.wait_for(turn, 8)


async def connected_then_gone(start, who: str, **settings):
    """A consult call connected; EARLY after the merge ``who`` ("human", "caller") hangs up."""
    session, agent, line, model = await start(**settings)
    await connect(session, line, "consult")
    await asyncio.sleep(EARLY)
    (line.hang_up_human if who == "human" else line.hang_up_caller)()
    return session, agent, line, model


caller_heard = assistant_said


def humans(server) -> list[str]:
    return sorted(i for members in server.rooms.values() for i in members if i != "caller")


def records(caplog, kind: str) -> list[dict]:
    return [
        json.loads(r.getMessage().split(" record ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith(f"{kind} record")
    ]


MODES_AND_WAYS = pytest.mark.parametrize(
    "mode,way", [(m, w) for m in ("consult", "conference") for w in ("move", "bridge")]
)


def in_mode(mode: str, way: str) -> dict:
    """The settings of a call in ``mode`` whose human is joined ``way`` (moved or bridged)."""
    return {"handoff_mode": wh.HandoffMode(mode), "join_way": wh.JoinWay(way)}


@pytest.fixture(autouse=True)
def handoff_logs(caplog):
    """The records are read from the log (``records``)."""
    caplog.set_level(logging.INFO, logger="warm-handoff")


@MODES_AND_WAYS
async def test_a_human_who_drops_in_the_window_brings_the_agent_back(
    livekit, start, caplog, mode, way
):
    """Moved or bridged (then the human's room goes with the bridge), the agent is back."""
    server, _ = livekit
    session, agent, line, model = await start(**in_mode(mode, way))
    await connect(session, line, mode)
    assert caller_heard(session)[-1].startswith(CONNECTED[mode])
    assert agent.results[0].outcome is Out.CONNECTED
    # parked: in the room, hearing and saying nothing
    assert not session.input.audio_enabled and not session.output.audio_enabled
    asked = len(model.requests)
    await asyncio.sleep(EARLY)
    line.hang_up_human()
    await wait_for(lambda: caller_heard(session)[-1] == LOST)
    assert session.input.audio_enabled and session.output.audio_enabled
    assert len(model.requests) == asked  # a fixed sentence: no model was asked

    assert CALLER_ROOM in server.rooms and CALLER_ROOM not in server.deleted_rooms
    assert humans(server) == [] and set(server.rooms[CALLER_ROOM]) == {"caller"}
    if way == "bridge":
        await line.settle()
        assert line.bridged == {} and not any("-consult-" in r for r in server.rooms)
    [result] = agent.results
    assert result.outcome is Out.REJOINED and not agent.connected
    assert result.detail.startswith("the human left 0.") and "after the merge" in result.detail
    # the attempt, recorded twice: connected, then rejoined
    handoffs = records(caplog, "handoff")
    assert [(h["outcome"], h["attempt"]) for h in handoffs] == [
        ("connected", result.attempt),
        ("rejoined", result.attempt),
    ]
    assert handoffs[1]["timings"]["rejoined"] > handoffs[1]["timings"]["merged"]
    assert agent.may_offer(agent.settings.destination("billing"))
    agent.call_ended()
    [call] = records(caplog, "call")
    assert call["outcome"] == "rejoined" and call["attempts"] == [result.attempt]


async def test_the_same_team_can_be_dialled_again_and_counts_as_an_attempt(livekit, start):
    server, _ = livekit
    session, agent, line, model = await connected_then_gone(start, "human")
    await wait_for(lambda: caller_heard(session)[-1] == LOST)

    await connect(session, line, "consult", asked="please try them again")
    dials = [c.request for c in server.calls_to("CreateSIPParticipant")]
    assert [dialled(d) for d in dials] == ["sip:billing@pbx.example.com"] * 2
    assert [r.outcome for r in agent.results] == [Out.REJOINED, Out.CONNECTED]
    assert [d.name for d in agent.teams.tried] == ["billing", "billing"]
    assert caller_heard(session)[-1] == CONNECTED["consult"]
    # the model was told what happened, and which transfer to make
    after = next(r for r in model.of("caller") if "try them again" in r.last_user_text())
    note = [m.text_content for m in after.chat_ctx.messages() if m.role == "system"]
    assert any("hung up right after the transfer" in (n or "") for n in note)
    assert any("transfer_call with destination billing" in (n or "") for n in note)

    # parked again: this time the human leaves after the window and the call ends
    await asyncio.sleep(LATE)
    line.hang_up_human()
    await server.wait_for(lambda: CALLER_ROOM in server.deleted_rooms, 5)
    assert CALLER_ROOM not in server.rooms


async def test_no_attempt_left_offers_only_a_callback(livekit, start):
    server, _ = livekit
    session, agent, line, _ = await connected_then_gone(start, "human", max_attempts=1)
    lost = "It looks like we lost our billing team. I can take your details for a callback."
    await wait_for(lambda: caller_heard(session)[-1] == lost)
    await session.run(user_input="yes try them again")
    assert len(server.calls_to("CreateSIPParticipant")) == 1  # HANDOFF_MAX_ATTEMPTS holds


@MODES_AND_WAYS
async def test_a_human_who_drops_after_the_window_ends_the_call(
    livekit, start, caplog, mode, way
):
    server, _ = livekit
    session, agent, line, _ = await start(**in_mode(mode, way))
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    await connect(session, line, mode)
    await asyncio.sleep(LATE)
    assert closed.is_set()  # the window is over: the agent has left
    line.hang_up_human()
    await server.wait_for(lambda: CALLER_ROOM in server.deleted_rooms, 5)
    assert CALLER_ROOM not in server.rooms and humans(server) == []
    assert caller_heard(session)[-1].startswith(CONNECTED[mode])
    assert [r.outcome for r in agent.results] == [Out.CONNECTED]
    assert [h["outcome"] for h in records(caplog, "handoff")] == ["connected"]


async def test_a_caller_who_hangs_up_first_ends_the_call(livekit, start):
    server, _ = livekit
    session, agent, line, _ = await connected_then_gone(start, "caller")
    await server.wait_for(lambda: CALLER_ROOM in server.deleted_rooms, 5)
    assert humans(server) == []
    assert caller_heard(session)[-1] == CONNECTED["consult"]  # nobody to speak to
    assert [r.outcome for r in agent.results] == [Out.CONNECTED]


async def test_a_window_of_zero_leaves_at_once(livekit, start):
    server, _ = livekit
    session, agent, line, _ = await start(rejoin_window=0.0)
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    await connect(session, line, "consult")
    await asyncio.wait_for(closed.wait(), 2)
    line.hang_up_human()
    await server.wait_for(lambda: CALLER_ROOM in server.deleted_rooms, 5)
    assert [r.outcome for r in agent.results] == [Out.CONNECTED]


@pytest.mark.parametrize("way", ["move", "bridge"])
async def test_a_job_shutdown_while_parked_deletes_the_room(livekit, start, way):
    server, _ = livekit
    session, agent, line, _ = await start(join_way=wh.JoinWay(way))
    await connect(session, line, "consult")
    assert not session.input.audio_enabled  # parked
    # the framework closes the caller's session first: the room is gone when it returns,
    # before the room connection drops
    await asyncio.wait_for(session.aclose(), 5)
    assert CALLER_ROOM in server.deleted_rooms and humans(server) == []  # a bridge's room too
    await shut_down_like_the_framework(session, line, [agent.shutdown_handoff])
    await line.settle()
    assert humans(server) == [] and not server.calls_to("CreateSIPParticipant")[1:]
    assert [r.outcome for r in agent.results] == [Out.CONNECTED]
    assert tasks_still_running("WarmHandoffAgent.") == []  # nothing waits on the call


class CallerLine(LineAudio):
    """The caller's audio as RoomIO hands it to the session: while the session's audio input
    is disabled (detached) the caller's frames are dropped, never queued (livekit-agents
    ``voice/room_io/_input.py``, ``_ParticipantInputStream.on_detached`` and ``_forward_task``:
    ``if not self._attached: continue``)."""

    def __init__(self) -> None:
        super().__init__("caller")
        self.attached = True
        self.delivered = 0
        self.dropped = 0

    def on_attached(self) -> None:
        self.attached = True

    def on_detached(self) -> None:
        self.attached = False

    async def __anext__(self):
        while True:
            frame = await super().__anext__()
            if self.attached:
                self.delivered += 1
                return frame
            self.dropped += 1


async def test_nothing_the_caller_says_while_parked_is_transcribed_or_sent_to_a_model(start):
    model = ScriptedLLM(receptionist("billing", "a refund"))
    models = wh.Models(stt=LineSTT(), llm=model, turn_handling={"turn_detection": "stt"})
    session, agent, line, _ = await start(models=models)
    mouth = CallerLine()
    session.input.audio = mouth
    mouth.start()
    finals: list[str] = []
    session.on("user_input_transcribed", lambda ev: ev.is_final and finals.append(ev.transcript))
    await connect(session, line, "consult")
    asked, delivered = len(model.requests), mouth.delivered
    # the two people talk: the caller's words reach the room, not the agent
    spoken = mouth.mix([_said(human_hello())], mouth.position)[0]
    await asyncio.wait_for(spoken.done.wait(), 3)
    await asyncio.sleep(0.5)  # longer than the speech-to-text's final delay
    assert mouth.dropped > 0 and mouth.delivered == delivered
    assert finals == [] and len(model.requests) == asked

    line.hang_up_human()
    await wait_for(lambda: caller_heard(session)[-1] == LOST)
    # back: the caller is heard and answered again
    mouth.mix([_said(human_hello())], mouth.position)
    await wait_for(lambda: finals == ["Hello?"], 5)
    await wait_for(lambda: len(model.requests) > asked, 5)
    assert model.requests[-1].last_user_text() == "Hello?"


def _said(speech) -> Sound:
    """``speech`` as the caller says it, starting where it is mixed in."""
    return Sound(0.0, speech.pcm, speech.text)


@pytest.mark.parametrize(
    "raw,window,shown", [("", 20.0, "20s"), ("0", 0.0, "off"), ("7.5", 7.5, "7.5s")]
)
def test_the_window_is_configured(raw, window, shown):
    settings = wh.load_settings({"HANDOFF_REJOIN_WINDOW": raw}, telephony=False)
    assert settings.rejoin_window == window
    assert dict(settings.shown_by_check())["HANDOFF_REJOIN_WINDOW"] == shown


@pytest.mark.parametrize("raw", ["-1", "121", "soon"])
def test_a_bad_window_is_named(raw):
    with pytest.raises(wh.ConfigError, match="HANDOFF_REJOIN_WINDOW must be"):
        wh.load_settings({"HANDOFF_REJOIN_WINDOW": raw}, telephony=False)


async def test_a_job_shutdown_while_talking_tells_the_caller_and_ends_their_leg(livekit, start):
    """No transfer in progress: the caller hears why the call ends, then their room is deleted.
    The agent leaving alone would leave the caller's phone leg open in an empty room (seen on
    livekit-sip: no BYE until the room is deleted, tests/test_real_stack.py)."""
    server, _ = livekit
    session, agent, line, _ = await start()
    await asyncio.wait_for(session.aclose(), 10)
    await line.settle()
    assert assistant_said(session)[-1] == wh.CALL_ENDING
    assert CALLER_ROOM in server.deleted_rooms
    assert not server.calls_to("CreateSIPParticipant")
