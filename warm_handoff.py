"""Warm Handoff Agent: a LiveKit Agents worker that answers phone calls and, when a person is
needed, hands the caller to a human over SIP without dropping the caller or surprising the human.

The call
--------
A caller dials in; LiveKit SIP gives them a room of their own and dispatches this worker
(``entrypoint``, ``run_call``). The receptionist, ``WarmHandoffAgent``, greets them and helps.
When they need a person and agree, the model calls ``transfer_call`` with a team's *name* (never
a number), and one ``Handoff`` runs through its ``Phase``:

    ANNOUNCING  the caller hears "please hold" while the human's phone already rings;
    RINGING     the caller is on hold: music, a check-in now and then; "never mind" stops it;
    BRIEFING    (consult) someone answered, in a private room: a person is confirmed
                (answering-machine detection, a key, a yes), briefed, and asked;
    MERGING     (consult) the human is moved into the caller's room;
    MERGED      caller and human talk; the agent steps out, staying silent for a few seconds
                in case the human's leg drops (``SafetyNet``).

Each attempt ends in one ``HandoffOutcome``. Connected; or busy, no answer, declined, voicemail,
unreachable or failed: the caller hears why and is offered another team or a callback; or
cancelled by the caller; or caller left (a callback request is recorded); or closed (outside
the team's hours, never dialled). Whatever the exit, no ringing phone, leg or room is left
behind, and a record goes out (``CallRecords``).

The sections, in the order a call meets them
--------------------------------------------
1. What is said     every sentence the caller, the human and the model hear;
2. Configuration    one ``Settings`` model, read from the environment and checked at start;
                    masking and redaction of what may leave the call;
3. Records          outcomes, phases, and the records a call leaves (log, webhook, file);
4. The phone line   ``PhoneLine``, the one seam to the media server: ``LiveKitPhoneLine`` for
                    real calls, ``SimulatedPhoneLine`` for the console and the tests;
5. The handoff      ``Handoff`` and its parts: ``HumanCall`` (the dial), ``CallerHold``,
                    ``Screening`` (a person or a machine?), ``ConsultRoom`` (the brief);
6. The agents       ``WarmHandoffAgent`` (the caller's) and ``ConsultAgent`` (the human's);
7. The server       the ``AgentServer`` with a prewarmed Silero VAD, the ``rtc_session``
                    entrypoint, and the ``check`` and ``resend-outbox`` commands.

Run ``python warm_handoff.py console`` to talk to it locally, ``python warm_handoff.py start`` on a
worker host.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import astuple, dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from functools import cached_property, partial
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeAlias, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import numpy as np
import regex
from dotenv import load_dotenv
from jwt.warnings import InsecureKeyLengthWarning
from livekit import api, rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    AgentStateChangedEvent,
    APIConnectOptions,
    ConversationItemAddedEvent,
    JobContext,
    JobProcess,
    ModelSettings,
    RunContext,
    UserInputTranscribedEvent,
    UserStateChangedEvent,
    cli,
    llm,
    room_io,
    utils,
)
from livekit.agents.llm import LLM, ToolResult, function_tool
from livekit.agents.stt import STT
from livekit.agents.tts import TTS, SynthesizedAudio
from livekit.agents.types import NOT_GIVEN, FlushSentinel, NotGiven
from livekit.agents.utils.audio import audio_frames_from_file
from livekit.agents.vad import VAD
from livekit.agents.voice import SpeechHandle
from livekit.agents.voice.agent_session import SessionConnectOptions
from livekit.agents.voice.amd import AMD, AMDCategory, AMDPredictionEvent
from livekit.agents.voice.amd.classifier import MACHINE_SILENCE_THRESHOLD
from livekit.agents.voice.amd.detector import DetectionOptions
from livekit.agents.voice.background_audio import BuiltinAudioClip
from livekit.api.sip_service import SipService
from livekit.plugins import deepgram, elevenlabs, openai, silero  # register on the main thread
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ArgsKwargs, InitErrorDetails, PydanticCustomError, core_schema
from pydantic_settings import EnvSettingsSource, NoDecode

logger = logging.getLogger("warm-handoff")
T = TypeVar("T")
load_dotenv(os.environ.get("DOTENV_FILE") or None)  # DOTENV_FILE=/dev/null ignores .env


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 1. What is said: every sentence the caller, the human and the model hear, in one place
# ──────────────────────────────────────────────────────────────────────────────────────────────

# -- to the caller ---------------------------------------------------------------------------------
# The sentences whose words never depend on what was said (the greeting, PLEASE_HOLD,
# HOLD_CHECK_IN, and to the human OPENER and ASK_PERSON) are synthesised live once per worker
# host and played from disk after that (``PhraseCache``, "instant words").
DEFAULT_GREETING = "Thanks for calling. This is the virtual assistant. How can I help you today?"
PLEASE_HOLD = "Let me connect you with {team}. Please hold for a moment."
HOLD_CHECK_IN = "Thanks for holding. I'm still connecting you with {team}."
STILL_TRYING = (
    "I'm still trying {team}; it's been about {waited} seconds. Please stay on the line, or "
    "say never mind to stop."
)
BEING_BRIEFED = "Someone from {team} has picked up and I'm filling them in now. It won't be long."
NOW_CONNECTED = "You're now connected with {team}."
CALLER_HEARS = {  # why an attempt failed, by outcome
    "busy": "I'm sorry, {team} is on another call right now.",
    "no_answer": "I'm sorry, nobody from {team} picked up.",
    "declined": "I'm sorry, {team} can't take your call right now.",
    "voicemail": "I'm sorry, I reached {team}'s voicemail rather than a person.",
    "unreachable": "I'm sorry, I couldn't get through to {team}.",
    "failed": "I'm sorry, something went wrong while I was connecting you.",
}
OFFER_ANOTHER_TEAM = (
    "I can try {team} instead, or take your details so someone calls you back. "
    "Which would you prefer?"
)
OFFER_CALLBACK = "I can take your details so someone calls you back. Would you like that?"
CLOSED_OFFER_TEAM = (
    "I can try {team}, who can take your call now, or take your details so someone calls you "
    "back {when} Which would you prefer?"
)
CLOSED_OFFER_CALLBACK = (
    "I can take your details so someone calls you back {when} Would you like that?"
)
TRANSFER_STOPPED = "No problem, I've stopped the transfer. What else can I do?"
CALL_ENDING = "I'm sorry, I have to end this call now. Please call us back in a moment."
CALLBACK_READ_BACK = "Let me read that back: {name}, on {number}, {best_time}. Is that right?"
CALLBACK_CONFIRMED = "Thank you, {name}. Someone will call you back {when}"
GOODBYE = "Thank you for calling {business}. Goodbye!"
REJOINED = "It looks like we lost {team}. I can {offer}."  # the offer: these, joined by commas
REJOIN_TRY_AGAIN = "try them again"
REJOIN_TRY_OTHER = "try {team}"
REJOIN_CALLBACK = "or take your details for a callback"  # the last ("or" dropped when alone)
CLOSED_NOW = "{team} is closed right now"  # a closed team, then CLOSED_OFFER_*
CLOSED_UNTIL = "{team} is closed right now and opens {when}"
CALLBACK_WHEN_OPEN_UNKNOWN = "as soon as they can"  # a callback's time when no opening is known
DIRECT_NUMBER_SAID_AS = "that number"  # a number the caller gave (transfer_to_number)
NO_REASON = "a request for a person"  # the transfer's reason when the model gave none

# -- to the human ----------------------------------------------------------------------------------
# Before a person is confirmed only OPENER and ASK_PERSON: safe on any recording. The opener
# names the business and nothing else, and is short: the details wait for its end, so every
# character of it (the business name's too) is about 70 ms more before the human hears why.
OPENER = "It's {business}."
ASK_PERSON = "Is this {team}? Press 1 or say yes to take a call."
DETAILS_INTRO = "I'm the assistant, with a caller for {team}. "  # the details, after OPENER
BRIEF_INTRO = "Hi, this is the {business} assistant with a caller for {team}. "  # unscreened
BRIEF_ASK = "Say put them through, or press 1, to take the call; press 2 if you can't."
BRIEF_FALLBACK = "They're calling about {reason}."  # the brief when its model has not written it
BRIEF_FALLBACK_WORDS = " In their words: {words}"  # and the caller's last words, if any
CONFERENCE_INTRODUCTION = (
    "Hello, this is the {business} assistant. I have a caller on the line about {reason}. "
    "You're now connected with {team}. I'll leave you to it."
)
HUMAN_DECLINED = "Understood, I'll let the caller know. Thank you, goodbye."
HUMAN_CALLER_LEFT = (
    "I'm sorry, the caller has just hung up. I'll pass on a callback request with what they "
    "needed. Goodbye."
)
HUMAN_CANCELLED = "Sorry to trouble you: the caller no longer needs the transfer. Goodbye."
HUMAN_CALL_ENDS = "I'm sorry, this call has to end now. Goodbye."
HUMAN_MAX_HOLD = "I'm sorry, I have to take the caller back now. Goodbye."

# -- to the model: its instructions, the brief's prompt, and the notes its tools return ------------
CALLER_INSTRUCTIONS = """\
You are the phone receptionist for {business}. You can help with {scope}.
You are speaking on a phone call, so:
- answer in one to three short sentences of plain spoken language;
- no lists, markdown, emoji, symbols or URLs; say numbers the way a person would;
- ask one question at a time.

Offer to connect the caller with a person when they ask for one, when you cannot help with what
they need, or when they sound upset or frustrated. Always tell the caller which team you will
connect them to and get a clear yes before calling transfer_call. Pass a short reason that says
what the caller needs.
If nobody can take the call, offer a callback: ask the caller's name and the best time to
call, then use request_callback (it reads the details back and records them).
When the caller is done and says goodbye, call end_call: it says goodbye and hangs up.
Never read out, invent or confirm internal phone numbers or extensions. If the caller asks you
to call a phone number they give you, explain that you can only connect them to the teams
listed in transfer_call{direct}.

Teams you can connect the caller to:
{teams}
"""
CONSULT_INSTRUCTIONS = """\
You are the {business} assistant, on a private line with a member of staff from {team} who may
take over a phone call. The caller cannot hear you. Speak in short, plain sentences.
You have already told them who is calling and why. Answer their questions using only the
conversation below; if the answer is not in it, say you don't know.
When they agree to take the call, call connect_to_caller. If they say they can't or won't,
call decline_transfer with their reason. If you hear a voicemail greeting or an automated menu,
call voicemail_detected.

Reason for the transfer: {reason}

