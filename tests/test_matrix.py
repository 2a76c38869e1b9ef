"""Every phase x every fault, in both modes: what the caller hears, what the human hears, and
what is torn down. The rule: nobody waits for someone who is gone.

Each cell runs a real AgentSession with a scripted model on the LiveKit-backed test line, so
every server API call (dial, remove, move, delete room) goes through ``livekit-api`` to the
fake Twirp server."""

import asyncio
from dataclasses import dataclass

import pytest
from conftest import (
    CALLER_ROOM,
    LiveKitBackedLine,
    ScriptedLLM,
    receptionist,
    settings_for,
    shut_down_like_the_framework,
    wait_for,
)
from fake_livekit import API_KEY, API_SECRET, DialScript

import warm_handoff as wh

Out = wh.HandoffOutcome
NOBODY = "I'm sorry, nobody from our support team picked up."
WRONG = "I'm sorry, something went wrong while I was connecting you."
ENDING = "I'm sorry, I have to end this call now."
HOLD = "Let me connect you with our support team. Please hold for a moment."


@dataclass(frozen=True)
class Cell:
    phase: str
    fault: str
    outcome: wh.HandoffOutcome
    caller_hears: str  # the start of the last thing the caller hears
    human_hears: str | None  # the start of the last thing the human hears; None: nothing at all
    script: DialScript | None = None
    dial_cancelled: bool = False  # the human's phone stopped ringing
    callback: bool = False  # a callback request was recorded


RINGING_FAILURES = [
    Cell(
        "ringing",
        "busy",
        Out.BUSY,
        "I'm sorry, our support team is on another call",
        None,
        DialScript.sip_error(486, delay=0.05),
    ),
    Cell(
        "ringing", "no_answer", Out.NO_ANSWER, NOBODY, None, DialScript.sip_error(480, delay=0.05)
    ),
    Cell(
        "ringing", "no_answer_cancel", Out.NO_ANSWER, NOBODY, None, DialScript.canceled(delay=0.05)
    ),
    Cell(
        "ringing",
        "declined",
        Out.DECLINED,
        "I'm sorry, our support team can't take",
        None,
        DialScript.sip_error(603, delay=0.05),
    ),
    Cell(
        "ringing",
        "unreachable",
        Out.UNREACHABLE,
        "I'm sorry, I couldn't get through",
        None,
        DialScript.sip_error(404, delay=0.05),
    ),
    Cell("ringing", "api_5xx", Out.FAILED, WRONG, None, DialScript.server_error(delay=0.05)),
    Cell("ringing", "api_auth", Out.FAILED, WRONG, None),
    Cell(
        "ringing",
        "api_timeout",
        Out.NO_ANSWER,
        NOBODY,
        None,
        DialScript.hang(),
        dial_cancelled=True,
    ),
]
COMMON = [
    Cell(
        "announcing",
        "caller_hangs_up",
        Out.CALLER_LEFT,
        HOLD,
        None,
        DialScript.hang(),
        dial_cancelled=True,
    ),
    Cell(
        "announcing", "shutdown", Out.FAILED, ENDING, None, DialScript.hang(), dial_cancelled=True
    ),
    Cell(
        "ringing",
        "caller_hangs_up",
        Out.CALLER_LEFT,
        HOLD,
        None,
        DialScript.hang(),
        dial_cancelled=True,
        callback=True,
    ),
    Cell("ringing", "shutdown", Out.FAILED, ENDING, None, DialScript.hang(), dial_cancelled=True),
    *RINGING_FAILURES,
]
CONSULT = [
    Cell(
        "briefing",
        "caller_hangs_up",
        Out.CALLER_LEFT,
        HOLD,
        "I'm sorry, the caller has just hung up.",
        callback=True,
    ),
    Cell(
        "briefing",
        "human_hangs_up",
        Out.DECLINED,
        "I'm sorry, our support team can't take",
        "Hi, this is the Acme assistant",
    ),
    Cell(
        "briefing",
        "declined",
        Out.DECLINED,
        "I'm sorry, our support team can't take",
        "Understood, I'll let the caller know.",
    ),
    Cell(
        "briefing",
        "voicemail",
        Out.VOICEMAIL,
        "I'm sorry, I reached our support team's voicem",
        None,
    ),
    Cell("briefing", "shutdown", Out.FAILED, ENDING, "I'm sorry, this call has to end now."),
    Cell(
        "briefing",
        "max_hold",
        Out.NO_ANSWER,
        NOBODY,
        "I'm sorry, I have to take the caller back now.",
    ),
    Cell("merging", "move_refused", Out.FAILED, WRONG, "I'm sorry, I can't put the call through"),
    # the move is never abandoned half way: it completes, the human arrives to nobody and the
    # caller's room is deleted (their leg ends); the last words they heard were the brief
    Cell(
        "merging",
        "caller_hangs_up",
        Out.CALLER_LEFT,
        HOLD,
        "Hi, this is the Acme assistant",
    ),
    Cell("merging", "human_hangs_up", Out.FAILED, WRONG, "Hi, this is the Acme assistant"),
    Cell(
        "merged",
        "caller_hangs_up",
        Out.CONNECTED,
        "You're now connected with our support team.",
        "Hi, this is the Acme assistant",
    ),
    Cell(
        "merged",
        "human_hangs_up",
        Out.CONNECTED,
        "You're now connected with our support team.",
        "Hi, this is the Acme assistant",
    ),
]
INTRO = "Hello, this is the Acme assistant. I have a caller on the line"
CONFERENCE = [
    Cell("merged", "caller_hangs_up", Out.CONNECTED, INTRO, INTRO),
    Cell("merged", "human_hangs_up", Out.CONNECTED, INTRO, INTRO),
]
MATRIX = [("consult", c) for c in COMMON + CONSULT] + [
    ("conference", c) for c in COMMON + CONFERENCE
]


