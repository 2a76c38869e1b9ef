"""A reply the framework throws away (the human talks over a preemptive generation) must not
take the brief with it: until the brief has been spoken, every reply to the human is the brief."""

import asyncio

from conftest import receptionist, wait_for

import warm_handoff as wh


async def test_brief_survives_a_discarded_first_reply(start_call):
    call = await start_call(
        receptionist(), line=wh.SimulatedPhoneLine(None, ring_time=0.05), delay=0.3
    )  # the brief is still being written when the human answers
    await call.session.run(user_input="My parcel QX-4471 never arrived")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(call.line.answered.is_set)
    consult = next(iter(call.line.consults.values()))
    call.line.human_says("Hello?")
    await asyncio.sleep(0.05)
    consult.interrupt(force=True)  # the first reply, still waiting for the brief, is dropped
    call.line.human_says("Hello, anyone there?")
    await wait_for(call.line.human_heard_anything, 5)
    assert "QX-4471" in call.human_heard()[0]
    assert call.model.of("consult") == []  # the human's words went to no model
    call.line.human_presses("1")
    await asyncio.wait_for(turn, 5)
