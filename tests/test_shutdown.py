"""Every bound fits inside the framework's shutdown. A job shut down in livekit-agents' order
(``shut_down_like_the_framework``: the caller's session closed first, then the room left, then
the shutdown callbacks, the process killed ``shutdown_process_timeout`` after the session's
close) while a server call hangs still tells the caller why the call ends, at once, and leaves
no leg when the process ends.

Each test runs a call on the LiveKit-backed line (every dial, move, remove, delete and look-up
through livekit-api to the fake server, standins/fake_livekit.py), makes one server call hang
(``MethodFault.hang``: never answered, nothing done), shuts the job down while it hangs, and
reads what is left on the server when the process ends."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from typing import Any

import pytest
from conftest import (
    CALLER_ROOM,
    LiveKitBackedLine,
    shut_down_like_the_framework,
    wait_for,
)
from livekit.agents import llm
from livekit.agents.worker import ServerOptions

import warm_handoff as wh
from standins.fake_livekit import DialScript, MethodFault

Out = wh.HandoffOutcome
# Nothing the caller's ending waits for may hang: it is said within this of the shutdown.
AT_ONCE = 1.0


class CallerEar:
    """Each sentence the caller hears, with when: the caller's session's words, and what the
    line plays in their room outside the session (``PhoneLine.announce``, "caller hears: ")."""

    def __init__(self, session: wh.CallerSession, line: LiveKitBackedLine) -> None:
        self.line = line
        self.said: list[tuple[float, str]] = []
        session.on("conversation_item_added", self._on_item)

    def _on_item(self, ev: Any) -> None:
        item = ev.item
        if isinstance(item, llm.ChatMessage) and item.role == "assistant" and item.text_content:
            self.said.append((time.monotonic(), item.text_content))

    def heard(self) -> list[tuple[float, str]]:
        played = [
            (e.at, e.text.removeprefix("caller hears: "))
            for e in self.line.events
            if e.text.startswith("caller hears: ")
        ]
        return sorted(self.said + played)

    def ending_heard_within(self, since: float) -> float:
        """How long after ``since`` the caller heard the ending (the test fails if never)."""
        endings = [at for at, text in self.heard() if text == wh.CALL_ENDING and at >= since]
        assert endings, [text for _, text in self.heard()]
        return endings[0] - since


def legs_left(server) -> list[str]:
    """Every leg of the call still on the server: the caller in their room, and each human's
    phone that rings or is off the hook."""
    caller = ["caller"] if "caller" in server.rooms.get(CALLER_ROOM, {}) else []
    return caller + [c.identity for c in server.sip_calls if not c.ended]


async def transfer(livekit_call, **settings):
    """A call whose caller asks for a person and agrees; returns the running turn too (the
    transfer tool runs in it)."""
    session, agent, line = await livekit_call(**settings)
    ear = CallerEar(session, line)
    await session.run(user_input="a person please")
    turn = asyncio.ensure_future(session.run(user_input="yes"))
    return session, agent, line, ear, turn


async def shut_down(session, agent, line, turn=None):
    """The job shut down in the framework's order, ``finish_call`` its shutdown callback (as
    ``run_call`` registers it); returns when the process ends."""
    done = await shut_down_like_the_framework(
        session,
        line,
        [lambda reason: wh.finish_call(agent, agent.records)],
        kill_after=wh.JOB_SHUTDOWN_TIMEOUT,
    )
    if turn is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(turn, 1)
    return done


def ended_within_the_frameworks_time(done) -> None:
    """The call's own ending (the caller's session's close) took less than the framework's
    shutdown timeout, counted from the shutdown request: whichever moment the framework's
    clock counts from, the caller was told and every leg ended before it ran out."""
    assert done.closed - done.started < wh.JOB_SHUTDOWN_TIMEOUT, done
    assert not done.killed, done


async def human_presses_1(line) -> None:
    await wait_for(line.answered.is_set)
    await line.human_answers()
    line.human_presses("1")


# ── the bounds ─────────────────────────────────────────────────────────────────────────────


def test_the_shutdown_bounds_come_from_the_frameworks():
    # livekit-agents' ServerOptions.shutdown_process_timeout (worker.py)
    framework = ServerOptions.__dataclass_fields__["shutdown_process_timeout"].default
    assert wh.JOB_SHUTDOWN_TIMEOUT == framework
    bounds = wh.Bounds()
    assert bounds.shutdown == framework
    clock = wh.ShutdownClock(bounds)
    words, legs, own = clock.words_until - clock.start, clock.legs, clock.deadline - clock.start
    # the call's own ending leaves the framework, within its time, its own close of the
    # caller's session (the wait for their last words) and leaving the room
    assert own == pytest.approx(framework - bounds.last_words - wh.ShutdownClock.FRAMEWORK_STEPS)
    assert 0 < own < framework and 0 < legs < own and words == pytest.approx(own - legs)
    # the caller's ending and the human's are said in full, at a voice's unhurried pace
    assert wh.spoken_seconds(wh.CALL_ENDING) < words
    assert wh.spoken_seconds(wh.HUMAN_CALL_ENDS) < words
    # the records' sending, after ShuttingDown, ends before the kill too
    budget = inspect.signature(wh.finish_call).parameters["budget"].default
    assert budget < framework


# ── a server call that hangs at shutdown, one test each ────────────────────────────────────


async def test_a_move_that_hangs_at_shutdown(livekit, livekit_call):
    """The human pressed 1 and MoveParticipant is never answered. The move is given up: the
    human, still in the consult room, is told; the caller hears the ending at once; both rooms
    go before the process ends."""
    server, _ = livekit
    server.script_method("MoveParticipant", MethodFault.hang(), room=CALLER_ROOM)
    session, agent, line, ear, turn = await transfer(livekit_call)
    await human_presses_1(line)
    await server.wait_for(lambda: server.calls_to("MoveParticipant"))

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    assert line.human_heard()[-1] == wh.HUMAN_CALL_ENDS
    ended_within_the_frameworks_time(done)
    [result] = agent.results
    assert result.outcome is Out.FAILED and result.phase is wh.Phase.MERGING


async def test_a_look_up_that_hangs_at_shutdown(livekit, livekit_call):
    """The move's answer was lost (it happened: the human is in the caller's room), so the
    worker looks for the human, and GetParticipant is never answered. The look is given up:
    the caller, and the human now with them, hear the ending at once; the caller's room goes."""
    server, _ = livekit
    server.script_method("MoveParticipant", MethodFault.lose_response(), room=CALLER_ROOM)
    server.script_method("GetParticipant", MethodFault.hang(), room=CALLER_ROOM)
    session, agent, line, ear, turn = await transfer(livekit_call)
    await human_presses_1(line)
    await server.wait_for(
        lambda: any(c.request.room == CALLER_ROOM for c in server.calls_to("GetParticipant"))
    )

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    ended_within_the_frameworks_time(done)


