"""Quick start: the demo teams exist only in the console; without a terminal it says so. The
console itself, run as a user runs it, is tests/test_console.py."""

from conftest import ScriptedLLM, run_worker, settings_for
from livekit.agents.testing import fake_job_context

import warm_handoff as wh


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
