"""Configuration: one typed object, every problem named at once, no secret printed; nothing
an operator writes (nested or huge JSON, a stray space, a non-ASCII digit) can hurt the worker;
.env.example lists every variable."""

import enum
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from conftest import name_the_worker_registers, run_worker, wait_for
from dotenv import dotenv_values
from livekit.agents import APIConnectOptions, llm, utils

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "LIVEKIT_URL": "wss://acme-abc123.livekit.cloud",
    "LIVEKIT_API_KEY": "APIkey",
    "LIVEKIT_API_SECRET": "s3cr3t-value-never-printed",
    "LIVEKIT_SIP_OUTBOUND_TRUNK": "ST_abc",
    "HANDOFF_CALLER_ID": "+15105550999",
    "HANDOFF_DESTINATIONS": json.dumps(
        {
            "support": {
                "number": "+15105550100",
                "description": "Tech support",
                "extension": "12#",
                "ring_timeout": 15,
            },
            "billing": {
                "number": "sip:billing@pbx.example.com",
                "description": "Billing",
                "spoken_name": "our billing desk",
            },
        }
    ),
    "HANDOFF_RING_TIMEOUT": "30",
}


def test_valid_configuration_is_typed():
    s = wh.load_settings(GOOD)
    assert s.sip_trunk_id == "ST_abc"  # LIVEKIT_SIP_OUTBOUND_TRUNK accepted as SIP_TRUNK_ID
    assert [d.name for d in s.destinations] == ["support", "billing"]
    support, billing = s.destinations
    assert (support.target, support.extension, support.ring_timeout) == ("+15105550100", "12#", 15)
    assert billing.said_as == "our billing desk" and support.said_as == "the support team"
    assert s.ring_timeout == 30.0
    assert (s.llm_model, s.tts_model, s.tts_encoding) == (
        "gpt-4o",
        "eleven_multilingual_v2",
        "pcm_44100",
    )
    assert s.mode_in_force is wh.HandoffMode.CONSULT  # auto on LiveKit Cloud
    assert "s3cr3t" not in repr(s)


def test_seed_variable_name_wins_over_alias():
    s = wh.load_settings({**GOOD, "SIP_TRUNK_ID": "ST_seed"})
    assert s.sip_trunk_id == "ST_seed"


@pytest.mark.parametrize(
    "url,way",
    [
        ("wss://acme.livekit.cloud", wh.JoinWay.MOVE),
        ("wss://acme-x1y2.livekit.run:443/", wh.JoinWay.MOVE),  # the framework counts it too
        ("ws://livekit.internal:7880", wh.JoinWay.BRIDGE),
        ("wss://livekit.cloud.example.com", wh.JoinWay.BRIDGE),
        ("wss://evil-livekit.cloud", wh.JoinWay.BRIDGE),
    ],
)
def test_auto_mode_is_consult_everywhere_and_the_url_decides_how_the_human_is_joined(url, way):
    settings = wh.load_settings({**GOOD, "LIVEKIT_URL": url})
    assert settings.mode_in_force is wh.HandoffMode.CONSULT
    assert settings.join_way is way


def test_every_problem_is_named_in_one_message_without_secrets():
    bad = {
        "LIVEKIT_URL": "acme.livekit.cloud",
        "LIVEKIT_API_SECRET": "s3cr3t-value-never-printed",
        "SIP_TRUNK_ID": "trunk-1",
        "HANDOFF_CALLER_ID": "5105550999",
        "HANDOFF_DESTINATIONS": json.dumps(
            {
                "support": {"number": "510-555-0100", "description": "x"},
                "Sales Team": {"number": "+15105550100"},
            }
        ),
        "HANDOFF_MODE": "transfer",
        "HANDOFF_RING_TIMEOUT": "forever",
    }
    with pytest.raises(wh.ConfigError) as err:
        wh.load_settings(bad)
    message = str(err.value)
    for expected in [
        "LIVEKIT_URL must start with",
        "LIVEKIT_API_KEY is not set",
        "SIP_TRUNK_ID must be",
        "HANDOFF_CALLER_ID must be an E.164",
        "HANDOFF_DESTINATIONS['support'].number",
        "HANDOFF_DESTINATIONS['Sales Team']: name",
        "['Sales Team'].description is required",
        "HANDOFF_MODE must be one of auto, consult, conference",
        "HANDOFF_RING_TIMEOUT must be",
    ]:
        assert expected in message
    assert len(err.value.problems) == 9
    assert "s3cr3t" not in message


