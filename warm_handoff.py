"""Warm Handoff Agent: a LiveKit Agents worker that answers phone calls and, when a person is
needed, hands the caller to a human over SIP without dropping the caller or surprising the human.

The module reads like a call, top to bottom:

1. configuration   - one typed, validated ``Settings`` object read from the environment;
2. the phone line  - ``PhoneLine``, the one seam to everything that needs a media server, with
                     ``LiveKitPhoneLine`` (real calls) and ``SimulatedPhoneLine`` (console, tests);
3. the handoff     - ``Handoff``: hold, dial, brief the human, accept or decline, merge or return;
4. the agents      - ``WarmHandoffAgent`` (the caller's), ``ConsultAgent`` (briefs the human);
5. the server      - ``AgentServer`` with a prewarmed Silero VAD and the ``rtc_session`` entrypoint.

Run ``python warm_handoff.py console`` to talk to it locally, ``python warm_handoff.py start`` on a
worker host.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import load_dotenv
from livekit import api, rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobProcess,
    RunContext,
    cli,
    llm,
    room_io,
    utils,
)
from livekit.agents.llm import ToolResult, function_tool
from livekit.agents.utils.audio import audio_frames_from_file
from livekit.agents.voice.background_audio import (
    AudioConfig,
    BackgroundAudioPlayer,
    BuiltinAudioClip,
)
from livekit.api.sip_service import SipService
from livekit.plugins import deepgram, elevenlabs, openai, silero  # register on the main thread

logger = logging.getLogger("warm-handoff")
load_dotenv(os.environ.get("DOTENV_FILE") or None)  # DOTENV_FILE=/dev/null ignores .env

# ──────────────────────────────────────────────────────────────────────────────────────────────
# 1. Configuration
# ──────────────────────────────────────────────────────────────────────────────────────────────

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
SIP_URI = re.compile(r"^sips?:[^@\s]+@[^@\s]+$")
DTMF = re.compile(r"^[0-9*#wW]{1,32}$")
DESTINATION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CALLER_ID_FROM_CALLER = "caller"  # HANDOFF_CALLER_ID=caller: the human's phone shows the caller
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTH_NAMES = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
DAY_SPAN = re.compile(r"^(mon|tue|wed|thu|fri|sat|sun)(?:-(mon|tue|wed|thu|fri|sat|sun))?$")
TIME_SPAN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-(?:([01]\d|2[0-3]):([0-5]\d)|(24):(00))$")

DEFAULT_AGENT_NAME = "warm-handoff-agent"
DEFAULT_GREETING = "Thanks for calling. This is the virtual assistant. How can I help you today?"
PROVIDER_KEYS = {
    "deepgram": "DEEPGRAM_API_KEY",
    "openai": "OPENAI_API_KEY",
    "elevenlabs": "ELEVEN_API_KEY",
}


class HandoffMode(str, Enum):
    AUTO = "auto"  # consult on LiveKit Cloud, conference elsewhere
    CONSULT = "consult"  # private briefing room, then MoveParticipant (LiveKit Cloud only)
    CONFERENCE = "conference"  # the human is dialled into the caller's room (the seed's way)


class SimulatedHuman(str, Enum):
    """What the human does on the simulated line (console and tests)."""

    ANSWER = "answer"
    DECLINE = "decline"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    VOICEMAIL = "voicemail"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class OpeningHours:
    """When a destination takes calls: weekly ranges of wall-clock time in its own IANA time
    zone, minus closed dates. A range that ends at or before it starts runs past midnight
    ("22:00-02:00"); a closed date cancels the ranges that start on it. Instants are compared
    in UTC, so a daylight-saving change moves nothing on the team's clock."""

    tz: str
    weekly: tuple[tuple[tuple[int, int], ...], ...]  # Monday first: (start, end) minutes
    closed: frozenset[date] = frozenset()
    spec: str = field(default="", compare=False)  # as configured, for ``check``

    def _openings(self, now: datetime, days: int) -> Any:
        """Each opening (start, end) in UTC, from the day before ``now``'s local date on."""
        zone = ZoneInfo(self.tz)
        first = now.astimezone(zone).date() - timedelta(days=1)
        for offset in range(days + 1):
            day = first + timedelta(days=offset)
            if day in self.closed:
                continue
            midnight = datetime(day.year, day.month, day.day)
            for start, end in self.weekly[day.weekday()]:
                yield tuple(
                    (midnight + timedelta(minutes=m)).replace(tzinfo=zone).astimezone(timezone.utc)
                    for m in (start, end)
                )

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


@dataclass(frozen=True)
class Destination:
    """A human the operator allows the agent to hand calls to."""

    name: str
    target: str  # E.164 number or sip: URI
    description: str
    extension: str = ""  # DTMF sent once answered
    ring_timeout: float | None = None  # seconds; None: the global HANDOFF_RING_TIMEOUT
    spoken_name: str = ""  # how the agent names it aloud, e.g. "our billing team"
    fallback: str = ""  # the destination to offer next when this one can't take the call
    hours: OpeningHours | None = None  # None: always open

    @property
    def said_as(self) -> str:
        return self.spoken_name or f"the {self.name} team"


@dataclass(frozen=True)
class Settings:
    livekit_url: str = ""
    livekit_api_key: str = ""
    livekit_api_secret: str = field(default="", repr=False)
    sip_trunk_id: str = ""
    caller_id: str = ""  # the number the human's phone shows (the trunk's), or "caller"
    trunk_number: str = ""  # with "caller": shown when the caller's number is unknown or refused
    destinations: tuple[Destination, ...] = ()
    allow_dial_pattern: re.Pattern[str] | None = None
    handoff_mode: HandoffMode = HandoffMode.AUTO
    ring_timeout: float = 25.0
    max_hold: float = 180.0
    hello_grace: float = 2.0  # how long the human may stay silent before the brief starts
    hold_reassure_every: float = 25.0  # the agent checks in with a caller on hold this often
    max_attempts: int = 3  # handoff attempts per call, each to a different destination
    hold_audio_file: str = ""
    agent_name: str = DEFAULT_AGENT_NAME
    greeting: str = DEFAULT_GREETING
    business_name: str = "our company"
    business_scope: str = "general questions about our products and services"
    stt_model: str = "nova-3"
    llm_model: str = "gpt-4o"
    tts_model: str = "eleven_multilingual_v2"
    tts_encoding: str = "pcm_44100"
    tts_voice_id: str = ""
    simulated_human: SimulatedHuman = SimulatedHuman.ANSWER
    webhook_url: str = ""  # outcome records and callback requests are POSTed here
    webhook_secret: str = field(default="", repr=False)
    callback_file: str = "callback_requests.jsonl"  # callback requests with no webhook to take them
    sip_headers: bool = True  # X-Handoff-* headers on the human's INVITE

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def masked(self) -> list[tuple[str, str]]:
        """The configuration as ``check`` prints it: secrets hidden, numbers masked."""

        def secret(value: str) -> str:
            return "(set)" if value else "(not set)"

        rows = [
            ("LIVEKIT_URL", self.livekit_url or "(not set)"),
            ("LIVEKIT_API_KEY", self.livekit_api_key or "(not set)"),
            ("LIVEKIT_API_SECRET", secret(self.livekit_api_secret)),
            ("SIP_TRUNK_ID", self.sip_trunk_id or "(not set)"),
            ("HANDOFF_CALLER_ID", self._caller_id_shown()),
            (
                "HANDOFF_TRUNK_NUMBER",
                mask_number(self.trunk_number) if self.trunk_number else "(not set)",
            ),
            ("HANDOFF_MODE", f"{self.handoff_mode.value} (in force: {self.mode.value})"),
            ("HANDOFF_RING_TIMEOUT", f"{self.ring_timeout:g}s"),
            ("HANDOFF_MAX_HOLD", f"{self.max_hold:g}s"),
            ("HANDOFF_MAX_ATTEMPTS", str(self.max_attempts)),
            ("AGENT_NAME", self.agent_name),
            ("HANDOFF_WEBHOOK_URL", self.webhook_url or "(not set)"),
            ("HANDOFF_WEBHOOK_SECRET", secret(self.webhook_secret)),
            ("HANDOFF_CALLBACK_FILE", self.callback_file),
            ("models", f"{self.stt_model} / {self.llm_model} / {self.tts_model}"),
        ]
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

    def _caller_id_shown(self) -> str:
        if self.caller_id == CALLER_ID_FROM_CALLER:
            return "caller (the caller's own number; else HANDOFF_TRUNK_NUMBER)"
        return mask_number(self.caller_id) if self.caller_id else "(not set)"

    @property
    def mode(self) -> HandoffMode:
        """The mode in force: ``auto`` resolves by where LiveKit runs (MoveParticipant is
        LiveKit Cloud only)."""
        if self.handoff_mode is not HandoffMode.AUTO:
            return self.handoff_mode
        on_cloud = re.search(r"\.livekit\.cloud(:\d+)?/?$", self.livekit_url or "")
        return HandoffMode.CONSULT if on_cloud else HandoffMode.CONFERENCE


class ConfigError(Exception):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _parse_hours(raw: Any, where: str, problems: list[str]) -> OpeningHours | None:
    """A destination's ``hours``: {"tz": "America/Los_Angeles", "mon-fri": "09:00-17:30",
    "sat": "10:00-14:00", "closed": ["2025-12-25"]}. Days are mon..sun, a span of them
    ("mon-fri", "fri-mon") or several joined by commas ("sat,sun"); times are HH:MM-HH:MM,
    several joined by commas ("09:00-12:00,13:00-17:00")."""
    where = f"{where}.hours"
    if not isinstance(raw, dict):
        problems.append(
            f'{where} must be an object like {{"tz": "Europe/London", "mon-fri": "09:00-17:00"}}'
        )
        return None
    found = len(problems)
    tz = raw.get("tz")
    try:
        ZoneInfo(tz)  # type: ignore[arg-type]
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        problems.append(
            f"{where}.tz must be an IANA time zone like America/Los_Angeles (got {tz!r})"
        )
    weekly: list[list[tuple[int, int]]] = [[] for _ in WEEKDAYS]
    given: dict[int, str] = {}
    closed: set[date] = set()
    for key, value in raw.items():
        if key == "tz":
            continue
        if key == "closed":
            dates = value if isinstance(value, list) else [value]
            for day in dates:
                try:
                    closed.add(date.fromisoformat(day))
                except (TypeError, ValueError):
                    problems.append(f"{where}.closed must list dates like 2025-12-25 (got {day!r})")
            continue
        days: list[int] = []
        for span in str(key).replace(" ", "").lower().split(","):
            if not (m := DAY_SPAN.match(span)):
                days = []
                break
            first = WEEKDAYS.index(m[1])
            last = WEEKDAYS.index(m[2] or m[1])
            days += [(first + i) % 7 for i in range((last - first) % 7 + 1)]
        if not days:
            problems.append(
                f"{where} has an unknown key {key!r}: use tz, closed, or days "
                "like mon, mon-fri or sat,sun"
            )
            continue
        ranges = []
        for span in str(value).replace(" ", "").split(",") if isinstance(value, str) else [""]:
            if not (m := TIME_SPAN.match(span)):
                ranges = []
                break
            start = int(m[1]) * 60 + int(m[2])
            end = int(m[3] or m[5]) * 60 + int(m[4] or m[6])
            if end == start:
                ranges = []
                break
            ranges.append((start, end if end > start else end + 24 * 60))  # past midnight
        if not ranges:
            problems.append(
                f'{where}[{key!r}] must be opening times like "09:00-17:30", '
                f"several joined by commas (got {value!r})"
            )
            continue
        for day in days:
            if day in given:
                problems.append(f"{where}: {WEEKDAYS[day]} is in both {given[day]!r} and {key!r}")
            given[day] = key
            weekly[day] += ranges
    if not given and len(problems) == found:
        problems.append(f'{where} has no opening times: add days like "mon-fri": "09:00-17:00"')
    if len(problems) > found:
        return None
    spec = f"{tz}: " + ", ".join(f"{k} {v}" for k, v in raw.items() if k not in ("tz", "closed"))
    if closed:
        spec += f"; {len(closed)} closed date" + ("s" if len(closed) > 1 else "")
    return OpeningHours(
        tz=tz, weekly=tuple(tuple(sorted(d)) for d in weekly), closed=frozenset(closed), spec=spec
    )


