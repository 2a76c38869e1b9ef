"""Hanging up: the receptionist ends the call when the caller is done (goodbye, the caller's room
deleted, the call record `completed`), never while the caller is on hold or being moved."""

import asyncio
import json
import logging

from conftest import (
    CALLER_ROOM,
    Call,
    RecordingLine,
    receptionist,
    wait_for,
)

import warm_handoff as wh

GOODBYE = "Thank you for calling Acme. Goodbye!"


def done_caller(req):
    """The receptionist's model, which ends the call whenever the caller says bye."""
    if req.purpose == "caller" and "bye" in req.last_user_text().lower() and not req.after_tool:
        return Call("end_call", {})
    return receptionist()(req)


def call_records(caplog) -> list[dict]:
    return [
        json.loads(r.getMessage().split(" record ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("call record")
    ]


def end_call_outputs(call) -> list[str]:
    return [
        item.output
        for item in call.session.history.items
        if item.type == "function_call_output" and item.name == "end_call"
    ]


async def test_goodbye_then_the_room_is_deleted_and_the_call_is_completed(start_call, caplog):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    call = await start_call(done_caller)
    closed = asyncio.Event()
    call.session.on("close", lambda _: closed.set())
    await asyncio.wait_for(call.session.run(user_input="that's all, thanks, bye"), 5)
    assert call.caller_heard()[-1] == GOODBYE
    await asyncio.wait_for(closed.wait(), 5)  # the agent's session ends
    await wait_for(lambda: call.line.deleted_rooms)
    assert call.line.deleted_rooms == [call.line.caller_room]  # the caller's leg ends with it
    assert [(r["outcome"], r["room"]) for r in call_records(caplog)] == [
        ("completed", call.line.caller_room)
    ]


async def test_the_caller_room_is_deleted_on_the_livekit_server(livekit, livekit_call):
    server, _ = livekit
    call = await livekit_call(done_caller)
    await asyncio.wait_for(call.session.run(user_input="bye"), 5)
    await wait_for(lambda: server.deleted_rooms)
    assert server.deleted_rooms == [CALLER_ROOM] and CALLER_ROOM not in server.rooms


async def test_never_hangs_up_on_a_caller_on_hold(start_call, caplog):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    call = await start_call(done_caller, line=RecordingLine(None, ring_time=0.5))
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(lambda: call.line.on_hold)
    asked = len(call.model.of("caller"))
    call.session.generate_reply(user_input="ok, bye for now")  # on hold
    await wait_for(lambda: call.caller_heard()[-1].startswith("I'm still trying our support"))
    assert len(call.model.of("caller")) == asked  # the model is not even asked
    await call.line.human_accepts()
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is wh.HandoffOutcome.CONNECTED
    assert call.line.caller_room not in call.line.deleted_rooms
    assert end_call_outputs(call) == [] and call_records(caplog) == []


class SlowMove(RecordingLine):
    """The server takes its time moving the human into the caller's room."""

    def __init__(self) -> None:
        super().__init__(None, ring_time=0.05)
        self.moving = asyncio.Event()
        self.release = asyncio.Event()

    async def move(self, leg, room):
        self.moving.set()
        await self.release.wait()
        await super().move(leg, room)


async def test_never_hangs_up_mid_transfer(start_call, caplog):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    line = SlowMove()
    call = await start_call(done_caller, line=line)
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await line.human_accepts()
    await wait_for(line.moving.is_set)  # merging: the caller's words reach the model again
    try:
        call.session.generate_reply(user_input="bye")
        await wait_for(lambda: end_call_outputs(call))
        refused = "The caller is being transferred: the call was not ended."
        assert end_call_outputs(call) == [refused]
        assert line.caller_room not in line.deleted_rooms and GOODBYE not in call.caller_heard()
    finally:
        line.release.set()  # the move finishes either way
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is wh.HandoffOutcome.CONNECTED
    assert call_records(caplog) == []  # the call goes on, between the two people
