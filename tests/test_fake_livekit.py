"""The fake LiveKit server works with the real ``livekit.api.LiveKitAPI`` client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from fake_livekit import API_KEY, API_SECRET, DialScript, FakeLiveKitServer
from livekit import api
from livekit.protocol import room as room_pb
from livekit.protocol import sip as sip_pb

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def lk() -> AsyncIterator[FakeLiveKitServer]:
    async with FakeLiveKitServer() as server:
        yield server


@pytest_asyncio.fixture
async def lkapi(lk: FakeLiveKitServer) -> AsyncIterator[api.LiveKitAPI]:
    async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as client:
        yield client


def dial(identity: str = "callee", *, wait: bool = False) -> sip_pb.CreateSIPParticipantRequest:
    return sip_pb.CreateSIPParticipantRequest(
        sip_trunk_id="ST_trunk",
        sip_call_to="+15550100",
        room_name="call-room",
        participant_identity=identity,
        wait_until_answered=wait,
    )


async def eventually(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_answer_records_request_and_returns_info(lk, lkapi) -> None:
    lk.script_dial(DialScript.answer(delay=0.3))
    started = time.monotonic()
    info = await lkapi.sip.create_sip_participant(dial(wait=True))
    assert time.monotonic() - started >= 0.3
    assert info.participant_identity == "callee" and info.room_name == "call-room"
    assert info.participant_id.startswith("PA_") and info.sip_call_id.startswith("SCL_")
    assert lk.rooms == {"call-room": {"callee"}}
    [call] = lk.calls_to("CreateSIPParticipant")
    assert call.service == "SIP"
    assert call.request.sip_call_to == "+15550100"
    assert call.request.sip_trunk_id == "ST_trunk"
    assert call.request.wait_until_answered
    assert call.grants.sip is not None and call.grants.sip.call


async def test_busy_raises_sip_call_error(lk, lkapi) -> None:
    lk.script_dial(DialScript.sip_error(486))
    with pytest.raises(api.SipCallError) as exc:
        await lkapi.sip.create_sip_participant(dial())
    assert exc.value.sip_status_code == 486
    assert exc.value.sip_status == "Busy Here"
    assert 400 <= exc.value.status < 500  # not retried by the client's failover
    assert "callee" not in lk.rooms.get("call-room", set())


async def test_cancel_without_sip_status_is_plain_server_error(lk, lkapi) -> None:
    lk.script_dial(DialScript.canceled())
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial())
    assert not isinstance(exc.value, api.SipCallError)
    assert (exc.value.code, exc.value.status) == ("canceled", 408)


async def test_wrong_secret_is_unauthenticated(lk) -> None:
    async with api.LiveKitAPI(lk.url, API_KEY, "x" * 40) as bad:
        with pytest.raises(api.ServerError) as exc:
            await bad.sip.create_sip_participant(dial())
    assert (exc.value.code, exc.value.status) == ("unauthenticated", 401)
    assert lk.calls == [] and lk.rejected == [("CreateSIPParticipant", "unauthenticated")]


async def test_token_without_sip_call_grant_is_refused(lk) -> None:
    token = (
        api.AccessToken(API_KEY, API_SECRET).with_grants(api.VideoGrants(room_admin=True)).to_jwt()
    )
    async with api.LiveKitAPI.with_token(token, lk.url) as weak:
        with pytest.raises(api.ServerError) as exc:
            await weak.sip.create_sip_participant(dial())
        assert (exc.value.code, exc.value.status) == ("permission_denied", 403)
        # The same token may administer rooms.
        lk.add_participant("call-room", "caller")
        await weak.room.remove_participant(
            room_pb.RoomParticipantIdentity(room="call-room", identity="caller")
        )
    assert lk.rooms["call-room"] == set()


async def test_room_service_state(lk, lkapi) -> None:
    lk.add_participant("a", "caller")
    await lkapi.room.move_participant(
        room_pb.MoveParticipantRequest(room="a", identity="caller", destination_room="b")
    )
    assert lk.rooms == {"a": set(), "b": {"caller"}}
    listed = await lkapi.room.list_rooms(room_pb.ListRoomsRequest())
    assert sorted(r.name for r in listed.rooms) == ["a", "b"]
    await lkapi.room.delete_room(room_pb.DeleteRoomRequest(room="b"))
    assert lk.deleted_rooms == ["b"] and "b" not in lk.rooms
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.remove_participant(
            room_pb.RoomParticipantIdentity(room="a", identity="ghost")
        )
    assert exc.value.code == "not_found"


async def test_move_refused_when_unsupported(lk, lkapi) -> None:
    lk.move_supported = False
    lk.add_participant("a", "caller")
    with pytest.raises(api.ServerError) as exc:
        await lkapi.room.move_participant(
            room_pb.MoveParticipantRequest(room="a", identity="caller", destination_room="b")
        )
    assert (exc.value.code, exc.value.status) == ("unimplemented", 501)
    assert lk.rooms == {"a": {"caller"}}


async def test_cancelled_dial_is_recorded(lk, lkapi) -> None:
    lk.script_dial(DialScript.hang())
    task = asyncio.create_task(lkapi.sip.create_sip_participant(dial("c1", wait=True)))
    await eventually(lambda: len(lk.calls) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: lk.cancelled_dials == ["c1"])
    assert "c1" not in lk.rooms.get("call-room", set())


async def test_client_timeout_on_hang_is_recorded(lk, lkapi) -> None:
    lk.script_dial(DialScript.hang())
    with pytest.raises(asyncio.TimeoutError):
        await lkapi.sip.create_sip_participant(dial("c2"), timeout=0.2)
    await eventually(lambda: lk.cancelled_dials == ["c2"])


async def test_server_error_surfaces_quickly(lk, lkapi) -> None:
    lk.script_dial(DialScript.server_error())
    started = time.monotonic()
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial())
    assert time.monotonic() - started < 1.0
    assert (exc.value.code, exc.value.status) == ("internal", 500)
    assert len(lk.calls_to("CreateSIPParticipant")) == 1  # 127.0.0.1 is never failed over


async def test_every_retry_attempt_is_counted(lk, lkapi) -> None:
    lk.script_dial(*[DialScript.server_error()] * 3)
    # Internal test knobs of the client: fail over (retry) even for a non-cloud host.
    lkapi.sip._client._failover_force = True
    lkapi.sip._client._failover_backoff = 0.01
    with pytest.raises(api.ServerError) as exc:
        await lkapi.sip.create_sip_participant(dial())
    assert exc.value.status == 500
    attempts = lk.calls_to("CreateSIPParticipant")
    assert len(attempts) == 3
    assert len({a.request_id for a in attempts}) == 1 and attempts[0].request_id


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