def _parse_destinations(raw: str, problems: list[str]) -> list[Destination]:
    """HANDOFF_DESTINATIONS is a JSON object: {"support": {"number": "+1...", "description":
    "...", "extension": "1234", "ring_timeout": 20, "spoken_name": "our support team"}}."""
    if not raw.strip():
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as e:
        problems.append(f"HANDOFF_DESTINATIONS is not valid JSON ({e.msg} at {e.pos})")
        return []
    if not isinstance(entries, dict):
        problems.append("HANDOFF_DESTINATIONS must be a JSON object of name -> destination")
        return []
    found: list[Destination] = []
    for name, entry in entries.items():
        where = f"HANDOFF_DESTINATIONS[{name!r}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        unknown = set(entry) - {
            "number",
            "description",
            "extension",
            "ring_timeout",
            "spoken_name",
            "fallback",
            "hours",
        }
        if unknown:
            problems.append(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
        target = str(entry.get("number", "")).strip()
        if not DESTINATION_NAME.match(name):
            problems.append(f"{where}: name must be lower-case letters, digits, '-' or '_'")
        if not (E164.match(target) or SIP_URI.match(target)):
            problems.append(f"{where}.number must be E.164 (+15105550100) or a sip: URI")
        extension = str(entry.get("extension", "")).strip()
        if extension and not DTMF.match(extension):
            problems.append(f"{where}.extension may hold only 0-9 * # w")
        timeout = entry.get("ring_timeout")
        if timeout is not None and not (isinstance(timeout, (int, float)) and 5 <= timeout <= 120):
            problems.append(f"{where}.ring_timeout must be a number of seconds, 5 to 120")
            timeout = None
        description = str(entry.get("description", "")).strip()
        if not description:
            problems.append(f"{where}.description is required (the model reads it)")
        found.append(
            Destination(
                name=name,
                target=target,
                description=description,
                extension=extension,
                ring_timeout=float(timeout) if timeout is not None else None,
                spoken_name=str(entry.get("spoken_name", "")).strip(),
                fallback=str(entry.get("fallback", "")).strip(),
                hours=_parse_hours(entry["hours"], where, problems) if "hours" in entry else None,
            )
        )
    names = {d.name for d in found}
    for d in found:
        if d.fallback and (d.fallback not in names or d.fallback == d.name):
            problems.append(
                f"HANDOFF_DESTINATIONS[{d.name!r}].fallback must name another destination"
            )
    return found


def load_settings(env: Mapping[str, str] | None = None, *, telephony: bool = True) -> Settings:
    """Read and validate the configuration. ``telephony=False`` (console) does not require
    LiveKit credentials or a trunk. Raises ``ConfigError`` naming every bad value; secret
    values never appear in it."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def get(name: str, default: str = "") -> str:
        return env.get(name, default).strip()

    def number(name: str, default: float, low: float, high: float) -> float:
        raw = get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            problems.append(f"{name} must be a number of seconds (got {raw!r})")
            return default
        if not low <= value <= high:
            problems.append(f"{name} must be between {low:g} and {high:g} seconds")
        return value

    def choice(name: str, enum: type[Enum], default: Enum) -> Any:
        raw = get(name).lower().replace(" ", "_")
        if not raw:
            return default
        try:
            return enum(raw)
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            problems.append(f"{name} must be one of {allowed} (got {raw!r})")
            return default

    ring_timeout = number("HANDOFF_RING_TIMEOUT", 25.0, 5, 120)
    trunk = get("SIP_TRUNK_ID") or get("LIVEKIT_SIP_OUTBOUND_TRUNK")
    caller_id = get("HANDOFF_CALLER_ID")
    if caller_id.lower() == CALLER_ID_FROM_CALLER:
        caller_id = CALLER_ID_FROM_CALLER
    trunk_number = get("HANDOFF_TRUNK_NUMBER")
    pattern_raw = get("HANDOFF_ALLOW_DIAL_PATTERN")
    pattern = None
    if pattern_raw:
        try:
            pattern = re.compile(pattern_raw)
        except re.error as e:
            problems.append(f"HANDOFF_ALLOW_DIAL_PATTERN is not a valid regular expression ({e})")

    settings = Settings(
        livekit_url=get("LIVEKIT_URL"),
        livekit_api_key=get("LIVEKIT_API_KEY"),
        livekit_api_secret=get("LIVEKIT_API_SECRET"),
        sip_trunk_id=trunk,
        caller_id=caller_id,
        trunk_number=trunk_number,
        destinations=tuple(_parse_destinations(get("HANDOFF_DESTINATIONS"), problems)),
        allow_dial_pattern=pattern,
        handoff_mode=choice("HANDOFF_MODE", HandoffMode, HandoffMode.AUTO),
        ring_timeout=ring_timeout,
        max_hold=number("HANDOFF_MAX_HOLD", 180.0, 30, 1800),
        hello_grace=number("HANDOFF_HELLO_GRACE", 2.0, 0, 10),
        hold_reassure_every=number("HANDOFF_HOLD_REASSURE", 25.0, 5, 300),
        max_attempts=int(number("HANDOFF_MAX_ATTEMPTS", 3, 1, 5)),
        hold_audio_file=get("HANDOFF_HOLD_AUDIO_FILE"),
        agent_name=get("AGENT_NAME", DEFAULT_AGENT_NAME) or DEFAULT_AGENT_NAME,
        greeting=get("GREETING") or DEFAULT_GREETING,
        business_name=get("BUSINESS_NAME") or "our company",
        business_scope=get("BUSINESS_SCOPE") or Settings.business_scope,
        stt_model=get("STT_MODEL") or "nova-3",
        llm_model=get("LLM_MODEL") or "gpt-4o",
        tts_model=get("TTS_MODEL") or "eleven_multilingual_v2",
        tts_encoding=get("TTS_ENCODING") or "pcm_44100",
        tts_voice_id=get("TTS_VOICE_ID"),
        simulated_human=choice("SIMULATED_HUMAN", SimulatedHuman, SimulatedHuman.ANSWER),
        webhook_url=get("HANDOFF_WEBHOOK_URL"),
        webhook_secret=get("HANDOFF_WEBHOOK_SECRET"),
        callback_file=get("HANDOFF_CALLBACK_FILE") or "callback_requests.jsonl",
        sip_headers=get("HANDOFF_SIP_HEADERS", "on").lower() not in ("off", "0", "false", "no"),
    )

    if settings.webhook_url and not re.match(r"^https?://[^\s/]+", settings.webhook_url):
        problems.append("HANDOFF_WEBHOOK_URL must be an http:// or https:// URL")
    if settings.webhook_url and len(settings.webhook_secret) < 16:
        problems.append(
            "HANDOFF_WEBHOOK_SECRET must be set, at least 16 characters, with a webhook"
        )
    if caller_id and caller_id != CALLER_ID_FROM_CALLER and not E164.match(caller_id):
        problems.append("HANDOFF_CALLER_ID must be an E.164 number like +15105550100, or caller")
    if trunk_number and not E164.match(trunk_number):
        problems.append("HANDOFF_TRUNK_NUMBER must be an E.164 number like +15105550100")
    elif trunk_number and caller_id != CALLER_ID_FROM_CALLER:
        problems.append(
            "HANDOFF_TRUNK_NUMBER is used only with HANDOFF_CALLER_ID=caller "
            "(otherwise put the trunk's number in HANDOFF_CALLER_ID)"
        )
    if settings.hold_audio_file and not os.path.isfile(settings.hold_audio_file):
        problems.append("HANDOFF_HOLD_AUDIO_FILE does not name a readable file")
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", settings.agent_name):
        problems.append("AGENT_NAME may hold only letters, digits, '-' and '_'")
    if settings.livekit_url and not re.match(r"^(wss?|https?)://", settings.livekit_url):
        problems.append("LIVEKIT_URL must start with wss://, ws://, https:// or http://")
    if telephony:
        for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
            if not get(name):
                problems.append(f"{name} is not set")
        if not settings.destinations and not pattern:
            problems.append("HANDOFF_DESTINATIONS is empty: configure at least one destination")
        if not trunk:
            problems.append("SIP_TRUNK_ID (or LIVEKIT_SIP_OUTBOUND_TRUNK) is not set")
        elif not trunk.startswith("ST_"):
            problems.append("SIP_TRUNK_ID must be an outbound trunk id (ST_...)")
    if problems:
        raise ConfigError(problems)
    return settings


def missing_provider_keys(env: Mapping[str, str] | None = None) -> list[str]:
    """The model providers' keys that are not set (the plugins would fail on the first turn)."""
    env = os.environ if env is None else env
    missing = []
    for provider, key in PROVIDER_KEYS.items():
        aliases = [key, "ELEVENLABS_API_KEY"] if provider == "elevenlabs" else [key]
        if not any(env.get(k, "").strip() for k in aliases):
            missing.append(" or ".join(aliases))
    return missing


def mask_number(target: str) -> str:
    """Phone numbers and SIP users never reach a log line in full: +15105550123 -> +1510•••23."""
    if target.startswith("sip"):
        user, _, host = target.partition("@")
        return f"{user[:6]}•••@{host}"
    return f"{target[:5]}•••{target[-2:]}" if len(target) > 7 else "•••"


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 2. The phone line: the one seam to the media server
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
    FAILED = "failed"


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
    LiveKit has no MoveParticipant) or it failed and they are still where they were."""


class LegLost(Exception):
    """The human's leg is gone: they hung up, or their connection dropped, mid-way."""


# Every server call made while cleaning up is bounded: a hanging DeleteRoom or RemoveParticipant
# must never keep a caller waiting in silence.
SERVER_CALL_BOUND = 4.0
# A move is bounded too; past this the worker finds out where the human actually is.
MOVE_BOUND = 10.0
# After a failed or cancelled dial the identity is removed, retrying this long while the server
# answers not_found: livekit/sip joins the participant to the room just before the INVITE
# (pkg/sip/outbound.go, newCall -> connectToRoom), so a remove sent earlier finds nobody and the
# phone would still ring.
REMOVE_RETRY_FOR = 4.0