@pytest.mark.parametrize("seconds", ["71", "120"])
def test_a_ring_longer_than_livekit_waits_for_an_answer_is_refused(seconds):
    """LiveKit gives a dial that waits for the answer 80 s (livekit pkg/service/sip.go), keys
    to an extension included: a ring timeout beyond 70 s would end in its timeout."""
    with pytest.raises(wh.ConfigError, match="HANDOFF_RING_TIMEOUT must be .*70"):
        wh.load_settings({**GOOD, "HANDOFF_RING_TIMEOUT": seconds})
    ringing_long = {"support": {"number": "+15105550100", "description": "x", "ring_timeout": 90}}
    with pytest.raises(wh.ConfigError, match=r"ring_timeout must be a number of seconds, 5 to 70"):
        wh.load_settings({**GOOD, "HANDOFF_DESTINATIONS": json.dumps(ringing_long)})
    assert wh.load_settings({**GOOD, "HANDOFF_RING_TIMEOUT": "70"}).ring_timeout == 70


def test_destinations_must_be_json_object():
    with pytest.raises(wh.ConfigError, match="not valid JSON"):
        wh.load_settings({**GOOD, "HANDOFF_DESTINATIONS": "support=+15105550100"})


def test_console_needs_no_telephony_settings():
    s = wh.load_settings({}, telephony=False)
    assert s.destinations == () and s.sip_trunk_id == ""
    with pytest.raises(wh.ConfigError, match="LIVEKIT_URL is not set"):
        wh.load_settings({}, telephony=True)


def test_missing_provider_keys_are_listed():
    assert wh.missing_provider_keys({"OPENAI_API_KEY": "x", "ELEVENLABS_API_KEY": "y"}) == [
        "DEEPGRAM_API_KEY"
    ]
    assert len(wh.missing_provider_keys({})) == 3


def test_phone_numbers_are_masked():
    assert wh.mask_number("+15105550123") == "+1510•••23"
    assert "5550123" not in wh.mask_number("+15105550123")
    assert wh.mask_number("sip:alice.smith@pbx.example.com").endswith("@pbx.example.com")


@pytest.mark.parametrize("command", ["start", "dev"])
def test_worker_stops_at_start_with_one_clear_message(command):
    done = run_worker(
        command, {"LIVEKIT_API_SECRET": "s3cr3t-value-never-printed", "HANDOFF_MODE": "nope"}
    )
    assert done.returncode == 1
    assert "Invalid configuration" in done.stderr
    assert "Traceback" not in done.stderr
    for name in (
        "LIVEKIT_URL",
        "LIVEKIT_API_KEY",
        "SIP_TRUNK_ID",
        "HANDOFF_MODE",
        "DEEPGRAM_API_KEY",
        "OPENAI_API_KEY",
        "ELEVEN_API_KEY",
    ):
        assert name in done.stderr
    assert "s3cr3t" not in done.stderr + done.stdout


def test_console_without_provider_keys_fails_fast():
    done = run_worker("console", {})
    assert done.returncode == 1
    assert "OPENAI_API_KEY is not set" in done.stderr
    assert "LIVEKIT_URL" not in done.stderr  # console needs no LiveKit settings


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
        done = run_worker("start", env)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker started with a callback file it cannot write")
    assert done.returncode == 1 and "HANDOFF_CALLBACK_FILE: the folder" in done.stderr


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
    assert "HANDOFF_DESTINATIONS nests too deeply" in problems(HANDOFF_DESTINATIONS=deep)
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


