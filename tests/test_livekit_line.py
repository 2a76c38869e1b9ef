"""The LiveKit implementation of the phone line, through the real livekit-api client and a local
fake of the LiveKit server (Twirp over HTTP, JWT checked)."""

import asyncio
import re

import pytest
from conftest import (
    CALLER_ROOM,
    receptionist,
    start_livekit_call,
    wait_for,
)
from fake_livekit import DialScript

import warm_handoff as wh

Out = wh.HandoffOutcome


async def start(livekit, respond, **settings):
    return await start_livekit_call(livekit, respond, **settings)


async def transfer(session):
    await session.run(user_input="a person please")
    return asyncio.ensure_future(session.run(user_input="yes"))


def last_said(session):
    return [m.text_content for m in session.history.messages() if m.role == "assistant"][-1]


def humans(server):
    return sorted(i for members in server.rooms.values() for i in members if i != "caller")


@pytest.mark.parametrize(
    "destination,call_to,timeout,dtmf",
    [
        ("support", "+15105550100", 20, "1234"),
        ("billing", "sip:billing@pbx.example.com", 12, ""),
    ],
)
async def test_the_exact_create_sip_participant_request(
    livekit, destination, call_to, timeout, dtmf
):
    server, _ = livekit
    session, agent, _ = await start(
        livekit, receptionist(destination), handoff_mode=wh.HandoffMode.CONFERENCE
    )
    try:
        await asyncio.wait_for(await transfer(session), 5)
        [call] = server.calls_to("CreateSIPParticipant")
        r = call.request
        assert r.sip_trunk_id == "ST_trunk123"
        assert r.sip_call_to == call_to
        assert r.sip_number == "+15105550999"  # the caller ID the human's phone shows
        assert r.room_name == CALLER_ROOM
        assert re.fullmatch(r"transfer_[0-9a-f]{8}", r.participant_identity)
        assert r.participant_name == "Human Agent"
        assert r.krisp_enabled is True
        assert r.dtmf == dtmf
        assert r.wait_until_answered is True
        assert r.ringing_timeout.ToSeconds() == timeout
        assert call.grants.sip.call is True
        assert agent.results[0].outcome is Out.CONNECTED
        assert r.participant_identity in server.rooms[CALLER_ROOM]
    finally:
        await session.aclose()


@pytest.mark.parametrize(
    "script,outcome,heard",
    [
        (DialScript.sip_error(486), Out.BUSY, "is on another call right now"),
        (DialScript.sip_error(600), Out.BUSY, "is on another call right now"),
        (DialScript.sip_error(480), Out.NO_ANSWER, "nobody from our support team picked up"),
        (DialScript.sip_error(408), Out.NO_ANSWER, "nobody from our support team picked up"),
        (DialScript.sip_error(487), Out.NO_ANSWER, "nobody from our support team picked up"),
        (DialScript.canceled(), Out.NO_ANSWER, "nobody from our support team picked up"),
        (DialScript.sip_error(603), Out.DECLINED, "can't take your call right now"),
        (DialScript.sip_error(404), Out.UNREACHABLE, "couldn't get through to our support team"),
        (DialScript.sip_error(403), Out.UNREACHABLE, "couldn't get through to our support team"),
        (DialScript.sip_error(503), Out.UNREACHABLE, "couldn't get through to our support team"),
        # on *.livekit.cloud the client tries a 5xx three times before it gives up
        (
            (DialScript.server_error(),) * 3,
            Out.FAILED,
            "something went wrong while I was connecting you",
        ),
    ],
    ids=[
        "486",
        "600",
        "480",
        "408",
        "487",
        "cancel-no-status",
        "603",
        "404",
        "403-trunk",
        "503",
        "twirp-500",
    ],
)
@pytest.mark.parametrize("mode", [wh.HandoffMode.CONSULT, wh.HandoffMode.CONFERENCE])
async def test_each_sip_failure_reaches_the_caller_as_the_right_message(
    livekit, script, outcome, heard, mode
):
    server, _ = livekit
    server.script_dial(*(script if isinstance(script, tuple) else (script,)))
    session, agent, line = await start(livekit, receptionist(), handoff_mode=mode)
    try:
        await asyncio.wait_for(await transfer(session), 5)
        assert agent.results[0].outcome is outcome
        said = last_said(session)
        assert heard in said and "I can try our billing team instead" in said
        await line.settle()
        assert humans(server) == [] and not line.on_hold
    finally:
        await session.aclose()


