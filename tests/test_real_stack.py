"""The worker on the real LiveKit: livekit-server and livekit-sip (stack/), the worker as deployed
(``python warm_handoff.py dev``, configured by its environment), and SIPp phones. Every assertion
is on what the phones heard (their captured RTP) and the SIP they received, or on the server's
rooms; the worker's log is read only for its records.

Times are from the capture's clock. The receptionist's voice (the ElevenLabs stand-in) is a
200 Hz tone under each word (standins/providers.py ``speech``), so "the agent spoke" is a span of
sound that is mostly 200 Hz; hold music is sound that is not; the people send tones of their own.
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from livekit import api

import warm_handoff as wh
from standins import phones, real_stack
from standins.fake_livekit import API_KEY as FAKE_KEY
from standins.fake_livekit import API_SECRET as FAKE_SECRET
from standins.fake_livekit import FakeLiveKitServer
from standins.phones import HumanPhone, Quiet, Say, Tone, audio_file
from standins.providers import MS_PER_CHAR, TONE_HZ, ProviderStandIns
from standins.real_stack import (
    API_SECRET,
    CALLER_RTP,
    CALLER_SIP,
    HUMAN_RTP,
    HUMAN_SIP,
    INBOUND_NUMBER,
    Capture,
    Stack,
    Worker,
)
from standins.recordings import Heard, Phone
from standins.recordings import phones as read_phones

pytestmark = [pytest.mark.real_stack, pytest.mark.timeout(300)]

CALLER_TONE, HUMAN_TONE = 1000.0, 1400.0
SUPPORT = {"number": "+15105550101", "description": "Technical support",
           "spoken_name": "our support team"}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist's -n: workers would share ports
        pytest.fail("the real-stack tests share one network's addresses and ports: run them "
                    "in one process (without -n)")  # fmt: skip
    reason = real_stack.missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI never skips the real stack: {reason}")
        pytest.skip(reason)
    with real_stack.running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


class Call:
    """One call's world: the stand-ins, the worker, the capture, the phones."""

    def __init__(self, stack: Stack, folder: Path, standins: ProviderStandIns) -> None:
        self.stack, self.folder, self.standins = stack, folder, standins
        self.capture: Capture | None = None
        self.worker: Worker | None = None
        self.phones: list[phones.Sipp] = []

    def start_worker(self, **settings: str) -> Worker:
        env = {
            **self.stack.env,
            **self.standins.env(),
            "SIP_TRUNK_ID": self.stack.outbound_trunk,
            "HANDOFF_DESTINATIONS": json.dumps({"support": SUPPORT}),
            "BUSINESS_NAME": "Example Dental",
            "HANDOFF_RING_TIMEOUT": "15",
            **settings,
        }
        self.worker = Worker(self.folder, env)
        return self.worker

    def human(self, behaviour: HumanPhone) -> phones.Sipp:
        self._capture()
        phone = phones.human_phone(self.folder, behaviour)
        self.phones.append(phone)
        return phone

    def caller(self, audio: Path, *, hang_up_after: float) -> phones.Sipp:
        self._capture()
        phone = phones.call_in(self.folder, audio, hang_up_after=hang_up_after)
        self.phones.append(phone)
        return phone

    def _capture(self) -> None:
        if self.capture is None:
            self.capture = Capture(self.folder / "phones.pcap")

    def wait(self, timeout: float) -> None:
        """Until every phone's call has ended."""
        deadline = time.monotonic() + timeout
        for phone in self.phones:
            phone.wait(max(deadline - time.monotonic(), 0.1))

    def heard(self) -> dict[str, Phone]:
        assert self.capture is not None
        self.capture.stop()
        return read_phones(
            self.capture.path, caller=(CALLER_SIP, CALLER_RTP), human=(HUMAN_SIP, HUMAN_RTP)
        )

    def captured(self) -> tuple[Phone, Phone]:
        """The caller's phone and the human's as the capture saw them."""
        heard = self.heard()
        return heard["caller"], heard["human"]

    def stop(self) -> None:
        for phone in self.phones:
            phone.stop()
        if self.capture is not None:
            self.capture.stop()
        if self.worker is not None:
            self.worker.stop()


