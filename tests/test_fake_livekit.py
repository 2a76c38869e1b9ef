"""The LiveKit model behaves as LiveKit does, seen through the real ``livekit.api.LiveKitAPI``
client over HTTP (under a ``*.livekit.cloud`` name, so the client's own retries apply); and its
media side, a dropped room connection and a job shutdown in livekit-agents' order."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from conftest import shut_down_like_the_framework
from livekit import api
from livekit.agents import Agent, AgentSession
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import sip as sip_pb

import warm_handoff as wh
from standins.fake_livekit import (
    API_KEY,
    API_SECRET,
    CALL_STATUS,
    DialScript,
    FakeLiveKitServer,
    MethodFault,
    RoomEvent,
)

pytestmark = pytest.mark.asyncio
ROOM = "call-room"


@pytest_asyncio.fixture
async def lk() -> AsyncIterator[FakeLiveKitServer]:
    async with FakeLiveKitServer() as server:
        yield server


@pytest_asyncio.fixture
async def lkapi(lk: FakeLiveKitServer) -> AsyncIterator[api.LiveKitAPI]:
    async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as client:
        yield client


def dial(
    identity: str = "callee",
    *,
    wait: bool = False,
    ring_timeout: int | None = None,
    dtmf: str = "",
    room: str = ROOM,
) -> sip_pb.CreateSIPParticipantRequest:
    request = sip_pb.CreateSIPParticipantRequest(
        sip_trunk_id="ST_trunk",
        sip_call_to="+15550100",
        room_name=room,
        participant_identity=identity,
        wait_until_answered=wait,
        dtmf=dtmf,
    )
    if ring_timeout is not None:
        request.ringing_timeout.seconds = ring_timeout
    return request


def statuses(lk: FakeLiveKitServer, identity: str = "callee") -> list[tuple[str, str]]:
    """(event kind, sip.callStatus) as the room's members saw them, for ``identity``."""
    return [
        (e.kind, e.attributes.get(CALL_STATUS, ""))
        for e in lk.events
        if e.identity == identity and e.kind != "room_deleted"
    ]


def at(lk: FakeLiveKitServer, kind: str, status: str, identity: str = "callee") -> float:
    return next(
        e.at
        for e in lk.events
        if e.identity == identity and e.kind == kind and e.attributes.get(CALL_STATUS) == status
    )


def remove(room: str, identity: str) -> room_pb.RoomParticipantIdentity:
    return room_pb.RoomParticipantIdentity(room=room, identity=identity)


# --- 1. dialling: the participant exists from the INVITE on --------------------------------


async def test_participant_joins_at_the_invite_and_the_response_waits_for_answer_and_dtmf(
    lk, lkapi
) -> None:
    lk.script_dial(DialScript.answer(ring=0.3))
    seen_before_answer: list[str] = []
    lk.subscribe(ROOM, lambda e: seen_before_answer.append(lk.attributes(ROOM, "callee")[
        CALL_STATUS]) if e.kind == "participant_connected" else None)  # fmt: skip
    started = time.monotonic()
    info = await lkapi.sip.create_sip_participant(dial(wait=True, dtmf="1w"))
    returned = time.monotonic()
    assert statuses(lk) == [
        ("participant_connected", "dialing"),
        ("participant_attributes_changed", "ringing"),
        ("participant_attributes_changed", "automation"),
        ("participant_attributes_changed", "active"),
    ]
    assert seen_before_answer == ["dialing"]
    # "1w": a digit and a pause, 0.5 s each (media-sdk dtmf.go), after the answer at 0.3 s
    dtmf_time = at(lk, "participant_attributes_changed", "active") - at(
        lk, "participant_attributes_changed", "automation"
    )
    assert 0.95 <= dtmf_time < 1.2
    assert returned - started >= 0.3 + 1.0
    assert returned >= at(lk, "participant_attributes_changed", "active")
    assert info.participant_identity == "callee" and info.room_name == ROOM
    assert info.participant_id.startswith("PA_") and info.sip_call_id.startswith("SCL_")
    assert "callee" in lk.rooms[ROOM] and lk.participant(ROOM, "callee").who == "person"
    [call] = lk.calls_to("CreateSIPParticipant")
    assert call.service == "SIP" and call.request.wait_until_answered
    assert call.grants.sip is not None and call.grants.sip.call