def dial_request_timeout(dial: Dial) -> float:
    """How long the dial request may take. The client's default is the ring timeout + 2 s
    (livekit-api ``_dial_timeout.py``), but with ``wait_until_answered`` the server answers only
    after the extension's DTMF has been sent, 0.5 s a character (livekit/media-sdk ``dtmf.go``):
    a request cut short there would fail a call a person had answered."""
    return dial.ring_timeout + 0.5 * len(dial.destination.extension) + 5.0


def classify_dial_error(error: Exception) -> DialFailed:
    """Map what ``create_sip_participant`` raised to what the caller is told."""
    if isinstance(error, DialFailed):
        return error
    status = getattr(error, "sip_status_code", None)
    code = getattr(error, "code", "")
    if status in (486, 600):
        outcome = HandoffOutcome.BUSY
    elif status in (408, 480, 487) or (
        status is None and code in ("canceled", "deadline_exceeded")
    ):
        outcome = HandoffOutcome.NO_ANSWER
    elif status in (603, 607):
        outcome = HandoffOutcome.DECLINED
    elif status is not None and (status in (403, 404, 410, 484, 485) or status >= 500):
        outcome = HandoffOutcome.UNREACHABLE
    elif isinstance(error, asyncio.TimeoutError):
        outcome = HandoffOutcome.NO_ANSWER
    else:
        outcome = HandoffOutcome.FAILED
    reason = getattr(error, "sip_status", None) or getattr(error, "message", "") or str(error)
    return DialFailed(outcome, status, f"{status or code or type(error).__name__}: {reason}")


