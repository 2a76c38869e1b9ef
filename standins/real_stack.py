"""The real LiveKit stack on this machine: livekit-server, livekit-sip and Redis, the ``lk`` CLI,
the worker as deployed (``python warm_handoff.py dev`` in a subprocess), and phones that speak SIP
and RTP (SIPp, from Debian), whose traffic is captured (tcpdump) and read back by
``standins/recordings.py``.

Versions and configs: ``stack/`` (``versions.env``, ``livekit.yaml``, ``sip.yaml``); ``bash
stack/build`` builds the binaries into ``.stack/``. Facts used here, from the sources and from
running them (``shared/reference/livekit-real-stack.md``):

- WebRTC (pion in the server and livekit-sip, libwebrtc in the worker) gathers no candidates on
  loopback, so the run needs a non-loopback interface: a veth pair with a private address, made
  inside the network namespace the test run is in (``unshare -n``, as ``.ci/run`` does). This
  kernel has no ``dummy`` link type; veth works.
- livekit-sip needs Redis ("sip not connected (redis required)") and answers an inbound INVITE
  with 200 only once the agent publishes audio.
- The worker runs in dev mode: in production mode it stops taking jobs at a load of 0.7
  (livekit-agents worker.py ``_default_load_threshold``), which two busy cores reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from livekit import api

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "stack"
BIN = ROOT / ".stack"  # stack/build: .stack/<name>-<version>/<name>

API_KEY = "devkey"
API_SECRET = "real-stack-test-secret-0123456789abcdef"  # stack/livekit.yaml, stack/sip.yaml
SERVER_URL = "ws://127.0.0.1:7880"
REDIS_PORT = 6390
SIP_PORT = 5060  # livekit-sip
HUMAN_SIP, HUMAN_RTP = 5070, 6100  # the outbound trunk's address (stack_trunks)
CALLER_SIP, CALLER_RTP = 5080, 6000
INBOUND_NUMBER = "+15105550100"  # sip/inbound-trunk.json
CALLER_NUMBER = "+15105550199"
INTERFACE = ("lkstack0", "lkstack1", "10.77.0.1/24")  # the veth pair WebRTC needs


def versions() -> dict[str, str]:
    out = {}
    for line in (STACK / "versions.env").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[name.strip()] = value.strip().strip('"')
    return out


def binaries() -> dict[str, Path]:
    v = versions()
    return {
        name: BIN / f"{name}-{v[key]}" / name
        for name, key in (
            ("livekit-server", "LIVEKIT_SERVER_VERSION"),
            ("livekit-sip", "LIVEKIT_SIP_VERSION"),
            ("lk", "LK_CLI_VERSION"),
        )
    }


def missing() -> str:
    """One line naming what this machine lacks to run the stack, or ""."""
    absent = [name for name, path in binaries().items() if not path.exists()]
    absent += [t for t in ("redis-server", "sipp", "tcpdump", "espeak-ng", "ffmpeg", "ip")
               if shutil.which(t) is None]  # fmt: skip
    if absent:
        return f"the real stack needs {', '.join(absent)} (run `bash stack/build`)"
    # this namespace's interfaces (/sys/class/net may still show the host's)
    interfaces = {name for _, name in socket.if_nameindex()} - {"lo", *INTERFACE[:2]}
    if interfaces:
        return (
            "the real stack runs in a network namespace of its own (it adds an interface): "
            "unshare -n sh -c 'ip link set lo up && python -m pytest -m real_stack'"
        )
    if os.geteuid() != 0:
        return "the real stack needs root in its network namespace (interfaces, SIPp's keys)"
    return ""


def _run(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 30) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {done.stderr or done.stdout}")
    return done.stdout


def _wait(
    what: str, ready: Callable[[], bool], timeout: float, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200


def _redis_ok() -> bool:
    with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


@dataclass
class Stack:
    """Redis, livekit-server and livekit-sip, started in ``folder`` (their logs) and stopped."""

    folder: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    outbound_trunk: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The LiveKit settings of a worker or ``lk`` against this stack."""
        return {
            "LIVEKIT_URL": SERVER_URL,
            "LIVEKIT_API_KEY": API_KEY,
            "LIVEKIT_API_SECRET": API_SECRET,
        }

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start(self, name: str, *args: str | Path) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self.processes[name] = process
        return process

    def start(self) -> None:
        self._interface()
        redis = self._start(
            "redis", "redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
        )  # fmt: skip
        _wait("redis", _redis_ok, 10, redis)
        tools = binaries()
        server = self._start("livekit-server", tools["livekit-server"], "--config",
                             STACK / "livekit.yaml")  # fmt: skip
        _wait("livekit-server", lambda: _http_ok("http://127.0.0.1:7880/"), 20, server)
        sip = self._start("livekit-sip", tools["livekit-sip"], "--config", STACK / "sip.yaml")
        _wait("livekit-sip", lambda: _http_ok("http://127.0.0.1:8082/"), 20, sip)
        self._trunks()

    def _interface(self) -> None:
        a, b, address = INTERFACE
        if a in {name for _, name in socket.if_nameindex()}:
            return
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "addr", "add", address, "dev", a)
        _run("ip", "link", "set", a, "up")
        _run("ip", "link", "set", b, "up")

    def lk(self, *args: str | Path) -> str:
        """The ``lk`` CLI against this stack, as a user runs it."""
        env = {**os.environ, **self.env, "LIVEKIT_URL": "http://127.0.0.1:7880"}
        return _run(binaries()["lk"], *args, env=env)

    def _trunks(self) -> None:
        """The README's commands (docs/wiring-sip.md) with test values: the outbound trunk
        sends to the human's phone on 127.0.0.1:5070."""
        outbound = json.loads((ROOT / "sip" / "outbound-trunk.json").read_text())
        outbound["trunk"]["address"] = f"127.0.0.1:{HUMAN_SIP}"
        test_copy = self.folder / "outbound-trunk.json"
        test_copy.write_text(json.dumps(outbound))
        printed = self.lk("sip", "outbound", "create", test_copy)
        self.outbound_trunk = printed.split("SIPTrunkID:")[1].split()[0]
        self.lk("sip", "inbound", "create", ROOT / "sip" / "inbound-trunk.json")
        self.lk("sip", "dispatch", "create", ROOT / "sip" / "dispatch-rule.json")

    def rooms(self) -> list[str]:
        """The rooms the server has now."""
        return [r.name for r in self._ask(lambda lk: lk.room.list_rooms(api.ListRoomsRequest()))
                .rooms]  # fmt: skip

    def participants(self) -> dict[str, list[api.ParticipantInfo]]:
        """Every room's participants now."""

        async def listed(lk: api.LiveKitAPI) -> dict[str, list[api.ParticipantInfo]]:
            rooms = (await lk.room.list_rooms(api.ListRoomsRequest())).rooms
            return {
                r.name: list(
                    (await lk.room.list_participants(api.ListParticipantsRequest(room=r.name)))
                    .participants
                )
                for r in rooms
            }

        return self._ask(listed)

    def _ask(self, question):  # noqa: ANN001 - a coroutine function of the API client
        async def asked():  # noqa: ANN202
            async with api.LiveKitAPI("http://127.0.0.1:7880", API_KEY, API_SECRET) as lk:
                return await question(lk)

        return asyncio.run(asked())

    def stop(self) -> None:
        for name in ("livekit-sip", "livekit-server", "redis"):
            process = self.processes.pop(name, None)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:  # livekit-sip waits for calls to end
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