async def test_wrong_credentials_fail_the_dial_not_the_call(livekit, monkeypatch):
    server, _ = livekit
    session, agent, _ = await start(livekit, receptionist(), handoff_mode=wh.HandoffMode.CONFERENCE)
    monkeypatch.setenv("LIVEKIT_API_SECRET", "not-the-secret-not-the-secret-xx")
    try:
        await asyncio.wait_for(await transfer(session), 5)
        assert agent.results[0].outcome is Out.FAILED
        assert ("CreateSIPParticipant", "unauthenticated") in server.rejected
        assert "something went wrong" in last_said(session)
    finally:
        await session.aclose()


@pytest.mark.parametrize("who", ["caller", "human"])
async def test_consult_accept_moves_the_human_and_deletes_rooms(livekit, who):
    server, _ = livekit
    session, agent, line = await start(livekit, receptionist())
    try:
        turn = await transfer(session)
        await wait_for(line.answered.is_set)
        line.human_says("Hello?")
        await wait_for(lambda: line.human_heard_anything())
        line.human_presses("1")
        await asyncio.wait_for(turn, 5)
        [dial] = server.calls_to("CreateSIPParticipant")
        consult_room = dial.request.room_name
        assert consult_room.startswith(f"{CALLER_ROOM}-consult-")
        [move] = server.calls_to("MoveParticipant")
        assert (move.request.room, move.request.identity, move.request.destination_room) == (
            consult_room,
            dial.request.participant_identity,
            CALLER_ROOM,
        )
        assert set(server.rooms[CALLER_ROOM]) == {"caller", dial.request.participant_identity}
        await line.settle()
        assert consult_room in server.deleted_rooms or consult_room not in server.rooms
        assert last_said(session) == "You're now connected with our support team."
        # either side hanging up ends the call for both: the caller's room is deleted
        (line.hang_up_caller if who == "caller" else line.hang_up_human)()
        await asyncio.wait_for(agent._leaving, 2)
        assert CALLER_ROOM in server.deleted_rooms and CALLER_ROOM not in server.rooms
    finally:
        await session.aclose()


async def test_move_refused_removes_the_human_and_returns_the_caller(livekit):
    server, _ = livekit
    server.move_supported = False
    session, agent, line = await start(livekit, receptionist())
    try:
        turn = await transfer(session)
        await wait_for(line.answered.is_set)
        line.human_says("Hello?")
        await wait_for(lambda: line.human_heard_anything())
        line.human_presses("1")
        await asyncio.wait_for(turn, 5)
        assert agent.results[0].outcome is Out.FAILED
        identity = server.calls_to("CreateSIPParticipant")[0].request.participant_identity
        await line.settle()
        assert [c.request.identity for c in server.calls_to("RemoveParticipant")] == [identity]
        assert humans(server) == []
        assert "something went wrong" in last_said(session)
    finally:
        await session.aclose()


async def test_caller_hanging_up_while_ringing_aborts_the_dial(livekit):
    server, _ = livekit
    server.script_dial(DialScript.hang())
    session, agent, line = await start(livekit, receptionist())
    try:
        turn = await transfer(session)
        await wait_for(lambda: server.calls_to("CreateSIPParticipant") and line.on_hold)
        line.hang_up_caller()
        await asyncio.wait_for(turn, 5)
        assert agent.results[0].outcome is Out.CALLER_LEFT
        identity = server.calls_to("CreateSIPParticipant")[0].request.participant_identity
        await wait_for(lambda: identity in server.cancelled_dials)  # the phone stops ringing
        await line.settle()
        assert humans(server) == []
    finally:
        await session.aclose()