async def test_without_wait_the_response_comes_once_the_participant_has_joined(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer(ring=0.5))
    started = time.monotonic()
    info = await lkapi.sip.create_sip_participant(dial())
    assert time.monotonic() - started < 0.3
    assert info.participant_identity == "callee"
    assert lk.attributes(ROOM, "callee")[CALL_STATUS] in ("dialing", "ringing")
    await lk.wait_for(lambda: lk.attributes(ROOM, "callee").get(CALL_STATUS) == "active")
    listed = await lkapi.room.list_participants(room_pb.ListParticipantsRequest(room=ROOM))
    [p] = listed.participants
    assert p.identity == "callee" and p.kind == p.Kind.SIP
    assert p.attributes[CALL_STATUS] == "active"


# --- 2. ring timeout and SIP failures ------------------------------------------------------


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"sip_call_to": "sip:billing@pbx.example.com"}, "not a full SIP URI"),
        ({"sip_trunk_id": ""}, "missing sip trunk id"),
        ({"sip_call_to": ""}, "missing sip callee number"),
    ],
)
async def test_a_request_livekit_refuses_is_invalid_argument_and_dials_nobody(
    lk, lkapi, change, problem
) -> None:
    request = dial()
    for field, value in change.items():
        setattr(request, field, value)
    with pytest.raises(api.TwirpError) as refused:
        await lkapi.sip.create_sip_participant(request)
    assert refused.value.code == "invalid_argument" and problem in refused.value.message
    assert not lk.sip_calls and ROOM not in lk.rooms


def inline_trunk_dial(sip_number: str = "+15550100999") -> sip_pb.CreateSIPParticipantRequest:
    """A dial through an inline trunk (``trunk``, no stored trunk), as a sip: destination's."""
    request = dial()
    request.sip_trunk_id = ""
    request.trunk.hostname = "pbx.example.com:5061"
    request.sip_number = sip_number
    return request


async def test_an_inline_trunk_takes_a_bare_host_only(lk, lkapi) -> None:
    request = inline_trunk_dial()
    request.trunk.hostname = "sip:pbx.example.com;transport=tcp"
    with pytest.raises(api.TwirpError) as refused:
        await lkapi.sip.create_sip_participant(request)
    assert refused.value.code == "invalid_argument"
    request.trunk.hostname = "pbx.example.com:5061"
    await lkapi.sip.create_sip_participant(request)
    assert lk.sip_calls


async def test_an_inline_trunk_dial_with_no_number_to_show_is_refused_and_dials_nobody(
    lk, lkapi
) -> None:
    """livekit/protocol rpc/sip.go NewCreateSIPParticipantRequest: no sip_number and no stored
    trunk's numbers to pick from is psrpc FailedPrecondition, Twirp failed_precondition (HTTP
    412): a 4xx, so the client's failover does not try it again."""
    with pytest.raises(api.TwirpError) as refused:
        await lkapi.sip.create_sip_participant(inline_trunk_dial(sip_number=""))
    assert (refused.value.code, refused.value.status) == ("failed_precondition", 412)
    assert refused.value.message == "twirp error unknown: no numbers on outbound trunk"
    assert not isinstance(refused.value, api.SipCallError)  # LiveKit's refusal, no SIP status
    assert not lk.sip_calls and ROOM not in lk.rooms
    assert [c.answer for c in lk.calls_to("CreateSIPParticipant")] == ["failed_precondition"]
    await lkapi.sip.create_sip_participant(inline_trunk_dial())  # with a number: it goes out
    await lkapi.sip.create_sip_participant(dial())  # a stored trunk has numbers of its own
    assert [c.request.sip_number for c in lk.sip_calls] == ["+15550100999", ""]


async def test_ring_timeout_ends_as_canceled_without_sip_status(lk, lkapi) -> None:
    lk.script_dial(DialScript.person(ring=3.0))
    started = time.monotonic()
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True, ring_timeout=1))
    assert 1.0 <= time.monotonic() - started < 1.5
    assert not isinstance(exc.value, api.SipCallError)
    assert (exc.value.code, exc.value.status, exc.value.metadata) == ("canceled", 408, {})
    assert "callee" not in lk.rooms[ROOM]
    [call] = lk.sip_calls
    assert call.outcome == "ring_timeout" and call.answered_at is None
    assert statuses(lk)[-1] == ("participant_disconnected", "ringing")
    assert lk.events[-1].reason == "USER_UNAVAILABLE"
    assert lk.cancelled_dials == []  # timed out by the ring window, not cancelled by anyone


