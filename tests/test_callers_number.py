"""The caller's number on the human's phone: it comes from the trunk's ``sip.phoneNumber``,
which may be missing or not E.164, and only a valid E.164 number reaches the human's INVITE or
a callback request. With HANDOFF_CALLER_ID=caller the human's phone shows it (sip_number of
CreateSIPParticipant), else HANDOFF_TRUNK_NUMBER; a trunk that refuses it (403) is asked once
more with the trunk's number; a 603 is a person declining and is never retried."""

import asyncio
import json

import pytest
from conftest import Call, RecordingLine, agree_to_transfer, receptionist, run_worker, wait_for
from test_configuration import GOOD

import warm_handoff as wh
from standins.fake_livekit import DialScript

CALLER = "+15105550199"
TRUNK = "+15105550999"

NOT_E164 = [
    {},
    {"sip.phoneNumber": ""},
    {"sip.phoneNumber": "anonymous"},
    {"sip.phoneNumber": "5105550100"},
    {"sip.phoneNumber": "15105550100"},
    {"sip.phoneNumber": "+1 510 555 0100"},
    {"sip.phoneNumber": "+15105550100\n"},
]
IDS = ["missing", "empty", "anonymous", "national", "no-plus", "spaced", "newline"]


def test_only_an_e164_number_as_given_is_the_callers_number():
    assert wh.sip_caller_number({"sip.phoneNumber": "+15105550199"}) == "+15105550199"
    for attributes in NOT_E164:
        assert wh.sip_caller_number(attributes) == ""


async def one_transfer(livekit, livekit_call, *scripts, **settings):
    """One call through the fake LiveKit server, in conference mode: the caller asks for
    support and says yes. Returns the agent's results and each CreateSIPParticipant request."""
    server, _ = livekit
    if scripts:
        server.script_dial(*scripts)
    session, agent, _ = await livekit_call(handoff_mode=wh.HandoffMode.CONFERENCE, **settings)
    await asyncio.wait_for(await agree_to_transfer(session), 10)
    return agent.results, [d.request for d in server.calls_to("CreateSIPParticipant")]


async def transfer(livekit, livekit_call, *scripts, caller_number=CALLER, **overrides):
    """With HANDOFF_CALLER_ID=caller: the results and the sip_number of each dial."""
    options = {"caller_id": "caller", "trunk_number": TRUNK, **overrides}
    results, dials = await one_transfer(
        livekit, livekit_call, *scripts, caller_number=caller_number, **options
    )
    assert len({d.participant_identity for d in dials}) == 1  # one attempt
    return results, [d.sip_number for d in dials]


async def dial_with_headers(livekit, livekit_call, number: str) -> dict[str, str]:
    _, dials = await one_transfer(livekit, livekit_call, caller_number=number)
    return dict(dials[0].headers)


@pytest.mark.parametrize("attributes", NOT_E164, ids=IDS)
async def test_no_caller_number_header_unless_the_trunk_gave_e164(
    livekit, livekit_call, attributes
):
    headers = await dial_with_headers(livekit, livekit_call, wh.sip_caller_number(attributes))
    assert "X-Caller-Number" not in headers and headers["X-Handoff-Destination"] == "support"


@pytest.mark.parametrize("number", ["anonymous", "+1 510 555 0100"])
async def test_a_line_with_a_number_that_is_not_e164_sends_no_header(livekit, livekit_call, number):
    headers = await dial_with_headers(livekit, livekit_call, number)
    assert "X-Caller-Number" not in headers


@pytest.mark.parametrize("attributes", NOT_E164, ids=IDS)
async def test_a_callback_asks_for_the_number_when_the_trunk_gave_none(start_call, attributes):
    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            if req.after_tool:
                return "What number should we call, with the area code?"
            return Call("request_callback", {"name": "Dana", "best_time": "tomorrow"})
        return "Okay."

    line = RecordingLine(None, caller_number=wh.sip_caller_number(attributes))
    call = await start_call(respond, line=line)
    await call.session.run(user_input="yes, call me back: Dana, tomorrow")
    outputs = [i.output for i in call.session.history.items if i.type == "function_call_output"]
    assert outputs == ["Ask for the number to call, with the area code."]
    assert call.agent.records.callbacks == []
    assert not any("Let me read that back" in t for t in call.caller_heard())


