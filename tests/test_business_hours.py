"""Business hours per destination: validated at load, read on the team's own clock (zoneinfo),
never dialled when closed; the model sees which teams are open at each request."""

import asyncio
import json
import logging
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from conftest import Call, RecordingLine, settings_for

import warm_handoff as wh

LA = ZoneInfo("America/Los_Angeles")
UTC = timezone.utc
BILLING_HOURS = {
    "tz": "America/Los_Angeles",
    "mon-fri": "09:00-17:30",
    "sat": "10:00-14:00",
    "closed": ["2025-12-25"],
}


def destinations(billing_hours=BILLING_HOURS, support_hours=None):
    support = {
        "number": "+15105550101",
        "description": "Technical support",
        "spoken_name": "our support team",
    }
    if support_hours:
        support["hours"] = support_hours
    env = {
        "HANDOFF_DESTINATIONS": json.dumps(
            {
                "billing": {
                    "number": "+15105550102",
                    "description": "Invoices and refunds",
                    "spoken_name": "our billing team",
                    "fallback": "support",
                    "hours": billing_hours,
                },
                "support": support,
            }
        )
    }
    return wh.load_settings(env, telephony=False).destinations


def hours(**weekly) -> wh.OpeningHours:
    spec = {"tz": "America/Los_Angeles", **weekly}
    return destinations(spec)[0].hours


def la(*args, **kw) -> datetime:
    return datetime(*args, tzinfo=LA, **kw)