async def test_a_dial_that_hangs_at_shutdown(livekit, livekit_call):
    """CreateSIPParticipant is never answered while the human's phone rings: the dial is given
    up, the phone stops ringing, the caller hears the ending at once."""
    server, _ = livekit
    server.script_dial(DialScript.hang())
    server.script_method("CreateSIPParticipant", MethodFault.hang())
    session, agent, line, ear, turn = await transfer(livekit_call)
    await server.wait_for(lambda: any(c.ringing for c in server.sip_calls))
    await wait_for(lambda: line.on_hold)

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert server.sip_calls[0].outcome == "cancelled"  # it rang out nowhere: CANCEL
    assert ear.ending_heard_within(done.started) < AT_ONCE
    ended_within_the_frameworks_time(done)


async def test_a_remove_that_hangs_at_shutdown(livekit, livekit_call):
    """The shutdown comes as the dial is sent, before its SIP participant has joined the
    consult room (livekit-sip joins before the INVITE): deleting the room finds nobody, and the
    first RemoveParticipant is never answered. It is sent again, and the phone stops ringing."""
    server, _ = livekit
    server.join_delay = 0.5
    server.script_dial(DialScript.hang())
    server.script_method("RemoveParticipant", MethodFault.hang())
    session, agent, line, ear, turn = await transfer(livekit_call)
    await server.wait_for(lambda: server.calls_to("CreateSIPParticipant"))

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert server.sip_calls[0].outcome == "cancelled"
    assert ear.ending_heard_within(done.started) < AT_ONCE
    ended_within_the_frameworks_time(done)


async def test_a_room_deletion_that_hangs_at_shutdown(livekit, livekit_call):
    """DeleteRoom of the caller's room is never answered: it is sent again, and the caller's
    leg ends before the process does."""
    server, _ = livekit
    server.script_dial(DialScript.hang())
    server.script_method("DeleteRoom", MethodFault.hang(), room=CALLER_ROOM)
    session, agent, line, ear, turn = await transfer(livekit_call)
    await server.wait_for(lambda: any(c.ringing for c in server.sip_calls))
    await wait_for(lambda: line.on_hold)

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert CALLER_ROOM in server.deleted_rooms
    assert ear.ending_heard_within(done.started) < AT_ONCE
    ended_within_the_frameworks_time(done)


