"""A brief that keeps secrets: a card number, however the caller read it out and however the
speech-to-text wrote it, never reaches the human, a log line, a record, an attribute or an
X-header; it becomes "a card ending 4242"."""

import asyncio
import json
import logging
import re
import time

import pytest
from conftest import (
    Call,
    RecordingLine,
    brief_model_down,
    callback_request,
    receptionist,
    records_kept_in,
    saved,
    settings_for,
    wait_for,
)

import warm_handoff as wh

CARD = "4242 4242 4242 4242"  # a Luhn-valid test card
SPOKEN = "four two four two four two four two four two four two four two four two"
ENDING = "a card ending 4242"


def no_card_in(text: str) -> bool:
    """Nothing of the card but its last four digits, in numerals or words."""
    rest = text.replace(ENDING, "")
    return not re.search(r"42\D?42|four\W+two", rest, re.IGNORECASE)


# ── redact(): written and spoken forms ──────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "said",
    [
        "4242424242424242",
        CARD,
        "4242-4242-4242-4242",
        "4242, 4242, 4242, 4242",
        SPOKEN,
        "Four, two, four, two. Four, two, four, two, four two four two, four two four two",
        "4 2 four 2 4242 four two 4 2 four two four 2",  # numerals and words mixed
        "four two 4242 4 2 4 2 four-two-four-two",
    ],
)
def test_a_card_however_it_was_written_becomes_its_last_four_digits(said):
    assert wh.redact(f"My card is {said} and it was charged twice") == (
        f"My card is {ENDING} and it was charged twice"
    )


def test_oh_for_zero_double_and_triple_are_digits_too():
    # 4000 0566 5566 5556 and the 15 digits of 3782 822463 10005, as people read them out
    visa = "four triple oh, oh five double six, five five double six, triple five six"
    amex = "three seven eight two, eight two two four six three, one double oh oh five"
    assert wh.redact(f"card {visa}.") == "card a card ending 5556."
    assert wh.redact(f"Amex {amex} please") == "Amex a card ending 0005 please"


def test_a_card_among_other_digits_is_found_and_the_rest_keeps_todays_masking():
    assert wh.redact(f"Oh, {CARD}, 123 is the code") == f"Oh, {ENDING}, 123 is the code"
    assert wh.redact(f"{SPOKEN}, one two three") == f"{ENDING}, one two three"
    assert wh.redact(f"oh {SPOKEN}") == f"oh {ENDING}"
    assert wh.redact(f"{CARD} 510 555 0123") == f"{ENDING} 51055•••23"


def test_runs_that_fail_the_luhn_check_are_masked_as_today():
    assert wh.redact("4242 4242 4242 4241") == "42424•••41"
    assert wh.redact("4242-4242-4242-4241") == "42424•••41"
    # digits read one by one are one number: its first 15 ("4242...424") pass the Luhn
    # check, but nothing says the caller read out a card and a separate 1
    spoken = SPOKEN.rsplit(" ", 1)[0] + " one"
    assert wh.redact(f"card {spoken}.") == "card 42424•••41."
    assert wh.redact("call five one oh, five five five, oh one four two") == "call 51055•••42"
    assert wh.redact("call +1 510 555 0123") == "call +1510•••23"
    assert wh.redact("order 123456, 3 items") == "order 123456, 3 items"


def test_everyday_words_and_short_numbers_are_left_alone():
    for text in (
        "Oh, one more thing: I have two or three questions.",
        "Someone phoned; nine to five, seven days a week.",
        "room one two three four five six",  # six digits: not a number to hide
        "version 1.2.3.4.5.6.7 on 192.168.100.200",
        "Two weeks ago, at 10:30, the 4th time",
    ):
        assert wh.redact(text) == text


