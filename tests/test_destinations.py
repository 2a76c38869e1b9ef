"""Destinations: the model is offered only the configured teams and never dials a number the
caller says; HANDOFF_ALLOW_DIAL_PATTERN opts in to direct numbers, and cannot hurt the worker."""

import asyncio
import re
import time
from pathlib import Path

import pytest
from conftest import Call, RecordingLine, settings_for
from test_configuration import GOOD

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent


async def test_transfer_tool_offers_only_configured_destinations(start_call):
    call = await start_call(lambda req: "Hello")
    await call.session.run(user_input="hi")
    tools = {getattr(t, "id", None): t for t in call.agent.tools}
    # no free-form dialling tool without an allowlist
    assert set(tools) == {"transfer_call", "request_callback", "end_call"}
    schema = tools["transfer_call"].info.raw_schema
    assert schema["parameters"]["properties"]["destination"]["enum"] == ["support", "billing"]
    assert schema["parameters"]["additionalProperties"] is False
    assert sorted(call.model.requests[0].tools) == ["end_call", "request_callback", "transfer_call"]


@pytest.mark.parametrize(
    "destination",
    [
        "+15551234567",
        "support; +15551234567",
        "sip:attacker@evil.example",
        "Support",
        "",
    ],
)
async def test_a_spoken_or_injected_number_is_never_dialled(start_call, destination):
    def respond(req):
        if req.purpose == "caller" and "connect me" in req.last_user_text():
            return Call("transfer_call", {"destination": destination, "reason": "asked"})
        return "I can only connect you to our listed teams."

    call = await start_call(respond)
    await call.session.run(user_input="connect me to +1 555 123 4567 please")
    assert call.line.dials == []
    outputs = [i for i in call.session.history.items if i.type == "function_call_output"]
    assert "There is no team called" in outputs[0].output


def allowlist_settings():
    return settings_for(allow_dial_pattern=re.compile(r"\+1510555\d{4}"))


@pytest.mark.parametrize(
    "number,dialled",
    [
        ("+1 (510) 555-0142", True),
        ("+19005550142", False),
        ("911", False),
    ],
)
async def test_direct_numbers_only_with_the_operator_allowlist(start_call, number, dialled):
    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("call"):
            return Call("transfer_to_number", {"number": number, "reason": "asked"})
        if req.purpose == "brief":
            return "A caller."
        return "Okay."

    line = RecordingLine(wh.SimulatedHuman.BUSY, ring_time=0.01)
    call = await start_call(respond, line=line, settings=allowlist_settings())
    await call.session.run(user_input="call my colleague please")
    assert [d.destination.target for d in line.dials] == (["+15105550142"] if dialled else [])
    output = next(i for i in call.session.history.items if i.type == "function_call_output")
    refused = "not one you are allowed to connect to" in output.output
    assert refused is not dialled  # the tool ran, and refused exactly the numbers not allowed


async def test_allowlist_only_offers_just_the_direct_tool(start_call):
    call = await start_call(
        lambda req: "Hello",
        settings=settings_for(destinations=(), allow_dial_pattern=re.compile(r"\+1510555\d{4}")),
    )
    assert sorted(getattr(t, "id", None) for t in call.agent.tools) == [
        "end_call",
        "request_callback",
        "transfer_to_number",
    ]


# ── the dial pattern and the caller's number ────────────────────────────────────────────────


async def direct_dial(start_call, settings, number):
    def respond(req):
        if req.purpose == "caller" and not req.after_tool:
            return Call("transfer_to_number", {"number": number, "reason": "a friend"})
        return "Sorry, I can't connect you to that number."

    call = await start_call(respond, settings=settings)
    stalls: list[float] = []

    async def heartbeat() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            stalls.append(time.monotonic() - before)

    beat = asyncio.ensure_future(heartbeat())
    try:
        await asyncio.wait_for(call.session.run(user_input=f"please call {number}"), 30)
    finally:
        beat.cancel()
    return call, max(stalls, default=0.0)


@pytest.mark.parametrize(
    "pattern",
    [
        r"\+(1?){9}(1?){9}(1?){9}[02-9]",  # backtracks catastrophically in Python's re
        r"\+(?:(\d*)\1)*(?:(\d*)\2)*(?:(\d*)\3)*(?:(\d*)\4)*(?:(\d*)\5)*[02-9]",  # in regex
    ],
)
async def test_a_catastrophic_dial_pattern_never_blocks_the_event_loop(start_call, pattern):
    settings = wh.load_settings({**GOOD, "HANDOFF_ALLOW_DIAL_PATTERN": pattern}, telephony=False)
    settings = settings_for(allow_dial_pattern=settings.allow_dial_pattern)
    call, stalled = await direct_dial(start_call, settings, "+11111111111111")
    assert stalled < 0.5, f"the event loop stalled for {stalled:.1f}s"
    assert call.line.dials == []  # refused


async def test_transfer_to_number_takes_only_ascii_digits(start_call):
    import re

    settings = settings_for(allow_dial_pattern=re.compile(r"\+1510555\d{4}"))
    call, _ = await direct_dial(start_call, settings, "+1510555٠١٢٣")
    assert call.line.dials == []
