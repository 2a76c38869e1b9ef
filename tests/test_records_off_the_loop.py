"""Records on a slow disk never hold the call's event loop (issue 21, item 2).

A call's loop carries the caller's audio; a record's fsync that takes a while (a busy or
network disk) must not stop it. Here ``os.fsync`` takes ``FSYNC_SECONDS`` each time (the
``slow_disk`` fixture) and a ticker measures how late the loop wakes from
``asyncio.sleep(TICK)`` while records and callback requests are written: the largest lag stays
under ``MAX_LAG``, while every record still reaches the disk before it is sent, and the webhook.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from conftest import callback_request, records_kept_in, saved, settings_for

import warm_handoff as wh

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-webhook-secret-0123456789"
FSYNC_SECONDS = 0.1  # one fsync on the slow disk; a callback request takes three
TICK = 0.01  # the ticker's sleep
MAX_LAG = 0.05  # the most the loop may wake late: a call's audio frames are 10-20 ms apart


class SlowDisk:
    """``os.fsync`` that takes ``FSYNC_SECONDS``, noting the threads it ran on."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.threads: set[int] = set()

    def fsync(self, fd: int) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(FSYNC_SECONDS)
        self.real(fd)


@pytest.fixture
def slow_disk(monkeypatch):
    disk = SlowDisk()
    monkeypatch.setattr(os, "fsync", disk.fsync)
    return disk


class LoopLag:
    """A task that sleeps ``TICK`` again and again and keeps the largest delay in waking up:
    how long the loop was held by something else."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            began = time.monotonic()
            await asyncio.sleep(TICK)
            self.worst = max(self.worst, time.monotonic() - began - TICK)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(2 * TICK)  # ticking
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Receiver:
    """A webhook that notes, as each record arrives, whether the callback file already holds
    it."""

    def __init__(self, callback_file: Path) -> None:
        self.callback_file = callback_file
        self.received: list[dict] = []
        self.on_disk_first: list[bool] = []

    async def handle(self, request: web.Request) -> web.Response:
        record = json.loads(await request.read())
        self.received.append(record)
        if record["type"] == "callback_request":
            kept = saved(self.callback_file) if self.callback_file.exists() else []
            self.on_disk_first.append(record["id"] in [k["id"] for k in kept])
        return web.Response(status=200)


@pytest.fixture
async def webhook(tmp_path):
    receiver = Receiver(tmp_path / "callbacks.jsonl")
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield receiver, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def busy() -> wh.HandoffResult:
    return wh.HandoffResult(wh.HandoffOutcome.BUSY, "support", wh.HandoffMode.CONSULT)


async def test_records_on_a_slow_disk_never_hold_the_calls_loop(slow_disk, webhook, tmp_path):
    receiver, url = webhook
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(url, SECRET, str(path), backoff=0.01)
    records = wh.CallRecords("room-1", "job-1", delivery)
    async with LoopLag() as lag:
        records.handoff(busy())
        await asyncio.sleep(0.02)
        records.callback(callback_request())
        await asyncio.sleep(0.02)
        records.callback(callback_request(reason="the modem is dead"))
        records.call_ended()
        await delivery.drain()
    assert lag.worst < MAX_LAG, f"the loop was held for {lag.worst * 1000:.0f} ms"
    assert threading.get_ident() not in slow_disk.threads  # no fsync ran on the loop
    # every record reached the webhook once, with the id it was written under
    assert [r["type"] for r in receiver.received] == [
        "handoff",
        "callback_request",
        "callback_request",
        "call",
    ]
    kept = saved(path)  # the callback file has both requests, in order
    assert [k["reason"] for k in kept] == ["router keeps rebooting", "the modem is dead"]
    assert [k["id"] for k in kept] == [r["id"] for r in receiver.received[1:3]]
    assert receiver.on_disk_first == [True, True]  # on disk before the webhook saw them
    assert list((tmp_path / "outbox").glob("*.json")) == []  # delivered, then removed


async def test_the_jobs_last_records_are_written_before_its_shutdown_returns(slow_disk, tmp_path):
    """A callback request taken as the job ends, and the call's own record written by
    ``finish_call``: both are on disk when ``finish_call`` returns, the webhook being down."""
    path = tmp_path / "callbacks.jsonl"
    delivery = wh.RecordDelivery(dead_url(), SECRET, str(path), attempts=1)
    records = wh.CallRecords("room-1", "job-1", delivery)
    agent = wh.WarmHandoffAgent(settings_for(), wh.SimulatedPhoneLine(None), wh.Models(), records)
    async with LoopLag() as lag:
        records.callback(callback_request())
        await wh.finish_call(agent, records)
    assert lag.worst < MAX_LAG, f"the loop was held for {lag.worst * 1000:.0f} ms"
    [kept] = saved(path)
    waiting = {json.loads(p.read_text())["type"] for p in (tmp_path / "outbox").glob("*.json")}
    assert waiting == {"callback_request", "call"}  # kept for the worker to resend


async def test_the_workers_resend_on_a_slow_disk_never_holds_its_loop(slow_disk, webhook, tmp_path):
    """The worker's main process (``keep_resending``) sends what jobs left in the outbox: its
    reads, locks and removals (an fsync of the folder each) stay off its loop too."""
    receiver, url = webhook
    path = tmp_path / "callbacks.jsonl"
    folder = wh.outbox_folder(str(path))
    folder.mkdir()
    left = [f"left-by-a-job-{n}" for n in range(3)]
    for record_id in left:
        record = {"type": "call", "id": record_id, "room": "r9"}
        (folder / f"{record_id}.json").write_text(json.dumps(record))
    worker = wh.RecordDelivery(url, SECRET, str(path))
    async with LoopLag() as lag:
        assert await worker.resend(min_age=0) == (3, 0)
    assert lag.worst < MAX_LAG, f"the loop was held for {lag.worst * 1000:.0f} ms"
    assert sorted(r["id"] for r in receiver.received) == left
    assert list(folder.glob("*.json")) == []  # delivered, then removed


REQUESTS_AT_THE_END = 10  # more than the loop's default executor has threads (2 cores: 6)
CHILD_FSYNC_SECONDS = 0.02  # all of them take 0.6 s to write

CLOSES_WITH_WRITES_IN_FLIGHT = """
import asyncio, json, os, sys, time
import warm_handoff as wh