# A callback number as people read it out and as speech-to-text or a model writes it; each is
# one number, masked whole (the read-back itself says "5 1 0, 5 5 5, 0 1 9 9": issue 22).
@pytest.mark.parametrize(
    "said,masked",
    [
        ("5 1 0, 5 5 5, 0 1 4 2", "51055•••42"),  # single digits, grouped by commas
        ("5 1 0 5 5 5 0 1 4 2", "51055•••42"),
        ("510, 555, 0142", "51055•••42"),
        ("510 555, 0142", "51055•••42"),
        ("5 1 0 - 5 5 5 - 0 1 4 2", "51055•••42"),  # dashes with spaces around
        ("5. 1. 0. 5. 5. 5. 0. 1. 4. 2", "51055•••42"),  # a pause after each digit
        ("510.555.0142", "51055•••42"),
        ("01.23.45.67.89", "01234•••89"),
        ("(510) 555-0142", "51055•••42"),
        ("+1 (510) 555-0142", "+1510•••42"),
        ("+1-510.555.0142", "+1510•••42"),
        ("five one oh five five five oh one four two", "51055•••42"),
        ("five one zero, five five five, zero one four two", "51055•••42"),
        ("five one oh, double five five, oh one four two", "51055•••42"),
        ("five one oh, uh, five five five, um, oh one four two", "51055•••42"),  # fillers
        ("five 1 oh, 555, oh one 4 two", "51055•••42"),  # numerals and words mixed
        ("5 5 5, 0 1 4 2", "•••"),  # seven digits: a local number
    ],
)
def test_a_phone_number_in_any_grouping_is_one_number_and_masked(said, masked):
    assert wh.redact(f"Call me back on {said} please.") == f"Call me back on {masked} please."


@pytest.mark.parametrize(
    "text",
    [
        "We are 2 people, at 3 pm, in room 101.",
        "It broke in 2024 at 10:30, then 2, 3 times more.",
        "Between 9 and 5, 5 days a week; open 9.30-17.30.",
        "Ordered on 2024-03-01, shipped 1.3.2024, due 12.05.2024, 03/01/2024.",
        "They charged $1,234,567.50 and 12,500.00 and 3.5 percent.",
        "Order 123456, 3 items. Order 123456. 3 items.",
        "Build 10.0.19045.3803 and version 1.2.3.4.5.6.7 on 192.168.100.200.",
    ],
)
def test_ordinary_numbers_stay_as_they_are(text):
    assert wh.redact(text) == text


def test_a_whole_number_ends_at_a_pause_and_what_follows_stays():
    """A comma or dot after 7 digits, or after one numeral of 5 or more, ends the number."""
    assert wh.redact("+1 510 555 0142, 2 people") == "+1510•••42, 2 people"
    assert wh.redact("5105550142. Two printers") == "51055•••42. Two printers"
    assert wh.redact("two printers, 5105550142") == "two printers, 51055•••42"
    # short numbers read with commas cannot be told from a phone number read in groups
    assert wh.redact("rooms 101, 102, 103") == "rooms 10110•••03"


def test_redaction_stays_fast_on_a_long_line():
    """It runs on every log line of a record: a 2,000-character text, the longest a record
    field holds, takes milliseconds even when it is all digits."""
    texts = [
        "Caller: the printer on floor 3 jams on page 2 of 10 again. " * 35,
        "1 " * 1000,
        "one " * 500,
        "4" + " " * 2000 + "x",
        CARD + ", " + "9 " * 990,
    ]
    start = time.perf_counter()
    for text in texts:
        wh.redact(text[: wh.RECORD_TEXT_LIMIT])
    assert time.perf_counter() - start < 0.25


# ── the brief the human hears ───────────────────────────────────────────────────────────────


async def hand_over(call, said: str):
    """The caller reads out their card, agrees to a transfer, and the human says hello."""
    await call.session.run(user_input=said)
    await call.session.run(user_input="I want to talk to a person")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await call.line.human_answers()
    return turn


async def test_the_human_hears_a_card_ending_4242_even_when_the_model_repeats_the_card(
    start_call, caplog
):
    caplog.set_level(logging.INFO)
    said = f"I was charged twice on my card, it's {SPOKEN}."
    # a brief model that ignores its prompt and reads the number out
    call = await start_call(receptionist(brief=f"They were charged twice on card {CARD}."))
    turn = await hand_over(call, said)

    brief = call.human_heard()[0]
    assert f"charged twice on card {ENDING}" in brief
    assert no_card_in(brief)
    [request] = call.model.of("brief")  # the brief's model was never given the card
    assert ENDING in request.chat_ctx.messages()[-1].text_content
    assert no_card_in(json.dumps(request.chat_ctx.to_dict()))
    assert no_card_in(call.line.dials[0].identity) and no_card_in(str(call.agent.handoff))
    consult = call.line.dials[0].room
    assert no_card_in(call.line.attributes[consult]["handoff.brief"])
    call.line.human_presses("1")
    await asyncio.wait_for(turn, 5)
    assert no_card_in(call.agent.results[0].brief)
    assert no_card_in(caplog.text)