Conversation with the caller:
{transcript}
"""
BRIEF_PROMPT = """\
You brief a member of staff who is about to take over a phone call. From the conversation,
write two or three short spoken sentences: who is calling (if they said), what they want, what
was already tried, and why they need a person. Plain words only, no lists or symbols, no
greeting. Never repeat a card, account or other long number, not even digit by digit: say
"a card ending" and its last four digits, for example "a card ending 4242".
"""
DIRECT_DIAL_NOTE = ", or to a number the caller gives when the operator allows it"
MODEL_TEAMS_NOW = (
    "Right now these teams are open: {open}; closed: {closed}. Offer only open teams. If the "
    "caller asks for a closed team, call transfer_call with it anyway: the caller is told when "
    "it opens and offered an open team or a callback."
)
MODEL_TRY_NEXT = "If the caller agrees to try {name}, call transfer_call with destination {name}. "
MODEL_CALLBACK_STEPS = (
    "If they want a callback, ask their name and the best time, then call request_callback."
)
MODEL_CLOSED_CALLBACK = (
    "If they want a callback, ask their name, then call request_callback; leave best_time "
    "empty for {when}, unless they ask for another time."
)
MODEL_NO_SUCH_TEAM = "There is no team called {name!r}. Offer only: {teams}."
MODEL_NUMBER_NOT_ALLOWED = (
    "That number is not one you are allowed to connect to. Tell the caller, and offer the "
    "listed teams instead."
)
MODEL_ALREADY_TRIED = (
    "{name} was already tried on this call and could not take it; do not try it again. "
)
MODEL_CANCELLED_ON_HOLD = (
    "The caller cancelled the transfer while on hold. If they ask for {name} again, call "
    "transfer_call again."
)
MODEL_ASK_NUMBER = "Ask for the number to call, with the area code."
MODEL_ASK_BEST_TIME = "Ask the caller when is the best time to call them back."
MODEL_HUNG_UP_DURING_READ_BACK = "The caller hung up during the read-back."
MODEL_READ_BACK_DONE = (
    "The details were read back. If the caller says yes, call request_callback again with "
    "confirmed=true; otherwise correct the details."
)
MODEL_CALLBACK_RECORDED = "The callback request is recorded."
MODEL_NO_CALLBACK_WITH_TRANSFER = (
    "No callback was recorded: a transfer was asked for in the same turn. Offer a callback "
    "only if the transfer does not happen."
)
BRIEF_REQUEST = "Reason for transfer: {reason}\n\n{transcript}"  # to the brief's model
NOTHING_SAID_YET = "(nothing said yet)"  # CONSULT_INSTRUCTIONS' conversation, when empty
MODEL_NO_TEAMS = "none"  # MODEL_TEAMS_NOW's open or closed teams, when there are none
MODEL_CLOSED_TEAM = "{name} (opens {when})"  # one of MODEL_TEAMS_NOW's closed teams
MODEL_OPENS_AT_NO_SET_TIME = "at no set time"
MODEL_ALREADY_CONNECTED = "The caller is already talking with a person."
MODEL_ONE_TRANSFER_PER_TURN = "Only one transfer per turn; this one was not made."
MODEL_TRANSFER_IN_PROGRESS = "A transfer is already in progress."
MODEL_CALL_ENDING = "The call is ending."
MODEL_NO_MORE_TRANSFERS = "No more transfers on this call. "  # then what next
MODEL_CONNECTED = "The caller is now talking with {team}."
MODEL_CALLER_LEFT = "The caller hung up during the transfer."
MODEL_NOT_CONNECTED = "The transfer to {name} did not happen: {outcome}"  # then its detail:
MODEL_DETAIL = " ({detail})"
MODEL_CALLER_TOLD = " The caller has been told. "  # after a sentence; then what next
MODEL_CLOSED = "{name} is closed now and was not dialled"  # then MODEL_CALLER_TOLD
MODEL_CLOSED_UNTIL = "{name} is closed now and was not dialled; it opens {when}"
MODEL_REJOINED = (
    "The person from {team} hung up right after the transfer; the caller is back with you "
    "and has just heard: {told!r} "
)
MODEL_REJOIN_AGAIN = "If they want them again, call {same}. "
MODEL_REJOIN_SAME_TEAM = "transfer_call with destination {name}"
MODEL_REJOIN_SAME_NUMBER = "transfer_to_number with the same number"
MODEL_REJOIN_OTHER = "If they agree to try {name}, call transfer_call with destination {name}. "
MODEL_NOT_ENDED_IN_TRANSFER = "The caller is being transferred: the call was not ended."
MODEL_ALREADY_ENDING = "The call is already ending."
MODEL_CALL_ENDED = "The call has ended."

# -- what the agent listens for --------------------------------------------------------------------
CANCEL_WORDS = re.compile(  # a request to stop the transfer, not any use of "cancel" or "stop"
    r"""
    \b(never\ ?mind | forget\ (about\ )?it(?!') | don'?t\ bother | i'?ll\ call\ back
       | changed\ my\ mind | don'?t\ transfer)\b
    | \b(cancel|stop|abort)\ (the\ |this\ |that\ )?(call\ )?transfer(ring)?\b
    | \b(cancel|stop)\ (that|this)(\ please|\ now)?\s*([.,;!?]|$)
    | ^\W*(cancel|stop)(\ please|\ now)?\W*$
    """,
    re.IGNORECASE | re.VERBOSE,
)
YES = re.compile(r"^\W*(yes|yeah|yep|yup|sure|speaking|go ahead|ok(ay)?|i'?m here)\b", re.I)
VOICEMAIL_HINTS = re.compile(
    r"leave (me |us )?a message|after the (tone|beep)|voice ?mail|not available to take|"
    r"mailbox|press \d (for|to)",
    re.IGNORECASE,
)

# -- what the console's simulated human says, and listens for --------------------------------------
SIMULATED_HELLO = "Hello?"
SIMULATED_MAILBOX = "Hi, you've reached the support line. Please leave a message after the tone."
ASKED_IF_TEAM = re.compile(r"\bis this\b[^?]*\?", re.IGNORECASE)  # ASK_PERSON: a yes, a 1
ASKED_TO_DECIDE = re.compile(r"\bpress 1\b.*\bpress 2\b", re.IGNORECASE)  # BRIEF_ASK: 1 or 2


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 2. Configuration: one Settings model, read and checked once at start
# ──────────────────────────────────────────────────────────────────────────────────────────────

# Whole-string patterns (\A...\Z: "$" would accept a trailing newline); phone numbers take
# ASCII digits only ("\d" also matches other scripts' digits, which no trunk dials).
E164 = re.compile(r"\A\+[1-9][0-9]{6,14}\Z")
# A sip: URI is dialled at its own host, which LiveKit takes only as a bare hostname or IP
# (with a port): no parameters (livekit/protocol livekit/sip.go validateHostnameFormat).
SIP_URI = re.compile(r"\A(sips?):([^@\s;]+)@([^@\s;]+)\Z")
DTMF = re.compile(r"\A[0-9*#wW]{1,32}\Z")
DESTINATION_NAME = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")
AGENT_NAME_RULE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
MAX_DESTINATIONS_CHARS = 65_536
DIAL_PATTERN_TIMEOUT = 0.05  # seconds a HANDOFF_ALLOW_DIAL_PATTERN match may take
CALLER_ID_FROM_CALLER = "caller"  # HANDOFF_CALLER_ID=caller: the human's phone shows the caller
OFF = ("off", "0", "false", "no")  # turns HANDOFF_PHRASE_CACHE off
# HANDOFF_RING_TIMEOUT and a destination's own ring_timeout. LiveKit waits at most 80 s for a
# dial that waits for the answer (livekit/livekit pkg/service/sip.go CreateSIPParticipant:
# ``timeout = 80 * time.Second`` with WaitUntilAnswered), the extension's keys included: a longer
# ring would end in the server's timeout, not in the phone's ringing out.
RING_SECONDS = (5.0, 70.0)
FROM_THE_ENVIRONMENT = "the environment"  # the validation context of what load_settings reads
# Legacy zone names a region's own name replaces: fixed offsets that never change to summer time
# (a New York team on "EST" would open an hour late all summer) and the POSIX-style US rules.
FIXED_ZONES = {
    "EST": "America/New_York (or America/Panama, which keeps no summer time)",
    "MST": "America/Denver (or America/Phoenix, which keeps no summer time)",
    "HST": "Pacific/Honolulu",
    "EST5EDT": "America/New_York",
    "CST6CDT": "America/Chicago",
    "MST7MDT": "America/Denver",
    "PST8PDT": "America/Los_Angeles",
}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTH_NAMES = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
DAY_SPAN = re.compile(r"\A(mon|tue|wed|thu|fri|sat|sun)(?:-(mon|tue|wed|thu|fri|sat|sun))?\Z")
TIME_SPAN = re.compile(r"\A([01]\d|2[0-3]):([0-5]\d)-(?:([01]\d|2[0-3]):([0-5]\d)|(24):(00))\Z")
DEFAULT_AGENT_NAME = "warm-handoff-agent"

# a folder per user: another account on the host cannot plant sentences in it (see PhraseCache)
DEFAULT_PHRASE_CACHE = os.path.join(tempfile.gettempdir(), f"warm-handoff-phrases-{os.getuid()}")

# Read by the model plugins themselves, not by Settings: provider -> its key, then an alias.
PROVIDER_KEYS = {
    "deepgram": ("DEEPGRAM_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    "elevenlabs": ("ELEVEN_API_KEY", "ELEVENLABS_API_KEY"),
}


class HandoffMode(str, Enum):
    """What the human hears before meeting the caller. In every mode they are dialled into a
    private consult room and screened there (a mailbox, a menu or a PBX never hears about the
    caller, and the caller never hears them); then they are joined (``JoinWay``)."""

    AUTO = "auto"  # consult, on every LiveKit
    CONSULT = "consult"  # briefed in private and asked; joined only if they say yes
    CONFERENCE = "conference"  # joined at once, introduced in front of the caller (the seed's)


class JoinWay(str, Enum):
    """How a human in the consult room reaches the caller, decided by the server."""

    MOVE = "move"  # MoveParticipant into the caller's room: LiveKit Cloud
    BRIDGE = "bridge"  # the worker relays audio between the two rooms: any LiveKit


def on_livekit_cloud(url: str) -> bool:
    """Whether ``url`` is LiveKit Cloud, counted as the framework counts it (livekit-agents
    ``utils/misc.py`` ``is_cloud``: ``*.livekit.cloud`` and ``*.livekit.run``)."""
    host = urllib.parse.urlparse(url).hostname or ""
    return host.endswith((".livekit.cloud", ".livekit.run"))


class SimulatedHuman(str, Enum):
    """What the human does on the simulated line (console and tests)."""

    ANSWER = "answer"
    DECLINE = "decline"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    VOICEMAIL = "voicemail"
    UNREACHABLE = "unreachable"
    DROP_AFTER_MERGE = "drop_after_merge"  # takes the call, hangs up moments after the merge


# -- a value's problem, in the operator's words ----------------------------------------------------


def problem(says: str) -> PydanticCustomError:
    """A value's problem as the operator reads it after where it is ("HANDOFF_MODE ..."):
    raised by a validator, printed by ``problems_in`` as it is."""
    return PydanticCustomError("problem", says)


def at(where: tuple[str | int, ...], says: str) -> InitErrorDetails:
    """A ``problem`` inside a value, ``where`` from it, that a validator names with others."""
    return {"type": problem(says), "loc": where, "input": None}


def together(
    problems: list[InitErrorDetails], found: ValidationError | None = None
) -> ValidationError:
    """Pydantic's problems (``found``) and a validator's own as one error: every problem of the
    destinations, or of a destination's hours, is named at once."""
    if found is not None:
        problems = [
            InitErrorDetails(
                type=PydanticCustomError(e["type"], e["msg"], e.get("ctx")),
                loc=e["loc"],
                input=e["input"],
            )
            for e in found.errors(include_url=False)
        ] + problems
    return ValidationError.from_exception_data("problems", problems)


@dataclass(frozen=True)
class Allowed:
    """The lowest and highest number an operator may set: held to by what ``load_settings``
    reads (``FROM_THE_ENVIRONMENT``), not by a Settings built in code (a test rings 0.1 s)."""

    low: float
    high: float

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        def within(value: float | None, info: ValidationInfo) -> float | None:
            if info.context is FROM_THE_ENVIRONMENT and value is not None:
                if not self.low <= value <= self.high:
                    raise PydanticCustomError("out_of_bounds", "must be from {low} to {high}",
                                              {"low": self.low, "high": self.high})  # fmt: skip
            return value

        return core_schema.with_info_after_validator_function(within, handler(source))


def matching(rule: re.Pattern[str], says: str) -> Callable[[str], str]:
    """A text that, when set, must match ``rule`` from its start; ``says`` what it must be."""

    def check(text: str) -> str:
        if text and not rule.match(text):
            raise problem(says)
        return text

    return check


# -- a destination and its opening hours -----------------------------------------------------------


def _time_zone(name: Any) -> str:
    """An IANA time zone this host knows, and not a legacy name (``FIXED_ZONES``)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, TypeError):  # OSError: "America"
        says = f"must be an IANA time zone like America/Los_Angeles (got {name!r})"
        raise problem(says) from None
    if name in FIXED_ZONES:
        raise problem(f"{name!r} is a legacy zone name with no local rules: use the region's, "
                      f"{FIXED_ZONES[name]}")  # fmt: skip
    return str(name)


def _closed_date(day: Any) -> date:
    """A date like 2025-12-25."""
    try:
        return day if isinstance(day, date) else date.fromisoformat(day)
    except (ValueError, TypeError):
        raise problem(f"must list dates like 2025-12-25 (got {day!r})") from None


def _weekdays(key: str) -> list[int]:
    """The weekdays (Monday 0) a key names: "mon", "mon-fri", "fri-mon", "sat,sun"; [] when it
    is not a day, a span of days, or several joined by commas."""
    days: list[int] = []
    for span in key.replace(" ", "").lower().split(","):
        if not (m := DAY_SPAN.match(span)):
            return []
        first = WEEKDAYS.index(m[1])
        last = WEEKDAYS.index(m[2] or m[1])
        days += [(first + i) % 7 for i in range((last - first) % 7 + 1)]
    return days


def _opening_times(value: Any) -> list[tuple[int, int]]:
    """Times like "09:00-12:00,13:00-17:00" as (start, end) minutes from midnight, an end at or
    before its start running past midnight; [] when any is not HH:MM-HH:MM or is empty."""
    ranges: list[tuple[int, int]] = []
    for span in value.replace(" ", "").split(",") if isinstance(value, str) else [""]:
        if not (m := TIME_SPAN.match(span)):
            return []
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3] or m[5]) * 60 + int(m[4] or m[6])
        if end == start:
            return []
        ranges.append((start, end if end > start else end + 24 * 60))  # past midnight
    return ranges


Week: TypeAlias = "tuple[tuple[tuple[int, int], ...], ...]"  # Monday first: (start, end) minutes


def _week(days: dict[str, Any]) -> tuple[Week, list[InitErrorDetails]]:
    """The opening times of each weekday, Monday first, that an ``hours`` object's day keys
    give, and the problems in them."""
    weekly: list[list[tuple[int, int]]] = [[] for _ in WEEKDAYS]
    given: dict[int, str] = {}  # weekday -> the key that gave its times
    problems: list[InitErrorDetails] = []
    for key, value in days.items():
        named, ranges = _weekdays(key), _opening_times(value)
        if not named:
            problems.append(at((), f"has an unknown key {key!r}: use tz, closed, or days like "
                                   "mon, mon-fri or sat,sun"))  # fmt: skip
        elif not ranges:
            problems.append(at((), f'[{key!r}] must be opening times like "09:00-17:30", '
                                   f"several joined by commas (got {value!r})"))  # fmt: skip
        for day in named if ranges else []:
            if day in given:
                problems.append(at((), f": {WEEKDAYS[day]} is in both {given[day]!r} and {key!r}"))
            given[day] = key
            weekly[day] += ranges
    return tuple(tuple(sorted(times)) for times in weekly), problems


@pydantic_dataclass(frozen=True)
class OpeningHours:
    """When a destination takes calls: weekly ranges of wall-clock time in its own IANA time
    zone, minus closed dates. A range that ends at or before it starts runs past midnight
    ("22:00-02:00"); a closed date cancels the ranges that start on it. Instants are compared
    in UTC, so a daylight-saving change moves nothing on the team's clock."""

    tz: Annotated[str, PlainValidator(_time_zone)]
    weekly: Week
    closed: frozenset[Annotated[date, PlainValidator(_closed_date)]] = frozenset()
    spec: str = field(default="", compare=False)  # as configured, for ``check``

    @model_validator(mode="wrap")
    @classmethod
    def _from_json(cls, raw: Any, handler: ValidatorFunctionWrapHandler) -> OpeningHours:
        """A destination's ``hours``: {"tz": "America/Los_Angeles", "mon-fri": "09:00-17:30",
        "sat": "10:00-14:00", "closed": ["2025-12-25"]}. Days are mon..sun, a span of them
        ("mon-fri", "fri-mon") or several joined by commas ("sat,sun"); times are
        HH:MM-HH:MM, several joined by commas ("09:00-12:00,13:00-17:00"); ``closed`` is a
        date or a list of them."""
        if isinstance(raw, (ArgsKwargs, OpeningHours)):  # built in code
            return handler(raw)
        if not isinstance(raw, dict):
            raise problem(
                'must be an object like {"tz": "Europe/London", "mon-fri": "09:00-17:00"}'
            )
        days = {key: value for key, value in raw.items() if key not in ("tz", "closed")}
        weekly, problems = _week(days)
        closed = raw.get("closed", [])
        closed = closed if isinstance(closed, list) else [closed]
        try:
            hours = handler({"tz": raw.get("tz"), "weekly": weekly, "closed": closed})
        except ValidationError as e:
            raise together(problems, e) from None
        if not days and not problems:
            problems.append(at((), 'has no opening times: add days like "mon-fri": "09:00-17:00"'))
        if problems:
            raise together(problems)
        spec = f"{hours.tz}: " + ", ".join(f"{key} {times}" for key, times in days.items())
        if hours.closed:
            spec += f"; {len(hours.closed)} closed date" + ("s" if len(hours.closed) > 1 else "")
        return replace(hours, spec=spec)

    def _openings(self, now: datetime, days: int) -> Iterator[tuple[datetime, datetime]]:
        """Each opening (start, end) in UTC, from the day before ``now``'s local date on."""
        zone = ZoneInfo(self.tz)
        first = now.astimezone(zone).date() - timedelta(days=1)
        for offset in range(days + 1):
            day = first + timedelta(days=offset)
            if day in self.closed:
                continue
            midnight = datetime(day.year, day.month, day.day)

            def utc(minutes: int, midnight: datetime = midnight) -> datetime:
                local = (midnight + timedelta(minutes=minutes)).replace(tzinfo=zone)
                return local.astimezone(timezone.utc)

            for start, end in self.weekly[day.weekday()]:
                yield utc(start), utc(end)

    def is_open(self, now: datetime) -> bool:
        return any(start <= now < end for start, end in self._openings(now, 1))

    def next_opening(self, now: datetime) -> datetime | None:
        """When it next opens after ``now``, on its own clock; None if not within a year."""
        for start, _ in self._openings(now, 366):
            if start > now:
                return start.astimezone(ZoneInfo(self.tz))
        return None


def when_it_opens(opens: datetime, now: datetime) -> str:
    """How the agent says an opening time, on the team's clock: "tomorrow at 9 a.m.",
    "today at 1:30 p.m.", "on Monday at 9 a.m.", "on Monday, March 9, at 9 a.m."."""
    days = (opens.date() - now.astimezone(opens.tzinfo).date()).days
    hour = opens.hour % 12 or 12
    clock = f"{hour}:{opens.minute:02d}" if opens.minute else f"{hour}"
    at = {(0, 0): "midnight", (12, 0): "noon"}.get(
        (opens.hour, opens.minute), f"{clock} {'a.m.' if opens.hour < 12 else 'p.m.'}"
    )
    weekday = DAY_NAMES[opens.weekday()]
    if days == 0:
        return f"today at {at}"
    if days == 1:
        return f"tomorrow at {at}"
    if days < 7:
        return f"on {weekday} at {at}"
    return f"on {weekday}, {MONTH_NAMES[opens.month - 1]} {opens.day}, at {at}"


def sentence(text: str) -> str:
    """``text`` ending in one full stop, also after "a.m.": "tomorrow at 9 a.m."."""
    return text if text.endswith((".", "?", "!")) else text + "."


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


_name = matching(DESTINATION_NAME, ": name must be lower-case letters, digits, '-' or '_'")


def _target(target: str) -> str:
    if not (E164.match(target) or SIP_URI.match(target)):
        raise problem(f"must be E.164 (+15105550100) or a sip: URI (got {target!r})")
    return target


def _description(text: str) -> str:
    if not text:
        raise problem("is required (the model reads it)")
    return text


def _screening(text: str) -> str:
    if text.lower() not in ("amd", "none"):
        raise problem("must be amd (the default) or none")
    return text.lower()


@pydantic_dataclass(frozen=True, config=ConfigDict(
    extra="forbid", str_strip_whitespace=True, validate_default=True, validate_by_name=True
))  # fmt: skip
class Destination:
    """A human the operator allows the agent to hand calls to. In HANDOFF_DESTINATIONS, a
    JSON object under its name, its target under "number" (``destinations_from_json``)."""

    name: Annotated[str, BeforeValidator(_name)]  # its key, as written: not stripped
    # E.164 number or sip: URI
    target: Annotated[str, AfterValidator(_target)] = Field(validation_alias="number")
    description: Annotated[str, AfterValidator(_description)] = ""
    extension: Annotated[  # DTMF sent once answered; 1234 reads as the digits
        str, BeforeValidator(lambda keys: str(keys) if type(keys) is int else keys),
        AfterValidator(matching(DTMF, "may hold only 0-9 * # w")),
    ] = ""  # fmt: skip
    # seconds; None: the global HANDOFF_RING_TIMEOUT
    ring_timeout: Annotated[float | None, Allowed(*RING_SECONDS)] = Field(default=None, strict=True)
    spoken_name: str = ""  # how the agent names it aloud, e.g. "our support team"
    fallback: str = ""  # the destination to offer next when this one can't take the call
    # "none": softphones, internal lines: no answering-machine detection
    screening: Annotated[str, AfterValidator(_screening)] = "amd"
    hours: OpeningHours | None = None  # None: always open

    @property
    def said_as(self) -> str:
        return self.spoken_name or f"the {self.name} team"


DEMO_DESTINATIONS = (
    Destination(
        "support",
        "+15550100100",
        "Technical support for products and accounts",
        spoken_name="our support team",
    ),
    Destination(
        "billing", "+15550100200", "Invoices, payments and refunds", spoken_name="our billing team"
    ),
)
DESTINATIONS_BY_NAME = TypeAdapter(dict[str, Destination])


def destinations_from_json(text: str, context: Any = None) -> tuple[Destination, ...]:
    """HANDOFF_DESTINATIONS is a JSON object: {"support": {"number": "+1...", "description":
    "...", "extension": "1234", "ring_timeout": 20, "spoken_name": "our support team"}}. Its
    size is bounded before parsing, its depth by the parser; a key given twice is named, not
    silently dropped. Each entry is a ``Destination`` named by its key (the JSON keys only:
    "number", not "target"), whose fallback names another."""
    if len(text) > MAX_DESTINATIONS_CHARS:
        raise problem(f"is too long ({len(text)} characters, at most {MAX_DESTINATIONS_CHARS})")
    repeated: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                repeated.append(key)
            seen[key] = value
        return seen

    try:
        entries = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise problem(f"is not valid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:  # the parser's own bound on nesting (the interpreter's recursion limit)
        raise problem("nests too deeply") from None
    if not isinstance(entries, dict):
        raise problem("must be a JSON object of name -> destination")
    problems = [at((), f"has the key {key!r} more than once") for key in dict.fromkeys(repeated)]
    teams = {name: entry for name, entry in entries.items() if isinstance(entry, dict)}
    for name, entry in teams.items():
        others, fallback = teams.keys() - {name}, entry.get("fallback")
        if "name" in entry:  # its key names it: an unknown key, as pydantic names one
            problems.append({"type": "extra_forbidden", "loc": (name, "name"), "input": None})
        if isinstance(fallback, str) and fallback.strip() not in {"", *others}:
            listed = ", ".join(sorted(others)) or "none"
            problems.append(at((name, "fallback"), "must name another destination "
                               f"(got {fallback.strip()!r}; the others: {listed})"))  # fmt: skip
    named = {name: {**entry, "name": name} if name in teams else entry
             for name, entry in entries.items()}  # fmt: skip
    try:
        found = DESTINATIONS_BY_NAME.validate_python(
            named, by_alias=True, by_name=False, context=context
        )
    except ValidationError as e:
        raise together(problems, e) from None
    if problems:
        raise together(problems)
    return tuple(found.values())


# -- the settings: one field per variable, in docs/configuration.md's order, each under its meaning


@dataclass(frozen=True)
class Shown:
    """How ``check`` prints a field: ``text(value, settings)``, or ``unset`` for an empty value.
    A field without one is not printed; a secret (a ``SecretStr``) only as set or not."""

    text: Callable[[Any, Settings], str] = lambda value, _: str(value)
    unset: str = "(not set)"


NEEDED_TO_START = "needed to start"  # start, dev and connect refuse to run without it; console not
IN_SECONDS = Shown(lambda seconds, _: f"{seconds:g}s")
BY_ORIGIN = Shown(lambda url, _: url_origin(url), unset="(not set: the provider's default)")
# A provider's base URL: a host, and no whitespace anywhere (a pasted line break or space is
# a mistake, not part of an address).
HTTP_BASE_URL = AfterValidator(matching(
    re.compile(r"\Ahttps?://[^\s/?#]+\S*\Z"), "must be an http:// or https:// URL, without spaces"
))  # fmt: skip


def variable(name: str, default: Any, *aliases: str) -> Any:
    """A field's default, read from the environment variable ``name`` (or, unset, an alias)."""
    return Field(default, validation_alias=AliasChoices(name, *aliases) if aliases else name)


def _caller_id(text: str) -> str:
    """An E.164 number, or "caller" in any case: the human's phone shows the caller's."""
    if text.lower() == CALLER_ID_FROM_CALLER:
        return CALLER_ID_FROM_CALLER
    if text and not E164.fullmatch(text):
        raise problem(f"must be an E.164 number like +15105550100, or caller (got {text!r})")
    return text


def _caller_id_shown(caller_id: str, settings: Settings) -> str:
    if caller_id == CALLER_ID_FROM_CALLER:
        return "caller (the caller's own number; else HANDOFF_TRUNK_NUMBER)"
    return mask_number(caller_id)


def _trunk_number(text: str) -> str:
    """A business's own number: echoed when it is wrong."""
    if text and not E164.match(text):
        raise problem(f"must be an E.164 number like +15105550100 (got {text!r})")
    return text


def _dial_pattern(pattern: Any) -> re.Pattern[str] | regex.Pattern[str] | None:
    """A text compiled by the regex package, whose matches take a timeout (see dial_allowed);
    a pattern compiled in code is kept as it is."""
    if pattern is None or isinstance(pattern, (re.Pattern, regex.Pattern)):
        return pattern
    try:
        return regex.compile(str(pattern))
    except regex.error as e:
        raise problem(f"is not a valid regular expression ({e})") from None


def _choice(text: Any) -> Any:
    """An enum's value in any case, spaces read as "_"."""
    return text.lower().replace(" ", "_") if isinstance(text, str) else text


def _readable_file(path: str) -> str:
    if path and not os.path.isfile(path):
        raise problem("does not name a readable file")
    return path


class Settings(BaseModel):
    """The worker's configuration, typed: each field is read from one environment variable
    (its ``validation_alias``), and the defaults written here are the only ones.

    A plain pydantic model, not a pydantic-settings ``BaseSettings``: built in code (tests and
    the benchmark build many), a Settings holds what it is given over the defaults and never
    reads the environment of the process it runs in; and only what the operator set is held
    to the bounds (``Allowed``), by the validation context, which a BaseSettings' own
    ``__init__`` does not pass on. The environment is read by ``load_settings`` alone, from
    the mapping it is given, through a pydantic-settings source (``EnvironmentVariables``)."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, extra="forbid")

    # LiveKit and SIP: start, dev and connect need them; console does not.
    # The LiveKit server; on LiveKit Cloud (*.livekit.cloud, *.livekit.run) the human is moved
    # to the caller, elsewhere the worker bridges them.
    livekit_url: Annotated[str, NEEDED_TO_START, Shown(), AfterValidator(matching(
        re.compile(r"(wss?|https?)://"), "must start with wss://, ws://, https:// or http://"))
    ] = variable("LIVEKIT_URL", "")  # fmt: skip
    # LiveKit API key.
    livekit_api_key: Annotated[str, NEEDED_TO_START, Shown()] = variable("LIVEKIT_API_KEY", "")
    # LiveKit API secret.
    livekit_api_secret: Annotated[SecretStr, NEEDED_TO_START] = variable(
        "LIVEKIT_API_SECRET", SecretStr("")
    )
    # The outbound SIP trunk that dials the humans (ST_...).
    sip_trunk_id: Annotated[str, NEEDED_TO_START, Shown()] = variable(
        "SIP_TRUNK_ID", "", "LIVEKIT_SIP_OUTBOUND_TRUNK"
    )
    # What the human's phone shows: one of the trunk's numbers, or caller.
    caller_id: Annotated[str, AfterValidator(_caller_id), Shown(_caller_id_shown)] = variable(
        "HANDOFF_CALLER_ID", ""
    )
    # With HANDOFF_CALLER_ID=caller: shown when the caller's own number can't be.
    trunk_number: Annotated[
        str, AfterValidator(_trunk_number), Shown(lambda number, _: mask_number(number))
    ] = variable("HANDOFF_TRUNK_NUMBER", "")
    #
    # The handoff. The humans the agent may hand calls to: a JSON object.
    destinations: Annotated[tuple[Destination, ...], NoDecode] = variable(
        "HANDOFF_DESTINATIONS", ()
    )
    # Opt-in: a regular expression for numbers a caller may ask to be put through to.
    allow_dial_pattern: Annotated[
        re.Pattern[str] | regex.Pattern[str] | None, PlainValidator(_dial_pattern)
    ] = variable("HANDOFF_ALLOW_DIAL_PATTERN", None)
    # consult (briefed in private, then asked), conference (introduced in front of the
    # caller), or auto (consult). Every mode screens who answers first.
    handoff_mode: Annotated[HandoffMode, BeforeValidator(_choice), Shown(
        lambda mode, s: f"{mode.value} (in force: {s.mode_in_force.value}, "
                        f"joined by {s.join_way.value})")
    ] = variable("HANDOFF_MODE", HandoffMode.AUTO)  # fmt: skip
    # How long a destination rings (a destination's own ring_timeout wins).
    ring_timeout: Annotated[float, Allowed(*RING_SECONDS), IN_SECONDS] = variable(
        "HANDOFF_RING_TIMEOUT", 25.0
    )
    # The longest a whole handoff may keep the caller on hold.
    max_hold: Annotated[float, Allowed(30, 1800), IN_SECONDS] = variable("HANDOFF_MAX_HOLD", 180.0)
    # How long the human may stay silent after answering before the brief starts anyway.
    hello_grace: Annotated[float, Allowed(0, 10)] = variable("HANDOFF_HELLO_GRACE", 2.0)
    # How often the agent checks in with a caller on hold.
    hold_reassure_every: Annotated[float, Allowed(5, 300)] = variable("HANDOFF_HOLD_REASSURE", 25.0)
    # Dials per call, cancelled ones and repeats included (a failed destination is not redialled).
    max_attempts: Annotated[int, Allowed(1, 5), Shown()] = variable("HANDOFF_MAX_ATTEMPTS", 3)
    # How long the agent stays, silent, after the merge, to offer a retry if the human drops.
    rejoin_window: Annotated[float, Allowed(0, 120), Shown(IN_SECONDS.text, unset="off")] = (
        variable("HANDOFF_REJOIN_WINDOW", 20.0)
    )
    # Hold music (unset: LiveKit's built-in hold music).
    hold_audio_file: Annotated[str, AfterValidator(_readable_file)] = variable(
        "HANDOFF_HOLD_AUDIO_FILE", ""
    )
    #
    # The agent. Its dispatch name: agentName in the SIP dispatch rule.
    agent_name: Annotated[str, Shown(), AfterValidator(matching(
        AGENT_NAME_RULE, "may hold only letters, digits, '-' and '_'"))
    ] = variable("AGENT_NAME", DEFAULT_AGENT_NAME)  # fmt: skip
    # The first sentence the caller hears.
    greeting: str = variable("GREETING", DEFAULT_GREETING)
    # How the agent names the business.
    business_name: str = variable("BUSINESS_NAME", "our company")
    # What the agent helps with itself, before offering a person.
    business_scope: str = variable(
        "BUSINESS_SCOPE", "general questions about our products and services"
    )
    # Deepgram speech-to-text model.
    stt_model: str = variable("STT_MODEL", "nova-3")
    # OpenAI model; it writes the brief too.
    llm_model: str = variable("LLM_MODEL", "gpt-4o")
    # ElevenLabs text-to-speech model.
    tts_model: str = variable("TTS_MODEL", "eleven_multilingual_v2")
    # ElevenLabs output encoding.
    tts_encoding: str = variable("TTS_ENCODING", "pcm_44100")
    # ElevenLabs voice (unset: the plugin's default voice).
    tts_voice_id: str = variable("TTS_VOICE_ID", "")
    # The providers' addresses (unset: each provider's default), shown by origin only, as the
    # webhook: a gateway may carry a token in the path or query. Deepgram's streaming
    # endpoint, e.g. https://api.eu.deepgram.com/v1/listen; wss:// and ws:// too, since the
    # plugin turns http(s) into ws(s) for streaming and back for a single request
    # (livekit-plugins-deepgram _utils.py, _to_deepgram_url).
    deepgram_base_url: Annotated[str, BY_ORIGIN, AfterValidator(matching(
        re.compile(r"\A(wss?|https?)://[^\s/?#]+\S*\Z"),
        "must be a wss://, ws://, https:// or http:// URL, without spaces"))
    ] = variable("DEEPGRAM_BASE_URL", "")  # fmt: skip
    # An OpenAI-compatible API root, e.g. https://gateway.example.com/v1. Passed to the plugin
    # always (build_models), so the SDK never reads OPENAI_BASE_URL from the environment again.
    openai_base_url: Annotated[str, BY_ORIGIN, HTTP_BASE_URL] = variable("OPENAI_BASE_URL", "")
    # ElevenLabs' API root, e.g. https://api.eu.residency.elevenlabs.io/v1. http(s) only: the
    # plugin sends its HTTP synthesis there as given and derives the websocket's wss/ws itself
    # (livekit-plugins-elevenlabs tts.py, _synthesize_url and _multi_stream_url). Kept without
    # its trailing "/": the plugin appends "/text-to-speech/...".
    eleven_base_url: Annotated[
        str, BY_ORIGIN, HTTP_BASE_URL, AfterValidator(lambda url: url.rstrip("/"))
    ] = variable("ELEVEN_BASE_URL", "")
    #
    # Records. Where outcome records and callback requests are POSTed.
    webhook_url: Annotated[str, Shown(lambda url, _: url_origin(url)), AfterValidator(matching(
        re.compile(r"https?://[^\s/]+"), "must be an http:// or https:// URL"))
    ] = variable("HANDOFF_WEBHOOK_URL", "")  # fmt: skip
    # The key that signs each POST (HMAC-SHA256), 16 characters or more.
    webhook_secret: SecretStr = variable("HANDOFF_WEBHOOK_SECRET", SecretStr(""))
    # Callback requests are appended here first; with a webhook, the outbox sits beside it.
    callback_file: Annotated[str, Shown()] = variable(
        "HANDOFF_CALLBACK_FILE", "callback_requests.jsonl"
    )
    # X-Handoff-* headers on the human's INVITE; off for trunks that reject them.
    sip_headers: bool = variable("HANDOFF_SIP_HEADERS", True)
    # A folder for the fixed sentences once synthesised; off: every sentence live.
    phrase_cache: Annotated[str, Shown(unset="off"), BeforeValidator(
        lambda folder: "" if str(folder).lower() in OFF else folder)
    ] = variable("HANDOFF_PHRASE_CACHE", DEFAULT_PHRASE_CACHE)  # fmt: skip
    #
    # Console only: what the human does on the simulated line.
    simulated_human: Annotated[SimulatedHuman, BeforeValidator(_choice)] = variable(
        "SIMULATED_HUMAN", SimulatedHuman.ANSWER
    )

    @field_validator("destinations", mode="wrap")
    @classmethod
    def _destinations(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        if isinstance(value, str):  # HANDOFF_DESTINATIONS' text
            return destinations_from_json(value, info.context)
        return handler(value)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def shown_by_check(self) -> list[tuple[str, str]]:
        """The configuration as ``check`` prints it: each variable with a ``Shown`` (a secret
        only as set or not), the models, then each destination with its number masked."""
        rows = [(v.name, shown) for v in VARIABLES if (shown := v.shown_in(self)) is not None]
        rows.append(("models", f"{self.stt_model} / {self.llm_model} / {self.tts_model}"))
        for d in self.destinations:
            rows.append(
                (
                    f"destination {d.name}",
                    f"{mask_number(d.target)} - {d.description}"
                    + (f" (then {d.fallback})" if d.fallback else "")
                    + (f"; open {d.hours.spec}" if d.hours else ""),
                )
            )
        return rows

    @property
    def mode_in_force(self) -> HandoffMode:
        """The mode calls are handed off in (``handoff_mode`` is the one configured): ``auto``
        is consult, since the brief is private on every LiveKit (moved on Cloud, bridged
        elsewhere: ``join_way``)."""
        if self.handoff_mode is not HandoffMode.AUTO:
            return self.handoff_mode
        return HandoffMode.CONSULT

    @property
    def join_way(self) -> JoinWay:
        """How the human is joined to the caller, as far as the URL tells: LiveKit Cloud moves
        them (MoveParticipant); self-hosted LiveKit has no MoveParticipant (its RoomManager
        answers "not implemented", livekit/livekit pkg/service/roommanager.go), so the worker
        bridges. A server that refuses a move anyway is remembered (``MoveRefusals``)."""
        return JoinWay.MOVE if on_livekit_cloud(self.livekit_url) else JoinWay.BRIDGE


@dataclass(frozen=True)
class Variable:
    """One environment variable, as its ``Settings`` field declares it: what ``check``, the
    refusal to start without the needed ones, and docs/configuration.md's table (its test)
    read."""

    name: str
    aliases: tuple[str, ...]  # other names, read when this one is unset
    setting: str  # the Settings field
    default: Any
    needed: bool  # NEEDED_TO_START
    secret: bool  # a SecretStr, shown only as set or not
    bounds: Allowed | None
    shown: Shown | None

    @classmethod
    def of(cls, setting: str, field: FieldInfo) -> Variable:
        alias = field.validation_alias
        name, *aliases = alias.choices if isinstance(alias, AliasChoices) else [alias]
        marked = {type(m): m for m in field.metadata}
        secret, needed = field.annotation is SecretStr, NEEDED_TO_START in field.metadata
        return cls(str(name), tuple(map(str, aliases)), setting, field.default, needed, secret,
                   marked.get(Allowed), marked.get(Shown))  # fmt: skip

    @property
    def called(self) -> str:
        """Its name with its aliases: "SIP_TRUNK_ID (or LIVEKIT_SIP_OUTBOUND_TRUNK)"."""
        return f"{self.name} (or {' or '.join(self.aliases)})" if self.aliases else self.name

    def shown_in(self, settings: Settings) -> str | None:
        value = getattr(settings, self.setting)
        if self.secret:
            return "(set)" if value.get_secret_value() else "(not set)"
        if self.shown is None:
            return None
        return self.shown.text(value, settings) if value else self.shown.unset


VARIABLES = tuple(Variable.of(setting, field) for setting, field in Settings.model_fields.items())
VARIABLE = {name: v for v in VARIABLES for name in (v.name, *v.aliases)}


# -- reading the environment: every problem named at once ------------------------------------------


class ConfigError(Exception):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class EnvironmentVariables(EnvSettingsSource):
    """The texts ``Settings`` reads from a mapping of environment variables (``os.environ``
    unless another is given), by field: a variable's by its name or, when that is unset, an
    alias. Texts are stripped, and a blank one is unset: its field takes the default."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        super().__init__(Settings, case_sensitive=True)  # type: ignore[arg-type]

    def _load_env_vars(self) -> Mapping[str, str | None]:  # where it would read os.environ
        return {name: text.strip() for name, text in self.env.items() if text.strip()}


def load_settings(env: Mapping[str, str] | None = None, *, telephony: bool = True) -> Settings:
    """Read and validate the configuration from ``env`` (``os.environ`` unless given).
    ``telephony=False`` (console) does not require LiveKit credentials or a trunk. Raises
    ``ConfigError`` naming every bad value; secret values never appear in it."""
    texts = EnvironmentVariables(env)()
    problems: list[str] = []
    bad: set[str] = set()
    try:
        settings = Settings.model_validate(texts, context=FROM_THE_ENVIRONMENT)
    except ValidationError as e:
        problems = problems_in(e)
        bad = {VARIABLE[str(error["loc"][0])].name for error in e.errors()}
        good = {name: text for name, text in texts.items() if name not in bad}
        settings = Settings.model_validate(good, context=FROM_THE_ENVIRONMENT)
    between = _problems_between_values(settings)  # of the good values, over the defaults
    if telephony:
        between += _telephony_problems(settings, texts)
    problems += [p for p in between if p.split(" ", 1)[0] not in bad]  # a bad value named once
    if problems:
        raise ConfigError(problems)
    return settings


def problems_in(error: ValidationError) -> list[str]:
    """Pydantic's problems with the configuration in the operator's words, each where it is:
    "HANDOFF_MODE must be one of ...", "HANDOFF_DESTINATIONS['support'].hours.tz ...". A value
    is repeated only where a validator chose to, never a secret's."""
    errors = error.errors(include_url=False)
    unknown: dict[tuple[str | int, ...], list[str]] = {}  # an object -> its unknown keys
    for e in errors:
        if e["type"] in UNKNOWN_KEY:
            unknown.setdefault(e["loc"][:-1], []).append(str(e["loc"][-1]))
    problems = []
    for e in errors:
        loc, kind, given = e["loc"], e["type"], e.get("input")
        for depth in range(1, len(loc)):  # an object's unknown keys first, named together
            if (keys := unknown.pop(loc[:depth], None)) is not None:
                says = f"has unknown keys: {', '.join(sorted(keys))}"
                problems.append(_located(loc[:depth], says))
        row, nested = VARIABLE[str(loc[0])], len(loc) > 1
        low, high = RING_SECONDS if nested or row.bounds is None else astuple(row.bounds)
        if kind in UNKNOWN_KEY:
            continue
        elif kind == "problem":
            says = e["msg"]
        elif kind == "missing":
            says = "is required"
        elif kind == "string_type":
            says = f"must be text (got {json.dumps(given)[:20]})"
        elif kind in ("dataclass_type", "model_type", "dict_type"):
            says = "must be an object"
        elif kind == "enum":
            choices = ", ".join(c.value for c in type(row.default))
            says = f"must be one of {choices} (got {given!r})"
        elif kind == "bool_parsing":
            says = f"must be on or off (got {given!r})"
        elif kind == "out_of_bounds" or kind.startswith(("int_", "float_", "finite_")):
            if nested:  # a destination's ring_timeout
                says = f"must be a number of seconds, {low:g} to {high:g}"
            elif type(row.default) is int:
                says = f"must be a whole number from {low:g} to {high:g} (got {given!r})"
            elif kind == "out_of_bounds":
                says = f"must be between {low:g} and {high:g} seconds"
            else:
                says = f"must be a number of seconds (got {given!r})"
        else:
            says = e["msg"]  # pydantic's own words, which never repeat the value
        problems.append(_located(loc, says))
    return problems


UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _located(loc: tuple[str | int, ...], says: str) -> str:
    """A problem where it is, as the operator wrote it: the variable's name, then within
    HANDOFF_DESTINATIONS the destination by its key and the keys inside it (list positions
    left out): "HANDOFF_DESTINATIONS['support'].hours.tz must be ..."."""
    name, *inside = loc
    where = VARIABLE[str(name)].name
    if inside:
        team, *keys = inside
        keys = [key for key in keys if isinstance(key, str) and key != "name"]  # name: its key
        where += f"[{team!r}]" + "".join(f".{key}" for key in keys)
    return f"{where}{'' if says.startswith((':', '[')) else ' '}{says}"


def _problems_between_values(settings: Settings) -> list[str]:
    """What no variable's text shows alone: values that need each other, and what is on this
    host where the phrase cache goes (its default included)."""
    problems = []
    if settings.webhook_url and len(settings.webhook_secret.get_secret_value()) < 16:
        problems.append(
            "HANDOFF_WEBHOOK_SECRET must be set, at least 16 characters, with a webhook"
        )
    if E164.fullmatch(settings.trunk_number) and settings.caller_id != CALLER_ID_FROM_CALLER:
        problems.append(
            "HANDOFF_TRUNK_NUMBER is used only with HANDOFF_CALLER_ID=caller "
            "(otherwise put the trunk's number in HANDOFF_CALLER_ID)"
        )
    folder = settings.phrase_cache
    if os.path.exists(folder) and not os.path.isdir(folder):
        problems.append("HANDOFF_PHRASE_CACHE must name a folder, or be off")
    return problems


def _telephony_problems(settings: Settings, texts: Mapping[str, str]) -> list[str]:
    """What start, dev and connect need and console does not: the required variables, someone
    to hand calls to, and an outbound trunk."""
    problems = [f"{v.called} is not set" for v in VARIABLES if v.needed and v.name not in texts]
    if "HANDOFF_DESTINATIONS" not in texts and settings.allow_dial_pattern is None:
        problems.append("HANDOFF_DESTINATIONS is empty: configure at least one destination")
    if settings.sip_trunk_id and not settings.sip_trunk_id.startswith("ST_"):
        problems.append("SIP_TRUNK_ID must be an outbound trunk id (ST_...)")
    return problems + _sip_uri_caller_id_problems(settings)


def _sip_uri_caller_id_problems(settings: Settings) -> list[str]:
    """A ``sip:`` destination is dialled through an inline trunk (``dial_target``), which has
    no numbers: sent no ``sip_number``, LiveKit refuses every call to it ("no numbers on
    outbound trunk": livekit/protocol rpc/sip.go ``NewCreateSIPParticipantRequest``). So the
    worker needs a number to show for it at every dial: HANDOFF_CALLER_ID's, or with
    ``caller`` HANDOFF_TRUNK_NUMBER, shown when the caller's number is unknown or refused."""
    uris = [d.name for d in settings.destinations if SIP_URI.fullmatch(d.target)]
    if not uris:
        return []
    named = f"a sip: destination ({', '.join(uris)}) goes to its host directly, with no trunk"
    if not settings.caller_id:
        return [
            f"HANDOFF_CALLER_ID must be set: {named} number LiveKit could show instead, and "
            "LiveKit refuses the call without one"
        ]
    if settings.caller_id == CALLER_ID_FROM_CALLER and not settings.trunk_number:
        return [
            f"HANDOFF_TRUNK_NUMBER must be set with HANDOFF_CALLER_ID=caller: {named} number "
            "LiveKit could show when the caller's is unknown or refused, and LiveKit refuses "
            "the call without one"
        ]
    return []


def registered_agent_name(env: Mapping[str, str] | None = None) -> str:
    """The name the server registers: AGENT_NAME validated as ``load_settings`` validates it.
    A bad name registers the default; ``load_settings`` names the problem, so start, dev,
    connect and check refuse to run with it."""
    name = EnvironmentVariables(env)().get("AGENT_NAME", DEFAULT_AGENT_NAME)
    try:
        return Settings(agent_name=name).agent_name
    except ValidationError:
        return DEFAULT_AGENT_NAME


def missing_provider_keys(env: Mapping[str, str] | None = None) -> list[str]:
    """The model providers' keys that are not set (the plugins would fail on the first turn)."""
    env = os.environ if env is None else env
    return [
        " or ".join(names)
        for names in PROVIDER_KEYS.values()
        if not any(env.get(name, "").strip() for name in names)
    ]


# -- numbers and secrets: what may leave the call, masked or redacted ------------------------------


def mask_number(target: str) -> str:
    """Phone numbers and SIP users never reach a log line in full: +15105550123 -> +1510•••23."""
    if target.startswith("sip"):
        user, _, host = target.partition("@")
        return f"{user[:6]}•••@{host}"
    return f"{target[:5]}•••{target[-2:]}" if len(target) > 7 else "•••"


# Digits as a speech-to-text service or a model writes what a caller reads out: numerals, words
# ("four", "oh" for zero), "double four" and "triple oh", in groups joined by spaces, commas,
# dots, dashes, parentheses or a filler ("uh"): what joins them into one number is ``redact``'s.
DIGIT_WORDS = {
    "zero": "0", "oh": "0", "nought": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
}  # fmt: skip
_WORD = r"\b(?:" + "|".join(DIGIT_WORDS) + r")\b"
_DIGIT_TOKEN = rf"(?:[0-9]+|(?:double|triple)[ \t]+(?:[0-9](?![0-9])|{_WORD})|{_WORD})"
DIGIT_TOKEN = re.compile(_DIGIT_TOKEN, re.IGNORECASE)
_FILLER = r"\b(?:uh|um|erm?)\b"
_BETWEEN = rf"(?:(?:[ \t]*(?:[,.\-–()]|{_FILLER}))+[ \t]*|[ \t]+)"
_STARTS = "".join(sorted({w[0] for w in [*DIGIT_WORDS, "double", "triple"]}))
NUMBER_RUN = re.compile(  # the lookahead first: a quick skip past letters that start no number
    rf"(?=[0-9+(){_STARTS}])(?<![0-9])(?:\+[ \t]*)?(?:\([ \t]*)?{_DIGIT_TOKEN}"
    rf"(?:{_BETWEEN}{_DIGIT_TOKEN})*\)?",
    re.IGNORECASE,
)
NUMBER_LENGTH = 7  # the fewest digits masked: a local phone number
WHOLE_NUMERAL = 5  # the fewest digits of one numeral that is a number of its own ("123456")
BARE = (",", ".", "-", "–")  # between numerals with no space: a chain (``_written_as_a_number``)
_DOUBLED = str.maketrans("0123456789", "0246813579")  # each digit doubled, its digits summed


def _luhn_valid(digits: str) -> bool:
    backwards = digits[::-1]
    doubled = backwards[1::2].translate(_DOUBLED)
    return (sum(map(int, backwards[0::2])) + sum(map(int, doubled))) % 10 == 0


def _token_digits(token: str) -> str:
    """A token's digits: "4242" -> "4242", "oh" -> "0", "double four" -> "44"."""
    word = token.lower()
    if word[0].isdigit():
        return word
    times = {"double": 2, "triple": 3}.get(word.split()[0], 1)
    last = word.split()[-1]
    return DIGIT_WORDS.get(last, last) * times


CARD_LENGTHS = (16, 15, 19, 18, 17, 14, 13)  # the commonest first: "... 4242, 123" is a card


# of 16 and its code, not one of 19
def _card_spans(digits: list[str], cuts: set[int]) -> list[tuple[int, int]]:
    """The cards in a run of tokens: 13 to 19 digits that pass the Luhn check, leftmost first,
    each from cut to cut (``cuts``: token indexes a card may start or end at). A card never
    starts with 0, so a leading "oh" is not part of one."""
    spans: list[tuple[int, int]] = []
    starts = set(cuts)
    for start in range(len(digits)):
        if start not in starts or (spans and start < spans[-1][1]):
            continue
        if digits[start][0] == "0":
            starts.add(start + 1)
            continue
        found: dict[int, int] = {}  # length -> end
        count = 0
        for end in range(start + 1, len(digits) + 1):
            count += len(digits[end - 1])
            if count > 19:
                break
            if count >= 13 and end in cuts and _luhn_valid("".join(digits[start:end])):
                found[count] = end
        if found:
            spans.append((start, found[min(found, key=CARD_LENGTHS.index)]))
    return spans


def _is_date(groups: list[str], marks: set[str]) -> bool:
    """2024-03-01, 1.3.2024: a year from 1900 to 2099 first or last, one mark between."""
    if len(groups) != 3 or len(marks) != 1 or marks == {","}:
        return False
    if len(groups[0]) == 4:
        groups = groups[::-1]
    day_month, year = [int(g) for g in groups[:2] if len(g) <= 2], groups[2]
    return (
        len(day_month) == 2
        and len(year) == 4
        and year[:2] in ("19", "20")
        and all(1 <= n <= 31 for n in day_month)
        and min(day_month) <= 12
    )


def _written_as_a_number(chain: str) -> bool:
    """Whether numerals joined by single commas, dots or dashes with no space around them are
    one number as a phone or card number is written. Dashes are ("510-555-0142", "5-1-0"),
    unless a date. Commas and dots are only in groups as a phone number's: three or more of
    2 to 4 digits (the first may be 1: a country code), or 3 then 4 ("510.555.0142",
    "01.23.45.67.89", "555.0142"); not an amount ("1,234,567.50", "3.5"), a time ("9.30-17.30"),
    a version ("1.2.3.4.5.6.7", "10.0.19045"), an IPv4 address ("192.168.100.200") or a date."""
    groups, marks = re.split(r"[^0-9]", chain), set(re.findall(r"[^0-9]", chain))
    if _is_date(groups, marks):
        return False
    if marks <= {"-", "–"}:
        return True
    if marks & {"-", "–"}:
        parts = re.split("[-–]", chain)
        return all(part.isdigit() or _written_as_a_number(part) for part in parts)
    sizes = [len(g) for g in groups]
    ipv4 = marks == {"."} and len(groups) == 4 and all(int(g) <= 255 for g in groups)
    amount = re.fullmatch(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", chain) is not None
    phone = sizes == [3, 4] or (
        len(sizes) >= 3 and 1 <= sizes[0] <= 4 and all(2 <= n <= 4 for n in sizes[1:])
    )
    return phone and not ipv4 and not amount


def _numbers(run: str, tokens: list[re.Match[str]]) -> list[tuple[int, int]]:
    """Where ``tokens`` (of ``run``) are one number, as token index ranges (``redact``): not
    across a chain of numerals that is written as something else, nor across a pause (a
    comma, a dot, a filler) after or before a whole number: one numeral of ``WHOLE_NUMERAL``
    digits or more ("order 123456, 3 items"), or a phone number's digits in all ("+1 510 555
    0142, 2 people")."""
    breaks: set[int] = set()  # i: tokens i-1 and i are not in one number
    numeral = [t.group(0).isdigit() for t in tokens]
    gaps = [""] + [run[a.end() : b.start()] for a, b in itertools.pairwise(tokens)]
    pauses = [0] + [
        i
        for i in range(1, len(tokens))
        if gaps[i] not in BARE and re.search(rf"[,.]|{_FILLER}", gaps[i], re.IGNORECASE)
    ]
    ends = [*pauses[1:], len(tokens)]  # the groups between pauses: pauses[k] to ends[k]
    for k in range(1, len(pauses)):
        for group in (range(pauses[k - 1], pauses[k]), range(pauses[k], ends[k])):
            count = sum(len(_token_digits(tokens[t].group(0))) for t in group)
            one_numeral = len(group) == 1 and numeral[group[0]]
            if count >= NUMBER_LENGTH or (one_numeral and count >= WHOLE_NUMERAL):
                breaks.add(pauses[k])
    i = 0
    while i < len(tokens):
        j = i  # the chain: numerals joined by one comma, dot or dash and no space
        while j + 1 < len(tokens) and numeral[j] and numeral[j + 1] and gaps[j + 1] in BARE:
            j += 1
        if j > i and not _written_as_a_number(run[tokens[i].start() : tokens[j].end()]):
            breaks |= set(range(i, j + 2))  # nothing joins it, inside or to either side
        i = j + 1
    starts = [0] + [b for b in sorted(breaks) if 0 < b < len(tokens)]
    return list(zip(starts, [*starts[1:], len(tokens)], strict=True))


def _card_spans_in(
    run: str, tokens: list[re.Match[str]], digits: list[str]
) -> list[tuple[int, int]]:
    """The cards among a run's tokens (``_card_spans``). A card may start or end between
    groups ("4242 4242", "four two, four two"), but not inside a string of single digits read
    one by one: its parts would pass the Luhn check by chance, one time in ten each."""
    if sum(map(len, digits)) < 13:
        return []
    single = [len(digits[k]) == 1 or not t.group(0)[0].isdigit() for k, t in enumerate(tokens)]
    cuts = {0, len(tokens)} | {
        i
        for i in range(1, len(tokens))
        if not (single[i - 1] and single[i]) or run[tokens[i - 1].end() : tokens[i].start()].strip()
    }
    return _card_spans(digits, cuts)


def _masked(run: str, tokens: list[re.Match[str]], digits: str) -> tuple[int, int, str]:
    """A number's place in ``run`` (with a "+" or "(" before it and the ")" that closes one)
    and its mask, as ``mask_number`` shows a phone number."""
    start, end = tokens[0].start(), tokens[-1].end()
    lead = re.search(r"(?:\+[ \t]*)?(?:\([ \t]*)?\Z", run[:start])
    start = lead.start() if lead else start
    if run.count("(", start, end) > run.count(")", start, end):
        close = re.match(r"[ \t]*\)", run[end:])
        end += close.end() if close else 0
    return start, end, mask_number(("+" if run[start] == "+" else "") + digits)


def redact(text: str) -> str:
    """Applied to every text that leaves the call (logs, records, attributes, headers, and
    the brief the human hears).

    A number is digits in groups, written or spoken ("510", "five one oh", "double five",
    "triple oh"), joined by spaces, dashes, parentheses, a comma or a dot, or a filler ("uh",
    "um"): "5 1 0, 5 5 5, 0 1 4 2", "(510) 555-0142", "five one oh. five five five",
    "510.555.0142" are each one number. A card in a run of digits, 13 to 19 that pass the Luhn
    check, becomes "a card ending 4242"; any other number of 7 or more digits is masked like
    ``mask_number``.

    Left as they are: numbers of fewer than 7 digits ("2 people", "at 3 pm", "room 101",
    "2024"); times, since a colon joins nothing ("10:30"); numerals joined by a comma, dot or
    dash with no space that are written as something else: a date, an amount, a time, a
    version, an IPv4 address ("2024-03-01", "1,234,567.50", "9.30-17.30", "1.2.3.4.5.6.7",
    "192.168.100.200": ``_written_as_a_number``); and what follows a pause after a whole
    number ("order 123456, 3 items", "+1 510 555 0142, 2 people": ``_numbers``). Short
    numbers listed with commas ("rooms 101, 102, 103") are one number once they reach 7
    digits: nothing tells them from a phone number read in groups. Numbers said as amounts
    ("four thousand") are not digits."""

    def replace_run(m: re.Match[str]) -> str:
        run = m.group(0)
        tokens = list(DIGIT_TOKEN.finditer(run))
        digits = [_token_digits(t.group(0)) for t in tokens]
        replaced: list[tuple[int, int, str]] = []  # (start, end, what is said instead)
        done = 0
        for start, end in [*_card_spans_in(run, tokens, digits), (len(tokens), len(tokens))]:
            for first, last in _numbers(run, tokens[done:start]):
                number = "".join(digits[done + first : done + last])
                if len(number) >= NUMBER_LENGTH:
                    replaced.append(_masked(run, tokens[done + first : done + last], number))
            if start < end:
                card = f"a card ending {''.join(digits[start:end])[-4:]}"
                replaced.append((tokens[start].start(), tokens[end - 1].end(), card))
            done = end
        out, at = [], 0
        for start, end, instead in replaced:
            out += [run[at:start], instead]
            at = end
        return "".join(out) + run[at:]

    return NUMBER_RUN.sub(replace_run, text)


def capped(text: str, limit: int = 100, *, sentence: bool = True) -> str:
    """Model-written text kept short: one line, its first sentence (unless ``sentence`` is
    False), at most ``limit`` characters cut at a word, without the closing full stop (it is
    read inside a sentence)."""
    flat = " ".join(str(text).split())
    first = re.split(r"(?<=[.!?])\s", flat, maxsplit=1)[0] if sentence else flat
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] if " " in first[:limit] else first[:limit]
    return first.rstrip(" .!?,;:")


def url_origin(url: str) -> str:
    """scheme://host[:port] of a URL, for printing: tokens live in its path and query."""
    m = re.match(r"\A([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^@/?#]*@)?([^/?#]*)", url)
    if not m:
        return "(set)" if url else ""
    rest = url[m.end() :]
    return m.group(1) + m.group(2) + ("/…" if rest.strip("/") else "")


def dial_allowed(pattern: re.Pattern[str] | regex.Pattern[str], number: str) -> bool:
    """Whether ``number`` fully matches HANDOFF_ALLOW_DIAL_PATTERN. The match is bounded in
    time, so a pattern that backtracks catastrophically refuses instead of blocking the
    event loop."""
    if isinstance(pattern, re.Pattern):  # a Settings built in code with re.compile
        pattern = regex.compile(pattern.pattern, pattern.flags & ~re.UNICODE)
    try:
        return pattern.fullmatch(number, timeout=DIAL_PATTERN_TIMEOUT) is not None
    except TimeoutError:
        logger.error(
            "HANDOFF_ALLOW_DIAL_PATTERN took over %gs on %s: refused",
            DIAL_PATTERN_TIMEOUT,
            mask_number(number),
        )
        return False


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 3. Records: how each attempt and each call ended, delivered so that nothing is lost
# ──────────────────────────────────────────────────────────────────────────────────────────────


class HandoffOutcome(str, Enum):
    CONNECTED = "connected"
    DECLINED = "declined"
    NO_ANSWER = "no_answer"
    BUSY = "busy"
    VOICEMAIL = "voicemail"
    UNREACHABLE = "unreachable"
    CALLER_LEFT = "caller_left"
    CANCELLED_BY_CALLER = "cancelled_by_caller"
    CLOSED = "closed"  # outside the destination's opening hours: never dialled
    REJOINED = "rejoined"  # connected, but the human left within HANDOFF_REJOIN_WINDOW
    FAILED = "failed"


class Phase(str, Enum):
    """How far an attempt has got. The agent's ``handoff.state`` attribute shows it live and
    the record keeps the last one."""

    ANNOUNCING = "announcing"  # the caller hears "please hold"; the human's phone already rings
    RINGING = "ringing"  # the caller is on hold
    BRIEFING = "briefing"  # someone answered: screened, briefed and asked, in private (consult)
    MERGING = "merging"  # the human is on the way into the caller's room
    MERGED = "merged"  # caller and human talk; the agent steps out


ON_HOLD = (Phase.RINGING, Phase.BRIEFING)
BEFORE_MERGE = (Phase.ANNOUNCING, *ON_HOLD)  # the attempt may still be stopped; the caller waits


@dataclass
class HandoffResult:
    outcome: HandoffOutcome
    destination: str
    mode: HandoffMode
    sip_status: int | None = None
    detail: str = ""
    leg: Leg | None = None
    timings: dict[str, float] = field(default_factory=dict)
    attempt: str = ""
    reason: str = ""
    phase: Phase | None = Phase.ANNOUNCING  # how far it got; None: never dialled (closed)
    brief: str = ""
    amd: dict[str, Any] = field(default_factory=dict)  # who answered: category, reason, delay
    joined_by: JoinWay | None = None  # how the human was brought to the caller

    @property
    def connected(self) -> bool:
        return self.outcome is HandoffOutcome.CONNECTED


@dataclass
class CallbackRequest:
    """A promise that a person will call the caller back."""

    room: str
    caller_name: str
    number: str
    best_time: str
    reason: str
    summary: str
    source: str  # "caller": they asked for it; "abandoned": they hung up before it was confirmed
    created_at: float = field(default_factory=time.time)


# What a record's fields may hold: these are names and codes, never said by anyone; every
# other text field is redacted (and ``number``, the callback number, is masked in logs).
RECORD_CODES = frozenset(
    {"type", "id", "room", "job_id", "attempt", "destination", "mode", "joined_by", "outcome"}
    | {"phase"}
    | {"source", "number", "attempts", "destinations"}  # ids and names: never redacted
)
RECORD_TEXT_LIMIT = 2000  # characters of any one text field (a summary, a brief)

# livekit-agents 1.8.9 ends a job in this order (ipc/job_proc_lazy_main.py ``_shutdown_job``): the
# caller's session is closed (``CallerSession.aclose``; the framework waits up to 60 s for it,
# ``_SESSION_ACLOSE_TIMEOUT``), then the job reports ShuttingDown, leaves the room and runs the
# shutdown callbacks (``finish_call``) together. The worker's supervisor kills the process if it
# has not exited ``shutdown_process_timeout`` (ServerOptions, worker.py: 10 s) after ShuttingDown
# (ipc/supervised_proc.py, ``SupervisedProc.aclose``). Every bound at shutdown is derived from
# it: the call's own ending (``ShutdownClock``) and the records' sending (``finish_call``).
JOB_SHUTDOWN_TIMEOUT = 10.0
OUTBOX_RESEND_EVERY = 60.0  # the worker's main process sweeps the outbox this often
OUTBOX_RESEND_MAX_EVERY = 900.0  # backing off to this while the receiver keeps failing
OUTBOX_MIN_AGE = 30.0  # younger files are still the job's to send


def outbox_folder(callback_file: str) -> Path:
    """Records waiting for the webhook: ``outbox/`` beside the callback file."""
    return Path(callback_file).resolve().parent / "outbox"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RECORDS_DISK: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def records_disk() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that does this process's record I/O (append, fsync, rename, flock,
    unlink), in the order asked: a callback file before its outbox, a write before its send.
    Its own, not the loop's default executor (``asyncio.to_thread``): cancelling a task that
    waits for a write would cancel a write still queued there, and a shut-down loop takes no
    more. Here a loop that stops or closes stops no write, and the interpreter finishes every
    queued one before the process exits (``concurrent.futures`` joins its threads in
    ``threading._shutdown``, which a job process runs in ``multiprocessing``'s ``_bootstrap``)."""
    pid = os.getpid()  # a forked child inherits this dict, not the thread
    disk = _RECORDS_DISK.get(pid)
    if disk is None:
        disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="records-disk")
        _RECORDS_DISK[pid] = disk
    return disk


_SUBMITTING = threading.local()  # this thread is inside the records' executor's ``submit``


def on_records_disk(work: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """Queue ``work`` on the records' thread now, when called, not when awaited.

    ``ThreadPoolExecutor.submit`` holds a lock that is not re-entrant while it may start a
    thread, and the garbage collector can run there: a coroutine it finalizes (an unreferenced
    task's ``finally`` that records the call) would ask for the lock again and hang the thread.
    Such a call is handed to a new thread, which queues it once the first ``submit`` is done."""
    if getattr(_SUBMITTING, "now", False):
        handed: concurrent.futures.Future[T] = concurrent.futures.Future()

        def hand_over() -> None:
            queued = on_records_disk(work, *args)
            queued.add_done_callback(partial(_copy_outcome, into=handed))

        threading.Thread(target=hand_over, name="records-hand-over").start()
        return handed
    _SUBMITTING.now = True
    try:
        return records_disk().submit(work, *args)
    except RuntimeError:  # the interpreter is exiting and starts no thread: do it here, now
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            done.set_result(work(*args))
        except Exception as e:
            done.set_exception(e)
        return done
    finally:
        _SUBMITTING.now = False


def _copy_outcome(
    done: concurrent.futures.Future[T], *, into: concurrent.futures.Future[T]
) -> None:
    if (error := done.exception()) is not None:
        into.set_exception(error)
    else:
        into.set_result(done.result())


async def landed(job: concurrent.futures.Future[T]) -> T:
    """Wait on the loop for a job on the records' thread; cancelling the wait never cancels
    the job."""
    return await asyncio.shield(asyncio.wrap_future(job))


def _release(lock: concurrent.futures.Future[int | None]) -> None:
    """Let go of an outbox lock taken for a sender that stopped waiting for it."""
    if not lock.cancelled() and lock.exception() is None and (fd := lock.result()) is not None:
        os.close(fd)


class Outbox:
    """One file per record not yet taken by the webhook: ``<id>.json``, written atomically
    (temporary file, fsync, rename, fsync the folder). Whoever sends a file holds an exclusive
    ``flock`` on it, so a job process and the worker's main process never send it at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, record_id: str, record: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(record, out, separators=(",", ":"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.folder / f"{record_id}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_folder(self.folder)

    def waiting(self, min_age: float = 0.0) -> list[Path]:
        """The records waiting, oldest first, skipping those younger than ``min_age``."""
        now = time.time()
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.folder.glob("*.json"):
                with contextlib.suppress(FileNotFoundError):
                    modified = path.stat().st_mtime
                    if now - modified >= min_age:
                        found.append((modified, path))
        return [path for _, path in sorted(found)]

    def lock(self, path: Path) -> int | None:
        """Take ``path`` for sending it: an open descriptor that holds its lock until closed,
        or None if it is gone or someone else holds it."""
        import fcntl

        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # sent and deleted by someone else between our open and our lock?
            mine = os.stat(path).st_ino == os.fstat(fd).st_ino
        except (BlockingIOError, FileNotFoundError):
            mine = False
        except BaseException:
            os.close(fd)
            raise
        if not mine:
            os.close(fd)  # releases the lock
            return None
        return fd

    def read(self, path: Path) -> dict[str, Any]:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return record

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_folder(self.folder)


class RecordDelivery:
    """Takes outcome records off the call's hands, durably, and delivers them.

    A callback request is first appended to ``HANDOFF_CALLBACK_FILE`` (JSON lines, flushed and
    fsynced): the file is the source of truth, the webhook a copy. With ``HANDOFF_WEBHOOK_URL``,
    every record is then written to the outbox (``Outbox``) and sent at once, at least once: a
    JSON POST signed with HMAC-SHA256 over ``"{timestamp}.{body}"`` (``X-Handoff-Timestamp``,
    ``X-Handoff-Signature: sha256=<hex>``, signed afresh on every attempt) with the record's id
    in ``X-Handoff-Record-Id`` so the receiver can de-duplicate, retried with exponential backoff
    on 5xx, 408, 429 and network errors. Its outbox file is deleted when the receiver answers
    2xx; what is left is sent again by the worker's main process (``keep_resending``) or by
    ``python warm_handoff.py resend-outbox``. ``submit`` never raises and never waits on the
    network or the disk: every file is written, locked and removed on the records' own thread
    (``records_disk``), so a slow disk never holds the call's event loop; each record that
    cannot be delivered now is logged once.
    """

    def __init__(
        self,
        url: str = "",
        secret: str = "",
        callback_file: str = "callback_requests.jsonl",
        *,
        queue_size: int = 256,
        attempts: int = 5,
        backoff: float = 0.5,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._secret = secret.encode()
        self.callback_file = callback_file
        self.outbox = Outbox(outbox_folder(callback_file))
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], concurrent.futures.Future[bool]]]
        self._queue = asyncio.Queue(queue_size)
        self._sender: asyncio.Task[None] | None = None
        self._last_write: concurrent.futures.Future[bool] | None = None
        self.loop = asyncio.get_running_loop()

    def sign(self, timestamp: str, body: bytes) -> str:
        digest = hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256)
        return "sha256=" + digest.hexdigest()

    def submit(self, record: dict[str, Any]) -> None:
        """Hand the record to the records' thread to be written (``_store``) and queue it to
        be sent once written; returns at once."""
        callback = record.get("type") == "callback_request"
        if not callback and not self.url:
            return  # the log line is the record
        record_id = str(record.get("id") or uuid.uuid4().hex)
        stored = self._last_write = on_records_disk(self._store, record_id, record, callback)
        if not self.url:
            return  # the log line and the callback file are the record
        try:
            self._queue.put_nowait((record_id, record, stored))
        except asyncio.QueueFull:
            logger.error(
                "record queue full: the %s record for room %s waits in %s for the worker",
                record.get("type"),
                record.get("room"),
                self.outbox.folder,
            )
            return
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    def _store(self, record_id: str, record: dict[str, Any], callback: bool) -> bool:
        """On the records' thread: a callback request to the callback file first, then the
        record to the outbox. True if the outbox has it; False: it is sent from memory."""
        if callback:
            self._save_callback(record)  # before anything else is tried
        if not self.url:
            return False
        try:
            self.outbox.put(record_id, record)
        except OSError as e:
            logger.error(
                "could not write a %s record for room %s to %s (%s): sending it from memory",
                record.get("type"),
                record.get("room"),
                self.outbox.folder,
                e.strerror or type(e).__name__,
            )
            return False
        return True

    async def written(self) -> None:
        """Wait until every record submitted so far is written (or its failure logged): the
        records' thread works in order, so the last write done means all are."""
        if self._last_write is not None:
            with contextlib.suppress(Exception):  # what failed was logged where it failed
                await landed(self._last_write)

    async def _settled(self) -> None:
        await self.written()
        await self._queue.join()

    async def drain(self, timeout: float = 10.0) -> None:
        """Write and send what was submitted, for at most ``timeout`` seconds (shutdown,
        tests). What is not sent by then stays in the outbox for the worker's main process;
        what is still being written, this process finishes before it exits (``records_disk``)."""
        try:
            await asyncio.wait_for(self._settled(), timeout)
            return
        except asyncio.TimeoutError:
            pass
        if self._queue.empty() and self._sender is None:
            logger.warning(
                "the disk did not take every record in %gs; this process finishes writing "
                "them before it exits",
                timeout,
            )
            return
        left = self._queue.qsize() + 1
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        logger.warning(
            "the webhook did not take %d record(s) in %gs; they wait in %s for the worker "
            "to resend",
            left,
            timeout,
            self.outbox.folder,
        )

    async def _send_all(self) -> None:
        """The sender: sends what is queued until nothing is, then closes its HTTP session; a
        record submitted while it closed is sent by it at once, in a new session. One sender
        at a time: two would each take an outbox file's lock on the one records thread, where
        a lock held by the other blocks every write after it (and the process's exit)."""
        while True:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not self._queue.empty():
                    record_id, record, stored = self._queue.get_nowait()
                    try:
                        if not await landed(stored):  # not written: send it from memory
                            await self._post(http, record, record_id)
                            continue
                        path = self.outbox.folder / f"{record_id}.json"
                        async with self._claimed(path) as mine:
                            if mine and await self._post(http, record, record_id):
                                await landed(on_records_disk(self.outbox.remove, path))
                    finally:
                        self._queue.task_done()
            if self._queue.empty():
                return

    @contextlib.asynccontextmanager
    async def _claimed(self, path: Path) -> AsyncIterator[bool]:
        """Hold ``path``'s lock while sending it: False if it is gone or someone else holds
        it. Taken and let go on the records' thread."""
        lock = on_records_disk(self.outbox.lock, path)
        try:
            fd = await landed(lock)
        except asyncio.CancelledError:
            lock.add_done_callback(_release)
            raise
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            on_records_disk(os.close, fd)  # releases the lock, after what was queued before

    async def resend(self, min_age: float = OUTBOX_MIN_AGE) -> tuple[int, int]:
        """Send every outbox record older than ``min_age`` once: (sent, still waiting)."""

        sent = failed = 0
        waiting = await landed(on_records_disk(self.outbox.waiting, min_age))
        if not waiting:
            return 0, 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            for path in waiting:
                async with self._claimed(path) as mine:
                    if not mine:
                        continue
                    try:
                        record = await landed(on_records_disk(self.outbox.read, path))
                    except (OSError, ValueError) as e:
                        logger.error("unreadable outbox record %s: %s", path.name, e)
                        failed += 1
                        continue
                    if await self._post(http, record, path.stem, attempts=1):
                        await landed(on_records_disk(self.outbox.remove, path))
                        sent += 1
                    else:
                        failed += 1
        return sent, failed

    async def _post(
        self,
        http: aiohttp.ClientSession,
        record: dict[str, Any],
        record_id: str,
        attempts: int | None = None,
    ) -> bool:
        body = json.dumps(record, separators=(",", ":")).encode()
        problem = ""
        attempts = attempts or self.attempts
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "X-Handoff-Timestamp": timestamp,
                "X-Handoff-Signature": self.sign(timestamp, body),
                "X-Handoff-Record-Id": record_id,
            }
            try:
                async with http.post(self.url, data=body, headers=headers) as response:
                    if response.status < 300:
                        return True
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        break  # the receiver refuses it; retrying won't help
            except Exception as e:
                problem = type(e).__name__
        logger.error(
            "webhook did not take a %s record for room %s after %d attempts (%s)",
            record.get("type"),
            record.get("room"),
            attempt + 1,
            problem,
        )
        return False

    def _save_callback(self, record: dict[str, Any]) -> None:
        """On the records' thread: append, flush, fsync. If that fails, the request goes to
        the log at error level with the number in full (the one unmasked number a log may
        hold), so an operator can still call back; its other texts are redacted as in
        records."""
        try:
            with open(self.callback_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            shown = {
                k: redact(v) if isinstance(v, str) and k not in RECORD_CODES else v
                for k, v in record.items()
            }
            logger.error(
                "could not save a callback request to %s (%s): call back %s; request %s",
                self.callback_file,
                e.strerror or type(e).__name__,
                record.get("number", ""),
                json.dumps(shown),
            )


async def keep_resending(delivery: RecordDelivery) -> None:
    """The worker's main process: send the outbox's leftovers at start, then every
    ``OUTBOX_RESEND_EVERY`` seconds, backing off while the receiver keeps failing."""
    every = OUTBOX_RESEND_EVERY
    while True:
        try:
            sent, failed = await delivery.resend(OUTBOX_MIN_AGE)
        except Exception as e:  # a sweep that breaks must not end the resender
            logger.error("outbox sweep failed: %r", e)
            sent, failed = 0, 1
        if sent:
            logger.info("resent %d record(s) from the outbox", sent)
        every = min(every * 2, OUTBOX_RESEND_MAX_EVERY) if failed else OUTBOX_RESEND_EVERY
        await asyncio.sleep(every)


_DELIVERIES: dict[tuple[str, str], RecordDelivery] = {}


def delivery_for(settings: Settings) -> RecordDelivery:
    """One delivery queue per worker process (and event loop), shared by its calls."""
    key = (settings.webhook_url, settings.callback_file)
    delivery = _DELIVERIES.get(key)
    if delivery is None or delivery.loop is not asyncio.get_running_loop():
        delivery = RecordDelivery(
            settings.webhook_url, settings.webhook_secret.get_secret_value(), settings.callback_file
        )
        _DELIVERIES[key] = delivery
    return delivery


def _cleaned(record: dict[str, Any]) -> dict[str, Any]:
    """Every text a record carries out of the call, redacted and capped."""

    def clean(key: str, value: Any) -> Any:
        if isinstance(value, str) and key not in RECORD_CODES:
            return redact(value[:RECORD_TEXT_LIMIT])
        if isinstance(value, list):
            return [clean(key, v) for v in value]
        return value

    return {k: clean(k, v) for k, v in record.items()}


class CallRecords:
    """One call's outcome records: each handoff attempt, each callback request and the call
    itself, each with a unique ``id``, as one JSON log line (numbers masked, texts redacted)
    and through ``RecordDelivery``."""

    def __init__(self, room: str, job_id: str = "", delivery: RecordDelivery | None = None) -> None:
        self.room = room
        self.job_id = job_id
        self.delivery = delivery
        self.handoffs: list[HandoffResult] = []
        self.callbacks: list[CallbackRequest] = []
        self.started_at = time.time()
        self.ended = False

    def _emit(self, record: dict[str, Any]) -> None:
        record = _cleaned({"type": record["type"], "id": uuid.uuid4().hex, **record})
        logged = {**record}
        if logged.get("number"):
            logged["number"] = mask_number(logged["number"])
        logger.info("%s record %s", record["type"], json.dumps(logged))
        if self.delivery is not None:
            self.delivery.submit(record)

    def handoff(self, result: HandoffResult) -> None:
        """Record an attempt. An attempt recorded again (``connected``, then ``rejoined``)
        keeps one place in the list; its later record is its outcome."""
        earlier = [i for i, h in enumerate(self.handoffs) if h.attempt == result.attempt]
        if result.attempt and earlier:
            self.handoffs[earlier[0]] = result
        else:
            self.handoffs.append(result)
        start = result.timings.get("decision", 0.0)
        self._emit(
            {
                "type": "handoff",
                "room": self.room,
                "job_id": self.job_id,
                "attempt": result.attempt,
                "destination": result.destination,
                "mode": result.mode.value,
                "joined_by": result.joined_by.value if result.joined_by else "",
                "outcome": result.outcome.value,
                "sip_status": result.sip_status,
                "phase": result.phase.value if result.phase else None,
                "detail": result.detail,
                "decided_at": round(time.time() - (time.monotonic() - start), 3),
                "timings": {
                    k: round(v - start, 3) for k, v in result.timings.items() if k != "held"
                },
                "caller_hold_seconds": round(result.timings.get("held", 0.0), 3),
                "amd": result.amd,
            }
        )

    async def written(self) -> None:
        """Wait until what was recorded so far is on disk."""
        if self.delivery is not None:
            await self.delivery.written()

    def callback(self, request: CallbackRequest) -> None:
        self.callbacks.append(request)
        self._emit({"type": "callback_request", "job_id": self.job_id, **request.__dict__})

    def call_ended(self, outcome: str = "") -> None:
        """The call's own record: how it ended, once. ``outcome`` "completed": the agent hung
        up because the caller was done; by default, the last handoff's outcome."""
        if self.ended:
            return
        self.ended = True
        last = self.handoffs[-1] if self.handoffs else None
        self._emit(
            {
                "type": "call",
                "room": self.room,
                "job_id": self.job_id,
                "outcome": outcome or (last.outcome.value if last else "no_handoff"),
                "attempts": [h.attempt for h in self.handoffs],
                "destinations": [h.destination for h in self.handoffs],
                "callback_requests": len(self.callbacks),
                "duration_seconds": round(time.time() - self.started_at, 3),
            }
        )


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 4. The phone line: the one seam to everything that needs a media server
# ──────────────────────────────────────────────────────────────────────────────────────────────


# A SIP leg's ``sip.callStatus`` attribute (livekit/protocol livekit.AttrSIPCallStatus), as
# livekit-sip sets it on the participant it dials (livekit/sip pkg/sip/outbound.go; the words:
# participant.go ``CallStatus.Attribute``): "dialing" from the room join before the INVITE
# (connectToRoom), "ringing" at the first 18x (sipSignal), "automation" while the extension's
# keys are sent, "active" after them (dialSIP). "hangup" when a call ends cleanly (the phone's
# BYE, one of livekit-sip's own; on the caller's inbound leg too, inbound.go): ``close`` sets it
# first, then ends the SIP dialog and the media, and only then leaves the room, so the leg is
# gone from "hangup" on. A failed INVITE leaves the room with its status as it was ("dialing"
# or "ringing"): the error alone does not say whether the phone rang.
SIP_CALL_STATUS = "sip.callStatus"
RANG = frozenset({"ringing", "automation", "active"})  # the far end's phone rang (or answered)
HUNG_UP = "hangup"


@dataclass(frozen=True)
class Dial:
    """One outbound leg to a human."""

    room: str
    identity: str
    destination: Destination
    ring_timeout: float
    caller_id: str = ""
    name: str = "Human Agent"
    headers: Mapping[str, str] = field(default_factory=dict)  # SIP X-headers on the INVITE


@dataclass(frozen=True)
class Leg:
    """A human's answered phone leg, present in ``room`` as participant ``identity``."""

    identity: str
    room: str
    destination: Destination


class DialFailed(Exception):
    def __init__(self, outcome: HandoffOutcome, sip_status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.sip_status = sip_status
        self.detail = detail


class MoveRefused(Exception):
    """The human is not in the caller's room after a move: the server refused it (self-hosted
    LiveKit has no MoveParticipant: ``unsupported``) or it failed and they are still where
    they were. Either way they can still be bridged."""

    def __init__(self, detail: str, *, unsupported: bool = False) -> None:
        super().__init__(detail)
        self.unsupported = unsupported


class LegLost(Exception):
    """A leg is gone mid-way, the human's (they hung up, their connection dropped) or, with
    ``caller``, the caller's."""

    def __init__(self, detail: str, *, caller: bool = False) -> None:
        super().__init__(detail)
        self.caller = caller


@dataclass(frozen=True)
class Bounds:
    """How long a call waits on what it does not control, in seconds: production's by default.
    The line carries them (``PhoneLine.bounds``) and every part of the call reads them there,
    so a test passes shorter ones to its line and nothing else."""

    # Every server call made while cleaning up: a hanging DeleteRoom or RemoveParticipant must
    # never keep a caller waiting in silence.
    server_call: float = 4.0
    # A move; past this the worker finds out where the human actually is,
    move: float = 10.0
    # looking in both rooms this long: a moving participant leaves one before joining the other.
    locate: float = 3.0
    # While a dial has not rung, how often its status is asked of the server when the worker
    # is not in the dial's room (one GetParticipant each time; in the room it reads its own
    # view): a no-answer that never rang is "couldn't get through" (``classify_dial_error``).
    ring_check: float = 1.0
    # A clean-up's RemoveParticipant or DeleteRoom that failed (a 5xx through all of the
    # client's own tries, a dropped connection) is tried again this long. After a
    # failed or cancelled dial the identity is removed, retrying this long while the server
    # answers not_found too: livekit/sip joins the participant to the room just before the
    # INVITE (pkg/sip/outbound.go, newCall -> connectToRoom), so a remove sent earlier finds
    # nobody and the phone would still ring.
    remove_retry: float = 4.0
    # A yes or a key press after "Is this ...?" (``Screening``); silence past it is voicemail.
    confirm: float = 8.0
    # A closing session's wait for the last words of whoever it listened to (the framework's
    # ``session_close_transcript_timeout``): the consult room's and the caller's.
    last_words: float = 2.0
    # The framework's shutdown timeout (JOB_SHUTDOWN_TIMEOUT), which the call's ending at job
    # shutdown fits in (``ShutdownClock``): a move or a dial in flight is given up rather than
    # waited for, and a server call that hangs is sent again.
    shutdown: float = JOB_SHUTDOWN_TIMEOUT

    @property
    def clean_up(self) -> float:
        """A clean-up step's bound: a server call, tried again for ``remove_retry``."""
        return self.remove_retry + self.server_call


def dial_target(target: str, trunk_id: str) -> dict[str, Any]:
    """Where CreateSIPParticipant sends the INVITE. A number goes out through the outbound trunk.
    A ``sip:`` URI names its own host, and LiveKit refuses a full URI as ``sip_call_to``
    (livekit/protocol livekit/sip.go ``CreateSIPParticipantRequest.ValidateResult``: "SipCallTo
    should be a phone number or SIP user, not a full SIP URI"), so its user is dialled at its
    host through an inline trunk (``SIPOutboundConfig``; ``sips:`` over TLS)."""
    uri = SIP_URI.fullmatch(target)
    if uri is None:
        return {"sip_trunk_id": trunk_id, "sip_call_to": target}
    scheme, user, host = uri.groups()
    transport = "SIP_TRANSPORT_TLS" if scheme == "sips" else "SIP_TRANSPORT_AUTO"
    return {"trunk": api.SIPOutboundConfig(hostname=host, transport=transport), "sip_call_to": user}


def dial_request_timeout(dial: Dial) -> float:
    """How long the dial request may take. The client's default is the ring timeout + 2 s
    (livekit-api ``_dial_timeout.py``), but with ``wait_until_answered`` the server answers only
    after the extension's DTMF has been sent, 0.52 s a key on livekit-sip 1.8.0 (260 ms tone,
    260 ms gap, seen on the real stack; livekit/media-sdk ``dtmf.go``): a request cut short there
    would fail a call a person had answered."""
    return dial.ring_timeout + 0.52 * len(dial.destination.extension) + 5.0


def classify_dial_error(error: Exception, *, rang: bool = True) -> DialFailed:
    """Map what ``create_sip_participant`` raised to what the caller is told. ``rang``: whether
    the leg ever reached "ringing" (``LiveKitPhoneLine.dial`` watches its status). A ring
    timeout, a cancel or a timeout with no SIP status, a 408, 480 or 487 all say nobody
    answered; LiveKit gives the same error whether the phone rang or not (livekit/sip
    pkg/sip/errors.go classifyInviteError: a ring timeout is ErrSIPRequestTimeout either way).
    If it never rang, nobody could have picked up: the number could not be reached."""
    if isinstance(error, DialFailed):
        return error
    status = getattr(error, "sip_status_code", None)
    code = getattr(error, "code", "")
    no_answer = status in (408, 480, 487) or (
        status is None
        and (code in ("canceled", "deadline_exceeded") or isinstance(error, asyncio.TimeoutError))
    )
    if status in (486, 600):  # busy here, busy everywhere
        outcome = HandoffOutcome.BUSY
    elif no_answer:
        outcome = HandoffOutcome.NO_ANSWER if rang else HandoffOutcome.UNREACHABLE
    elif status in (603, 607):
        outcome = HandoffOutcome.DECLINED
    elif status is not None and (status in (403, 404, 410, 484, 485) or status >= 500):
        # 403 comes from the trunk or the carrier (a caller ID it will not present, a number
        # it may not dial), never from a person: nobody there refused, the number could not
        # be reached, and trying it again would meet the same wall.
        outcome = HandoffOutcome.UNREACHABLE
    else:
        outcome = HandoffOutcome.FAILED
    reason = getattr(error, "sip_status", None) or getattr(error, "message", "") or str(error)
    never_rang = " (it never rang)" if no_answer and not rang else ""
    return DialFailed(
        outcome, status, f"{status or code or type(error).__name__}: {reason}{never_rang}"
    )


def rms(frame: rtc.AudioFrame) -> float:
    """A frame's level: the RMS of its 16-bit samples."""
    samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


class HoldMusic:
    """The hold music a real line plays in the caller's room (``LiveKitPhoneLine``), on a
    track of its own (``start``, ``stop``), that pauses and resumes where it left off
    (``pause``), so the caller never hears the same opening bars again after every check-in.
    When it plays, and when it pauses, is the caller's hold's (``CallerHold``).

    It is one endless stream of frames, played once with ``OwnTrack.play``: playing the file
    again would start the clip from the beginning. The file is decoded once, with the
    framework's decoder, at the track's format (48 kHz mono), and replayed from memory when it
    ends. While paused it yields silence and keeps its place.

    A clip that fades in (the framework's own hold music takes about 1.7 s to rise above
    -40 dBFS) starts where it can be heard: on a phone the fade-in is silence right after
    "please hold" (seen on livekit-sip's RTP, tests/test_real_stack.py).
    """

    SAMPLE_RATE = 48000  # OwnTrack.SAMPLE_RATE, mono
    PAUSE_FRAME = 0.02  # seconds of silence per frame while paused
    LEAD_IN_RMS = 330.0  # int16 RMS (-40 dBFS): an opening frame quieter than this is skipped
    LEAD_IN_MAX = 3.0  # seconds: at most this much of a quiet opening is skipped
    VOLUME = 0.7

    def __init__(self, path: str) -> None:
        self.path = path
        self.paused = False
        self._track: OwnTrack | None = None  # once started
        self._playing: asyncio.Future[None] | None = None
        self._frames: list[rtc.AudioFrame] = []  # decoded so far, in order
        # the decoder while the file has not been read to its end
        self._decoding: AsyncGenerator[rtc.AudioFrame, None] | None = None
        self._started = False
        self._position = 0  # the index of the next frame to play
        self._silence = rtc.AudioFrame.create(
            self.SAMPLE_RATE, 1, int(self.SAMPLE_RATE * self.PAUSE_FRAME)
        )

    async def start(self, room: rtc.Room) -> None:
        """Play in ``room`` until ``stop``: once, so a pause keeps its place."""
        self._track = OwnTrack("hold-music")
        await self._track.publish(room)
        self._playing = asyncio.ensure_future(self._track.play(self, self.VOLUME))

    def pause(self, paused: bool) -> None:
        """What is queued would sound over the speech (music) or hold the music back
        (silence): it is cut. The music skips what was cut, at most the track's queue."""
        self.paused = paused
        if self._track is not None:
            self._track.cut()

    async def stop(self) -> None:
        """Off the room (a call may hold several times), the decoder closed."""
        if self._playing is not None:
            self._playing.cancel()
            await asyncio.gather(self._playing, return_exceptions=True)
        if self._track is not None:
            await self._track.aclose()
        await self.aclose()

    def __aiter__(self) -> HoldMusic:
        return self

    async def __anext__(self) -> rtc.AudioFrame:
        if self.paused:
            return self._silence
        if not self._started:
            self._started = True
            self._decoding = audio_frames_from_file(self.path, self.SAMPLE_RATE, 1)
        if self._position == len(self._frames) and self._decoding is not None:
            try:
                self._frames.append(await self._next_decoded())
            except StopAsyncIteration:
                self._decoding = None  # the whole file is in memory now
        if self._position == len(self._frames):
            if not self._frames:
                raise StopAsyncIteration  # an empty file: nothing to play
            self._position = 0  # the end of the clip: from the top
        frame = self._frames[self._position]
        self._position += 1
        return frame

    async def _next_decoded(self) -> rtc.AudioFrame:
        assert self._decoding is not None
        frame = await self._decoding.__anext__()
        skipped = 0.0
        while not self._frames and skipped < self.LEAD_IN_MAX and rms(frame) < self.LEAD_IN_RMS:
            skipped += frame.samples_per_channel / frame.sample_rate
            frame = await self._decoding.__anext__()
        return frame

    async def aclose(self) -> None:
        """Stop the decoder if the file was not read to its end (call once nothing reads)."""
        decoding, self._decoding = self._decoding, None
        if decoding is not None:
            with contextlib.suppress(RuntimeError):  # already closed by a cancelled read
                await decoding.aclose()


async def close_quietly(
    *closers: Callable[[], Awaitable[object]] | None, timeout: float | None = None
) -> None:
    """Call each of ``closers`` (None: nothing to close), whatever the others do, each for at
    most ``timeout`` s: a consult room on its way out must not keep its session or connection
    open because one step failed or hangs."""
    for close in closers:
        if close is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), timeout)


# What is played to the human outside the consult session: frames prepared while the phone
# rang, or synthesised as they play (an empty list: no voice at all, words only).
PhraseAudio: TypeAlias = "list[rtc.AudioFrame] | AsyncIterable[rtc.AudioFrame]"


async def frames_of(audio: PhraseAudio) -> AsyncGenerator[rtc.AudioFrame, None]:
    """A phrase's frames as they come, prepared or live; a live source is closed with it."""
    if isinstance(audio, list):
        for frame in audio:
            yield frame
        return
    try:
        async for frame in audio:
            yield frame
    finally:
        if isinstance(audio, AsyncGenerator):
            await audio.aclose()


async def for_the_track(audio: PhraseAudio) -> AsyncGenerator[rtc.AudioFrame, None]:
    """``audio`` as ``OwnTrack`` plays it: at its source's rate, mono; a live source's rate is
    known at its first frame."""
    resampler: rtc.AudioResampler | None = None
    async with contextlib.aclosing(frames_of(audio)) as frames:
        async for frame in frames:
            if resampler is None:
                resampler = rtc.AudioResampler(
                    frame.sample_rate, OwnTrack.SAMPLE_RATE, num_channels=1
                )
            for out in resampler.push(frame):
                yield out
    for out in resampler.flush() if resampler is not None else ():
        yield out


class OwnTrack:
    """An audio track of the worker's own in a room, for what is played outside a session:
    the opener to the human, hold music to the caller. ``play`` returns once the audio has
    been sent, not merely queued, and ``cut`` silences what is queued at once: the session
    speaks next, and must not start over its tail.

    The framework's ``BackgroundAudioPlayer`` does neither: its play handle is done when its
    mixer has read the last frame, and a paused or stopped sound goes on, while the mixer's
    blocks and its ``AudioSource``'s 400 ms queue (livekit-agents voice/background_audio.py,
    ``_AUDIO_SOURCE_BUFFER_MS``) still hold about 0.6 s of it. An ``AudioSource`` fed
    directly says when its queue has drained (``wait_for_playout``) and can drop it
    (``clear_queue``), with the queue of the session's own audio output (200 ms:
    voice/room_io/_output.py)."""

    SAMPLE_RATE = 48000

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = rtc.AudioSource(self.SAMPLE_RATE, 1, queue_size_ms=200)
        self._unpublish: Callable[[], Awaitable[None]] | None = None

    async def publish(self, room: rtc.Room) -> None:
        track = rtc.LocalAudioTrack.create_audio_track(self.name, self.source)
        published = await room.local_participant.publish_track(track, rtc.TrackPublishOptions())
        self._unpublish = partial(room.local_participant.unpublish_track, published.sid)

    async def play(self, audio: PhraseAudio, volume: float = 1.0) -> None:
        async for frame in for_the_track(audio):
            if volume != 1.0:
                samples = np.frombuffer(frame.data, dtype=np.int16) * volume
                frame = rtc.AudioFrame(
                    samples.astype(np.int16).tobytes(), frame.sample_rate, 1, len(samples)
                )
            await self.source.capture_frame(frame)
        await self.source.wait_for_playout()

    def cut(self) -> None:
        """Drop what is queued: what ``play`` is given next sounds at once."""
        self.source.clear_queue()

    async def aclose(self) -> None:
        """Off the room (a call may hold several times) and closed."""
        await close_quietly(self._unpublish, self.source.aclose)


class Relay:
    """One direction of a bridge: a participant's microphone in one room, replayed frame by
    frame as the worker's own track in another (livekit-sip mixes every audio track of a room
    into what its phone hears: shared/reference/livekit-real-stack.md). Nothing is mixed or
    resampled: 48 kHz mono in, the same frames out, through ``OwnTrack``'s 200 ms queue."""

    def __init__(self, speaker: rtc.RemoteParticipant, name: str) -> None:
        self.speaker = speaker
        self.track = OwnTrack(name)
        self._stream: rtc.AudioStream | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, into: rtc.Room) -> None:
        await self.track.publish(into)
        self._stream = rtc.AudioStream.from_participant(
            participant=self.speaker,
            track_source=rtc.TrackSource.SOURCE_MICROPHONE,  # livekit-sip's phone track
            sample_rate=OwnTrack.SAMPLE_RATE,
            num_channels=1,
        )
        self._task = asyncio.ensure_future(self._relay(self._stream))

    async def _relay(self, stream: rtc.AudioStream) -> None:
        async for event in stream:
            await self.track.source.capture_frame(event.frame)

    async def aclose(self) -> None:
        if self._task is not None:
            await utils.aio.cancel_and_wait(self._task)
        await close_quietly(self._stream.aclose if self._stream else None, self.track.aclose)


class MoveRefusals:
    """The LiveKit servers that refused a move as unsupported, remembered for the worker's
    life: every job runs in a process of its own (livekit-agents ``ipc/proc_pool.py``), so the
    memory is a marker file per server and worker (the job processes' parent, the worker's
    forkserver, lives as long as the worker), and later calls bridge at once."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.gettempdir()) / f"warm-handoff-{os.getuid()}-no-move"
        self.worker = os.getppid()

    def _marker(self, url: str) -> Path:
        key = hashlib.sha256(f"{self.worker} {url_origin(url)}".encode()).hexdigest()[:24]
        return self.folder / key

    def refused(self, url: str) -> bool:
        return self._marker(url).exists()

    def remember(self, url: str) -> None:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._marker(url).touch()
        except OSError as e:  # then every call learns it again: one refused request each
            logger.warning("could not remember that the server refuses moves: %r", e)


class PhoneLine(abc.ABC):
    """Everything the handoff needs that only a media server can do. The handoff logic talks
    to nothing else, so the same flow runs on LiveKit and on the simulated line."""

    caller_room: str
    caller_identity: str
    caller_number: str = ""  # the caller's own number, when the SIP trunk tells us
    bounds = Bounds()  # how long this call waits on what it does not control

    def __init__(self, bounds: Bounds | None = None) -> None:
        if bounds is not None:
            self.bounds = bounds

    @cached_property
    def _clean_ups(self) -> utils.aio.TaskSet:
        """The clean-up steps still running, on the loop of the call (a line may be made
        before it runs)."""
        return utils.aio.TaskSet(asyncio.get_running_loop())

    def clean_up_later(self, step: Awaitable[Any], what: str, bound: float | None = None) -> None:
        """Run a clean-up step in the background, bounded (by default, as one server call with
        its retries: ``Bounds.clean_up``), so the caller is spoken to before slow server calls
        finish. A failure is logged once."""

        async def bounded() -> None:
            try:
                await asyncio.wait_for(step, self.bounds.clean_up if bound is None else bound)
            except Exception as e:
                logger.warning(
                    "clean-up step '%s' failed in room %s: %r", what, self.caller_room, e
                )

        self._clean_ups.create_task(bounded())

    async def settle(self, timeout: float | None = None) -> None:
        """Wait for background clean-up (job shutdown, tests), including steps it starts; by
        default for as long as the longest step may take (closing a consult room: its session's
        last words, then deleting the room)."""
        if timeout is None:
            timeout = self.bounds.last_words + self.bounds.clean_up
        deadline = time.monotonic() + timeout
        while (steps := self._clean_ups.tasks) and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(steps, timeout=left)

    @abc.abstractmethod
    async def dial(self, dial: Dial) -> Leg:
        """Ring the human until answered; raise ``DialFailed`` with the outcome otherwise.
        Cancelling the awaiting task cancels the dial (the human's phone stops ringing)."""

    @abc.abstractmethod
    async def hang_up(self, leg: Leg) -> None:
        """End the human's leg. Idempotent; never raises."""

    @abc.abstractmethod
    async def move(self, leg: Leg, room: str) -> None:
        """Move the human's leg into ``room``; raise ``MoveRefused`` if the server won't."""

    @property
    @abc.abstractmethod
    def join_way(self) -> JoinWay:
        """How the next human is joined to the caller: by a move where the server has
        MoveParticipant, else by a bridge."""

    @abc.abstractmethod
    def move_unsupported(self) -> None:
        """The server refused a move as unsupported: later attempts bridge at once."""

    @abc.abstractmethod
    async def bridge(self, leg: Leg, room: str) -> None:
        """Join the human, staying in their consult room, to the people in ``room`` by
        relaying audio both ways until ``close_consult`` of the human's room; raise
        ``LegLost`` if either of them is gone."""

    @abc.abstractmethod
    async def delete_room(self, room: str) -> None:
        """Delete a room, ending every leg in it. Idempotent; never raises."""

    @abc.abstractmethod
    async def start_hold_music(self) -> None:
        """Hold music on in the caller's room."""

    @abc.abstractmethod
    def pause_hold_music(self, paused: bool) -> None:
        """Pause the hold music (speech is heard at once), or resume it where it was."""

    @abc.abstractmethod
    async def stop_hold_music(self) -> None:
        """Hold music off: what ``start_hold_music`` started."""

    @abc.abstractmethod
    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        """Start ``session`` in a private room where it will talk to ``human_identity``."""

    @abc.abstractmethod
    async def play_to_human(self, room: str, text: str, audio: PhraseAudio) -> None:
        """Play ``audio`` (saying ``text``: prepared, or synthesised as it plays) to the human
        in ``room``, outside the consult session, and return when it has played."""

    @abc.abstractmethod
    async def announce(self, room: str, text: str, audio: PhraseAudio) -> None:
        """Play ``audio`` (saying ``text``) to everyone in ``room`` on a track of its own,
        outside any session (after the merge the caller's has closed, or is parked, and a
        bridged human's consult session is gone), and return when it has played."""

    @abc.abstractmethod
    async def close_consult(self, room: str, *, keep_room: bool = False) -> None:
        """Stop the consult session and delete its room (with its bridge, if any); with
        ``keep_room``, stop only the session: a bridged human stays. Idempotent; never
        raises."""

    @abc.abstractmethod
    async def wait_for_hangup(self, room: str, identities: tuple[str, ...]) -> str:
        """Return the identity of the first of ``identities`` to leave ``room``, or to hang up
        (a SIP leg is gone from "hangup" on, before it leaves). If our own connection to
        ``room`` drops, they are all gone for us: return the first."""

    @abc.abstractmethod
    async def wait_for_arrival(self, room: str, identity: str, timeout: float) -> bool:
        """Whether ``identity`` is (or arrives within ``timeout``) in ``room``, and has not
        hung up."""

    @abc.abstractmethod
    def on_dtmf(self, room: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(digit)`` for each keypad press in ``room``."""

    @abc.abstractmethod
    async def set_attributes(self, room: str, attributes: Mapping[str, str]) -> None:
        """Set the agent participant's attributes in ``room`` (for dashboards and softphones).
        Never raises: a dashboard must not break a call."""


def on_the_line(room: rtc.Room, identity: str) -> bool:
    """Whether ``identity`` is in ``room`` (as our connection to it sees it) and still on the
    line: a SIP leg whose status is "hangup" has ended its call and is only on its way out."""
    participant = room.remote_participants.get(identity)
    return participant is not None and participant.attributes.get(SIP_CALL_STATUS) != HUNG_UP


def job_server_url(ctx: JobContext, fallback: str) -> str:
    """The LiveKit URL this job was assigned at, where the call's other rooms are joined too;
    ``fallback`` (``LIVEKIT_URL``) when the job has none (console and test jobs).

    livekit-agents 1.8.9 has no public accessor for it: it is only the private
    ``JobContext._info.url``, set to ``job_assign.url or ws_url`` (worker.py), and the
    framework's own warm transfer joins its consult room there (beta/workflows/
    warm_transfer.py: ``job_ctx._info.url``). tests/test_consult_url.py fails if it goes."""
    return getattr(getattr(ctx, "_info", None), "url", "") or fallback


class LiveKitPhoneLine(PhoneLine):
    """The phone line on a real LiveKit call, through the server API and the job's room."""

    def __init__(self, ctx: JobContext, settings: Settings, bounds: Bounds | None = None) -> None:
        super().__init__(bounds)
        self._ctx = ctx
        self._settings = settings
        self.caller_room = ctx.job.room.name
        self.caller_identity = ""
        self._rooms: dict[str, rtc.Room] = {self.caller_room: ctx.room}
        self._consults: dict[str, AgentSession] = {}
        self._tracks: dict[str, OwnTrack] = {}
        self._bridges: dict[str, list[Relay]] = {}  # by the human's (consult) room
        self._hold_music: HoldMusic | None = None  # while it plays in the caller's room
        self._refusals = MoveRefusals()

    @property
    def server_url(self) -> str:
        return job_server_url(self._ctx, self._settings.livekit_url)

    @property
    def move_refused(self) -> bool:
        """Whether this worker has seen this server refuse a move as unsupported."""
        return self._refusals.refused(self.server_url)

    @property
    def join_way(self) -> JoinWay:
        if self.move_refused:
            return JoinWay.BRIDGE
        return JoinWay.MOVE if on_livekit_cloud(self.server_url) else self._settings.join_way

    def move_unsupported(self) -> None:
        logger.warning(
            "LiveKit at %s has no MoveParticipant (refused in room %s): this worker bridges "
            "humans from now on",
            url_origin(self.server_url),
            self.caller_room,
        )
        self._refusals.remember(self.server_url)

    async def bridge(self, leg: Leg, room: str) -> None:
        """Two relays through the worker: the caller's voice into the human's room, the
        human's into the caller's. Self-hosted LiveKit cannot keep a brief private in one room:
        livekit-sip subscribes every SIP participant to every audio track (itself, again on
        each new track), and track permissions bind only what the worker publishes, not the
        two phones' own tracks (shared/reference/livekit-real-stack.md)."""
        caller_side, human_side = self._rooms.get(room), self._rooms.get(leg.room)
        caller = caller_side and caller_side.remote_participants.get(self.caller_identity)
        human = human_side and human_side.remote_participants.get(leg.identity)
        if not (caller_side and caller):
            raise LegLost("the caller left before the bridge", caller=True)
        if not (human_side and human):
            raise LegLost("the human left before the bridge")
        relays = [Relay(caller, "caller"), Relay(human, "human")]
        self._bridges[leg.room] = relays
        await asyncio.gather(relays[0].start(human_side), relays[1].start(caller_side))

    def _sip_without_retries(self) -> SipService:
        """CreateSIPParticipant with no hidden retry. On ``*.livekit.cloud`` the client retries
        transport errors, timeouts and 5xx up to 3 times (livekit-api ``twirp_client.py``,
        ``_failover.py``) and the server does not de-duplicate them: each retry is a new INVITE
        under the same identity, which replaces (hangs up) a human who had already answered. A
        lost answer is reconciled by looking the participant up instead (``dial``). Credentials
        come from the environment, as for ``JobContext.api``."""
        return api.LiveKitAPI(session=utils.http_context.http_session(), failover=False).sip

    async def dial(self, dial: Dial) -> Leg:
        request = api.CreateSIPParticipantRequest(
            **dial_target(dial.destination.target, self._settings.sip_trunk_id),
            sip_number=dial.caller_id,
            room_name=dial.room,
            participant_identity=dial.identity,
            participant_name=dial.name,
            krisp_enabled=True,
            dtmf=dial.destination.extension,
            headers=dict(dial.headers),
            wait_until_answered=True,
            play_dialtone=False,
        )
        request.ringing_timeout.FromNanoseconds(int(dial.ring_timeout * 1e9))
        leg = Leg(identity=dial.identity, room=dial.room, destination=dial.destination)
        rang = asyncio.Event()
        watching = asyncio.ensure_future(self._watch_ringing(dial, rang))
        try:
            await self._sip_without_retries().create_sip_participant(
                request, timeout=dial_request_timeout(dial)
            )
        except asyncio.CancelledError:
            # The caller no longer waits: make sure the human's phone stops ringing.
            self._stop_ringing(dial)
            raise
        except Exception as e:
            failed = classify_dial_error(e)
            if failed.sip_status is None and getattr(e, "code", "") != "canceled":
                # No final answer reached us (lost response, timeout, 5xx): the call may have
                # been answered all the same. A SIP status or a ring timeout is final: the
                # server has already ended the call (livekit/sip pkg/sip/outbound.go).
                status = await self._call_status(dial.room, dial.identity)
                if status == "active":
                    logger.info("dial reported %s, but the call is up", failed.detail)
                    return leg
                if status in RANG:
                    rang.set()
                self._stop_ringing(dial)
            raise classify_dial_error(e, rang=rang.is_set()) from e
        finally:
            watching.cancel()
        return leg

    async def _watch_ringing(self, dial: Dial, rang: asyncio.Event) -> None:
        """Set ``rang`` once the leg's status shows its phone rang. A failed INVITE leaves the
        room before the dial's answer comes back, so it is watched while it rings: in our own
        view of the dial's room when we are in it (the caller's room; a consult room once it
        is open), else asked of the server every ``Bounds.ring_check``."""
        while True:
            lk_room = self._rooms.get(dial.room)
            if lk_room is not None and lk_room.isconnected():
                seen = lk_room.remote_participants.get(dial.identity)
                status = seen.attributes.get(SIP_CALL_STATUS, "") if seen is not None else ""
                pause = 0.05  # a look at our own copy: no server call
            else:
                status = await self._call_status(dial.room, dial.identity)
                pause = self.bounds.ring_check
            if status in RANG:
                rang.set()
                return
            await asyncio.sleep(pause)

    def _stop_ringing(self, dial: Dial) -> None:
        remove = self._remove(dial.room, dial.identity)
        self.clean_up_later(self._retried(remove, until_found=True), "stop ringing")

    async def _call_status(self, room: str, identity: str) -> str:
        """The leg's ``sip.callStatus`` in ``room`` as the server has it (dialing, ringing,
        automation, active, hangup), or "" if it is not there (or the server did not say)."""
        try:
            info = await asyncio.wait_for(
                self._ctx.api.room.get_participant(
                    api.RoomParticipantIdentity(room=room, identity=identity)
                ),
                self.bounds.server_call,
            )
        except Exception:
            return ""
        return info.attributes.get(SIP_CALL_STATUS, "")

    def _remove(self, room: str, identity: str) -> Callable[[], Awaitable[object]]:
        request = api.RoomParticipantIdentity(room=room, identity=identity)
        return lambda: self._ctx.api.room.remove_participant(request)

    async def _retried(
        self, server_call: Callable[[], Awaitable[object]], *, until_found: bool = False
    ) -> None:
        """A clean-up's server call, tried again for ``Bounds.remove_retry`` while it fails as
        the client itself would try again (livekit-api ``twirp_client.py``: a transport error,
        no answer, a 5xx; on ``*.livekit.cloud`` each of our tries is up to three of its own).
        Another 4xx is final and raised. not_found means done (the leg or the room is gone),
        unless ``until_found``: a dial's participant may not have joined yet, and a phone may
        be ringing, so a try not answered within half the window is sent again (nobody retries
        a hanging request for us: RoomService calls have no HTTP timeout, livekit-api
        ``twirp_client.py``). Each try is bounded by ``Bounds.server_call`` and the last starts
        within the window, so the whole takes at most ``Bounds.clean_up``."""
        pause = 0.2
        each = self.bounds.server_call
        if until_found:
            each = min(each, self.bounds.remove_retry / 2)
        deadline = time.monotonic() + self.bounds.remove_retry
        while True:
            try:
                await asyncio.wait_for(server_call(), each)
                return
            except Exception as e:
                gone = getattr(e, "code", "") == "not_found"
                if gone and not until_found:
                    return
                if isinstance(e, api.ServerError) and e.status < 500 and not gone:
                    raise
                if time.monotonic() + pause >= deadline:
                    if gone:
                        return
                    raise
            await asyncio.sleep(pause)

    async def hang_up(self, leg: Leg) -> None:
        try:
            await self._retried(self._remove(leg.room, leg.identity))
        except Exception as e:
            logger.warning("could not hang up the human's leg in room %s: %r", leg.room, e)

    async def move(self, leg: Leg, room: str) -> None:
        """Move the human into ``room``, never leaving it half done: after an error, a timeout
        or a lost response, find out where the human actually is. Returns once they are in
        ``room``; raises ``MoveRefused`` if they are still where they were, ``LegLost`` if they
        are nowhere (hung up)."""
        request = api.MoveParticipantRequest(
            room=leg.room, identity=leg.identity, destination_room=room
        )
        try:
            await asyncio.wait_for(self._ctx.api.room.move_participant(request), self.bounds.move)
            return
        except api.ServerError as e:
            # Self-hosted LiveKit has no MoveParticipant: its RoomManager answers "not
            # implemented" (livekit/livekit pkg/service/roommanager.go), a Twirp "unknown".
            if e.code == "unimplemented" or "not implemented" in (e.message or ""):
                raise MoveRefused(f"{e.code}: {e.message}", unsupported=True) from e
            problem = f"{e.code}: {e.message}"
        except asyncio.TimeoutError:
            problem = f"no answer in {self.bounds.move:g}s"
        except Exception as e:  # a lost response: the move may have happened all the same
            problem = repr(e)
        where = await self._locate(leg.identity, (room, leg.room))
        if where == room:
            logger.info("move reported %s, but the human is in room %s", problem, room)
            return
        if where == leg.room:
            raise MoveRefused(problem)
        raise LegLost(f"the human left during the move ({problem})")

    async def _locate(self, identity: str, rooms: tuple[str, ...]) -> str:
        """The room ``identity`` is in, on the line, or "". A moving participant leaves one
        room before it joins the other, so look again for a moment before concluding they are
        gone; one whose status is "hangup" has hung up, and is only on its way out."""
        deadline = time.monotonic() + self.bounds.locate
        while True:
            for room in rooms:
                if await self._call_status(room, identity) not in ("", HUNG_UP):
                    return room
            if time.monotonic() >= deadline:
                return ""
            await asyncio.sleep(0.2)

    async def delete_room(self, room: str) -> None:
        request = api.DeleteRoomRequest(room=room)
        try:  # already gone is fine (not_found); anything else is tried again, then logged
            await self._retried(lambda: self._ctx.api.room.delete_room(request))
        except Exception as e:
            logger.warning("could not delete room %s: %r", room, e)

    async def start_hold_music(self) -> None:
        clip = self._settings.hold_audio_file or BuiltinAudioClip.HOLD_MUSIC.path()
        music = self._hold_music = HoldMusic(clip)
        await music.start(self._ctx.room)

    def pause_hold_music(self, paused: bool) -> None:
        if self._hold_music is not None:
            self._hold_music.pause(paused)

    async def stop_hold_music(self) -> None:
        music, self._hold_music = self._hold_music, None
        if music is not None:
            await music.stop()

    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        consult_room = rtc.Room()
        token = (
            api.AccessToken(
                self._settings.livekit_api_key, self._settings.livekit_api_secret.get_secret_value()
            )
            .with_identity(f"{self._ctx.local_participant_identity}-consult")
            .with_kind("agent")
            .with_grants(
                api.VideoGrants(
                    room_join=True,
                    room=room,
                    can_publish=True,
                    can_subscribe=True,
                    can_update_own_metadata=True,
                )
            )
            .to_jwt()
        )
        await consult_room.connect(job_server_url(self._ctx, self._settings.livekit_url), token)
        self._rooms[room] = consult_room
        self._consults[room] = session
        # The opener plays outside the session: answering-machine detection holds the
        # session's own speech until its verdict (voice/amd/detector.py).
        track = self._tracks[room] = OwnTrack("handoff-opener")
        await track.publish(consult_room)
        await session.start(
            agent=agent,
            room=consult_room,
            room_options=room_io.RoomOptions(
                participant_identity=human_identity,
                participant_kinds=[rtc.ParticipantKind.PARTICIPANT_KIND_SIP],
                close_on_disconnect=False,
            ),
            record=False,
        )

    async def play_to_human(self, room: str, text: str, audio: PhraseAudio) -> None:
        track = self._tracks.get(room)
        if track is None or (isinstance(audio, list) and not audio):
            return
        await track.play(audio)

    async def announce(self, room: str, text: str, audio: PhraseAudio) -> None:
        lk_room = self._rooms.get(room)
        if lk_room is None or not lk_room.isconnected() or (isinstance(audio, list) and not audio):
            return
        track = OwnTrack("announcement")
        try:
            await track.publish(lk_room)
            await track.play(audio)
        finally:
            await track.aclose()

    async def close_consult(self, room: str, *, keep_room: bool = False) -> None:
        session, track = self._consults.pop(room, None), self._tracks.pop(room, None)
        await close_quietly(session.aclose if session else None, track.aclose if track else None)
        if keep_room:
            return
        relays, connection = self._bridges.pop(room, []), self._rooms.pop(room, None)
        await self.delete_room(room)  # first: the human's leg ends now, whatever follows
        # a relay whose speaker has gone may never see its stream end
        await close_quietly(
            *(relay.aclose for relay in relays),
            connection.disconnect if connection else None,
            timeout=self.bounds.server_call,
        )

    async def wait_for_hangup(self, room: str, identities: tuple[str, ...]) -> str:
        lk_room = self._rooms[room]
        gone = next((i for i in identities if not on_the_line(lk_room, i)), None)
        if gone is not None or not lk_room.isconnected():
            return gone or identities[0]
        left: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_left(p: rtc.RemoteParticipant) -> None:
            if p.identity in identities and not left.done():
                left.set_result(p.identity)

        def on_hung_up(changed: Mapping[str, str], p: rtc.RemoteParticipant) -> None:
            # "hangup" comes before the leave (``SIP_CALL_STATUS``)
            if changed.get(SIP_CALL_STATUS) == HUNG_UP:
                on_left(p)

        def on_dropped(*_: Any) -> None:
            # Our connection dropped: no participant-left event follows, and nobody in the
            # room can be heard or spoken to any more (beta/workflows/warm_transfer.py
            # watches the consult room's "disconnected" the same way).
            if not left.done():
                left.set_result(identities[0])

        lk_room.on("participant_disconnected", on_left)
        lk_room.on("participant_attributes_changed", on_hung_up)
        lk_room.on("disconnected", on_dropped)
        try:
            return await left
        finally:
            lk_room.off("participant_disconnected", on_left)
            lk_room.off("participant_attributes_changed", on_hung_up)
            lk_room.off("disconnected", on_dropped)

    async def wait_for_arrival(self, room: str, identity: str, timeout: float) -> bool:
        lk_room = self._rooms[room]
        if identity in lk_room.remote_participants:  # here, or hung up and on its way out
            return on_the_line(lk_room, identity)
        arrived: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_joined(p: rtc.RemoteParticipant) -> None:
            if p.identity == identity and not arrived.done():
                arrived.set_result(on_the_line(lk_room, identity))

        lk_room.on("participant_connected", on_joined)
        try:
            return await asyncio.wait_for(arrived, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            lk_room.off("participant_connected", on_joined)

    def on_dtmf(self, room: str, callback: Callable[[str], None]) -> None:
        self._rooms[room].on("sip_dtmf_received", lambda ev: callback(ev.digit))

    async def set_attributes(self, room: str, attributes: Mapping[str, str]) -> None:
        lk_room = self._rooms.get(room)
        if lk_room is None or not lk_room.isconnected():
            return
        try:  # the SDK waits for the server's answer with no timeout of its own
            await asyncio.wait_for(
                lk_room.local_participant.set_attributes(dict(attributes)),
                self.bounds.server_call,
            )
        except Exception as e:
            logger.warning("could not set attributes in room %s: %r", room, e)


@dataclass
class LineEvent:
    at: float
    text: str


class SimulatedPhoneLine(PhoneLine):
    """A phone line with no media server: the console's and the tests' LiveKit.

    Rooms are sets of identities; a human is scripted by ``SimulatedHuman`` (or driven step by
    step with ``human_says``/``human_presses``/``hang_up_human``); every step is kept in
    ``events`` and, in the console, printed as it happens. The line carries text, not audio:
    what the human says reaches the consult session as a final transcript and a user turn, as
    the session's speech-to-text would deliver it; what is said to the human is what they hear,
    and the scripted human answers it as a person would (``_human_script``)."""

    ring_time = 3.0  # how long the simulated phone rings before it is answered
    hello_after = 0.8  # the scripted human's "Hello?" after picking up
    decide_after = 1.0  # and their keypad answer after the brief
    drop_after = 3.0  # SimulatedHuman.DROP_AFTER_MERGE: hangs up this long after the merge

    def __init__(
        self,
        human: SimulatedHuman | None = SimulatedHuman.ANSWER,
        *,
        ring_time: float | None = None,
        caller_room: str = "console-room",
        caller_identity: str = "caller",
        caller_number: str = "+15550100999",
        move_supported: bool = True,
        join_way: JoinWay = JoinWay.MOVE,
        announce: Callable[[str], None] | None = None,
        humans: Mapping[str, SimulatedHuman | None] | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        super().__init__(bounds)
        self.human = human  # None: the test drives the human itself
        self.humans = dict(humans or {})  # per destination name, overriding ``human``
        if ring_time is not None:
            self.ring_time = ring_time
        self.caller_room = caller_room
        self.caller_identity = caller_identity
        self.caller_number = caller_number
        self.move_supported = move_supported
        self.first_way = join_way  # until a move is refused as unsupported
        self.move_refused = False
        self.bridged: dict[str, str] = {}  # the human's room -> the caller's, while bridged
        self.hold_music = "off"  # what the caller hears of it: "playing", "paused" or "off"
        self.rooms: dict[str, set[str]] = {caller_room: {caller_identity}}
        self.events: list[LineEvent] = []
        self.consults: dict[str, AgentSession] = {}
        self._announce = announce
        self._dtmf: dict[str, list[Callable[[str], None]]] = {}
        self._heard: dict[str, asyncio.Queue[str]] = {}  # room -> what the human hears, in order
        self._left: dict[str, asyncio.Event] = {}
        self._dropped: dict[str, asyncio.Event] = {}  # room -> our connection to it dropped
        self._with_caller: dict[str, asyncio.Event] = {}  # a human, once moved in or bridged

    @cached_property
    def _scripts(self) -> utils.aio.TaskSet:
        """The scripted humans' steps, on the loop of the call."""
        return utils.aio.TaskSet(asyncio.get_running_loop())

    def _log(self, text: str) -> None:
        self.events.append(LineEvent(time.monotonic(), text))
        if self._announce is not None:
            self._announce(text)

    def _left_event(self, identity: str) -> asyncio.Event:
        return self._left.setdefault(identity, asyncio.Event())

    def participant_joined(self, room: str, identity: str) -> None:
        """``identity`` is in ``room`` now, as a server's participant-joined event says."""
        self.rooms.setdefault(room, set()).add(identity)
        self._left.pop(identity, None)
        if room == self.caller_room and identity != self.caller_identity:
            self._with_caller_event(identity).set()

    def participant_left(self, room: str, identity: str) -> None:
        """``identity`` has left ``room``: whoever waits for their hang-up is told."""
        if identity in self.rooms.get(room, set()):
            self.rooms[room].discard(identity)
            self._left_event(identity).set()

    # -- the seam -------------------------------------------------------------------------------

    async def dial(self, dial: Dial) -> Leg:
        target = dial.destination
        self._log(
            f"dialling {target.name} ({mask_number(target.target)}), "
            f"ring timeout {dial.ring_timeout:g}s"
            + (f", showing {mask_number(dial.caller_id)}" if dial.caller_id else "")
        )
        try:
            outcome = self.humans.get(target.name, self.human)
            ring = min(self.ring_time, dial.ring_timeout)
            if outcome is SimulatedHuman.NO_ANSWER:
                ring = dial.ring_timeout
            await asyncio.sleep(ring)
        except asyncio.CancelledError:
            self._log(f"dial to {target.name} cancelled: the phone stops ringing")
            raise
        failures = {
            SimulatedHuman.BUSY: (HandoffOutcome.BUSY, 486, "Busy Here"),
            SimulatedHuman.NO_ANSWER: (HandoffOutcome.NO_ANSWER, 480, "Temporarily Unavailable"),
            SimulatedHuman.UNREACHABLE: (HandoffOutcome.UNREACHABLE, 404, "Not Found"),
        }
        if outcome in failures:
            result, status, reason = failures[outcome]
            self._log(f"{target.name}: SIP {status} {reason}")
            raise DialFailed(result, status, f"{status}: {reason}")
        self.participant_joined(dial.room, dial.identity)
        self._log(f"{target.name} answered")
        if outcome is not None:
            self._scripts.create_task(self._human_script(dial.room, outcome))
        return Leg(identity=dial.identity, room=dial.room, destination=target)

    async def hang_up(self, leg: Leg) -> None:
        for room, members in self.rooms.items():
            if leg.identity in members:
                self._log(f"hanging up {leg.destination.name}'s leg")
                self.participant_left(room, leg.identity)

    @property
    def join_way(self) -> JoinWay:
        return JoinWay.BRIDGE if self.move_refused else self.first_way

    def move_unsupported(self) -> None:
        self.move_refused = True

    async def bridge(self, leg: Leg, room: str) -> None:
        if self.caller_identity not in self.rooms.get(room, ()):
            raise LegLost("the caller left before the bridge", caller=True)
        if leg.identity not in self.rooms.get(leg.room, ()):
            raise LegLost("the human left before the bridge")
        self.bridged[leg.room] = room
        self._with_caller_event(leg.identity).set()
        self._log(f"{leg.destination.name} bridged to {room}")

    async def move(self, leg: Leg, room: str) -> None:
        if not self.move_supported:
            self._log("move refused by the server")
            raise MoveRefused("not implemented", unsupported=True)
        self.participant_left(leg.room, leg.identity)
        self.participant_joined(room, leg.identity)
        self._log(f"{leg.destination.name} moved into {room}")

    async def delete_room(self, room: str) -> None:
        if room in self.rooms:
            for identity in list(self.rooms[room]):
                self.participant_left(room, identity)
            del self.rooms[room]
            self._log(f"room {room} deleted")

    async def start_hold_music(self) -> None:
        self.hold_music = "playing"
        self._log("hold music on")

    def pause_hold_music(self, paused: bool) -> None:
        self.hold_music = "paused" if paused else "playing"
        self._log("hold music paused" if paused else "hold music resumed")

    async def stop_hold_music(self) -> None:
        self.hold_music = "off"
        self._log("hold music off")

    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        self.rooms.setdefault(room, set())
        self.consults[room] = session

        def heard(ev: ConversationItemAddedEvent) -> None:
            item = ev.item
            if isinstance(item, llm.ChatMessage) and item.role == "assistant" and item.text_content:
                self._human_hears(room, item.text_content)

        session.on("conversation_item_added", heard)
        await session.start(agent=agent)

    async def play_to_human(self, room: str, text: str, audio: PhraseAudio) -> None:
        # heard when its first frame plays, in real time; words alone at once (no voice)
        heard = isinstance(audio, list) and not audio
        if heard:
            self._human_hears(room, text)
        async with contextlib.aclosing(frames_of(audio)) as frames:
            async for frame in frames:
                if not heard:
                    heard = True
                    self._human_hears(room, text)
                await asyncio.sleep(frame.duration)
        self._log("played to the human" if heard else f"no audio for the human: {text}")

    async def announce(self, room: str, text: str, audio: PhraseAudio) -> None:
        if room != self.caller_room:  # a bridged human's room
            await self.play_to_human(room, text, audio)
            return
        self._log(f"caller hears: {text}")
        async with contextlib.aclosing(frames_of(audio)) as frames:
            async for frame in frames:
                await asyncio.sleep(frame.duration)

    def _human_hears(self, room: str, text: str) -> None:
        self._log(f"human hears: {text}")
        self._heard_in(room).put_nowait(text)

    def _heard_in(self, room: str) -> asyncio.Queue[str]:
        return self._heard.setdefault(room, asyncio.Queue())

    async def close_consult(self, room: str, *, keep_room: bool = False) -> None:
        session = self.consults.pop(room, None)
        await close_quietly(session.aclose if session else None)
        if not keep_room:
            if self.bridged.pop(room, None) is not None:
                self._log("bridge closed")
            await self.delete_room(room)

    async def wait_for_hangup(self, room: str, identities: tuple[str, ...]) -> str:
        for identity in identities:
            if identity not in self.rooms.get(room, set()):
                return identity
        dropped = self._dropped.setdefault(room, asyncio.Event())
        if dropped.is_set():
            return identities[0]
        waits = {asyncio.ensure_future(self._left_event(i).wait()): i for i in identities}
        waits[asyncio.ensure_future(dropped.wait())] = identities[0]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return waits[next(iter(done))]
        finally:
            for w in waits:
                w.cancel()

    async def wait_for_arrival(self, room: str, identity: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while identity not in self.rooms.get(room, set()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def on_dtmf(self, room: str, callback: Callable[[str], None]) -> None:
        self._dtmf.setdefault(room, []).append(callback)

    async def set_attributes(self, room: str, attributes: Mapping[str, str]) -> None:
        """No dashboard or softphone watches a simulated room: nothing to show them to."""

    # -- the people on the line -----------------------------------------------------------------

    def _human_room(self) -> str | None:
        return next(
            (
                r
                for r, members in self.rooms.items()
                if any(i.startswith("transfer_") for i in members)
            ),
            None,
        )

    def human_says(self, text: str) -> None:
        """The human speaks in the consult room: the consult session gets it as its
        speech-to-text would give it, a final transcript, then a user turn."""
        room = self._human_room()
        self._log(f"human says: {text}")
        if room in self.consults:
            session = self.consults[room]
            session.emit(
                "user_input_transcribed", UserInputTranscribedEvent(transcript=text, is_final=True)
            )
            session.generate_reply(user_input=text)

    def human_presses(self, digit: str) -> None:
        room = self._human_room()
        self._log(f"human presses {digit}")
        for callback in self._dtmf.get(room or "", []):
            callback(digit)

    def hang_up_human(self) -> None:
        for room, members in self.rooms.items():
            for identity in [i for i in members if i.startswith("transfer_")]:
                self._log("the human hangs up")
                self.participant_left(room, identity)

    def drop_connection(self, room: str) -> None:
        """Our connection to ``room`` drops: no participant-left event, nobody reachable."""
        self._log(f"connection to {room} dropped")
        self._dropped.setdefault(room, asyncio.Event()).set()

    def hang_up_caller(self) -> None:
        self._log("the caller hangs up")
        self.participant_left(self.caller_room, self.caller_identity)
        for members in self.rooms.values():
            if self.caller_identity in members:
                members.discard(self.caller_identity)

    async def _human_script(self, room: str, outcome: SimulatedHuman) -> None:
        """What the console's simulated human does once they pick up: a mailbox greets and
        then records in silence; a person says hello, then answers what they hear, like a
        person: "Is this ...?" gets a 1 (a yes), the brief's "press 1 ... press 2" gets the
        scenario's decision. Nothing else they hear asks anything of them, so they wait."""
        await asyncio.sleep(self.hello_after)
        if outcome is SimulatedHuman.VOICEMAIL:
            self.human_says(SIMULATED_MAILBOX)
            return
        self.human_says(SIMULATED_HELLO)
        takes_it = outcome in (SimulatedHuman.ANSWER, SimulatedHuman.DROP_AFTER_MERGE)
        human = next((i for i in self.rooms.get(room, set()) if i.startswith("transfer_")), "")

        async def answer_what_is_asked() -> None:
            heard = self._heard_in(room)
            while not ASKED_TO_DECIDE.search(text := await heard.get()):
                if ASKED_IF_TEAM.search(text):
                    await asyncio.sleep(self.decide_after)
                    self.human_presses("1")
            await asyncio.sleep(self.decide_after)
            self.human_presses("1" if takes_it else "2")

        # consult: the decision is theirs; conference: they are joined once confirmed
        await _first(answer_what_is_asked(), self._joined(human))
        if outcome is SimulatedHuman.DROP_AFTER_MERGE and human:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._joined(human), 10)
                await asyncio.sleep(self.drop_after)
                self.hang_up_human()  # a bad line, a wrong button

    async def _joined(self, human: str) -> None:
        """Until ``human`` is with the caller: moved into their room, or bridged."""
        await self._with_caller_event(human).wait()

    def _with_caller_event(self, identity: str) -> asyncio.Event:
        return self._with_caller.setdefault(identity, asyncio.Event())

    async def aclose(self) -> None:
        scripts = self._scripts.tasks
        for task in scripts:
            task.cancel()
        await asyncio.gather(*scripts, return_exceptions=True)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 5. The handoff: hold, dial, screen and brief the human, merge or come back
# ──────────────────────────────────────────────────────────────────────────────────────────────

# -- instant words: fixed sentences played from a cache on the worker host ---------------------


async def _words(text: str) -> AsyncIterator[str]:
    yield text


async def _replay(frames: list[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
    for frame in frames:
        yield frame


async def _collected(stream: AsyncIterable[SynthesizedAudio]) -> list[rtc.AudioFrame]:
    return [audio.frame async for audio in stream]


class PhraseCache:
    """Instant words: fixed sentences play from a folder on the worker host instead of waiting
    for speech synthesis.

    A job process runs one call, so the folder, not the process, is the cache. A sentence's
    first live synthesis on a host is played as it arrives and saved (a temporary file renamed
    into place: a reader sees the whole file or none); later calls play the file at once. The
    file's name is a hash of the text and the voice (``voice``: what ``build_models`` sets, see
    ``voice_of``), so a changed greeting or voice is another file and never plays a stale
    sentence. A file that does not verify (a
    header with the length and a SHA-256 of the audio) is never played: the sentence is
    synthesised live and the file replaced. A synthesis that fails or is interrupted saves
    nothing. The folder must belong to this user and be writable by nobody else (anyone who can
    write to it chooses what callers hear); otherwise the cache is off."""

    MAGIC = b"WHPHRASE"
    HEADER = struct.Struct("<8sIHI32s")  # magic, sample rate, channels, PCM bytes, SHA-256
    FRAME_MS = 100  # played in frames this long

    def __init__(self, folder: str, voice: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.voice = dict(voice or {})
        self.usable = self._prepare()

    def _prepare(self) -> bool:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.folder.stat()
        except OSError as e:
            logger.warning("phrase cache off: cannot use HANDOFF_PHRASE_CACHE (%r)", e)
            return False
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            logger.warning(
                "phrase cache off: HANDOFF_PHRASE_CACHE %s must belong to this user and be "
                "writable by nobody else",
                self.folder,
            )
            return False
        return True

    def path_for(self, text: str) -> Path:
        key = json.dumps({"format": 2, "text": text, "voice": self.voice}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.pcm"

    def say(self, session: AgentSession, text: str, **options: Any) -> SpeechHandle:
        agent = session.current_agent
        tts = agent.tts if utils.is_given(agent.tts) else session.tts  # the one say() would use
        if not self.usable or tts is None:
            return session.say(text, **options)
        return session.say(text, audio=self._audio(agent, text, self.path_for(text)), **options)

    async def _audio(self, agent: Agent, text: str, path: Path) -> AsyncIterator[rtc.AudioFrame]:
        saved = await self.load(path)
        if saved is not None:
            for frame in saved:
                yield frame
            return
        # Not ready yet: the framework's own synthesis for say(text) (the agent's TTS, the
        # session's connection options, sentence by sentence for a TTS that does not stream),
        # kept as it plays. A failure ends the speech as a failed say(text) does, and is logged
        # by the framework; an interruption closes this generator. Either way nothing is saved.
        made: list[rtc.AudioFrame] = []
        live = Agent.default.tts_node(agent, _words(text), ModelSettings())
        async with contextlib.aclosing(live):
            async for frame in live:
                made.append(frame)
                yield frame
        if made:
            await asyncio.to_thread(self.store, path, made)

    async def load(self, path: Path) -> list[rtc.AudioFrame] | None:
        """The saved sentence as frames, or None: missing, partial or corrupt. Read and
        verified on a worker thread: a slow disk or a long sentence's hash must not hold the
        call's event loop (the caller's audio, the hold music, the other speech)."""
        return await asyncio.to_thread(self._read, path)

    def _read(self, path: Path) -> list[rtc.AudioFrame] | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) < self.HEADER.size:
            return None
        magic, rate, channels, size, digest = self.HEADER.unpack_from(data)
        pcm = data[self.HEADER.size :]
        width = 2 * channels
        if (
            magic != self.MAGIC
            or not rate
            or not 1 <= channels <= 2
            or size != len(pcm)
            or not size
            or size % width
            or hashlib.sha256(pcm).digest() != digest
        ):
            logger.debug("phrase cache: %s does not verify, it will be replaced", path.name)
            return None
        step = rate * self.FRAME_MS // 1000 * width
        return [
            rtc.AudioFrame(pcm[i : i + step], rate, channels, len(pcm[i : i + step]) // width)
            for i in range(0, size, step)
        ]

    def store(self, path: Path, frames: list[rtc.AudioFrame]) -> None:
        """Save a whole sentence: written to a temporary file, then renamed into place."""
        rate, channels = frames[0].sample_rate, frames[0].num_channels
        if any(f.sample_rate != rate or f.num_channels != channels for f in frames):
            return  # one sentence in two formats: not worth keeping
        pcm = b"".join(f.data.tobytes() for f in frames)
        header = self.HEADER.pack(
            self.MAGIC, rate, channels, len(pcm), hashlib.sha256(pcm).digest()
        )
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(header + pcm)
            os.replace(temporary, path)
        except OSError as e:
            self.usable = False  # logged once: this call speaks live from now on
            logger.warning(
                "phrase cache: could not save a fixed sentence, off for this call: %r", e
            )
            with contextlib.suppress(OSError):
                temporary.unlink()


def say_fixed(
    session: AgentSession, text: str, phrases: PhraseCache | None, **options: Any
) -> SpeechHandle:
    """``session.say`` for a fixed sentence: from the phrase cache when there is one."""
    if phrases is None:
        return session.say(text, **options)
    return phrases.say(session, text, **options)


# -- the human's fixed phrases: prepared while the phone rings, else said live at once -------------
# The opener, the question and the brief are synthesised while the human's phone rings, each
# with one try and at most as long as it takes to say (``spoken_seconds``): a provider in good
# health synthesises a phrase faster than it is spoken, so one slower than that is in trouble,
# and the framework's retry ladder (3 more tries, 2 s apart) would only stretch the silence.
# A phrase not ready when it is due (failed, timed out, still on its way) is not waited for:
# it is said live at once (``live_speech``, or the session's own speech).
SPOKEN_SECONDS_PER_CHARACTER = 0.07  # about 14 characters a second: a voice's unhurried pace
MIN_SPOKEN_SECONDS = 1.0  # a short phrase still gets a network round trip or two


def spoken_seconds(text: str) -> float:
    """About how long ``text`` takes to say (the opener's 53 characters: 3.7 s)."""
    return max(MIN_SPOKEN_SECONDS, len(text) * SPOKEN_SECONDS_PER_CHARACTER)


def one_try(text: str) -> APIConnectOptions:
    """Connection options for synthesising ``text`` outside the session: no retry, and a
    connection that takes longer than saying it would is given up."""
    return APIConnectOptions(max_retry=0, timeout=spoken_seconds(text))


async def live_speech(tts: TTS, text: str) -> AsyncIterator[rtc.AudioFrame]:
    """``text`` synthesised as it plays, with one try, the way the session's own speech is:
    through the TTS's stream when it has one (ElevenLabs: its websocket, not the HTTP synthesis
    that prepares phrases), else its synthesis. A failure, or no audio within
    ``spoken_seconds(text)``, ends it (logged): nothing more is heard."""
    bound = spoken_seconds(text)
    try:
        if tts.capabilities.streaming:
            async with tts.stream(conn_options=one_try(text)) as stream:
                stream.push_text(text)
                stream.end_input()
                first = await asyncio.wait_for(anext(stream), bound)
                yield first.frame
                async for audio in stream:
                    yield audio.frame
        else:
            async with tts.synthesize(text, conn_options=one_try(text)) as chunks:
                first = await asyncio.wait_for(anext(chunks), bound)
                yield first.frame
                async for audio in chunks:
                    yield audio.frame
    except StopAsyncIteration:
        logger.warning("live speech gave no audio for a phrase to the human")
    except Exception as e:
        logger.warning("live speech to the human failed: %r", e)


# -- the models a session talks with ---------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """The models a session talks with; the consult session reuses the caller's."""

    stt: STT | None = None
    llm: LLM | None = None
    tts: TTS | None = None
    vad: VAD | None = None
    turn_handling: dict[str, Any] | None = None  # None: the framework's default turn detection
    phrases: PhraseCache | None = None  # fixed sentences played from disk (None: always live)

    def options(self) -> dict[str, Any]:
        given = {
            "stt": self.stt,
            "llm": self.llm,
            "tts": self.tts,
            "vad": self.vad,
            "turn_handling": self.turn_handling,
        }
        return {k: v for k, v in given.items() if v is not None}


# -- the brief -------------------------------------------------------------------------------------


def speakable_number(number: str) -> str:
    """+15105550199 -> "5 1 0, 5 5 5, 0 1 9 9": digits a voice reads one by one."""
    digits = re.sub(r"\D", "", number)
    if len(digits) == 11 and digits.startswith("1"):
        groups = [digits[1:4], digits[4:7], digits[7:]]
    else:
        groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return ", ".join(" ".join(g) for g in groups)


def last_said_by_user(chat_ctx: llm.ChatContext) -> str:
    """The latest words the other side said (the caller, or the human in the consult room)."""
    return next(
        (
            m.text_content
            for m in reversed(chat_ctx.messages())
            if m.role == "user" and m.text_content
        ),
        "",
    )


def conversation_transcript(chat_ctx: llm.ChatContext, limit: int = 30) -> str:
    """The caller's conversation as plain lines, for the brief and the consult agent."""
    lines = []
    for msg in chat_ctx.messages()[-limit:]:
        if msg.role in ("user", "assistant") and msg.text_content:
            lines.append(f"{'Caller' if msg.role == 'user' else 'Assistant'}: {msg.text_content}")
    return "\n".join(lines)


async def compose_brief(
    model: llm.LLM | None,
    transcript: str,
    reason: str,
    settings: Settings,
    destination: Destination,
    timeout: float,
) -> str:
    """The words the human hears first: who is calling, what they want, what was tried, why a
    person is needed. Summarised by the model while the phone rings; if the model is slow or
    fails, the caller's own recent words are used, so a brief is always ready. Either way it is
    redacted: the human never hears a card number, whatever the model wrote."""
    summary = ""
    if model is not None and transcript:
        ctx = llm.ChatContext()
        ctx.add_message(role="system", content=BRIEF_PROMPT)
        request = BRIEF_REQUEST.format(reason=reason, transcript=transcript)
        ctx.add_message(role="user", content=request)
        try:
            response = await asyncio.wait_for(model.chat(chat_ctx=ctx).collect(), timeout)
            summary = response.text.strip()
        except Exception as e:
            logger.warning("brief summary unavailable, using the caller's words: %r", e)
    if not summary:
        said = [
            line[len("Caller: ") :]
            for line in transcript.splitlines()
            if line.startswith("Caller: ")
        ]
        summary = BRIEF_FALLBACK.format(reason=reason)
        if said:
            summary += BRIEF_FALLBACK_WORDS.format(words=" ".join(said[-3:]))
    summary = redact(summary)
    intro = BRIEF_INTRO.format(business=settings.business_name, team=destination.said_as)
    return f"{intro}{summary} {BRIEF_ASK}"


# -- waiting for the first of several things -------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception retrieved (a verdict after detection was closed)."""
    if not future.cancelled():
        future.exception()


async def _first(*waits: Awaitable[Any]) -> None:
    """Return when the first of ``waits`` is done; cancel the rest (never a given future)."""
    tasks = [w if isinstance(w, asyncio.Future) else asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task, wait in zip(tasks, waits, strict=True):
            if task is not wait:
                task.cancel()


async def _finished_before(
    step: Awaitable[T], gone: asyncio.Future[Any]
) -> asyncio.Future[T] | None:
    """``step`` run to its end, unless ``gone`` comes first: then it is cancelled (None)."""
    task = asyncio.ensure_future(step)
    await _first(task, gone)
    if not task.done():
        await utils.aio.cancel_and_wait(task)
        return None
    return task


# -- one attempt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The human's answer to the brief."""

    outcome: HandoffOutcome
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome is HandoffOutcome.CONNECTED

    @property
    def farewell(self) -> str:
        if self.outcome is HandoffOutcome.DECLINED:
            return HUMAN_DECLINED
        return ""  # a voicemail hears nothing about the caller


class HumanCall:
    """Rings the human: the ``Dial`` (whose number the phone shows, the X-headers), the one
    retry a trunk's refusal of the caller's number earns, and the leg once someone answers."""

    def __init__(
        self,
        *,
        settings: Settings,
        line: PhoneLine,
        destination: Destination,
        attempt: str,
        reason: str,
        timings: dict[str, float],
    ) -> None:
        self.settings = settings
        self.line = line
        self.destination = destination
        self.attempt = attempt
        self.identity = f"transfer_{attempt}"
        self.reason = reason
        self.timings = timings
        self.leg: Leg | None = None  # whoever answered, as soon as they did

    @property
    def ring_timeout(self) -> float:
        return self.destination.ring_timeout or self.settings.ring_timeout

    def start(self, room: str) -> asyncio.Future[Leg]:
        """Start ringing. Whoever answers is kept as ``leg`` the moment they do, even if the
        flow is already stopping, so clean-up hangs them up."""
        dial = asyncio.ensure_future(self._place(room))

        def keep_leg(done: asyncio.Future[Leg]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.leg = done.result()

        dial.add_done_callback(keep_leg)
        return dial

    async def _place(self, room: str) -> Leg:
        """Dial. A trunk that will not show the caller's number answers the first INVITE with
        403 Forbidden before any ringing: the same attempt dials once more, at once, with the
        trunk's number. A 603 is a person declining and is never retried."""
        dial = self._dial_request(room)
        try:
            return await self.line.dial(dial)
        except DialFailed as e:
            fallback = self.settings.trunk_number
            showed_caller = self.settings.caller_id == CALLER_ID_FROM_CALLER
            if e.sip_status != 403 or not showed_caller or dial.caller_id == fallback:
                raise
            logger.info(
                "the trunk refused the caller's number as caller ID in room %s (%s); "
                "dialling %s again with the trunk's number",
                self.line.caller_room,
                e.detail,
                self.destination.name,
            )
            self.timings["caller_id_refused"] = time.monotonic()
            return await self.line.dial(replace(dial, caller_id=fallback))

    def _dial_request(self, room: str) -> Dial:
        self.timings["dial_start"] = time.monotonic()
        return Dial(
            room=room,
            identity=self.identity,
            destination=self.destination,
            ring_timeout=self.ring_timeout,
            caller_id=self._caller_id(),
            headers=self._sip_headers(),
        )

    def _caller_id(self) -> str:
        """What the human's phone shows: with HANDOFF_CALLER_ID=caller the caller's own number
        when the trunk gave a valid one (``sip_caller_number``), else HANDOFF_TRUNK_NUMBER ("":
        the trunk's own number)."""
        if self.settings.caller_id != CALLER_ID_FROM_CALLER:
            return self.settings.caller_id
        if E164.fullmatch(self.line.caller_number):
            return self.line.caller_number
        return self.settings.trunk_number

    def _sip_headers(self) -> dict[str, str]:
        """Short X-headers for the human's softphone or CRM to pop the context (off with
        HANDOFF_SIP_HEADERS=off for trunks that reject them)."""
        if not self.settings.sip_headers:
            return {}
        headers = {
            "X-Handoff-Id": self.attempt,
            "X-Handoff-Destination": self.destination.name,
            "X-Handoff-Reason": re.sub(r"[^ -~]", "", self.reason)[:120],
        }
        if E164.fullmatch(self.line.caller_number):  # see sip_caller_number()
            headers["X-Caller-Number"] = self.line.caller_number
        return headers


@dataclass(eq=False, kw_only=True)
class CallerHold:
    """The caller's hold, for one attempt: "please hold", then the line's hold music, paused
    whenever the caller or the agent speaks (it must never mask the caller or read as speech),
    and a check-in every ``HANDOFF_HOLD_REASSURE`` seconds while the caller waits."""

    session: AgentSession
    line: PhoneLine
    team: str
    phrases: PhraseCache | None
    check_in_every: float
    on_hold: Callable[[], bool]  # whether the attempt still holds the caller (the phase's)
    now_on_hold: Callable[[], None]  # told once "please hold" is said and the music starts
    music_on: bool = field(default=False, init=False)  # the line plays it (paused or not)
    music_paused: bool = field(default=False, init=False)
    ended: bool = field(default=False, init=False)  # no hold music starts after ``end``
    _checking_in: asyncio.Task[None] | None = field(default=None, init=False)

    async def announce_and_hold(self) -> None:
        """ "Please hold", then hold music, while the dial already rings."""
        await say_fixed(
            self.session,
            PLEASE_HOLD.format(team=self.team),
            self.phrases,
            allow_interruptions=False,
        )
        if self.ended:
            return
        self.now_on_hold()
        await self.line.start_hold_music()
        if self.ended:  # ended while the hold music was starting
            await self.line.stop_hold_music()
            return
        self.music_on = True
        self.session.on("user_state_changed", self._sync)
        self.session.on("agent_state_changed", self._sync)
        self._checking_in = asyncio.ensure_future(self._check_in())

    def _sync(self, ev: UserStateChangedEvent | AgentStateChangedEvent) -> None:
        """Paused while either the caller or the agent speaks, playing otherwise."""
        if not self.music_on or not self.on_hold():
            return
        caller, agent = self.session.user_state, self.session.agent_state
        if isinstance(ev, UserStateChangedEvent):
            caller = ev.new_state
        else:
            agent = ev.new_state
        speaking = "speaking" in (caller, agent)
        if speaking != self.music_paused:
            self.music_paused = speaking
            self.line.pause_hold_music(speaking)

    async def _check_in(self) -> None:
        while True:
            await asyncio.sleep(self.check_in_every)
            if self.on_hold():
                with contextlib.suppress(RuntimeError):  # the session is closing: nobody to tell
                    say_fixed(
                        self.session,
                        HOLD_CHECK_IN.format(team=self.team),
                        self.phrases,
                        allow_interruptions=True,
                        add_to_chat_ctx=False,
                    )

    async def end(self) -> None:
        """Hold music off and nothing more said about holding. Idempotent."""
        self.ended = True
        if self._checking_in is not None:
            self._checking_in.cancel()
        self.session.off("user_state_changed", self._sync)
        self.session.off("agent_state_changed", self._sync)
        if self.music_on:
            self.music_on = False
            await self.line.stop_hold_music()


MACHINE_OUTCOMES = {
    AMDCategory.MACHINE_VM: HandoffOutcome.VOICEMAIL,
    AMDCategory.MACHINE_UNAVAILABLE: HandoffOutcome.VOICEMAIL,
    AMDCategory.MACHINE_IVR: HandoffOutcome.UNREACHABLE,
}
# A greeting that opens like a person ("Hi, this is Sam Jones at Acme support.") goes on with a
# mailbox's words after a pause; a person who said hello waits. Nothing about the caller is said
# until the leg has been quiet this long after its speech (and through the opener and the
# details' introduction, which say nothing about the caller).
GREETING_GOES_ON = 3.0  # s


@dataclass(frozen=True)
class Verdict:
    """Who answered the human's phone. ``outcome`` is None when a person is on the line."""

    outcome: HandoffOutcome | None
    reason: str
    amd: dict[str, Any] = field(default_factory=dict)  # category, reason, delay: for tuning


class Screening:
    """Tells a person from a machine on the human's leg before anything about the caller is
    said, with the framework's answering-machine detection (``voice.amd.AMD``) on the consult
    session, using the session's own model and transcripts.

    The leg first hears a neutral opener, played outside the session (AMD holds the session's
    speech until its verdict), once the human stops speaking (the VAD's end of speech) or
    after ``grace`` seconds of silence. A person is confirmed by a key press or a yes, or by
    AMD's ``human`` (whatever its reason: the model hears only the greeting's first sentence)
    followed by what a person does: quiet through the opener and for as long after its speech
    as the detector waits before its model's verdicts (``MACHINE_SILENCE_THRESHOLD``, 1.5 s),
    then, in consult mode, quiet through the details' introduction (who speaks, for whom;
    nothing about the caller) and until ``GREETING_GOES_ON`` after its speech, in conference
    mode quiet until then. A leg that speaks again is judged again once it stops (or at the
    ring clock): its mailbox words make it a voicemail, else it is asked. Uncertain: ask once,
    unless the transcript already had a mailbox's words (then voicemail at once). A voicemail
    hears the opener (and at most the introduction, or the question), nothing more. On an
    extension the PBX answers first: ``machine-ivr`` and silence are not final before the ring
    timeout, and detection starts again with the ring time left."""

    def __init__(
        self,
        consult: ConsultAgent,
        *,
        line: PhoneLine,
        room: str,
        human: str,
        extension: bool,
        briefing: bool,
        timings: dict[str, float],
        ring_deadline: float,
    ) -> None:
        self.consult = consult
        self.session = consult.session
        self.line = line
        self.room = room  # the consult room, where the opener plays
        self.human = human  # the leg's identity
        self.extension = extension  # dialled with an extension: a PBX answers first
        self.briefing = briefing  # consult mode: the details' introduction is said meanwhile
        self.timings = timings
        self.ring_deadline = ring_deadline
        self.amd: dict[str, Any] = {}  # the detector's latest verdict: category, reason, delay
        self.speech_ended = asyncio.Event()
        self.mailbox_words = asyncio.Event()  # "leave a message after the tone" transcribed
        self.opener: asyncio.Future[None] | None = None
        self.speech_starts = 0  # how many times the leg has started speaking
        self.speech_started = asyncio.Event()  # set at each start of the leg's speech
        self.session.on("user_state_changed", self._on_user_state)
        self.session.on("user_input_transcribed", self._on_transcript)

    def close(self) -> None:
        self.session.off("user_state_changed", self._on_user_state)
        self.session.off("user_input_transcribed", self._on_transcript)

    def _on_user_state(self, ev: UserStateChangedEvent) -> None:
        if ev.new_state == "speaking":
            self.speech_starts += 1
            self.speech_started.set()
        elif ev.old_state == "speaking" and ev.new_state == "listening":
            self.speech_ended.set()
            self.timings.setdefault("hello_end", time.monotonic())

    def _on_transcript(self, ev: UserInputTranscribedEvent) -> None:
        """A yes to the question confirms a person. A mailbox's words (a PBX's menu only off an
        extension, where the menu comes before the person) are kept: where the detector could
        not decide, they answer the question for the leg, as voicemail, at once."""
        if not ev.is_final:
            return
        if YES.match(ev.transcript or "") and self.consult.asked:
            self.consult.person_confirmed.set()
        elif hint := VOICEMAIL_HINTS.search(ev.transcript or ""):
            if not (self.extension and hint.group().lower().startswith("press")):
                self.mailbox_words.set()

    async def human_stopped(self) -> None:
        """Returns when the leg stops speaking; at once if it is not speaking (what interrupted
        was a late transcript of words already finished, not speech)."""
        self.speech_ended.clear()
        if self.session.user_state == "speaking":
            await self.speech_ended.wait()

    async def run(self, grace: float) -> Verdict:
        amd_seen: dict[str, Any] = {}
        while True:
            detector = AMD(
                self.session,
                llm=None,  # the session's own model and transcripts: no LiveKit Inference
                stt=None,
                ivr_detection=False,
                participant_identity=self.human,
                suppress_compatibility_warning=True,
                detection_options=self._detection_options(),
            )
            await detector.__aenter__()
            try:
                verdict = asyncio.ensure_future(detector.execute())
                verdict.add_done_callback(_retrieve)
                silent = await self._opener_cue(verdict, grace)
                if not silent:
                    await _first(verdict, self.consult.person_confirmed.wait())
            finally:
                await detector.aclose()  # lets the session speak again
            if silent:  # nothing heard: the opener, then the question
                return await self._ask(amd_seen, "silent line")
            if self.consult.person_confirmed.is_set():
                return Verdict(None, "key press or yes", amd_seen)
            result: AMDPredictionEvent = verdict.result()
            self.timings["verdict"] = time.monotonic()
            amd_seen = {
                "category": result.category.value,
                "reason": result.reason,
                "delay": round(result.delay, 3),
            }
            self.amd = amd_seen
            category = result.category
            if category is AMDCategory.HUMAN:
                if await self._spoke_again(result) or not await self._quiet_after(result):
                    return await self._judge_again(amd_seen, f"spoke again ({result.reason})")
                return Verdict(None, f"amd {result.reason}", amd_seen)
            if self.extension and category in (AMDCategory.MACHINE_IVR, AMDCategory.UNCERTAIN):
                if time.monotonic() < self.ring_deadline - 1.0:
                    self.speech_ended.clear()  # the PBX is still ringing the person
                    continue
                if result.reason == "no_speech_timeout":
                    return Verdict(HandoffOutcome.NO_ANSWER, "nobody picked up the extension")
            if category in MACHINE_OUTCOMES:
                return Verdict(MACHINE_OUTCOMES[category], f"amd {category.value}", amd_seen)
            return await self._ask(amd_seen, f"amd uncertain ({result.reason})")

    async def _spoke_again(self, result: AMDPredictionEvent) -> bool:
        """Whether the leg spoke again after a ``human`` verdict, through the opener and until
        ``MACHINE_SILENCE_THRESHOLD`` after its speech ended: a "Hello! … you've reached …"
        mailbox pauses, then goes on. The watch does not depend on the opener's length (a short
        business name makes a short opener); a key press ends it."""
        heard = self.speech_starts  # the greeting the verdict is about, and what came before
        watch_ends = self._speech_end(result) + MACHINE_SILENCE_THRESHOLD
        if self.opener is not None:
            await self.opener
        watch = asyncio.sleep(max(0.0, watch_ends - time.monotonic()))
        await _first(watch, self.consult.person_confirmed.wait())
        return self.speech_starts > heard and not self.consult.person_confirmed.is_set()

    def _speech_end(self, result: AMDPredictionEvent) -> float:
        """When the speech a verdict is about ended, or a little later: a verdict from timing
        alone says how long ago (its ``delay``, counted when it is given); the model's counts
        its delay when the model answered, but is given only after the detector's silence
        (``MACHINE_SILENCE_THRESHOLD``) after the speech."""
        delay = result.delay
        if result.reason == "llm":
            delay = max(delay, MACHINE_SILENCE_THRESHOLD)
        return self.timings["verdict"] - delay

    async def _quiet_after(self, result: AMDPredictionEvent) -> bool:
        """Whether the leg stays quiet until ``GREETING_GOES_ON`` after its speech ended and, in
        consult mode, through the details' introduction, said meanwhile (nothing about the
        caller: a person hears the details start with the verdict). Speech cuts the
        introduction short; a key press ends the watch (a person), the introduction goes on."""
        watch_ends = self._speech_end(result) + GREETING_GOES_ON
        self.speech_started.clear()
        if self.session.user_state == "speaking":
            return False
        introduction = None
        if self.briefing:
            introduction = self.consult.introduce()
        watch: list[Awaitable[Any]] = [asyncio.sleep(max(0.0, watch_ends - time.monotonic()))]
        if introduction is not None:
            watch.append(introduction.wait_for_playout())
        watching = asyncio.ensure_future(asyncio.gather(*watch))
        try:
            await _first(watching, self.speech_started.wait(), self.consult.person_confirmed.wait())
        finally:
            watching.cancel()
        if self.consult.person_confirmed.is_set() or not self.speech_started.is_set():
            return True
        if introduction is not None:
            introduction.interrupt()
        return False

    async def _judge_again(self, amd_seen: dict[str, Any], why: str) -> Verdict:
        """The leg spoke again after a ``human`` verdict: once it stops (at the latest by the
        ring clock, or the confirmation window if that has passed), its mailbox words make it
        a voicemail; else it is asked. A key press meanwhile is a person."""
        left = max(self.ring_deadline - time.monotonic(), self.line.bounds.confirm)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                _first(self.human_stopped(), self.consult.person_confirmed.wait()), left
            )
        if self.consult.person_confirmed.is_set():
            return Verdict(None, f"{why}: key press", amd_seen)
        return await self._ask(amd_seen, why)

    def _detection_options(self) -> DetectionOptions:
        if not self.extension:
            return {}
        left = max(1.0, self.ring_deadline - time.monotonic())
        return {"no_speech_threshold": left, "timeout": left + 20.0}

    async def _opener_cue(self, verdict: asyncio.Future[Any], grace: float) -> bool:
        """Start the opener when the human stops speaking (or a verdict or key press comes
        first); after ``grace`` s of silence on a direct line. Returns whether it was silence.
        On an extension silence is ringback: wait for speech until the ring timeout."""
        if self.opener is not None:
            return False
        waits: list[Awaitable[Any]] = [
            self.speech_ended.wait(),
            self.consult.person_confirmed.wait(),
            verdict,
        ]
        if not self.extension:
            waits.append(self._silence(grace))
        await _first(*waits)
        silent = not (self.speech_ended.is_set() or self.consult.person_confirmed.is_set())
        silent = silent and not verdict.done()
        self.play_opener()
        return silent

    async def _silence(self, grace: float) -> None:
        """Returns after ``grace`` s from the answer if nobody has started speaking; a human
        who has started is waited for (their end of speech starts the opener instead)."""
        await asyncio.sleep(grace)
        if self.speech_starts:
            await asyncio.get_running_loop().create_future()  # never: speech_ended decides

    def play_opener(self) -> None:
        if self.opener is None:
            self.timings["opener_start"] = time.monotonic()
            self.opener = asyncio.ensure_future(
                self.line.play_to_human(
                    self.room,
                    self.consult.opener,
                    self.consult.audio_for("opener", self.consult.opener),
                )
            )

    async def _ask(self, amd_seen: dict[str, Any], why: str) -> Verdict:
        """Ask once whether a person is there; the details follow a yes or a key press."""
        if self.opener is not None:
            await self.opener
        if not (self.consult.person_confirmed.is_set() or self.mailbox_words.is_set()):
            self.consult.asked = True
            await self.session.say(
                self.consult.question,
                audio=self.consult.said_for("question"),
                allow_interruptions=False,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    _first(self.consult.person_confirmed.wait(), self.mailbox_words.wait()),
                    self.line.bounds.confirm,
                )
        if self.consult.person_confirmed.is_set():
            return Verdict(None, f"{why}: confirmed", amd_seen)
        if self.mailbox_words.is_set():
            return Verdict(HandoffOutcome.VOICEMAIL, f"{why}: mailbox words", amd_seen)
        return Verdict(HandoffOutcome.VOICEMAIL, f"{why}: nobody confirmed", amd_seen)


class ConsultRoom:
    """The private room of a consult-mode attempt: its agent and session, the brief composed
    while the phone rings, the human screened, briefed and asked there, and told if the attempt
    ends without them. Neither the brief's model nor the consult agent sees a card number: the
    transcript they get is redacted."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.line = handoff.line
        self.name = f"{self.line.caller_room}-consult-{handoff.attempt}"
        self.agent: ConsultAgent | None = None  # once the room is opened
        self.is_open = False
        self.brief = ""  # once composed
        self.human_left: asyncio.Future[str] | None = None  # once the human answered
        self.screening: Screening | None = None  # a person or a machine? (once answered)
        self.verdict: Verdict | None = None  # and its answer, once given

    def open(self) -> tuple[asyncio.Future[None], asyncio.Future[str]]:
        """Start the room's session and the brief's composition, at once."""
        h = self.handoff
        transcript = redact(conversation_transcript(h.session.history))
        composing = asyncio.ensure_future(
            compose_brief(
                h.models.llm,
                transcript,
                h.reason,
                h.settings,
                h.destination,
                timeout=h.ring_timeout,
            )
        )
        composing.add_done_callback(self._keep_brief)
        agent = self.agent = h.consult_agent(composing, transcript)
        self.is_open = True
        if h.models.tts is not None:
            h.tasks.create_task(agent.prepare_voice(h.models.tts))
        session: AgentSession = AgentSession(**self.session_options())
        opening = asyncio.ensure_future(
            self.line.open_consult(self.name, h.human_call.identity, session, agent)
        )
        return opening, composing

    def ready(self, composing: asyncio.Future[str]) -> None:
        """The room is open: keys reach the agent, and the brief shows on its attributes."""
        assert self.agent is not None
        self.line.on_dtmf(self.name, self.agent.on_digit)
        composing.add_done_callback(self._show_brief)

    def session_options(self) -> dict[str, Any]:
        """The consult session's models. Its turns end on voice activity, not on the
        end-of-turn model: that model scores a bare "Hello?" as unfinished and waits its
        longest delay (about 2.5 s) before the human hears a word."""
        models = self.handoff.models
        options = models.options()
        options["session_close_transcript_timeout"] = self.line.bounds.last_words
        # the phrases prepared while the phone rings (``ConsultAgent.prepare_voice``) may each
        # fail, and are then said live: their failures must not close the session (the
        # framework closes it after 3 in a row)
        options["conn_options"] = SessionConnectOptions(
            max_unrecoverable_errors=SessionConnectOptions.max_unrecoverable_errors
            + len(ConsultAgent.PREPARED)
        )
        if models.vad is not None:
            options["turn_handling"] = {**(models.turn_handling or {}), "turn_detection": "vad"}
        return options

    @property
    def amd(self) -> dict[str, Any]:
        """What answering-machine detection said: its verdict's, once screening gave one,
        else the latest it heard (the human hung up first), or nothing (unscreened)."""
        if self.verdict is not None:
            return self.verdict.amd
        return self.screening.amd if self.screening is not None else {}

    def _keep_brief(self, composing: asyncio.Future[str]) -> None:
        if not composing.cancelled() and composing.exception() is None:
            self.brief = composing.result()

    def _show_brief(self, composing: asyncio.Future[str]) -> None:
        """The consult room's agent carries the brief, for the human's softphone or CRM."""
        if self.brief and self.is_open:
            self.handoff.publish({"handoff.brief": redact(self.brief)}, room=self.name)

    async def decision(self, tasks: utils.aio.TaskSet, *, brief: bool = True) -> Decision:
        """Nothing about the caller until a person is confirmed (``Screening``); then the
        brief, in full; then their decision. Without ``brief`` (conference mode) a confirmed
        person is joined at once and introduced in front of the caller."""
        h, agent = self.handoff, self.agent
        assert agent is not None
        human_left = self.human_left = tasks.create_task(
            self.line.wait_for_hangup(self.name, (h.human_call.identity,))
        )
        hears = h.models.stt is not None and h.models.vad is not None
        if h.destination.screening == "none" or not hears:
            if not brief:
                return Decision(HandoffOutcome.CONNECTED)
            return await agent.brief_on_hello(human_left, h.settings.hello_grace)
        screening = self.screening = Screening(
            agent,
            line=self.line,
            room=self.name,
            human=h.human_call.identity,
            extension=bool(h.destination.extension),
            briefing=brief,
            timings=h.timings,
            ring_deadline=h.timings["dial_start"] + h.ring_timeout,
        )
        gone = Decision(HandoffOutcome.DECLINED, "the human hung up during the briefing")
        try:
            run = await _finished_before(screening.run(h.settings.hello_grace), human_left)
            if run is None:
                return gone
            verdict = self.verdict = run.result()
            if verdict.outcome is not None:
                return Decision(verdict.outcome, verdict.reason)
            if screening.opener is not None:
                await screening.opener  # the details start when the opener has ended
            if not brief:
                return Decision(HandoffOutcome.CONNECTED)
            details = agent.speak_details(screening.human_stopped)
            if await _finished_before(details, human_left) is None:
                return gone
            return await agent.wait_for_decision(human_left)
        finally:
            screening.close()

    async def tell(self, text: str, within: float = 8.0) -> None:
        """Speak to the human in the room, if they are still there, for at most ``within`` s."""
        human_there = self.human_left is not None and not self.human_left.done()
        if text and human_there and self.is_open and self.agent is not None:
            with contextlib.suppress(Exception):
                speech = self.agent.session.say(text, allow_interruptions=False)
                await asyncio.wait_for(speech.wait_for_playout(), within)

    def close(self, *, keep_room: bool = False) -> None:
        """Close the room; ``keep_room``: only its session, a bridged human stays in it."""
        if self.is_open:
            self.is_open = False
            self.line.clean_up_later(
                self.line.close_consult(self.name, keep_room=keep_room),
                "close the consult room",
                # the session's last words, the room's deletion, then its relays
                bound=self.line.bounds.last_words
                + self.line.bounds.clean_up
                + self.line.bounds.server_call,
            )


class Handoff:
    """One attempt to hand the caller to one destination.

    ``run()`` always returns one result and always leaves the line clean: hold off, no ringing
    phone, no stray leg, no consult room. While it runs the caller is on an *interactive* hold
    (``CallerHold``, ``reply_on_hold``): they may ask how long, or say never mind.

    Why not the framework's ``beta.workflows.WarmTransferTask``: it dials only after the
    caller has been put on hold, briefs whoever picks up (a voicemail too), needs a media
    server to run at all, and leaves a lost move or a hanging clean-up to the caller's patience.
    This class keeps its shape (hold, dial, brief in a consult room, move) and adds the rest.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        line: PhoneLine,
        session: AgentSession,
        destination: Destination,
        reason: str,
        models: Models,
    ) -> None:
        self.settings = settings
        self.line = line
        self.session = session
        self.destination = destination
        self.reason = reason
        self.models = models
        self.mode = settings.mode_in_force
        self.attempt = uuid.uuid4().hex[:8]
        self.timings: dict[str, float] = {"decision": time.monotonic()}
        self.human_call = HumanCall(
            settings=settings,
            line=line,
            destination=destination,
            attempt=self.attempt,
            reason=reason,
            timings=self.timings,
        )
        self.phase = Phase.ANNOUNCING
        self.outcome: HandoffOutcome | None = None  # once ``run()`` has its result
        self.hold = CallerHold(
            session=session,
            line=line,
            team=destination.said_as,
            phrases=models.phrases,
            check_in_every=settings.hold_reassure_every,
            on_hold=lambda: self.on_hold,
            now_on_hold=self.caller_now_on_hold,
        )
        self.tasks = utils.aio.TaskSet()
        self._attributes_sent: asyncio.Future[None] | None = None
        self.publish({"handoff.state": Phase.ANNOUNCING.value, "handoff.outcome": ""})
        self.consult_room = ConsultRoom(self)  # where the human is screened (and briefed)
        self.joined_by: JoinWay | None = None  # once the human is on the way to the caller
        self._caller_left: asyncio.Future[str] | None = None
        self._stopped: asyncio.Future[tuple[HandoffOutcome, str]] = (
            asyncio.get_running_loop().create_future()
        )
        # the job is shutting down (``shut_down``): nothing is waited for past ``_words_until``
        self._shutting_down: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._words_until = math.inf

    @property
    def ring_timeout(self) -> float:
        return self.human_call.ring_timeout

    @property
    def consult(self) -> ConsultAgent | None:
        """The agent in the consult room, once it was opened."""
        return self.consult_room.agent

    @property
    def on_hold(self) -> bool:
        return self.phase in ON_HOLD and not self._stopped.done()

    def caller_now_on_hold(self) -> None:
        """Called by ``CallerHold`` once "please hold" has been said and hold music starts."""
        self.timings["hold"] = time.monotonic()
        if self.phase is Phase.ANNOUNCING:  # a human may already be on the line (briefing)
            self._enter(Phase.RINGING)

    # -- stopping from outside: the caller changes their mind, the worker shuts down ----------

    def stop(self, outcome: HandoffOutcome, detail: str) -> None:
        """End the attempt from outside the flow (before the merge); ``run()`` cleans up."""
        if not self._stopped.done() and self.phase in BEFORE_MERGE:
            self._stopped.set_result((outcome, detail))

    def shut_down(self, reason: str, words_until: float) -> None:
        """The job is shutting down: the attempt ends at once, whatever its phase before the
        merge, a move or a bridge in flight too. Neither is waited for: a move's own bound
        (``Bounds.move``, then the look for the human) is longer than the shutdown, and either
        may hang; ``WarmHandoffAgent.shutdown_handoff`` ends every leg wherever the human is.
        The human, if still in the consult room, is told, until ``words_until``
        (``time.monotonic()``); nothing else is waited for past it."""
        self._words_until = words_until
        if not self._shutting_down.done():
            self._shutting_down.set_result(None)
        if not self._stopped.done() and self.phase is not Phase.MERGED:
            self._stopped.set_result((HandoffOutcome.FAILED, reason))

    def _words_left(self, usual: float) -> float:
        """``usual``, or less at shutdown: what is left until ``_words_until``."""
        return max(0.0, min(usual, self._words_until - time.monotonic()))

    def reply_on_hold(self, said: str) -> str:
        """The reply to what the caller ``said`` on hold. A request to stop the transfer
        ("never mind", "cancel that", ``CANCEL_WORDS``) stops it (the human's phone stops
        ringing) and gets no reply here: "" (the transfer tool tells the caller). Anything
        else, "I want to cancel my subscription" too, gets where things stand."""
        if CANCEL_WORDS.search(said):
            self.stop(HandoffOutcome.CANCELLED_BY_CALLER, "the caller said never mind")
            return ""  # the transfer tool tells the caller it is cancelled
        waited = int(time.monotonic() - self.timings.get("hold", self.timings["decision"]))
        if self.phase is Phase.BRIEFING:
            return BEING_BRIEFED.format(team=self.destination.said_as)
        return STILL_TRYING.format(team=self.destination.said_as, waited=waited)

    # -- the attempt ----------------------------------------------------------------------------

    async def run(self) -> HandoffResult:
        flow = asyncio.ensure_future(self._screened())
        caller_left = self._caller_left = asyncio.ensure_future(
            self.line.wait_for_hangup(self.line.caller_room, (self.line.caller_identity,))
        )
        try:
            waits: set[asyncio.Future[Any]] = {flow, caller_left, self._stopped}
            done, _ = await asyncio.wait(
                waits,
                timeout=self.settings.max_hold,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if flow not in done and self.phase is Phase.MERGING:
                # A move in flight is never abandoned half way: the line bounds it and finds
                # where the human is, so wait for it rather than cancel it. Except at shutdown
                # (``shut_down``): then every leg is ended wherever the human is.
                merging: set[asyncio.Future[Any]] = {flow, self._shutting_down}
                await asyncio.wait(merging, return_when=asyncio.FIRST_COMPLETED)
            if flow.done():
                return flow.result()
            await utils.aio.cancel_and_wait(flow)
            return await self._ended_from_outside(caller_left_first=caller_left in done)
        except Exception as e:
            logger.error(
                "handoff to %s failed in room %s: %r",
                self.destination.name,
                self.line.caller_room,
                e,
            )
            return self._result(HandoffOutcome.FAILED, detail=str(e))
        finally:
            caller_left.cancel()
            await self._clean_up()

    async def _ended_from_outside(self, *, caller_left_first: bool) -> HandoffResult:
        """The flow was stopped before its end: by the caller hanging up, a stop (never mind,
        shutdown) or ``HANDOFF_MAX_HOLD``. The human, if on the line, is told why."""
        if self.phase is Phase.MERGED:  # only "You're now connected" was left to say
            return self._result(HandoffOutcome.CONNECTED)
        within = self._words_left(8.0)
        if caller_left_first:
            await self.consult_room.tell(HUMAN_CALLER_LEFT, within)
            return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
        if self._stopped.done():
            outcome, detail = self._stopped.result()
            cancelled = outcome is HandoffOutcome.CANCELLED_BY_CALLER
            await self.consult_room.tell(HUMAN_CANCELLED if cancelled else HUMAN_CALL_ENDS, within)
            return self._result(outcome, detail=detail)
        await self.consult_room.tell(HUMAN_MAX_HOLD, within)
        return self._result(HandoffOutcome.NO_ANSWER, detail="maximum hold time reached")

    def _result(
        self, outcome: HandoffOutcome, *, sip_status: int | None = None, detail: str = ""
    ) -> HandoffResult:
        self.outcome = outcome
        self.timings["ended"] = time.monotonic()
        connected = outcome is HandoffOutcome.CONNECTED
        if not connected:
            self.timings.setdefault("returned", self.timings["ended"])
        self.publish(
            {
                "handoff.state": "connected" if connected else "returned",
                "handoff.outcome": outcome.value,
            }
        )
        if "hold" in self.timings:
            ended = self.timings.get("merged", self.timings["ended"])
            self.timings["held"] = ended - self.timings["hold"]
        return HandoffResult(
            outcome,
            self.destination.name,
            self.mode,
            sip_status,
            detail,
            self.human_call.leg if self.phase is Phase.MERGED else None,
            self.timings,
            attempt=self.attempt,
            reason=self.reason,
            phase=self.phase,
            brief=self.consult_room.brief,
            amd=self.consult_room.amd,
            joined_by=self.joined_by,
        )

    async def _clean_up(self) -> None:
        """Whatever happened, nobody is left waiting for someone who is gone. Local steps
        happen now; server calls go on in the background, each bounded, so the caller is
        spoken to before a slow server finishes."""
        for task in self.tasks.tasks:
            task.cancel()
        await self._quietly(asyncio.wait_for(self.hold.end(), self.line.bounds.server_call))
        caller_gone = self.outcome is HandoffOutcome.CALLER_LEFT
        leg = self.human_call.leg
        if leg is not None and (self.phase is not Phase.MERGED or caller_gone):
            self.line.clean_up_later(self.line.hang_up(leg), "hang up the human's leg")
        bridged = self.phase is Phase.MERGED and self.joined_by is JoinWay.BRIDGE
        self.consult_room.close(keep_room=bridged and not caller_gone)  # a bridged human stays
        if caller_gone:  # a leg moved in at the last moment must not ring on alone
            self.line.clean_up_later(
                self.line.delete_room(self.line.caller_room), "delete the caller's room"
            )
        if self._attributes_sent is not None:
            await self._quietly(asyncio.wait_for(self._attributes_sent, self._words_left(2.0)))

    async def _quietly(self, step: Awaitable[Any]) -> None:
        try:
            await step
        except Exception as e:
            logger.warning("handoff clean-up step failed in room %s: %r", self.line.caller_room, e)

    def _enter(self, phase: Phase) -> None:
        """Move to the next phase and show it on the agent's attributes, so a dashboard can
        say "ringing support"."""
        self.phase = phase
        self.timings.setdefault(phase.value, time.monotonic())
        self.publish({"handoff.state": phase.value})

    def publish(self, attributes: dict[str, str], room: str = "") -> None:
        """Queue an attribute update; updates are sent one after another, in order."""
        update = {
            "handoff.attempt": self.attempt,
            "handoff.destination": self.destination.name,
            "handoff.mode": self.mode.value,
            **attributes,
        }
        previous = self._attributes_sent

        async def send() -> None:
            if previous is not None:
                await previous
            await self.line.set_attributes(room or self.line.caller_room, update)

        self._attributes_sent = asyncio.ensure_future(send())

    # -- the two modes --------------------------------------------------------------------------

    async def _ring(self, dial: asyncio.Future[Leg]) -> HandoffResult | None:
        """Wait for an answer: None once someone answered, else the failed attempt's result."""
        try:
            await dial
        except DialFailed as e:
            logger.info(
                "dial to %s (%s) in room %s: %s",
                self.destination.name,
                mask_number(self.destination.target),
                self.line.caller_room,
                e.detail,
            )
            return self._result(e.outcome, sip_status=e.sip_status, detail=e.detail)
        self.timings["answered"] = time.monotonic()
        return None

    async def _screened(self) -> HandoffResult:
        """Every mode: the human is dialled into a private room and screened there, so the
        caller never hears who answers and a mailbox never hears about the caller; in consult
        mode they are briefed and asked too. Then they are joined to the caller."""
        room = self.consult_room
        opening, composing = room.open()
        dial = self.human_call.start(room.name)
        # "Please hold" goes on while the phone rings, and while the human is screened if they
        # answer before it ends: the two sessions are apart, and screening must hear the leg
        # from the moment it is active.
        announce = self.tasks.create_task(self.hold.announce_and_hold())
        try:
            await opening
            room.ready(composing)
            if (failed := await self._ring(dial)) is not None:
                await announce  # the caller hears "please hold" in full, then what happened
                return failed
        finally:
            dial.cancel()
            opening.cancel()
            if not composing.done() and self.human_call.leg is None:
                composing.cancel()
        self._enter(Phase.BRIEFING)
        decision = await room.decision(self.tasks, brief=self.mode is HandoffMode.CONSULT)
        await announce  # the caller is on hold before anything else is said to them
        self.timings["accepted" if decision.accepted else "declined"] = time.monotonic()
        if decision.accepted:
            return await self._join()
        await room.tell(decision.farewell)
        return self._result(decision.outcome, detail=decision.reason)

    def consult_agent(self, brief: asyncio.Future[str], transcript: str) -> ConsultAgent:
        """The agent that briefs the human (the benchmark's reference orderings override it)."""
        return ConsultAgent.for_attempt(self, brief, transcript)

    async def _join(self) -> HandoffResult:
        """Bring the human to the caller: by a move where the server has MoveParticipant, else
        (and after any refused move, the human still in the consult room) by a bridge."""
        assert self.human_call.leg is not None
        self._enter(Phase.MERGING)
        try:
            if self.line.join_way is JoinWay.MOVE:
                self.joined_by = JoinWay.MOVE
                try:
                    return await self._move()
                except MoveRefused as e:
                    if e.unsupported:  # logged once, by the line, for the worker's life
                        self.line.move_unsupported()
                    else:
                        logger.warning(
                            "move refused in room %s (%s): bridging instead",
                            self.line.caller_room,
                            e,
                        )
            self.joined_by = JoinWay.BRIDGE
            await self.line.bridge(self.human_call.leg, self.line.caller_room)
        except LegLost as e:
            if e.caller or self._caller_gone():
                await self.consult_room.tell(HUMAN_CALLER_LEFT)
                return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
            logger.warning("human lost while joining in room %s: %s", self.line.caller_room, e)
            return self._result(HandoffOutcome.FAILED, detail=str(e))
        if self._caller_gone():
            await self.consult_room.tell(HUMAN_CALLER_LEFT)
            return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
        return await self._connected()

    def _caller_gone(self) -> bool:
        return self._caller_left is not None and self._caller_left.done()

    async def _move(self) -> HandoffResult:
        assert self.human_call.leg is not None
        await self.line.move(self.human_call.leg, self.line.caller_room)
        self.human_call.leg = replace(self.human_call.leg, room=self.line.caller_room)
        # Only once the human is really in the caller's room is the call merged: the move
        # takes time, and watching for hang-ups before they arrive would read as one.
        if not await self.line.wait_for_arrival(
            self.line.caller_room, self.human_call.leg.identity, self.line.bounds.move
        ):
            raise LegLost("the human did not arrive in the caller's room")
        if self._caller_gone():
            # they arrive to nobody: the caller's room is deleted (see _clean_up)
            return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
        return await self._connected()

    async def _connected(self) -> HandoffResult:
        """Merged, hold music off, and the agent's last words: "you're now connected", or in
        conference mode the introduction; a bridged human hears them from the consult room,
        at the same time as the caller."""
        if self.mode is HandoffMode.CONFERENCE:
            words = CONFERENCE_INTRODUCTION.format(
                business=self.settings.business_name,
                reason=self.reason,
                team=self.destination.said_as,
            )
        else:
            words = NOW_CONNECTED.format(team=self.destination.said_as)
        self._enter(Phase.MERGED)  # times "merged" too
        await self.hold.end()
        to_caller = self.session.say(words, allow_interruptions=False)
        if self.joined_by is JoinWay.BRIDGE:
            await asyncio.gather(to_caller.wait_for_playout(), self.consult_room.tell(words))
        else:
            await to_caller
        return self._result(HandoffOutcome.CONNECTED)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 6. The agents: the receptionist the caller talks to, and the one that briefs the human
# ──────────────────────────────────────────────────────────────────────────────────────────────


# What an agent's ``llm_node`` yields (livekit-agents ``voice/agent.py``, ``Agent.llm_node``).
ModelOutput: TypeAlias = "AsyncIterable[llm.ChatChunk | str | FlushSentinel]"


class ConsultAgent(Agent):
    """Talks to the human in the private consult room: brief, answer questions, take the
    decision. The brief is composed while the phone rings and spoken as soon as the human
    says hello, without a model round-trip."""

    def __init__(
        self,
        *,
        brief: asyncio.Future[str],
        transcript: str,
        business: str,
        team: str,
        reason: str,
        models: Models,
        timings: dict[str, float],
    ) -> None:
        super().__init__(
            instructions=CONSULT_INSTRUCTIONS.format(
                business=business,
                team=team,
                reason=reason,
                transcript=transcript or NOTHING_SAID_YET,
            ),
        )
        self._brief = brief
        self._brief_intro = BRIEF_INTRO.format(business=business, team=team)
        self._models = models  # the caller's: their voice, and the phrase cache
        self.timings = timings  # the attempt's: when the brief starts and ends
        self.opener = OPENER.format(business=business)
        self.question = ASK_PERSON.format(team=team)
        self.introduction = DETAILS_INTRO.format(team=team).strip()
        self.introduced: SpeechHandle | None = None  # the introduction, once said
        self.voice: dict[str, list[rtc.AudioFrame]] = {}  # pre-synthesised, by line
        self.details_heard = False
        self.unscreened = False
        self.person_confirmed = asyncio.Event()  # a key press or a yes before the details
        self.asked = False  # the leg was asked whether a person is there
        self._decision: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self.brief_started = asyncio.Event()

    @classmethod
    def for_attempt(
        cls, handoff: Handoff, brief: asyncio.Future[str], transcript: str
    ) -> ConsultAgent:
        """The consult agent of ``handoff``'s attempt."""
        return cls(
            brief=brief,
            transcript=transcript,
            business=handoff.settings.business_name,
            team=handoff.destination.said_as,
            reason=handoff.reason,
            models=handoff.models,
            timings=handoff.timings,
        )

    PREPARED = ("opener", "question", "introduction", "brief")  # what ``prepare_voice`` prepares

    async def prepare_voice(self, tts: TTS) -> None:
        """Synthesise what the human may hear while the phone rings (the neutral opener, the
        question, the details' introduction, the brief), so none of it waits for speech
        synthesis once they answer. Each is prepared on its own, at once (the brief once
        composed), with one try and within ``spoken_seconds``; one not ready when it is due is
        said live (``audio_for``, ``said_for``)."""

        async def brief() -> None:
            await self._prepare("brief", await self.details(), tts)

        await asyncio.gather(
            self._prepare("opener", self.opener, tts, keep=True),  # the same on every call
            self._prepare("question", self.question, tts, keep=True),
            self._prepare("introduction", self.introduction, tts, keep=True),
            brief(),
        )

    async def _prepare(self, name: str, text: str, tts: TTS, *, keep: bool = False) -> None:
        """One phrase into ``voice``: from the phrase cache if ``keep`` (and saved there once
        synthesised), else synthesised; a failure or a timeout leaves it to be said live."""
        phrases = self._models.phrases
        cache = phrases if keep and phrases is not None and phrases.usable else None
        path = cache.path_for(text) if cache is not None else None
        if cache is not None and path is not None and (saved := await cache.load(path)) is not None:
            self.voice[name] = saved
            return
        bound = spoken_seconds(text)
        try:
            async with tts.synthesize(text, conn_options=one_try(text)) as stream:
                frames = await asyncio.wait_for(_collected(stream), bound)
        except Exception as e:  # a timeout too
            logger.warning(
                "could not prepare the %s's audio within %.1f s, it will be live: %r",
                name,
                bound,
                e,
            )
            return
        self.voice[name] = frames
        if cache is not None and path is not None and frames:
            await asyncio.to_thread(cache.store, path, frames)

    def audio_for(self, name: str, text: str) -> PhraseAudio:
        """What plays ``text`` outside the session: its prepared audio if ready, else live
        speech at once (words alone with no TTS at all)."""
        tts = self._models.tts
        return self.voice.get(name) or (live_speech(tts, text) if tts is not None else [])

    def said_for(self, name: str) -> AsyncIterable[rtc.AudioFrame] | NotGiven:
        """The ``audio`` for ``session.say``: the prepared phrase if ready, else NOT_GIVEN
        (the session says it live at once)."""
        prepared = self.voice.get(name)
        return _replay(prepared) if prepared else NOT_GIVEN

    async def details(self) -> str:
        """The brief as said after the opener and the details' introduction
        (``DETAILS_INTRO``: who speaks, for whom), once a person is confirmed: what is about
        the caller, without the brief's own introduction."""
        return (await asyncio.shield(self._brief)).removeprefix(self._brief_intro)

    def introduce(self) -> SpeechHandle:
        """Start the details with their introduction, which says nothing about the caller (a
        screening may still cut it short: ``Screening._quiet_after``). Interruptible, so what
        the leg says over it is transcribed (the session hears silence under speech it cannot
        interrupt); one cut short is said again before the brief (``speak_details``)."""
        if self.introduced is None:
            self.timings.setdefault("brief_start", time.monotonic())
            self.introduced = self.session.say(
                self.introduction, audio=self.said_for("introduction"), allow_interruptions=True
            )
        return self.introduced

    def decide(self, decision: Decision) -> None:
        if not self._decision.done():
            self._decision.set_result(decision)

    def on_digit(self, digit: str) -> None:
        if not self.details_heard:  # before the details, any key says "a person is here"
            self.person_confirmed.set()
        elif digit == "1":
            self.decide(Decision(HandoffOutcome.CONNECTED))
        elif digit == "2":
            self.decide(Decision(HandoffOutcome.DECLINED, "declined on the keypad"))

    async def speak_details(self, human_stopped: Callable[[], Awaitable[Any]]) -> None:
        """The details: their introduction unless screening said it, then the brief, in full:
        if the human talks over either before it was heard, it is said again once they stop;
        it is never replaced by a model reply."""
        parts = [("brief", await self.details())]
        if self.introduced is None or self.introduced.interrupted:
            parts.insert(0, ("introduction", self.introduction))
        for name, text in parts:
            while not self._decision.done():
                self.timings.setdefault("brief_start", time.monotonic())
                handle = self.session.say(text, audio=self.said_for(name), allow_interruptions=True)
                await handle.wait_for_playout()
                if not handle.interrupted:
                    break
                await human_stopped()
        if not self._decision.done():
            self.details_heard = True
            self.timings.setdefault("brief_end", time.monotonic())

    async def wait_for_decision(self, human_left: asyncio.Future[str]) -> Decision:
        waits: set[asyncio.Future[Any]] = {self._decision, human_left}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self._decision in done:
            return self._decision.result()
        return Decision(HandoffOutcome.DECLINED, "the human hung up during the briefing")

    async def brief_on_hello(self, human_left: asyncio.Future[str], grace: float) -> Decision:
        """Unscreened (``screening: none``, or a line the session cannot hear, like the
        console's text-only human): the brief on the human's hello, or after ``grace`` s."""
        self.unscreened = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.brief_started.wait()), grace)
        if not self.brief_started.is_set() and not self._decision.done():
            self.session.generate_reply()
        return await self.wait_for_decision(human_left)

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[llm.Tool], model_settings: ModelSettings
    ) -> ModelOutput:
        if self.details_heard:
            async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
                yield chunk
            return
        if self._decision.done() or not self.unscreened:
            return  # screening speaks for itself: no model reply before the details
        # Unscreened: until the brief has actually been spoken, every reply is the brief (a
        # preemptive generation that the framework throws away must not lose it).
        self.brief_started.set()
        heard = last_said_by_user(chat_ctx)
        if heard and VOICEMAIL_HINTS.search(heard):
            self.decide(Decision(HandoffOutcome.VOICEMAIL, "a voicemail greeting answered"))
            return
        text = await asyncio.shield(self._brief)  # a dropped reply must not cancel the brief
        self.timings["brief_start"] = time.monotonic()
        self.session.on("conversation_item_added", self._brief_spoken)
        yield text

    def _brief_spoken(self, ev: ConversationItemAddedEvent) -> None:
        if getattr(ev.item, "role", None) == "assistant" and not self.details_heard:
            self.details_heard = True
            self.timings.setdefault("brief_end", time.monotonic())

    @function_tool
    async def connect_to_caller(self, context: RunContext) -> None:
        """Call when the staff member agrees to take the call."""
        self.decide(Decision(HandoffOutcome.CONNECTED))

    @function_tool
    async def decline_transfer(self, context: RunContext, reason: str) -> None:
        """Call when the staff member can't or won't take the call.

        Args:
            reason: Their reason, in a few words.
        """
        self.decide(Decision(HandoffOutcome.DECLINED, reason))

    @function_tool
    async def voicemail_detected(self, context: RunContext) -> None:
        """Call when a voicemail greeting or an automated menu answered instead of a person."""
        self.decide(Decision(HandoffOutcome.VOICEMAIL, "voicemail or automated menu"))


TRANSFER_TOOLS = ("transfer_call", "transfer_to_number")


@dataclass
class ModelReply:
    """The tool calls of one model reply, as they stream in: tools of one reply run in
    parallel, so each can see what else the model asked for in the same turn."""

    calls: list[tuple[str, str]] = field(default_factory=list)  # (tool name, call id)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def first_transfer(self) -> str | None:
        return next((call_id for name, call_id in self.calls if name in TRANSFER_TOOLS), None)


TEAMS_NOW_ID = "warm-handoff.teams-now"  # the system message saying which teams are open now


class TeamChoice:
    """Which team the caller may be offered: opening hours, the one rule for offering a team
    again (``may_offer``), the operator's fallbacks, and the cap on dials per call."""

    def __init__(self, settings: Settings, now: Callable[[], datetime]) -> None:
        self.settings = settings
        self.destinations = settings.destinations
        self.now = now  # the clock opening hours are read with (aware datetimes)
        self.tried: list[Destination] = []  # every dial on this call, in order, repeats too
        self.ended: dict[Destination, HandoffOutcome] = {}  # how each one's last dial ended

    def is_open(self, destination: Destination, now: datetime | None = None) -> bool:
        """Whether ``destination`` takes calls now (one with no ``hours`` always does)."""
        hours = destination.hours
        return hours is None or hours.is_open(now or self.now())

    def opens(self, destination: Destination, now: datetime) -> str:
        """When a closed team opens next, as said ("" when it has no next opening)."""
        opens = destination.hours.next_opening(now) if destination.hours else None
        return when_it_opens(opens, now) if opens else ""

    def teams_now(self) -> str:
        """Which teams take calls right now, for the model; "" when no team has hours."""
        if not any(d.hours for d in self.destinations):
            return ""
        now = self.now()
        open_now = [d.name for d in self.destinations if self.is_open(d, now)]
        closed = [
            MODEL_CLOSED_TEAM.format(
                name=d.name, when=self.opens(d, now) or MODEL_OPENS_AT_NO_SET_TIME
            )
            for d in self.destinations
            if not self.is_open(d, now)
        ]
        return MODEL_TEAMS_NOW.format(
            open=", ".join(open_now) or MODEL_NO_TEAMS, closed=", ".join(closed) or MODEL_NO_TEAMS
        )

    def may_offer(self, destination: Destination) -> bool:
        """Never after it failed (busy, no answer, declined, voicemail, unreachable, or a
        technical failure); yes if it was never dialled, if the caller cancelled its last
        attempt (nothing was wrong with it), or if its human dropped right after the merge
        (``rejoined``: a bad line, a wrong button). Every dial, repeats included, counts toward
        ``HANDOFF_MAX_ATTEMPTS`` (``dials_left``)."""
        if destination not in self.ended:
            return True  # never dialled
        return self.ended[destination] in (
            HandoffOutcome.CANCELLED_BY_CALLER,
            HandoffOutcome.REJOINED,
        )

    @property
    def dials_left(self) -> bool:
        return len(self.tried) < self.settings.max_attempts

    def can_dial(self, destination: Destination, now: datetime | None = None) -> bool:
        """Whether ``destination`` may be dialled now: offerable, open, and a dial left."""
        return self.dials_left and self.may_offer(destination) and self.is_open(destination, now)

    def next_destination(self, after: Destination | None = None) -> Destination | None:
        """Who to offer after a failed attempt (or instead of the closed ``after``): the last
        destination's named fallback, else the first one ``may_offer`` allows in the
        operator's order; only a team open now; nobody once ``HANDOFF_MAX_ATTEMPTS`` dials were
        made."""
        now = self.now()
        offerable = [d for d in self.destinations if d != after and self.can_dial(d, now)]
        last = after or (self.tried[-1] if self.tried else None)
        preferred = next((d for d in offerable if last and d.name == last.fallback), None)
        return preferred or (offerable[0] if offerable else None)

    def what_next_for_caller(self) -> str:
        following = self.next_destination()
        if following is not None:
            return OFFER_ANOTHER_TEAM.format(team=following.said_as)
        return OFFER_CALLBACK

    def what_next_for_model(self) -> str:
        following = self.next_destination()
        offer = MODEL_TRY_NEXT.format(name=following.name) if following else ""
        return offer + MODEL_CALLBACK_STEPS


class CallbackDesk:
    """Callback requests: read back before they are recorded, recorded anyway if the caller
    hangs up during the read-back, and recorded for a caller who hung up on hold."""

    def __init__(self, line: PhoneLine, records: CallRecords) -> None:
        self.line = line
        self.records = records
        self.unconfirmed: CallbackRequest | None = None  # read back, not yet confirmed
        self.best_time = ""  # when the closed team last asked for opens: a callback's time
        self.last_brief = ""  # the best summary of the call for whoever calls back

    def request(
        self, name: str, best_time: str, number: str, reason: str, summary: str
    ) -> CallbackRequest | ToolResult:
        """The request, or what the model still has to ask for."""
        name, best_time = capped(name, 60, sentence=False), capped(best_time, 80)
        number = re.sub(r"[\s().-]", "", number) or self.line.caller_number
        if not E164.fullmatch(number):
            return ToolResult(MODEL_ASK_NUMBER)
        best_time = best_time.strip() or self.best_time
        if not best_time:
            return ToolResult(MODEL_ASK_BEST_TIME)
        return CallbackRequest(
            room=self.line.caller_room,
            caller_name=name,
            number=number,
            best_time=best_time,
            reason=reason or "asked for a callback",
            summary=self.last_brief or summary,
            source="caller",
        )

    async def read_back(self, session: AgentSession, request: CallbackRequest) -> ToolResult:
        # Kept until confirmed: a caller who hangs up now still gets their callback.
        self.unconfirmed = replace(request, source="abandoned")
        number = speakable_number(request.number)
        said = CALLBACK_READ_BACK.format(
            name=request.caller_name, number=number, best_time=request.best_time
        )
        if await self._caller_left_during(session.say(said)):
            self.record_unconfirmed()
            return ToolResult(MODEL_HUNG_UP_DURING_READ_BACK, reply_required=False)
        return ToolResult(MODEL_READ_BACK_DONE, reply_required=False)

    async def confirm(self, session: AgentSession, request: CallbackRequest) -> ToolResult:
        self.unconfirmed = None
        self.records.callback(request)
        await self.records.written()  # on disk (off the loop) before the caller is told so
        await session.say(
            CALLBACK_CONFIRMED.format(name=request.caller_name, when=sentence(request.best_time))
        )
        return ToolResult(MODEL_CALLBACK_RECORDED, reply_required=False)

    async def _caller_left_during(self, speech: SpeechHandle) -> bool:
        """Wait for ``speech`` to be played; True if the caller hung up first."""

        async def played() -> None:
            await speech

        playing = asyncio.ensure_future(played())
        left = asyncio.ensure_future(
            self.line.wait_for_hangup(self.line.caller_room, (self.line.caller_identity,))
        )
        try:
            await asyncio.wait({playing, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            playing.cancel()
            left.cancel()
        return left.done() and not left.cancelled() and left.exception() is None

    def record_unconfirmed(self) -> None:
        """The caller left before confirming the read-back: record what they gave so far."""
        request, self.unconfirmed = self.unconfirmed, None
        if request is not None:
            self.records.callback(request)

    def record_abandoned(self, result: HandoffResult, summary: str) -> None:
        """The caller hung up while being transferred: someone should call them back."""
        number = self.line.caller_number
        self.records.callback(
            CallbackRequest(
                room=self.line.caller_room,
                caller_name="",
                number=number if E164.fullmatch(number) else "",
                best_time="as soon as possible",
                reason=f"{result.reason} (hung up while being transferred to {result.destination})",
                summary=result.brief or self.last_brief or summary,
                source="abandoned",
            )
        )


class SafetyNet:
    """After the merge the agent steps out; the caller's room stays open for the two people and
    is deleted as soon as either hangs up, so no leg lingers (when the job ends,
    ``WarmHandoffAgent.shutdown_handoff`` tells them why, then deletes it).

    For ``HANDOFF_REJOIN_WINDOW`` seconds after the merge the agent first stays in the room,
    parked (``park``): it hears and says nothing. If the human leaves in that window while the
    caller is still there, the agent speaks again (``rejoin``)."""

    def __init__(self, agent: WarmHandoffAgent) -> None:
        self.agent = agent
        self.line = agent.line
        self.job_ending = agent.job_ending

    async def step_out(self, destination: Destination, result: HandoffResult) -> None:
        session, room, leg = self.agent.session, self.line.caller_room, result.leg
        if leg is None:
            session.shutdown()
            return
        hangup = asyncio.ensure_future(self._first_to_hang_up(leg))
        ending = asyncio.ensure_future(self.job_ending.wait())
        try:
            window = self.agent.settings.rejoin_window
            if window > 0 and not self.job_ending.is_set():
                self.park(True)
                await asyncio.wait(
                    {hangup, ending}, timeout=window, return_when=asyncio.FIRST_COMPLETED
                )
                human_left = (
                    hangup.done() and not hangup.exception() and hangup.result() == leg.identity
                )
                if human_left and not ending.done():
                    if await self.line.wait_for_arrival(room, self.line.caller_identity, 0):
                        await self._unbridge(leg)
                        await self.rejoin(destination, result)
                        return
            if not self.job_ending.is_set():  # at shutdown the framework closes it
                session.shutdown()
            await asyncio.wait({hangup, ending}, return_when=asyncio.FIRST_COMPLETED)
            if not hangup.done():
                return  # the job is ending: the caller is told why, then every leg is ended
            await asyncio.gather(self.line.delete_room(room), self._unbridge(leg))
        finally:
            hangup.cancel()
            ending.cancel()

    async def _first_to_hang_up(self, leg: Leg) -> str:
        """The identity of whoever leaves first: the caller, or the human wherever they are
        (in the caller's room once moved, in their own room when bridged)."""
        caller_room, caller = self.line.caller_room, self.line.caller_identity
        if leg.room == caller_room:
            return await self.line.wait_for_hangup(caller_room, (caller, leg.identity))
        waits = [
            asyncio.ensure_future(self.line.wait_for_hangup(caller_room, (caller,))),
            asyncio.ensure_future(self.line.wait_for_hangup(leg.room, (leg.identity,))),
        ]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for wait in waits:
                wait.cancel()

    async def _unbridge(self, leg: Leg) -> None:
        """A bridged human's room goes with the bridge: its relays stop, their leg ends."""
        if leg.room != self.line.caller_room:
            await self.line.close_consult(leg.room)

    def park(self, parked: bool) -> None:
        """Parked, the caller's session stays connected but hears and says nothing: its audio
        input is detached (RoomIO drops the caller's frames, livekit-agents
        ``voice/room_io/_input.py`` ``_forward_task``), so no speech-to-text runs, no turn
        ends and no model is asked; its audio output is off. Unparked, both come back."""
        self.agent.session.input.set_audio_enabled(not parked)
        self.agent.session.output.set_audio_enabled(not parked)

    async def rejoin(self, destination: Destination, result: HandoffResult) -> None:
        """The human dropped within the window, the caller is still there: the attempt is
        recorded again as ``rejoined`` (same ``attempt`` id) and the agent, back on the line,
        offers the same team again (``may_offer``), another, or a callback."""
        agent = self.agent
        merged = result.timings.get("merged", 0.0)
        rejoined = replace(
            result,
            outcome=HandoffOutcome.REJOINED,
            detail=f"the human left {time.monotonic() - merged:.1f}s after the merge",
            timings={**result.timings, "rejoined": time.monotonic()},
        )
        agent.record(rejoined, destination)
        logger.info(
            "the human left right after the merge in room %s: the agent is back",
            self.line.caller_room,
        )
        told, note = self._rejoin_words(destination)
        chat_ctx = agent.chat_ctx.copy()
        chat_ctx.add_message(role="system", content=note)
        await agent.update_chat_ctx(chat_ctx)
        self.park(False)
        try:
            await agent.session.say(told)
        except RuntimeError as e:  # the caller hung up too, a moment after the human
            logger.info("rejoin not spoken in room %s: %s", self.line.caller_room, e)

    def _rejoin_words(self, destination: Destination) -> tuple[str, str]:
        """What the caller hears when the agent is back, and the note that tells the model."""
        agent = self.agent
        again = agent.teams.can_dial(destination)
        other = agent.teams.next_destination(after=destination)
        options = ([REJOIN_TRY_AGAIN] if again else []) + (
            [REJOIN_TRY_OTHER.format(team=other.said_as)] if other else []
        )
        offer = ", ".join([*options, REJOIN_CALLBACK])
        if not options:
            offer = offer.removeprefix("or ")
        told = REJOINED.format(team=destination.said_as, offer=offer)
        same = (
            MODEL_REJOIN_SAME_TEAM.format(name=destination.name)
            if destination in agent.destinations
            else MODEL_REJOIN_SAME_NUMBER
        )
        note = (
            MODEL_REJOINED.format(team=destination.said_as, told=told)
            + (MODEL_REJOIN_AGAIN.format(same=same) if again else "")
            + (MODEL_REJOIN_OTHER.format(name=other.name) if other else "")
            + MODEL_CALLBACK_STEPS
        )
        return told, note


class ShutdownClock:
    """The call's ending at job shutdown, timed from its start (``shutdown_handoff``).

    The framework's kill clock (JOB_SHUTDOWN_TIMEOUT, ``Bounds.shutdown``) starts only once the
    caller's session has closed; the call's ending fits in that same time counted from the
    shutdown's start, so it never meets the kill whichever moment the clock counts from:

    - until ``words_until`` the caller and the human are told why the call ends, at the same
      time, each in their room (both sentences, at a voice's unhurried pace, fit);
    - then, for ``legs``, every leg is ended, until ``deadline``;
    - what is left of the framework's time is its own: closing the caller's session (its wait
      for the caller's last words, ``Bounds.last_words``) and leaving the room
      (``FRAMEWORK_STEPS``).

    Nothing at shutdown is waited for past its step: not a move in flight (``Bounds.move`` is
    longer than all of it), not a hanging server call."""

    FRAMEWORK_STEPS = 1.0  # the session's close besides its last words, and leaving the room

    def __init__(self, bounds: Bounds) -> None:
        self.start = time.monotonic()
        self.legs = bounds.shutdown / 10  # a DeleteRoom answers in well under a second
        self.deadline = self.start + bounds.shutdown - bounds.last_words - self.FRAMEWORK_STEPS
        self.words_until = self.deadline - self.legs

    def left(self, *, for_words: bool = False) -> float:
        """Seconds left until ``deadline`` (``for_words``: until ``words_until``)."""
        until = self.words_until if for_words else self.deadline
        return max(0.0, until - time.monotonic())


class WarmHandoffAgent(Agent):
    """The receptionist the caller talks to. Its one way to reach a person is ``transfer_call``,
    which takes a destination *name* from the operator's directory, never a number."""

    def __init__(
        self,
        settings: Settings,
        line: PhoneLine,
        models: Models,
        records: CallRecords | None = None,
        now: Callable[[], datetime] = utc_now,
        handoff_factory: Callable[..., Handoff] | None = None,
    ) -> None:
        self.settings = settings
        self.line = line
        self.models = models
        self.callbacks = CallbackDesk(line, records or CallRecords(line.caller_room))
        self.now = now  # the clock opening hours are read with (aware datetimes)
        self.destinations = settings.destinations
        self.teams = TeamChoice(settings, lambda: self.now())
        self.results: list[HandoffResult] = []
        self.handoff: Handoff | None = None  # the attempt in progress
        # how an attempt is made: the benchmark's reference orderings plug in here
        self.handoff_factory = handoff_factory or Handoff
        self._handoff_done = asyncio.Event()
        self.job_ending = asyncio.Event()  # shutdown_handoff: the agent stays for nothing more
        self.shutdown_clock: ShutdownClock | None = None  # once the job is shutting down
        self.safety_net = SafetyNet(self)
        self.leaving: asyncio.Future[None] | None = None  # stepping out, or hanging up
        self._reply = ModelReply()
        self._reply.complete.set()
        self._ending = False  # end_call said goodbye: no transfer starts any more
        tools: list[llm.Tool | llm.Toolset] = [self._transfer_tool()] if self.destinations else []
        if settings.allow_dial_pattern is not None:
            tools.append(self._direct_tool())
        super().__init__(
            instructions=CALLER_INSTRUCTIONS.format(
                business=settings.business_name,
                scope=settings.business_scope,
                teams="\n".join(f"- {d.name}: {d.description}" for d in self.destinations),
                direct=DIRECT_DIAL_NOTE if settings.allow_dial_pattern else "",
            ),
            tools=tools,
            **models.options(),
        )

    # -- the transfer tools -----------------------------------------------------------------------

    def _transfer_tool(self) -> llm.RawFunctionTool:
        schema = {
            "name": "transfer_call",
            "description": "Connect the caller with a person from one of the listed teams, "
            "after the caller has agreed.",
            "parameters": {
                "type": "object",
                "properties": {
                    "destination": {
                        "type": "string",
                        "enum": [d.name for d in self.destinations],
                        "description": "; ".join(
                            f"{d.name}: {d.description}" for d in self.destinations
                        ),
                    },
                    "reason": {
                        "type": "string",
                        "description": "What the caller needs, in a few words.",
                    },
                },
                "required": ["destination", "reason"],
                "additionalProperties": False,
            },
        }

        async def transfer_call(raw_arguments: dict[str, object], context: RunContext) -> object:
            if (refused := self._refuse_transfer(context)) is not None:
                return refused
            name = str(raw_arguments.get("destination", ""))
            destination = self.settings.destination(name)
            if destination is None:
                logger.warning(
                    "transfer_call refused an unknown destination in room %s", self.line.caller_room
                )
                teams = ", ".join(d.name for d in self.destinations)
                return ToolResult(MODEL_NO_SUCH_TEAM.format(name=name, teams=teams))
            return await self._hand_off(destination, str(raw_arguments.get("reason", "")))

        return function_tool(transfer_call, raw_schema=schema)

    def _direct_tool(self) -> llm.FunctionTool:
        pattern = self.settings.allow_dial_pattern
        assert pattern is not None

        async def transfer_to_number(context: RunContext, number: str, reason: str) -> object:
            """Connect the caller with a phone number they gave, if company policy allows it.

            Args:
                number: The number in international format, e.g. +15105550100.
                reason: What the caller needs, in a few words.
            """
            if (refused := self._refuse_transfer(context)) is not None:
                return refused
            number = re.sub(r"[\s().-]", "", number)
            if not (E164.match(number) and dial_allowed(pattern, number)):
                logger.warning(
                    "transfer_to_number refused %s in room %s",
                    mask_number(number),
                    self.line.caller_room,
                )
                return ToolResult(MODEL_NUMBER_NOT_ALLOWED)
            direct = Destination(
                "direct", number, "a number the caller gave", spoken_name=DIRECT_NUMBER_SAID_AS
            )
            return await self._hand_off(direct, reason)

        return function_tool(transfer_to_number)

    @property
    def records(self) -> CallRecords:
        """Where this call's records go (the callback desk writes to the same)."""
        return self.callbacks.records

    @property
    def connected(self) -> bool:
        """The caller was handed to a person: the agent has nothing more to say."""
        return any(r.connected for r in self.results)

    def may_offer(self, destination: Destination) -> bool:
        """The one rule for offering a destination (again) on this call (``TeamChoice``)."""
        return self.teams.may_offer(destination)

    def _refuse_transfer(self, context: RunContext) -> ToolResult | None:
        """Refuse, silently, a transfer once the caller is connected, or a second transfer
        in the same model reply (tools of one reply run in parallel)."""
        if self.connected:
            return ToolResult(MODEL_ALREADY_CONNECTED, reply_required=False)
        first = self._reply.first_transfer()
        if first is not None and first != context.function_call.call_id:
            logger.warning(
                "a second transfer in one turn was refused in room %s", self.line.caller_room
            )
            return ToolResult(MODEL_ONE_TRANSFER_PER_TURN, reply_required=False)
        return None

    async def _hand_off(self, destination: Destination, reason: str) -> ToolResult:
        if self.handoff is not None:
            return ToolResult(MODEL_TRANSFER_IN_PROGRESS, reply_required=False)
        if self._ending or self.job_ending.is_set():
            return ToolResult(MODEL_CALL_ENDING, reply_required=False)
        if not self.teams.is_open(destination):
            return await self._closed(destination, reason)
        if not self.teams.may_offer(destination):
            return ToolResult(
                MODEL_ALREADY_TRIED.format(name=destination.name) + self.teams.what_next_for_model()
            )
        if not self.teams.dials_left:
            return ToolResult(MODEL_NO_MORE_TRANSFERS + self.teams.what_next_for_model())
        self.teams.tried.append(destination)
        self.teams.ended[destination] = HandoffOutcome.FAILED  # until the attempt says otherwise
        self.handoff = self.handoff_factory(
            settings=self.settings,
            line=self.line,
            session=self.session,
            destination=destination,
            reason=capped(redact(reason)) or NO_REASON,
            models=self.models,
        )
        self._handoff_done.clear()
        try:  # done once the caller has been told what happened, not before
            try:
                result = await self.handoff.run()
            finally:
                self.handoff = None
            return await self._after_handoff(destination, result)
        finally:
            self._handoff_done.set()

    def record(self, result: HandoffResult, dialled: Destination | None = None) -> None:
        """The one place an attempt is kept: this call's results (an attempt recorded again,
        ``connected`` then ``rejoined``, keeps its place), how the dialled team's last attempt
        ended (``may_offer``), the records, and the brief for a later callback."""
        earlier = next((i for i, r in enumerate(self.results) if r.attempt == result.attempt), None)
        if earlier is None:
            self.results.append(result)
        else:
            self.results[earlier] = result
        if dialled is not None:
            self.teams.ended[dialled] = result.outcome
        self.records.handoff(result)
        if result.brief:
            self.callbacks.last_brief = result.brief

    async def _after_handoff(self, destination: Destination, result: HandoffResult) -> ToolResult:
        """Record the attempt and tell the caller what happens next."""
        self.record(result, destination)
        if result.connected:
            self.leaving = asyncio.ensure_future(self.safety_net.step_out(destination, result))
            return ToolResult(
                MODEL_CONNECTED.format(team=destination.said_as), reply_required=False
            )
        if result.outcome is HandoffOutcome.CALLER_LEFT:
            if result.phase in ON_HOLD:
                self.callbacks.record_abandoned(result, self._summary())
            return ToolResult(MODEL_CALLER_LEFT, reply_required=False)
        if self.job_ending.is_set():  # the caller hears why from ``shutdown_handoff``
            return ToolResult(MODEL_CALL_ENDING, reply_required=False)
        if result.outcome is HandoffOutcome.CANCELLED_BY_CALLER:
            await self.session.say(TRANSFER_STOPPED)
            return ToolResult(
                MODEL_CANCELLED_ON_HOLD.format(name=destination.name), reply_required=False
            )
        told = CALLER_HEARS[result.outcome.value].format(team=destination.said_as)
        await self.session.say(f"{told} {self.teams.what_next_for_caller()}")
        return ToolResult(
            sentence(
                MODEL_NOT_CONNECTED.format(name=destination.name, outcome=result.outcome.value)
                + (MODEL_DETAIL.format(detail=result.detail) if result.detail else "")
            )
            + MODEL_CALLER_TOLD
            + self.teams.what_next_for_model(),
            reply_required=False,
        )

    async def _closed(self, destination: Destination, reason: str) -> ToolResult:
        """A closed team was asked for: never dialled. The caller hears when it opens next and
        is offered an open team or a callback, at that time unless they choose another."""
        now = self.now()
        when = self.teams.opens(destination, now)
        self.callbacks.best_time = when
        result = HandoffResult(
            HandoffOutcome.CLOSED,
            destination.name,
            self.settings.mode_in_force,
            detail=f"outside opening hours; opens {when}" if when else "outside opening hours",
            timings={"decision": time.monotonic()},
            attempt=uuid.uuid4().hex[:8],
            reason=reason or NO_REASON,
            phase=None,
        )
        self.record(result)  # never dialled: nothing against the team
        team = destination.said_as[0].upper() + destination.said_as[1:]
        told = sentence((CLOSED_UNTIL if when else CLOSED_NOW).format(team=team, when=when))
        callback_at = when or CALLBACK_WHEN_OPEN_UNKNOWN
        following = self.teams.next_destination(after=destination)
        if following is not None:
            offer = CLOSED_OFFER_TEAM.format(team=following.said_as, when=sentence(callback_at))
        else:
            offer = CLOSED_OFFER_CALLBACK.format(when=sentence(callback_at))
        await self.session.say(f"{told} {offer}")
        return ToolResult(
            sentence(
                (MODEL_CLOSED_UNTIL if when else MODEL_CLOSED).format(
                    name=destination.name, when=when
                )
            )
            + MODEL_CALLER_TOLD
            + (MODEL_TRY_NEXT.format(name=following.name) if following else "")
            + MODEL_CLOSED_CALLBACK.format(when=callback_at),
            reply_required=False,
        )

    # -- the model: answered on hold, told which teams are open --------------------------------

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[llm.Tool], model_settings: ModelSettings
    ) -> ModelOutput:
        """While the caller is on hold, their words are answered here, at once and without a
        model request: where things stand, or, for "never mind", the transfer stops."""
        handoff = self.handoff
        if handoff is not None and handoff.phase in BEFORE_MERGE:
            words = handoff.reply_on_hold(last_said_by_user(chat_ctx))
            if words:
                yield words
            return
        self._show_teams_now(chat_ctx)
        reply = self._reply = ModelReply()
        try:
            async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
                delta = getattr(chunk, "delta", None)
                for call in (delta.tool_calls if delta is not None else None) or []:
                    reply.calls.append((call.name, call.call_id))
                yield chunk
        finally:
            reply.complete.set()

    def _show_teams_now(self, chat_ctx: llm.ChatContext) -> None:
        """Opening hours change during a call: the model sees which teams are open at the
        moment of each request, in a system message after its instructions. ``chat_ctx`` is
        this request's own copy (voice/agent_activity.py ``_pipeline_reply_task_impl``), so
        nothing stale stays in the history."""
        teams_now = self.teams.teams_now()
        if not teams_now:
            return
        with contextlib.suppress(ValueError):
            chat_ctx.remove(TEAMS_NOW_ID)  # from an earlier request of the same turn
        at = next(
            (
                i
                for i, item in enumerate(chat_ctx.items)
                if not (item.type == "message" and item.role == "system")
            ),
            len(chat_ctx.items),
        )
        chat_ctx.items.insert(
            at, llm.ChatMessage(id=TEAMS_NOW_ID, role="system", content=[teams_now])
        )

    # -- callbacks and the end of the call --------------------------------------------------------

    @function_tool
    async def request_callback(
        self,
        context: RunContext,
        name: str,
        best_time: str = "",
        number: str = "",
        confirmed: bool = False,
    ) -> ToolResult:
        """Record that a person should call the caller back. Call it first with the details,
        which are read back to the caller; then again with confirmed=true once they agree.

        Args:
            name: The caller's name.
            best_time: When they would like the call, in their words. Empty after a closed
                team was asked for: the time it opens.
            number: Only if they want a call on a different number than the one they are
                calling from, in international format. Otherwise leave empty.
            confirmed: True only after the caller said the read-back details are right.
        """
        if (refused := await self._refuse_callback()) is not None:
            return refused
        reason = self.results[-1].reason if self.results else ""
        request = self.callbacks.request(name, best_time, number, reason, self._summary())
        if isinstance(request, ToolResult):
            return request
        if not confirmed:
            return await self.callbacks.read_back(self.session, request)
        return await self.callbacks.confirm(self.session, request)

    async def _refuse_callback(self) -> ToolResult | None:
        """A callback is not taken once the caller is connected, during a transfer, or in the
        same model reply as a transfer (whichever of the two tools runs first)."""
        reply = self._reply
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reply.complete.wait(), 5)  # every call of this reply known
        if self.connected or self.handoff is not None or reply.first_transfer() is not None:
            return ToolResult(MODEL_NO_CALLBACK_WITH_TRANSFER, reply_required=False)
        return None

    def _summary(self) -> str:
        return conversation_transcript(self.session.history, limit=12)

    def call_ended(self) -> None:
        """The call is over (the session closed or the job shuts down): nothing left pending."""
        self.callbacks.record_unconfirmed()
        self.records.call_ended()

    @function_tool
    async def end_call(self, context: RunContext) -> ToolResult:
        """Say goodbye and hang up, when the caller is done: they said goodbye, or that they
        need nothing else. Not when they ask to hold or for a person, not while they are
        being transferred, and not when unsure."""
        if self.handoff is not None:
            logger.info(
                "end_call refused in room %s: a transfer is in progress", self.line.caller_room
            )
            return ToolResult(MODEL_NOT_ENDED_IN_TRANSFER, reply_required=False)
        if self._ending:
            return ToolResult(MODEL_ALREADY_ENDING, reply_required=False)
        self._ending = True
        await self.session.say(
            GOODBYE.format(business=self.settings.business_name), allow_interruptions=False
        )
        self.callbacks.record_unconfirmed()
        self.records.call_ended(outcome="completed")
        self.leaving = asyncio.ensure_future(self._hang_up())
        return ToolResult(MODEL_CALL_ENDED, reply_required=False)

    async def _hang_up(self) -> None:
        """The agent ends the call: its session closes and the caller's room is deleted, which
        ends the caller's phone leg (and the job)."""
        self.session.shutdown()
        await self.line.delete_room(self.line.caller_room)

    async def shutdown_handoff(self, reason: str = "the worker is shutting down") -> None:
        """The job is shutting down: called by ``CallerSession.aclose`` before the framework
        closes the caller's session (the last moment it can speak), and again by
        ``finish_call`` (then it only waits for what the first call left running). Within
        ``ShutdownClock``: a transfer in progress ends at once, whatever its phase before the
        merge (the human's phone stops ringing, a move in flight is given up); the caller and
        the human, if on the line, are told why, each in their room, at the same time; then
        every leg of the call is ended, each room's deletion sent again if it hangs."""
        if self.shutdown_clock is not None:
            await self.line.settle(timeout=self.shutdown_clock.left())
            return
        clock = self.shutdown_clock = ShutdownClock(self.line.bounds)
        self.job_ending.set()
        handoff = self.handoff
        if handoff is not None:
            handoff.shut_down(reason, clock.words_until)
            # the caller is spoken to next: the music stops at once, its track may take longer
            # to leave the room (a server request), which is not waited for past ``legs``
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handoff.hold.end(), clock.legs)
        if not self._ending and await self._caller_here():
            await self._tell_the_call_ends(clock)
        if handoff is not None:  # its human told, its clean-up on its way
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._handoff_done.wait(), clock.left(for_words=True))
        self._ending = True
        await self._end_every_leg(clock, handoff.consult_room.name if handoff is not None else "")
        await self.line.settle(timeout=clock.left())

    def _merged_leg(self) -> Leg | None:
        """The human's leg once the caller was handed to them (and not rejoined since)."""
        merged = next((r for r in reversed(self.results) if r.connected), None)
        return merged.leg if merged is not None else None

    async def _tell_the_call_ends(self, clock: ShutdownClock) -> None:
        """``CALL_ENDING`` to the caller, by their session while it can speak; once it cannot
        (after the merge it is parked or closed; or it is closing) played in their room by
        the line, with ``HUMAN_CALL_ENDS`` to a bridged human in theirs at the same time (a
        moved human hears the caller's, with them)."""
        merged = self._merged_leg()
        if merged is None:
            try:
                speech = say_fixed(
                    self.session, CALL_ENDING, self.models.phrases, allow_interruptions=False
                )
            except RuntimeError as e:  # the session is closing: the line says it
                room = self.line.caller_room
                logger.info("the caller's session is closing in room %s: %s", room, e)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(speech.wait_for_playout(), clock.left(for_words=True))
                return
        ending = await self._spoken(CALL_ENDING)
        told = [self.line.announce(self.line.caller_room, CALL_ENDING, ending)]
        if merged is not None and merged.room != self.line.caller_room:  # bridged
            human = await self._spoken(HUMAN_CALL_ENDS)
            told.append(self.line.announce(merged.room, HUMAN_CALL_ENDS, human))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*told), clock.left(for_words=True))

    async def _spoken(self, text: str) -> PhraseAudio:
        """A fixed sentence's audio for the line to play: from the phrase cache when it has it,
        else synthesised as it plays (none without a voice: the words alone)."""
        phrases = self.models.phrases
        if phrases is not None and phrases.usable:
            saved = await phrases.load(phrases.path_for(text))
            if saved is not None:
                return saved
        return live_speech(self.models.tts, text) if self.models.tts is not None else []

    async def _end_every_leg(self, clock: ShutdownClock, consult_room_name: str) -> None:
        """Delete the caller's room (their leg, and a moved human's, end with it), the consult
        room of a transfer that was in progress, and a bridged human's room with its bridge,
        all at once, within what is left of ``clock``."""
        steps = [self._delete(self.line.caller_room, clock)]
        if consult_room_name:
            steps.append(self._delete(consult_room_name, clock))
        merged = self._merged_leg()
        if merged is not None and merged.room != self.line.caller_room:  # bridged
            steps += [self.line.close_consult(merged.room), self._delete(merged.room, clock)]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*steps), clock.left())

    async def _delete(self, room: str, clock: ShutdownClock) -> None:
        """Delete ``room``; a request not answered within half of ``ShutdownClock.legs`` is
        sent again beside it: a DeleteRoom that hangs must not leave a leg (nobody retries a
        hanging request for us: RoomService calls have no HTTP timeout, livekit-api
        ``twirp_client.py``)."""
        tries = [asyncio.ensure_future(self.line.delete_room(room))]
        try:
            done, _ = await asyncio.wait(tries, timeout=clock.legs / 2)
            if not done:
                tries.append(asyncio.ensure_future(self.line.delete_room(room)))
                left = clock.left()
                await asyncio.wait(tries, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for attempt in tries:
                attempt.cancel()

    async def _caller_here(self) -> bool:
        """Whether the caller is still on the line (a session closed because they hung up has
        nobody to tell)."""
        if not self.line.caller_identity:
            return False
        with contextlib.suppress(Exception):
            return await self.line.wait_for_arrival(
                self.line.caller_room, self.line.caller_identity, 0
            )
        return False


class CallerSession(AgentSession):
    """The caller's session. At job shutdown the framework closes it first, then disconnects
    the room, and only then runs shutdown callbacks (livekit-agents ``ipc/job_proc_lazy_main.py``,
    ``_shutdown_job``). Its close drains the activity first (``voice/agent_activity.py`` ``drain``:
    scheduling paused, every running tool awaited), and from then on ``say`` raises "AgentSession
    is closing". So the call's ending (``WarmHandoffAgent.shutdown_handoff``) runs before it:
    the transfer in progress (that running tool) is ended, the caller told, every leg ended."""

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):  # never started: no agent
            agent = self.current_agent
            if isinstance(agent, WarmHandoffAgent):
                await agent.shutdown_handoff()
        await super().aclose()


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 7. The server: the AgentServer, the call's entrypoint, and the commands
# ──────────────────────────────────────────────────────────────────────────────────────────────
server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    """Load Silero VAD once per process, not once per call."""
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


# The openai SDK's own default API root (openai.AsyncClient, base_url None and no
# OPENAI_BASE_URL): passed explicitly when OPENAI_BASE_URL is unset.
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# The other plugins' defaults, where the console looks before it starts (provider_addresses)
DEEPGRAM_DEFAULT_BASE_URL = "https://api.deepgram.com/v1/listen"  # deepgram stt.py
ELEVEN_DEFAULT_BASE_URL = "https://api.elevenlabs.io/v1"  # elevenlabs tts.py API_BASE_URL_V1


def provider_addresses(settings: Settings) -> dict[str, str]:
    """Where each model provider is reached, by its name."""
    return {
        "Deepgram": settings.deepgram_base_url or DEEPGRAM_DEFAULT_BASE_URL,
        "OpenAI": settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        "ElevenLabs": settings.eleven_base_url or ELEVEN_DEFAULT_BASE_URL,
    }


async def unreachable_providers(settings: Settings, within: float = 5.0) -> list[str]:
    """Each provider whose host does not take a connection within ``within`` s, with why
    (name resolution, refused, no route, silence): one line each, for the console to say
    before it starts rather than as tracebacks once the first turn needs the provider."""

    async def reach(name: str, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        where = f"{name} at {parts.hostname}:{port}"
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port), within
            )
        except socket.gaierror:
            return f"{where}: name resolution failed (no network or DNS?)"
        except asyncio.TimeoutError:
            return f"{where}: no answer within {within:g}s (a firewall or proxy?)"
        except OSError as e:
            return f"{where}: {e.strerror or e}"
        writer.close()
        return ""

    found = await asyncio.gather(*(reach(*item) for item in provider_addresses(settings).items()))
    return [line for line in found if line]


