"""The LiveKit implementation of the phone line, through the real livekit-api client and a local
fake of the LiveKit server (Twirp over HTTP, JWT checked)."""

import asyncio
import dataclasses
import inspect
import re

import pytest
from conftest import (
    CALLER_ROOM,
    TEST_BOUNDS,
    agree_to_transfer,
    assistant_said,
    receptionist,
    settings_for,
    wait_for,
)
from fake_livekit import DialScript
from livekit.agents import AgentSession

import warm_handoff as wh

Out = wh.HandoffOutcome


def last_said(session):
    return assistant_said(session)[-1]


def humans(server):
    return sorted(i for members in server.rooms.values() for i in members if i != "caller")


@pytest.mark.parametrize(
    "destination,trunk,host,call_to,timeout,dtmf",
    [
        ("support", "ST_trunk123", "", "+15105550100", 20, ""),
        # a sip: URI: its user at its own host, through an inline trunk (LiveKit refuses a full
        # URI as sip_call_to: livekit/protocol livekit/sip.go ValidateResult)
        ("billing", "", "pbx.example.com", "billing", 12, ""),
    ],
)
async def test_the_exact_create_sip_participant_request(
    livekit, livekit_call, destination, trunk, host, call_to, timeout, dtmf
):
    server, _ = livekit
    session, agent, _ = await livekit_call(
        receptionist(destination), handoff_mode=wh.HandoffMode.CONFERENCE
    )
    await asyncio.wait_for(await agree_to_transfer(session), 5)
    [call] = server.calls_to("CreateSIPParticipant")
    r = call.request
    assert r.sip_trunk_id == trunk
    assert r.trunk.hostname == host
    assert r.sip_call_to == call_to
    assert r.sip_number == "+15105550999"  # the caller ID the human's phone shows
    assert r.room_name.startswith(f"{CALLER_ROOM}-consult-")  # screened there first
    assert re.fullmatch(r"transfer_[0-9a-f]{8}", r.participant_identity)
    assert r.participant_name == "Human Agent"
    assert r.krisp_enabled is True
    assert r.dtmf == dtmf
    assert r.wait_until_answered is True
    assert r.ringing_timeout.ToSeconds() == timeout
    assert call.grants.sip.call is True
    assert agent.results[0].outcome is Out.CONNECTED
    assert r.participant_identity in server.rooms[CALLER_ROOM]


async def test_an_extension_is_dialled_as_dtmf_and_the_leg_counts_once_it_is_sent(
    livekit, livekit_call
):
    """The one test that dials an extension (the others' lines are direct): the server sends
    its DTMF after the answer, 0.5 s a digit (livekit/media-sdk dtmf.go), and answers the dial
    only then; the worker's request waits that long (``dial_request_timeout``) and the human
    counts as answered only once the leg is active."""
    server, _ = livekit
    support, billing = settings_for().destinations
    extension = (dataclasses.replace(support, extension="1234"), billing)
    session, agent, _ = await livekit_call(
        handoff_mode=wh.HandoffMode.CONFERENCE, destinations=extension
    )
    await asyncio.wait_for(await agree_to_transfer(session), 8)
    [call] = server.sip_calls
    assert call.request.dtmf == "1234"
    assert call.answered_at is not None and call.active_at is not None
    assert call.active_at - call.answered_at >= 4 * 0.5  # four digits
    [result] = agent.results
    assert result.outcome is Out.CONNECTED
    assert result.timings["answered"] >= call.active_at


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
    livekit, livekit_call, script, outcome, heard, mode
):
    server, _ = livekit
    server.script_dial(*(script if isinstance(script, tuple) else (script,)))
    session, agent, line = await livekit_call(receptionist(), handoff_mode=mode)
    await asyncio.wait_for(await agree_to_transfer(session), 5)
    assert agent.results[0].outcome is outcome
    said = last_said(session)
    assert heard in said and "I can try our billing team instead" in said
    await line.settle()
    assert humans(server) == [] and not line.on_hold