async def test_the_brief_model_is_told_never_to_repeat_a_card_number(start_call):
    call = await start_call(receptionist())
    turn = await hand_over(call, f"my card is {CARD}")
    [request] = call.model.of("brief")
    prompt = request.chat_ctx.messages()[0].text_content
    assert "Never repeat a card" in prompt and '"a card ending' in prompt
    call.line.human_presses("2")
    await asyncio.wait_for(turn, 5)


async def test_the_callers_own_words_carry_no_card_when_the_brief_model_fails(start_call):
    call = await start_call(brief_model_down)
    turn = await hand_over(call, f"My card {SPOKEN} was charged twice")

    brief = call.human_heard()[0]
    assert f"In their words: My card {ENDING} was charged twice" in brief
    assert no_card_in(brief)
    call.line.human_presses("2")
    await asyncio.wait_for(turn, 5)


# ── log lines, records, attributes and X-headers ────────────────────────────────────────────


async def test_a_spoken_card_in_the_reason_never_reaches_a_header_attribute_or_log(
    start_call, caplog
):
    caplog.set_level(logging.INFO)
    reason = f"A refund of the double charge on the card the caller read out, {SPOKEN}. Urgent"
    line = RecordingLine(wh.SimulatedHuman.ANSWER, ring_time=0.05)
    settings = settings_for(handoff_mode=wh.HandoffMode.CONFERENCE)
    call = await start_call(receptionist(reason=reason), line=line, settings=settings)
    await call.session.run(user_input="a person please")
    await asyncio.wait_for(call.session.run(user_input="yes please"), 5)

    header = line.dials[0].headers["X-Handoff-Reason"]
    assert header.endswith(ENDING) and no_card_in(header)
    assert f"about {reason.split(', four')[0]}, {ENDING}." in call.caller_heard()[-1]
    assert no_card_in(json.dumps(line.attributes))
    assert no_card_in(caplog.text)