@pytest.mark.parametrize("mode,cell", MATRIX, ids=[f"{m}-{c.phase}-{c.fault}" for m, c in MATRIX])
async def test_cell(livekit, monkeypatch, mode, cell):
    server, ctx = livekit
    if cell.script is not None:
        server.script_dial(cell.script)
    settings = settings_for(
        livekit_url=server.url,
        livekit_api_key=API_KEY,
        livekit_api_secret=API_SECRET,
        handoff_mode=wh.HandoffMode(mode),
        # the support line has an extension: 2 s of DTMF before the leg is active
        max_hold={"api_timeout": 2.0, "max_hold": 4.0}.get(cell.fault, 20.0),
    )
    line = LiveKitBackedLine(wh.LiveKitPhoneLine(ctx, settings), server)
    agent = wh.WarmHandoffAgent(
        settings,
        line,
        wh.Models(llm=ScriptedLLM(receptionist()), turn_handling={"turn_detection": "manual"}),
    )
    session = wh.CallerSession()
    await session.start(agent=agent)
    try:
        await session.run(user_input="a person please")
        if cell.fault == "api_auth":
            monkeypatch.setenv("LIVEKIT_API_SECRET", "not-the-secret-not-the-secret-xx")
        if cell.phase == "announcing":
            line.hooks["dial"] = lambda: inject(cell.fault, line, agent, server)
        if cell.phase == "merging":
            line.hooks["move"] = lambda: inject(cell.fault, line, agent, server)
        if cell.fault == "move_refused":
            server.move_supported = False
        turn = asyncio.ensure_future(session.run(user_input="yes"))

        if cell.phase == "ringing" and cell.fault in ("caller_hangs_up", "shutdown"):
            await wait_for(lambda: line.on_hold and server.calls_to("CreateSIPParticipant"))
            await inject(cell.fault, line, agent, server)
        if cell.phase in ("briefing", "merging", "merged"):
            await wait_for(line.answered.is_set)
            if mode == "consult":
                if cell.fault == "voicemail":
                    line.human_says("Hi, you've reached Sam. Please leave a message.")
                else:
                    line.human_says("Hello?")
                    await wait_for(line.human_heard_anything)
                    if cell.phase == "briefing" and cell.fault != "max_hold":
                        await inject(cell.fault, line, agent, server)
                    elif cell.phase in ("merging", "merged"):
                        line.human_presses("1")
        await asyncio.wait_for(turn, 8)
        if cell.phase == "merged":
            await inject(cell.fault, line, agent, server)
            await asyncio.wait_for(agent._leaving, 2)

        [result] = agent.results
        assert result.outcome is cell.outcome, result
        caller_heard = [m.text_content for m in session.history.messages() if m.role == "assistant"]
        assert caller_heard[-1].startswith(cell.caller_hears), caller_heard
        human_heard = (
            line.human_heard()
            if mode == "consult"
            else caller_heard[caller_heard.index(HOLD) + 1 :]
            if result.connected
            else []
        )
        if cell.human_hears is None:
            assert human_heard == []
        else:
            assert human_heard and human_heard[-1].startswith(cell.human_hears), human_heard

        # teardown: hold off, no consult room, no human leg left anywhere on the server
        await line.settle()
        assert not line.on_hold
        assert not any("-consult-" in room for room in server.rooms)
        humans = [i for members in server.rooms.values() for i in members if i != "caller"]
        assert humans == []
        if cell.dial_cancelled:
            assert line.cancelled_dials == [line.dials[0].identity]
            if server.calls_to("CreateSIPParticipant"):  # the request reached the server
                await wait_for(lambda: line.dials[0].identity in server.cancelled_dials)
        if cell.outcome in (Out.CALLER_LEFT, Out.CONNECTED):
            assert CALLER_ROOM in server.deleted_rooms  # nothing waits for someone gone
        else:
            assert CALLER_ROOM in server.rooms  # the caller is still on the line
        assert [c.source for c in agent.records.callbacks] == (
            ["abandoned"] if cell.callback else []
        )
        if cell.callback:
            [request] = agent.records.callbacks
            assert "printer is broken" in request.reason and request.number == "+15550100999"
            if cell.phase == "briefing":
                assert request.summary == result.brief != ""  # the brief travels with it
    finally:
        await line.aclose()
        await session.aclose()


SHUTDOWNS: list[asyncio.Future[None]] = []  # what the job's shutdown callback would run


async def inject(fault, line, agent, server) -> None:
    """Make the fault happen on the fake server; the line sees it as the room's events."""
    if fault == "caller_hangs_up":
        line.hang_up_caller()
    elif fault == "human_hangs_up":
        line.hang_up_human()
    elif fault == "shutdown":  # in the framework's order: the caller's session closes first
        SHUTDOWNS.append(
            asyncio.ensure_future(
                shut_down_like_the_framework(agent.session, line, [agent.shutdown_handoff])
            )
        )
    elif fault == "declined":
        line.human_presses("2")
    await asyncio.sleep(0)
