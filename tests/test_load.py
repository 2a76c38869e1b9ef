"""50 simulated calls at once in one process, each with a handoff, with hang-ups and failures
injected at random phases (seeded, so a failure reproduces): every call ends with exactly one
outcome and leaves nothing behind."""

import asyncio
import gc
import random

from conftest import ScriptedLLM, receptionist, settings_for, wait_for
from livekit.agents import AgentSession

import warm_handoff as wh

H = wh.SimulatedHuman
Out = wh.HandoffOutcome
CALLS = 50
SEED = 20261125

SCENARIOS = {
    # name: (what the simulated human does, expected outcome)
    "accept": (None, Out.CONNECTED),
    "decline": (None, Out.DECLINED),
    "busy": (H.BUSY, Out.BUSY),
    "no_answer": (H.NO_ANSWER, Out.NO_ANSWER),
    "unreachable": (H.UNREACHABLE, Out.UNREACHABLE),
    "voicemail": (None, Out.VOICEMAIL),
    "caller_hangs_up_ringing": (None, Out.CALLER_LEFT),
    "caller_hangs_up_briefing": (None, Out.CALLER_LEFT),
    "human_hangs_up_briefing": (None, Out.DECLINED),
    "never_mind_ringing": (None, Out.CANCELLED_BY_CALLER),
    "shutdown_ringing": (None, Out.FAILED),
    "move_refused": (None, Out.FAILED),
}
OURS = ("Handoff.", "WarmHandoffAgent.", "ConsultAgent.", "SimulatedPhoneLine.")


async def one_call(i: int, scenario: str, mode: wh.HandoffMode, rng: random.Random):
    human, _ = SCENARIOS[scenario]
    line = wh.SimulatedPhoneLine(
        human,
        ring_time=rng.uniform(0.02, 0.3),
        caller_room=f"call-{i}",
        move_supported=scenario != "move_refused",
    )
    if scenario.endswith("_ringing"):
        line.ring_time = 5.0  # long enough for the fault to land while it rings
    settings = settings_for(handoff_mode=mode, ring_timeout=2.0, hello_grace=0.1)
    agent = wh.WarmHandoffAgent(
        settings,
        line,
        wh.Models(
            llm=ScriptedLLM(receptionist(), delay=rng.uniform(0, 0.05)),
            turn_handling={"turn_detection": "manual"},
        ),
    )
    session = AgentSession()
    await session.start(agent=agent)
    try:
        await session.run(user_input="a person please")
        turn = asyncio.ensure_future(session.run(user_input="yes please"))
        await asyncio.sleep(rng.uniform(0, 0.05))
        if scenario.endswith("_ringing"):
            await wait_for(lambda: line.on_hold, 10)
            if scenario.startswith("caller"):
                line.hang_up_caller()
            elif scenario.startswith("never"):
                session.generate_reply(user_input="never mind")
            else:
                await agent.shutdown_handoff()
        elif human is None and mode is wh.HandoffMode.CONSULT:
            await wait_for(line.answered.is_set, 10)
            if scenario == "voicemail":
                line.human_says("Please leave a message after the tone.")
            else:
                line.human_says("Hello?")
                await wait_for(line.human_heard_anything, 10)
                await asyncio.sleep(rng.uniform(0, 0.05))
                {
                    "accept": lambda: line.human_presses("1"),
                    "move_refused": lambda: line.human_presses("1"),
                    "decline": lambda: line.human_presses("2"),
                    "caller_hangs_up_briefing": line.hang_up_caller,
                    "human_hangs_up_briefing": line.hang_up_human,
                }[scenario]()
        await asyncio.wait_for(turn, 15)
        if agent.results and agent.results[0].connected:
            (line.hang_up_caller if rng.random() < 0.5 else line.hang_up_human)()
            await asyncio.wait_for(agent._leaving, 5)
        return agent, line
    finally:
        await agent.shutdown_handoff("the test is over")
        await line.aclose()
        await session.aclose()


def expected(scenario: str, mode: wh.HandoffMode) -> wh.HandoffOutcome:
    human, outcome = SCENARIOS[scenario]
    if mode is wh.HandoffMode.CONFERENCE and human is None and not scenario.endswith("_ringing"):
        return Out.CONNECTED  # a three-way call is merged on answer: nothing private to fail
    return outcome


async def test_fifty_concurrent_calls_each_end_with_one_outcome_and_nothing_left():
    rng = random.Random(SEED)
    modes = [wh.HandoffMode.CONSULT, wh.HandoffMode.CONFERENCE]
    plan = [(s, m) for s in sorted(SCENARIOS) for m in modes]  # every scenario in both modes
    plan += [(rng.choice(sorted(SCENARIOS)), rng.choice(modes)) for _ in range(CALLS - len(plan))]
    rng.shuffle(plan)
    unhandled: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        done = await asyncio.wait_for(
            asyncio.gather(
                *(
                    one_call(i, scenario, mode, random.Random(SEED + i))
                    for i, (scenario, mode) in enumerate(plan)
                )
            ),
            60,
        )
        await asyncio.sleep(0.2)
        gc.collect()  # surfaces "exception was never retrieved" from dropped tasks
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)

    for (scenario, mode), (agent, line) in zip(plan, done, strict=True):
        label = f"{scenario}/{mode.value}"
        await line.settle()
        assert len(agent.results) == 1, label  # exactly one outcome per call
        assert agent.results[0].outcome is expected(scenario, mode), (label, agent.results)
        assert line.legs() == [], label  # no human leg anywhere
        assert not any("-consult-" in room for room in line.rooms), label
        assert not line.on_hold, label
        assert line.consults == {}, label
    assert len(plan) == CALLS
    leftovers = [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().__qualname__.startswith(OURS)
    ]
    assert leftovers == []
    assert unhandled == []
