"""Nothing trusted: configuration, model-written text and the dial pattern can't hurt the
worker; every text that leaves the call is redacted; ``check`` and the CLI say what is wrong."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Call, receptionist, settings_for, wait_for
from test_config import GOOD, _run_worker
from test_operate import CHECK_ENV, run_check

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent


def problems(**env: str) -> str:
    with pytest.raises(wh.ConfigError) as err:
        wh.load_settings({**GOOD, **env})
    assert "Traceback" not in str(err.value)
    return str(err.value)


def destinations(**entries) -> str:
    return json.dumps(entries)


SUPPORT = {"number": "+15105550100", "description": "Support"}

# ── configuration ───────────────────────────────────────────────────────────────────────────


def test_deeply_nested_or_huge_destinations_give_a_message():
    deep = '{"support": ' + "[" * 5_000 + "]" * 5_000 + "}"  # short, but too deep to parse
    assert "HANDOFF_DESTINATIONS nests deeper than" in problems(HANDOFF_DESTINATIONS=deep)
    huge = destinations(support={**SUPPORT, "description": "x" * 100_000})
    assert "HANDOFF_DESTINATIONS is too long" in problems(HANDOFF_DESTINATIONS=huge)


def test_the_nesting_opening_hours_will_need_is_allowed():
    hours = {"weekly": {"mon": [{"open": "09:00", "close": "17:00"}]}, "closed": ["12-25"]}
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "hours": hours}))
    assert "nests" not in message  # deep enough for hours; their own format is checked apart
    assert "hours.closed must list dates" in message


def test_duplicate_destination_keys_are_an_error():
    first = json.dumps({"number": "+15105550100", "description": "A"})
    raw = f'{{"support": {first}, "support": {first}}}'
    assert "'support' more than once" in problems(HANDOFF_DESTINATIONS=raw)


def test_destination_names_are_matched_whole():
    message = problems(HANDOFF_DESTINATIONS=json.dumps({"support\n": SUPPORT}))
    assert "HANDOFF_DESTINATIONS['support\\n']: name must be" in message


@pytest.mark.parametrize("number", ["+1٥١٠5550100", "+1５１０5550100"])
def test_only_ascii_digits_count_in_phone_numbers(number):
    message = problems(
        HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "number": number}),
        HANDOFF_CALLER_ID=number,
    )
    assert "HANDOFF_DESTINATIONS['support'].number must be E.164" in message
    assert "HANDOFF_CALLER_ID must be an E.164" in message


@pytest.mark.parametrize("key", ["number", "description", "spoken_name", "fallback"])
def test_null_where_text_is_expected_is_an_error(key):
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, key: None}))
    assert f"HANDOFF_DESTINATIONS['support'].{key} must be text" in message


@pytest.mark.parametrize("raw", [" my-agent ", "my-agent\t", "   "])
def test_agent_name_registers_exactly_the_value_that_was_validated(raw):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LIVEKIT_AGENT_NAME", "LIVEKIT_AGENT_NAME_OVERRIDE")
    }
    out = subprocess.run(
        [sys.executable, "-c", "import warm_handoff; print(repr(warm_handoff.server._agent_name))"],
        cwd=ROOT,
        env={**env, "AGENT_NAME": raw, "DOTENV_FILE": os.devnull},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    registered = eval(out.stdout.strip().splitlines()[-1])  # a repr we printed
    assert registered == wh.load_settings({"AGENT_NAME": raw}, telephony=False).agent_name


@pytest.mark.parametrize("raw", ["2.5", "three", "0", "6"])
def test_max_attempts_is_a_whole_count(raw):
    message = problems(HANDOFF_MAX_ATTEMPTS=raw)
    assert "HANDOFF_MAX_ATTEMPTS must be a whole number from 1 to 5" in message
    assert "seconds" not in message


def test_bad_json_is_not_also_reported_as_empty():
    message = problems(HANDOFF_DESTINATIONS="{not json")
    assert "not valid JSON" in message and "is empty" not in message


# ── the dial pattern and the caller's number ────────────────────────────────────────────────


async def direct_dial(start_call, settings, number):
    def respond(req):
        if req.purpose == "caller" and not req.after_tool:
            return Call("transfer_to_number", {"number": number, "reason": "a friend"})
        return "Sorry, I can't connect you to that number."

    call = await start_call(respond, settings=settings)
    stalls: list[float] = []

    async def heartbeat() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            stalls.append(time.monotonic() - before)

    beat = asyncio.ensure_future(heartbeat())
    try:
        await asyncio.wait_for(call.session.run(user_input=f"please call {number}"), 30)
    finally:
        beat.cancel()
    return call, max(stalls, default=0.0)


@pytest.mark.parametrize(
    "pattern",
    [
        r"\+(1?){9}(1?){9}(1?){9}[02-9]",  # backtracks catastrophically in Python's re
        r"\+(?:(\d*)\1)*(?:(\d*)\2)*(?:(\d*)\3)*(?:(\d*)\4)*(?:(\d*)\5)*[02-9]",  # in regex
    ],
)
async def test_a_catastrophic_dial_pattern_never_blocks_the_event_loop(start_call, pattern):
    settings = wh.load_settings(
        {**GOOD, "HANDOFF_ALLOW_DIAL_PATTERN": pattern}, telephony=False
    )
    settings = settings_for(allow_dial_pattern=settings.allow_dial_pattern)
    call, stalled = await direct_dial(start_call, settings, "+11111111111111")
    assert stalled < 0.5, f"the event loop stalled for {stalled:.1f}s"
    assert call.line.dials == []  # refused


async def test_transfer_to_number_takes_only_ascii_digits(start_call):
    import re

    settings = settings_for(allow_dial_pattern=re.compile(r"\+1510555\d{4}"))
    call, _ = await direct_dial(start_call, settings, "+1510555٠١٢٣")
    assert call.line.dials == []


# ── model-written text: capped; every text that leaves the call: redacted ───────────────────


def test_redact_turns_cards_and_long_digit_runs_into_safe_text():
    assert wh.redact(f"card {'4111 1111 1111 1111'} ok") == "card a card ending 1111 ok"
    assert wh.redact("4111-1111-1111-1112") == "41111•••12"  # not Luhn-valid: masked
    assert wh.redact("call +1 510 555 0123") == "call +1510•••23"
    assert wh.redact("room 5550123 floor 3") == "room ••• floor 3"  # 7 digits
    assert wh.redact("order 123456, 3 items") == "order 123456, 3 items"  # 6 digits stay


async def test_reason_is_capped_and_redacted_wherever_it_leaves_the_call(start_call):
    reason = (
        "Printer jammed after paying with card 4111 1111 1111 1111. " + "Also " * 200 + "more."
    )
    line = wh.SimulatedPhoneLine(wh.SimulatedHuman.ANSWER, ring_time=0.05)
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
    line = wh.SimulatedPhoneLine(None, ring_time=0.3)
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
    path = tmp_path / "callbacks.jsonl"
    records = wh.CallRecords("room-1", "job-1", wh.RecordDelivery("", "", str(path)))
    records.callback(
        wh.CallbackRequest(
            room="room-1",
            caller_name="Dana",
            number="+15105550199",
            best_time="after 5pm",
            reason="refund to 4111 1111 1111 1111",
            summary="Caller: my other number is 510 555 0142",
            source="caller",
        )
    )
    [saved] = [json.loads(x) for x in path.read_text().splitlines()]
    assert saved["reason"] == "refund to a card ending 1111"
    assert saved["summary"] == "Caller: my other number is 51055•••42"
    assert saved["number"] == "+15105550199"  # the callback number itself, in full
    assert "4111" not in caplog.text and "5550142" not in caplog.text
    assert "+15105550199" not in caplog.text  # masked in the log line


# ── check and the CLI ───────────────────────────────────────────────────────────────────────


async def test_check_never_prints_a_webhook_path_or_query_and_names_missing_keys(livekit):
    server, _ = livekit
    url = "https://crm.example.com/hooks/t0k3n-in-path?key=s3cret-query"
    code, out, err = await run_check(
        {**CHECK_ENV, **server.env(local=True), "HANDOFF_WEBHOOK_URL": url, "DEEPGRAM_API_KEY": ""}
    )
    assert "t0k3n" not in out + err and "s3cret" not in out + err
    assert "https://crm.example.com" in out
    assert "DEEPGRAM_API_KEY" in err


async def test_check_names_the_cause_of_a_network_failure(monkeypatch, capsys):
    def no_dns(*args, **kwargs):  # the resolver fails: the machine has no DNS
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    settings = wh.load_settings(
        {**CHECK_ENV, "LIVEKIT_URL": "https://lk.example.com", "LIVEKIT_API_KEY": "k",
         "LIVEKIT_API_SECRET": "s" * 32}
    )
    assert await wh.check(settings) is False
    err = capsys.readouterr().err
    assert "cannot connect to host lk.example.com:443: name resolution" in err

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.undo()
    refused = wh.Settings(**{**settings.__dict__, "livekit_url": f"http://127.0.0.1:{port}"})
    assert await wh.check(refused) is False
    assert f"cannot connect to host 127.0.0.1:{port}: " in capsys.readouterr().err


async def test_check_reports_a_callback_folder_that_does_not_exist_and_the_outbox(
    livekit, tmp_path
):
    server, _ = livekit
    missing = str(tmp_path / "gone" / "callbacks.jsonl")
    code, _, err = await run_check(
        {**CHECK_ENV, **server.env(local=True), "HANDOFF_CALLBACK_FILE": missing}
    )
    assert code == 1 and "HANDOFF_CALLBACK_FILE: the folder" in err

    here = str(tmp_path / "callbacks.jsonl")
    wh.Outbox(wh.outbox_folder(here)).put("r1", {"type": "call"})
    env = {**CHECK_ENV, **server.env(local=True), "HANDOFF_CALLBACK_FILE": here}
    code, out, err = await run_check(env)
    assert code == 0, err
    assert "Outbox: 1 record(s) waiting" in out


def test_start_refuses_a_callback_file_it_cannot_write(tmp_path):
    env = {
        "LIVEKIT_URL": "ws://127.0.0.1:9",
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s" * 32,
        "SIP_TRUNK_ID": "ST_abc",
        "HANDOFF_DESTINATIONS": destinations(support=SUPPORT),
        "HANDOFF_CALLBACK_FILE": str(tmp_path / "gone" / "callbacks.jsonl"),
        "DEEPGRAM_API_KEY": "x",
        "OPENAI_API_KEY": "x",
        "ELEVEN_API_KEY": "x",
    }
    try:
        done = _run_worker("start", env)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker started with a callback file it cannot write")
    assert done.returncode == 1 and "HANDOFF_CALLBACK_FILE: the folder" in done.stderr


def test_help_lists_check():
    done = _run_worker("--help", {})
    assert done.returncode == 0, done.stderr
    assert "check" in done.stdout and "resend-outbox" in done.stdout


def test_console_without_a_terminal_exits_non_zero_with_a_message():
    keys = {"DEEPGRAM_API_KEY": "x", "OPENAI_API_KEY": "x", "ELEVEN_API_KEY": "x"}
    done = _run_worker("console", keys)  # stdin and stdout are not a terminal here
    assert done.returncode != 0
    assert "console needs a terminal" in done.stderr and "Traceback" not in done.stderr