def no_audio_devices() -> str:
    """Why the console's audio mode cannot run here, or "": it needs a default microphone and
    speaker (PortAudio, through sounddevice, as livekit-agents' console opens them)."""
    import sounddevice  # type: ignore[import-untyped]

    for kind, what in (("input", "microphone"), ("output", "speaker")):
        try:
            sounddevice.query_devices(kind=kind)
        except sounddevice.PortAudioError:
            return f"no {what} found (PortAudio has no default {kind} device)"
    return ""


def tts_options(settings: Settings) -> dict[str, str]:
    """What ``build_models`` sets up the TTS with ("": the plugin's default), less its key."""
    return {
        "model": settings.tts_model,
        "encoding": settings.tts_encoding,
        "voice_id": settings.tts_voice_id,
        "base_url": settings.eleven_base_url,
    }


def voice_of(settings: Settings) -> dict[str, str]:
    """What makes the fixed sentences sound as they do: the TTS's options as ``build_models``
    sets them (``tts_options``), the phrase cache's key, so a changed voice is another file.
    The plugin's version stands for the defaults it keeps (voice settings, language), which
    this module leaves alone; the API key is not part of a voice."""
    return {"tts": f"livekit-plugins-elevenlabs {elevenlabs.__version__}", **tts_options(settings)}