@contextlib.contextmanager
def running_stack(folder: Path) -> Iterator[Stack]:
    stack = Stack(folder)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


class Worker:
    """``python warm_handoff.py dev --no-reload`` in ``folder``, configured only by ``env``."""

    def __init__(self, folder: Path, env: Mapping[str, str]) -> None:
        self.folder = folder
        shutil.copy(ROOT / "warm_handoff.py", folder / "warm_handoff.py")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(_WORKER_SETTINGS)}
        self.log_path = folder / "worker.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "warm_handoff.py", "dev", "--no-reload"],
            cwd=folder, env={**clean, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        _wait("the worker", lambda: "registered worker" in self.log(), 60, self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self, kind: str = "handoff record") -> list[dict]:
        """The records the worker logged (``handoff record {...}``, ``call record {...}``)."""
        out = []
        for line in self.log().splitlines():
            at = line.find(kind + " {")
            if at >= 0:
                text = line[at + len(kind) + 1 :]
                with contextlib.suppress(ValueError):
                    out.append(json.JSONDecoder().raw_decode(text)[0])
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the worker as a process manager does (systemd, Docker and Kubernetes signal
        the main process; its job processes are shut down by the worker), then clear up its
        process group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left behind
        self.process.wait(5)
        return self.process.returncode


_WORKER_SETTINGS = ("LIVEKIT", "HANDOFF", "SIP_", "DEEPGRAM", "OPENAI", "ELEVEN", "SIMULATED")


class Capture:
    """tcpdump of the phones' UDP (SIP and RTP) on loopback, into ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ports = f"port {HUMAN_SIP} or port {CALLER_SIP} or portrange 6000-6999"
        self.process = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-n", "-w", str(path),
             f"udp and ({ports})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        _wait("tcpdump", lambda: path.exists(), 10, self.process)
        time.sleep(0.3)  # the capture is open once the file is

    def stop(self) -> None:
        if self.process.poll() is None:
            time.sleep(0.5)  # the last packets (a BYE, its 200) are read before the stop
            self.process.send_signal(signal.SIGINT)  # flushes the file
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