@pytest.mark.parametrize(
    "code,twirp_code,reason",
    [
        (486, "resource_exhausted", "USER_REJECTED"),  # as livekit-sip 1.8.0 answered
        (480, "resource_exhausted", "USER_UNAVAILABLE"),
        # the room sees the call status's reason (outbound.go close -> CloseWithReason):
        # any other 4xx is callRejected; a 5xx callDropped, whose UNKNOWN_REASON the server
        # takes as CLIENT_INITIATED (livekit-server pkg/rtc/signalling/signalhandler.go)
        (410, "not_found", "USER_REJECTED"),
        (603, "permission_denied", "USER_REJECTED"),
        (503, "failed_precondition", "CLIENT_INITIATED"),
    ],
)
async def test_sip_failure_is_a_sip_call_error_and_the_participant_leaves(
    lk, lkapi, code, twirp_code, reason
) -> None:
    lk.script_dial(DialScript.sip_error(code, delay=0.1))
    with pytest.raises(api.SipCallError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True))
    assert exc.value.sip_status_code == code and exc.value.code == twirp_code
    assert 400 <= exc.value.status < 500  # never retried by the client
    assert len(lk.calls_to("CreateSIPParticipant")) == 1
    assert [k for k, _ in statuses(lk)] == [
        "participant_connected",
        "participant_attributes_changed",
        "participant_disconnected",
    ]
    assert lk.events[-1].reason == reason and "callee" not in lk.rooms[ROOM]


async def test_no_final_response_is_canceled_without_sip_status(lk, lkapi) -> None:
    lk.script_dial(DialScript.canceled(delay=0.05))
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True))
    assert not isinstance(exc.value, api.SipCallError)
    assert (exc.value.code, exc.value.status) == ("canceled", 408)
    assert exc.value.message == "transaction failed to complete (1 intermediate responses)"
    assert lk.events[-1].reason == "USER_UNAVAILABLE"  # transactionTimeoutError: callUnavailable


async def test_a_far_end_that_never_rings_stays_dialing_to_the_ring_timeout(lk, lkapi) -> None:
    """Only 100 Trying (a phone switched off, a dead route behind a proxy): livekit-sip sets
    "ringing" only on a 18x (outbound.go sipSignal), so the leg is "dialing" until the ring
    timeout ends it, with the same error as a phone that rang out."""
    lk.script_dial(DialScript.hang(rings=False))
    started = time.monotonic()
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True, ring_timeout=1))
    assert 1.0 <= time.monotonic() - started < 1.5
    assert (exc.value.code, exc.value.message, exc.value.metadata) == (
        "canceled",
        "sip request timed out",
        {},
    )
    assert statuses(lk) == [
        ("participant_connected", "dialing"),
        ("participant_disconnected", "dialing"),
    ]
    assert lk.events[-1].reason == "USER_UNAVAILABLE"
    assert lk.sip_calls[0].outcome == "ring_timeout"


async def test_an_invite_nobody_answers_at_all_ends_at_timer_b(lk, lkapi) -> None:
    """Not even 100 Trying (a host that is down): sipgo ends the INVITE transaction at Timer B,
    32 s (shortened here), before a longer ring timeout; errors.go transactionTimeoutError."""
    lk.invite_timer_b = 0.5
    lk.script_dial(DialScript.no_response())
    started = time.monotonic()
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True, ring_timeout=5))
    assert 0.5 <= time.monotonic() - started < 1.0
    assert (exc.value.code, exc.value.message) == (
        "canceled",
        "transaction failed to complete (0 intermediate responses)",
    )
    assert [s for _, s in statuses(lk)] == ["dialing", "dialing"]
    assert lk.events[-1].reason == "USER_UNAVAILABLE"
    assert lk.sip_calls[0].outcome == "no_final_response"
    # a 100 Trying stops Timer B: the ring timeout alone ends that one
    lk.script_dial(DialScript.hang(rings=False))
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial("c2", wait=True, ring_timeout=1))
    assert exc.value.message == "sip request timed out"
    assert lk.sip_calls[1].outcome == "ring_timeout"


async def test_a_refusal_without_ringing_sets_no_ringing_status(lk, lkapi) -> None:
    lk.script_dial(DialScript.sip_error(480, delay=0.2, rings=False))
    with pytest.raises(api.SipCallError) as exc:
        await lkapi.sip.create_sip_participant(dial(wait=True))
    assert exc.value.sip_status_code == 480
    assert [s for _, s in statuses(lk)] == ["dialing", "dialing"]


