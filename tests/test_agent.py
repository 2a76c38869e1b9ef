"""The caller's side: greeted once, offered only configured teams, never dials a spoken number."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Call, ScriptedLLM, settings_for, wait_for
from livekit.agents.testing import fake_job_context

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent


async def test_entrypoint_greets_once_before_any_model_request():
    model = ScriptedLLM(lambda req: "Sure, how can I help?")
    settings = settings_for(greeting="Thanks for calling Acme, how can I help?")
    with fake_job_context() as ctx:
        session = await wh.run_call(
            ctx,
            settings,
            wh.Models(llm=model, turn_handling={"turn_detection": "manual"}),
            wh.SimulatedPhoneLine(None),
        )
        try:
            await wait_for(lambda: any(m.role == "assistant" for m in session.history.messages()))
            assert model.requests == []  # the greeting needed no model round-trip
            await session.run(user_input="Hi, my router is blinking red")
            said = [m.text_content for m in session.history.messages() if m.role == "assistant"]
            assert said == ["Thanks for calling Acme, how can I help?", "Sure, how can I help?"]
            assert len(model.requests) == 1
            assert model.requests[0].last_user_text() == "Hi, my router is blinking red"
        finally:
            await session.aclose()


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

    line = wh.SimulatedPhoneLine(wh.SimulatedHuman.BUSY, ring_time=0.01)
    call = await start_call(respond, line=line, settings=allowlist_settings())
    await call.session.run(user_input="call my colleague please")
    assert [d.destination.target for d in line.dials] == (["+15105550142"] if dialled else [])


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


async def test_demo_destinations_exist_only_in_the_console():
    model = ScriptedLLM(lambda req: "Hi")
    settings = settings_for(destinations=())
    with fake_job_context() as ctx:
        session = await wh.run_call(ctx, settings, wh.Models(llm=model))
        try:
            assert [d.name for d in session.current_agent.destinations] == ["support", "billing"]
        finally:
            await session.aclose()
    agent = wh.WarmHandoffAgent(settings, wh.SimulatedPhoneLine(None), wh.Models())
    assert [t.id for t in agent.tools] == ["end_call", "request_callback"]  # nobody to transfer to


def test_agent_name_from_the_dotenv_file_reaches_the_dispatcher(tmp_path):
    env_file = tmp_path / "worker.env"
    env_file.write_text("AGENT_NAME=acme-reception\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AGENT_NAME", "LIVEKIT_AGENT_NAME")}
    out = subprocess.run(
        [sys.executable, "-c", "import warm_handoff; print(warm_handoff.server._agent_name)"],
        env={**env, "DOTENV_FILE": str(env_file)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "acme-reception", out.stderr