@pytest.mark.parametrize("number", ["", "anonymous", "5105550100"])
async def test_a_caller_who_hangs_up_on_hold_leaves_a_callback_without_a_bad_number(
    start_call, number
):
    line = RecordingLine(None, ring_time=10, caller_number=number)
    call = await start_call(receptionist(), line=line)
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(lambda: line.on_hold)
    line.hang_up_caller()
    await asyncio.wait_for(turn, 5)
    [request] = call.agent.records.callbacks
    assert (request.source, request.number) == ("abandoned", "")


async def test_the_humans_phone_shows_the_callers_number(livekit, livekit_call):
    results, shown = await transfer(livekit, livekit_call, DialScript.answer())
    assert shown == [CALLER]
    assert [r.outcome for r in results] == [wh.HandoffOutcome.CONNECTED]


async def test_a_trunk_that_refuses_it_is_asked_again_with_the_trunk_number(livekit, livekit_call):
    results, shown = await transfer(
        livekit, livekit_call, DialScript.sip_error(403), DialScript.answer()
    )
    assert shown == [CALLER, TRUNK]  # once more, at once, in the same attempt
    (result,) = results
    assert result.outcome is wh.HandoffOutcome.CONNECTED
    assert "caller_id_refused" in result.timings


async def test_a_second_refusal_is_final(livekit, livekit_call):
    results, shown = await transfer(
        livekit,
        livekit_call,
        DialScript.sip_error(403),
        DialScript.sip_error(403),
        DialScript.answer(),
    )
    assert shown == [CALLER, TRUNK]
    assert [(r.outcome, r.sip_status) for r in results] == [(wh.HandoffOutcome.UNREACHABLE, 403)]


@pytest.mark.parametrize("unknown", ["", "anonymous"])
async def test_an_unknown_caller_number_shows_the_trunk_number(livekit, livekit_call, unknown):
    results, shown = await transfer(
        livekit, livekit_call, DialScript.sip_error(403), caller_number=unknown
    )
    assert shown == [TRUNK]  # and a refusal of the trunk's own number is not retried
    assert [r.outcome for r in results] == [wh.HandoffOutcome.UNREACHABLE]


async def test_no_trunk_number_leaves_it_to_the_trunk(livekit, livekit_call):
    _, shown = await transfer(
        livekit, livekit_call, DialScript.answer(), caller_number="", trunk_number=""
    )
    assert shown == [""]  # LiveKit uses the trunk's own number


async def test_a_person_declining_is_never_retried(livekit, livekit_call):
    results, shown = await transfer(
        livekit, livekit_call, DialScript.sip_error(603), DialScript.answer()
    )
    assert shown == [CALLER]
    assert [(r.outcome, r.sip_status) for r in results] == [(wh.HandoffOutcome.DECLINED, 603)]


async def test_a_fixed_caller_id_is_never_retried(livekit, livekit_call):
    results, shown = await transfer(
        livekit,
        livekit_call,
        DialScript.sip_error(403),
        DialScript.answer(),
        caller_id=TRUNK,
        trunk_number="",
    )
    assert shown == [TRUNK]
    assert [r.outcome for r in results] == [wh.HandoffOutcome.UNREACHABLE]


# -- configuration -----------------------------------------------------------------------------


def test_caller_and_a_trunk_number_load_and_show_in_check():
    env = {"HANDOFF_CALLER_ID": "Caller", "HANDOFF_TRUNK_NUMBER": TRUNK}
    settings = wh.load_settings(env, telephony=False)
    assert (settings.caller_id, settings.trunk_number) == ("caller", TRUNK)
    rows = dict(settings.shown_by_check())
    assert (
        rows["HANDOFF_CALLER_ID"] == "caller (the caller's own number; else HANDOFF_TRUNK_NUMBER)"
    )
    assert rows["HANDOFF_TRUNK_NUMBER"] == "+1510•••99"
    fixed = dict(wh.load_settings({"HANDOFF_CALLER_ID": TRUNK}, telephony=False).shown_by_check())
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


# -- a sip: destination: no trunk, so no number of its own -------------------------------------


def sip_destinations(*names: str) -> str:
    return json.dumps(
        {"support": {"number": "+15105550100", "description": "Support"}}
        | {name: {"number": f"sip:{name}@pbx.example.com", "description": name} for name in names}
    )


