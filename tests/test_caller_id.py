"""HANDOFF_CALLER_ID=caller: the human's phone shows the caller's own number (sip_number of
CreateSIPParticipant), else HANDOFF_TRUNK_NUMBER; a trunk that refuses it (403) is asked once
more with the trunk's number; a 603 is a person declining and is never retried."""

import asyncio

import pytest
from conftest import start_livekit_call
from fake_livekit import DialScript

import warm_handoff as wh

CALLER = "+15105550199"
TRUNK = "+15105550999"


async def transfer(livekit, *scripts, caller_number=CALLER, **settings_overrides):
    """One call through the fake LiveKit server: the caller asks for support and says yes.
    Returns the agent's results and the sip_number of each CreateSIPParticipant request."""
    server, _ = livekit
    server.script_dial(*scripts)
    options = dict(caller_id="caller", trunk_number=TRUNK)
    options.update(settings_overrides)
    session, agent, _ = await start_livekit_call(
        livekit, caller_number=caller_number, handoff_mode=wh.HandoffMode.CONFERENCE, **options
    )
    try:
        await session.run(user_input="a person please")
        await asyncio.wait_for(session.run(user_input="yes"), 10)
        dials = server.calls_to("CreateSIPParticipant")
        assert len({d.request.participant_identity for d in dials}) == 1  # one attempt
        return agent.results, [d.request.sip_number for d in dials]
    finally:
        await session.aclose()


async def test_the_humans_phone_shows_the_callers_number(livekit):
    results, shown = await transfer(livekit, DialScript.answer())
    assert shown == [CALLER]
    assert [r.outcome for r in results] == [wh.HandoffOutcome.CONNECTED]


async def test_a_trunk_that_refuses_it_is_asked_again_with_the_trunk_number(livekit):
    results, shown = await transfer(livekit, DialScript.sip_error(403), DialScript.answer())
    assert shown == [CALLER, TRUNK]  # once more, at once, in the same attempt
    (result,) = results
    assert result.outcome is wh.HandoffOutcome.CONNECTED
    assert "caller_id_refused" in result.timings


async def test_a_second_refusal_is_final(livekit):
    results, shown = await transfer(
        livekit, DialScript.sip_error(403), DialScript.sip_error(403), DialScript.answer()
    )
    assert shown == [CALLER, TRUNK]
    assert [(r.outcome, r.sip_status) for r in results] == [(wh.HandoffOutcome.UNREACHABLE, 403)]


@pytest.mark.parametrize("unknown", ["", "anonymous"])
async def test_an_unknown_caller_number_shows_the_trunk_number(livekit, unknown):
    results, shown = await transfer(livekit, DialScript.sip_error(403), caller_number=unknown)
    assert shown == [TRUNK]  # and a refusal of the trunk's own number is not retried
    assert [r.outcome for r in results] == [wh.HandoffOutcome.UNREACHABLE]


async def test_no_trunk_number_leaves_it_to_the_trunk(livekit):
    _, shown = await transfer(livekit, DialScript.answer(), caller_number="", trunk_number="")
    assert shown == [""]  # LiveKit uses the trunk's own number


async def test_a_person_declining_is_never_retried(livekit):
    results, shown = await transfer(livekit, DialScript.sip_error(603), DialScript.answer())
    assert shown == [CALLER]
    assert [(r.outcome, r.sip_status) for r in results] == [(wh.HandoffOutcome.DECLINED, 603)]


async def test_a_fixed_caller_id_is_never_retried(livekit):
    results, shown = await transfer(
        livekit, DialScript.sip_error(403), DialScript.answer(), caller_id=TRUNK, trunk_number=""
    )
    assert shown == [TRUNK]
    assert [r.outcome for r in results] == [wh.HandoffOutcome.UNREACHABLE]


# -- configuration -----------------------------------------------------------------------------


def test_caller_and_a_trunk_number_load_and_show_in_check():
    env = {"HANDOFF_CALLER_ID": "Caller", "HANDOFF_TRUNK_NUMBER": TRUNK}
    settings = wh.load_settings(env, telephony=False)
    assert (settings.caller_id, settings.trunk_number) == ("caller", TRUNK)
    rows = dict(settings.masked())
    assert (
        rows["HANDOFF_CALLER_ID"] == "caller (the caller's own number; else HANDOFF_TRUNK_NUMBER)"
    )
    assert rows["HANDOFF_TRUNK_NUMBER"] == "+1510•••99"
    fixed = dict(wh.load_settings({"HANDOFF_CALLER_ID": TRUNK}, telephony=False).masked())
    assert (fixed["HANDOFF_CALLER_ID"], fixed["HANDOFF_TRUNK_NUMBER"]) == (
        "+1510•••99",
        "(not set)",
    )


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"HANDOFF_CALLER_ID": "the caller"}, "HANDOFF_CALLER_ID must be an E.164 number"),
        (
            {"HANDOFF_CALLER_ID": "caller", "HANDOFF_TRUNK_NUMBER": "5105550999"},
            "HANDOFF_TRUNK_NUMBER must be an E.164 number",
        ),
        (
            {"HANDOFF_CALLER_ID": TRUNK, "HANDOFF_TRUNK_NUMBER": TRUNK},
            "HANDOFF_TRUNK_NUMBER is used only with HANDOFF_CALLER_ID=caller",
        ),
        ({"HANDOFF_TRUNK_NUMBER": TRUNK}, "HANDOFF_TRUNK_NUMBER is used only with"),
    ],
)
def test_bad_caller_id_settings_are_reported(env, problem):
    with pytest.raises(wh.ConfigError) as raised:
        wh.load_settings(env, telephony=False)
    assert [p for p in raised.value.problems if p.startswith(problem)]