async def test_a_far_end_hang_up_shows_as_hangup_before_the_participant_leaves(lk, lkapi) -> None:
    """livekit/sip outbound.go close: "hangup" first, the room closed after stopSIP and
    media.Close (``leaves_after_hangup``); the leave follows."""
    lk.leaves_after_hangup = 0.3
    await lkapi.sip.create_sip_participant(dial(wait=True))
    lk.far_end_hangs_up(ROOM, "callee")
    assert lk.attributes(ROOM, "callee")[CALL_STATUS] == "hangup"
    await lk.wait_for(lambda: "callee" not in lk.rooms[ROOM], 2)
    hung_up = at(lk, "participant_attributes_changed", "hangup")
    assert at(lk, "participant_disconnected", "hangup") - hung_up >= 0.3
    assert lk.events[-1].reason == "CLIENT_INITIATED"
    await lk.wait_for(lambda: lk.sip_calls[0].ended, 1)


async def test_a_connection_of_ones_own_sees_the_room_as_rtc_room_does(lk, lkapi) -> None:
    """``connect``: the members already there, then each join, attribute change and leave, in
    the order and with the arguments ``livekit.rtc.Room`` emits them; deleting the room ends
    the connection itself."""
    lk.add_participant(ROOM, "caller")
    room = lk.connect(ROOM)
    assert room.isconnected() and set(room.remote_participants) == {"caller"}
    assert "agent" in lk.rooms[ROOM]  # the others see it
    seen: list[tuple] = []
    room.on("participant_connected", lambda p: seen.append(("joined", p.identity)))
    room.on(
        "participant_attributes_changed",
        lambda changed, p: seen.append(("changed", p.identity, changed, dict(p.attributes))),
    )
    room.on("participant_disconnected", lambda p: seen.append(("left", p.identity)))
    room.on("disconnected", lambda reason: seen.append(("disconnected", reason)))
    lk.script_dial(DialScript.answer(ring=0.1))
    await lkapi.sip.create_sip_participant(dial(wait=True))
    assert room.remote_participants["callee"].attributes[CALL_STATUS] == "active"
    lk.far_end_hangs_up(ROOM, "callee")
    await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room=ROOM))
    assert seen[0] == ("joined", "callee")
    changes = [(e[2], e[3][CALL_STATUS]) for e in seen if e[0] == "changed"]
    assert changes == [
        ({CALL_STATUS: "ringing"}, "ringing"),
        ({CALL_STATUS: "active"}, "active"),
        ({CALL_STATUS: "hangup"}, "hangup"),
    ]
    assert seen[-3:] == [
        ("left", "callee"),
        ("left", "caller"),
        ("disconnected", models.DisconnectReason.ROOM_DELETED),
    ]
    assert not room.isconnected() and "callee" not in room.remote_participants


# --- 3. removing the participant ---------------------------------------------------------


async def test_remove_while_ringing_cancels_the_invite(lk, lkapi) -> None:
    lk.script_dial(DialScript.hang())
    pending = asyncio.ensure_future(lkapi.sip.create_sip_participant(dial(wait=True)))
    await lk.wait_for(lambda: lk.attributes(ROOM, "callee").get(CALL_STATUS) == "ringing")
    await lkapi.room.remove_participant(remove(ROOM, "callee"))
    with pytest.raises(api.ServerError) as exc:
        await asyncio.wait_for(pending, 1)
    # livekit/sip outbound.go sipSignal -> sipResponse: psrpc.Canceled "sip request timed out"
    assert (exc.value.code, exc.value.message, exc.value.metadata) == (
        "canceled",
        "sip request timed out",
        {},
    )
    assert lk.cancelled_dials == ["callee"] and lk.sip_calls[0].outcome == "cancelled"
    assert lk.events[-1].kind == "participant_disconnected"
    assert lk.events[-1].reason == "PARTICIPANT_REMOVED"


async def test_remove_before_the_participant_exists_is_not_found_and_the_invite_goes_out(
    lkapi,
) -> None:
    async with FakeLiveKitServer(join_delay=0.3) as lk:
        async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as client:
            pending = asyncio.ensure_future(client.sip.create_sip_participant(dial(wait=True)))
            await lk.wait_for(lambda: lk.calls_to("CreateSIPParticipant"))
            with pytest.raises(api.ServerError) as exc:
                await client.room.remove_participant(remove(ROOM, "callee"))
            assert exc.value.code == "not_found"
            await asyncio.wait_for(pending, 2)  # the phone rang and was answered anyway
            assert lk.attributes(ROOM, "callee")[CALL_STATUS] == "active"
            assert lk.sip_calls[0].up and lk.cancelled_dials == []


# --- 4. one identity, one participant ----------------------------------------------------