def test_a_destinations_unknown_keys_are_named_in_one_problem():
    """Only the keys of HANDOFF_DESTINATIONS' format are read: not the model's own field names
    ("target" for "number"), and not "name", which the key gives."""
    odd = {**SUPPORT, "target": "+15105550101", "name": "billing", "colour": "blue"}
    message = problems(HANDOFF_DESTINATIONS=destinations(support=odd))
    assert "HANDOFF_DESTINATIONS['support'] has unknown keys: colour, name, target" in message
    assert message.count("unknown keys") == 1


def test_a_destination_without_a_number_is_named():
    message = problems(HANDOFF_DESTINATIONS=destinations(support={"description": "Support"}))
    assert "HANDOFF_DESTINATIONS['support'].number is required" in message


@pytest.mark.parametrize("raw,on", [("off", False), ("No", False), ("0", False), ("on", True)])
def test_sip_headers_are_on_or_off(raw, on):
    assert wh.load_settings({"HANDOFF_SIP_HEADERS": raw}, telephony=False).sip_headers is on


def test_sip_headers_that_are_neither_on_nor_off_are_named():
    """A typo ("of") no longer turns the headers on silently."""
    message = problems(HANDOFF_SIP_HEADERS="of")
    assert "HANDOFF_SIP_HEADERS must be on or off (got 'of')" in message


def test_seconds_take_ascii_digits_only():
    """Python's float() reads "٣0" as 30; an operator's number of seconds is ASCII."""
    message = problems(HANDOFF_RING_TIMEOUT="٣0")
    assert "HANDOFF_RING_TIMEOUT must be a number of seconds (got '٣0')" in message


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


@pytest.mark.parametrize(
    "uri", ["sip:billing@pbx.example.com;transport=tcp", "sip:a@b@pbx.example.com"]
)
def test_a_sip_destination_names_a_bare_host(uri):
    """LiveKit takes the host of a sip: destination only as a hostname or IP (livekit/protocol
    livekit/sip.go validateHostnameFormat): refused at start, not at the first transfer."""
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "number": uri}))
    assert "HANDOFF_DESTINATIONS['support'].number must be E.164" in message


@pytest.mark.parametrize("key", ["number", "description", "spoken_name", "fallback"])
def test_null_where_text_is_expected_is_an_error(key):
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, key: None}))
    assert f"HANDOFF_DESTINATIONS['support'].{key} must be text" in message


@pytest.mark.parametrize(
    "raw,name",
    [(" my-agent ", "my-agent"), ("my-agent\t", "my-agent"), ("   ", wh.DEFAULT_AGENT_NAME)],
)
def test_agent_name_registers_exactly_the_value_that_was_validated(raw, name):
    registered = name_the_worker_registers({"AGENT_NAME": raw})
    assert registered == wh.load_settings({"AGENT_NAME": raw}, telephony=False).agent_name
    assert registered == name


@pytest.mark.parametrize("raw", ["2.5", "three", "0", "6"])
def test_max_attempts_is_a_whole_count(raw):
    message = problems(HANDOFF_MAX_ATTEMPTS=raw)
    assert "HANDOFF_MAX_ATTEMPTS must be a whole number from 1 to 5" in message
    assert "seconds" not in message


def test_bad_json_is_not_also_reported_as_empty():
    message = problems(HANDOFF_DESTINATIONS="{not json")
    assert "not valid JSON" in message and "is empty" not in message


def test_agent_name_from_the_dotenv_file_reaches_the_dispatcher(tmp_path):
    env_file = tmp_path / "worker.env"
    env_file.write_text("AGENT_NAME=acme-reception\n")
    assert name_the_worker_registers({"DOTENV_FILE": str(env_file)}) == "acme-reception"


# ── .env.example lists every variable the worker reads ──────────────────────────────────────


def variables_the_worker_reads() -> set[str]:
    """Each variable of the Settings model, its aliases, and the providers' keys."""
    names = {name for v in wh.VARIABLES for name in (v.name, *v.aliases)}
    return names | {name for names in wh.PROVIDER_KEYS.values() for name in names}


def test_env_example_lists_every_variable_the_worker_reads():
    names = variables_the_worker_reads()
    assert {"AGENT_NAME", "SIP_TRUNK_ID", "HANDOFF_CALLER_ID", "LIVEKIT_URL"} <= names
    text = (ROOT / ".env.example").read_text()
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
    assert not missing, f".env.example does not mention {missing}"


