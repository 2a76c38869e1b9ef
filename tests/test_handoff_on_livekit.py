"""The LiveKit implementation of the phone line, through the real livekit-api client and a local
fake of the LiveKit server (Twirp over HTTP, JWT checked)."""

import asyncio
import contextlib
import dataclasses
import inspect
import re
import time

import pytest
from conftest import (
    CALLER_ROOM,
    TEST_BOUNDS,
    agree_to_transfer,
    assistant_said,
    livekit_settings,
    receptionist,
    settings_for,
    wait_for,
)
from livekit.agents import AgentSession
from livekit.agents.testing import fake_job_context

import warm_handoff as wh
from standins.fake_livekit import DialScript, MethodFault

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


NOBODY = "nobody from our support team picked up"
NOT_THROUGH = "couldn't get through to our support team"
RINGS = 0.3  # how long the phone rings before the far end's answer


@pytest.mark.parametrize(
    "script,outcome,heard",
    [
        (DialScript.sip_error(486), Out.BUSY, "is on another call right now"),
        (DialScript.sip_error(600), Out.BUSY, "is on another call right now"),
        (DialScript.sip_error(480, delay=RINGS), Out.NO_ANSWER, NOBODY),
        (DialScript.sip_error(408, delay=RINGS), Out.NO_ANSWER, NOBODY),
        (DialScript.sip_error(487, delay=RINGS), Out.NO_ANSWER, NOBODY),
        (DialScript.canceled(delay=RINGS), Out.NO_ANSWER, NOBODY),
        # the same answers from a phone that never rang: nobody could have picked up
        (DialScript.sip_error(480, delay=RINGS, rings=False), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.sip_error(408, delay=RINGS, rings=False), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.sip_error(487, delay=RINGS, rings=False), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.canceled(delay=RINGS, rings=False), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.sip_error(603), Out.DECLINED, "can't take your call right now"),
        (DialScript.sip_error(404), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.sip_error(403), Out.UNREACHABLE, NOT_THROUGH),
        (DialScript.sip_error(503), Out.UNREACHABLE, NOT_THROUGH),
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
        "480-never-rang",
        "408-never-rang",
        "487-never-rang",
        "cancel-no-status-never-rang",
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
        server_call=4.0,
        move=10.0,
        locate=3.0,
        ring_check=1.0,
        remove_retry=4.0,
        confirm=8.0,
        last_words=2.0,
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


@pytest.mark.parametrize(
    "script,outcome,heard",
    [
        (DialScript.hang(), Out.NO_ANSWER, NOBODY),
        # only 100 Trying: "dialing" until the ring timeout, which LiveKit reports as it
        # reports a phone that rang out (livekit/sip errors.go: ErrSIPRequestTimeout)
        (DialScript.hang(rings=False), Out.UNREACHABLE, NOT_THROUGH),
        # nothing at all: sipgo's Timer B (shortened here) ends it before the ring timeout
        (DialScript.no_response(), Out.UNREACHABLE, NOT_THROUGH),
    ],
    ids=["rang-out", "never-rang", "no-response"],
)
@pytest.mark.parametrize("mode", [wh.HandoffMode.CONSULT, wh.HandoffMode.CONFERENCE])
async def test_a_dial_that_times_out_is_no_answer_only_if_the_phone_rang(
    livekit, livekit_call, script, outcome, heard, mode
):
    server, _ = livekit
    server.invite_timer_b = 0.5
    server.script_dial(script)
    session, agent, line = await livekit_call(receptionist(), handoff_mode=mode, ring_timeout=1.0)
    await asyncio.wait_for(await agree_to_transfer(session), 5)
    [result] = agent.results
    assert result.outcome is outcome and result.sip_status is None
    assert ("never rang" in result.detail) is (outcome is Out.UNREACHABLE), result.detail
    assert heard in last_said(session)
    await line.settle()
    assert humans(server) == [] and not line.on_hold
    # not in the dial's room (the fake job's room is not connected; a consult room opens as
    # it rings), the worker asked the server every ``Bounds.ring_check`` until it rang
    looks = len(server.calls_to("GetParticipant"))
    assert looks <= 3 if outcome is Out.NO_ANSWER else looks >= 5, looks


# ── the line's own view of a room: how a leg's sip.callStatus reads there ─────────────────────


def support() -> wh.Destination:
    return settings_for().destinations[0]


def dial_into(room: str, ring_timeout: float = 1.0) -> wh.Dial:
    return wh.Dial(
        room=room, identity="transfer_1", destination=support(), ring_timeout=ring_timeout
    )


@contextlib.contextmanager
def line_in(server, room: str = CALLER_ROOM):
    """A ``LiveKitPhoneLine`` whose job is connected to ``room`` on the fake server (its own
    view: ``FakeLiveKitServer.connect``), as a real job is to the caller's room."""
    with fake_job_context(room=server.connect(room)) as ctx:  # type: ignore[arg-type]
        yield wh.LiveKitPhoneLine(ctx, livekit_settings(server), bounds=TEST_BOUNDS)


@pytest.mark.parametrize(
    "script,outcome",
    [(DialScript.hang(), Out.NO_ANSWER), (DialScript.hang(rings=False), Out.UNREACHABLE)],
    ids=["rang", "never-rang"],
)
async def test_a_dial_into_a_room_the_worker_is_in_is_watched_in_its_own_view(
    livekit, script, outcome
):
    """Conference mode dials into the caller's room, where the job is: whether the phone rang
    is read there, with no server call."""
    server, _ = livekit
    server.script_dial(script)
    with line_in(server) as line:
        with pytest.raises(wh.DialFailed) as failed:
            await line.dial(dial_into(CALLER_ROOM))
        await line.settle()
    assert failed.value.outcome is outcome and failed.value.sip_status is None
    assert server.calls_to("GetParticipant") == []


async def test_a_leg_that_shows_hangup_has_hung_up_before_it_leaves_the_room(livekit):
    """livekit-sip marks a leg "hangup" as it ends the call, then closes its media and leaves
    the room (outbound.go close; ``leaves_after_hangup`` here): the line counts it gone at
    once, waiting for a hang-up or checking whether it is still there."""
    server, _ = livekit
    server.leaves_after_hangup = 3.0
    with line_in(server) as line:
        leg = await line.dial(dial_into(CALLER_ROOM))
        assert await line.wait_for_arrival(CALLER_ROOM, leg.identity, 0)
        waiting = asyncio.ensure_future(line.wait_for_hangup(CALLER_ROOM, ("caller", leg.identity)))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        server.far_end_hangs_up(CALLER_ROOM, leg.identity)
        assert await asyncio.wait_for(waiting, 1) == leg.identity
        assert leg.identity in server.rooms[CALLER_ROOM]  # still in the room, on its way out
        # and from then on: gone at once, not arrived
        again = line.wait_for_hangup(CALLER_ROOM, ("caller", leg.identity))
        assert await asyncio.wait_for(again, 0.1) == leg.identity
        arrival = line.wait_for_arrival(CALLER_ROOM, leg.identity, 5)
        assert not await asyncio.wait_for(arrival, 0.5)  # nor waits for them to come
        await line.hang_up(leg)


async def test_a_human_who_hung_up_as_a_move_failed_is_lost_not_refused(livekit):
    """After a failed move the line looks for the human (``_locate``): one still in the consult
    room whose status is "hangup" has hung up; the move is not "refused" with them there."""
    server, _ = livekit
    server.leaves_after_hangup = 5.0
    consult = f"{CALLER_ROOM}-consult-1"
    with line_in(server) as line:
        leg = await line.dial(dial_into(consult))
        server.far_end_hangs_up(consult, leg.identity)
        server.script_method("MoveParticipant", MethodFault.refuse("failed_precondition"))
        with pytest.raises(wh.LegLost):
            await line.move(leg, CALLER_ROOM)
        await line.hang_up(leg)


# ── clean-up that fails once ───────────────────────────────────────────────────────────────────
# On *.livekit.cloud the client itself tries a 5xx three times (livekit-api twirp_client.py,
# _failover.py FAILOVER_MAX_ATTEMPTS); "a 500 once" is a 500 on each of those tries.
CLIENT_TRIES = 3


def fails_once(server, method, code="internal"):
    server.script_method(method, *[MethodFault.refuse(code, "injected")] * CLIENT_TRIES)


async def test_a_clean_up_that_fails_once_after_a_decline_is_tried_again(livekit, livekit_call):
    """The human declines; RemoveParticipant (their leg) and DeleteRoom (the consult room) each
    answer 500 through all of the client's tries: both are tried again, and in the end the
    human's leg and the consult room are gone."""
    server, _ = livekit
    session, agent, line = await livekit_call(receptionist())
    turn = await agree_to_transfer(session)
    await line.human_answers()
    fails_once(server, "RemoveParticipant")
    fails_once(server, "DeleteRoom")
    line.human_presses("2")
    await asyncio.wait_for(turn, 5)
    assert agent.results[0].outcome is Out.DECLINED
    [dial] = server.calls_to("CreateSIPParticipant")
    consult_room, identity = dial.request.room_name, dial.request.participant_identity
    await line.settle()
    assert humans(server) == []
    assert consult_room not in server.rooms
    deletes = [c.answer for c in server.calls_to("DeleteRoom") if c.request.room == consult_room]
    assert deletes[:CLIENT_TRIES] == ["internal"] * CLIENT_TRIES and deletes[-1] == "ok"
    removes = [c.answer for c in server.calls_to("RemoveParticipant")]
    assert [c.request.identity for c in server.calls_to("RemoveParticipant")] == [identity] * len(
        removes
    )
    assert removes[:CLIENT_TRIES] == ["internal"] * CLIENT_TRIES
    assert removes[-1] in ("ok", "not_found")  # not_found: the room's deletion took the leg


CONSULT_ROOM = f"{CALLER_ROOM}-consult-0001"
HUMAN = "transfer_0001"


def human_in_consult_room(server, ctx):
    """A LiveKit line (the tests' bounds) and a human's leg in a consult room of its own."""
    server.add_participant(CONSULT_ROOM, HUMAN, **{"sip.callStatus": "active"})
    line = wh.LiveKitPhoneLine(ctx, livekit_settings(server), bounds=TEST_BOUNDS)
    leg = wh.Leg(HUMAN, CONSULT_ROOM, settings_for().destinations[0])
    return line, leg


END_THE_LEG = {  # each clean-up server call, and how the line makes it
    "RemoveParticipant": lambda line, leg: line.hang_up(leg),
    "DeleteRoom": lambda line, leg: line.delete_room(leg.room),
}


@pytest.mark.parametrize("method", END_THE_LEG)
async def test_a_clean_up_call_that_fails_once_is_tried_again(livekit, method):
    server, ctx = livekit
    line, leg = human_in_consult_room(server, ctx)
    fails_once(server, method)
    await END_THE_LEG[method](line, leg)
    assert [c.answer for c in server.calls_to(method)] == ["internal"] * CLIENT_TRIES + ["ok"]
    assert server.participant(CONSULT_ROOM, HUMAN) is None


@pytest.mark.parametrize("method", END_THE_LEG)
async def test_a_clean_up_call_that_keeps_failing_gives_up_within_the_bound(
    livekit, method, caplog
):
    """Tried again for ``Bounds.remove_retry``, each try bounded by ``server_call``: within
    ``Bounds.clean_up`` the line gives up, says so once, and does not raise."""
    server, ctx = livekit
    line, leg = human_in_consult_room(server, ctx)
    server.script_method(method, *[MethodFault.refuse("unavailable", "down")] * 100)
    started = time.monotonic()
    await END_THE_LEG[method](line, leg)
    took = time.monotonic() - started
    assert TEST_BOUNDS.remove_retry - 0.2 <= took <= TEST_BOUNDS.clean_up, took  # 0.2: a pause
    assert len(server.calls_to(method)) > CLIENT_TRIES  # ours, beyond the client's own
    [failed] = [r for r in caplog.records if r.name == "warm-handoff"]
    assert CONSULT_ROOM in failed.getMessage() and "unavailable" in failed.getMessage()


@pytest.mark.parametrize("method", END_THE_LEG)
@pytest.mark.parametrize("code", ["not_found", "permission_denied"])
async def test_not_found_is_done_and_another_4xx_is_final(livekit, method, code):
    """not_found: the leg or the room is already gone; another 4xx will not change on a retry
    (and the client, too, never retries a 4xx: livekit-api twirp_client.py)."""
    server, ctx = livekit
    line, leg = human_in_consult_room(server, ctx)
    server.script_method(method, MethodFault.refuse(code))
    await END_THE_LEG[method](line, leg)
    assert [c.answer for c in server.calls_to(method)] == [code]
