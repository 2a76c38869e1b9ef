"""Quick start, as a user runs it: ``python warm_handoff.py console --text`` in a terminal, in a
copy of the project with ``.env`` copied from ``.env.example``, configured only through the
environment, the three cloud models replaced by local stand-ins that speak their protocols
(standins/providers.py). A request for a person is typed; what the README promises for each
``SIMULATED_HUMAN`` is read off the screen, within a bound that proves nothing waited for a
timeout it should not have."""

from __future__ import annotations

import ctypes.util
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from terminal import Terminal, project_copy

import warm_handoff as wh
from standins.providers import MS_PER_CHAR, ProviderStandIns

if ctypes.util.find_library("portaudio") is None:  # sounddevice needs it, even in text mode
    missing = "PortAudio is not installed (apt-get install -y libportaudio2): no console"
    if os.environ.get("CI") == "true":
        raise RuntimeError(missing)  # CI installs it (.ci/run): never skipped there
    pytest.skip(missing, allow_module_level=True)

READY = "Type to talk to your agent"
ASK = "Can I talk to a person please"
RING = 3.0  # the simulated phone rings this long (SimulatedPhoneLine.ring_time)
RING_TIMEOUT = 5  # HANDOFF_RING_TIMEOUT here: the least allowed
GRACE = 2.0  # .env.example's HANDOFF_HELLO_GRACE: a silent console line waits it once
SLACK = 4.0  # start-up of the consult session, the model round-trips, a loaded machine
LOST = "It looks like we lost our support team."
# a handoff record as logged (rich wraps it at the terminal's width, between words)
RECORD = r'handoff record \{[^{}]*?"outcome":\s+"{outcome}"'
# the opener is played from its synthesised audio, as long as the stand-in makes it
SAID_OPENER = wh.OPENER.format(business="Example Dental")
OPENER = len(SAID_OPENER) * MS_PER_CHAR / 1000


@dataclass(frozen=True)
class Promise:
    """What the console shows for one ``SIMULATED_HUMAN``: the 📞 steps in order, the outcome
    in the handoff record, what the caller is told, and how long it may take at most."""

    steps: tuple[str, ...]
    outcome: str
    caller_hears: str
    within: float


def failed(step: str, outcome: str, why: str, within: float = RING) -> Promise:
    """A dial that fails: the caller hears why and is offered the fallback team (billing)."""
    return Promise(
        ("dialling support", step), outcome, f"{why} I can try our billing team instead", within
    )


SCREENED = ("support answered", "human says: Hello?", f"human hears: {SAID_OPENER}")
ASKED = ("human hears: Is this our support team?", "human presses 1")
DETAILS = wh.DETAILS_INTRO.format(team="our support team")
BRIEFED = (
    f"human hears: {DETAILS.strip()}",
    "human hears: The caller wants help with their account. Say put them",
)
CONSULT = {
    "answer": Promise(
        (*SCREENED, *ASKED, *BRIEFED, "human presses 1", "support moved into console-room"),
        "connected",
        "You're now connected with our support team.",
        RING + GRACE + OPENER + 2,
    ),
    "decline": Promise(
        (*SCREENED, *ASKED, *BRIEFED, "human presses 2", "human hears: Understood"),
        "declined",
        "I'm sorry, our support team can't take your call right now.",
        RING + GRACE + OPENER + 2,
    ),
    "voicemail": Promise(  # heard the opener, then its words answered the question
        ("support answered", "human says: Hi, you've reached", f"human hears: {SAID_OPENER}"),
        "voicemail",
        "I'm sorry, I reached our support team's voicemail rather than a person.",
        RING + GRACE + OPENER + 1,
    ),
    "drop_after_merge": Promise(
        (*ASKED, *BRIEFED, "human presses 1", "moved into console-room", "the human hangs up"),
        "rejoined",
        f"caller hears: {LOST}",
        RING + GRACE + OPENER + 2 + 3,
    ),
}
INTRODUCED = "caller hears: Hello, this is the Example Dental assistant. I have a caller"
CONFERENCE = {  # screened as in consult, then joined and introduced in front of the caller
    "answer": Promise(
        (*SCREENED, *ASKED, "support moved into console-room", "hold music off"),
        "connected",
        INTRODUCED,
        RING + GRACE + OPENER + 2,
    ),
    "voicemail": CONSULT["voicemail"],  # never introduced: screened as in consult
    "drop_after_merge": Promise(
        (*ASKED, "moved into console-room", "the human hangs up", f"caller hears: {LOST}"),
        "rejoined",
        "",
        RING + GRACE + OPENER + 2 + 3,
    ),
}  # no "decline": conference asks nothing to decline
EITHER = {
    "busy": failed("support: SIP 486 Busy Here", "busy", "on another call right now."),
    "no_answer": failed(
        "support: SIP 480", "no_answer", "nobody from our support team picked up.", RING_TIMEOUT
    ),
    "unreachable": failed(
        "support: SIP 404 Not Found", "unreachable", "couldn't get through to our support team."
    ),
}
# A console run to an outcome takes 15 s or more in real time (start-up, ring, grace, the
# screening's words): all are in the slow set. The fast set keeps a console run end to end in
# test_the_greeting_is_shown_once_before_any_model_request, and the handoff's outcomes in
# process (test_matrix.py, test_screening.py).
CASES = [
    pytest.param(mode, human, promise, id=f"{mode}-{human}", marks=pytest.mark.slow)
    for mode, promises in (("consult", {**CONSULT, **EITHER}), ("conference", CONFERENCE | EITHER))
    for human, promise in promises.items()
]


@pytest.fixture
def providers():
    with ProviderStandIns.in_thread() as standins:
        yield standins


