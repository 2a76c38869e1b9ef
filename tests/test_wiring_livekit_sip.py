"""Wiring LiveKit SIP: the request files in sip/ are what `lk sip ... create` sends, agree with
the worker and .env.example, and the wiring recipe (docs/wiring-sip.md) creates each. Offline;
no LiveKit needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import name_the_worker_registers
from google.protobuf import json_format
from livekit.protocol import sip

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent
SIP = ROOT / "sip"


def read_json(name: str) -> dict:
    return json.loads((SIP / name).read_text())


def example_value(name: str) -> str | None:
    """The example value of NAME in .env.example, set (NAME=...) or commented out (#NAME=...)."""
    text = (ROOT / ".env.example").read_text()
    m = re.search(rf"^#?\s*{re.escape(name)}=(.*)$", text, re.MULTILINE)
    if m is None:
        return None
    value = m.group(1).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


def readme_commands(title: str) -> list[str]:
    """The shell commands in the code blocks of docs/wiring-sip.md's ``## title`` section."""
    text = (ROOT / "docs" / "wiring-sip.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"docs/wiring-sip.md has no '## {title}' section"
    blocks = re.findall(r"^\s*```sh\n(.*?)^\s*```", m.group(1), re.MULTILINE | re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def dispatch_agent_names() -> list[str]:
    rule = read_json("dispatch-rule.json")["dispatch_rule"]
    return [a["agentName"] for a in rule["roomConfig"]["agents"]]


# ── sip/: the requests `lk sip ... create` sends ────────────────────────────────────────────

# `lk` reads each file with protojson into these request messages and rejects unknown fields;
# json_format.Parse does the same (it accepts both camelCase and snake_case field names).
REQUESTS = {
    "inbound-trunk.json": sip.CreateSIPInboundTrunkRequest,
    "outbound-trunk.json": sip.CreateSIPOutboundTrunkRequest,
    "dispatch-rule.json": sip.CreateSIPDispatchRuleRequest,
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_sip_file_parses_as_the_request_lk_sends(name):
    request = json_format.Parse((SIP / name).read_text(), REQUESTS[name]())
    if name == "dispatch-rule.json":
        info = request.dispatch_rule  # the current shape, not the deprecated top-level fields
        assert request.HasField("dispatch_rule")
        assert info.rule.WhichOneof("rule") == "dispatch_rule_individual"
        assert info.rule.dispatch_rule_individual.room_prefix
        assert not info.sip_dispatch_rule_id
    else:
        trunk = request.trunk
        assert not trunk.sip_trunk_id, "the server assigns the trunk id"
        assert trunk.numbers, "lk refuses a trunk without numbers"
        assert all(wh.E164.match(n) for n in trunk.numbers), trunk.numbers
    if name == "outbound-trunk.json":
        address = request.trunk.address
        assert address, "lk refuses an outbound trunk without an address"
        assert not address.startswith(("sip:", "sips:")) and not re.search(r"[@;]", address), (
            "the address is a hostname or IP, not a SIP URI"
        )


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_sip_files_hold_no_credentials(name):
    text = (SIP / name).read_text()
    assert not re.search(r"auth_?(username|password)", text, re.IGNORECASE), (
        f"{name}: pass credentials with --auth-user/--auth-pass, not in a committed file"
    )


def test_dispatch_rule_targets_the_default_agent_name():
    assert dispatch_agent_names() == [wh.DEFAULT_AGENT_NAME]


def test_dispatch_rule_agent_name_matches_env_example():
    example = example_value("AGENT_NAME")
    assert example is not None, ".env.example names the agent the dispatch rule dispatches"
    assert dispatch_agent_names() == [example]


def test_dispatch_rule_agent_name_is_the_name_the_worker_registers():
    registered = name_the_worker_registers({})
    assert dispatch_agent_names() == [registered]
    assert wh.load_settings({}, telephony=False).agent_name == registered


def test_outbound_trunk_numbers_include_the_example_caller_id():
    caller_id = example_value("HANDOFF_CALLER_ID")
    assert caller_id, ".env.example should show a HANDOFF_CALLER_ID example"
    assert caller_id in read_json("outbound-trunk.json")["trunk"]["numbers"]


def test_example_trunk_id_is_an_outbound_trunk_id():
    """The worker refuses any SIP_TRUNK_ID that is not an outbound trunk id (ST_...); the
    example's is one it takes."""
    trunk_id = example_value("SIP_TRUNK_ID")
    assert trunk_id and trunk_id.startswith("ST_"), trunk_id
    env = {
        "LIVEKIT_URL": "wss://example.livekit.cloud",
        "LIVEKIT_API_KEY": "key",
        "LIVEKIT_API_SECRET": "secret",
        "SIP_TRUNK_ID": trunk_id,
        "HANDOFF_DESTINATIONS": example_value("HANDOFF_DESTINATIONS") or "",
    }
    assert wh.load_settings(env).sip_trunk_id == trunk_id  # the whole example is taken


# ── docs/wiring-sip.md: the wiring recipe creates each file ─────────────────────────────────


@pytest.mark.parametrize(
    "command,name",
    [
        ("lk sip outbound create", "outbound-trunk.json"),
        ("lk sip inbound create", "inbound-trunk.json"),
        ("lk sip dispatch create", "dispatch-rule.json"),
    ],
)
def test_readme_wiring_creates_each_sip_file(command, name):
    commands = readme_commands("Create the trunks and the dispatch rule")
    assert any(c.startswith(f"{command} sip/{name}") for c in commands), commands