def build_models(settings: Settings, vad: VAD) -> Models:
    """The call's models, configured from ``settings`` alone. Deepgram's and ElevenLabs' base
    URLs are passed only when set (unset: the plugin's default). OpenAI's is passed always:
    left unset, the SDK would read OPENAI_BASE_URL from the environment itself, a second
    source that a blank value breaks and a ``Settings`` built in code could not override."""
    stt_options: dict[str, Any] = {"model": settings.stt_model}
    if settings.deepgram_base_url:
        stt_options["base_url"] = settings.deepgram_base_url
    voice: dict[str, Any] = {name: value for name, value in tts_options(settings).items() if value}
    eleven_key = os.environ.get("ELEVEN_API_KEY") or os.environ.get("ELEVENLABS_API_KEY")
    if eleven_key:
        voice["api_key"] = eleven_key
    return Models(
        stt=deepgram.STT(**stt_options),
        llm=openai.LLM(
            model=settings.llm_model,
            base_url=settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        ),
        tts=elevenlabs.TTS(**voice),
        vad=vad,
        phrases=PhraseCache(settings.phrase_cache, voice_of(settings))
        if settings.phrase_cache
        else None,
    )


async def run_call(ctx: JobContext, settings: Settings, models: Models) -> AgentSession:
    """Answer one call: start the session, wait until the caller is really there, greet once."""
    console = ctx.is_fake_job()
    if console and not settings.destinations:
        settings = settings.model_copy(update={"destinations": DEMO_DESTINATIONS})
    line: PhoneLine = (
        SimulatedPhoneLine(settings.simulated_human, announce=_show_step)
        if console
        else LiveKitPhoneLine(ctx, settings)
    )
    records = CallRecords(line.caller_room, ctx.job.id, delivery_for(settings))
    agent = WarmHandoffAgent(settings, line, models, records)

    async def on_shutdown(reason: str = "") -> None:
        await finish_call(agent, records)

    ctx.add_shutdown_callback(on_shutdown)
    session = CallerSession(
        session_close_transcript_timeout=line.bounds.last_words,
        # the fixed sentences (greeting, please hold, check-ins, connected, ending) are tried
        # from the phrase cache's synthesis first, then said live: their failures must not
        # close the caller's session (the framework closes it after 3 in a row)
        conn_options=SessionConnectOptions(
            max_unrecoverable_errors=SessionConnectOptions.max_unrecoverable_errors + 5
        ),
    )
    session.on("close", lambda _: agent.call_ended())
    if console:  # the console owns the audio; there is no room to join
        session.on("conversation_item_added", _show_what_the_caller_hears)
        await session.start(agent=agent)
    else:
        await session.start(agent=agent, room=ctx.room)
    if not console:
        caller = await ctx.wait_for_participant()
        line.caller_identity = caller.identity
        line.caller_number = sip_caller_number(caller.attributes)
    say_fixed(session, settings.greeting, models.phrases)
    return session