async def test_a_second_participant_with_the_same_identity_replaces_the_first(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer(), DialScript.hang())
    await lkapi.sip.create_sip_participant(dial(wait=True))
    first = lk.sip_calls[0]
    assert first.up
    await lkapi.sip.create_sip_participant(dial())  # a new INVITE, same identity
    await lk.wait_for(lambda: not first.up)
    assert first.end_reason == "DUPLICATE_IDENTITY"  # the first phone was hung up
    assert lk.participant(ROOM, "callee").call is lk.sip_calls[1]
    # and a ringing first call ends too: its pending dial gets `canceled`
    lk.script_dial(DialScript.hang())
    ringing = asyncio.ensure_future(lkapi.sip.create_sip_participant(dial("c2", wait=True)))
    await lk.wait_for(lambda: lk.attributes(ROOM, "c2").get(CALL_STATUS) == "ringing")
    lk.add_participant(ROOM, "c2")
    with pytest.raises(api.ServerError) as exc:
        await asyncio.wait_for(ringing, 1)
    assert exc.value.code == "canceled" and lk.cancelled_dials == ["c2"]


# --- 5. the real client: timeouts and retries on *.livekit.cloud --------------------------


async def test_the_server_is_reached_under_a_livekit_cloud_name(lk, lkapi) -> None:
    assert lk.url.startswith("http://test-project.livekit.cloud:")
    assert socket.getaddrinfo("test-project.livekit.cloud", 80)[0][4][0] == "127.0.0.1"
    await lkapi.room.list_rooms(room_pb.ListRoomsRequest())
    assert lk.calls_to("ListRooms")[0].host == f"test-project.livekit.cloud:{lk.port}"
    await lk.stop()
    with pytest.raises(socket.gaierror):  # only while the server runs
        socket.getaddrinfo("test-project.livekit.cloud", 80)


async def test_dial_http_timeout_is_ring_timeout_plus_two_seconds(lk, lkapi) -> None:
    lk.script_method("CreateSIPParticipant", MethodFault.hang())  # the response never comes
    lk.script_dial(DialScript.answer(ring=0.2))
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await lkapi.sip.create_sip_participant(dial(wait=True, ring_timeout=1))
    assert 3.0 <= time.monotonic() - started < 3.5
    assert len(lk.calls_to("CreateSIPParticipant")) == 1  # 3 s < 5 s: no retry
    await lk.wait_for(lambda: lk.aborted_requests == lk.calls_to("CreateSIPParticipant"))
    assert lk.sip_calls[0].up  # the server carried on: the phone was answered


async def test_a_lost_dial_response_is_retried_as_a_new_invite_to_the_same_person(
    lk, lkapi
) -> None:
    lk.script_dial(DialScript.answer(ring=0.1, drop_response=True), DialScript.answer(ring=0.1))
    info = await lkapi.sip.create_sip_participant(dial(wait=True, ring_timeout=10))
    tries = lk.calls_to("CreateSIPParticipant")
    assert len(tries) == 2 and len({t.request_id for t in tries}) == 1 and tries[0].request_id
    assert tries[0].response_lost and tries[1].host != tries[0].host  # failed over
    first, second = lk.sip_calls
    assert first.answered_at is not None and not first.up  # answered, then replaced
    assert first.end_reason == "DUPLICATE_IDENTITY" and second.up
    assert info.sip_call_id == second.sip_call_id


async def test_5xx_is_retried_up_to_three_tries_sharing_one_request_id(lk, lkapi) -> None:
    lk.script_dial(*[DialScript.server_error()] * 3)
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial())
    assert (exc.value.code, exc.value.status) == ("internal", 500)
    tries = lk.calls_to("CreateSIPParticipant")
    assert len(tries) == 3 and len({t.request_id for t in tries}) == 1
    assert "callee" not in lk.rooms.get(ROOM, {})  # failed before joining: nobody rang


async def test_a_self_hosted_url_is_never_retried() -> None:
    async with FakeLiveKitServer(cloud=False) as lk:
        assert lk.url.startswith("http://127.0.0.1:")
        lk.script_dial(DialScript.server_error())
        async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as client:
            with pytest.raises(api.ServerError):
                await client.sip.create_sip_participant(dial())
        assert len(lk.calls_to("CreateSIPParticipant")) == 1


async def test_a_timeout_is_retried_when_the_request_timeout_is_at_least_5s(lk, lkapi) -> None:
    lk.script_method("CreateSIPParticipant", MethodFault.hang())  # the first response is lost
    started = time.monotonic()
    await lkapi.sip.create_sip_participant(dial(), timeout=5)
    assert 5.0 <= time.monotonic() - started < 7.0  # one full timeout, then the retry
    first, second = lk.calls_to("CreateSIPParticipant")
    assert first.request_id == second.request_id
    await lk.wait_for(lambda: first.aborted)
    assert [c.end_reason for c in lk.sip_calls] == ["DUPLICATE_IDENTITY", ""]  # two INVITEs