class AttributesNeverSet(LiveKitBackedLine):
    """The agent's attribute updates (the dashboard's ``handoff.*``) are never answered:
    ``LocalParticipant.set_attributes`` waits for the server's answer with no timeout of its own
    (livekit rtc ``participant.py``)."""

    async def set_attributes(self, room, attributes):
        await asyncio.Event().wait()


async def test_an_attribute_update_that_hangs_at_shutdown(livekit, livekit_call):
    """The human is being briefed and every attribute update hangs: the caller's ending does
    not wait for the dashboard."""
    server, _ = livekit
    session, agent, line, ear, turn = await transfer(livekit_call, line_type=AttributesNeverSet)
    await wait_for(line.answered.is_set)
    await line.human_answers()

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    assert line.human_heard()[-1] == wh.HUMAN_CALL_ENDS
    ended_within_the_frameworks_time(done)


# ── a bridged call, and a call already merged ──────────────────────────────────────────────


class RelaysNeverStart(LiveKitBackedLine):
    """The bridge's relays never start: publishing the worker's track in a room waits for the
    server's answer (livekit rtc ``LocalParticipant.publish_track``)."""

    async def bridge(self, leg, room):
        await asyncio.Event().wait()


async def test_a_bridge_that_hangs_at_shutdown(livekit, livekit_call):
    """Self-hosted LiveKit: the human pressed 1 and the bridge is being set up when the job
    shuts down. The caller hears the ending at once, the human (still in the consult room) is
    told, both rooms go."""
    server, _ = livekit
    session, agent, line, ear, turn = await transfer(
        livekit_call, join_way=wh.JoinWay.BRIDGE, line_type=RelaysNeverStart
    )
    await human_presses_1(line)
    await wait_for(lambda: agent.handoff is not None and agent.handoff.phase is wh.Phase.MERGING)

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    assert line.human_heard()[-1] == wh.HUMAN_CALL_ENDS
    consult = line.dials[0].room
    assert {CALLER_ROOM, consult} <= set(server.deleted_rooms)
    ended_within_the_frameworks_time(done)


@pytest.mark.parametrize("way", ["move", "bridge"])
@pytest.mark.parametrize("agent_is", ["parked", "gone"])
async def test_a_merged_call_at_shutdown_hears_the_ending(livekit, livekit_call, way, agent_is):
    """The caller and the human are talking, the agent parked in the caller's room
    (``HANDOFF_REJOIN_WINDOW``) or gone (its session closed: it can say nothing any more). At
    shutdown the caller still hears the ending, played in their room by the line (a moved human
    with them hears it there; a bridged human hears theirs in their room, where the bridge
    stops); then both rooms go."""
    server, _ = livekit
    session, agent, line, ear, turn = await transfer(
        livekit_call,
        join_way=wh.JoinWay(way),
        rejoin_window=30.0 if agent_is == "parked" else 0.0,
    )
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    await human_presses_1(line)
    await asyncio.wait_for(turn, 8)
    [result] = agent.results
    assert result.outcome is Out.CONNECTED
    if agent_is == "gone":
        await asyncio.wait_for(closed.wait(), 5)
        with pytest.raises(RuntimeError):  # the session can say nothing any more
            session.say("anything")
    else:
        assert not session.output.audio_enabled  # parked

    done = await shut_down(session, agent, line)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    if way == "bridge":
        assert line.human_heard()[-1] == wh.HUMAN_CALL_ENDS
        assert line.bridged == {}  # the bridge stopped
        assert "bridge closed" in [e.text for e in line.events]
        assert result.leg is not None and result.leg.room in server.deleted_rooms
    assert CALLER_ROOM in server.deleted_rooms
    ended_within_the_frameworks_time(done)


async def test_a_session_already_closing_still_lets_the_caller_hear_the_ending(
    livekit, livekit_call
):
    """The caller's session began to close during the transfer (``session.shutdown()``: its
    activity drains, waiting for the running transfer tool, and ``say`` raises "AgentSession is
    closing"); then the job shuts down. The line plays the ending in the caller's room."""
    server, _ = livekit
    server.script_dial(DialScript.hang())
    session, agent, line, ear, turn = await transfer(livekit_call)
    await server.wait_for(lambda: any(c.ringing for c in server.sip_calls))
    await wait_for(lambda: line.on_hold)
    session.shutdown()
    await asyncio.sleep(0.1)
    with pytest.raises(RuntimeError, match="closing"):
        session.say("anything")

    done = await shut_down(session, agent, line, turn)
    assert legs_left(server) == []
    assert ear.ending_heard_within(done.started) < AT_ONCE
    assert wh.CALL_ENDING not in [text for _, text in ear.said]  # not by the session
    ended_within_the_frameworks_time(done)