def sip_caller_number(attributes: Mapping[str, str]) -> str:
    """The caller's own number from their SIP participant's ``sip.phoneNumber``, only if it is
    E.164 exactly as given ("+15105550100"); anything else ("anonymous", "5105550100",
    "+1 510 555 0100", missing) is unknown, "". It is not normalised: a guessed country code
    or a misread digit would send a stranger's number to the human or call a stranger back."""
    number = attributes.get("sip.phoneNumber", "")
    return number if E164.fullmatch(number) else ""


async def finish_call(
    agent: WarmHandoffAgent, records: CallRecords, budget: float = JOB_SHUTDOWN_TIMEOUT - 3
) -> None:
    """The job's last steps (its shutdown callback, run after ShuttingDown): what is left of the
    call's ending (``shutdown_handoff``, already run by ``CallerSession.aclose``), record how the
    call ended, send the records. Bounded by ``budget`` so the process exits before the
    framework kills it (``JOB_SHUTDOWN_TIMEOUT`` after ShuttingDown, less what the framework
    itself needs to leave the room and end the job); records not sent by then wait in the
    outbox for the worker."""
    deadline = time.monotonic() + budget
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(agent.shutdown_handoff(), budget / 2)
    agent.call_ended()
    if records.delivery is not None:
        await records.delivery.drain(max(0.5, deadline - time.monotonic()))


