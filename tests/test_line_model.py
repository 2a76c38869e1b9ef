"""The media side of the test model of LiveKit, checked on its own so it cannot drift from the
real client: a dropped room connection, and a job shutdown in livekit-agents' order. (The
server side is checked in tests/test_fake_livekit.py.)"""

import asyncio

from conftest import shut_down_like_the_framework
from livekit.agents import Agent, AgentSession

import warm_handoff as wh


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
