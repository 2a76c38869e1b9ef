"""The caller's number comes from the trunk's ``sip.phoneNumber``, which may be missing or not
E.164: only a valid E.164 number reaches the human's INVITE or a callback request."""

import asyncio

import pytest
from conftest import (
    Call,
    RecordingLine,
    receptionist,
    start_livekit_call,
    wait_for,
)

import warm_handoff as wh

NOT_E164 = [
    {},
    {"sip.phoneNumber": ""},
    {"sip.phoneNumber": "anonymous"},
    {"sip.phoneNumber": "5105550100"},
    {"sip.phoneNumber": "15105550100"},
    {"sip.phoneNumber": "+1 510 555 0100"},
    {"sip.phoneNumber": "+15105550100\n"},
]
IDS = ["missing", "empty", "anonymous", "national", "no-plus", "spaced", "newline"]


def test_only_an_e164_number_as_given_is_the_callers_number():
    assert wh.sip_caller_number({"sip.phoneNumber": "+15105550199"}) == "+15105550199"
    for attributes in NOT_E164:
        assert wh.sip_caller_number(attributes) == ""


async def dial_with_headers(livekit, number: str) -> dict[str, str]:
    server, _ = livekit
    session, agent, _ = await start_livekit_call(
        livekit, caller_number=number, handoff_mode=wh.HandoffMode.CONFERENCE
    )
    try:
        await session.run(user_input="a person please")
        await asyncio.wait_for(session.run(user_input="yes"), 5)
        return dict(server.calls_to("CreateSIPParticipant")[0].request.headers)
    finally:
        await session.aclose()


@pytest.mark.parametrize("attributes", NOT_E164, ids=IDS)
async def test_no_caller_number_header_unless_the_trunk_gave_e164(livekit, attributes):
    headers = await dial_with_headers(livekit, wh.sip_caller_number(attributes))
    assert "X-Caller-Number" not in headers and headers["X-Handoff-Destination"] == "support"


@pytest.mark.parametrize("number", ["anonymous", "+1 510 555 0100"])
async def test_a_line_with_a_number_that_is_not_e164_sends_no_header(livekit, number):
    headers = await dial_with_headers(livekit, number)
    assert "X-Caller-Number" not in headers


@pytest.mark.parametrize("attributes", NOT_E164, ids=IDS)
async def test_a_callback_asks_for_the_number_when_the_trunk_gave_none(start_call, attributes):
    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            if req.after_tool:
                return "What number should we call, with the area code?"
            return Call("request_callback", {"name": "Dana", "best_time": "tomorrow"})
        return "Okay."

    line = RecordingLine(None, caller_number=wh.sip_caller_number(attributes))
    call = await start_call(respond, line=line)
    await call.session.run(user_input="yes, call me back: Dana, tomorrow")
    outputs = [i.output for i in call.session.history.items if i.type == "function_call_output"]
    assert outputs == ["Ask for the number to call, with the area code."]
    assert call.agent.records.callbacks == []
    assert not any("Let me read that back" in t for t in call.caller_heard())


@pytest.mark.parametrize("number", ["", "anonymous", "5105550100"])
async def test_a_caller_who_hangs_up_on_hold_leaves_a_callback_without_a_bad_number(
    start_call, number
):
    line = RecordingLine(None, ring_time=10, caller_number=number)
    call = await start_call(receptionist(), line=line)
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(lambda: line.on_hold)
    line.hang_up_caller()
    await asyncio.wait_for(turn, 5)
    [request] = call.agent.records.callbacks
    assert (request.source, request.number) == ("abandoned", "")
