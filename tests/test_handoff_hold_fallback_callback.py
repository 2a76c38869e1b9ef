"""Interactive hold, the fallback chain and callback requests."""

import asyncio
import logging

import pytest
from conftest import Call, RecordingLine, receptionist, settings_for, wait_for
from livekit.agents import UserStateChangedEvent

import warm_handoff as wh

H = wh.SimulatedHuman
Out = wh.HandoffOutcome


async def on_hold(call):
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(lambda: call.line.on_hold)
    return turn


async def test_a_question_on_hold_is_answered_at_once_and_the_hold_goes_on(start_call):
    call = await start_call(receptionist(), line=RecordingLine(None, ring_time=0.6))
    turn = await on_hold(call)
    asked = len(call.model.of("caller"))
    call.session.generate_reply(user_input="how long is this going to take?")  # on hold
    await wait_for(lambda: call.caller_heard()[-1].startswith("I'm still trying our support"))
    assert len(call.model.of("caller")) == asked  # answered without a model request
    assert call.line.on_hold and not turn.done()
    await call.line.human_accepts()
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CONNECTED


async def test_never_mind_while_ringing_stops_the_human_phone(start_call):
    call = await start_call(receptionist(), line=RecordingLine(None, ring_time=10))
    turn = await on_hold(call)
    call.session.generate_reply(user_input="actually never mind")
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CANCELLED_BY_CALLER
    assert call.line.cancelled_dials == [call.line.dials[0].identity]
    assert call.caller_heard()[-1] == "No problem, I've stopped the transfer. What else can I do?"
    await call.line.settle()
    assert not call.line.on_hold and call.line.legs() == []


@pytest.mark.parametrize(
    "said",
    [
        "never mind",
        "cancel the transfer",
        "cancel that",
        "forget it, I'll call back",
        "stop the transfer",
        "don't bother",
    ],
)
async def test_a_request_to_stop_the_transfer_cancels_it_on_hold(start_call, said):
    call = await start_call(receptionist(), line=RecordingLine(None, ring_time=10))
    turn = await on_hold(call)
    call.session.generate_reply(user_input=said)
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CANCELLED_BY_CALLER
    assert call.line.cancelled_dials == [call.line.dials[0].identity]


@pytest.mark.parametrize(
    "said",
    [
        "I want to cancel my subscription",
        "can you stop my card payments too?",
        "don't forget it's urgent",
    ],
)
async def test_other_words_on_hold_get_where_things_stand_and_the_transfer_goes_on(
    start_call, said
):
    call = await start_call(receptionist(), line=RecordingLine(None, ring_time=10))
    turn = await on_hold(call)
    asked = len(call.model.of("caller"))
    call.session.generate_reply(user_input=said)
    await wait_for(lambda: call.caller_heard()[-1].startswith("I'm still trying our support"))
    await asyncio.sleep(0.1)
    assert call.line.on_hold and not turn.done() and call.line.cancelled_dials == []
    assert len(call.model.of("caller")) == asked  # answered on hold, not by the model
    call.line.hang_up_caller()
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CALLER_LEFT


async def test_never_mind_while_the_human_is_briefed_tells_the_human(start_call):
    call = await start_call(receptionist())
    turn = await on_hold(call)
    await call.line.human_answers()
    call.session.generate_reply(user_input="forget it, I'll sort it myself")
    await asyncio.wait_for(turn, 5)
    assert call.agent.results[0].outcome is Out.CANCELLED_BY_CALLER
    assert call.human_heard()[-1].startswith("Sorry to trouble you: the caller no longer needs")
    await call.line.settle()
    assert call.line.legs() == [] and not any("-consult-" in r for r in call.line.rooms)


async def test_the_agent_checks_in_and_hold_music_pauses_while_it_speaks(start_call):
    settings = settings_for(hold_reassure_every=0.15)
    call = await start_call(
        receptionist(), line=RecordingLine(None, ring_time=0.5), settings=settings
    )
    turn = await on_hold(call)
    await wait_for(lambda: any(t.startswith("Thanks for holding") for t in _spoken(call)))
    # the check-in is in the chat when it starts: the music resumes once it has played out
    await wait_for(lambda: "hold music resumed" in [e.text for e in call.line.events])
    events = [e.text for e in call.line.events]
    assert "hold music paused" in events
    assert events.index("hold music paused") < events.index("hold music resumed")
    call.line.hang_up_caller()
    await asyncio.wait_for(turn, 5)


async def test_hold_music_pauses_while_the_caller_speaks(start_call):
    call = await start_call(receptionist(), line=RecordingLine(None, ring_time=5))
    turn = await on_hold(call)
    call.session.emit(
        "user_state_changed", UserStateChangedEvent(old_state="listening", new_state="speaking")
    )
    await wait_for(lambda: call.line.hold_music == "paused")
    call.session.emit(
        "user_state_changed", UserStateChangedEvent(old_state="speaking", new_state="listening")
    )
    await wait_for(lambda: call.line.hold_music == "playing")
    call.line.hang_up_caller()
    await asyncio.wait_for(turn, 5)


def _spoken(call):
    """Everything the caller heard, including check-ins kept out of the model's context."""
    return call.spoken