# -- the Settings model drives loading, check and the docs' table --------------------------------


def test_each_settings_field_is_read_from_variables_of_its_own():
    names = [name for v in wh.VARIABLES for name in (v.name, *v.aliases)]
    assert [v.setting for v in wh.VARIABLES] == list(wh.Settings.model_fields)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]+", name) for name in names), names
    assert len(set(names)) == len(names)  # no variable fills two fields


def test_a_settings_built_in_code_reads_no_environment(monkeypatch):
    """Tests and the benchmark build Settings in code: the process's environment never slips
    in, and the operator's bounds are not theirs (a test rings for 0.1 s)."""
    monkeypatch.setenv("HANDOFF_MODE", "conference")
    monkeypatch.setenv("LIVEKIT_URL", "wss://elsewhere.livekit.cloud")
    settings = wh.Settings(ring_timeout=0.1)
    assert settings.handoff_mode is wh.HandoffMode.AUTO and settings.livekit_url == ""
    assert settings.ring_timeout == 0.1
    with pytest.raises(wh.ConfigError, match="HANDOFF_RING_TIMEOUT must be between 5 and 70"):
        wh.load_settings({"HANDOFF_RING_TIMEOUT": "0.1"}, telephony=False)


def test_load_settings_reads_only_the_mapping_it_is_given(monkeypatch):
    monkeypatch.setenv("HANDOFF_MODE", "conference")
    assert wh.load_settings({}, telephony=False).handoff_mode is wh.HandoffMode.AUTO
    assert wh.load_settings(telephony=False).handoff_mode is wh.HandoffMode.CONFERENCE


@pytest.mark.parametrize("variable", [v for v in wh.VARIABLES if v.secret], ids=lambda v: v.name)
def test_a_secret_is_shown_only_as_set(variable):
    settings = wh.load_settings({variable.name: "s3cr3t-value-never-printed"}, telephony=False)
    secret = getattr(settings, variable.setting)
    assert secret.get_secret_value() == "s3cr3t-value-never-printed"
    assert "s3cr3t" not in str(secret) + repr(settings.model_dump())
    assert "s3cr3t" not in repr(settings) + repr(settings.shown_by_check())
    assert dict(settings.shown_by_check())[variable.name] == "(set)"


@pytest.mark.parametrize("raw", ["front desk", "a" * 65, "agent/1"])
def test_a_bad_agent_name_registers_the_default_and_stops_the_worker(raw):
    """The server registers the name the table's AGENT_NAME row validated, never a raw one."""
    assert wh.registered_agent_name({"AGENT_NAME": raw}) == wh.DEFAULT_AGENT_NAME
    with pytest.raises(wh.ConfigError, match="AGENT_NAME may hold only letters"):
        wh.load_settings({"AGENT_NAME": raw}, telephony=False)


def readme_configuration_table() -> dict[str, tuple[str, str, str]]:
    """The configuration table (docs/configuration.md, "Variables"): variable -> (required for
    start?, default, meaning)."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("\n## Variables\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if m := re.fullmatch(r"\| `([A-Z][A-Z0-9_]+)` \| (.*) \| (.*) \| (.*) \|", line):
            rows[m[1]] = (m[2], m[3], m[4])
    return rows


def as_documented(default: object) -> str:
    """A default as the README writes it; "" for none (the README says in words what happens)
    and for the phrase cache's folder (it depends on the host)."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, enum.Enum):
        return default.value
    if isinstance(default, (int, float)):
        return f"{default:g}"
    if isinstance(default, str) and default != wh.DEFAULT_PHRASE_CACHE:
        return default
    return ""


def destination_examples() -> list[tuple[str, str]]:
    """Every example that sets HANDOFF_DESTINATIONS, as (where, its text): each ```sh block of
    the README and docs/ that sets it, and .env.example whole."""
    examples = [(".env.example", (ROOT / ".env.example").read_text())]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```sh\n(.*?)```", doc.read_text(), flags=re.S)
        examples += [(doc.name, b) for b in blocks if b.startswith("HANDOFF_DESTINATIONS=")]
    return examples