real_fsync = os.fsync
def slow_fsync(fd):
    time.sleep({fsync})
    real_fsync(fd)
os.fsync = slow_fsync

async def job():
    records = wh.CallRecords("room-1", "job-1", wh.RecordDelivery({url!r}, "s", {path!r}))

    async def session():
        try:
            await asyncio.Event().wait()
        finally:  # cancelled as the loop shuts down: the call's record, as a session's close
            records.call_ended()

    asyncio.ensure_future(session())
    await asyncio.sleep(0)
    for n in range({requests}):
        records.callback(wh.CallbackRequest("room-1", "Dana", "+15105550199", "now",
                                            f"reason {{n}}", "", "caller"))
    # the job ends here: nothing awaits the records, and the loop shuts down and closes

asyncio.run(job())
lines = open({path!r}).read().count("\\n") if os.path.exists({path!r}) else 0
print(json.dumps({{"on_disk_when_the_loop_closed": lines}}))
"""


async def test_records_in_flight_when_the_loop_closes_are_written_before_the_process_exits(
    tmp_path,
):
    """The loop shuts down and closes as a job process's does after its job (``asyncio.run``'s
    steps: livekit-agents ``ipc/proc_client.py``): its tasks are cancelled (one records the
    call as it goes), its default executor shut down. Records are still being written; the
    process then exits. Every record is on disk afterwards: none was lost with the loop."""
    path = tmp_path / "callbacks.jsonl"
    script = CLOSES_WITH_WRITES_IN_FLIGHT.format(
        fsync=CHILD_FSYNC_SECONDS, url=dead_url(), path=str(path), requests=REQUESTS_AT_THE_END
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DOTENV_FILE": "/dev/null"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # writes were in flight as the loop closed
    assert report["on_disk_when_the_loop_closed"] < REQUESTS_AT_THE_END
    kept = saved(path)
    assert [k["reason"] for k in kept] == [f"reason {n}" for n in range(REQUESTS_AT_THE_END)]
    waiting = {json.loads(p.read_text())["id"]: p for p in (tmp_path / "outbox").glob("*.json")}
    assert {k["id"] for k in kept} < set(waiting)  # kept for the worker, under the same ids
    assert len(waiting) == REQUESTS_AT_THE_END + 1  # and the call's own record
    assert "Traceback" not in done.stderr, done.stderr


async def test_the_caller_is_told_of_their_callback_once_it_is_on_disk(tmp_path, slow_disk):
    path = tmp_path / "callbacks.jsonl"
    desk = wh.CallbackDesk(wh.SimulatedPhoneLine(None), records_kept_in(path))

    class Caller:
        """The caller's session: what is on disk when they are told."""

        on_disk_when_told: list[dict] | None = None

        async def say(self, text: str) -> None:
            self.on_disk_when_told = saved(path) if path.exists() else []

    caller = Caller()
    await desk.confirm(caller, callback_request())  # type: ignore[arg-type]
    assert [r["caller_name"] for r in caller.on_disk_when_told or []] == ["Dana"]


def test_a_record_asked_for_inside_the_executors_submit_is_handed_over_not_deadlocked(
    monkeypatch,
):
    """The garbage collector may finalize a task while this thread is inside the records'
    executor's ``submit``, which holds a lock that is not re-entrant (CPython
    ``concurrent/futures/thread.py``); the finalizer's record asks for that lock again. It is
    handed to another thread and written once the first ``submit`` is done, not deadlocked
    (this hung ``test_records_in_flight_when_the_loop_closes_...`` once the GC ran there)."""
    disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="records-test")
    monkeypatch.setattr(wh, "records_disk", lambda: disk)
    original = concurrent.futures.ThreadPoolExecutor.submit
    inner: list[concurrent.futures.Future[str]] = []

    def submit(self, fn, *args, **kwargs):
        with self._shutdown_lock:  # as the executor's own submit holds it while the GC runs
            if not inner:
                inner.append(wh.on_records_disk(lambda: "the finalizer's record"))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit)
    outcome: list[str] = []
    caller = threading.Thread(
        target=lambda: outcome.append(wh.on_records_disk(lambda: "the record").result(5)),
        daemon=True,
    )
    caller.start()
    caller.join(5)
    assert not caller.is_alive(), "deadlocked inside submit"
    assert outcome == ["the record"] and inner[0].result(5) == "the finalizer's record"