async def test_room_service_requests_have_no_client_timeout(lk) -> None:
    # livekit-api twirp_client.py passes timeout=None to aiohttp, which (3.14) means "no
    # timeout", not the session's: a hanging RoomService call waits forever.
    lk.add_participant("a", "caller")
    lk.script_method("DeleteRoom", MethodFault.hang())
    async with api.LiveKitAPI(
        lk.url, API_KEY, API_SECRET, timeout=aiohttp.ClientTimeout(total=0.2)
    ) as client:
        pending = asyncio.ensure_future(
            client.room.delete_room(room_pb.DeleteRoomRequest(room="a"))
        )
        await asyncio.sleep(1.0)
        assert not pending.done()
        pending.cancel()
    assert len(lk.calls_to("DeleteRoom")) == 1


async def test_below_5s_a_transport_error_is_not_retried(lk, lkapi) -> None:
    lk.script_method("CreateSIPParticipant", MethodFault.lose_response())
    with pytest.raises(aiohttp.ClientError):
        await lkapi.sip.create_sip_participant(dial(), timeout=4.9)
    assert len(lk.calls_to("CreateSIPParticipant")) == 1


async def test_a_client_abort_does_not_stop_the_call(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer(ring=0.3))
    task = asyncio.ensure_future(lkapi.sip.create_sip_participant(dial(wait=True)))
    await lk.wait_for(lambda: lk.attributes(ROOM, "callee").get(CALL_STATUS) == "ringing")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await lk.wait_for(lambda: lk.aborted_requests)
    await lk.wait_for(lambda: lk.attributes(ROOM, "callee").get(CALL_STATUS) == "active")
    assert lk.cancelled_dials == [] and lk.sip_calls[0].up


# --- 6. scripted faults of other methods ---------------------------------------------------


async def test_method_faults_hang_slow_and_lost_response(lk, lkapi) -> None:
    for room in ("a", "b", "c"):
        lk.add_participant(room, "caller")
    lk.script_method("DeleteRoom", MethodFault.hang())
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(lkapi.room.delete_room(room_pb.DeleteRoomRequest(room="a")), 0.5)
    assert "a" in lk.rooms  # nothing happened
    lk.script_method("DeleteRoom", MethodFault.slow(0.3))
    started = time.monotonic()
    await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room="b"))
    assert time.monotonic() - started >= 0.3 and "b" not in lk.rooms
    # removed, then the response is lost: the client's retry finds nobody
    lk.script_method("RemoveParticipant", MethodFault.lose_response())
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.remove_participant(remove("c", "caller"))
    assert exc.value.code == "not_found" and "caller" not in lk.rooms["c"]
    assert [c.response_lost for c in lk.calls_to("RemoveParticipant")] == [True, False]


# --- 7. moving a participant ---------------------------------------------------------------


async def test_move_leaves_the_source_then_joins_the_destination_then_answers(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer())
    await lkapi.sip.create_sip_participant(dial(wait=True, room="consult"))
    started = time.monotonic()
    await lkapi.room.move_participant(
        room_pb.MoveParticipantRequest(room="consult", identity="callee", destination_room=ROOM)
    )
    answered = time.monotonic()
    left = next(e for e in lk.events if e.kind == "participant_disconnected")
    joined = [e for e in lk.events if e.kind == "participant_connected" and e.room == ROOM]
    assert left.room == "consult" and left.reason == "MIGRATION"
    assert joined[0].at - left.at >= 0.2 and answered >= joined[0].at
    assert answered - started >= 0.2
    assert lk.participant(ROOM, "callee").call.up  # the call stayed up
    assert lk.attributes(ROOM, "callee")[CALL_STATUS] == "active"
    assert set(lk.rooms["consult"]) == set()


async def test_a_lost_move_response_is_retried_and_gets_not_found(lk, lkapi) -> None:
    lk.add_participant("consult", "human")
    lk.script_method("MoveParticipant", MethodFault.lose_response())
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.move_participant(
            room_pb.MoveParticipantRequest(room="consult", identity="human", destination_room="a")
        )
    assert exc.value.code == "not_found"
    assert "human" in lk.rooms["a"]  # the move happened
    assert len(lk.calls_to("MoveParticipant")) == 2