@pytest.mark.parametrize("where,example", destination_examples(), ids=lambda x: x[:30])
def test_each_destinations_example_is_a_configuration_that_starts(where, example):
    """An example's variables, read as the worker reads .env, with the LiveKit settings an
    operator adds: start takes them (a sip: destination needs a number to show, for one)."""
    values = {k: v for k, v in dotenv_values(stream=io.StringIO(example)).items() if v}
    operator = {k: GOOD[k] for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")}
    wh.load_settings({**operator, "SIP_TRUNK_ID": "ST_abc", **values})


def test_readme_configuration_table_has_a_row_per_variable_in_the_tables_order():
    provider_keys = [names[0] for names in wh.PROVIDER_KEYS.values()]
    assert list(readme_configuration_table()) == [v.name for v in wh.VARIABLES] + provider_keys


@pytest.mark.parametrize("variable", wh.VARIABLES, ids=lambda v: v.name)
def test_readme_configuration_row_agrees_with_the_table(variable):
    required, default, meaning = readme_configuration_table()[variable.name]
    assert (required == "yes") is variable.needed
    if documented := as_documented(variable.default):
        assert default.strip('`"') == documented
    if variable.bounds:
        assert f"{variable.bounds.low:g} to {variable.bounds.high:g}" in meaning


# -- the providers' base URLs --------------------------------------------------------------------

BASE_URLS = ("DEEPGRAM_BASE_URL", "OPENAI_BASE_URL", "ELEVEN_BASE_URL")


def test_bad_base_urls_are_named_at_start_with_every_other_problem_and_no_token():
    bad = {
        "DEEPGRAM_BASE_URL": "api.eu.deepgram.com/t0k3n/v1/listen",  # no scheme
        "OPENAI_BASE_URL": "https://gateway.example.com/v1 ?key=t0k3n",  # a space inside
        "ELEVEN_BASE_URL": "wss://api.elevenlabs.io/v1?t0k3n",  # its HTTP synthesis can't
        "HANDOFF_MODE": "sideways",
    }
    with pytest.raises(wh.ConfigError) as err:
        wh.load_settings({**GOOD, **bad})
    assert err.value.problems == [
        "HANDOFF_MODE must be one of auto, consult, conference (got 'sideways')",
        "DEEPGRAM_BASE_URL must be a wss://, ws://, https:// or http:// URL, without spaces",
        "OPENAI_BASE_URL must be an http:// or https:// URL, without spaces",
        "ELEVEN_BASE_URL must be an http:// or https:// URL, without spaces",
    ]
    assert "t0k3n" not in str(err.value)

    done = run_worker("console", {**bad, **{names[0]: "x" for names in wh.PROVIDER_KEYS.values()}})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for name in (*BASE_URLS, "HANDOFF_MODE"):
        assert f"{name} must be" in done.stderr
    assert "t0k3n" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "name,url,read",
    [
        ("DEEPGRAM_BASE_URL", "https://api.eu.deepgram.com/v1/listen", None),
        ("DEEPGRAM_BASE_URL", "wss://api.eu.deepgram.com/v1/listen", None),  # Deepgram's docs
        ("DEEPGRAM_BASE_URL", "http://10.0.0.5:8080/v1/listen", None),  # self-hosted
        ("DEEPGRAM_BASE_URL", "ws://10.0.0.5:8080/v1/listen", None),
        ("OPENAI_BASE_URL", "https://gateway.example.com/v1", None),
        ("OPENAI_BASE_URL", "http://127.0.0.1:4000/v1", None),
        ("ELEVEN_BASE_URL", "https://api.eu.residency.elevenlabs.io/v1", None),
        # the plugin appends "/text-to-speech/...": a trailing slash would make it "//"
        ("ELEVEN_BASE_URL", "http://127.0.0.1:9000/v1/", "http://127.0.0.1:9000/v1"),
    ],
)
def test_a_good_base_url_is_read_as_written(name, url, read):
    settings = wh.load_settings({**GOOD, name: f" {url} "})
    assert getattr(settings, wh.VARIABLE[name].setting) == (read or url)


