"""On a worker host, as a user runs them: ``python warm_handoff.py start`` and ``check`` in a
copy of the project with ``.env`` from ``.env.example``, configured only through the
environment, against a LiveKit server that answers (standins/fake_livekit.py) and the providers'
stand-ins (standins/providers.py)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest
from terminal import project_copy, worker_env

from standins.fake_livekit import FakeLiveKitServer
from standins.providers import ProviderStandIns

TELEPHONY = {"SIP_TRUNK_ID": "ST_abc"}  # what .env.example leaves for the operator to fill in


# the worker started as this module's own command line does, and as livekit-agents' does (what
# ``lk agent`` runs): that one imports the module and never calls its ``main``
OWN, FRAMEWORKS = ("warm_handoff.py",), ("-m", "livekit.agents")


async def command(
    folder, *args: str, env: dict[str, str], via: tuple[str, ...] = OWN
) -> asyncio.subprocess.Process:
    """``python warm_handoff.py <args>`` (or ``python -m livekit.agents <args>
    warm_handoff.py``) in a copy of the project, with ``env`` as the environment."""
    project_copy(folder)
    argv = [*via, *args] if via == OWN else [*via, *args, "warm_handoff.py"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=folder,
        env=worker_env({"HANDOFF_PHRASE_CACHE": str(folder / "phrases"), **env}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


@pytest.mark.parametrize("via", [OWN, FRAMEWORKS], ids=["own", "frameworks"])
async def test_start_registers_the_agent_and_stops_cleanly_on_sigterm(tmp_path, via):
    async with FakeLiveKitServer() as livekit, ProviderStandIns() as providers:
        env = {**livekit.env(local=True), **providers.env(), **TELEPHONY}
        worker = await command(tmp_path, "start", env=env, via=via)
        try:
            started = time.monotonic()
            while not livekit.workers and time.monotonic() - started < 30:
                if worker.returncode is not None:
                    out, _ = await worker.communicate()
                    pytest.fail(f"start exited before registering:\n{out.decode()[-3000:]}")
                await asyncio.sleep(0.1)
            assert [w.agent_name for w in livekit.workers] == ["warm-handoff-agent"]
            worker.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(worker.communicate(), 30)
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    printed = out.decode()
    assert worker.returncode == 0, printed[-3000:]
    assert "Traceback" not in printed and "Invalid configuration" not in printed
    assert "registered worker" in printed  # the framework's own line, with the worker id
    assert livekit.workers[0].worker_id in printed
    assert providers.llm_requests == []  # nothing asked of a model without a call


async def test_check_passes_with_the_readme_configuration_and_names_the_providers(tmp_path):
    async with FakeLiveKitServer() as livekit, ProviderStandIns() as providers:
        env = {**livekit.env(local=True), **providers.env(), **TELEPHONY}
        check = await command(tmp_path, "check", env=env)
        out, _ = await asyncio.wait_for(check.communicate(), 60)
    printed = out.decode()
    assert check.returncode == 0, printed
    assert "LiveKit API: OK" in printed
    origin = providers.base_url.rstrip("/")
    for name in ("OPENAI_BASE_URL", "DEEPGRAM_BASE_URL", "ELEVEN_BASE_URL"):
        [row] = [line for line in printed.splitlines() if line.startswith(name)]
        assert row.split()[-1] == f"{origin}/…", row  # the origin only: a path may hold a token
    assert "stand-in" not in printed  # the keys are never printed
    assert [c.method for c in livekit.calls] == ["ListRooms"]


async def test_the_frameworks_own_start_refuses_a_bad_configuration_before_registering(tmp_path):
    async with FakeLiveKitServer() as livekit, ProviderStandIns() as providers:
        env = {**livekit.env(local=True), **providers.env(), **TELEPHONY}
        env |= {"HANDOFF_MODE": "sideways", "OPENAI_API_KEY": ""}
        worker = await command(tmp_path, "start", env=env, via=FRAMEWORKS)
        try:
            out, _ = await asyncio.wait_for(worker.communicate(), 30)
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        assert livekit.workers == []  # never registered
    printed = out.decode()
    assert worker.returncode == 1, printed[-3000:]
    assert "Invalid configuration" in printed and "HANDOFF_MODE" in printed, printed[-3000:]
    assert "OPENAI_API_KEY is not set" in printed
    assert "Traceback" not in printed