async def test_fallback_chain_follows_the_operator_and_never_repeats_a_failed_team(start_call):
    destinations = (
        wh.Destination(
            "support",
            "+15105550100",
            "Tech support",
            spoken_name="our support team",
            fallback="sales",
        ),
        wh.Destination("billing", "+15105550200", "Billing", spoken_name="our billing team"),
        wh.Destination("sales", "+15105550300", "Sales", spoken_name="our sales team"),
    )
    wanted = iter(["support", "support", "sales", "billing"])

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            if req.after_tool:
                return "Sorry, I can't do that."
            return Call("transfer_call", {"destination": next(wanted), "reason": "an upgrade"})
        return receptionist()(req)

    line = RecordingLine(None, ring_time=0.02, humans={"support": H.BUSY, "sales": H.NO_ANSWER})
    call = await start_call(
        respond,
        line=line,
        settings=settings_for(destinations=destinations, max_attempts=2, ring_timeout=0.1),
    )
    await call.session.run(user_input="yes please")  # support: busy
    assert call.caller_heard()[-1].endswith(
        "I can try our sales team instead, or take your details so someone calls you back. "
        "Which would you prefer?"
    )  # support names sales as its fallback, ahead of billing
    await call.session.run(user_input="yes support again")  # refused: already tried
    await call.session.run(user_input="yes sales then")  # sales: no answer
    assert call.caller_heard()[-1].endswith(
        "I can take your details so someone calls you back. Would you like that?"
    )
    await call.session.run(user_input="yes billing")  # refused: no attempts left
    assert [d.destination.name for d in line.dials] == ["support", "sales"]
    outputs = [i.output for i in call.session.history.items if i.type == "function_call_output"]
    assert any("already tried" in o for o in outputs)
    assert any("No more transfers on this call" in o for o in outputs)


async def test_a_team_the_caller_cancelled_is_dialled_again_when_they_ask_again(start_call):
    line = RecordingLine(None, ring_time=10)
    call = await start_call(receptionist(), line=line)
    turn = await on_hold(call)
    call.session.generate_reply(user_input="never mind")
    await asyncio.wait_for(turn, 5)
    line.ring_time = 0.05
    turn = asyncio.ensure_future(call.session.run(user_input="yes, support after all"))
    await line.human_accepts()
    await asyncio.wait_for(turn, 5)
    assert [d.destination.name for d in line.dials] == ["support", "support"]
    assert [r.outcome for r in call.agent.results] == [Out.CANCELLED_BY_CALLER, Out.CONNECTED]


async def test_every_dial_counts_toward_the_attempts_even_a_cancelled_one(start_call):
    line = RecordingLine(None, ring_time=10)
    call = await start_call(receptionist(), line=line, settings=settings_for(max_attempts=2))
    for asked in ("yes please", "yes, support again", "yes, one more time"):
        turn = asyncio.ensure_future(call.session.run(user_input=asked))
        if len(line.dials) < 2:
            await wait_for(lambda: line.on_hold)
            call.session.generate_reply(user_input="cancel that")
        await asyncio.wait_for(turn, 5)
    assert [d.destination.name for d in line.dials] == ["support", "support"]
    assert [r.outcome for r in call.agent.results] == [Out.CANCELLED_BY_CALLER] * 2
    outputs = [i.output for i in call.session.history.items if i.type == "function_call_output"]
    assert "No more transfers on this call" in outputs[-1]


async def test_callback_is_read_back_then_recorded_with_the_summary(start_call, caplog):
    steps = iter(
        [
            Call("transfer_call", {"destination": "support", "reason": "router keeps rebooting"}),
            Call("request_callback", {"name": "Dana", "best_time": "tomorrow morning"}),
            Call(
                "request_callback",
                {"name": "Dana", "best_time": "tomorrow morning", "confirmed": True},
            ),
        ]
    )

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            return next(steps)
        return receptionist()(req)

    caplog.set_level(logging.INFO, logger="warm-handoff")
    line = RecordingLine(H.BUSY, ring_time=0.02, caller_number="+15105550199")
    call = await start_call(respond, line=line)
    await call.session.run(user_input="My router keeps rebooting every hour")
    await call.session.run(user_input="yes, get me support")  # busy
    await call.session.run(user_input="yes, call me back: Dana, tomorrow morning")
    assert call.caller_heard()[-1] == (
        "Let me read that back: Dana, on 5 1 0, 5 5 5, 0 1 9 9, tomorrow morning. Is that right?"
    )
    assert call.agent.records.callbacks == []  # nothing recorded before the caller confirms
    await call.session.run(user_input="yes that's right")
    [request] = call.agent.records.callbacks
    assert (request.caller_name, request.number, request.best_time, request.source) == (
        "Dana",
        "+15105550199",
        "tomorrow morning",
        "caller",
    )
    assert "rebooting every hour" in request.summary
    assert (
        call.caller_heard()[-1] == "Thank you, Dana. Someone will call you back tomorrow morning."
    )
    logged = [r.getMessage() for r in caplog.records if "callback_request record" in r.getMessage()]
    assert len(logged) == 1 and '"caller_name": "Dana"' in logged[0]
    assert "5550199" not in " ".join(r.getMessage() for r in caplog.records)  # masked


async def test_callback_to_another_number_the_caller_gives(start_call):
    steps = iter(
        [
            Call(
                "request_callback",
                {
                    "name": "Lee",
                    "best_time": "after 5pm",
                    "number": "+1 (510) 555-0142",
                    "confirmed": True,
                },
            ),
        ]
    )

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            return next(steps)
        return "Okay."

    call = await start_call(respond)
    await call.session.run(user_input="yes call me on my work number")
    assert call.agent.records.callbacks[0].number == "+15105550142"