def test_check_shows_a_base_url_by_its_origin_only():
    settings = wh.load_settings(
        {
            **GOOD,
            "DEEPGRAM_BASE_URL": "wss://api.eu.deepgram.com/v1/listen?t0k3n=1",
            "OPENAI_BASE_URL": "https://user:s3cret@gateway.example.com:8443/t0k3n/v1",
        }
    )
    shown = dict(settings.shown_by_check())
    assert shown["DEEPGRAM_BASE_URL"] == "wss://api.eu.deepgram.com/…"
    assert shown["OPENAI_BASE_URL"] == "https://gateway.example.com:8443/…"
    assert shown["ELEVEN_BASE_URL"] == "(not set: the provider's default)"
    assert "t0k3n" not in repr(settings.shown_by_check())
    assert "s3cret" not in repr(settings.shown_by_check())
    # as the webhook's: the same origin, shown the same way
    webhook = wh.load_settings(
        {
            **GOOD,
            "HANDOFF_WEBHOOK_URL": "https://gateway.example.com:8443/t0k3n/v1",
            "HANDOFF_WEBHOOK_SECRET": "s" * 16,
        }
    )
    assert dict(webhook.shown_by_check())["HANDOFF_WEBHOOK_URL"] == shown["OPENAI_BASE_URL"]


class ProviderStandIn:
    """One local HTTP server standing in for the three providers: it keeps every request
    (method, path, whether it asked for a websocket) and answers a chat completion as OpenAI
    streams one (server-sent events) and a synthesis as ElevenLabs does (raw PCM); anything
    else, Deepgram's websocket included, gets a 503 (where it went is what counts)."""

    REPLY = "Hello from the gateway"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bool]] = []
        self.url = ""

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            (request.method, request.path, request.headers.get("Upgrade") == "websocket")
        )
        await request.read()
        if request.path.endswith("/chat/completions"):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": self.REPLY}}],
            }
            events = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await events.prepare(request)
            await events.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            await events.write_eof()
            return events
        if "/text-to-speech/" in request.path:
            return web.Response(body=bytes(2 * 4410), content_type="audio/pcm")  # 0.1 s
        return web.Response(status=503, text="not standing in for this")


@pytest.fixture
async def stand_in(monkeypatch):
    for names in wh.PROVIDER_KEYS.values():
        monkeypatch.setenv(names[0], "test-key")
    provider = ProviderStandIn()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", provider.answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    provider.url = f"http://{host}:{port}"
    async with utils.http_context.open():
        yield provider
    await runner.cleanup()


ONE_TRY = APIConnectOptions(max_retry=0, timeout=5.0)


async def test_a_worker_with_openai_base_url_sends_its_chat_requests_there(stand_in):
    settings = wh.load_settings({"OPENAI_BASE_URL": f"{stand_in.url}/gateway/v1"}, telephony=False)
    model = wh.build_models(settings, vad=None).llm
    assert model is not None and model.provider == stand_in.url.removeprefix("http://")
    chat = llm.ChatContext()
    chat.add_message(role="user", content="Hello?")
    reply = await model.chat(chat_ctx=chat, conn_options=ONE_TRY).collect()
    assert reply.text == ProviderStandIn.REPLY
    assert stand_in.requests == [("POST", "/gateway/v1/chat/completions", False)]


async def test_a_worker_with_eleven_base_url_synthesises_there(stand_in):
    settings = wh.load_settings({"ELEVEN_BASE_URL": f"{stand_in.url}/eu/v1/"}, telephony=False)
    voice = wh.build_models(settings, vad=None).tts
    assert voice is not None
    async with voice.synthesize("Hello.", conn_options=ONE_TRY) as stream:
        frames = [audio.frame async for audio in stream]
    assert sum(f.duration for f in frames) == pytest.approx(0.1, abs=0.01)
    [(method, path, _)] = stand_in.requests
    assert method == "POST" and path.startswith("/eu/v1/text-to-speech/")  # no "//"


