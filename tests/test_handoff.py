"""The warm handoff on the simulated phone line, end to end through the real AgentSession."""

import asyncio

import pytest
from conftest import (
    Call,
    RecordingLine,
    agree_to_transfer,
    brief_model_down,
    receptionist,
    settings_for,
    wait_for,
)

import warm_handoff as wh

H = wh.SimulatedHuman
Out = wh.HandoffOutcome


async def ask_for_transfer(call):
    return await agree_to_transfer(call.session, "I want to talk to a person", "yes please")


def function_outputs(call):
    return [i.output for i in call.session.history.items if i.type == "function_call_output"]


async def assert_line_clean(line, *, merged=False):
    await line.settle()  # clean-up's server calls run in the background, bounded
    assert not line.on_hold
    assert not any("-consult-" in room for room in line.rooms)  # consult rooms deleted
    if not merged:
        assert line.legs() == []


def voice_consult(phrases):
    """The consult model: calls the tool matching what the human said."""

    def respond(req):
        said = req.last_user_text().lower()
        for phrase, reply in phrases.items():
            if phrase in said:
                return reply
        return "They're calling about their printer."

    return respond


@pytest.mark.parametrize("how", ["keypad", "voice"])
async def test_accept_moves_the_human_in_and_the_agent_leaves(start_call, how):
    consult = voice_consult({"put them through": Call("connect_to_caller", {})})
    call = await start_call(receptionist(consult=consult))
    closed = asyncio.Event()
    call.session.on("close", lambda _: closed.set())
    turn = await ask_for_transfer(call)
    await call.line.human_answers("Hello, support, Sam speaking.")
    if how == "keypad":
        call.line.human_presses("1")
    else:
        call.line.human_says("Sure, put them through.")
    await asyncio.wait_for(turn, 5)

    [result] = call.agent.results
    assert result.outcome is Out.CONNECTED
    human = call.line.dials[0].identity
    assert call.line.rooms["console-room"] == {"caller", human}  # moved into the caller's room
    assert call.caller_heard()[-1] == "You're now connected with our support team."
    await assert_line_clean(call.line, merged=True)
    await asyncio.wait_for(closed.wait(), 2)  # the agent has left the call
    await asyncio.sleep(0.05)
    assert "console-room" in call.line.rooms  # open while both are on the line


@pytest.mark.parametrize("who", ["caller", "human"])
async def test_caller_room_is_deleted_when_either_hangs_up_after_merge(start_call, who):
    call = await start_call(receptionist())
    turn = await ask_for_transfer(call)
    await call.line.human_accepts()
    await asyncio.wait_for(turn, 5)
    (call.line.hang_up_caller if who == "caller" else call.line.hang_up_human)()
    await wait_for(lambda: "console-room" in call.line.deleted_rooms, 2)
    await call.line.settle()
    assert call.line.legs() == []


async def test_brief_carries_what_only_the_caller_said_and_needs_no_model_after_hello(start_call):
    call = await start_call(receptionist())
    await call.session.run(user_input="My order number is QX-4471 and the box arrived crushed")
    turn = await ask_for_transfer(call)
    await wait_for(call.line.answered.is_set)
    brief_requests = len(call.model.of("brief"))
    assert brief_requests == 1  # composed while the phone rang
    await call.line.human_answers()
    brief = call.human_heard()[0]
    assert "QX-4471" in brief and "crushed" in brief
    assert call.model.of("consult") == []  # spoken without a model request after the hello
    assert "QX-4471" not in " ".join(call.caller_heard())  # the caller never hears the brief
    call.line.human_presses("1")
    await asyncio.wait_for(turn, 5)


async def test_brief_falls_back_to_the_callers_words_when_the_model_fails(start_call):
    call = await start_call(brief_model_down)
    await call.session.run(user_input="My name is Dana Whitfield")
    turn = await ask_for_transfer(call)
    await call.line.human_answers()
    assert "Dana Whitfield" in call.human_heard()[0]
    call.line.human_presses("2")
    await asyncio.wait_for(turn, 5)