@pytest.fixture
def call(stack: Stack, tmp_path: Path) -> Iterator[Call]:
    with ProviderStandIns.in_thread() as standins:
        world = Call(stack, tmp_path, standins)
        try:
            yield world
        finally:
            world.stop()


ASKS_FOR_A_PERSON = "I would like to talk to a person, please."


def asks_for_a_person(folder: Path, *then: phones.Sound, after: float = 7.0) -> Path:
    """The caller's audio: quiet through the greeting, then asks for a person."""
    return audio_file(
        folder, "caller", Quiet(after), Say(ASKS_FOR_A_PERSON), *then
    )


def agent_spans(heard: Heard, start: float, end: float = float("inf")) -> list[tuple[float, float]]:
    """The spans of the receptionist's voice (mostly 200 Hz) between ``start`` and ``end``."""
    return [
        (a, b)
        for a, b in heard.sound()
        if a >= start - 0.05 and a < end and heard.tone_level(TONE_HZ, a, b) > 0.6
    ]


def agent_seconds(heard: Heard, start: float, end: float) -> float:
    """How long the receptionist's voice was heard between ``start`` and ``end``."""
    step = 0.25
    return step * sum(
        1
        for t in heard.windows(start, end, step)
        if heard.level(t, t + step) > 300 and heard.tone_level(TONE_HZ, t, t + step) > 0.6
    )


def test_the_caller_hears_the_greeting_once_answered(call: Call) -> None:
    call.standins.stt_says("hello")  # nothing the caller says asks for a person
    call.start_worker()
    caller = call.caller(audio_file(call.folder, "caller", Quiet(1)), hang_up_after=9)
    call.wait(30)
    heard = call.heard()["caller"]
    assert caller.process is not None and caller.process.returncode is not None

    (answered,) = heard.received(200, "INVITE")
    greeting = agent_spans(heard.heard(), answered.at)
    assert greeting, "the caller heard no greeting"
    first = greeting[0]
    assert first[0] - answered.at < 2.0, f"greeting {first[0] - answered.at:.2f} s after answer"
    # "Thanks for calling. This is the virtual assistant. How can I help you today?": 76
    # characters at 65 ms, about 4.9 s of speech, said once (the seed greeted twice)
    spoken = sum(b - a for a, b in greeting)
    assert 4.0 < spoken < 6.5, f"{spoken:.1f} s of greeting: {greeting}"
    said = [t.text for t in call.standins.tts_texts]
    assert said.count(said[0]) == 1