@pytest.mark.parametrize("scheme", ["http", "ws"])
async def test_a_worker_with_deepgram_base_url_streams_there(stand_in, scheme):
    """The speech-to-text of a call streams over a websocket, at the given address whichever
    of http:// or ws:// it was written with."""
    url = stand_in.url.replace("http", scheme, 1) + "/eu/v1/listen"
    settings = wh.load_settings({"DEEPGRAM_BASE_URL": url}, telephony=False)
    ear = wh.build_models(settings, vad=None).stt
    assert ear is not None
    stream = ear.stream(conn_options=ONE_TRY)
    try:
        await wait_for(lambda: stand_in.requests, 5)
    finally:
        await stream.aclose()
    assert stand_in.requests[0] == ("GET", "/eu/v1/listen", True)


def plugin_base_url(plugin: object) -> str:
    """Where a Deepgram STT or an ElevenLabs TTS sends its requests: the plugins keep it only
    in their private options (livekit-plugins 1.8.9, ``_STTOptions.endpoint_url`` and
    ``_TTSOptions.base_url``)."""
    options = plugin._opts  # type: ignore[attr-defined]
    return getattr(options, "endpoint_url", None) or options.base_url


def test_unset_base_urls_are_the_providers_defaults_whatever_the_sdk_would_read(monkeypatch):
    for names in wh.PROVIDER_KEYS.values():
        monkeypatch.setenv(names[0], "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "")  # "OPENAI_BASE_URL=" in .env: blank, not a URL
    models = wh.build_models(wh.load_settings(telephony=False), vad=None)
    assert plugin_base_url(models.stt) == "https://api.deepgram.com/v1/listen"
    assert plugin_base_url(models.tts) == "https://api.elevenlabs.io/v1"
    assert models.llm is not None and models.llm.provider == "api.openai.com"
    # the table is the one source: the SDK does not read the environment behind it
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/elsewhere/v1")
    built_in_code = wh.build_models(wh.Settings(), vad=None).llm
    assert built_in_code is not None and built_in_code.provider == "api.openai.com"


# ── messages that name what was given ───────────────────────────────────────────────────────


def test_a_number_that_is_not_e164_is_echoed():
    message = problems(
        HANDOFF_CALLER_ID="5105550999",
        HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "number": "510-555-0100"}),
    )
    assert "HANDOFF_CALLER_ID must be an E.164 number like +15105550100, or caller " in message
    assert "(got '5105550999')" in message
    assert "['support'].number must be E.164 (+15105550100) or a sip: URI (got '510-555-0100')" in (
        message
    )


def test_a_fallback_that_is_not_a_destination_lists_the_valid_names():
    message = problems(
        HANDOFF_DESTINATIONS=destinations(
            support={**SUPPORT, "fallback": "Billing"},
            billing={"number": "+15105550102", "description": "Invoices"},
        )
    )
    assert (
        "HANDOFF_DESTINATIONS['support'].fallback must name another destination "
        "(got 'Billing'; the others: billing)"
    ) in message


@pytest.mark.parametrize(
    "tz,region", [("EST", "America/New_York"), ("PST8PDT", "America/Los_Angeles")]
)
def test_a_legacy_time_zone_name_is_refused_with_the_regions_name(tz, region):
    hours = {"tz": tz, "mon-fri": "09:00-17:00"}
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "hours": hours}))
    assert f"['support'].hours.tz {tz!r} is a legacy zone name" in message
    assert region in message


def test_a_time_zone_folder_is_a_problem_not_a_crash():
    hours = {"tz": "America", "mon-fri": "09:00-17:00"}
    message = problems(HANDOFF_DESTINATIONS=destinations(support={**SUPPORT, "hours": hours}))
    assert "['support'].hours.tz must be an IANA time zone" in message


def test_a_nested_value_where_text_belongs_is_named():
    hours = "[" * 50 + "]" * 50
    raw = '{"support": {"number": "+15105550100", "description": "S", "hours": ' + hours + "}}"
    assert "HANDOFF_DESTINATIONS['support'].hours must be an object" in problems(
        HANDOFF_DESTINATIONS=raw
    )