def console(folder: Path, **env: str) -> Terminal:
    """The README's quick start in ``folder``: the project, ``.env`` from ``.env.example``,
    ``python warm_handoff.py console --text``, with ``env`` as the environment."""
    module = project_copy(folder)
    config = {"HANDOFF_PHRASE_CACHE": str(folder / "phrases"), **env}
    return Terminal([str(module), "console", "--text"], cwd=folder, env=config)


def steps_in_order(screen: str, steps: tuple[str, ...]) -> list[str]:
    """The 📞 steps shown, and whether ``steps`` appear among them in this order."""
    shown = [line.split("📞 ", 1)[1] for line in screen.splitlines() if "📞 " in line]
    at = 0
    for step in steps:
        at = next((i + 1 for i in range(at, len(shown)) if step in shown[i]), -1)
        assert at > 0, f"{step!r} not shown in order among: {shown}"
    return shown


@pytest.mark.parametrize("mode,human,promise", CASES)
def test_the_console_reaches_every_outcome(tmp_path, providers, mode, human, promise):
    term = console(
        tmp_path,
        **providers.env(),
        SIMULATED_HUMAN=human,
        HANDOFF_MODE=mode,
        HANDOFF_RING_TIMEOUT=str(RING_TIMEOUT),
    )
    try:
        term.wait_for(READY, 60)
        term.type(ASK)
        asked = time.monotonic()
        term.wait_for(RECORD.replace("{outcome}", promise.outcome), promise.within + 30)
        took = time.monotonic() - asked
        # a step may follow the record (a rejoin's words are shown once they have been said)
        term.wait_for(re.escape(promise.steps[-1]), 10, after=0)
        shown = steps_in_order(term.screen, promise.steps)
        if promise.caller_hears:
            term.wait_for(re.escape(promise.caller_hears), 10, after=0)
        assert took <= promise.within + SLACK, (took, shown)
        assert "Traceback" not in term.screen
    finally:
        term.close()


def test_the_greeting_is_shown_once_before_any_model_request(tmp_path, providers):
    term = console(tmp_path, **providers.env())
    try:
        term.wait_for(READY, 60)
        greeting = "caller hears: Thanks for calling. This is the virtual assistant."
        term.wait_for(re.escape(greeting), 10)
        assert providers.llm_requests == []  # the greeting needed no model round-trip
        typed = len(term.screen)
        term.type("What are your opening hours?")
        term.wait_for("\u25cf Agent", 30, after=typed)  # the reply, printed after the run
        assert term.screen.count(greeting) == 1
        assert len(providers.llm_requests) == 1
    finally:
        term.close()


def test_without_provider_keys_the_console_names_them_and_exits(tmp_path, providers):
    keys = ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "ELEVEN_API_KEY")
    env = {k: v for k, v in providers.env().items() if k not in keys}
    term = console(tmp_path, **env)  # .env.example leaves the keys empty
    try:
        assert term.wait(30) == 1
        for key in keys:
            assert f"{key} is not set" in term.screen or f"{key} or " in term.screen
        assert "Traceback" not in term.screen
    finally:
        term.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["fail", "stall"])
def test_when_synthesis_fails_the_human_hears_the_opener_without_a_silence(
    tmp_path, providers, fault
):
    """The opener is prepared while the phone rings (ElevenLabs' HTTP synthesis); failing or
    stalled, it is said live (the websocket) when it is due: no retry ladder, no silence."""
    providers.fault("tts_http", fault)
    term = console(tmp_path, **providers.env(), SIMULATED_HUMAN="answer", HANDOFF_MODE="consult")
    try:
        term.wait_for(READY, 60)
        term.type(ASK)
        term.wait_for("📞 support answered", 30)
        answered = time.monotonic()
        term.wait_for(re.escape(f"📞 human hears: {SAID_OPENER}"), 30)
        assert time.monotonic() - answered <= GRACE + 1.0  # due after the silent line's grace
        term.wait_for(RECORD.replace("{outcome}", "connected"), 30)
    finally:
        term.close()
    opener = [t for t in providers.tts_texts if t.text == SAID_OPENER]
    assert [t.protocol for t in opener] == ["http", "ws"]  # one try prepared, then said live


def test_without_a_microphone_the_console_says_so_and_offers_text(tmp_path, providers):
    if not wh.no_audio_devices():
        pytest.skip("this machine has a microphone and a speaker")
    module = project_copy(tmp_path)
    audio = Terminal([str(module), "console"], cwd=tmp_path, env=providers.env())
    try:
        assert audio.wait(30) == 2
        assert "console: no microphone found" in audio.screen
        assert "python warm_handoff.py console --text" in audio.screen
        assert "Traceback" not in audio.screen
    finally:
        audio.close()


def test_a_provider_it_cannot_reach_is_named_before_the_console_starts(tmp_path, providers):
    env = {
        **providers.env(),
        "DEEPGRAM_BASE_URL": "http://deepgram.invalid/v1/listen",  # never resolves (RFC 2606)
        "ELEVEN_BASE_URL": f"http://127.0.0.1:{closed_port()}/v1",  # nobody listens
    }
    term = console(tmp_path, **env)
    try:
        assert term.wait(30) == 3
        screen = term.screen
        assert "cannot reach Deepgram at deepgram.invalid:80: name resolution failed" in screen
        assert "cannot reach ElevenLabs at 127.0.0.1:" in screen
        assert "OpenAI" not in screen.split("cannot reach", 1)[1]  # the stand-in answers
        assert "Traceback" not in screen and READY not in screen
    finally:
        term.close()


def closed_port() -> int:
    """A local port nobody listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