def test_start_refuses_a_sip_destination_with_no_number_to_show():
    """LiveKit refuses every dial through an inline trunk that names no number to show
    (livekit/protocol rpc/sip.go: "no numbers on outbound trunk"): the worker says so at
    start, naming the destinations, with every other problem."""
    env = {
        **GOOD,
        "HANDOFF_CALLER_ID": "",
        "HANDOFF_DESTINATIONS": sip_destinations("billing", "sales"),
        "HANDOFF_MODE": "sideways",
        **{names[0]: "x" for names in wh.PROVIDER_KEYS.values()},
    }
    done = run_worker("start", env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[1:] == [
        "  - HANDOFF_MODE must be one of auto, consult, conference (got 'sideways')",
        "  - HANDOFF_CALLER_ID must be set: a sip: destination (billing, sales) goes to its host "
        "directly, with no trunk number LiveKit could show instead, and LiveKit refuses the "
        "call without one",
    ]


@pytest.mark.parametrize(
    "env,problem",
    [
        ({"HANDOFF_CALLER_ID": ""}, "HANDOFF_CALLER_ID must be set: a sip: destination (billing)"),
        (
            {"HANDOFF_CALLER_ID": "caller"},
            "HANDOFF_TRUNK_NUMBER must be set with HANDOFF_CALLER_ID=caller: a sip: destination "
            "(billing) goes to its host directly, with no trunk number LiveKit could show when "
            "the caller's is unknown or refused",
        ),
        ({"HANDOFF_CALLER_ID": "caller", "HANDOFF_TRUNK_NUMBER": TRUNK}, None),
        ({"HANDOFF_CALLER_ID": TRUNK}, None),
        # a number dialled through SIP_TRUNK_ID: LiveKit shows one of the trunk's own numbers
        ({"HANDOFF_CALLER_ID": "", "HANDOFF_DESTINATIONS": sip_destinations()}, None),
    ],
)
def test_a_sip_destination_needs_a_number_to_show_at_every_dial(env, problem):
    configured = {**GOOD, "HANDOFF_DESTINATIONS": sip_destinations("billing"), **env}
    if problem is None:
        wh.load_settings(configured)
    else:
        with pytest.raises(wh.ConfigError) as raised:
            wh.load_settings(configured)
        assert [p for p in raised.value.problems if p.startswith(problem)]
    wh.load_settings(configured, telephony=False)  # the console dials no real line


@pytest.mark.parametrize("caller_number", [CALLER, ""], ids=["caller-known", "caller-withheld"])
@pytest.mark.parametrize(
    "caller_id,trunk_number,starts",
    [("", "", False), (TRUNK, "", True), ("caller", "", False), ("caller", TRUNK, True)],
)
async def test_a_configuration_starts_exactly_when_livekit_takes_its_sip_destination_dials(
    livekit, livekit_call, caller_id, trunk_number, starts, caller_number
):
    """A dial to a sip: destination that names no number to show is refused by LiveKit (the
    fake, as rpc/sip.go does): the configurations that start are those whose every dial names
    one, the trunk's refusal of the caller's number (403) and its retry included."""
    env = {"HANDOFF_CALLER_ID": caller_id, "HANDOFF_TRUNK_NUMBER": trunk_number}
    try:
        wh.load_settings({**GOOD, **env})  # GOOD's billing is a sip: destination
        started = True
    except wh.ConfigError:
        started = False
    assert started is starts
    server, _ = livekit
    server.script_dial(DialScript.sip_error(403), DialScript.answer())
    session, agent, _ = await livekit_call(
        receptionist("billing"),
        handoff_mode=wh.HandoffMode.CONFERENCE,
        caller_number=caller_number,
        caller_id=caller_id,
        trunk_number=trunk_number,
    )  # built in code: what the worker would do had it started
    await asyncio.wait_for(await agree_to_transfer(session), 10)
    dials = server.calls_to("CreateSIPParticipant")
    assert dials and all(d.request.HasField("trunk") for d in dials)
    refused = [d for d in dials if d.answer == "failed_precondition"]
    assert all(not d.request.sip_number for d in refused)
    assert bool(refused) is not starts