def test_conference_handoff_end_to_end(call: Call, stack: Stack) -> None:
    """Conference mode on self-hosted LiveKit: the human's phone rings while the caller hears hold
    audio; once answered the human is screened in private (the opener), then bridged: the two hear
    the introduction, then each other, through the worker; when the caller hangs up, the human
    gets BYE and both rooms are gone."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker(HANDOFF_MODE="conference")
    human_audio = audio_file(call.folder, "human", Say("Hello, support, Sam speaking."),
                             Quiet(16), Tone(HUMAN_TONE, 1.5))  # fmt: skip
    human = call.human(HumanPhone(ring=12, audio=human_audio, hang_up_after=70))
    caller_audio = asks_for_a_person(call.folder, Quiet(32), Tone(CALLER_TONE, 1.5))
    call.caller(caller_audio, hang_up_after=50)
    call.wait(90)
    assert human.process is not None
    caller, person = call.captured()
    caller_audio_heard, person_heard = caller.heard(), person.heard()

    (invite,) = person.received("INVITE")
    (answer,) = person.sent(200, "INVITE")
    assert 11.5 < answer.at - invite.at < 13.5
    # while it rang: hold audio (not the agent's voice) after "please hold"
    held = [
        t for t in caller_audio_heard.windows(invite.at, answer.at)
        if caller_audio_heard.level(t, t + 0.25) > 300
        and caller_audio_heard.tone_level(TONE_HZ, t, t + 0.25) < 0.3
    ]  # fmt: skip
    assert len(held) * 0.25 > 3.0, f"{len(held) * 0.25} s of hold audio while the phone rang"
    # and no gap between "please hold" and the music: the hold track is published while
    # "please hold" is said (about 1.5 s of silence when it was published after it)
    decided = handoff_record(call)["decided_at"]
    gap = caller_audio_heard.silence_longest(decided + 1.0, answer.at)
    assert gap < 0.8, f"the caller heard {gap:.2f} s of silence while on hold"
    # once answered: the human says hello, and hears the opener soon after it ends (it waits
    # for the end of the hello: measured from the answer it moved with the voice's length)
    intro = agent_spans(person_heard, answer.at)
    assert intro and intro[0][0] - answer.at < 4.0, intro
    hello_end = max(b for a, b in person.said().sound() if answer.at <= a < intro[0][0])
    assert 0 < intro[0][0] - hello_end < 1.5, (hello_end, intro)
    # then they hear each other; the caller hangs up: the human gets BYE, the rooms go
    _joined_until_the_caller_hangs_up(caller, person, stack)


def test_the_self_hosted_default_briefs_in_private_then_bridges(call: Call, stack: Stack) -> None:
    """HANDOFF_MODE=auto on self-hosted LiveKit (no MoveParticipant): consult, bridged. While the
    human is screened and briefed in their own room, neither phone hears the other (each sends a
    tone then); once they press 1 the worker relays each one's audio into the other's room and
    they hear each other's next tone; when the caller hangs up the human gets BYE and both rooms
    go. Nothing is ever moved: the worker bridges without asking the server first."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker()
    human_audio = audio_file(
        call.folder, "human", Tone(HUMAN_TONE, 0.6), Quiet(0.3), Say("Hello, this is Sam."),
        Quiet(20), Tone(HUMAN_TONE, 1.5),
    )  # fmt: skip
    human = call.human(HumanPhone(ring=3, audio=human_audio, keys=((17.0, "1"),),
                                  hang_up_after=70))  # fmt: skip
    caller_audio = asks_for_a_person(call.folder, Quiet(10), Tone(CALLER_TONE, 1.0), Quiet(19),
                                     Tone(CALLER_TONE, 1.5))  # fmt: skip
    call.caller(caller_audio, hang_up_after=48)
    call.wait(90)
    assert human.process is not None
    caller, person = call.captured()
    caller_heard, person_heard = caller.heard(), person.heard()
    (answer,) = person.sent(200, "INVITE")
    record = handoff_record(call)
    assert (record["mode"], record["joined_by"], record["outcome"]) == (
        "consult", "bridge", "connected"
    ), record
    accepted = record["decided_at"] + record["timings"]["accepted"]  # the 1 reached the worker
    # before the key: each phone's own tone went out, and the other never heard it
    sent_by_human = _tone_heard(person.said(), HUMAN_TONE)
    sent_by_caller = _tone_heard(caller.said(), CALLER_TONE)
    assert sent_by_human is not None and sent_by_human < accepted
    assert sent_by_caller is not None and answer.at < sent_by_caller < accepted, (
        sent_by_caller - answer.at
    )
    assert _tone_heard(caller_heard, HUMAN_TONE, until=accepted) is None
    assert _tone_heard(person_heard, CALLER_TONE, until=accepted) is None
    # after it: through the bridge, each hears the other's next tone
    _joined_until_the_caller_hangs_up(caller, person, stack, after=accepted)


def _joined_until_the_caller_hangs_up(
    caller: Phone, person: Phone, stack: Stack, *, after: float = 0.0
) -> None:
    """The two phones hear each other (each the other's tone, from ``after`` on); when the
    caller hangs up the human gets BYE within 5 s, and both rooms are gone."""
    assert _tone_heard(person.heard(), CALLER_TONE, after=after) is not None, (
        "the human never heard the caller's tone"
    )
    assert _tone_heard(caller.heard(), HUMAN_TONE, after=after) is not None, (
        "the caller never heard the human's tone"
    )
    (bye,) = caller.sent("BYE")
    (human_bye,) = person.received("BYE")
    assert 0 <= human_bye.at - bye.at < 5.0
    _no_rooms_left(stack)