def _show_step(text: str) -> None:
    logger.info("📞 %s", text)


def _show_what_the_caller_hears(ev: ConversationItemAddedEvent) -> None:
    """The console's text mode prints only the replies to what is typed; the greeting, the
    hold's check-ins and what is said when a human is lost are shown as steps."""
    item = ev.item
    if isinstance(item, llm.ChatMessage) and item.role == "assistant" and item.text_content:
        _show_step(f"caller hears: {item.text_content}")


@server.rtc_session(agent_name=registered_agent_name())
async def entrypoint(ctx: JobContext) -> None:
    ctx.log_context_fields = {"room": ctx.room.name}
    settings = load_settings(telephony=not ctx.is_fake_job())
    await run_call(ctx, settings, build_models(settings, ctx.proc.userdata["vad"]))


def configuration_problems(telephony: bool) -> list[str]:
    """Everything that would stop a call, named: the configuration, the callback file's
    folder, the providers' keys. ``telephony=False`` (the console) needs no LiveKit or trunk."""
    problems: list[str] = []
    try:
        settings = load_settings(telephony=telephony)
    except ConfigError as e:
        problems += e.problems
    else:
        problems += callback_file_problems(settings)
    return problems + [f"{key} is not set" for key in missing_provider_keys()]


_resender: asyncio.Task[None] | None = None


