"""Nothing lost: callback requests are durable before anything else, the webhook is fed
at-least-once from an outbox that the worker's main process resends, the job's shutdown is
bounded, and a caller who leaves mid-read-back or mid-"You're now connected" is recorded right."""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import pytest
from aiohttp import web
from conftest import Call, RecordingLine, receptionist, settings_for, wait_for
from livekit.agents.worker import ServerOptions
from test_operate import SECRET, dead_url

import warm_handoff as wh

CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number


class Receiver:
    """A webhook receiver that checks signatures and freshness as the README's verifier does,
    de-duplicates by X-Handoff-Record-Id, and can be slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received: dict[str, dict] = {}  # by record id
        self.posts = 0
        self.record_ids_match = True

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = await request.read()
        timestamp = request.headers["X-Handoff-Timestamp"]
        expected = (
            "sha256="
            + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        )
        fresh = abs(time.time() - int(timestamp)) <= 300
        if not (fresh and hmac.compare_digest(expected, request.headers["X-Handoff-Signature"])):
            return web.Response(status=401)
        record = json.loads(body)
        record_id = request.headers["X-Handoff-Record-Id"]
        self.record_ids_match &= record.get("id") == record_id
        self.received.setdefault(record_id, record)
        return web.Response(status=200)


@pytest.fixture
async def receiver():
    made = []

    async def start(**kw):
        r = Receiver(**kw)
        app = web.Application()
        app.router.add_post("/hook", r.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        made.append(runner)
        return r, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"

    yield start
    for runner in made:
        await runner.cleanup()


def request(**kw) -> wh.CallbackRequest:
    base = dict(
        room="room-1",
        caller_name="Dana",
        number="+15105550199",
        best_time="after 5pm",
        reason="router keeps rebooting",
        summary=f"Dana's router reboots; she read out her card {CARD}.",
        source="caller",
    )
    return wh.CallbackRequest(**{**base, **kw})


def saved(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ── the callback file ───────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("where", ["missing folder", "a directory", "/dev/full"])
async def test_a_callback_file_that_cannot_be_written_logs_the_number_in_full(
    tmp_path, caplog, where
):
    path = {
        "missing folder": tmp_path / "no-such-folder" / "callbacks.jsonl",
        "a directory": tmp_path,
        "/dev/full": Path("/dev/full"),
    }[where]
    records = wh.CallRecords("room-1", "job-1", wh.RecordDelivery("", "", str(path)))
    records.callback(request())
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = error.getMessage()
    assert "+15105550199" in message  # the one unmasked number a log may hold
    assert "Dana" in message and "after 5pm" in message
    assert "a card ending 1111" in message and CARD not in message
    assert "1111 1111" not in caplog.text  # redacted in every line, not only the error


async def test_a_callback_request_is_on_disk_before_the_webhook_is_tried(receiver, tmp_path):
    r, url = await receiver(delay=30)  # a receiver that answers after 30 s
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(url, SECRET, str(path))
    records = wh.CallRecords("room-1", "job-1", delivery)
    records.callback(request())
    [line] = saved(path)  # at once, not after the webhook gave up
    assert (line["caller_name"], line["number"]) == ("Dana", "+15105550199")
    assert line["summary"] == "Dana's router reboots; she read out her card a card ending 1111."
    assert [p.stem for p in (tmp_path / "outbox").glob("*.json")] == [line["id"]]


# ── at-least-once webhook, bounded job shutdown, the main process resends ───────────────────


async def abandoned_during_read_back(start_call, records):
    """A call: support is busy; the caller asks for a callback and hangs up during the
    read-back. Its records: a handoff, then the abandoned callback request behind it."""
    steps = iter(
        [
            Call("transfer_call", {"destination": "support", "reason": "router keeps rebooting"}),
            Call("request_callback", {"name": "Dana", "best_time": "after 5pm"}),
        ]
    )
    line = RecordingLine(wh.SimulatedHuman.BUSY, ring_time=0.02, caller_number="+15105550199")

    def respond(req):
        if req.purpose == "caller" and req.last_user_text().startswith("yes"):
            if not req.after_tool:
                step = next(steps)
                if step.name == "request_callback":
                    line.hang_up_caller()  # gone as the details are read back
                return step
        return receptionist()(req)

    call = await start_call(respond, line=line)
    call.agent.records = records
    await asyncio.wait_for(call.session.run(user_input="yes, support please"), 5)
    await asyncio.wait_for(call.session.run(user_input="yes, call me back"), 5)
    return call


def test_the_shutdown_bound_is_the_frameworks():
    assert (
        wh.JOB_SHUTDOWN_TIMEOUT
        == ServerOptions.__dataclass_fields__["shutdown_process_timeout"].default
    )


@pytest.mark.parametrize("webhook", ["refuses connections", "answers after 30 s"])
async def test_records_survive_a_job_shutdown_and_the_worker_resends_them(
    start_call, receiver, tmp_path, caplog, webhook
):
    if webhook == "refuses connections":
        url = dead_url()
    else:
        slow, url = await receiver(delay=30)
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(url, SECRET, str(path))  # production retries and timeouts
    records = wh.CallRecords("console-room", "job-1", delivery)
    call = await abandoned_during_read_back(start_call, records)

    began = time.monotonic()
    await wh.finish_call(call.agent, records)  # what the job's shutdown callback runs
    took = time.monotonic() - began
    assert took < wh.JOB_SHUTDOWN_TIMEOUT - 1, took  # the process exits before it is killed

    [kept] = saved(path)  # the callback file has it, whatever the webhook did
    assert (kept["source"], kept["caller_name"], kept["number"]) == (
        "abandoned",
        "Dana",
        "+15105550199",
    )
    waiting = sorted(p.stem for p in (tmp_path / "outbox").glob("*.json"))
    assert len(waiting) == 3  # handoff, callback request, call: none given up
    assert any("wait in" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    # The worker's main process, later: a healthy receiver takes them all, once each.
    r, url = await receiver()
    worker = wh.RecordDelivery(url, SECRET, str(path))
    assert await worker.resend(min_age=30) == (0, 0)  # too young: still the job's to send
    assert await worker.resend(min_age=0) == (3, 0)
    assert sorted(r.received) == waiting and r.record_ids_match
    assert [rec["type"] for rec in sorted(r.received.values(), key=lambda x: x["type"])] == [
        "call",
        "callback_request",
        "handoff",
    ]
    assert list((tmp_path / "outbox").glob("*.json")) == []


async def test_a_record_being_sent_is_not_sent_twice(receiver, tmp_path):
    r, url = await receiver(delay=0.5)
    delivery = wh.RecordDelivery(url, SECRET, str(tmp_path / "cb.jsonl"))
    delivery.submit({"type": "call", "id": "rec-1", "room": "r1"})
    await wait_for(lambda: r.posts == 1)
    worker = wh.RecordDelivery(url, SECRET, str(tmp_path / "cb.jsonl"))
    assert await worker.resend(min_age=0) == (0, 0)  # the job holds it: skipped
    await delivery.drain()
    assert r.posts == 1 and list(r.received) == ["rec-1"]


async def test_the_worker_resends_the_outbox_from_its_main_process(receiver, tmp_path, monkeypatch):
    """``python warm_handoff.py start`` runs ``AgentServer.run`` in the main process; its
    ``worker_started`` event starts the resender there."""
    r, url = await receiver()
    path = tmp_path / "callbacks.jsonl"
    outbox = wh.Outbox(wh.outbox_folder(str(path)))
    outbox.put("left-by-a-job", {"type": "call", "id": "left-by-a-job", "room": "r9"})
    old = time.time() - 120
    import os

    os.utime(outbox.folder / "left-by-a-job.json", (old, old))
    for key, value in {
        "HANDOFF_WEBHOOK_URL": url,
        "HANDOFF_WEBHOOK_SECRET": SECRET,
        "HANDOFF_CALLBACK_FILE": str(path),
    }.items():
        monkeypatch.setenv(key, value)
    run = asyncio.ensure_future(wh.server.run(devmode=True, unregistered=True))
    try:
        await wait_for(lambda: "left-by-a-job" in r.received, 10)
        await wait_for(lambda: not list(outbox.folder.glob("*.json")))
    finally:
        await wh.server.aclose()
        await asyncio.wait_for(run, 10)
        if wh._resender is not None:
            wh._resender.cancel()


# ── the caller leaves at the wrong moment ───────────────────────────────────────────────────


async def test_a_caller_who_hangs_up_during_the_read_back_leaves_a_callback_request(
    start_call, tmp_path
):
    path = tmp_path / "callbacks.jsonl"
    records = wh.CallRecords("console-room", "job-1", wh.RecordDelivery("", "", str(path)))
    call = await abandoned_during_read_back(start_call, records)
    [abandoned] = records.callbacks
    assert (abandoned.source, abandoned.caller_name, abandoned.best_time) == (
        "abandoned",
        "Dana",
        "after 5pm",
    )
    assert abandoned.number == "+15105550199" and abandoned.reason == "router keeps rebooting"
    call.agent.call_ended()
    assert len(records.callbacks) == 1  # recorded once
    assert [x["source"] for x in saved(path)] == ["abandoned"]


async def test_a_read_back_never_confirmed_is_recorded_when_the_call_ends(start_call):
    def respond(req):
        if req.purpose == "caller" and not req.after_tool:
            return Call("request_callback", {"name": "Dana", "best_time": "after 5pm"})
        return None

    line = RecordingLine(None, caller_number="+15105550199")
    call = await start_call(respond, line=line)
    await asyncio.wait_for(call.session.run(user_input="please call me back"), 5)
    assert call.agent.records.callbacks == []  # read back, not confirmed yet
    await call.session.aclose()
    call.agent.call_ended()
    [request] = call.agent.records.callbacks
    assert (request.source, request.caller_name) == ("abandoned", "Dana")


@pytest.mark.parametrize("mode", [wh.HandoffMode.CONSULT, wh.HandoffMode.CONFERENCE])
async def test_a_transfer_stays_connected_when_the_caller_hangs_up_as_it_connects(start_call, mode):
    line: RecordingLine

    def on_step(text: str) -> None:
        if text == "hold music off" and line.legs():  # "You're now connected" is next
            line.hang_up_caller()

    line = RecordingLine(None, ring_time=0.05, announce=on_step)
    call = await start_call(receptionist(), line=line, settings=settings_for(handoff_mode=mode))
    await call.session.run(user_input="a person please")
    turn = asyncio.ensure_future(call.session.run(user_input="yes please"))
    await wait_for(line.answered.is_set)
    if mode is wh.HandoffMode.CONSULT:
        await line.human_accepts()
    await asyncio.wait_for(turn, 5)
    [result] = call.agent.results
    assert result.outcome is wh.HandoffOutcome.CONNECTED
    assert call.agent.records.callbacks == []  # not an abandoned caller
    await wait_for(lambda: line.legs() == [])  # the human is not left alone in the room


# ── parallel tool calls ─────────────────────────────────────────────────────────────────────


class StreamedCalls(wh.llm.LLM):
    """Tool calls streamed one at a time, ``gap`` seconds apart, as the OpenAI plugin emits
    each tool call once its arguments are complete (livekit-plugins-openai llm.py)."""

    def __init__(self, turns, gap: float = 0.3) -> None:
        super().__init__()
        self.turns = turns
        self.gap = gap
        self.requests = 0

    def chat(self, *, chat_ctx, tools=None, conn_options=None, **_):
        from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

        self.requests += 1
        return _Streamed(
            self,
            chat_ctx=chat_ctx,
            tools=tools or [],
            conn_options=conn_options or DEFAULT_API_CONNECT_OPTIONS,
        )


class _Streamed(wh.llm.LLMStream):
    async def _run(self) -> None:
        from livekit.agents.llm import ChatChunk, ChoiceDelta, FunctionToolCall

        model = self._llm
        last = self._chat_ctx.items[-1] if self._chat_ctx.items else None
        if last is not None and last.type == "function_call_output":
            return  # nothing more to say after the tools
        calls = model.turns.pop(0) if model.turns else []
        for i, call in enumerate(calls):
            if i:
                await asyncio.sleep(model.gap)
            self._event_ch.send_nowait(
                ChatChunk(
                    id="streamed",
                    delta=ChoiceDelta(
                        role="assistant",
                        tool_calls=[
                            FunctionToolCall(
                                name=call.name,
                                arguments=json.dumps(call.arguments),
                                call_id=f"call_{model.requests}_{i}",
                            )
                        ],
                    ),
                )
            )


async def start_streamed(turns, line, settings=None, gap=0.3):
    from livekit.agents import AgentSession

    model = StreamedCalls(turns, gap)
    agent = wh.WarmHandoffAgent(
        settings or settings_for(),
        line,
        wh.Models(llm=model, turn_handling={"turn_detection": "manual"}),
    )
    session = AgentSession()
    await session.start(agent=agent)
    return session, agent, model


TRANSFER = Call("transfer_call", {"destination": "support", "reason": "printer"})
CALLBACK = Call("request_callback", {"name": "Dana", "best_time": "after 5pm", "confirmed": True})


@pytest.mark.parametrize(
    "turn", [[TRANSFER, CALLBACK], [CALLBACK, TRANSFER]], ids=["transfer first", "callback first"]
)
async def test_a_callback_in_the_same_turn_as_a_transfer_is_refused_and_never_speaks(turn):
    line = RecordingLine(wh.SimulatedHuman.ANSWER, ring_time=0.05)
    conference = settings_for(handoff_mode=wh.HandoffMode.CONFERENCE)
    session, agent, model = await start_streamed([turn], line, conference)
    try:
        await asyncio.wait_for(session.run(user_input="yes, support, or call me back"), 10)
        await wait_for(lambda: agent.results, 10)
        await asyncio.sleep(0.5)  # anything still to come from the tools
        assert agent.results[0].connected
        assert agent.records.callbacks == []
        said = [m.text_content for m in session.history.messages() if m.role == "assistant"]
        assert not any("Thank you, Dana" in (s or "") for s in said), said
        assert said[-1].endswith("now connected with our support team. I'll leave you to it.")
    finally:
        await line.aclose()
        await session.aclose()


async def test_a_second_transfer_in_the_same_turn_never_dials():
    line: RecordingLine

    def on_step(text: str) -> None:
        if text.startswith("dialling support"):
            line.hang_up_caller()  # the first transfer ends at once: the caller left

    line = RecordingLine(None, ring_time=5, announce=on_step)
    second = Call("transfer_call", {"destination": "billing", "reason": "printer"})
    # the second call streams in after the first transfer has ended
    session, agent, _ = await start_streamed([[TRANSFER, second]], line, gap=1.5)
    try:
        await asyncio.wait_for(session.run(user_input="support, or else billing"), 10)
        await asyncio.sleep(0.5)
        assert [r.outcome for r in agent.results] == [wh.HandoffOutcome.CALLER_LEFT]
        assert [d.destination.name for d in line.dials] == ["support"]
    finally:
        await line.aclose()
        await session.aclose()