class Clock:
    """The agent's clock, moved by the test."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


# -- the hours themselves --------------------------------------------------------------------


def test_open_and_closed_on_the_teams_own_clock():
    billing = destinations()[0].hours
    assert billing.is_open(la(2025, 3, 4, 9, 0))  # Tuesday, opening minute
    assert billing.is_open(la(2025, 3, 4, 17, 29))
    assert not billing.is_open(la(2025, 3, 4, 17, 30))  # the end is closed
    assert not billing.is_open(la(2025, 3, 4, 8, 59))
    assert billing.is_open(la(2025, 3, 8, 13, 0))  # Saturday
    assert not billing.is_open(la(2025, 3, 9, 12, 0))  # Sunday: no hours
    assert not billing.is_open(la(2025, 12, 25, 10, 0))  # a closed date (Thursday)
    # the same instant written in UTC: 17:00 UTC is 9:00 in Los Angeles (PST)
    assert billing.is_open(datetime(2025, 3, 4, 17, 0, tzinfo=UTC))
    assert not billing.is_open(datetime(2025, 3, 4, 16, 59, tzinfo=UTC))


@pytest.mark.parametrize(
    "now, said",
    [
        (la(2025, 3, 4, 18, 0), "tomorrow at 9 a.m."),  # Tuesday evening
        (la(2025, 3, 4, 7, 15), "today at 9 a.m."),
        (la(2025, 3, 7, 18, 0), "tomorrow at 10 a.m."),  # Friday evening: Saturday
        (la(2025, 3, 8, 15, 0), "on Monday at 9 a.m."),  # Saturday afternoon
        (la(2025, 12, 24, 18, 0), "on Friday at 9 a.m."),  # Christmas is closed
    ],
)
def test_when_a_closed_team_opens_next(now, said):
    billing = destinations()[0].hours
    assert not billing.is_open(now)
    assert wh.when_it_opens(billing.next_opening(now), now) == said


def test_a_daylight_saving_change_keeps_the_teams_clock():
    billing = destinations()[0].hours
    # Saturday 8 March 2025, 15:00 PST; clocks go forward on Sunday 9 March
    opens = billing.next_opening(la(2025, 3, 8, 15, 0))
    assert opens.astimezone(UTC) == datetime(2025, 3, 10, 16, 0, tzinfo=UTC)  # 9:00 PDT
    assert billing.is_open(datetime(2025, 3, 10, 16, 30, tzinfo=UTC))  # 9:30 PDT
    assert not billing.is_open(datetime(2025, 3, 10, 15, 59, tzinfo=UTC))  # 8:59 PDT
    # and back: Monday 3 November 2025 is PST again, 9:00 is 17:00 UTC
    assert not billing.is_open(datetime(2025, 11, 3, 16, 30, tzinfo=UTC))  # 8:30 PST
    assert billing.is_open(datetime(2025, 11, 3, 17, 0, tzinfo=UTC))


def test_a_range_across_midnight():
    night = hours(fri="22:00-02:00")
    assert not night.is_open(la(2025, 3, 7, 21, 59))  # Friday
    assert night.is_open(la(2025, 3, 7, 22, 0))
    assert night.is_open(la(2025, 3, 8, 1, 59))  # Saturday, still Friday's opening
    assert not night.is_open(la(2025, 3, 8, 2, 0))
    now = la(2025, 3, 8, 3, 0)
    assert wh.when_it_opens(night.next_opening(now), now) == "on Friday at 10 p.m."


def test_a_range_across_midnight_on_the_night_clocks_go_back():
    # Saturday 1 November 2025 22:00 PDT to Sunday 06:00 PST: nine hours, not eight
    night = hours(sat="22:00-06:00")
    assert night.is_open(datetime(2025, 11, 2, 5, 0, tzinfo=UTC))  # 22:00 PDT
    assert night.is_open(datetime(2025, 11, 2, 13, 59, tzinfo=UTC))  # 05:59 PST
    assert not night.is_open(datetime(2025, 11, 2, 14, 0, tzinfo=UTC))  # 06:00 PST
    assert night.is_open(la(2025, 11, 2, 1, 30))  # 01:30 happens twice; open both times
    assert night.is_open(la(2025, 11, 2, 1, 30, fold=1))


def test_several_ranges_a_day_and_day_lists():
    split = hours(**{"mon-fri": "09:00-12:00, 13:00-17:00", "sat,sun": "00:00-24:00"})
    assert split.is_open(la(2025, 3, 4, 11, 59))
    assert not split.is_open(la(2025, 3, 4, 12, 30))  # lunch
    assert split.is_open(la(2025, 3, 9, 23, 59))  # Sunday, all day
    now = la(2025, 3, 4, 12, 30)
    assert wh.when_it_opens(split.next_opening(now), now) == "today at 1 p.m."


def test_every_bad_hours_value_is_reported_together():
    env = {
        "HANDOFF_DESTINATIONS": json.dumps(
            {
                "billing": {
                    "number": "+15105550102",
                    "description": "Invoices",
                    "hours": {
                        "tz": "Pacific Time",
                        "mon-fry": "09:00-17:00",
                        "sat": "10:00-10:00",
                        "sun": "9-5",
                        "tue": "09:00-17:00",
                        "tue-wed": "18:00-20:00",
                        "closed": ["christmas"],
                    },
                },
                "sales": {"number": "+15105550103", "description": "Sales", "hours": "9 to 5"},
                "night": {"number": "+15105550104", "description": "Night", "hours": {"tz": "UTC"}},
            }
        ),
        "HANDOFF_CALLER_ID": "+1510",
    }
    with pytest.raises(wh.ConfigError) as raised:
        wh.load_settings(env, telephony=False)
    problems = "\n".join(raised.value.problems)
    for expected in (
        "['billing'].hours.tz must be an IANA time zone",
        "unknown key 'mon-fry'",
        "['billing'].hours['sat'] must be opening times",
        "['billing'].hours['sun'] must be opening times",
        "tue is in both 'tue' and 'tue-wed'",
        "closed must list dates like 2025-12-25 (got 'christmas')",
        "['sales'].hours must be an object",
        "['night'].hours has no opening times",
        "HANDOFF_CALLER_ID must be",
    ):
        assert expected in problems, expected
    assert len(raised.value.problems) == 9


def test_check_shows_each_destinations_hours():
    settings = settings_for(destinations=destinations())
    rows = dict(settings.shown_by_check())
    assert rows["destination billing"].endswith(
        "; open America/Los_Angeles: mon-fri 09:00-17:30, sat 10:00-14:00; 1 closed date"
    )
    assert "open" not in rows["destination support"].split(" - ")[1]


# -- on a call ---------------------------------------------------------------------------------


def teams_now_said(request) -> list[str]:
    return [
        m.text_content
        for m in request.chat_ctx.messages()
        if m.role == "system" and m.id == wh.TEAMS_NOW_ID
    ]


async def test_the_model_sees_which_teams_are_open_at_each_request(start_call):
    call = await start_call(
        lambda req: "How can I help?", settings=settings_for(destinations=destinations())
    )
    clock = call.agent.now = Clock(la(2025, 3, 4, 17, 29))
    await asyncio.wait_for(call.session.run(user_input="hi"), 5)
    clock.at = la(2025, 3, 4, 17, 31)  # billing closes during the call
    await asyncio.wait_for(call.session.run(user_input="still there?"), 5)
    first, second = call.model.of("caller")
    assert teams_now_said(first) == [
        "Right now these teams are open: billing, support; closed: none. Offer only open "
        "teams. If the caller asks for a closed team, call transfer_call with it anyway: the "
        "caller is told when it opens and offered an open team or a callback."
    ]
    (said,) = teams_now_said(second)
    assert said.startswith(
        "Right now these teams are open: support; closed: billing (opens tomorrow at 9 a.m.)."
    )
    # the status is only in the requests, never kept in the conversation
    assert not any(m.id == wh.TEAMS_NOW_ID for m in call.session.history.messages())


async def test_no_status_message_when_no_team_has_hours(start_call):
    call = await start_call(lambda req: "How can I help?")
    await asyncio.wait_for(call.session.run(user_input="hi"), 5)
    assert teams_now_said(call.model.of("caller")[0]) == []


def closed_team_caller(then=None):
    def respond(req):
        text = req.last_user_text().lower()
        if req.after_tool:
            return None
        if "billing" in text:
            return Call("transfer_call", {"destination": "billing", "reason": "a refund"})
        if then and text.startswith("call me back"):
            return then
        return "How can I help?"

    return respond


async def test_a_closed_team_is_never_dialled_and_the_caller_hears_when_it_opens(
    start_call, caplog
):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    call = await start_call(
        closed_team_caller(), settings=settings_for(destinations=destinations())
    )
    call.agent.now = Clock(la(2025, 3, 4, 18, 0))  # Tuesday evening
    await asyncio.wait_for(call.session.run(user_input="billing please"), 5)
    assert call.line.dials == []  # never dialled
    assert call.caller_heard()[-1] == (
        "Our billing team is closed right now and opens tomorrow at 9 a.m. I can try our "
        "support team, who can take your call now, or take your details so someone calls you "
        "back tomorrow at 9 a.m. Which would you prefer?"
    )
    # the model is told too, in whole sentences ("9 a.m." ends one: no "9 a.m..")
    (note,) = [i.output for i in call.session.history.items if i.type == "function_call_output"]
    assert note.startswith(
        "billing is closed now and was not dialled; it opens tomorrow at 9 a.m. The caller has "
        "been told. If the caller agrees to try support, "
    ), note
    (result,) = call.agent.results
    assert (result.outcome, result.destination) == (wh.HandoffOutcome.CLOSED, "billing")
    records = [
        json.loads(r.getMessage().split(" record ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("handoff record")
    ]
    assert [(r["destination"], r["outcome"]) for r in records] == [("billing", "closed")]
    assert records[0]["detail"] == "outside opening hours; opens tomorrow at 9 a.m."
    assert records[0]["phase"] is None  # an outcome, not a phase: it got nowhere
    assert call.agent.teams.tried == []  # not a dial: no attempt used, billing may be offered later


async def test_a_closed_fallback_is_not_offered(start_call):
    both_closed = destinations(support_hours={"tz": "Europe/London", "mon-fri": "09:00-17:00"})
    call = await start_call(closed_team_caller(), settings=settings_for(destinations=both_closed))
    call.agent.now = Clock(la(2025, 3, 4, 18, 0))  # 02:00 in London
    await asyncio.wait_for(call.session.run(user_input="billing please"), 5)
    assert call.caller_heard()[-1] == (
        "Our billing team is closed right now and opens tomorrow at 9 a.m. I can take your "
        "details so someone calls you back tomorrow at 9 a.m. Would you like that?"
    )
    assert call.line.dials == []


async def test_an_open_team_is_dialled_as_before(start_call):
    call = await start_call(
        closed_team_caller(),
        line=RecordingLine(wh.SimulatedHuman.BUSY, ring_time=0.02),
        settings=settings_for(destinations=destinations()),
    )
    call.agent.now = Clock(la(2025, 3, 4, 10, 0))
    await asyncio.wait_for(call.session.run(user_input="billing please"), 5)
    assert [d.destination.name for d in call.line.dials] == ["billing"]
    assert call.agent.results[0].outcome is wh.HandoffOutcome.BUSY


async def test_a_callback_for_a_closed_team_is_for_when_it_opens(start_call, caplog):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    callback = Call("request_callback", {"name": "Dana", "confirmed": True})
    call = await start_call(
        closed_team_caller(then=callback),
        line=RecordingLine(None, caller_number="+15105550199"),
        settings=settings_for(destinations=destinations()),
    )
    call.agent.now = Clock(la(2025, 3, 4, 18, 0))
    await asyncio.wait_for(call.session.run(user_input="billing please"), 5)
    await asyncio.wait_for(call.session.run(user_input="call me back then"), 5)
    assert (
        call.caller_heard()[-1] == "Thank you, Dana. Someone will call you back tomorrow at 9 a.m."
    )
    logged = [r.getMessage() for r in caplog.records if "callback_request record" in r.getMessage()]
    (record,) = [json.loads(m.split(" record ", 1)[1]) for m in logged]
    assert (record["best_time"], record["reason"]) == ("tomorrow at 9 a.m.", "a refund")


def test_an_opening_a_week_or_more_away_is_said_with_its_date():
    monday = destinations({"tz": "Europe/London", "mon": "12:00-13:00", "closed": ["2025-03-10"]})
    now = datetime(2025, 3, 4, 12, 0, tzinfo=ZoneInfo("Europe/London"))  # Tuesday
    assert wh.when_it_opens(monday[0].hours.next_opening(now), now) == (
        "on Monday, March 17, at noon"
    )