async def test_a_silent_human_is_briefed_after_a_short_pause(start_call):
    call = await start_call(receptionist())
    turn = await ask_for_transfer(call)
    await wait_for(call.line.answered.is_set)
    await wait_for(lambda: call.human_heard(), timeout=3)  # hello_grace is 0.5 s in tests
    assert call.human_heard()[0].startswith("Hi, this is the Acme assistant")
    call.line.human_presses("1")
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CONNECTED


@pytest.mark.parametrize("how", ["keypad", "voice"])
async def test_decline_brings_the_caller_back_with_the_reason(start_call, how):
    consult = voice_consult({"can't": Call("decline_transfer", {"reason": "in a meeting until 3"})})
    call = await start_call(receptionist(consult=consult))
    turn = await ask_for_transfer(call)
    await call.line.human_answers()
    if how == "keypad":
        call.line.human_presses("2")
    else:
        call.line.human_says("Sorry, I can't take it right now.")
    await asyncio.wait_for(turn, 5)

    assert call.agent.results[0].outcome is Out.DECLINED
    reason = "declined on the keypad" if how == "keypad" else "in a meeting until 3"
    assert reason in function_outputs(call)[-1]  # the caller-side agent knows why
    assert call.caller_heard()[-1].startswith("I'm sorry, our support team can't take your call")
    assert call.human_heard()[-1] == "Understood, I'll let the caller know. Thank you, goodbye."
    await assert_line_clean(call.line)
    assert call.session.input.audio_enabled
    # the caller is back in a working conversation
    await call.session.run(user_input="ok what now")
    assert call.caller_heard()[-1] == "Shall I connect you with our support team?"


async def test_voicemail_is_not_briefed(start_call):
    call = await start_call(receptionist())
    turn = await ask_for_transfer(call)
    await wait_for(call.line.answered.is_set)
    call.line.human_says("You've reached Sam. Please leave a message after the tone.")
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.VOICEMAIL
    assert call.human_heard() == []  # nothing about the caller is left on a voicemail
    assert "voicemail" in call.caller_heard()[-1]
    await assert_line_clean(call.line)


@pytest.mark.parametrize(
    "human,outcome,heard",
    [
        (H.BUSY, Out.BUSY, "I'm sorry, our support team is on another call right now."),
        (H.NO_ANSWER, Out.NO_ANSWER, "I'm sorry, nobody from our support team picked up."),
        (H.UNREACHABLE, Out.UNREACHABLE, "I'm sorry, I couldn't get through to our support team."),
    ],
)
@pytest.mark.parametrize("mode", [wh.HandoffMode.CONSULT, wh.HandoffMode.CONFERENCE])
async def test_dial_failures_reach_the_caller(start_call, human, outcome, heard, mode):
    line = RecordingLine(human, ring_time=0.05)
    settings = settings_for(handoff_mode=mode, ring_timeout=0.2)  # no answer rings it out
    call = await start_call(receptionist(), line=line, settings=settings)
    turn = await ask_for_transfer(call)
    await asyncio.wait_for(turn, 8)
    assert call.agent.results[0].outcome is outcome
    assert call.caller_heard()[-1].startswith(heard)
    assert "I can try our billing team instead" in call.caller_heard()[-1]
    await assert_line_clean(line)