async def test_a_dial_that_never_joined_is_removed_for_as_long_as_the_line_allows(
    livekit, livekit_call
):
    """A dial that failed before its participant joined (a 5xx from the SIP service): the worker
    cannot know it never will, so it keeps removing the identity for the line's
    ``Bounds.remove_retry`` (production's 4 s; the tests' line, shorter), then stops."""
    server, _ = livekit
    server.script_dial(DialScript.server_error())
    session, agent, line = await livekit_call(handoff_mode=wh.HandoffMode.CONFERENCE)
    await asyncio.wait_for(await agree_to_transfer(session), 5)
    assert agent.results[0].outcome is Out.FAILED
    await line.settle()
    removes = server.calls_to("RemoveParticipant")
    assert {c.answer for c in removes} == {"not_found"} and len(removes) > 1
    retried_for = removes[-1].at - removes[0].at
    window = line.lk.bounds.remove_retry
    assert window == TEST_BOUNDS.remove_retry < wh.Bounds().remove_retry
    assert window - 0.5 <= retried_for <= window + 0.5, retried_for


def test_the_bounds_are_productions_unless_a_line_is_given_others():
    production = wh.Bounds(
        server_call=4.0, move=10.0, locate=3.0, remove_retry=4.0, confirm=8.0, last_words=2.0
    )
    framework = inspect.signature(AgentSession.__init__).parameters
    assert production.last_words == framework["session_close_transcript_timeout"].default
    assert wh.SimulatedPhoneLine(None).bounds == production
    assert wh.SimulatedPhoneLine(None, bounds=TEST_BOUNDS).bounds == TEST_BOUNDS


async def test_wrong_credentials_fail_the_dial_not_the_call(livekit, livekit_call, monkeypatch):
    server, _ = livekit
    session, agent, _ = await livekit_call(receptionist(), handoff_mode=wh.HandoffMode.CONFERENCE)
    monkeypatch.setenv("LIVEKIT_API_SECRET", "not-the-secret-not-the-secret-xx")
    await asyncio.wait_for(await agree_to_transfer(session), 5)
    assert agent.results[0].outcome is Out.FAILED
    assert ("CreateSIPParticipant", "unauthenticated") in server.rejected
    assert "something went wrong" in last_said(session)


@pytest.mark.parametrize("who", ["caller", "human"])
async def test_consult_accept_moves_the_human_and_deletes_rooms(livekit, livekit_call, who):
    server, _ = livekit
    session, agent, line = await livekit_call(receptionist())
    turn = await agree_to_transfer(session)
    await line.human_accepts()
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
    await server.wait_for(lambda: CALLER_ROOM in server.deleted_rooms, 2)
    assert CALLER_ROOM not in server.rooms


async def test_a_refused_move_bridges_and_the_worker_remembers_it(livekit, livekit_call):
    """Self-hosted LiveKit answers MoveParticipant "not implemented" (a Twirp unknown): the
    human, still in the consult room, is bridged; the refusal is remembered for the worker (a
    marker file, since each job is a process of its own), so the next call bridges without a
    move; both calls end with no human anywhere."""
    server, _ = livekit
    server.move_supported = False
    session, agent, line = await livekit_call(receptionist())
    turn = await agree_to_transfer(session)
    await line.human_accepts()
    await asyncio.wait_for(turn, 5)
    [first] = agent.results
    assert (first.outcome, first.joined_by) == (Out.CONNECTED, wh.JoinWay.BRIDGE)
    assert first.leg is not None and first.leg.room != CALLER_ROOM  # never moved
    asked = len(server.calls_to("MoveParticipant"))  # the client tries a 5xx 3 times on Cloud
    assert asked >= 1 and line.lk.move_refused

    session2, agent2, line2 = await livekit_call(receptionist(), caller_room="second-call")
    assert line2.lk.move_refused and line2.join_way is wh.JoinWay.BRIDGE
    turn = await agree_to_transfer(session2)
    await line2.human_accepts()
    await asyncio.wait_for(turn, 5)
    assert agent2.results[0].joined_by is wh.JoinWay.BRIDGE
    assert len(server.calls_to("MoveParticipant")) == asked  # not asked again
    line.hang_up_caller()
    line2.hang_up_caller()
    await server.wait_for(lambda: humans(server) == [])


async def test_caller_hanging_up_while_ringing_aborts_the_dial(livekit, livekit_call):
    server, _ = livekit
    server.script_dial(DialScript.hang())
    session, agent, line = await livekit_call(receptionist())
    turn = await agree_to_transfer(session)
    await wait_for(lambda: server.calls_to("CreateSIPParticipant") and line.on_hold)
    line.hang_up_caller()
    await asyncio.wait_for(turn, 5)
    assert agent.results[0].outcome is Out.CALLER_LEFT
    identity = server.calls_to("CreateSIPParticipant")[0].request.participant_identity
    await wait_for(lambda: identity in server.cancelled_dials)  # the phone stops ringing
    await line.settle()
    assert humans(server) == []