async def test_move_refused_when_unsupported() -> None:
    async with FakeLiveKitServer(cloud=False, move_supported=False) as lk:
        lk.add_participant("a", "caller")
        async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as client:
            with pytest.raises(api.ServerError) as exc:
                await client.room.move_participant(
                    room_pb.MoveParticipantRequest(
                        room="a", identity="caller", destination_room="b"
                    )
                )
        assert (exc.value.code, exc.value.status) == ("unknown", 500)
        assert "not implemented" in exc.value.message
        assert set(lk.rooms["a"]) == {"caller"} and "b" not in lk.rooms


# --- 8. what a room's members observe ----------------------------------------------------


async def test_subscribers_see_joins_status_changes_leaves_and_room_deletion(lk, lkapi) -> None:
    seen: list[RoomEvent] = []
    unsubscribe = lk.subscribe(ROOM, seen.append)
    lk.add_participant("elsewhere", "someone")
    lk.script_dial(DialScript.answer(), DialScript.hang())
    await lkapi.sip.create_sip_participant(dial(wait=True))
    pending = asyncio.ensure_future(lkapi.sip.create_sip_participant(dial("c2", wait=True)))
    await lk.wait_for(lambda: lk.attributes(ROOM, "c2").get(CALL_STATUS) == "ringing")
    await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room=ROOM))
    with pytest.raises(api.ServerError) as exc:
        await asyncio.wait_for(pending, 1)  # the ringing leg ended with the room
    assert exc.value.code == "canceled"
    assert [
        (e.kind, e.identity, e.reason) for e in seen if e.kind != "participant_attributes_changed"
    ] == [
        ("participant_connected", "callee", ""),
        ("participant_connected", "c2", ""),
        ("participant_disconnected", "callee", "ROOM_DELETED"),
        ("participant_disconnected", "c2", "ROOM_DELETED"),
        ("room_deleted", "", ""),
    ]
    assert not lk.sip_calls[0].up and lk.sip_calls[1].outcome == "cancelled"
    assert lk.deleted_rooms == [ROOM] and ROOM not in lk.rooms
    unsubscribe()
    lk.add_participant(ROOM, "late")
    assert seen[-1].kind == "room_deleted"
    assert lk.attributes(ROOM, "late") == {} and lk.attributes("nowhere", "x") == {}


async def test_the_far_end_hanging_up_sets_hangup_then_leaves(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer(hangs_up_after=0.1))
    await lkapi.sip.create_sip_participant(dial(wait=True))
    await lk.wait_for(lambda: "callee" not in lk.rooms[ROOM])
    assert statuses(lk)[-2:] == [
        ("participant_attributes_changed", "hangup"),
        ("participant_disconnected", "hangup"),
    ]
    assert lk.events[-1].reason == "CLIENT_INITIATED"


# --- 9. who answers ----------------------------------------------------------------------


async def test_who_answers_sets_the_answer_timing_and_label(lk, lkapi) -> None:
    lk.script_dial(DialScript.voicemail(ring=0.4), DialScript.pbx(), DialScript.silent(ring=0.1))
    await lkapi.sip.create_sip_participant(dial("vm", wait=True))
    await lkapi.sip.create_sip_participant(dial("pbx", wait=True, dtmf="101"))
    await lkapi.sip.create_sip_participant(dial("quiet", wait=True))
    vm, pbx, quiet = lk.sip_calls
    assert [c.who for c in lk.sip_calls] == ["voicemail", "pbx", "silent"]
    assert lk.participant(ROOM, "vm").who == "voicemail"
    assert vm.answered_at - vm.invite_at >= 0.4
    assert pbx.answered_at - pbx.invite_at < 0.05  # answers at once, then the extension
    assert 1.45 <= pbx.active_at - pbx.answered_at < 1.7  # "101" as DTMF: 0.5 s each
    assert ("participant_attributes_changed", "automation") in statuses(lk, "pbx")
    assert DialScript.voicemail().ring >= 20  # a real voicemail picks up after 20-30 s


# --- auth and configuration (unchanged behaviour) ------------------------------------------


async def test_wrong_secret_is_refused_before_twirp_as_livekit_server_does(lk) -> None:
    """livekit-server's auth middleware answers a bad token with a plain-text 401, not a Twirp
    error: the client sees code "unknown" and status 401 (the real stack showed it)."""
    async with api.LiveKitAPI(lk.url, API_KEY, "x" * 40) as bad:
        with pytest.raises(api.ServerError) as exc:
            await bad.sip.create_sip_participant(dial())
    assert (exc.value.code, exc.value.status) == ("unknown", 401)
    assert lk.calls == [] and lk.rejected == [("CreateSIPParticipant", "unauthenticated")]