def _tone_heard(
    heard: Heard, hz: float, *, after: float = 0.0, until: float = float("inf")
) -> float | None:
    """When a tone at ``hz`` was first heard (0.25 s windows) between ``after`` and ``until``,
    or None."""
    step = 0.25
    t = max(heard.start, after)
    end = min(heard.start + len(heard.samples) / 8000, until)
    while t < end:
        if heard.tone_level(hz, t, t + step) > 0.5:
            return t
        t += step
    return None


def handoff_record(call: Call) -> dict:
    assert call.worker is not None
    deadline = time.monotonic() + 10
    while not (records := call.worker.records()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert records, "the worker logged no handoff record"
    return records[-1]


@pytest.mark.parametrize(
    ("answer", "outcome", "status"),
    [(486, "busy", 486), (603, "declined", 603), (480, "no_answer", 480),
     (None, "no_answer", None)],  # fmt: skip
    ids=["busy-486", "decline-603", "unavailable-480", "never-answers"],
)
def test_a_phone_that_refuses_or_never_answers(
    call: Call, answer: int | None, outcome: str, status: int | None
) -> None:
    """The human's phone refuses (or rings out: livekit-sip sends CANCEL at the ring timeout);
    the caller, on hold until then, hears why and what next."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker(HANDOFF_RING_TIMEOUT="6")
    human = call.human(HumanPhone(ring=2, answer=answer))
    call.caller(asks_for_a_person(call.folder), hang_up_after=32)
    call.wait(60)
    caller, person = call.captured()
    (invite,) = person.received("INVITE")
    if answer is None:
        (cancel,) = person.received("CANCEL")
        ended = cancel.at
        # the ring timeout (6 s) as the phone saw it; the client waits 2 s more
        assert 5.5 < cancel.at - invite.at < 8.5, cancel.at - invite.at
    else:
        (refusal,) = person.sent(answer, "INVITE")
        ended = refusal.at
    assert human.process is not None
    # what is left of "please hold" (at most 4.4 s of speech, begun before the INVITE), then why
    told = agent_seconds(caller.heard(), ended, ended + 15)
    assert told > 5.0, f"the caller heard {told:.1f} s from the agent after the phone gave up"
    record = handoff_record(call)
    assert (record["outcome"], record["sip_status"]) == (outcome, status)


@pytest.mark.parametrize("mode", ["conference", "consult"])
def test_a_phone_that_never_answers_the_invite_could_not_be_reached(
    call: Call, stack: Stack, mode: str
) -> None:
    """The human's phone is off: the INVITE gets nothing back, not even 100 Trying, so the leg is
    "dialing" to the end. livekit-sip gives up at the ring timeout with the error it gives for a
    phone that rang out ("sip request timed out", no SIP status); the worker saw the leg never
    ring, and tells the caller it couldn't get through, not that nobody picked up. Conference
    dials into the caller's room, consult into its consult room, opened as the phone rings."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker(HANDOFF_RING_TIMEOUT="6", HANDOFF_MODE=mode)
    call.human(HumanPhone(answer=None, responds=False))
    call.caller(asks_for_a_person(call.folder), hang_up_after=32)
    call.wait(60)
    caller, person = call.captured()
    invites = person.received("INVITE")  # and its retransmissions (sipgo's Timer A)
    assert invites, "no INVITE reached the phone"
    assert [m for m in person.sip() if m.sent] == [], "the phone answered something"
    # the CANCEL at the ring timeout, with no provisional answer either (sipgo's ClientTx
    # sends it from its Calling state)
    (cancel,) = person.received("CANCEL")
    assert 5.5 < cancel.at - invites[0].at < 8.5, cancel.at - invites[0].at
    record = handoff_record(call)
    assert (record["outcome"], record["sip_status"]) == ("unreachable", None), record
    assert "sip request timed out" in record["detail"] and "never rang" in record["detail"]
    # about when the ring timeout (6 s) ended it: told at once, and told the right thing
    gave_up = record["timings"]["ended"] - record["timings"]["dial_start"]
    assert 5.5 < gave_up < 9.0, gave_up
    said = [t.text for t in call.standins.tts_texts]
    assert any("I couldn't get through to our support team" in t for t in said), said
    assert not any("picked up" in t for t in said), said
    told = agent_seconds(caller.heard(), cancel.at, cancel.at + 15)
    assert told > 4.0, f"the caller heard {told:.1f} s from the agent after the dial gave up"
    _no_rooms_left(stack, within=30.0)


def test_the_caller_hangs_up_while_the_phone_rings(call: Call, stack: Stack) -> None:
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker()
    call.human(HumanPhone(answer=None))
    call.caller(asks_for_a_person(call.folder), hang_up_after=20)
    call.wait(40)
    caller, person = call.captured()
    (bye,) = caller.sent("BYE")
    (invite,) = person.received("INVITE")
    assert invite.at < bye.at
    (cancel,) = person.received("CANCEL")
    assert 0 <= cancel.at - bye.at < 3.0, cancel.at - bye.at
    assert handoff_record(call)["outcome"] == "caller_left"
    _no_rooms_left(stack)


def _no_rooms_left(stack: Stack, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while stack.rooms() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.rooms() == []


def test_a_worker_stopped_during_a_handoff_leaves_nobody_ringing_or_waiting(
    call: Call, stack: Stack
) -> None:
    """SIGTERM (a deploy, a scale-down) while the human's phone rings: the framework shuts the
    job down (session, room, then callbacks); the caller is told, the phone stops ringing
    (CANCEL), and no leg or room is left."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    worker = call.start_worker(HANDOFF_RING_TIMEOUT="40")
    call.human(HumanPhone(answer=None))
    caller = call.caller(asks_for_a_person(call.folder), hang_up_after=60)
    deadline = time.monotonic() + 40
    while _human_state(stack) != "ringing" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _human_state(stack) == "ringing"
    time.sleep(6)  # "please hold" said, hold music on
    stopped_at = time.time()
    worker.stop()
    call.wait(30)
    heard = call.heard()
    person, caller_seen = heard["human"], heard["caller"]
    (cancel,) = person.received("CANCEL")
    assert 0 <= cancel.at - stopped_at < 5.0, cancel.at - stopped_at
    told = agent_seconds(caller_seen.heard(), stopped_at, stopped_at + 10)
    assert told > 2.0, f"the caller heard {told:.1f} s from the agent after the worker stopped"
    byes = caller_seen.received("BYE") + caller_seen.sent("BYE")
    assert byes and byes[0].at - stopped_at < 15.0, "the caller's leg was left open"
    assert caller.process is not None
    _no_rooms_left(stack)


def test_a_worker_stopped_during_a_bridged_call_tells_both_and_ends_both_legs(
    call: Call, stack: Stack
) -> None:
    """Self-hosted LiveKit: the two people talk through the worker's bridge, the agent gone
    from the call (HANDOFF_REJOIN_WINDOW=0: its session closed, it can say nothing). The worker
    is stopped and the framework shuts the job down: the bridge cannot go on, so each phone
    hears the agent's voice again, why the call ends (played in each room on a track of the
    worker's own), then gets BYE, and both rooms go."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    worker = call.start_worker(HANDOFF_REJOIN_WINDOW="0")
    human_audio = audio_file(call.folder, "human", Quiet(0.3), Say("Hello, this is Sam."))
    human = call.human(
        HumanPhone(ring=3, audio=human_audio, keys=((17.0, "1"),), hang_up_after=80)
    )
    call.caller(asks_for_a_person(call.folder), hang_up_after=80)
    deadline = time.monotonic() + 60
    while not worker.records() and time.monotonic() < deadline:
        time.sleep(0.2)
    record = handoff_record(call)
    assert (record["joined_by"], record["outcome"]) == ("bridge", "connected"), record
    time.sleep(3)  # talking through the bridge; the agent's session has closed
    stopped_at = time.time()
    worker.stop()
    call.wait(30)
    assert human.process is not None
    caller, person = call.captured()
    told = agent_seconds(caller.heard(), stopped_at, stopped_at + 10)
    assert told > 2.0, f"the caller heard {told:.1f} s from the agent after the worker stopped"
    told = agent_seconds(person.heard(), stopped_at, stopped_at + 10)
    assert told > 1.5, f"the human heard {told:.1f} s from the agent after the worker stopped"
    for phone in (caller, person):
        byes = phone.received("BYE") + phone.sent("BYE")
        assert byes and byes[0].at - stopped_at < 15.0, "a leg was left open"
    _no_rooms_left(stack)


def _human_state(stack: Stack, number: str = SUPPORT["number"]) -> str:
    """The ``sip.callStatus`` of the leg dialled to ``number`` (livekit-sip: dialing, ringing,
    active, hangup), or "" while there is none."""
    return next(
        (
            p.attributes.get("sip.callStatus", "")
            for people in stack.participants().values()
            for p in people
            if p.attributes.get("sip.phoneNumber") == number
        ),
        "",
    )


# ── Who answers the human's phone, and where it is ────────────────────────────────────────────

MAILBOX_WORDS = "you have reached Sam please leave a message after the tone"
# warm_handoff.OPENER for "Example Dental" at 65 ms a character (standins/providers.py
# MS_PER_CHAR): 1.3 s. ASK_PERSON ("Is this our support team? Press 1 or say yes to take a
# call.", 60 characters) would add 3.9 s; the details, DETAILS_INTRO alone, 3.6 s.
OPENER_SECONDS = len(wh.OPENER.format(business="Example Dental")) * MS_PER_CHAR / 1000


@pytest.mark.parametrize("mode", ["consult", "conference"])
def test_a_voicemail_answers_and_hears_nothing_about_the_caller(call: Call, mode: str) -> None:
    """Every mode screens the leg in private (``Screening``): a voicemail greeting with a
    mailbox's words hears at most the neutral opener, never the question, the brief or the
    introduction, and never the caller; the caller never hears the greeting; the worker hangs up
    on it and tells the caller it reached voicemail."""
    # the caller's words, then the greeting (an utterance a sentence, should espeak's pause
    # between them end one), then the beep; the default ("hello") after that
    call.standins.stt_says(ASKS_FOR_A_PERSON, MAILBOX_WORDS, MAILBOX_WORDS, MAILBOX_WORDS)
    call.start_worker(HANDOFF_MODE=mode)
    greeting = audio_file(
        call.folder, "voicemail",
        Say("Hi, you have reached Sam. Please leave a message after the tone."),
        Quiet(0.5), Tone(HUMAN_TONE, 1.0),
    )  # fmt: skip
    call.human(HumanPhone(ring=2, audio=greeting, hang_up_after=25))
    # the caller on hold makes a sound while the mailbox plays: it must not reach the mailbox
    call.caller(asks_for_a_person(call.folder, Quiet(5), Tone(CALLER_TONE, 2.0)),
                hang_up_after=30)  # fmt: skip
    call.wait(60)
    caller, person = call.captured()
    (answer,) = person.sent(200, "INVITE")
    (bye,) = person.received("BYE")  # the worker hung up on the voicemail
    assert not person.sent("BYE"), "the phone had to hang up itself"
    said = agent_seconds(person.heard(), answer.at, bye.at + 1)
    assert said <= OPENER_SECONDS + 0.75, f"the voicemail heard {said:.2f} s of the agent"
    told = agent_seconds(caller.heard(), bye.at, bye.at + 8)
    assert told > 3.0, f"the caller heard {told:.1f} s from the agent after the hang-up"
    record = handoff_record(call)
    assert record["outcome"] == "voicemail", record
    assert _tone_heard(caller.heard(), HUMAN_TONE) is None  # the mailbox's beep
    assert _tone_heard(person.heard(), CALLER_TONE) is None
    assert _tone_heard(caller.said(), CALLER_TONE) is not None  # it was sent


def test_a_pbx_answers_and_the_extension_is_dialled(call: Call) -> None:
    """``"extension": "1234"``: once the phone answers, livekit-sip sends the digits as RFC 4733
    events (the ``dtmf`` of CreateSIPParticipant), in order."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    pbx = {**SUPPORT, "extension": "1234"}
    call.start_worker(HANDOFF_DESTINATIONS=json.dumps({"support": pbx}))
    call.human(HumanPhone(ring=1, hang_up_after=5))
    call.caller(asks_for_a_person(call.folder), hang_up_after=24)
    call.wait(60)
    person = call.heard()["human"]
    (answer,) = person.sent(200, "INVITE")
    keys = person.heard().keys
    assert [k.digit for k in keys] == list("1234"), keys
    assert keys[0].at > answer.at
    gaps = [b.at - a.at for a, b in itertools.pairwise(keys)]
    # media-sdk dtmf.go: a 250 ms tone and a 250 ms gap a digit
    assert all(0.4 < g < 0.65 for g in gaps), gaps
    assert keys[0].at - answer.at < 2.0, keys[0].at - answer.at


BILLING = {"number": f"sip:billing@127.0.0.1:{HUMAN_SIP}", "description": "Billing",
           "spoken_name": "billing"}  # fmt: skip


def test_a_sip_destination_is_dialled_at_its_host_showing_the_caller_id(call: Call) -> None:
    """``sip:billing@127.0.0.1:5070`` goes through an inline trunk: the INVITE's Request-URI
    user is ``billing`` and its From shows HANDOFF_CALLER_ID."""
    call.standins.stt_says(ASKS_FOR_A_PERSON)
    call.start_worker(
        HANDOFF_DESTINATIONS=json.dumps({"support": BILLING}), HANDOFF_CALLER_ID=INBOUND_NUMBER
    )
    call.human(HumanPhone(ring=0.5, answer=486))
    call.caller(asks_for_a_person(call.folder), hang_up_after=20)
    call.wait(40)
    person = call.heard()["human"]
    (invite,) = person.received("INVITE")
    uri = invite.first_line.split()[1]
    assert uri.startswith("sip:billing@127.0.0.1:5070"), invite.first_line
    assert f"<sip:{INBOUND_NUMBER}@" in invite.headers["from"], invite.headers["from"]
    assert handoff_record(call)["outcome"] == "busy"


def test_an_inline_trunk_with_no_number_to_show_is_refused_as_the_fake_refuses(
    stack: Stack, tmp_path: Path
) -> None:
    """CreateSIPParticipant through an inline trunk with no ``sip_number``: livekit-server
    refuses it before any INVITE, and the fake (standins/fake_livekit.py) refuses it the same
    way."""

    def request() -> api.CreateSIPParticipantRequest:
        return api.CreateSIPParticipantRequest(
            trunk=api.SIPOutboundConfig(hostname=f"127.0.0.1:{HUMAN_SIP}"),
            sip_call_to="billing",
            sip_number="",
            room_name="no-number-to-show",
            participant_identity="transfer_probe",
            wait_until_answered=True,
        )

    async def refusal(url: str, key: str, secret: str) -> tuple[str, int, str, bool]:
        async with api.LiveKitAPI(url=url, api_key=key, api_secret=secret) as lkapi:
            with pytest.raises(api.TwirpError) as refused:
                await lkapi.sip.create_sip_participant(request())
        e = refused.value
        return e.code, e.status, e.message, isinstance(e, api.SipCallError)

    capture = Capture(tmp_path / "phones.pcap")
    real = asyncio.run(refusal("http://127.0.0.1:7880", real_stack.API_KEY, API_SECRET))
    capture.stop()
    # livekit-server v1.13.5 (its log: service/sip.go "cannot create sip participant request",
    # then twirp.go status 412, code failed_precondition)
    message = "twirp error unknown: no numbers on outbound trunk"
    assert real == ("failed_precondition", 412, message, False)
    person = read_phones(capture.path, human=(HUMAN_SIP, HUMAN_RTP))["human"]
    assert person.sip() == [], "an INVITE went out"
    assert "no-number-to-show" not in stack.rooms()

    async def on_the_fake() -> tuple[str, int, str, bool]:
        async with FakeLiveKitServer(cloud=False) as fake:
            return await refusal(fake.local_url, FAKE_KEY, FAKE_SECRET)

    assert asyncio.run(on_the_fake()) == real


# ── The operator's commands against the real server ───────────────────────────────────────────


def run_command(stack: Stack, folder: Path, command: str, **settings: str):
    """``python warm_handoff.py <command>`` in ``folder``, configured by its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(real_stack._WORKER_SETTINGS)}
    env.update(stack.env, SIP_TRUNK_ID=stack.outbound_trunk, DOTENV_FILE=os.devnull,
               HANDOFF_DESTINATIONS=json.dumps({"support": SUPPORT}), **settings)  # fmt: skip
    shutil.copy(real_stack.ROOT / "warm_handoff.py", folder / "warm_handoff.py")
    return subprocess.run(
        [sys.executable, "warm_handoff.py", command], cwd=folder, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_proves_the_credentials_against_the_real_server(stack: Stack, tmp_path: Path):
    done = run_command(stack, tmp_path, "check", DEEPGRAM_API_KEY="k", OPENAI_API_KEY="k",
                       ELEVEN_API_KEY="k")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LiveKit API: OK, the credentials work" in done.stdout
    # livekit-server has no MoveParticipant: check finds it out, as the worker would
    assert "Joining the human: bridge (this server has no MoveParticipant" in done.stdout
    wrong = run_command(stack, tmp_path, "check", LIVEKIT_API_SECRET="x" * 40,
                        DEEPGRAM_API_KEY="k", OPENAI_API_KEY="k", ELEVEN_API_KEY="k")  # fmt: skip
    assert wrong.returncode == 1
    assert "LiveKit API: FAILED (unauthenticated: the server refused" in wrong.stderr


def test_records_of_a_real_call_wait_in_the_outbox_and_resend_outbox_sends_them(
    call: Call, stack: Stack
) -> None:
    """The webhook is down during the call: its records wait in the outbox beside the
    callback file; ``resend-outbox`` sends them once it is back, signed."""
    with socket.socket() as s:  # a port nobody listens on: the webhook is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    webhook = {"HANDOFF_WEBHOOK_URL": f"http://127.0.0.1:{port}/records",
               "HANDOFF_WEBHOOK_SECRET": "real-stack-webhook-secret-0123456"}  # fmt: skip
    call.start_worker(**webhook)
    call.caller(audio_file(call.folder, "caller", Quiet(1)), hang_up_after=8)
    call.wait(30)
    assert call.worker is not None
    call.worker.stop()
    waiting = sorted((call.folder / "outbox").glob("*.json"))
    assert waiting, "no record waited in the outbox"
    received: list[dict] = []

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the handler's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_command(stack, call.folder, "resend-outbox", **webhook)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(waiting)} record(s) sent, 0 still waiting" in done.stdout
    rooms = {r["room"] for r in received}
    assert len(rooms) == 1 and rooms.pop().startswith("call-")  # the real call's room
    assert {r["type"] for r in received} >= {"call"}
    assert not list((call.folder / "outbox").glob("*.json"))


@pytest.mark.parametrize("mode", ["conference", "consult"])
def test_the_benchmark_at_the_phones_measures_every_figure(stack: Stack, tmp_path: Path, mode):
    """bench/real_stack_bench.py cannot rot: one call of each kind yields every figure (their
    values are the benchmark's business, on an idle machine, not a test's)."""
    sys.path.insert(0, str(real_stack.ROOT / "bench"))
    import real_stack_bench

    figures = real_stack_bench.run_call(stack, tmp_path / mode, mode)
    common = {"greeting_ms", "please_hold_ms", "longest_caller_silence_ms"}
    expected = common | (
        {"caller_to_human_ms", "human_to_caller_ms", "bridged_job_cpu_percent",
         "bridged_job_memory_added_mb"}  # fmt: skip
        if mode == "conference"
        else {"hello_end_to_opener_ms", "hello_end_to_details_ms", "opener_end_to_details_ms"}
    )
    assert set(figures) == expected
    assert all(v >= 0 for k, v in figures.items() if k != "bridged_job_memory_added_mb")