async def test_records_and_their_log_lines_carry_no_spoken_card(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "callbacks.jsonl"
    summary = (
        "Caller: my card is 4 2 four 2 4242 four two 4 2 four two four 2\n"
        "Caller: and my account is nine eight seven, six five four, three two one"
    )
    records = records_kept_in(path)
    records.callback(callback_request(reason=f"refund to {SPOKEN}", summary=summary))
    await records.delivery.written()  # written on the records' thread, off the call's loop
    [record] = saved(path)
    assert record["reason"] == f"refund to {ENDING}"
    assert record["summary"] == (
        f"Caller: my card is {ENDING}\nCaller: and my account is 98765•••21"
    )
    assert no_card_in(caplog.text) and "four" not in caplog.text


def test_attempt_ids_that_look_like_numbers_are_not_redacted(caplog):
    # an attempt id is 8 hex characters; "4930309e" has a run of 7 digits, not a phone number
    records = wh.CallRecords("room-1")
    result = wh.HandoffResult(wh.HandoffOutcome.NO_ANSWER, "support", wh.HandoffMode.CONSULT)
    result.attempt = "4930309e"
    records.handoff(result)
    with caplog.at_level("INFO", logger="warm-handoff"):
        records.call_ended()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call record")]
    call = json.loads(line.removeprefix("call record "))
    assert call["attempts"] == ["4930309e"] and call["destinations"] == ["support"]


# ── model-written text: capped; every text that leaves the call: redacted ───────────────────


def test_redact_turns_cards_and_long_digit_runs_into_safe_text():
    assert wh.redact(f"card {'4111 1111 1111 1111'} ok") == "card a card ending 1111 ok"
    assert wh.redact("4111-1111-1111-1112") == "41111•••12"  # not Luhn-valid: masked
    assert wh.redact("call +1 510 555 0123") == "call +1510•••23"
    assert wh.redact("room 5550123 floor 3") == "room ••• floor 3"  # 7 digits
    assert wh.redact("order 123456, 3 items") == "order 123456, 3 items"  # 6 digits stay


async def test_reason_is_capped_and_redacted_wherever_it_leaves_the_call(start_call):
    reason = "Printer jammed after paying with card 4111 1111 1111 1111. " + "Also " * 200 + "more."
    line = RecordingLine(wh.SimulatedHuman.ANSWER, ring_time=0.05)
    settings = settings_for(handoff_mode=wh.HandoffMode.CONFERENCE)
    call = await start_call(receptionist(reason=reason), line=line, settings=settings)
    await call.session.run(user_input="a person please")
    await asyncio.wait_for(call.session.run(user_input="yes please"), 5)
    intro = call.caller_heard()[-1]
    assert "about Printer jammed after paying with card a card ending 1111. You're now" in intro
    assert "Also" not in intro
    assert line.dials[0].headers["X-Handoff-Reason"].endswith("a card ending 1111")
    assert call.agent.results[0].reason.startswith("Printer jammed")
    assert "4111" not in json.dumps(line.attributes)


async def test_the_brief_on_the_consult_agent_is_redacted(start_call):
    line = RecordingLine(None, ring_time=0.3)
    call = await start_call(receptionist(), line=line)
    await call.session.run(user_input="My card 4111 1111 1111 1111 was charged twice")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(line.answered.is_set)
    consult = line.dials[0].room
    await wait_for(lambda: "handoff.brief" in line.attributes.get(consult, {}))
    assert "a card ending 1111" in line.attributes[consult]["handoff.brief"]
    assert "4111" not in json.dumps(line.attributes)
    line.hang_up_human()
    await asyncio.wait_for(turn, 5)


async def test_records_and_their_log_lines_are_redacted(start_call, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="warm-handoff")
    path = tmp_path / "callbacks.jsonl"
    records = records_kept_in(path)
    records.callback(
        callback_request(
            reason="refund to 4111 1111 1111 1111",
            summary="Caller: my other number is 510 555 0142",
        )
    )
    await records.delivery.written()  # written on the records' thread, off the call's loop
    [record] = saved(path)
    assert record["reason"] == "refund to a card ending 1111"
    assert record["summary"] == "Caller: my other number is 51055•••42"
    assert record["number"] == "+15105550199"  # the callback number itself, in full
    [line] = [r.getMessage() for r in caplog.records if "callback_request record" in r.getMessage()]
    assert "a card ending 1111" in line  # the record's own log line, redacted
    # random ids (hex with a letter) may hold "4111" by chance: the digits are looked for elsewhere
    logged = re.sub(r"\b(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", "<id>", caplog.text)
    assert "4111" not in logged and "5550142" not in logged
    assert "+15105550199" not in logged  # masked in the log line


def digits_read_out(text: str) -> str:
    """Every digit in ``text``, numerals and digit words, in order, nothing between them."""
    return "".join(wh._token_digits(t.group(0)) for t in wh.DIGIT_TOKEN.finditer(text))


async def test_a_callback_number_read_back_reaches_no_log_line_but_the_record_keeps_it(
    start_call, tmp_path, caplog
):
    """The read-back says the number digit by digit ("5 1 0, 5 5 5, 0 1 9 9"), and the caller
    gives another in words: the summary carries neither, in the record or in any log line;
    the record's ``number`` is the callback number in full, for whoever calls back."""
    caplog.set_level(logging.DEBUG)
    details = {"name": "Dana", "best_time": "tomorrow morning"}
    steps = iter(
        [
            Call("request_callback", details),
            Call("request_callback", {**details, "confirmed": True}),
        ]
    )

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            return next(steps)
        return "Okay."

    path = tmp_path / "callbacks.jsonl"
    line = RecordingLine(None, caller_number="+15105550199")
    records = wh.CallRecords(line.caller_room, "job-1", wh.RecordDelivery("", "", str(path)))
    call = await start_call(respond, line=line, records=records)
    await call.session.run(
        user_input="my other phone is five one oh, five five five, oh one four two"
    )
    await call.session.run(user_input="yes, call me back: Dana, tomorrow morning")
    assert "on 5 1 0, 5 5 5, 0 1 9 9," in call.caller_heard()[-1]  # the read-back
    await call.session.run(user_input="yes that's right")
    await call.agent.records.written()
    [record] = saved(path)
    assert record["number"] == "+15105550199"  # in full, where it must be
    assert "on 51055•••99, tomorrow morning" in record["summary"]
    assert "my other phone is 51055•••42" in record["summary"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    [line] = [r.getMessage() for r in caplog.records if "callback_request record" in r.getMessage()]
    assert json.loads(line.split(" record ", 1)[1])["number"] == "+1510•••99"  # masked in logs
    for number in ("5105550199", "5105550142"):
        assert number not in digits_read_out(logged)
        assert number not in digits_read_out(json.dumps(record["summary"]))
