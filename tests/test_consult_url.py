"""The consult room is joined at the URL the job was assigned, not only ``LIVEKIT_URL``.

livekit-agents 1.8.9 keeps that URL only in the private ``JobContext._info.url``; these tests
build the job context the way the framework does (worker.py makes a ``RunningJobInfo`` with
``url=job_assign.url or ws_url``; ipc/proto.py ``StartJobRequest`` carries it to the job
process; ipc/job_proc_lazy_main.py ``_start_job`` makes the ``JobContext``), so they fail if the
framework stops providing it there."""

import io
from urllib.parse import parse_qs, urlparse

import pytest
from aiohttp import web
from conftest import ScriptedLLM, settings_for
from livekit import api, rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.ipc.proto import StartJobRequest
from livekit.agents.job import (
    JobAcceptArguments,
    JobContext,
    JobExecutorType,
    JobProcess,
    RunningJobInfo,
)
from livekit.agents.testing import fake_job_context
from livekit.protocol import agent, models

import warm_handoff as wh

AGENT_IDENTITY = "agent-AJ_test"


def framework_job_context(url: str) -> JobContext:
    """A job context made as the framework makes one for an assigned job."""
    token = (
        api.AccessToken("devkey", "secret-secret-secret-secret-secret")
        .with_identity(AGENT_IDENTITY)
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room="call-1", agent=True))
        .to_jwt()
    )
    sent = StartJobRequest()
    sent.running_job = RunningJobInfo(
        accept_arguments=JobAcceptArguments(name="", identity=AGENT_IDENTITY, metadata=""),
        job=agent.Job(id="AJ_test", room=models.Room(name="call-1"), type=agent.JobType.JT_ROOM),
        url=url,
        token=token,
        worker_id="AW_test",
        fake_job=False,
    )
    wire = io.BytesIO()
    sent.write(wire)
    received = StartJobRequest()
    received.read(io.BytesIO(wire.getvalue()))
    return JobContext(
        proc=JobProcess(
            executor_type=JobExecutorType.PROCESS, user_arguments=None, http_proxy=None
        ),
        info=received.running_job,
        room=rtc.Room(),
        on_connect=lambda: None,
        on_shutdown=lambda _reason: None,
        inference_executor=None,  # type: ignore[arg-type]  # not used here
    )


async def test_the_job_url_is_the_one_the_job_was_assigned():
    ctx = framework_job_context("wss://eu-central.example.livekit.cloud")
    assert wh.job_server_url(ctx, "wss://fallback.example") == (
        "wss://eu-central.example.livekit.cloud"
    )


async def test_a_job_without_a_url_falls_back_to_livekit_url():
    with fake_job_context() as ctx:  # console and test jobs have no signal URL
        assert wh.job_server_url(ctx, "wss://fallback.example") == "wss://fallback.example"


class SignalRecorder:
    """A local HTTP server that notes every signal connection attempt and refuses it (404)."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "SignalRecorder":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        query = parse_qs(urlparse(str(request.url)).query).get("access_token", [""])[0]
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or query
        claims = api.TokenVerifier().verify(token, verify_signature=False) if token else None
        self.attempts.append(
            {
                "path": request.path,
                "identity": claims.identity if claims else "",
                "room": claims.video.room if claims and claims.video else "",
            }
        )
        return web.Response(status=404, text="not a LiveKit server")


async def test_the_consult_room_is_joined_at_the_jobs_url_not_livekit_url():
    async with SignalRecorder() as assigned, SignalRecorder() as configured:
        ctx = framework_job_context(assigned.url)
        settings = settings_for(
            livekit_url=configured.url,
            livekit_api_secret="secret-secret-secret-secret-secret",
        )
        line = wh.LiveKitPhoneLine(ctx, settings)
        session = AgentSession()
        with pytest.raises(rtc.ConnectError):  # the recorder refuses; where it went is the point
            await line.open_consult(
                "call-1-consult-abc",
                "transfer_abc",
                session,
                Agent(instructions="", llm=ScriptedLLM(lambda _: "")),
            )
        await session.aclose()
    assert configured.attempts == []
    assert assigned.attempts and {
        (a["identity"], a["room"]) for a in assigned.attempts if a["path"].startswith("/rtc")
    } == {(f"{AGENT_IDENTITY}-consult", "call-1-consult-abc")}
