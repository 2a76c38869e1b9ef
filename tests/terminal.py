"""A terminal for the commands users run: ``python warm_handoff.py console --text`` needs one
(the framework's console reads keys from a tty in raw mode, livekit-agents cli/readchar.py),
so the test gives it a pseudo-terminal, types into it and reads the screen as text."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# colours, cursor moves and the rich prompt's redraws (CSI and OSC sequences)
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|[\r\x07]")
# the text prompt, redrawn many times a second (livekit-agents cli/_legacy.py ``prompt``)
_PROMPT = re.compile(r"\u276f |\u2500{20}|\? for shortcuts|Thinking\.\.\.\s*[-\\|/]?\s*$")
KEY_SHOWN_WITHIN = 2.0  # seconds for a typed key to show in the prompt before it is typed again
# what stays of the process's environment: nothing that configures the worker or a provider
_NOT_PASSED_ON = ("LIVEKIT", "HANDOFF", "SIP_", "DEEPGRAM", "OPENAI", "ELEVEN", "SIMULATED")


def project_copy(folder: Path) -> Path:
    """The project as a user has it after the README's first step: the module and
    ``.env.example`` copied to ``.env``. Returns the module's path."""
    for name in ("warm_handoff.py", ".env.example"):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    (folder / ".env").write_bytes((ROOT / ".env.example").read_bytes())
    return folder / "warm_handoff.py"


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """The test runner's environment without any worker or provider setting, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_PASSED_ON)}
    return {**clean, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", **env}


class Terminal:
    """A command running in a pseudo-terminal: what it printed, as plain text, and keys typed
    into it."""

    def __init__(self, args: list[str], *, cwd: Path, env: Mapping[str, str]) -> None:
        self._master, replica = pty.openpty()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=worker_env(env),
            stdin=replica,
            stdout=replica,
            stderr=replica,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        os.close(replica)
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # the other side is closed: the process has exited
                return
            if not chunk:
                return
            with self._lock:
                self._raw += chunk

    @property
    def screen(self) -> str:
        """Everything printed so far, without colours and cursor moves."""
        with self._lock:
            text = self._raw.decode("utf-8", "replace")
        return _ESCAPES.sub("", text)

    def printed(self) -> list[str]:
        """The screen's lines without the prompt's redraws and blank lines."""
        return [
            line.rstrip()
            for line in self.screen.splitlines()
            if line.strip() and not _PROMPT.search(line)
        ]

    def wait_for(self, pattern: str, timeout: float, *, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` on the screen (from offset ``after``); fails after
        ``timeout`` s or when the process exits without printing it."""
        deadline = time.monotonic() + timeout
        rule = re.compile(pattern)
        while True:
            found = rule.search(self.screen, after)
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # the last output still in the pipe
                found = rule.search(self.screen, after)
                if found:
                    return found
                state = "exited" if self.process.poll() is not None else "still running"
                raise AssertionError(
                    f"{pattern!r} not printed within {timeout:g}s ({state}); what it printed:\n"
                    + "\n".join(self.printed()[-60:])
                )
            time.sleep(0.05)

    def type(self, text: str, timeout: float = 10.0) -> None:
        """Keys typed one at a time, each once the prompt shows the one before, then Enter.
        The console reads a key at a time and flushes what was typed ahead of each read
        (livekit-agents cli/readchar.py: ``tcsetattr(TCSAFLUSH)``), as a person never notices."""
        for typed in range(1, len(text) + 1):
            shown = re.escape(f"\u276f {text[:typed]}\u2588")
            deadline = time.monotonic() + timeout
            while True:
                after = len(self.screen)
                os.write(self._master, text[typed - 1].encode())
                try:  # not shown: typed before the console read, and flushed; type it again
                    self.wait_for(shown, KEY_SHOWN_WITHIN, after=after)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
        os.write(self._master, b"\n")  # the console's readkey takes a line feed as Enter

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the process and everything it started, as Ctrl+C twice would."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._reader.join(2)
        with contextlib.suppress(OSError):
            os.close(self._master)