async def test_token_without_sip_call_grant_is_refused(lk) -> None:
    token = (
        api.AccessToken(API_KEY, API_SECRET)
        .with_grants(api.VideoGrants(room_admin=True, room=ROOM))  # scoped, as LiveKit requires
        .to_jwt()
    )
    async with api.LiveKitAPI.with_token(token, lk.url) as weak:
        with pytest.raises(api.ServerError) as exc:
            await weak.sip.create_sip_participant(dial())
        assert (exc.value.code, exc.value.status) == ("permission_denied", 403)
        # The same token may administer rooms.
        lk.add_participant(ROOM, "caller")
        await weak.room.remove_participant(remove(ROOM, "caller"))
    assert set(lk.rooms[ROOM]) == set()


async def test_room_grants_are_scoped_as_livekit_checks_them(lk) -> None:
    """livekit/livekit pkg/service/auth.go: roomAdmin counts only for the token's own room, and
    listing rooms needs roomList."""
    token = (
        api.AccessToken(API_KEY, API_SECRET).with_grants(api.VideoGrants(room_admin=True)).to_jwt()
    )
    lk.add_participant(ROOM, "caller")
    async with api.LiveKitAPI.with_token(token, lk.url) as unscoped:
        with pytest.raises(api.ServerError) as exc:
            await unscoped.room.remove_participant(remove(ROOM, "caller"))
        assert exc.value.code == "permission_denied"
        with pytest.raises(api.ServerError) as exc:
            await unscoped.room.list_rooms(room_pb.ListRoomsRequest())
        assert exc.value.code == "permission_denied"
    assert set(lk.rooms[ROOM]) == {"caller"}


async def test_room_service_state(lk, lkapi) -> None:
    lk.add_participant("a", "caller")
    listed = await lkapi.room.list_rooms(room_pb.ListRoomsRequest())
    assert [r.name for r in listed.rooms] == ["a"] and listed.rooms[0].num_participants == 1
    await lkapi.room.update_participant(
        room_pb.UpdateParticipantRequest(room="a", identity="caller", attributes={"k": "v"})
    )
    assert lk.attributes("a", "caller") == {"k": "v"}
    await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room="a"))
    assert lk.deleted_rooms == ["a"] and "a" not in lk.rooms
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room="a"))
    assert exc.value.code == "not_found"
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.remove_participant(remove("a", "ghost"))
    assert exc.value.code == "not_found"


async def test_env_configures_a_default_client(lk, monkeypatch) -> None:
    for name, value in lk.env().items():
        monkeypatch.setenv(name, value)
    lk.add_participant("agent-room", "agent")
    async with api.LiveKitAPI() as from_env:  # what JobContext.api builds
        listed = await from_env.room.list_participants(
            room_pb.ListParticipantsRequest(room="agent-room")
        )
    assert [p.identity for p in listed.participants] == ["agent"]
    assert lk.calls_to("ListParticipants")[0].grants.video.room_admin


# ── the media side: a dropped room connection, a job shutdown in livekit-agents' order ───────
# (checked on the simulated line the LiveKit-backed test line extends)


async def test_a_dropped_connection_ends_waiting_without_a_participant_left_event():
    # livekit rtc: Room emits "disconnected" and no participant_disconnected for the others;
    # beta/workflows/warm_transfer.py treats it as the other side gone
    line = wh.SimulatedPhoneLine(None)
    line.rooms["consult"] = {"transfer_1"}
    waiting = asyncio.ensure_future(line.wait_for_hangup("consult", ("transfer_1",)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    line.drop_connection("consult")
    assert await asyncio.wait_for(waiting, 1) == "transfer_1"
    assert line.rooms["consult"] == {"transfer_1"}  # nobody left the room: we did


async def test_a_job_shutdown_closes_the_session_then_leaves_the_room_then_runs_callbacks():
    # ipc/job_proc_lazy_main.py _shutdown_job: session.aclose() (up to 60 s), then
    # room.disconnect(), then the shutdown callbacks
    order: list[str] = []
    line = wh.SimulatedPhoneLine(None)
    session = AgentSession()
    session.on("close", lambda _: order.append("session closed"))
    await session.start(agent=Agent(instructions="test"))
    left = asyncio.ensure_future(line.wait_for_hangup(line.caller_room, (line.caller_identity,)))

    async def callback(reason: str) -> None:
        await asyncio.sleep(0.05)  # the room's "disconnected" reaches its waiters
        order.append(f"callback ({reason}), room left: {left.done()}")

    await shut_down_like_the_framework(session, line, [callback])
    assert order == ["session closed", "callback (shutdown), room left: True"]
