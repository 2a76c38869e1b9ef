"""Operating it: outcome records (log, attributes, signed webhook, callback file), context for
the human (SIP X-headers, the brief on the consult agent) and the ``check`` command."""

import asyncio
import hashlib
import hmac
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web
from conftest import (
    CALLER_ROOM,
    Call,
    RecordingLine,
    receptionist,
    start_livekit_call,
    wait_for,
)
from fake_livekit import API_SECRET

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-webhook-secret-0123456789"


class Receiver:
    """A local webhook receiver that checks signatures; answers with the scripted statuses."""

    def __init__(self, statuses=(), delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.received: list[dict] = []
        self.attempts = 0
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        timestamp = request.headers["X-Handoff-Timestamp"]
        expected = (
            "sha256="
            + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(expected, request.headers["X-Handoff-Signature"]):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append(json.loads(body))
        return web.Response(status=status)


@pytest.fixture
async def receiver():
    made = []

    async def start(**kw):
        r = Receiver(**kw)
        app = web.Application()
        app.router.add_post("/hook", r.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        made.append(runner)
        return r, f"http://127.0.0.1:{port}/hook"

    yield start
    for runner in made:
        await runner.cleanup()


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


async def busy_then_callback(start_call, delivery, tmp_path):
    steps = iter(
        [
            Call("transfer_call", {"destination": "support", "reason": "router keeps rebooting"}),
            Call("request_callback", {"name": "Dana", "best_time": "after 5pm", "confirmed": True}),
        ]
    )

    def respond(req):
        if (
            req.purpose == "caller"
            and req.last_user_text().startswith("yes")
            and not req.after_tool
        ):
            return next(steps)
        return receptionist()(req)

    line = RecordingLine(wh.SimulatedHuman.BUSY, ring_time=0.02, caller_number="+15105550199")
    call = await start_call(respond, line=line)
    call.agent.records = wh.CallRecords(line.caller_room, "job-1", delivery)
    await asyncio.wait_for(call.session.run(user_input="yes, support please"), 5)
    await asyncio.wait_for(call.session.run(user_input="yes, call me back"), 5)
    call.agent.records.call_ended()
    return call


async def test_records_reach_the_webhook_signed_and_match_the_call(start_call, receiver, tmp_path):
    r, url = await receiver()
    delivery = wh.RecordDelivery(url, SECRET, str(tmp_path / "callbacks.jsonl"), backoff=0.01)
    call = await busy_then_callback(start_call, delivery, tmp_path)
    await delivery.drain()
    assert r.bad_signatures == 0
    handoff, callback, ended = r.received
    assert (
        handoff["type"],
        handoff["destination"],
        handoff["outcome"],
        handoff["sip_status"],
        handoff["mode"],
        handoff["room"],
        handoff["job_id"],
    ) == ("handoff", "support", "busy", 486, "consult", "console-room", "job-1")
    assert handoff["attempt"] == call.agent.results[0].attempt
    timings = handoff["timings"]
    assert timings["decision"] == 0 and timings["dial_start"] >= 0
    assert timings["dial_start"] <= timings["ringing"] <= timings["returned"]
    assert handoff["caller_hold_seconds"] >= 0
    assert (callback["type"], callback["caller_name"], callback["number"], callback["source"]) == (
        "callback_request",
        "Dana",
        "+15105550199",
        "caller",
    )  # the full number, not masked
    assert callback["reason"] == "router keeps rebooting" and callback["summary"]
    assert (ended["type"], ended["outcome"], ended["callback_requests"]) == ("call", "busy", 1)
    # The webhook took every record: nothing waits in the outbox. The callback file is the
    # source of truth (issue 11), so it keeps the request the webhook also took.
    assert list((tmp_path / "outbox").glob("*.json")) == []
    [saved] = [json.loads(x) for x in (tmp_path / "callbacks.jsonl").read_text().splitlines()]
    assert saved["id"] == callback["id"]


async def test_webhook_is_retried_after_5xx(start_call, receiver, tmp_path):
    r, url = await receiver(statuses=[503, 500])
    delivery = wh.RecordDelivery(url, SECRET, str(tmp_path / "cb.jsonl"), backoff=0.01)
    delivery.submit({"type": "call", "room": "r1"})
    await delivery.drain()
    assert r.attempts == 3 and r.received == [{"type": "call", "room": "r1"}]


async def test_a_dead_webhook_neither_slows_nor_fails_the_call_and_keeps_callbacks(
    start_call, tmp_path, caplog
):
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(dead_url(), SECRET, str(path), attempts=3, backoff=0.2)
    call = await busy_then_callback(start_call, delivery, tmp_path)  # 5 s bound inside
    assert call.agent.results[0].outcome is wh.HandoffOutcome.BUSY
    assert call.caller_heard()[-1].startswith("Thank you, Dana")
    await delivery.drain()
    [saved] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (saved["caller_name"], saved["number"]) == ("Dana", "+15105550199")
    failures = [r for r in caplog.records if "webhook did not take" in r.getMessage()]
    assert len(failures) == 3  # handoff, callback and call records: each logged once


async def test_without_a_webhook_callbacks_go_to_the_file(start_call, tmp_path):
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery("", "", str(path))
    await busy_then_callback(start_call, delivery, tmp_path)
    await delivery.drain()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["callback_request"]


async def test_a_full_queue_never_blocks_and_still_keeps_callbacks(tmp_path, caplog):
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(dead_url(), SECRET, str(path), queue_size=1, attempts=1)
    for i in range(3):
        delivery.submit({"type": "callback_request", "room": f"r{i}"})
    await delivery.drain()
    assert sorted(json.loads(x)["room"] for x in path.read_text().splitlines()) == [
        "r0",
        "r1",
        "r2",
    ]
    assert sum("record queue full" in r.getMessage() for r in caplog.records) == 2


async def test_attributes_show_the_handoff_live_and_the_brief_in_the_consult_room(start_call):
    line = RecordingLine(None, ring_time=0.3)
    call = await start_call(receptionist(), line=line)
    await call.session.run(user_input="My order QX-4471 arrived broken")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(
        lambda: line.attributes.get("console-room", {}).get("handoff.state") == "ringing"
    )
    assert line.attributes["console-room"]["handoff.destination"] == "support"
    await wait_for(line.answered.is_set)
    consult = line.dials[0].room
    await wait_for(lambda: "handoff.brief" in line.attributes.get(consult, {}))
    assert "QX-4471" in line.attributes[consult]["handoff.brief"]
    await line.human_accepts()
    await asyncio.wait_for(turn, 5)
    await wait_for(lambda: line.attributes["console-room"]["handoff.state"] == "connected")
    assert line.attributes["console-room"]["handoff.outcome"] == "connected"
    shown = json.dumps(line.attributes)
    assert "+1510" not in shown and "secret" not in shown.lower()  # no numbers, no secrets


@pytest.mark.parametrize("headers_on", [True, False])
async def test_the_invite_carries_short_x_headers(livekit, headers_on):
    server, _ = livekit
    session, agent, _ = await start_livekit_call(
        livekit,
        caller_number="+15105550199",
        sip_headers=headers_on,
        handoff_mode=wh.HandoffMode.CONFERENCE,
    )
    try:
        await session.run(user_input="a person please")
        await asyncio.wait_for(session.run(user_input="yes"), 5)
        headers = dict(server.calls_to("CreateSIPParticipant")[0].request.headers)
        if headers_on:
            assert headers == {
                "X-Handoff-Id": agent.results[0].attempt,
                "X-Handoff-Destination": "support",
                "X-Handoff-Reason": "printer is broken",
                "X-Caller-Number": "+15105550199",
            }
        else:
            assert headers == {}
        assert CALLER_ROOM in server.rooms
    finally:
        await session.aclose()


async def run_check(env: dict[str, str]) -> tuple[int, str, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT", "HANDOFF", "SIP_"))
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "warm_handoff.py"),
        "check",
        env={**clean, "DOTENV_FILE": os.devnull, **env},
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


CHECK_ENV = {
    "SIP_TRUNK_ID": "ST_abc",
    "HANDOFF_CALLER_ID": "+15105550999",
    "HANDOFF_DESTINATIONS": json.dumps(
        {"support": {"number": "+15105550100", "description": "Support"}}
    ),
    "HANDOFF_WEBHOOK_URL": "https://crm.example.com/hook",
    "HANDOFF_WEBHOOK_SECRET": SECRET,
}


async def test_check_prints_the_configuration_masked_and_proves_the_credentials(livekit):
    server, _ = livekit
    server.add_participant("call-1", "caller")
    code, out, err = await run_check({**CHECK_ENV, **server.env(local=True)})
    assert code == 0, err
    assert "LiveKit API: OK" in out and "(2 rooms open)" in out
    assert "destination support" in out and "+1510•••00" in out
    for secret in (API_SECRET, SECRET, "+15105550100", "+15105550999"):
        assert secret not in out + err
    assert [c.method for c in server.calls] == ["ListRooms"]  # a harmless read, nothing else


async def test_check_fails_clearly_on_bad_credentials(livekit):
    server, _ = livekit
    env = {
        **CHECK_ENV,
        **server.env(local=True),
        "LIVEKIT_API_SECRET": "wrong-secret-wrong-secret-wrong!",
    }
    code, out, err = await run_check(env)
    assert code == 1
    assert "LiveKit API: FAILED (unauthenticated" in err
    assert "wrong-secret" not in out + err


async def test_check_fails_clearly_on_bad_configuration():
    code, _, err = await run_check({"HANDOFF_MODE": "sideways"})
    assert code == 1 and "Invalid configuration" in err and "HANDOFF_MODE" in err