@server.on("worker_started")
def resend_outbox_in_the_background() -> None:
    """The worker's main process owns the outbox. Job processes run one job each and exit
    (livekit/agents/ipc: one job per forkserver/spawn process), so what a job could not send
    in its shutdown is resent here, at start and then every minute. ``worker_started`` is
    AgentServer's public event, emitted by ``AgentServer.run`` inside the main process's
    event loop (livekit/agents/worker.py), for start, dev and console alike; the task lives
    on that loop and ends with it."""
    global _resender
    try:
        settings = load_settings(telephony=False)
    except ConfigError:
        return  # main() refuses to start with a bad configuration; nothing to resend to
    if settings.webhook_url and (_resender is None or _resender.done()):
        delivery = RecordDelivery(
            settings.webhook_url, settings.webhook_secret.get_secret_value(), settings.callback_file
        )
        _resender = asyncio.get_running_loop().create_task(keep_resending(delivery))


def callback_file_problems(settings: Settings) -> list[str]:
    """Where callback requests (and, with a webhook, the outbox) are written must be a
    folder the worker can write in; checked at start and by ``check``, which change nothing:
    a missing outbox folder is fine if it could be made (the worker makes it when needed)."""
    path = Path(settings.callback_file)
    folder = path.resolve().parent
    if not folder.is_dir():
        return [f"HANDOFF_CALLBACK_FILE: the folder {folder} does not exist"]
    if path.is_dir():
        return [f"HANDOFF_CALLBACK_FILE: {path} is a folder, not a file"]
    try:
        _try_writing_in(folder)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        return [f"HANDOFF_CALLBACK_FILE: cannot write in {folder} ({e.strerror or e})"]
    outbox = outbox_folder(settings.callback_file)
    if settings.webhook_url and outbox.exists():  # else its parent, writable, can hold it
        try:
            if not outbox.is_dir():
                raise NotADirectoryError(f"{outbox} is not a folder")
            _try_writing_in(outbox)
        except OSError as e:
            return [f"HANDOFF_CALLBACK_FILE: cannot use the outbox folder ({e.strerror or e})"]
    return []