async def test_a_refused_move_bridges_the_human_and_is_remembered(start_call):
    """A server with no MoveParticipant (self-hosted LiveKit) refuses the move: the human, still
    in the consult room, is bridged at once and both hear that they are connected; the next
    attempt on this line bridges without asking."""
    line = RecordingLine(None, ring_time=0.05, move_supported=False)
    call = await start_call(receptionist(), line=line)
    turn = await ask_for_transfer(call)
    await line.human_accepts()
    await asyncio.wait_for(turn, 5)
    result = call.agent.results[0]
    assert result.outcome is Out.CONNECTED and result.joined_by is wh.JoinWay.BRIDGE
    assert call.human_heard()[-1] == call.caller_heard()[-1] == (
        "You're now connected with our support team."
    )
    assert line.bridged == {result.leg.room: "console-room"}
    assert [e.text for e in line.events].count("move refused by the server") == 1
    assert line.join_way is wh.JoinWay.BRIDGE
    line.hang_up_caller()  # the call ends: the bridge and the human's room go with it
    await wait_for(lambda: line.bridged == {} and line.legs() == [])


async def test_human_hanging_up_during_the_brief_returns_the_caller(start_call):
    call = await start_call(receptionist())
    turn = await ask_for_transfer(call)
    await call.line.human_answers()
    call.line.hang_up_human()
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.DECLINED
    await assert_line_clean(call.line)
    assert call.session.input.audio_enabled


async def test_caller_hanging_up_while_it_rings_cancels_the_dial(start_call):
    line = RecordingLine(None, ring_time=10)
    call = await start_call(receptionist(), line=line)
    turn = await ask_for_transfer(call)
    await wait_for(lambda: line.on_hold)
    line.hang_up_caller()
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CALLER_LEFT
    assert line.cancelled_dials == [line.dials[0].identity]
    await assert_line_clean(line)


async def test_a_second_attempt_in_the_same_call_uses_a_new_consult_room(start_call):
    order = iter(["support", "billing"])

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            return Call("transfer_call", {"destination": next(order), "reason": "a refund"})
        return receptionist()(req)

    call = await start_call(respond)
    for digit in ("2", "1"):
        call.line.answered.clear()
        turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
        await wait_for(call.line.answered.is_set)
        call.line.human_says("Hello?")
        heard = 1 if digit == "2" else 3  # brief; farewell; second brief
        await wait_for(lambda n=heard: len(call.human_heard()) >= n)
        call.line.human_presses(digit)
        await asyncio.wait_for(turn, 5)
    rooms = [d.room for d in call.line.dials]
    assert len(set(rooms)) == 2 and all("-consult-" in r for r in rooms)
    assert [d.destination.name for d in call.line.dials] == ["support", "billing"]
    assert [r.outcome for r in call.agent.results] == [Out.DECLINED, Out.CONNECTED]


async def test_conference_introduces_the_caller_to_both_and_leaves(start_call):
    settings = settings_for(handoff_mode=wh.HandoffMode.CONFERENCE)
    call = await start_call(receptionist(reason="a refund for order 88"), settings=settings)
    closed = asyncio.Event()
    call.session.on("close", lambda _: closed.set())
    turn = await ask_for_transfer(call)
    await asyncio.wait_for(turn, 5)
    [dial] = call.line.dials
    # screened in a room of their own first (here unscreened: the text line has no ears), then
    # moved into the caller's room
    assert dial.room.startswith("console-room-consult-")
    intro = call.caller_heard()[-1]
    assert "a refund for order 88" in intro and "now connected with our support team" in intro
    held = "hold music on" in [e.text for e in call.line.events]
    assert held and not call.line.on_hold  # held while ringing, then released
    [result] = call.agent.results
    assert result.outcome is Out.CONNECTED and result.joined_by is wh.JoinWay.MOVE
    assert dial.identity in call.line.rooms["console-room"]
    await asyncio.wait_for(closed.wait(), 2)  # the agent has left


async def test_brief_survives_a_discarded_first_reply(start_call):
    """A reply the framework throws away (the human talks over a preemptive generation) must
    not take the brief with it: until the brief has been spoken, every reply to the human is
    the brief."""
    call = await start_call(receptionist(), delay=0.3)  # the brief is still being written
    turn = await agree_to_transfer(call.session, "My parcel QX-4471 never arrived", "yes please")
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
