"""Deployment files agree with the worker: the LiveKit SIP requests in sip/, .env.example, the
README's wiring recipe, the Dockerfile and .dockerignore. Offline; no Docker or LiveKit needed."""

from __future__ import annotations

import fnmatch
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


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


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
    if example is None:
        pytest.skip(".env.example has no AGENT_NAME")
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
    """The worker refuses any SIP_TRUNK_ID that is not an outbound trunk id (ST_...)."""
    trunk_id = example_value("SIP_TRUNK_ID")
    assert trunk_id and trunk_id.startswith("ST_"), trunk_id


# ── README: the wiring recipe ───────────────────────────────────────────────────────────────


def test_readme_wiring_uses_the_sip_files_and_sets_the_trunk_id():
    section = readme_section("Wiring LiveKit SIP")
    for command, name in (
        ("lk sip outbound create", "outbound-trunk.json"),
        ("lk sip inbound create", "inbound-trunk.json"),
        ("lk sip dispatch create", "dispatch-rule.json"),
    ):
        assert f"{command} sip/{name}" in section, (
            f"README wiring should run `{command} sip/{name}`"
        )
    assert "SIP_TRUNK_ID" in section, "README should say to put the trunk id into SIP_TRUNK_ID"
    assert "AGENT_NAME" in section


def test_readme_scaling_covers_the_dispatcher():
    section = readme_section("Scaling")
    for topic in ("load threshold", "idle process", "drain", "capacity"):
        assert topic in section.lower(), f"README Scaling should cover {topic!r}"
    capacity = re.search(r"\*\*Capacity\.\*\*(.*?)(?=\n- |\n\n|\Z)", section, re.DOTALL)
    assert capacity, "README Scaling should have a **Capacity.** item"
    assert "<!-- capacity figure -->" in capacity.group(1) or re.search(r"\d", capacity.group(1)), (
        "the Capacity item should give the benchmark's figure (or keep its placeholder)"
    )


# ── Dockerfile and .dockerignore ────────────────────────────────────────────────────────────


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        steps.append((instruction.upper(), args.strip()))
    return steps


def first(steps: list[tuple[str, str]], instruction: str, pattern: str) -> int:
    for i, (ins, args) in enumerate(steps):
        if ins == instruction and re.search(pattern, args):
            return i
    raise AssertionError(f"Dockerfile has no {instruction} matching {pattern!r}")


def test_dockerfile_base_image_is_slim_python():
    steps = dockerfile()
    froms = [args for ins, args in steps if ins == "FROM"]
    assert froms, "Dockerfile has no FROM"
    assert re.fullmatch(r"python:3\.1\d+(\.\d+)?-slim(-\w+)?", froms[-1].split()[0]), froms[-1]


def test_dockerfile_runs_as_a_non_root_user():
    steps = dockerfile()
    users = [i for i, (ins, _) in enumerate(steps) if ins == "USER"]
    assert users, "Dockerfile has no USER"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), user
    assert users[-1] < first(steps, "CMD", ".")


def test_dockerfile_installs_dependencies_before_copying_the_code():
    steps = dockerfile()
    copy_requirements = first(steps, "COPY", r"(^|\s)requirements\.txt\s")
    install = first(steps, "RUN", r"pip install .*-r requirements\.txt")
    copy_code = first(steps, "COPY", r"(^|\s)(\.|warm_handoff\.py)\s+\S+$")
    assert copy_requirements < install < copy_code


def test_dockerfile_fetches_model_files_at_build():
    steps = dockerfile()
    download = first(steps, "RUN", r"download-files")
    assert first(steps, "RUN", r"pip install") < download


def test_dockerfile_starts_the_worker():
    cmds = [args for ins, args in dockerfile() if ins == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["python", "warm_handoff.py", "start"]


def test_dockerfile_bakes_in_no_secret():
    for ins, args in dockerfile():
        if ins in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", args), f"{ins} {args}"
        if ins in ("COPY", "ADD"):
            assert ".env" not in args.split(), f"{ins} {args}"


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, simplified: a pattern matches a path or one of its parent directories,
    '**/' matches any number of directories, the last matching pattern wins, '!' re-includes."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
            n = len(parts)
            candidates = ["/".join(parts[j : i + 1]) for i in range(n) for j in range(i + 1)]
        else:
            candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_secrets_envs_and_caches_out():
    patterns = dockerignore()
    for path in (".env", ".env.local", ".venv/bin/python", ".pytest_cache/v", "sip/__pycache__/x"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"
    assert ".env" in patterns


def test_dockerignore_keeps_what_the_image_copies():
    patterns = dockerignore()
    for ins, args in dockerfile():
        if ins == "COPY" and "--from" not in args:
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for source in sources:
                if source != ".":
                    assert not ignored(source, patterns), f".dockerignore drops {source}"
                    assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