def _try_writing_in(folder: Path) -> None:
    """Raise OSError unless a file can be written in ``folder``; leaves nothing behind."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def describe_failure(error: BaseException) -> str:
    """A failed request to LiveKit, named for an operator: the cause, not just a class."""

    if isinstance(error, aiohttp.ClientConnectorError):
        where = f"cannot connect to host {error.host}:{error.port}"
        if isinstance(error, aiohttp.ClientConnectorDNSError):
            return f"{where}: name resolution failed"
        cause = error.os_error.strerror or str(error.os_error) or type(error.os_error).__name__
        return f"{where}: {cause}"
    if isinstance(error, asyncio.TimeoutError):
        return "no answer within 15 seconds"
    if getattr(error, "status", None) == 401:  # livekit-server's auth, before Twirp: no code
        return "unauthenticated: the server refused LIVEKIT_API_KEY or LIVEKIT_API_SECRET"
    reason = getattr(error, "message", "") or str(error) or type(error).__name__
    return f"{getattr(error, 'code', 'error')}: {reason}"


async def check(settings: Settings, env: Mapping[str, str] | None = None) -> bool:
    """``python warm_handoff.py check``: print the configuration (secrets masked), say what
    would stop a call (provider keys, the callback file's folder), how many records wait in
    the outbox, and prove the LiveKit API credentials work with a harmless read."""
    ok = True
    width = max(len(name) for name, _ in settings.shown_by_check())
    for name, value in settings.shown_by_check():
        print(f"{name:<{width}}  {value}")
    if missing := missing_provider_keys(env):  # start would refuse: so does check
        print(f"Provider keys: MISSING {', '.join(missing)} (start refuses)", file=sys.stderr)
        ok = False
    if problems := callback_file_problems(settings):
        print(f"Callback file: FAILED ({'; '.join(problems)})", file=sys.stderr)
        ok = False
    else:
        print(f"Callback file: OK ({settings.callback_file})")
    if settings.webhook_url:
        waiting = Outbox(outbox_folder(settings.callback_file)).waiting()
        backlog = f"{len(waiting)} record(s) waiting"
        if waiting:
            oldest = time.time() - waiting[0].stat().st_mtime
            backlog += f", the oldest for {oldest / 60:.0f} min (resend-outbox sends them now)"
        print(f"Outbox: {backlog}")
    try:
        with _without_jwt_key_length_warning():
            async with livekit_api(settings) as lk:
                rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 15)
    except Exception as e:
        print(f"LiveKit API: FAILED ({describe_failure(e)})", file=sys.stderr)
        return False
    print(f"LiveKit API: OK, the credentials work ({len(rooms.rooms)} rooms open)")
    print(f"Joining the human: {await joining_way_of(settings)}")
    return ok


def livekit_api(settings: Settings) -> api.LiveKitAPI:
    """A LiveKit API client with the configured server and credentials (``check``'s own)."""
    return api.LiveKitAPI(
        settings.livekit_url,
        settings.livekit_api_key,
        settings.livekit_api_secret.get_secret_value(),
    )


async def joining_way_of(settings: Settings) -> str:
    """Which way this server joins a human to the caller, found by asking it: the check joins a
    room of its own for a moment and asks to be moved out of it. Self-hosted LiveKit answers
    "not implemented" (livekit/livekit pkg/service/roommanager.go, reached only for a
    participant that exists: roomservice.go routes the request to its node); LiveKit Cloud
    moves it. Both rooms are deleted at once."""
    probe = f"warm-handoff-check-{uuid.uuid4().hex[:8]}"
    with _without_jwt_key_length_warning():
        token = (
            api.AccessToken(
                settings.livekit_api_key, settings.livekit_api_secret.get_secret_value()
            )
            .with_identity(probe)
            .with_grants(api.VideoGrants(room_join=True, room=probe, can_publish=False))
            .to_jwt()
        )
    room = rtc.Room()
    media_log = logging.getLogger("livekit")  # the media SDK's own retries: the answer says it
    level = media_log.level
    media_log.setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(room.connect(settings.livekit_url, token), 15)
        with _without_jwt_key_length_warning():
            async with livekit_api(settings) as lk:
                try:
                    move = api.MoveParticipantRequest(
                        room=probe, identity=probe, destination_room=f"{probe}-moved"
                    )
                    await asyncio.wait_for(lk.room.move_participant(move), 15)
                    return "move (this server has MoveParticipant)"
                finally:
                    await close_quietly(room.disconnect, timeout=5)
                    for name in (probe, f"{probe}-moved"):
                        with contextlib.suppress(Exception):
                            await lk.room.delete_room(api.DeleteRoomRequest(room=name))
    except api.ServerError as e:
        if e.code == "unimplemented" or "not implemented" in (e.message or ""):
            return (
                "bridge (this server has no MoveParticipant: the worker relays the audio "
                "between the human's room and the caller's)"
            )
        problem = describe_failure(e)
    except Exception as e:  # the room could not be joined: no media connection from here
        problem = describe_failure(e)
    finally:
        media_log.setLevel(level)
    await close_quietly(room.disconnect, timeout=5)
    return f"unknown ({problem}); by the URL, {settings.join_way.value}"


@contextlib.contextmanager
def _without_jwt_key_length_warning() -> Iterator[None]:
    """PyJWT warns about an HMAC key shorter than 32 bytes, as LiveKit's dev keys are
    (``livekit-server --dev``: "secret"); the server takes them, and ``check`` reports only
    what would stop a call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
        yield


async def resend_outbox(settings: Settings) -> bool:
    """``python warm_handoff.py resend-outbox``: send every record waiting in the outbox now
    (however young); True when none is left."""
    if not settings.webhook_url:
        print("HANDOFF_WEBHOOK_URL is not set: there is no outbox to resend", file=sys.stderr)
        return False
    delivery = RecordDelivery(
        settings.webhook_url, settings.webhook_secret.get_secret_value(), settings.callback_file
    )
    sent, left = await delivery.resend(min_age=0)
    print(f"Outbox: {sent} record(s) sent, {left} still waiting")
    return left == 0


OUR_COMMANDS = {
    "check": "Validate the configuration, show it masked, report the outbox and prove the\n"
    "LiveKit credentials with a harmless read. Exits 1 on any problem start would refuse.",
    "resend-outbox": "Send the records waiting in the outbox to HANDOFF_WEBHOOK_URL now.",
}


def our_commands_help(only: str = "") -> str:
    """The help of the commands this module adds to the framework's."""
    lines = ["Warm Handoff commands (besides the framework's, listed below):"]
    for name, text in OUR_COMMANDS.items():
        if only in ("", name):
            first, *rest = text.splitlines()
            lines += [f"  {name:<14} {first}", *(f"  {'':<14} {line}" for line in rest)]
    return "\n".join(lines) + "\n"


def _settings_or_exit(telephony: bool) -> Settings:
    try:
        return load_settings(telephony=telephony)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


def refuse_a_console_that_cannot_run(argv: list[str]) -> None:
    """The console explains itself before it starts: no microphone or speaker (audio mode),
    or a provider it cannot reach; one line each and a non-zero exit, not a silent stop or
    tracebacks after the first turn."""
    devices_named = any(a.startswith(("--input-device", "--output-device")) for a in argv)
    if "--text" not in argv and not devices_named and (reason := no_audio_devices()):
        print(
            f"console: {reason}. Type instead: python warm_handoff.py console --text",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if unreachable := asyncio.run(unreachable_providers(load_settings(telephony=False))):
        for line in unreachable:
            print(f"console: cannot reach {line}", file=sys.stderr)
        print("Set the provider's *_BASE_URL if you use another address.", file=sys.stderr)
        raise SystemExit(3)


def leave_without_finalizing(code: int) -> NoReturn:
    """Exit with ``code`` once the output is written, without finalizing the interpreter, as
    ``check`` must after its probe room: an exit through Python's finalization aborts the
    process now and then (SIGABRT, "panic in a function that cannot unwind").

    The probe starts livekit-rtc's native runtime, whose threads call into Python at any time:
    every log record, one callback each (livekit/rust-sdks livekit-ffi/src/server/logger.rs
    ``log_forward_task``), among them the teardown of a room that failed to connect, forwarded
    after the error that ended ``Room.connect``, and "disposing ffi server" from the dispose
    livekit.rtc registers with atexit (livekit/rtc/_ffi_client.py ``_dispose_lk_ffi``;
    livekit-ffi ``FfiServer::dispose`` stops no callback already under way: ``send_event``
    calls it outside its lock). A callback that needs the GIL once Python 3.11 finalizes is
    ended with ``pthread_exit``, whose unwinding through Rust frames that cannot unwind aborts
    (rust-lang/rust#135929). Nothing is left to close after ``check``'s last line (its rooms
    are deleted, its clients closed): ``os._exit`` ends the threads with the process."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    command = argv[1] if len(argv) > 1 else ""
    if command in OUR_COMMANDS and ("--help" in argv or "-h" in argv):
        print(f"Usage: python warm_handoff.py {command}\n\n{our_commands_help(command)}")
        raise SystemExit(0)
    if command == "check":
        leave_without_finalizing(0 if asyncio.run(check(_settings_or_exit(True))) else 1)
    if command == "resend-outbox":
        raise SystemExit(0 if asyncio.run(resend_outbox(_settings_or_exit(False))) else 1)
    if command in ("", "--help", "-h", "help"):
        print(our_commands_help())
    if command in ("start", "dev", "console", "connect") and "--help" not in argv:
        refuse_a_bad_configuration(command)
        if command == "console" and not (sys.stdin.isatty() and sys.stdout.isatty()):
            print("console needs a terminal: run it in an interactive shell", file=sys.stderr)
            raise SystemExit(2)
        if command == "console":
            refuse_a_console_that_cannot_run(argv)
    cli.run_app(server)


def refuse_a_bad_configuration(command: str) -> None:
    """Exit 1 with every problem named, before ``command`` starts a worker (the console needs
    no LiveKit or trunk settings)."""
    if problems := configuration_problems(telephony=command != "console"):
        print(ConfigError(problems), file=sys.stderr)
        raise SystemExit(1)


def framework_command() -> str:
    """The command when livekit-agents' own CLI imported this module (``python -m
    livekit.agents start|console warm_handoff.py``, which ``lk agent`` runs): that CLI finds
    ``server`` and never calls ``main``; "" otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", "") != "livekit.agents.__main__":
        return ""
    return next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")


if __name__ == "__main__":
    main()
elif framework_command() in ("start", "console"):
    # the same refusal as main's, before the framework starts a worker or registers it
    refuse_a_bad_configuration(framework_command())
