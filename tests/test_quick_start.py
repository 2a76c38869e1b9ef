"""Quick start: the console needs no LiveKit and no trunk; a transfer runs against the
simulated phone line and every step is shown; the greeting needs no model request; the demo
teams exist only in the console; without a terminal it says so."""

import asyncio
import logging

import pytest
from conftest import ScriptedLLM, receptionist, run_worker, settings_for, wait_for
from livekit.agents.testing import fake_job_context

import warm_handoff as wh

H = wh.SimulatedHuman
Out = wh.HandoffOutcome


@pytest.fixture(autouse=True)
def quick_human(monkeypatch):
    monkeypatch.setattr(wh.SimulatedPhoneLine, "ring_time", 0.05)
    monkeypatch.setattr(wh.SimulatedPhoneLine, "hello_after", 0.05)
    monkeypatch.setattr(wh.SimulatedPhoneLine, "decide_after", 0.05)


@pytest.mark.parametrize(
    "human,outcome,step",
    [
        (H.ANSWER, Out.CONNECTED, "support moved into console-room"),
        (H.DECLINE, Out.DECLINED, "human presses 2"),
        (H.BUSY, Out.BUSY, "support: SIP 486 Busy Here"),
        (H.NO_ANSWER, Out.NO_ANSWER, "support: SIP 480 Temporarily Unavailable"),
        (H.VOICEMAIL, Out.VOICEMAIL, "human says: Hi, you've reached the support line."),
        (H.UNREACHABLE, Out.UNREACHABLE, "support: SIP 404 Not Found"),
    ],
)
@pytest.mark.parametrize("mode", ["consult", "conference"])
async def test_console_transfer_for_every_outcome(caplog, human, outcome, step, mode):
    if mode == "conference" and human in (H.ANSWER, H.DECLINE, H.VOICEMAIL):
        outcome = Out.CONNECTED  # a three-way call has no private moment to decline in
        step = "support answered"
    env = {"SIMULATED_HUMAN": human.value, "HANDOFF_MODE": mode, "HANDOFF_RING_TIMEOUT": "5"}
    settings = wh.load_settings(env, telephony=False)  # no LiveKit settings at all
    settings = wh.Settings(**{**settings.__dict__, "ring_timeout": 0.3, "hello_grace": 0.2})
    model = ScriptedLLM(receptionist())
    caplog.set_level(logging.INFO, logger="warm-handoff")
    with fake_job_context() as ctx:  # what `console` runs the entrypoint in
        session = await wh.run_call(
            ctx, settings, wh.Models(llm=model, turn_handling={"turn_detection": "manual"})
        )
        agent = session.current_agent
        try:
            assert isinstance(agent.line, wh.SimulatedPhoneLine)
            await session.run(user_input="can I talk to someone")
            await asyncio.wait_for(session.run(user_input="yes please"), 10)
            await wait_for(lambda: agent.results)
            assert agent.results[0].outcome is outcome
            shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("📞")]
            assert "📞 dialling support (+1555•••00), ring timeout 0.3s" in shown
            assert any(line.startswith(f"📞 {step}") for line in shown), shown
            holds = [line for line in shown if line.startswith("📞 hold music o")]
            assert holds and holds.count("📞 hold music on") == holds.count("📞 hold music off")
            assert holds[-1] == "📞 hold music off"  # on while it rang, off at the end
        finally:
            await agent.line.aclose()
            await session.aclose()


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


def test_console_without_a_terminal_exits_non_zero_with_a_message():
    keys = {"DEEPGRAM_API_KEY": "x", "OPENAI_API_KEY": "x", "ELEVEN_API_KEY": "x"}
    done = run_worker("console", keys)  # stdin and stdout are not a terminal here
    assert done.returncode != 0
    assert "console needs a terminal" in done.stderr and "Traceback" not in done.stderr