class Hold:
    """Hold audio playing to the caller. ``pause``/``resume`` let speech through; every
    method is idempotent."""

    def __init__(
        self,
        stop: Callable[[], Awaitable[None]] | None = None,
        pause: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._stop = stop
        self._pause = pause
        self.started_at = time.monotonic()
        self.stopped_at: float | None = None
        self.paused = False

    async def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
            if self._stop is not None:
                await self._stop()

    async def pause(self) -> None:
        await self._set_paused(True)

    async def resume(self) -> None:
        await self._set_paused(False)

    async def _set_paused(self, paused: bool) -> None:
        if self.stopped_at is None and self.paused != paused:
            self.paused = paused
            if self._pause is not None:
                await self._pause(paused)


class HoldMusic:
    """Hold music that pauses and resumes where it left off, so the caller never hears the
    same opening bars again after every check-in.

    It is one endless stream of frames, played once with ``BackgroundAudioPlayer.play``:
    ``play(file, loop=True)`` again would start the clip from the beginning. The file is
    decoded once, with the framework's decoder, at the player's mixer format (48 kHz mono),
    and replayed from memory when it ends. While paused it yields silence and keeps its place.
    """

    SAMPLE_RATE = 48000  # BackgroundAudioPlayer's mixer: rtc.AudioMixer(48000, 1, ...)
    PAUSE_FRAME = 0.02  # seconds of silence per frame while paused

    def __init__(self, path: str) -> None:
        self.path = path
        self.paused = False
        self._frames: list[rtc.AudioFrame] = []  # decoded so far, in order
        self._decoding: Any = None  # the decoder while the file has not been read to its end
        self._started = False
        self._position = 0  # the index of the next frame to play
        self._silence = rtc.AudioFrame.create(
            self.SAMPLE_RATE, 1, int(self.SAMPLE_RATE * self.PAUSE_FRAME)
        )

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
                self._frames.append(await self._decoding.__anext__())
            except StopAsyncIteration:
                self._decoding = None  # the whole file is in memory now
        if self._position == len(self._frames):
            if not self._frames:
                raise StopAsyncIteration  # an empty file: nothing to play
            self._position = 0  # the end of the clip: from the top
        frame = self._frames[self._position]
        self._position += 1
        return frame

    async def aclose(self) -> None:
        """Stop the decoder if the file was not read to its end (call once nothing reads)."""
        decoding, self._decoding = self._decoding, None
        if decoding is not None:
            with contextlib.suppress(RuntimeError):  # already closed by a cancelled read
                await decoding.aclose()


class PhoneLine(abc.ABC):
    """Everything the handoff needs that only a media server can do. The handoff logic talks
    to nothing else, so the same flow runs on LiveKit and on the simulated line."""

    caller_room: str
    caller_identity: str
    caller_number: str = ""  # the caller's own number, when the SIP trunk tells us

    def __init__(self) -> None:
        self._clean_ups: set[asyncio.Task[None]] = set()

    def clean_up_later(
        self, step: Awaitable[Any], what: str, bound: float = SERVER_CALL_BOUND
    ) -> None:
        """Run a clean-up step in the background, bounded, so the caller is spoken to before
        slow server calls finish. A failure is logged once."""

        async def bounded() -> None:
            try:
                await asyncio.wait_for(step, bound)
            except Exception as e:
                logger.warning(
                    "clean-up step '%s' failed in room %s: %r", what, self.caller_room, e
                )

        task = asyncio.get_running_loop().create_task(bounded())
        self._clean_ups.add(task)
        task.add_done_callback(self._clean_ups.discard)

    async def settle(self, timeout: float = 2 * SERVER_CALL_BOUND) -> None:
        """Wait for background clean-up (job shutdown, tests)."""
        if self._clean_ups:
            await asyncio.wait(set(self._clean_ups), timeout=timeout)

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

    @abc.abstractmethod
    async def delete_room(self, room: str) -> None:
        """Delete a room, ending every leg in it. Idempotent; never raises."""

    @abc.abstractmethod
    async def start_hold(self) -> Hold:
        """Start hold audio for the caller."""

    @abc.abstractmethod
    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        """Start ``session`` in a private room where it will talk to ``human_identity``."""

    @abc.abstractmethod
    async def close_consult(self, room: str) -> None:
        """Stop the consult session and delete its room. Idempotent; never raises."""

    @abc.abstractmethod
    async def wait_for_hangup(self, room: str, identities: tuple[str, ...]) -> str:
        """Return the identity of the first of ``identities`` to leave ``room``. If our own
        connection to ``room`` drops, they are all gone for us: return the first."""

    @abc.abstractmethod
    async def wait_for_arrival(self, room: str, identity: str, timeout: float) -> bool:
        """Whether ``identity`` is (or arrives within ``timeout``) in ``room``."""

    @abc.abstractmethod
    def on_dtmf(self, room: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(digit)`` for each keypad press in ``room``."""

    @abc.abstractmethod
    async def set_attributes(self, room: str, attributes: Mapping[str, str]) -> None:
        """Set the agent participant's attributes in ``room`` (for dashboards and softphones).
        Never raises: a dashboard must not break a call."""


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

    def __init__(self, ctx: JobContext, settings: Settings) -> None:
        super().__init__()
        self._ctx = ctx
        self._settings = settings
        self.caller_room = ctx.job.room.name
        self.caller_identity = ""
        self._rooms: dict[str, rtc.Room] = {self.caller_room: ctx.room}
        self._consults: dict[str, AgentSession] = {}

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
            sip_trunk_id=self._settings.sip_trunk_id,
            sip_call_to=dial.destination.target,
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
                if await self._call_status(dial.room, dial.identity) == "active":
                    logger.info("dial reported %s, but the call is up", failed.detail)
                    return leg
                self._stop_ringing(dial)
            raise failed from e
        return leg

    def _stop_ringing(self, dial: Dial) -> None:
        self.clean_up_later(
            self._remove_until_gone(dial.room, dial.identity),
            "stop ringing",
            bound=REMOVE_RETRY_FOR + SERVER_CALL_BOUND,
        )

    async def _call_status(self, room: str, identity: str) -> str:
        """The leg's ``sip.callStatus`` (dialing, ringing, automation, active), or ""."""
        try:
            info = await asyncio.wait_for(
                self._ctx.api.room.get_participant(
                    api.RoomParticipantIdentity(room=room, identity=identity)
                ),
                SERVER_CALL_BOUND,
            )
        except Exception:
            return ""
        return info.attributes.get("sip.callStatus", "")

    async def _remove_until_gone(self, room: str, identity: str) -> None:
        """Remove ``identity`` from ``room``; while the server says not_found, keep trying for
        ``REMOVE_RETRY_FOR`` seconds, since the participant may not have joined yet."""
        deadline = time.monotonic() + REMOVE_RETRY_FOR
        while True:
            try:
                await asyncio.wait_for(
                    self._ctx.api.room.remove_participant(
                        api.RoomParticipantIdentity(room=room, identity=identity)
                    ),
                    SERVER_CALL_BOUND,
                )
                return
            except Exception as e:
                if time.monotonic() >= deadline:
                    if getattr(e, "code", "") != "not_found":
                        raise
                    return
            await asyncio.sleep(0.2)

    async def hang_up(self, leg: Leg) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._ctx.api.room.remove_participant(
                    api.RoomParticipantIdentity(room=leg.room, identity=leg.identity)
                ),
                SERVER_CALL_BOUND,
            )

    async def move(self, leg: Leg, room: str) -> None:
        """Move the human into ``room``, never leaving it half done: after an error, a timeout
        or a lost response, find out where the human actually is. Returns once they are in
        ``room``; raises ``MoveRefused`` if they are still where they were, ``LegLost`` if they
        are nowhere (hung up)."""
        request = api.MoveParticipantRequest(
            room=leg.room, identity=leg.identity, destination_room=room
        )
        try:
            await asyncio.wait_for(self._ctx.api.room.move_participant(request), MOVE_BOUND)
            return
        except api.ServerError as e:
            if e.code == "unimplemented":  # self-hosted LiveKit: MoveParticipant is Cloud only
                raise MoveRefused(f"{e.code}: {e.message}") from e
            problem = f"{e.code}: {e.message}"
        except asyncio.TimeoutError:
            problem = f"no answer in {MOVE_BOUND:g}s"
        except Exception as e:  # a lost response: the move may have happened all the same
            problem = repr(e)
        where = await self._locate(leg.identity, (room, leg.room))
        if where == room:
            logger.info("move reported %s, but the human is in room %s", problem, room)
            return
        if where == leg.room:
            raise MoveRefused(problem)
        raise LegLost(f"the human left during the move ({problem})")

    async def _locate(self, identity: str, rooms: tuple[str, ...], within: float = 3.0) -> str:
        """The room ``identity`` is in, or "". A moving participant leaves one room before
        it joins the other, so look again for a moment before concluding they are gone."""
        deadline = time.monotonic() + within
        while True:
            for room in rooms:
                if await self._call_status(room, identity):
                    return room
            if time.monotonic() >= deadline:
                return ""
            await asyncio.sleep(0.2)

    async def delete_room(self, room: str) -> None:
        try:
            await asyncio.wait_for(
                self._ctx.api.room.delete_room(api.DeleteRoomRequest(room=room)), SERVER_CALL_BOUND
            )
        except Exception as e:  # already gone is fine; anything else is worth a line
            if getattr(e, "code", "") != "not_found":
                logger.warning("could not delete room %s: %r", room, e)

    async def start_hold(self) -> Hold:
        player = BackgroundAudioPlayer()
        await player.start(room=self._ctx.room)
        music = HoldMusic(self._settings.hold_audio_file or BuiltinAudioClip.HOLD_MUSIC.path())
        playing = player.play(AudioConfig(music, 0.7))  # once: pausing never restarts it

        async def pause(paused: bool) -> None:
            music.paused = paused  # heard within the player's buffer (~0.5 s)

        async def stop() -> None:
            playing.stop()
            await player.aclose()
            await music.aclose()

        return Hold(stop, pause)

    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        consult_room = rtc.Room()
        token = (
            api.AccessToken(self._settings.livekit_api_key, self._settings.livekit_api_secret)
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

    async def close_consult(self, room: str) -> None:
        session = self._consults.pop(room, None)
        if session is not None:
            with contextlib.suppress(Exception):
                await session.aclose()
        consult_room = self._rooms.pop(room, None)
        if consult_room is not None:
            with contextlib.suppress(Exception):
                await consult_room.disconnect()
        await self.delete_room(room)

    async def wait_for_hangup(self, room: str, identities: tuple[str, ...]) -> str:
        lk_room = self._rooms[room]
        gone = next((i for i in identities if i not in lk_room.remote_participants), None)
        if gone is not None or not lk_room.isconnected():
            return gone or identities[0]
        left: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_left(p: rtc.RemoteParticipant) -> None:
            if p.identity in identities and not left.done():
                left.set_result(p.identity)

        def on_dropped(*_: Any) -> None:
            # Our connection dropped: no participant-left event follows, and nobody in the
            # room can be heard or spoken to any more (beta/workflows/warm_transfer.py
            # watches the consult room's "disconnected" the same way).
            if not left.done():
                left.set_result(identities[0])

        lk_room.on("participant_disconnected", on_left)
        lk_room.on("disconnected", on_dropped)
        try:
            return await left
        finally:
            lk_room.off("participant_disconnected", on_left)
            lk_room.off("disconnected", on_dropped)

    async def wait_for_arrival(self, room: str, identity: str, timeout: float) -> bool:
        lk_room = self._rooms[room]
        if identity in lk_room.remote_participants:
            return True
        arrived: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_joined(p: rtc.RemoteParticipant) -> None:
            if p.identity == identity and not arrived.done():
                arrived.set_result(True)

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
        try:
            await lk_room.local_participant.set_attributes(dict(attributes))
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
    ``events`` and, in the console, printed as it happens."""

    ring_time = 3.0  # how long the simulated phone rings before it is answered
    hello_after = 0.8  # the scripted human's "Hello?" after picking up
    decide_after = 1.0  # and their keypad answer after the brief

    def __init__(
        self,
        human: SimulatedHuman | None = SimulatedHuman.ANSWER,
        *,
        ring_time: float | None = None,
        caller_room: str = "console-room",
        caller_identity: str = "caller",
        caller_number: str = "+15550100999",
        move_supported: bool = True,
        announce: Callable[[str], None] | None = None,
        humans: Mapping[str, SimulatedHuman | None] | None = None,
    ) -> None:
        super().__init__()
        self.human = human  # None: the test drives the human itself
        self.humans = dict(humans or {})  # per destination name, overriding ``human``
        if ring_time is not None:
            self.ring_time = ring_time
        self.caller_room = caller_room
        self.caller_identity = caller_identity
        self.caller_number = caller_number
        self.move_supported = move_supported
        self.rooms: dict[str, set[str]] = {caller_room: {caller_identity}}
        self.deleted_rooms: list[str] = []
        self.dials: list[Dial] = []
        self.cancelled_dials: list[str] = []
        self.holds: list[Hold] = []
        self.events: list[LineEvent] = []
        self.consults: dict[str, AgentSession] = {}
        self.attributes: dict[str, dict[str, str]] = {}  # room -> the agent's attributes there
        self._announce = announce
        self._dtmf: dict[str, list[Callable[[str], None]]] = {}
        self._left: dict[str, asyncio.Event] = {}
        self._dropped: dict[str, asyncio.Event] = {}  # room -> our connection to it dropped
        self._scripts: set[asyncio.Task[None]] = set()
        self.answered = asyncio.Event()

    def _log(self, text: str) -> None:
        self.events.append(LineEvent(time.monotonic(), text))
        if self._announce is not None:
            self._announce(text)

    def _left_event(self, identity: str) -> asyncio.Event:
        return self._left.setdefault(identity, asyncio.Event())

    def _remove(self, room: str, identity: str) -> None:
        if identity in self.rooms.get(room, set()):
            self.rooms[room].discard(identity)
            self._left_event(identity).set()

    @property
    def on_hold(self) -> bool:
        return any(h.stopped_at is None for h in self.holds)

    def human_heard(self) -> list[str]:
        """Everything said to the human so far, in order."""
        return [
            e.text.removeprefix("human hears: ")
            for e in self.events
            if e.text.startswith("human hears: ")
        ]

    def human_heard_anything(self) -> bool:
        return bool(self.human_heard())

    def legs(self) -> list[str]:
        """Every human leg still connected anywhere."""
        return sorted(
            i for members in self.rooms.values() for i in members if i != self.caller_identity
        )

    # -- the seam -------------------------------------------------------------------------------

    async def dial(self, dial: Dial) -> Leg:
        self.dials.append(dial)
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
            self.cancelled_dials.append(dial.identity)
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
        self.rooms.setdefault(dial.room, set()).add(dial.identity)
        self._left.pop(dial.identity, None)
        self._log(f"{target.name} answered")
        self.answered.set()
        if outcome is not None:
            self._start_script(dial.room, outcome)
        return Leg(identity=dial.identity, room=dial.room, destination=target)

    async def hang_up(self, leg: Leg) -> None:
        for room, members in self.rooms.items():
            if leg.identity in members:
                self._log(f"hanging up {leg.destination.name}'s leg")
                self._remove(room, leg.identity)

    async def move(self, leg: Leg, room: str) -> None:
        if not self.move_supported:
            self._log("move refused by the server")
            raise MoveRefused("unimplemented: MoveParticipant is not available")
        self._remove(leg.room, leg.identity)
        self.rooms.setdefault(room, set()).add(leg.identity)
        self._left.pop(leg.identity, None)
        self._log(f"{leg.destination.name} moved into {room}")

    async def delete_room(self, room: str) -> None:
        if room in self.rooms:
            for identity in list(self.rooms[room]):
                self._remove(room, identity)
            del self.rooms[room]
            self.deleted_rooms.append(room)
            self._log(f"room {room} deleted")

    async def start_hold(self) -> Hold:
        hold = Hold(self._hold_stopped, self._hold_paused)
        self.holds.append(hold)
        self._log("hold music on")
        return hold

    async def _hold_stopped(self) -> None:
        self._log("hold music off")

    async def _hold_paused(self, paused: bool) -> None:
        self._log("hold music paused" if paused else "hold music resumed")

    async def open_consult(
        self, room: str, human_identity: str, session: AgentSession, agent: Agent
    ) -> None:
        self.rooms.setdefault(room, set())
        self.consults[room] = session

        def heard(ev: Any) -> None:
            if getattr(ev.item, "role", None) == "assistant" and ev.item.text_content:
                self._log(f"human hears: {ev.item.text_content}")

        session.on("conversation_item_added", heard)
        await session.start(agent=agent)

    async def close_consult(self, room: str) -> None:
        session = self.consults.pop(room, None)
        if session is not None:
            with contextlib.suppress(Exception):
                await session.aclose()
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
        self.attributes.setdefault(room, {}).update(attributes)

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
        """The human speaks in the consult room: the consult session hears it."""
        room = self._human_room()
        self._log(f"human says: {text}")
        if room in self.consults:
            self.consults[room].generate_reply(user_input=text)

    def human_presses(self, digit: str) -> None:
        room = self._human_room()
        self._log(f"human presses {digit}")
        for callback in self._dtmf.get(room or "", []):
            callback(digit)

    def hang_up_human(self) -> None:
        for room, members in self.rooms.items():
            for identity in [i for i in members if i.startswith("transfer_")]:
                self._log("the human hangs up")
                self._remove(room, identity)

    def drop_connection(self, room: str) -> None:
        """Our connection to ``room`` drops: no participant-left event, nobody reachable."""
        self._log(f"connection to {room} dropped")
        self._dropped.setdefault(room, asyncio.Event()).set()

    def hang_up_caller(self) -> None:
        self._log("the caller hangs up")
        self._remove(self.caller_room, self.caller_identity)
        for members in self.rooms.values():
            if self.caller_identity in members:
                members.discard(self.caller_identity)

    def _start_script(self, room: str, outcome: SimulatedHuman) -> None:
        task = asyncio.get_running_loop().create_task(self._human_script(room, outcome))
        self._scripts.add(task)
        task.add_done_callback(self._scripts.discard)

    async def _human_script(self, room: str, outcome: SimulatedHuman) -> None:
        """What the console's simulated human does once they pick up."""
        await asyncio.sleep(self.hello_after)
        if outcome is SimulatedHuman.VOICEMAIL:
            self.human_says(
                "Hi, you've reached the support line. Please leave a message after the tone."
            )
            return
        self.human_says("Hello?")
        session = self.consults.get(room)
        if session is None:
            return
        # wait until the brief has been spoken (the consult agent's first words)
        for _ in range(600):
            if any(getattr(i, "role", None) == "assistant" for i in session.history.items):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.decide_after)
        self.human_presses("1" if outcome is SimulatedHuman.ANSWER else "2")

    async def aclose(self) -> None:
        for task in list(self._scripts):
            task.cancel()
        await asyncio.gather(*self._scripts, return_exceptions=True)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 3. The handoff
# ──────────────────────────────────────────────────────────────────────────────────────────────

CALLER_HEARS = {
    HandoffOutcome.BUSY: "I'm sorry, {team} is on another call right now.",
    HandoffOutcome.NO_ANSWER: "I'm sorry, nobody from {team} picked up.",
    HandoffOutcome.DECLINED: "I'm sorry, {team} can't take your call right now.",
    HandoffOutcome.VOICEMAIL: "I'm sorry, I reached {team}'s voicemail rather than a person.",
    HandoffOutcome.UNREACHABLE: "I'm sorry, I couldn't get through to {team}.",
    HandoffOutcome.FAILED: "I'm sorry, something went wrong while I was connecting you.",
}
CALLER_OFFER = (
    " I'm still here with you. I can try another team, or take your details so someone "
    "calls you back. What would you like to do?"
)
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
VOICEMAIL_HINTS = re.compile(
    r"leave (me |us )?a message|after the (tone|beep)|voice ?mail|not available to take|"
    r"mailbox|press \d (for|to)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Models:
    """The models a session talks with; the consult session reuses the caller's."""

    stt: Any = None
    llm: Any = None
    tts: Any = None
    vad: Any = None
    turn_handling: dict[str, Any] | None = None  # None: the framework's default turn detection

    def options(self) -> dict[str, Any]:
        given = {
            "stt": self.stt,
            "llm": self.llm,
            "tts": self.tts,
            "vad": self.vad,
            "turn_handling": self.turn_handling,
        }
        return {k: v for k, v in given.items() if v is not None}


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
    phase: str = ""  # how far it got: announcing, ringing, briefing, merging, merged
    brief: str = ""

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
    source: str  # "caller": they asked for it; "abandoned": they hung up during a transfer
    created_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        """The record with the number masked, for log lines."""
        return {**self.__dict__, "number": mask_number(self.number) if self.number else ""}


class RecordDelivery:
    """Takes outcome records off the call's hands and delivers them in the background.

    With ``HANDOFF_WEBHOOK_URL``: a JSON POST signed with HMAC-SHA256 over
    ``"{timestamp}.{body}"`` (headers ``X-Handoff-Timestamp`` and ``X-Handoff-Signature:
    sha256=<hex>``), retried with exponential backoff on 5xx, 408, 429 and network errors.
    Callback requests the webhook never took, and all of them when there is no webhook, are
    appended to ``HANDOFF_CALLBACK_FILE`` (JSON lines), so none is lost. ``submit`` never waits
    and never raises; the queue is bounded; each record that cannot be delivered is logged once.
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
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._sender: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    def sign(self, timestamp: str, body: bytes) -> str:
        digest = hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256)
        return "sha256=" + digest.hexdigest()

    def submit(self, record: dict[str, Any]) -> None:
        if not self.url and record.get("type") != "callback_request":
            return  # the log line is the record
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            logger.error("record queue full, dropping a %s record", record.get("type"))
            if record.get("type") == "callback_request":
                self._append(record)
            return
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every submitted record is delivered or given up (shutdown, tests)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def _send_all(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            while not self._queue.empty():
                record = self._queue.get_nowait()
                try:
                    delivered = bool(self.url) and await self._post(http, record)
                    if not delivered and record.get("type") == "callback_request":
                        self._append(record)
                finally:
                    self._queue.task_done()

    async def _post(self, http: Any, record: dict[str, Any]) -> bool:
        body = json.dumps(record, separators=(",", ":")).encode()
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "X-Handoff-Timestamp": timestamp,
                "X-Handoff-Signature": self.sign(timestamp, body),
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

    def _append(self, record: dict[str, Any]) -> None:
        try:
            with open(self.callback_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
        except OSError as e:
            logger.error("could not save a callback request to %s: %s", self.callback_file, e)


_DELIVERIES: dict[tuple[str, str], RecordDelivery] = {}


def delivery_for(settings: Settings) -> RecordDelivery:
    """One delivery queue per worker process (and event loop), shared by its calls."""
    key = (settings.webhook_url, settings.callback_file)
    delivery = _DELIVERIES.get(key)
    if delivery is None or delivery.loop is not asyncio.get_running_loop():
        delivery = RecordDelivery(
            settings.webhook_url, settings.webhook_secret, settings.callback_file
        )
        _DELIVERIES[key] = delivery
    return delivery


class CallRecords:
    """One call's outcome records: each handoff attempt, each callback request and the call
    itself, each as one JSON log line (numbers masked) and through ``RecordDelivery``."""

    def __init__(self, room: str, job_id: str = "", delivery: RecordDelivery | None = None) -> None:
        self.room = room
        self.job_id = job_id
        self.delivery = delivery
        self.handoffs: list[HandoffResult] = []
        self.callbacks: list[CallbackRequest] = []
        self.started_at = time.time()
        self.ended = False

    def _emit(self, record: dict[str, Any], logged: dict[str, Any] | None = None) -> None:
        logger.info("%s record %s", record["type"], json.dumps(logged or record))
        if self.delivery is not None:
            self.delivery.submit(record)

    def handoff(self, result: HandoffResult) -> None:
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
                "outcome": result.outcome.value,
                "sip_status": result.sip_status,
                "phase": result.phase,
                "detail": result.detail,
                "decided_at": round(time.time() - (time.monotonic() - start), 3),
                "timings": {
                    k: round(v - start, 3) for k, v in result.timings.items() if k != "held"
                },
                "caller_hold_seconds": round(result.timings.get("held", 0.0), 3),
            }
        )

    def callback(self, request: CallbackRequest) -> None:
        self.callbacks.append(request)
        record = {"type": "callback_request", "job_id": self.job_id, **request.__dict__}
        self._emit(record, {**record, **request.public()})

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


def speakable_number(number: str) -> str:
    """+15105550199 -> "5 1 0, 5 5 5, 0 1 9 9": digits a voice reads one by one."""
    digits = re.sub(r"\D", "", number)
    if len(digits) == 11 and digits.startswith("1"):
        groups = [digits[1:4], digits[4:7], digits[7:]]
    else:
        groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return ", ".join(" ".join(g) for g in groups)


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
    fails, the caller's own recent words are used, so a brief is always ready."""
    summary = ""
    if model is not None and transcript:
        ctx = llm.ChatContext()
        ctx.add_message(role="system", content=BRIEF_PROMPT)
        ctx.add_message(role="user", content=f"Reason for transfer: {reason}\n\n{transcript}")
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
        summary = f"They're calling about {reason}."
        if said:
            summary += " In their words: " + " ".join(said[-3:])
    return (
        f"Hi, this is the {settings.business_name} assistant with a caller for "
        f"{destination.said_as}. {summary} Say put them through, or press 1, to take the call; "
        f"press 2 if you can't."
    )


class Handoff:
    """One attempt to hand the caller to one destination.

    ``run()`` always returns one result and always leaves the line clean: hold off, no ringing
    phone, no stray leg, no consult room. While it runs the caller is on an *interactive* hold:
    hold audio plays (paused whenever the caller or the agent speaks), the agent checks in every
    so often, and the caller may ask how long or say never mind (see ``answer_on_hold``).
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
        self.mode = settings.mode
        self.attempt = uuid.uuid4().hex[:8]
        self.identity = f"transfer_{self.attempt}"
        self.consult_room = f"{line.caller_room}-consult-{self.attempt}"
        self.phase = "announcing"
        self.timings: dict[str, float] = {"decision": time.monotonic()}
        self._background: set[asyncio.Future[Any]] = set()
        self._attributes_sent: asyncio.Future[None] | None = None
        self._publish({"handoff.state": "announcing", "handoff.outcome": ""})
        self.consult: ConsultAgent | None = None
        self.brief = ""
        self._hold: Hold | None = None
        self._leg: Leg | None = None
        self._consult_open = False
        self._merged = False
        self._caller_gone = False
        self._human_left: asyncio.Future[str] | None = None
        self._caller_left: asyncio.Future[str] | None = None
        self._stopped: asyncio.Future[tuple[HandoffOutcome, str]] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def ring_timeout(self) -> float:
        return self.destination.ring_timeout or self.settings.ring_timeout

    @property
    def on_hold(self) -> bool:
        return self.phase in ("ringing", "briefing") and not self._stopped.done()

    def _dial(self, room: str) -> Dial:
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

    async def _place_call(self, room: str) -> Leg:
        """Dial the human. A trunk that will not show the caller's number answers the first
        INVITE with 403 Forbidden before any ringing: the same attempt dials once more, at once,
        with the trunk's number. A 603 is a person declining and is never retried."""
        dial = self._dial(room)
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

    def _result(
        self, outcome: HandoffOutcome, *, sip_status: int | None = None, detail: str = ""
    ) -> HandoffResult:
        self.timings["ended"] = time.monotonic()
        if outcome is not HandoffOutcome.CONNECTED:
            self.timings.setdefault("returned", self.timings["ended"])
        self._publish(
            {
                "handoff.state": "connected" if outcome is HandoffOutcome.CONNECTED else "returned",
                "handoff.outcome": outcome.value,
            }
        )
        if "hold" in self.timings:
            self.timings["held"] = (
                self.timings.get("merged", self.timings["ended"]) - (self.timings["hold"])
            )
        return HandoffResult(
            outcome,
            self.destination.name,
            self.mode,
            sip_status,
            detail,
            self._leg if self._merged else None,
            self.timings,
            attempt=self.attempt,
            reason=self.reason,
            phase=self.phase,
            brief=self.brief,
        )

    # -- stopping from outside: the caller changes their mind, the worker shuts down ----------

    def stop(self, outcome: HandoffOutcome, detail: str) -> None:
        """End the attempt from outside the flow (before the merge); ``run()`` cleans up."""
        if not self._stopped.done() and self.phase not in ("merging", "merged"):
            self._stopped.set_result((outcome, detail))

    def answer_on_hold(self, said: str) -> str:
        """What the caller hears when they speak on hold: a request to stop the transfer
        ("never mind", "cancel that", ``CANCEL_WORDS``) cancels it (the human's phone stops
        ringing); anything else, "I want to cancel my subscription" too, gets where things
        stand."""
        if CANCEL_WORDS.search(said):
            self.stop(HandoffOutcome.CANCELLED_BY_CALLER, "the caller said never mind")
            return ""  # the transfer tool tells the caller it is cancelled
        waited = int(time.monotonic() - self.timings.get("hold", self.timings["decision"]))
        if self.phase == "briefing":
            return (
                f"Someone from {self.destination.said_as} has picked up and I'm filling "
                f"them in now. It won't be long."
            )
        return (
            f"I'm still trying {self.destination.said_as}; it's been about {waited} "
            f"seconds. Please stay on the line, or say never mind to stop."
        )

    # -- the attempt ----------------------------------------------------------------------------

    async def run(self) -> HandoffResult:
        flow = asyncio.ensure_future(
            self._consult() if self.mode is HandoffMode.CONSULT else self._conference()
        )
        caller_left = self._caller_left = asyncio.ensure_future(
            self.line.wait_for_hangup(self.line.caller_room, (self.line.caller_identity,))
        )
        try:
            done, _ = await asyncio.wait(
                {flow, caller_left, self._stopped},
                timeout=self.settings.max_hold,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if flow not in done and self.phase == "merging":
                # A move in flight is never abandoned half way: the line bounds it and finds
                # where the human is, so wait for it rather than cancel it.
                await asyncio.wait({flow})
                return flow.result()
            if flow in done:
                return flow.result()
            flow.cancel()
            with contextlib.suppress(BaseException):
                await flow
            if caller_left in done:
                await self._tell_human(
                    "I'm sorry, the caller has just hung up. I'll pass on a callback request "
                    "with what they needed. Goodbye."
                )
                self._caller_gone = True
                return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
            if self._stopped.done():
                outcome, detail = self._stopped.result()
                await self._tell_human(
                    "Sorry to trouble you: the caller no longer needs the transfer. Goodbye."
                    if outcome is HandoffOutcome.CANCELLED_BY_CALLER
                    else "I'm sorry, this call has to end now. Goodbye."
                )
                return self._result(outcome, detail=detail)
            await self._tell_human("I'm sorry, I have to take the caller back now. Goodbye.")
            return self._result(HandoffOutcome.NO_ANSWER, detail="maximum hold time reached")
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

    async def _clean_up(self) -> None:
        """Whatever happened, nobody is left waiting for someone who is gone. Local steps
        happen now; server calls go on in the background, each bounded, so the caller is
        spoken to before a slow server finishes."""
        for task in self._background:
            task.cancel()
        self.session.off("user_state_changed", self._on_caller_state)
        self.session.off("agent_state_changed", self._on_agent_state)
        if self._hold is not None:
            await self._quietly(asyncio.wait_for(self._hold.stop(), SERVER_CALL_BOUND))
        if self._leg is not None and (not self._merged or self._caller_gone):
            self.line.clean_up_later(self.line.hang_up(self._leg), "hang up the human's leg")
        if self._consult_open:
            self._consult_open = False
            self.line.clean_up_later(
                self.line.close_consult(self.consult_room), "close the consult room"
            )
        if self._caller_gone:  # a leg moved in at the last moment must not ring on alone
            self.line.clean_up_later(
                self.line.delete_room(self.line.caller_room), "delete the caller's room"
            )
        if self._attributes_sent is not None:
            await self._quietly(asyncio.wait_for(self._attributes_sent, 2))

    async def _quietly(self, step: Awaitable[Any]) -> None:
        try:
            await step
        except Exception as e:
            logger.warning("handoff clean-up step failed in room %s: %r", self.line.caller_room, e)

    async def _tell_human(self, text: str) -> None:
        """Speak to the human in the consult room, if they are still there."""
        human_there = self._human_left is not None and not self._human_left.done()
        if text and human_there and self._consult_open and self.consult is not None:
            with contextlib.suppress(Exception):
                speech = self.consult.session.say(text, allow_interruptions=False)
                await asyncio.wait_for(speech.wait_for_playout(), 8)

    # -- hold -----------------------------------------------------------------------------------

    async def _announce_and_hold(self) -> None:
        """ "Please hold", then hold audio, while the dial already rings."""
        await self.session.say(
            f"Let me connect you with {self.destination.said_as}. Please hold for a moment.",
            allow_interruptions=False,
        )
        self._enter("ringing")
        self.timings["hold"] = time.monotonic()
        self._hold = await self.line.start_hold()
        self.session.on("user_state_changed", self._on_caller_state)
        self.session.on("agent_state_changed", self._on_agent_state)
        self._spawn(self._reassure())

    def _enter(self, phase: str) -> None:
        """Move to the next phase and show it on the agent's attributes, so a dashboard can
        say "ringing support"."""
        self.phase = phase
        self.timings.setdefault(phase, time.monotonic())
        self._publish({"handoff.state": phase})

    def _publish(self, attributes: dict[str, str], room: str = "") -> None:
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

    def _spawn(self, step: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_caller_state(self, ev: Any) -> None:
        """Hold audio pauses while the caller talks, so it never masks them or reads as
        speech; the agent's own words pause it too."""
        if self._hold is not None and self.on_hold:
            if ev.new_state == "speaking":
                self._spawn(self._hold.pause())
            elif self.session.agent_state != "speaking":
                self._spawn(self._hold.resume())

    def _on_agent_state(self, ev: Any) -> None:
        if self._hold is not None and self.on_hold:
            if ev.new_state == "speaking":
                self._spawn(self._hold.pause())
            elif self.session.user_state != "speaking":
                self._spawn(self._hold.resume())

    async def _reassure(self) -> None:
        every = self.settings.hold_reassure_every
        while True:
            await asyncio.sleep(every)
            if self.on_hold:
                with contextlib.suppress(RuntimeError):  # the session is closing: nobody to tell
                    self.session.say(
                        f"Thanks for holding. I'm still connecting you with "
                        f"{self.destination.said_as}.",
                        allow_interruptions=True,
                        add_to_chat_ctx=False,
                    )

    # -- the two modes --------------------------------------------------------------------------

    def _dial_now(self, room: str) -> asyncio.Future[Leg]:
        """Start ringing the human. Whoever answers is kept as ``_leg`` the moment they do,
        even if the flow is already stopping, so clean-up hangs them up."""
        dial = asyncio.ensure_future(self._place_call(room))

        def keep_leg(done: asyncio.Future[Leg]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._leg = done.result()

        dial.add_done_callback(keep_leg)
        return dial

    async def _ring(self, dial: asyncio.Future[Leg]) -> HandoffResult | None:
        try:
            self._leg = await dial
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

    async def _conference(self) -> HandoffResult:
        """The seed's three-way call, made warm: hold while ringing, then an introduction."""
        dial = self._dial_now(self.line.caller_room)
        try:
            await self._announce_and_hold()
            if (failed := await self._ring(dial)) is not None:
                return failed
        finally:
            dial.cancel()
        self._enter("merged")
        self._merged = True
        self.timings["merged"] = time.monotonic()
        await self._hold.stop()  # type: ignore[union-attr]
        await self.session.say(
            f"Hello, this is the {self.settings.business_name} assistant. I have a caller on "
            f"the line about {self.reason}. You're now connected with "
            f"{self.destination.said_as}. I'll leave you to it.",
            allow_interruptions=False,
        )
        return self._result(HandoffOutcome.CONNECTED)

    async def _consult(self) -> HandoffResult:
        """Brief the human privately, then move them in: the caller never hears the brief and
        the human never picks up to silence."""
        transcript = conversation_transcript(self.session.history)
        brief = asyncio.ensure_future(
            compose_brief(
                self.models.llm,
                transcript,
                self.reason,
                self.settings,
                self.destination,
                timeout=self.ring_timeout,
            )
        )
        brief.add_done_callback(self._keep_brief)
        self.consult = ConsultAgent(brief=brief, transcript=transcript, handoff=self)
        if self.models.tts is not None:
            self._spawn(self.consult.prepare_voice(self.models.tts))
        consult_session: AgentSession = AgentSession(**self.consult_options())
        self._consult_open = True
        opening = asyncio.ensure_future(
            self.line.open_consult(self.consult_room, self.identity, consult_session, self.consult)
        )
        dial = self._dial_now(self.consult_room)
        try:
            await self._announce_and_hold()
            await opening
            self.line.on_dtmf(self.consult_room, self.consult.on_digit)
            brief.add_done_callback(self._show_brief)
            if (failed := await self._ring(dial)) is not None:
                return failed
        finally:
            dial.cancel()
            opening.cancel()
            if not brief.done() and self._leg is None:
                brief.cancel()

        self._enter("briefing")
        self._human_left = asyncio.ensure_future(
            self.line.wait_for_hangup(self.consult_room, (self.identity,))
        )
        self._background.add(self._human_left)
        decision = await self.consult.wait_for_decision(self._human_left, self.settings.hello_grace)
        self.timings["accepted" if decision.accepted else "declined"] = time.monotonic()
        if decision.accepted:
            return await self._merge()
        await self._tell_human(decision.farewell)
        return self._result(decision.outcome, detail=decision.reason)

    def consult_options(self) -> dict[str, Any]:
        """The consult session's models. Its turns end on voice activity, not on the
        end-of-turn model: that model scores a bare "Hello?" as unfinished and waits its
        longest delay (about 2.5 s) before the human hears a word."""
        options = self.models.options()
        if self.models.vad is not None:
            options["turn_handling"] = {
                **(self.models.turn_handling or {}),
                "turn_detection": "vad",
            }
        return options

    def _keep_brief(self, brief: asyncio.Future[str]) -> None:
        if not brief.cancelled() and brief.exception() is None:
            self.brief = brief.result()

    def _show_brief(self, brief: asyncio.Future[str]) -> None:
        """The consult room's agent carries the brief, for the human's softphone or CRM."""
        if self.brief and self._consult_open:
            self._publish({"handoff.brief": self.brief}, room=self.consult_room)

    async def _merge(self) -> HandoffResult:
        assert self._leg is not None
        self._enter("merging")
        try:
            await self.line.move(self._leg, self.line.caller_room)
            self._leg = replace(self._leg, room=self.line.caller_room)
            # Only once the human is really in the caller's room is the call merged: the move
            # takes time, and watching for hang-ups before they arrive would read as one.
            if not await self.line.wait_for_arrival(
                self.line.caller_room, self._leg.identity, MOVE_BOUND
            ):
                raise LegLost("the human did not arrive in the caller's room")
        except MoveRefused as e:
            logger.error("move refused in room %s: %s", self.line.caller_room, e)
            await self._tell_human(
                "I'm sorry, I can't put the call through from here. "
                "I'll let the caller know. Goodbye."
            )
            return self._result(HandoffOutcome.FAILED, detail=f"move refused ({e})")
        except LegLost as e:
            logger.warning("human lost during the move in room %s: %s", self.line.caller_room, e)
            return self._result(HandoffOutcome.FAILED, detail=str(e))
        if self._caller_left is not None and self._caller_left.done():
            self._caller_gone = True  # they arrive to nobody: the caller's room is deleted
            return self._result(HandoffOutcome.CALLER_LEFT, detail="the caller hung up")
        self._enter("merged")
        self._merged = True
        self.timings["merged"] = time.monotonic()
        await self._hold.stop()  # type: ignore[union-attr]
        await self.session.say(
            f"You're now connected with {self.destination.said_as}.",
            allow_interruptions=False,
        )
        return self._result(HandoffOutcome.CONNECTED)


@dataclass(frozen=True)
class Decision:
    outcome: HandoffOutcome
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome is HandoffOutcome.CONNECTED

    @property
    def farewell(self) -> str:
        if self.outcome is HandoffOutcome.DECLINED:
            return "Understood, I'll let the caller know. Thank you, goodbye."
        return ""  # a voicemail hears nothing about the caller


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 4. The agents
# ──────────────────────────────────────────────────────────────────────────────────────────────

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
greeting.
"""


async def _words(text: str) -> Any:
    yield text


class ConsultAgent(Agent):
    """Talks to the human in the private consult room: brief, answer questions, take the
    decision. The brief is composed while the phone rings and spoken as soon as the human
    says hello, without a model round-trip."""

    def __init__(self, *, brief: asyncio.Future[str], transcript: str, handoff: Handoff) -> None:
        super().__init__(
            instructions=CONSULT_INSTRUCTIONS.format(
                business=handoff.settings.business_name,
                team=handoff.destination.said_as,
                reason=handoff.reason,
                transcript=transcript or "(nothing said yet)",
            ),
        )
        self._brief = brief
        self._handoff = handoff
        self._ready_audio: tuple[str, list[rtc.AudioFrame]] | None = None
        self._speaking_brief = False
        self._brief_heard = False
        self._decision: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self.brief_started = asyncio.Event()

    async def prepare_voice(self, tts: Any) -> None:
        """Synthesise the brief's first sentence while the phone rings, so the human hears it
        without waiting for speech synthesis."""
        text = await self._brief
        first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        try:
            async with tts.synthesize(first) as stream:
                frames = [audio.frame async for audio in stream]
        except Exception as e:
            logger.warning(
                "could not prepare the brief's audio, it will be synthesised live: %r", e
            )
            return
        self._ready_audio = (first, frames)

    async def tts_node(self, text: Any, model_settings: Any) -> Any:
        ready, self._ready_audio = self._ready_audio, None
        if ready is None or not self._speaking_brief:
            async for frame in Agent.default.tts_node(self, text, model_settings):
                yield frame
            return
        self._speaking_brief = False
        said = "".join([chunk async for chunk in text])  # the brief arrives whole
        first, frames = ready
        rest = said
        if said.startswith(first):
            for frame in frames:
                yield frame
            rest = said[len(first) :].strip()
        if rest:
            async for frame in Agent.default.tts_node(self, _words(rest), model_settings):
                yield frame

    def decide(self, decision: Decision) -> None:
        if not self._decision.done():
            self._decision.set_result(decision)

    def on_digit(self, digit: str) -> None:
        if digit == "1":
            self.decide(Decision(HandoffOutcome.CONNECTED))
        elif digit == "2":
            self.decide(Decision(HandoffOutcome.DECLINED, "declined on the keypad"))

    async def wait_for_decision(self, human_left: asyncio.Future[str], grace: float) -> Decision:
        """The human's answer. They get ``grace`` seconds to say hello first; then the brief
        starts anyway."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.brief_started.wait()), grace)
        if not self.brief_started.is_set() and not self._decision.done():
            self.session.generate_reply()
        done, _ = await asyncio.wait(
            {self._decision, human_left}, return_when=asyncio.FIRST_COMPLETED
        )
        if self._decision in done:
            return self._decision.result()
        return Decision(HandoffOutcome.DECLINED, "the human hung up during the briefing")

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any
    ) -> Any:
        if self._brief_heard:
            async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
                yield chunk
            return
        if self._decision.done():
            return
        # Until the brief has actually been spoken, every reply is the brief: a preemptive
        # generation that the framework throws away must not lose it.
        self.brief_started.set()
        heard = next(
            (
                m.text_content
                for m in reversed(chat_ctx.messages())
                if m.role == "user" and m.text_content
            ),
            "",
        )
        if heard and VOICEMAIL_HINTS.search(heard):
            self.decide(Decision(HandoffOutcome.VOICEMAIL, "a voicemail greeting answered"))
            return
        text = await asyncio.shield(self._brief)  # a dropped reply must not cancel the brief
        self._handoff.timings["brief_start"] = time.monotonic()
        self.session.on("conversation_item_added", self._brief_spoken)
        self._speaking_brief = True
        yield text

    def _brief_spoken(self, ev: Any) -> None:
        if getattr(ev.item, "role", None) == "assistant" and not self._brief_heard:
            self._brief_heard = True
            self._handoff.timings.setdefault("brief_end", time.monotonic())

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


TEAMS_NOW_ID = "warm-handoff.teams-now"  # the system message saying which teams are open now


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
    ) -> None:
        self.settings = settings
        self.line = line
        self.models = models
        self.records = records or CallRecords(line.caller_room)
        self.now = now  # the clock opening hours are read with (aware datetimes)
        self.destinations = settings.destinations
        self.results: list[HandoffResult] = []
        self.tried: list[Destination] = []  # every dial on this call, in order, repeats too
        self.ended: dict[Destination, HandoffOutcome] = {}  # how each one's last dial ended
        self.handoff: Handoff | None = None  # the attempt in progress
        self._handoff_done = asyncio.Event()
        self._last_brief = ""
        self._shutting_down = False
        self._leaving: asyncio.Future[None] | None = None
        self._ending = False  # end_call said goodbye: no transfer starts any more
        self._callback_time = ""  # when the closed team last asked for opens: a callback's time
        tools = [self._transfer_tool()] if self.destinations else []
        if settings.allow_dial_pattern is not None:
            tools.append(self._direct_tool())
        teams = "\n".join(f"- {d.name}: {d.description}" for d in self.destinations)
        super().__init__(
            instructions=CALLER_INSTRUCTIONS.format(
                business=settings.business_name,
                scope=settings.business_scope,
                teams=teams,
                direct=(
                    ", or to a number the caller gives when the operator allows it"
                    if settings.allow_dial_pattern
                    else ""
                ),
            ),
            tools=tools,
            **models.options(),
        )

    def _transfer_tool(self) -> Any:
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

        async def transfer_call(raw_arguments: dict[str, Any], context: RunContext) -> Any:
            name = str(raw_arguments.get("destination", ""))
            destination = self.settings.destination(name)
            if destination is None:
                logger.warning(
                    "transfer_call refused an unknown destination in room %s", self.line.caller_room
                )
                return ToolResult(
                    f"There is no team called {name!r}. Offer only: "
                    + ", ".join(d.name for d in self.destinations)
                    + "."
                )
            return await self._hand_off(destination, str(raw_arguments.get("reason", "")))

        return function_tool(transfer_call, raw_schema=schema)

    def _direct_tool(self) -> Any:
        pattern = self.settings.allow_dial_pattern
        assert pattern is not None

        async def transfer_to_number(context: RunContext, number: str, reason: str) -> Any:
            """Connect the caller with a phone number they gave, if company policy allows it.

            Args:
                number: The number in international format, e.g. +15105550100.
                reason: What the caller needs, in a few words.
            """
            number = re.sub(r"[\s().-]", "", number)
            if not (E164.match(number) and pattern.fullmatch(number)):
                logger.warning(
                    "transfer_to_number refused %s in room %s",
                    mask_number(number),
                    self.line.caller_room,
                )
                return ToolResult(
                    "That number is not one you are allowed to connect to. Tell "
                    "the caller, and offer the listed teams instead."
                )
            direct = Destination(
                "direct", number, "a number the caller gave", spoken_name="that number"
            )
            return await self._hand_off(direct, reason)

        return function_tool(transfer_to_number)

    async def _hand_off(self, destination: Destination, reason: str) -> Any:
        if self.handoff is not None:
            return ToolResult("A transfer is already in progress.", reply_required=False)
        if self._ending:
            return ToolResult("The call is ending.", reply_required=False)
        if not self.is_open(destination):
            return await self._closed(destination, reason)
        if not self.may_offer(destination):
            return ToolResult(
                f"{destination.name} was already tried on this call and could not take it; "
                "do not try it again. " + self._what_next_for_model()
            )
        if len(self.tried) >= self.settings.max_attempts:
            return ToolResult("No more transfers on this call. " + self._what_next_for_model())
        self.tried.append(destination)
        self.ended[destination] = HandoffOutcome.FAILED  # until the attempt says otherwise
        self.handoff = Handoff(
            settings=self.settings,
            line=self.line,
            session=self.session,
            destination=destination,
            reason=reason or "a request for a person",
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

    async def _after_handoff(self, destination: Destination, result: HandoffResult) -> Any:
        """Record the attempt and tell the caller what happens next."""
        self.ended[destination] = result.outcome
        self.results.append(result)
        self.records.handoff(result)
        if result.brief:
            self._last_brief = result.brief
        if result.connected:
            self._leaving = asyncio.ensure_future(self._leave(result.leg))
            return ToolResult(
                f"The caller is now talking with {destination.said_as}.", reply_required=False
            )
        if result.outcome is HandoffOutcome.CALLER_LEFT:
            if result.phase in ("ringing", "briefing"):
                self._record_abandoned(result)
            return ToolResult("The caller hung up during the transfer.", reply_required=False)
        if result.outcome is HandoffOutcome.CANCELLED_BY_CALLER:
            await self.session.say("No problem, I've stopped the transfer. What else can I do?")
            return ToolResult(
                f"The caller cancelled the transfer while on hold. If they ask for "
                f"{destination.name} again, call transfer_call again.",
                reply_required=False,
            )
        if self._shutting_down:
            await self.session.say(
                "I'm sorry, I have to end this call now. Please call us back in a moment."
            )
            return ToolResult("The call is ending.", reply_required=False)
        told = CALLER_HEARS[result.outcome].format(team=destination.said_as)
        await self.session.say(f"{told} {self._what_next_for_caller()}")
        return ToolResult(
            f"The transfer to {destination.name} did not happen: {result.outcome.value}"
            + (f" ({result.detail})" if result.detail else "")
            + ". The caller has been told. "
            + self._what_next_for_model(),
            reply_required=False,
        )

    def is_open(self, destination: Destination, now: datetime | None = None) -> bool:
        """Whether ``destination`` takes calls now (one with no ``hours`` always does)."""
        hours = destination.hours
        return hours is None or hours.is_open(now or self.now())

    def _opens(self, destination: Destination, now: datetime) -> str:
        opens = destination.hours.next_opening(now) if destination.hours else None
        return when_it_opens(opens, now) if opens else ""

    def teams_now(self) -> str:
        """Which teams take calls right now, for the model; "" when no team has hours."""
        if not any(d.hours for d in self.destinations):
            return ""
        now = self.now()
        open_now = [d.name for d in self.destinations if self.is_open(d, now)]
        closed = [
            f"{d.name} (opens {self._opens(d, now) or 'at no set time'})"
            for d in self.destinations
            if not self.is_open(d, now)
        ]
        return (
            f"Right now these teams are open: {', '.join(open_now) or 'none'}; closed: "
            f"{', '.join(closed) or 'none'}. Offer only open teams. If the caller asks for a "
            "closed team, call transfer_call with it anyway: the caller is told when it opens "
            "and offered an open team or a callback."
        )

    async def _closed(self, destination: Destination, reason: str) -> Any:
        """A closed team was asked for: never dialled. The caller hears when it opens next and
        is offered an open team or a callback, at that time unless they choose another."""
        now = self.now()
        when = self._opens(destination, now)
        self._callback_time = when
        result = HandoffResult(
            HandoffOutcome.CLOSED,
            destination.name,
            self.settings.mode,
            detail=f"outside opening hours; opens {when}" if when else "outside opening hours",
            timings={"decision": time.monotonic()},
            attempt=uuid.uuid4().hex[:8],
            reason=reason or "a request for a person",
            phase="closed",
        )
        self.results.append(result)
        self.records.handoff(result)
        team = destination.said_as[0].upper() + destination.said_as[1:]
        told = sentence(f"{team} is closed right now" + (f" and opens {when}" if when else ""))
        callback_at = when or "as soon as they can"
        following = self.next_destination(after=destination)
        if following is not None:
            offer = (
                f"I can try {following.said_as}, who can take your call now, or take your "
                f"details so someone calls you back {sentence(callback_at)} "
                "Which would you prefer?"
            )
        else:
            offer = (
                f"I can take your details so someone calls you back {sentence(callback_at)} "
                "Would you like that?"
            )
        await self.session.say(f"{told} {offer}")
        return ToolResult(
            f"{destination.name} is closed now and was not dialled"
            + (f"; it opens {when}" if when else "")
            + ". The caller has been told. "
            + (
                f"If the caller agrees to try {following.name}, call transfer_call with "
                f"destination {following.name}. "
                if following
                else ""
            )
            + "If they want a callback, ask their name, then call request_callback; leave "
            f"best_time empty for {callback_at}, unless they ask for another time.",
            reply_required=False,
        )

    def may_offer(self, destination: Destination) -> bool:
        """The one rule for offering a destination (again) on this call: never after it
        failed (busy, no answer, declined, voicemail, unreachable, or a technical failure);
        yes if it was never dialled, or if the caller cancelled its last attempt (nothing was
        wrong with it). Every dial, repeats included, counts toward ``HANDOFF_MAX_ATTEMPTS``
        (see ``_hand_off``)."""
        if destination not in self.ended:
            return True  # never dialled
        return self.ended[destination] is HandoffOutcome.CANCELLED_BY_CALLER

    def next_destination(self, after: Destination | None = None) -> Destination | None:
        """Who to offer after a failed attempt (or instead of the closed ``after``): the last
        destination's named fallback, else the first one ``may_offer`` allows in the
        operator's order; only a team open now; nobody once ``HANDOFF_MAX_ATTEMPTS`` dials were
        made."""
        if len(self.tried) >= self.settings.max_attempts:
            return None
        now = self.now()
        offerable = [
            d
            for d in self.destinations
            if self.may_offer(d) and self.is_open(d, now) and d != after
        ]
        last = after or (self.tried[-1] if self.tried else None)
        preferred = next((d for d in offerable if last and d.name == last.fallback), None)
        return preferred or (offerable[0] if offerable else None)

    def _what_next_for_caller(self) -> str:
        following = self.next_destination()
        if following is not None:
            return (
                f"I can try {following.said_as} instead, or take your details so someone "
                f"calls you back. Which would you prefer?"
            )
        return "I can take your details so someone calls you back. Would you like that?"

    def _what_next_for_model(self) -> str:
        following = self.next_destination()
        offer = (
            f"If the caller agrees to try {following.name}, call transfer_call with "
            f"destination {following.name}. "
            if following
            else ""
        )
        return (
            offer + "If they want a callback, ask their name and the best time, then call "
            "request_callback."
        )

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any
    ) -> Any:
        """While the caller is on hold, their words are answered here, at once and without a
        model request: where things stand, or, for "never mind", the transfer stops."""
        handoff = self.handoff
        if handoff is not None and handoff.phase in ("announcing", "ringing", "briefing"):
            said = next(
                (
                    m.text_content
                    for m in reversed(chat_ctx.messages())
                    if m.role == "user" and m.text_content
                ),
                "",
            )
            answer = handoff.answer_on_hold(said)
            if answer:
                yield answer
            return
        self._show_teams_now(chat_ctx)
        async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
            yield chunk

    def _show_teams_now(self, chat_ctx: llm.ChatContext) -> None:
        """Opening hours change during a call: the model sees which teams are open at the
        moment of each request, in a system message after its instructions. ``chat_ctx`` is
        this request's own copy (voice/agent_activity.py ``_pipeline_reply_task_impl``), so
        nothing stale stays in the history."""
        teams_now = self.teams_now()
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

    @function_tool
    async def request_callback(
        self,
        context: RunContext,
        name: str,
        best_time: str = "",
        number: str = "",
        confirmed: bool = False,
    ) -> Any:
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
        number = re.sub(r"[\s().-]", "", number) or self.line.caller_number
        if not E164.fullmatch(number):
            return ToolResult("Ask for the number to call, with the area code.")
        best_time = best_time.strip() or self._callback_time
        if not best_time:
            return ToolResult("Ask the caller when is the best time to call them back.")
        if not confirmed:
            await self.session.say(
                f"Let me read that back: {name}, on {speakable_number(number)}, {best_time}. "
                "Is that right?"
            )
            return ToolResult(
                "The details were read back. If the caller says yes, call request_callback "
                "again with confirmed=true; otherwise correct the details.",
                reply_required=False,
            )
        reason = self.results[-1].reason if self.results else ""
        self.records.callback(
            CallbackRequest(
                room=self.line.caller_room,
                caller_name=name,
                number=number,
                best_time=best_time,
                reason=reason or "asked for a callback",
                summary=self._summary(),
                source="caller",
            )
        )
        await self.session.say(
            f"Thank you, {name}. Someone will call you back {sentence(best_time)}"
        )
        return ToolResult("The callback request is recorded.", reply_required=False)

    @function_tool
    async def end_call(self, context: RunContext) -> Any:
        """Say goodbye and hang up, when the caller is done: they said goodbye, or that they
        need nothing else. Not when they ask to hold or for a person, not while they are
        being transferred, and not when unsure."""
        if self.handoff is not None:
            logger.info(
                "end_call refused in room %s: a transfer is in progress", self.line.caller_room
            )
            return ToolResult(
                "The caller is being transferred: the call was not ended.", reply_required=False
            )
        if self._ending:
            return ToolResult("The call is already ending.", reply_required=False)
        self._ending = True
        await self.session.say(
            f"Thank you for calling {self.settings.business_name}. Goodbye!",
            allow_interruptions=False,
        )
        self.records.call_ended(outcome="completed")
        self._leaving = asyncio.ensure_future(self._hang_up())
        return ToolResult("The call has ended.", reply_required=False)

    async def _hang_up(self) -> None:
        """The agent ends the call: its session closes and the caller's room is deleted, which
        ends the caller's phone leg (and the job)."""
        self.session.shutdown()
        await self.line.delete_room(self.line.caller_room)

    def _summary(self) -> str:
        if self._last_brief:
            return self._last_brief
        return conversation_transcript(self.session.history, limit=12)

    def _record_abandoned(self, result: HandoffResult) -> None:
        self.records.callback(
            CallbackRequest(
                room=self.line.caller_room,
                caller_name="",
                number=self.line.caller_number if E164.fullmatch(self.line.caller_number) else "",
                best_time="as soon as possible",
                reason=f"{result.reason} (hung up while being transferred to {result.destination})",
                summary=result.brief or self._summary(),
                source="abandoned",
            )
        )

    async def shutdown_handoff(self, reason: str = "the worker is shutting down") -> None:
        """Called when the job is told to shut down: a transfer in progress ends cleanly (the
        human's phone stops ringing or they are told, rooms are deleted) before the process
        goes."""
        self._shutting_down = True
        if self.handoff is not None:
            self.handoff.stop(HandoffOutcome.FAILED, reason)
            # a move in flight is finished, not abandoned: it is bounded by MOVE_BOUND
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._handoff_done.wait(), 2 * MOVE_BOUND)
        await self.line.settle()

    async def _leave(self, leg: Leg | None) -> None:
        """The agent steps out; the caller's room stays open for the two people and is deleted
        as soon as either hangs up, so no leg lingers."""
        self.session.shutdown()
        if leg is None:
            return
        await self.line.wait_for_hangup(
            self.line.caller_room, (self.line.caller_identity, leg.identity)
        )
        await self.line.delete_room(self.line.caller_room)


class CallerSession(AgentSession):
    """The caller's session. At job shutdown the framework closes it first, then disconnects
    the room, and only then runs shutdown callbacks (livekit-agents ``ipc/job_proc_lazy_main.py``,
    ``_shutdown_job``); closing it waits up to 60 s for a running tool (``voice/agent_activity.py``
    ``aclose`` -> ``tool_executor.drain``). A transfer in progress is that tool, so it is ended
    first, while the caller can still be told and the human's phone still be stopped."""

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):  # never started: no agent
            agent = self.current_agent
            if isinstance(agent, WarmHandoffAgent):
                await agent.shutdown_handoff()
        await super().aclose()


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 5. The server
# ──────────────────────────────────────────────────────────────────────────────────────────────

server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    """Load Silero VAD once per process, not once per call."""
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


def build_models(settings: Settings, vad: Any) -> Models:
    tts_options: dict[str, Any] = {"model": settings.tts_model, "encoding": settings.tts_encoding}
    if settings.tts_voice_id:
        tts_options["voice_id"] = settings.tts_voice_id
    eleven_key = os.environ.get("ELEVEN_API_KEY") or os.environ.get("ELEVENLABS_API_KEY")
    if eleven_key:
        tts_options["api_key"] = eleven_key
    return Models(
        stt=deepgram.STT(model=settings.stt_model),
        llm=openai.LLM(model=settings.llm_model),
        tts=elevenlabs.TTS(**tts_options),
        vad=vad,
    )


async def run_call(
    ctx: JobContext, settings: Settings, models: Models, line: PhoneLine | None = None
) -> AgentSession:
    """Answer one call: start the session, wait until the caller is really there, greet once."""
    console = ctx.is_fake_job()
    if console and settings.handoff_mode is HandoffMode.AUTO:
        settings = replace(settings, handoff_mode=HandoffMode.CONSULT)  # the simulated line moves
    if console and not settings.destinations:
        settings = replace(settings, destinations=DEMO_DESTINATIONS)
    if line is None:
        line = (
            SimulatedPhoneLine(settings.simulated_human, announce=_show_step)
            if console
            else LiveKitPhoneLine(ctx, settings)
        )
    records = CallRecords(line.caller_room, ctx.job.id, delivery_for(settings))
    agent = WarmHandoffAgent(settings, line, models, records)

    async def on_shutdown(reason: str = "") -> None:
        await agent.shutdown_handoff()
        records.call_ended()
        if records.delivery is not None:
            await records.delivery.drain()

    ctx.add_shutdown_callback(on_shutdown)
    session = CallerSession()
    session.on("close", lambda _: records.call_ended())
    if console:  # the console owns the audio; there is no room to join
        await session.start(agent=agent)
    else:
        await session.start(agent=agent, room=ctx.room)
    if not console:
        caller = await ctx.wait_for_participant()
        line.caller_identity = caller.identity
        line.caller_number = sip_caller_number(caller.attributes)
    session.say(settings.greeting)
    return session


def sip_caller_number(attributes: Mapping[str, str]) -> str:
    """The caller's own number from their SIP participant's ``sip.phoneNumber``, only if it is
    E.164 exactly as given ("+15105550100"); anything else ("anonymous", "5105550100",
    "+1 510 555 0100", missing) is unknown, "". It is not normalised: a guessed country code
    or a misread digit would send a stranger's number to the human or call a stranger back."""
    number = attributes.get("sip.phoneNumber", "")
    return number if E164.fullmatch(number) else ""


def _show_step(text: str) -> None:
    logger.info("📞 %s", text)


@server.rtc_session(agent_name=os.environ.get("AGENT_NAME") or DEFAULT_AGENT_NAME)
async def entrypoint(ctx: JobContext) -> None:
    ctx.log_context_fields = {"room": ctx.room.name}
    settings = load_settings(telephony=not ctx.is_fake_job())
    await run_call(ctx, settings, build_models(settings, ctx.proc.userdata["vad"]))


async def check(settings: Settings) -> bool:
    """``python warm_handoff.py check``: print the configuration (secrets masked) and prove
    the LiveKit API credentials work with a harmless read."""
    width = max(len(name) for name, _ in settings.masked())
    for name, value in settings.masked():
        print(f"{name:<{width}}  {value}")
    try:
        async with api.LiveKitAPI(
            settings.livekit_url, settings.livekit_api_key, settings.livekit_api_secret
        ) as lk:
            rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 15)
    except Exception as e:
        reason = getattr(e, "message", "") or type(e).__name__
        print(f"LiveKit API: FAILED ({getattr(e, 'code', 'error')}: {reason})", file=sys.stderr)
        return False
    print(f"LiveKit API: OK, the credentials work ({len(rooms.rooms)} rooms open)")
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    command = argv[1] if len(argv) > 1 else ""
    if command == "check":
        try:
            settings = load_settings()
        except ConfigError as e:
            print(e, file=sys.stderr)
            raise SystemExit(1) from None
        raise SystemExit(0 if asyncio.run(check(settings)) else 1)
    if command in ("start", "dev", "console", "connect") and "--help" not in argv:
        problems: list[str] = []
        try:
            load_settings(telephony=command != "console")
        except ConfigError as e:
            problems += e.problems
        problems += [f"{key} is not set" for key in missing_provider_keys()]
        if problems:
            print(ConfigError(problems), file=sys.stderr)
            raise SystemExit(1)
    cli.run_app(server)


if __name__ == "__main__":
    main()
