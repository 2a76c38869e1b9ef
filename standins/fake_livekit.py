"""A local model of the LiveKit server API, speaking LiveKit's Twirp protocol on 127.0.0.1.

It behaves as LiveKit Cloud and its SIP bridge do, read from the real sources (livekit/sip
``pkg/sip/outbound.go``, ``client.go``, ``errors.go``; livekit/protocol ``livekit/sip.go``;
livekit/livekit ``pkg/service/sip.go``, ``roomservice.go``, ``roommanager.go``; livekit/psrpc;
livekit/media-sdk ``dtmf/dtmf.go``), and each behaviour below names its source in a comment.
The real ``livekit.api.LiveKitAPI`` client (and ``JobContext.api``, built from ``env()``)
talks to it over HTTP, under a ``*.livekit.cloud`` name, so the client's own failover (retries)
applies exactly as it does against LiveKit Cloud::

    async with FakeLiveKitServer() as lk:           # lk.url == "http://test-project.livekit.cloud:<port>"
        lk.script_dial(DialScript.sip_error(486), DialScript.answer(ring=0.2))
        async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as lkapi: ...
        assert lk.calls_to("CreateSIPParticipant")[0].request.sip_call_to == "+15550100"

Public API (stable; the worker's tests build on it):

* ``FakeLiveKitServer(cloud=True, move_supported=True, join_delay=0.02, ringing_delay=0.01,
  dtmf_char_time=0.52, move_delay=0.2)``; ``async with`` or ``start()``/``stop()``; ``url``,
  ``local_url``, ``port``, ``env()`` (``env(local=True)`` for a child process: the cloud name
  resolves only in this one). ``cloud=True``: while the server runs, this process resolves
  ``*.livekit.cloud`` to 127.0.0.1 (``resolve_livekit_cloud_locally``) and ``url`` is
  ``http://test-project.livekit.cloud:<port>``; ``GET /settings/regions`` lists other region
  names for the same server, so the client's retries fail over there. ``cloud=False``:
  ``http://127.0.0.1:<port>``, self-hosted, never retried.
* Scripts: ``script_dial(*DialScript)`` (FIFO, one per INVITE, i.e. per request try; default:
  answer at once) and ``script_method(method, *MethodFault)`` (FIFO, one per request try).
* State: ``rooms`` (``{room: Room}``; a ``Room`` is a dict ``identity -> Participant``, so
  ``identity in lk.rooms[room]`` and ``set(lk.rooms[room])`` work), ``participant(room,
  identity)`` (``.attributes``, ``.call_status``, ``.who``, ``.call``), ``attributes(room,
  identity)``, ``sip_calls`` / ``dials_to(identity)`` (every INVITE: ``SipCall`` with
  ``status``, ``outcome``, ``who``, ``up``, ``ringing``, ``invite_at``/``answered_at``/
  ``active_at``/``ended_at``, ``end_reason``), ``calls`` / ``calls_to(method)`` (every HTTP
  request: ``RecordedCall`` with ``request_id``, ``host``, ``answer``, ``aborted``,
  ``response_lost``), ``rejected``, ``deleted_rooms``, ``cancelled_dials`` (identities whose
  ringing INVITE was cancelled because their participant left the room: removed, room deleted,
  replaced), ``aborted_requests`` (the client gave up; the server carried on),
  ``lost_responses``, ``move_supported``.
* Events: ``events`` (every ``RoomEvent``), ``subscribe(room, callback) -> unsubscribe``
  (``room=None``: every room), ``await wait_for(predicate, timeout=5)``. Kinds:
  ``participant_connected``, ``participant_attributes_changed`` (``changed``, e.g.
  ``sip.callStatus``), ``participant_disconnected`` (``reason``: a ``DisconnectReason`` name),
  ``room_deleted``.
* Drivers: ``add_participant(room, identity, **attributes)``, ``remove_participant(room,
  identity)``, ``far_end_hangs_up(room, identity)`` (the phone sends BYE: "hangup", then the
  participant leaves ``leaves_after_hangup`` s later, 0 by default).
* A connection of one's own: ``connect(room, identity="agent")`` joins the room and returns a
  ``RoomConnection``, the room as ``livekit.rtc.Room`` shows it (``remote_participants``, their
  attributes, its events), for code that reads the rooms it is in.

A dial, as LiveKit runs it: a request LiveKit refuses (``_validate_dial``: invalid_argument; an
inline trunk without ``sip_number``: failed_precondition) dials nobody. The SIP participant
joins the room ``join_delay`` after the request (``sip.callStatus`` "dialing"), "ringing" at the
180 (``ringing_delay`` after the INVITE, unless the far end sends none), and on the answer
"automation" while the request's DTMF is sent (0.5 s a character) then "active". A far end that
sends nothing at all ends the dial at sipgo's Timer B (``invite_timer_b``, 32 s) if the ring
timeout has not come first. Without ``wait_until_answered`` the response comes once the
participant has joined; with it, once "active". A ring timeout or the participant leaving while
it rings (RemoveParticipant, DeleteRoom, a same-identity join) cancels the INVITE: Twirp
``canceled``, no SIP status. A RemoveParticipant before the join is ``not_found`` and the INVITE
still goes out. A client that gives up (timeout, cancelled task) does not stop the call. Each
request try is a new INVITE (the server does not de-duplicate ``X-Livekit-Request-Id``); the
newest participant of an identity replaces the older one, whose call is hung up.

What the real client (livekit-api 1.2.2 on aiohttp 3.14) does with it: a dial with
``wait_until_answered`` times out after ring timeout + 2 s; on ``*.livekit.cloud`` transport
errors (a dropped connection, a timeout) and HTTP 5xx are tried up to 3 times when the request
timeout is 5 s or more (the session default is 10 s), all tries with one request id; RoomService
calls have no HTTP timeout at all (twirp_client.py passes ``timeout=None``, which aiohttp reads
as "none", not "the session's").

Dials (``DialScript``; ``ring`` is seconds from the INVITE to the far end's final response):

* ``answer(ring=0, who="person", drop_response=False, hangs_up_after=None)``; ``person(ring=2)``,
  ``voicemail(ring=25)``, ``pbx()``, ``silent(ring=2)``: answered; ``who`` says who picked up
  (``Participant.who``/``SipCall.who``) for the audio model to key off. ``drop_response``: the
  connection drops instead of the response, after the outcome (the call stays up).
* ``sip_error(code, reason=None, delay=0, rings=True)`` -> ``api.SipCallError`` with that
  status (``rings=False``: no 180 before it, only 100 Trying).
* ``canceled(delay=0, rings=True)`` -> the INVITE transaction ends with no final response:
  Twirp ``canceled`` with no SIP status.
* ``server_error(delay=0)`` -> Twirp ``internal`` before anyone joins (the client retries it).
* ``hang(rings=True)`` -> rings until the ring timeout (or until the participant leaves);
  ``rings=False``: only 100 Trying, "dialing" to the end.
* ``no_response()`` -> the INVITE is never answered at all: the ring timeout or Timer B.

Method faults (``MethodFault``, any method): ``hang()`` (never answered; nothing happens, but a
dial's call goes on), ``slow(delay)`` (acts and answers after ``delay``), ``lose_response()``
(acts, then drops the connection: on cloud the client retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from google.protobuf.message import DecodeError, Message
from livekit import rtc
from livekit.api import TokenVerifier
from livekit.api.access_token import Claims
from livekit.protocol import agent as agent_pb
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import sip as sip_pb

from standins import Served

API_KEY = "devkey"
API_SECRET = "a-very-long-test-secret-at-least-32-chars!!"
PROJECT_HOST = "test-project.livekit.cloud"
CALL_STATUS = "sip.callStatus"  # livekit/protocol livekit.AttrSIPCallStatus

# Twirp error code -> HTTP status (Twirp spec v7; psrpc errors.go `toTwirp` hands LiveKit's
# errors to Twirp by code). The client retries (fails over on) 5xx and transport errors only.
# fmt: off
TWIRP_HTTP_STATUS = {
    "canceled": 408, "unknown": 500, "invalid_argument": 400, "malformed": 400,
    "deadline_exceeded": 408, "not_found": 404, "bad_route": 404, "already_exists": 409,
    "permission_denied": 403, "unauthenticated": 401, "resource_exhausted": 429,
    "failed_precondition": 412, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
    "internal": 500, "unavailable": 503, "dataloss": 500,
}

# SIP status -> Twirp code, as LiveKit's server maps it: livekit/protocol `livekit/sip.go`
# (`sipCodeToGRPCCode`, `SIPStatus.GRPCStatus`, `SIPStatus.TwirpErrorMeta`). 480 and 486 are
# resource_exhausted (HTTP 429), as the real stack answered (livekit-server 1.13.5 with
# livekit-sip 1.8.0, tests/test_real_stack.py); livekit/protocol PR #1766 makes them
# failed_precondition in later releases. The worker reads the SIP status, not the code, so both
# end the same. The gRPC code becomes the same-named Twirp code (livekit/psrpc errors.go); no
# SIP failure is a 5xx, so the client's failover never retries one.
SIP_TWIRP_CODE = {
    300: "invalid_argument", 301: "not_found", 302: "not_found",
    400: "invalid_argument", 401: "permission_denied", 402: "permission_denied",
    403: "permission_denied", 404: "not_found", 407: "unauthenticated",
    408: "deadline_exceeded", 410: "not_found", 480: "resource_exhausted",
    481: "not_found", 484: "invalid_argument", 485: "invalid_argument",
    486: "resource_exhausted", 487: "aborted", 488: "invalid_argument", 491: "aborted",
    500: "failed_precondition", 501: "failed_precondition", 502: "failed_precondition",
    503: "failed_precondition", 504: "deadline_exceeded", 505: "invalid_argument",
    600: "resource_exhausted", 603: "permission_denied", 604: "not_found",
    606: "invalid_argument", 607: "permission_denied", 608: "permission_denied",
}
SIP_REASONS = {
    404: "Not Found", 408: "Request Timeout", 480: "Temporarily Unavailable",
    486: "Busy Here", 487: "Request Terminated", 500: "Server Internal Error",
    503: "Service Unavailable", 600: "Busy Everywhere", 603: "Decline",
}
# fmt: on

# livekit/sip pkg/sip/participant.go `defaultRingingTimeout`: the ring window when the request
# sets none (livekit-api's `_dial_timeout.py` pins 30 s when wait_until_answered is set).
SERVER_DEFAULT_RINGING_TIMEOUT = 180.0
# livekit/livekit pkg/service/sip.go CreateSIPParticipant: the server's own deadline for the
# internal request (80 s when waiting for the answer, else 30 s), whatever the client does.
SERVER_DIAL_DEADLINE = {True: 80.0, False: 30.0}


def sip_twirp_code(status: int) -> str:
    """Twirp code LiveKit uses for a failed call with SIP ``status``."""
    default = "failed_precondition" if 500 <= status < 600 else "invalid_argument"
    return SIP_TWIRP_CODE.get(status, default)


def _sip_failure_reason(status: int) -> str:
    """How the SIP participant leaves the room after a failed INVITE, as the room's members see
    it. livekit/sip pkg/sip/errors.go ``classifyInviteError`` gives the call a status for the far
    end's final code; outbound.go ``close`` leaves the room with that status's
    ``DisconnectReason()`` (participant.go: callUnavailable -> USER_UNAVAILABLE, callRejected ->
    USER_REJECTED, callDropped -> UNKNOWN_REASON); livekit-server keeps only USER_UNAVAILABLE and
    USER_REJECTED from a leave and takes any other as CLIENT_INITIATED
    (pkg/rtc/signalling/signalhandler.go, ``SignalRequest_Leave``)."""
    if status in (404, 408, 480):
        return "USER_UNAVAILABLE"  # callUnavailable
    if 400 <= status < 500 or 600 <= status < 700:
        return "USER_REJECTED"  # callRejected: auth, forbidden, busy, any other 4xx; 6xx
    return "CLIENT_INITIATED"  # callDropped: a carrier's 5xx, a 3xx


NO_NUMBERS_ON_INLINE_TRUNK = "twirp error unknown: no numbers on outbound trunk"


def _validate_dial(req: sip_pb.CreateSIPParticipantRequest) -> None:
    """The checks LiveKit makes before any room join or INVITE, answered ``invalid_argument``
    (livekit/protocol livekit/sip.go ``CreateSIPParticipantRequest.ValidateResult`` and
    ``SIPOutboundConfig.Validate``/``validateHostnameFormat``; livekit/livekit
    pkg/service/sip.go ``CreateSIPParticipantRequest`` returns the failure as invalid_argument);
    then a call with no number to show, ``failed_precondition`` (below). Header and media
    checks are left out: the worker sends only X- headers and no media."""
    problem = ""
    if not req.sip_trunk_id and not req.HasField("trunk") and not req.sip_number:
        problem = "missing sip trunk id and sip number"
    elif req.HasField("trunk") and not req.trunk.hostname:
        problem = "no outbound hostname specified"
    elif req.HasField("trunk") and (
        "transport=" in req.trunk.hostname
        or any(c in req.trunk.hostname for c in "@;")
        or req.trunk.hostname.startswith(("sip:", "sips:"))
    ):
        problem = "trunk hostname should be a hostname or IP, not SIP URI"
    elif not req.sip_call_to:
        problem = "missing sip callee number"
    elif "@" in req.sip_call_to:
        problem = "SipCallTo should be a phone number or SIP user, not a full SIP URI"
    elif not req.room_name:
        problem = "missing room name"
    if problem:
        raise TwirpError("invalid_argument", problem)
    # Then the number the call is from (livekit/protocol rpc/sip.go
    # NewCreateSIPParticipantRequestResult): the request's sip_number, else one of the stored
    # trunk's numbers; an inline trunk (``trunk``, no sip_trunk_id) has none, so the request is
    # refused with psrpc.FailedPrecondition. livekit/livekit pkg/service/sip.go
    # (CreateSIPParticipant, wrapSIPContextError) returns a psrpc error as it is, and the
    # generated Twirp server's writeError takes it as a twirp.Error (psrpc errors.go
    # psrpcError.As -> toTwirp): failed_precondition, HTTP 412, so the client never retries it.
    # The message as livekit-server v1.13.5 sends it (tests/test_real_stack.py, the real
    # stack): the error has passed through a Twirp client before, which prefixed its code.
    # The fake keeps no stored trunks: a sip_trunk_id is taken to name one with numbers.
    if not req.sip_number and not req.sip_trunk_id:
        raise TwirpError("failed_precondition", NO_NUMBERS_ON_INLINE_TRUNK)


def dialled(req: sip_pb.CreateSIPParticipantRequest) -> str:
    """Who an INVITE goes to, as the tests name destinations: the number, or sip:user@host for
    an inline trunk (a test-side key for the far end's script, not server behaviour)."""
    if req.HasField("trunk"):
        return f"sip:{req.sip_call_to}@{req.trunk.hostname}"
    return req.sip_call_to


class TwirpError(Exception):
    """An error the fake answers with, encoded like Twirp does."""

    def __init__(self, code: str, msg: str, meta: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {msg}")
        self.code, self.msg, self.meta = code, msg, meta or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.meta:
            body["meta"] = self.meta
        return web.json_response(body, status=TWIRP_HTTP_STATUS[self.code])


# The error a dial gets when its INVITE is cancelled from LiveKit's side: ring timeout, or the
# participant left the room while ringing (RemoveParticipant, DeleteRoom, a same-identity
# replacement). livekit/sip pkg/sip/outbound.go `sipSignal` cancels its context on either,
# `sipResponse` returns psrpc.Canceled(ErrSIPRequestTimeout), and errors.go
# `classifyInviteError` passes it through: Twirp `canceled`, no SIP status metadata.
def _cancelled_invite_error() -> TwirpError:
    return TwirpError("canceled", "sip request timed out")


# sipgo (github.com/livekit/sipgo, as livekit-sip v1.8.0 pins it) transaction/transaction.go:
# Timer_B = 64 * T1 = 32 s. An INVITE client transaction that has had no response at all by then
# ends (client_tx.go ``Init``); any 1xx, 100 Trying included, stops the timer
# (client_tx_fsm.go ``actInviteProceeding``), and the ring timeout alone bounds the wait.
INVITE_TIMER_B = 32.0


# errors.go ``transactionTimeoutError``: the transaction ended with no final response, after
# ``responses`` provisional ones; ``ClassifyInvite`` returns it as psrpc.Canceled.
def _no_final_response_error(responses: int) -> TwirpError:
    return TwirpError(
        "canceled", f"transaction failed to complete ({responses} intermediate responses)"
    )


@dataclass(frozen=True)
class DialScript:
    """What the far end of one INVITE does; build it with the classmethods."""

    kind: str  # "answer" | "sip_error" | "canceled" | "server_error" | "hang"
    delay: float = 0.0  # seconds from the INVITE to the final response ("ring")
    sip_status_code: int = 0
    sip_status: str = ""
    who: str = ""  # who picks up: "person" | "voicemail" | "pbx" | "silent"
    drop_response: bool = False  # the HTTP response is lost once the outcome is known
    hangs_up_after: float | None = None  # the far end hangs up this long after answering
    # What the far end sends before its final response: "180" (Ringing; a 183 is the same to
    # livekit-sip), "100" (Trying, and never rings: a phone switched off, a dead route behind
    # a proxy), or "" (nothing at all: a host that is down, a firewall dropping SIP).
    provisional: str = "180"

    @property
    def rings(self) -> bool:
        return self.provisional == "180"

    @property
    def ring(self) -> float:
        return self.delay

    @classmethod
    def answer(
        cls,
        ring: float = 0.0,
        *,
        who: str = "person",
        delay: float | None = None,
        drop_response: bool = False,
        hangs_up_after: float | None = None,
    ) -> DialScript:
        """Answered (200 OK) after ringing ``ring`` s (``delay`` is the old name)."""
        ring = ring if delay is None else delay
        return cls("answer", ring, who=who, drop_response=drop_response,
                   hangs_up_after=hangs_up_after)  # fmt: skip

    @classmethod
    def person(cls, ring: float = 2.0, **kw: Any) -> DialScript:
        """A person picks up after the phone has rung a while, and speaks."""
        return cls.answer(ring, who="person", **kw)

    @classmethod
    def voicemail(cls, ring: float = 25.0, **kw: Any) -> DialScript:
        """Nobody picks up; the voicemail answers after ~20-30 s of ringing."""
        return cls.answer(ring, who="voicemail", **kw)

    @classmethod
    def pbx(cls, **kw: Any) -> DialScript:
        """A PBX auto-attendant answers at once; after the request's DTMF (the extension) the
        person is rung inside the PBX, which the server does not see: the call is active."""
        return cls.answer(0.0, who="pbx", **kw)

    @classmethod
    def silent(cls, ring: float = 2.0, **kw: Any) -> DialScript:
        """A person picks up and says nothing."""
        return cls.answer(ring, who="silent", **kw)

    @classmethod
    def sip_error(
        cls, code: int, reason: str | None = None, delay: float = 0.0, *, rings: bool = True
    ) -> DialScript:
        """Call failed with SIP ``code`` (reason defaults to the standard phrase), after
        ringing if ``delay`` is longer than the server's ``ringing_delay``; ``rings=False``:
        no 180 before it, only 100 Trying."""
        reason = reason or SIP_REASONS.get(code, f"SIP {code}")
        return cls("sip_error", delay, code, reason, provisional="180" if rings else "100")

    @classmethod
    def canceled(cls, delay: float = 0.0, *, rings: bool = True) -> DialScript:
        """The INVITE transaction ends without a final response: Twirp ``canceled`` (408);
        ``rings=False``: nothing came before (sipgo's Timer B, early; see ``no_response``)."""
        return cls("canceled", delay, provisional="180" if rings else "")

    @classmethod
    def server_error(cls, delay: float = 0.0) -> DialScript:
        """Twirp ``internal`` (HTTP 500) before the room is joined: retryable by the client."""
        return cls("server_error", delay)

    @classmethod
    def hang(cls, *, rings: bool = True) -> DialScript:
        """Rings and is never answered: ends at the ring timeout or when cancelled.
        ``rings=False``: only 100 Trying comes, so ``sip.callStatus`` stays "dialing"."""
        return cls("hang", math.inf, provisional="180" if rings else "100")

    @classmethod
    def no_response(cls) -> DialScript:
        """The far end never answers the INVITE at all, not even 100 Trying: the dial ends at
        the ring timeout, or at sipgo's Timer B (``FakeLiveKitServer.invite_timer_b``, 32 s)
        if that comes first, still "dialing"."""
        return cls("hang", math.inf, provisional="")


@dataclass(frozen=True)
class MethodFault:
    """A fault for one request of a method (``FakeLiveKitServer.script_method``)."""

    kind: str  # "hang" | "slow" | "lose_response" | "refuse"
    delay: float = 0.0
    code: str = ""  # refuse: the Twirp error code answered
    msg: str = ""

    @classmethod
    def hang(cls) -> MethodFault:
        """The request is never answered and nothing happens (for a dial: the call goes on)."""
        return cls("hang")

    @classmethod
    def slow(cls, delay: float) -> MethodFault:
        """The server acts and answers only after ``delay`` s."""
        return cls("slow", delay)

    @classmethod
    def refuse(cls, code: str, msg: str = "") -> MethodFault:
        """The server answers with Twirp ``code`` and does nothing, e.g. "unimplemented", as
        self-hosted LiveKit answers MoveParticipant (a Cloud-only feature)."""
        return cls("refuse", code=code, msg=msg or f"{code}")

    @classmethod
    def lose_response(cls, delay: float = 0.0) -> MethodFault:
        """The server acts, then the connection drops before the response arrives."""
        return cls("lose_response", delay)


@dataclass(frozen=True)
class RegisteredWorker:
    """A worker that registered on the server's ``/agent`` websocket."""

    worker_id: str
    agent_name: str
    type: int  # agent_pb.JobType


@dataclass
class RecordedCall:
    service: str  # e.g. "SIP", "RoomService"
    method: str  # e.g. "CreateSIPParticipant"
    request: Message  # the decoded protobuf request
    grants: Claims  # decoded by TokenVerifier
    at: float  # time.monotonic() when received
    request_id: str = ""  # X-Livekit-Request-Id; the same for all retries of one call
    host: str = ""  # the Host the client used (a retry may go to another region's host)
    aborted: bool = False  # the client gave up before the response
    response_lost: bool = False  # the server dropped the connection instead of answering
    answer: str = ""  # "ok", or the Twirp error code the server answered with


@dataclass
class SipCall:
    """One outbound INVITE, as the SIP bridge runs it (livekit/sip pkg/sip/outbound.go)."""

    request: sip_pb.CreateSIPParticipantRequest
    request_id: str
    script: DialScript
    sip_call_id: str
    participant_id: str
    status: str = ""  # the participant's sip.callStatus, "" before it joined
    outcome: str = ""  # "" while undecided; "answered" | "ring_timeout" | "cancelled" |
    #                    "sip_error" | "no_final_response" | "server_error"
    joined_at: float | None = None
    invite_at: float | None = None
    answered_at: float | None = None
    active_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""  # DisconnectReason name the participant left with
    error: TwirpError | None = None

    @property
    def identity(self) -> str:
        return self.request.participant_identity

    @property
    def who(self) -> str:
        return self.script.who

    @property
    def ringing(self) -> bool:
        return self.invite_at is not None and self.answered_at is None and not self.ended

    @property
    def up(self) -> bool:
        """Answered and not hung up: someone's phone is off the hook."""
        return self.answered_at is not None and self.ended_at is None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


@dataclass
class Participant:
    identity: str
    room: str
    sid: str
    kind: int = models.ParticipantInfo.Kind.STANDARD
    attributes: dict[str, str] = field(default_factory=dict)
    name: str = ""
    metadata: str = ""
    joined_at: float = 0.0
    call: SipCall | None = None  # the SIP call behind a SIP participant

    @property
    def call_status(self) -> str:
        return self.attributes.get(CALL_STATUS, "")

    @property
    def who(self) -> str:
        return self.call.who if self.call else ""

    def info(self) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name,
            metadata=self.metadata,
            state=models.ParticipantInfo.ACTIVE,
            kind=self.kind,
            attributes=self.attributes,
            joined_at=int(self.joined_at),
        )


class Room(dict[str, Participant]):
    """A room's members by identity."""

    def __init__(self, name: str, sid: str) -> None:
        super().__init__()
        self.name, self.sid = name, sid


@dataclass
class RoomEvent:
    at: float
    room: str
    kind: str  # participant_connected | participant_attributes_changed |
    #            participant_disconnected | room_deleted
    identity: str = ""
    attributes: dict[str, str] = field(default_factory=dict)  # after the event
    changed: dict[str, str] = field(default_factory=dict)  # attributes_changed only
    reason: str = ""  # participant_disconnected: a livekit.DisconnectReason name


@dataclass
class SeenParticipant:
    """A member of a room as a connection to it shows them (``livekit.rtc.RemoteParticipant``:
    the fields the worker reads)."""

    identity: str
    sid: str
    kind: int  # rtc.ParticipantKind has models.ParticipantInfo.Kind's values
    attributes: dict[str, str]
    name: str = ""
    disconnect_reason: int = 0  # models.DisconnectReason, set as they leave


class RoomConnection(rtc.EventEmitter[str]):
    """A participant's own connection to one of the fake's rooms, shown the way
    ``livekit.rtc.Room`` shows it to its owner (livekit/python-sdks rtc/room.py
    ``_on_room_event``): ``remote_participants`` by identity, the others' attributes kept
    current, and the same events, emitted after the state has changed:
    ``participant_connected(p)``, ``participant_disconnected(p)`` (``p.disconnect_reason``),
    ``participant_attributes_changed(changed, p)``; and ``disconnected(reason)`` when this
    participant leaves or is removed, or the room is deleted (the server ends every
    participant's session, ROOM_DELETED). ``FakeLiveKitServer.connect`` makes one; it joins the
    room as an agent, so the room's other members see it."""

    def __init__(self, server: FakeLiveKitServer, room: str, identity: str) -> None:
        super().__init__()
        self.name, self.identity, self._server = room, identity, server
        server._join(Participant(identity, room, server._next_id("PA"),
                                 models.ParticipantInfo.Kind.AGENT))  # fmt: skip
        self.remote_participants: dict[str, SeenParticipant] = {
            i: self._seen(p) for i, p in server.rooms[room].items() if i != identity
        }
        self._connected = True
        self._unsubscribe = server.subscribe(room, self._on_event)

    def isconnected(self) -> bool:
        return self._connected

    async def disconnect(self) -> None:
        if self._connected:
            self._server._leave(self.name, self.identity, "CLIENT_INITIATED")

    @staticmethod
    def _seen(p: Participant) -> SeenParticipant:
        return SeenParticipant(p.identity, p.sid, p.kind, dict(p.attributes), p.name)

    def _on_event(self, ev: RoomEvent) -> None:
        if not self._connected:
            return
        if ev.kind == "participant_connected" and ev.identity != self.identity:
            if (p := self._server.participant(ev.room, ev.identity)) is not None:
                seen = self.remote_participants[ev.identity] = self._seen(p)
                self.emit("participant_connected", seen)
        elif ev.kind == "participant_attributes_changed":
            if (seen := self.remote_participants.get(ev.identity)) is not None:
                seen.attributes = dict(ev.attributes)
                self.emit("participant_attributes_changed", dict(ev.changed), seen)
        elif ev.kind == "participant_disconnected" and ev.identity != self.identity:
            if (seen := self.remote_participants.pop(ev.identity, None)) is not None:
                reason = ev.reason or "UNKNOWN_REASON"
                seen.disconnect_reason = models.DisconnectReason.Value(reason)
                self.emit("participant_disconnected", seen)
        elif ev.kind in ("participant_disconnected", "room_deleted"):  # our own session ended
            self._connected = False
            self._unsubscribe()
            reason = ev.reason or "ROOM_DELETED"
            self.emit("disconnected", models.DisconnectReason.Value(reason))


@contextlib.contextmanager
def resolve_livekit_cloud_locally() -> Iterator[None]:
    """While active, this process resolves every ``*.livekit.cloud`` name to 127.0.0.1.

    aiohttp's default ThreadedResolver calls ``loop.getaddrinfo``, which runs
    ``socket.getaddrinfo``; other names resolve as before. Nested uses are counted."""
    _CloudDNS.enter()
    try:
        yield
    finally:
        _CloudDNS.exit()


class _CloudDNS:
    depth = 0
    original: Any = None

    @classmethod
    def enter(cls) -> None:
        if cls.depth == 0:
            cls.original = original = socket.getaddrinfo

            def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
                name = host.decode() if isinstance(host, bytes) else host
                if isinstance(name, str) and name.lower().rstrip(".").endswith(".livekit.cloud"):
                    host = "127.0.0.1"
                return original(host, port, *args, **kw)

            socket.getaddrinfo = getaddrinfo
        cls.depth += 1

    @classmethod
    def exit(cls) -> None:
        cls.depth -= 1
        if cls.depth == 0:
            socket.getaddrinfo = cls.original


Check = Callable[[Claims, Any], None]


def _denied(what: str) -> TwirpError:
    return TwirpError("permission_denied", f"permissions denied: requires {what}")


def _need_sip_call(claims: Claims, req: Any) -> None:
    if not (claims.sip and claims.sip.call):
        raise _denied("sip.call")


def _need_room_admin(claims: Claims, req: Any) -> None:
    # livekit/livekit pkg/service/auth.go EnsureAdminPermission: roomAdmin and video.room equal
    # to the request's room; EnsureDestRoomPermission: video.destinationRoom equal to the move's
    # destination.
    v = claims.video
    if not (v and v.room_admin and v.room == req.room):
        raise _denied(f"video.roomAdmin for room {req.room!r}")
    dest = getattr(req, "destination_room", None)
    if dest is not None and v.destination_room != dest:
        raise _denied(f"video.destinationRoom {dest!r}")


def _need_room_create(claims: Claims, req: Any) -> None:
    # DeleteRoom: LiveKit checks roomCreate (EnsureCreatePermission); the client sends that.
    if not (claims.video and claims.video.room_create):
        raise _denied("video.roomCreate")


def _need_room_list(claims: Claims, req: Any) -> None:
    # livekit/livekit pkg/service/auth.go EnsureListPermission: roomList only
    if not (claims.video and claims.video.room_list):
        raise _denied("video.roomList")


# The Twirp methods the fake serves: the request message and the permission LiveKit checks
# (livekit/livekit pkg/service/roomservice.go, sipservice.go); the handler is ``_<snake_case>``.
ROUTES: dict[str, tuple[str, type[Message], Check]] = {
    "CreateSIPParticipant": ("SIP", sip_pb.CreateSIPParticipantRequest, _need_sip_call),
    "ListRooms": ("RoomService", room_pb.ListRoomsRequest, _need_room_list),
    "DeleteRoom": ("RoomService", room_pb.DeleteRoomRequest, _need_room_create),
    "ListParticipants": ("RoomService", room_pb.ListParticipantsRequest, _need_room_admin),
    "GetParticipant": ("RoomService", room_pb.RoomParticipantIdentity, _need_room_admin),
    "RemoveParticipant": ("RoomService", room_pb.RoomParticipantIdentity, _need_room_admin),
    "MoveParticipant": ("RoomService", room_pb.MoveParticipantRequest, _need_room_admin),
    "UpdateParticipant": ("RoomService", room_pb.UpdateParticipantRequest, _need_room_admin),
}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name.replace("SIP", "Sip")).lower()


class _ResponseLost(Exception):
    """The handler must drop the connection instead of answering."""


class FakeLiveKitServer(Served):
    """In-process LiveKit API server on 127.0.0.1 (random free port). See module docstring."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        api_secret: str = API_SECRET,
        cloud: bool = True,
        move_supported: bool = True,
        join_delay: float = 0.02,
        ringing_delay: float = 0.01,
        dtmf_char_time: float = 0.52,
        move_delay: float = 0.2,
        regions: tuple[str, ...] = ("oregon", "ohio"),
    ) -> None:
        self.api_key, self.api_secret = api_key, api_secret
        self.cloud = cloud
        self.move_supported = move_supported
        self.join_delay = join_delay  # INVITE prepared, room joined (outbound.go connectToRoom)
        self.ringing_delay = ringing_delay  # INVITE sent -> 180 Ringing
        self.dtmf_char_time = dtmf_char_time  # 260 ms tone + 260 ms gap a key, as the real
        #                                       stack sent them (livekit-sip 1.8.0); media-sdk
        #                                       dtmf.go names 250 ms + 250 ms,
        #                                       and 'w' = a 500 ms pause
        self.move_delay = move_delay  # left the source room -> joined the destination
        self.invite_timer_b = INVITE_TIMER_B  # an INVITE nobody answers at all ends here
        # A SIP participant's "hangup" -> its leaving the room. livekit/sip outbound.go
        # ``close``: setStatus(CallHangup), then stopSIP (a BYE of its own waits for the
        # answer: up to sipgo's Timer F, 32 s over UDP), media.Close, and only then the room
        # (CloseWithReason). After the phone's BYE the leave follows within milliseconds.
        self.leaves_after_hangup = 0.0
        self.regions = regions
        self.url = self.local_url = ""
        self.port = 0
        self.calls: list[RecordedCall] = []
        self.rejected: list[tuple[str, str]] = []  # (method, twirp code) refused before handling
        self.rooms: dict[str, Room] = {}
        self.deleted_rooms: list[str] = []
        self.sip_calls: list[SipCall] = []
        self.cancelled_dials: list[str] = []
        self.aborted_requests: list[RecordedCall] = []
        self.lost_responses: list[RecordedCall] = []
        self.events: list[RoomEvent] = []
        self.workers: list[RegisteredWorker] = []
        self._subscribers: list[tuple[str | None, Callable[[RoomEvent], Any]]] = []
        self._changed = asyncio.Event()
        self._verifier = TokenVerifier(api_key, api_secret)
        self._dial_script_to: dict[str, deque[DialScript]] = {}  # by number; "" for any
        self._faults: dict[tuple[str, str], deque[MethodFault]] = {}  # (method, room or "")
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._left: dict[str, asyncio.Event] = {}  # participant sid -> left the room
        self._dns: contextlib.ExitStack | None = None
        self._routes = {
            (service, method): (request, check, getattr(self, "_" + _snake_case(method)))
            for method, (service, request, check) in ROUTES.items()
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/twirp/{service}/{method}", self._dispatch)
        app.router.add_get("/settings/regions", self._regions)
        app.router.add_get("/agent", self._agent_worker)
        # handler_cancellation: a client disconnect cancels the handler task (off by default
        # since aiohttp 3.7); that is how an aborted request is seen. The work it started
        # (a dial) goes on: psrpc runs LiveKit's handlers on a context of their own
        # (livekit/psrpc pkg/server/rpc.go), so a client abort never reaches them.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.local_url = f"http://127.0.0.1:{self.port}"
        self.url = self.local_url
        if self.cloud:
            self._dns = contextlib.ExitStack()
            self._dns.enter_context(resolve_livekit_cloud_locally())
            self.url = f"http://{PROJECT_HOST}:{self.port}"

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):  # calls in progress, hanging handlers
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._dns is not None:
            self._dns.close()
            self._dns = None

    # --- test helpers ------------------------------------------------------------------------

    def env(self, *, local: bool = False) -> dict[str, str]:
        """LIVEKIT_* for a client of this server; ``local=True`` gives the 127.0.0.1 URL, for a
        child process (the *.livekit.cloud name resolves only in this one)."""
        return {
            "LIVEKIT_URL": self.local_url if local else self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }

    def calls_to(self, method: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.method == method]

    def script_dial(self, *outcomes: DialScript, to: str = "") -> None:
        """Queue what the far end does for the next INVITEs (FIFO; one per request try).
        ``to``: only INVITEs to that number or sip: URI (``dialled``), served before the shared
        queue, so calls running side by side each get their own far end."""
        self._dial_script_to.setdefault(to, deque()).extend(outcomes)

    def script_method(self, method: str, *faults: MethodFault, room: str = "") -> None:
        """Queue faults for the next requests of ``method`` (FIFO; one per request try).
        ``room``: only requests about that room (for MoveParticipant, its destination room),
        served before the shared queue."""
        self._faults.setdefault((method, room), deque()).extend(faults)

    def _next_fault(self, method: str, room: str) -> MethodFault | None:
        for key in ((method, room), (method, "")):
            if queue := self._faults.get(key):
                return queue.popleft()
        return None

    def participant(self, room: str, identity: str) -> Participant | None:
        return self.rooms.get(room, {}).get(identity)

    def attributes(self, room: str, identity: str) -> dict[str, str]:
        """The participant's current attributes ({} if not in the room)."""
        p = self.participant(room, identity)
        return dict(p.attributes) if p else {}

    def dials_to(self, identity: str) -> list[SipCall]:
        return [c for c in self.sip_calls if c.identity == identity]

    def add_participant(self, room: str, identity: str, **attributes: str) -> Participant:
        """A (non-SIP) participant joins ``room``, e.g. the caller or the agent."""
        p = Participant(identity, room, self._next_id("PA"), attributes=dict(attributes))
        self._join(p)
        return p

    def connect(self, room: str, identity: str = "agent") -> RoomConnection:
        """Join ``room`` as ``identity`` (an agent) and see it as ``livekit.rtc.Room`` would:
        a ``RoomConnection``, for the worker's code that reads its own rooms."""
        return RoomConnection(self, room, identity)

    def remove_participant(self, room: str, identity: str) -> None:
        """As RemoveParticipant: the participant leaves (a ringing INVITE is cancelled)."""
        self._require(room, identity)
        self._leave(room, identity, "PARTICIPANT_REMOVED")

    def far_end_hangs_up(self, room: str, identity: str) -> None:
        """The phone behind a SIP participant hangs up (BYE): livekit/sip client.go `onBye` ->
        outbound.go `close(CallHangup)`: sip.callStatus "hangup", then the participant leaves
        (``leaves_after_hangup`` later)."""
        p = self._require(room, identity)
        self._set_status(p, "hangup")
        if self.leaves_after_hangup <= 0:
            self._leave(room, identity, "CLIENT_INITIATED")
            return

        async def leave() -> None:
            await asyncio.sleep(self.leaves_after_hangup)
            if self.participant(p.room, identity) is p:
                self._leave(p.room, identity, "CLIENT_INITIATED")

        self._spawn(leave())

    def subscribe(
        self, room: str | None, callback: Callable[[RoomEvent], Any]
    ) -> Callable[[], None]:
        """Call ``callback(event)`` for each event in ``room`` (None: every room); returns a
        function that unsubscribes."""
        entry = (room, callback)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry) if entry in self._subscribers else None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` is true; it is re-checked after every change."""
        async def changed_until_true() -> None:
            while not predicate():
                await self._changed.wait()

        await asyncio.wait_for(changed_until_true(), timeout)  # (asyncio.timeout is 3.11+)

    # --- rooms and participants (what members of a room observe) ------------------------------

    def _emit(self, event: RoomEvent) -> None:
        self.events.append(event)
        for room, callback in list(self._subscribers):
            if room is None or room == event.room:
                callback(event)
        self._touch()

    def _touch(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _room(self, name: str) -> Room:
        # Rooms are created on first join (livekit/livekit roommanager.go: auto-create).
        if name not in self.rooms:
            self.rooms[name] = Room(name, self._next_id("RM"))
        return self.rooms[name]

    def _join(self, p: Participant) -> None:
        room = self._room(p.room)
        if p.identity in room:
            # livekit/livekit pkg/service/roommanager.go: "removing duplicate participant"
            # (DUPLICATE_IDENTITY); the newest session wins. Modern clients are not sent that
            # disconnect (rtc/room.go SendParticipantUpdates) but see the identity's SID change,
            # which the SDK reports as the old participant leaving and the new one joining.
            self._leave(p.room, p.identity, "DUPLICATE_IDENTITY")
            room = self._room(p.room)
        p.joined_at = time.time()
        room[p.identity] = p
        self._left[p.sid] = asyncio.Event()
        self._emit(RoomEvent(time.monotonic(), p.room, "participant_connected", p.identity,
                             dict(p.attributes)))  # fmt: skip

    def _leave(self, room_name: str, identity: str, reason: str) -> Participant | None:
        room = self.rooms.get(room_name)
        p = room.pop(identity, None) if room is not None else None
        if p is None:
            return None
        self._emit(RoomEvent(time.monotonic(), room_name, "participant_disconnected", identity,
                             dict(p.attributes), reason=reason))  # fmt: skip
        if (left := self._left.pop(p.sid, None)) is not None:
            if p.call is not None and not p.call.end_reason:
                p.call.end_reason = reason
            left.set()  # the SIP bridge's room connection closed: its call reacts
        return p

    def _set_status(self, p: Participant, status: str) -> None:
        # livekit/sip pkg/sip/outbound.go `setStatus`: LocalParticipant.SetAttributes
        if p.call is not None:
            p.call.status = status
        if p.attributes.get(CALL_STATUS) == status or self.participant(p.room, p.identity) is not p:
            return
        self._set_attributes(p, {CALL_STATUS: status})

    def _set_attributes(self, p: Participant, changed: dict[str, str]) -> None:
        p.attributes.update(changed)
        self._emit(RoomEvent(time.monotonic(), p.room, "participant_attributes_changed",
                             p.identity, dict(p.attributes), changed=dict(changed)))  # fmt: skip

    # --- Twirp plumbing ----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pkg, _, service = request.match_info["service"].partition(".")
        method = request.match_info["method"]
        route = self._routes.get((service, method))
        call: RecordedCall | None = None
        try:
            if request.method != "POST" or pkg != "livekit" or route is None:
                raise TwirpError("bad_route", f"no handler for {request.method} {request.path}")
            req_cls, check, handler = route
            try:
                claims = self._authenticate(request)
            except TwirpError as e:
                # A bad token never reaches Twirp: livekit-server's APIKeyAuthMiddleware answers
                # 401 with the error as plain text (pkg/service/auth.go ServeHTTP, utils.go
                # HandleError), which livekit-api reads as code "unknown", status 401 (seen on
                # livekit-server 1.13.5, tests/test_real_stack.py)
                self.rejected.append((method, e.code))
                return web.Response(status=401, text=e.msg)
            try:
                msg = req_cls.FromString(await request.read())
                check(claims, msg)
            except (TwirpError, DecodeError) as e:
                err = e if isinstance(e, TwirpError) else TwirpError("malformed", str(e))
                self.rejected.append((method, err.code))
                raise err from None
            rid = request.headers.get("X-Livekit-Request-Id", "")
            call = RecordedCall(service, method, msg, claims, time.monotonic(), rid, request.host)
            self.calls.append(call)  # every try, even of one logical request: no de-duplication
            self._touch()
            reply = await handler(msg, call)
            call.answer = "ok"
            return web.Response(body=reply.SerializeToString(), content_type="application/protobuf")
        except TwirpError as e:
            if call is not None:
                call.answer = e.code
            return e.response()
        except _ResponseLost:
            assert call is not None
            call.response_lost = True
            self.lost_responses.append(call)
            self._touch()
            if request.transport is not None:
                request.transport.abort()  # the client sees the connection drop
            return web.Response()
        except asyncio.CancelledError:
            if call is not None and not self._stopping:  # the client aborted
                call.aborted = True
                self.aborted_requests.append(call)
                self._touch()
            raise
        finally:
            self._tasks.discard(task)

    def _authenticate(self, request: web.Request) -> Claims:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise TwirpError("unauthenticated", "missing bearer token")
        try:
            return self._verifier.verify(token)
        except jwt.PyJWTError as e:  # bad signature, wrong key (issuer), expired, garbage...
            raise TwirpError("unauthenticated", f"invalid token: {e}") from None

    async def _agent_worker(self, request: web.Request) -> web.StreamResponse:
        """A worker registering, as livekit/livekit pkg/service/agentservice.go takes it: a
        websocket at ``/agent`` with a bearer token whose video grant has ``agent`` (else 401
        or 403, before the upgrade); its first message a ``WorkerMessage.register``, answered
        with ``ServerMessage.register`` and a worker id; then the worker's status updates until
        it leaves. No job is ever assigned here."""
        try:
            claims = self._authenticate(request)
        except TwirpError as e:
            return web.Response(status=401, text=e.msg)
        if not (claims.video and claims.video.agent):
            return web.Response(status=403, text="video.agent grant required")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = agent_pb.WorkerMessage()
        first.ParseFromString(await ws.receive_bytes())
        if not first.HasField("register"):
            await ws.close()
            return ws
        worker = RegisteredWorker(
            f"AW_{next(self._ids)}", first.register.agent_name, first.register.type
        )
        reply = agent_pb.ServerMessage()
        reply.register.worker_id = worker.worker_id
        await ws.send_bytes(reply.SerializeToString())
        self.workers.append(worker)
        self._touch()
        async for _ in ws:  # status updates and pings, until the worker leaves
            pass
        return ws

    async def _regions(self, request: web.Request) -> web.StreamResponse:
        # What livekit-api `_failover.py` RegionCache._fetch reads: {"regions": [{"url": ...}]}
        # and Cache-Control max-age. Every region is this same server under another
        # *.livekit.cloud name (LiveKit Cloud routes a room's requests to its node from any
        # region). max-age=0: the client's process-wide cache must not outlive one server.
        try:
            self._authenticate(request)
        except TwirpError as e:
            return e.response()
        host = request.url.host or PROJECT_HOST
        urls = [f"http://{host}:{self.port}"] + [
            f"http://{r}.{PROJECT_HOST}:{self.port}" for r in self.regions
        ]
        body = {
            "regions": [
                {"region": f"region-{i}", "url": u, "distance": str(i)} for i, u in enumerate(urls)
            ]
        }
        return web.json_response(body, headers={"Cache-Control": "max-age=0"})

    async def _apply_fault(self, method: str, room: str = "") -> MethodFault | None:
        """Hang or delay as scripted; returns a lose_response fault for the caller to apply."""
        fault = self._next_fault(method, room)
        if fault is None:
            return None
        if fault.kind == "hang":
            await asyncio.Event().wait()
        if fault.kind == "refuse":
            raise TwirpError(fault.code, fault.msg)
        await asyncio.sleep(fault.delay)
        return fault if fault.kind == "lose_response" else None

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- SIP ---------------------------------------------------------------------------------

    async def _create_sip_participant(
        self, req: sip_pb.CreateSIPParticipantRequest, recorded: RecordedCall
    ) -> sip_pb.SIPParticipantInfo:
        _validate_dial(req)
        fault = self._next_fault("CreateSIPParticipant", req.room_name)
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay)
        mine, shared = self._dial_script_to.get(dialled(req)), self._dial_script_to.get("")
        script = (mine or shared or deque([DialScript.answer()])).popleft()
        if script.kind == "server_error":
            # Fails before the room is joined and before any INVITE (livekit/sip outbound.go
            # newCall: a failed room join is psrpc.Internal), so a retry is safe.
            await asyncio.sleep(script.delay)
            sip_call = SipCall(req, recorded.request_id, script, "", "", outcome="server_error")
            self.sip_calls.append(sip_call)
            raise TwirpError("internal", "update room failed: internal server error")
        sip_call = SipCall(
            req, recorded.request_id, script, self._next_id("SCL"), self._next_id("PA")
        )
        self.sip_calls.append(sip_call)
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The call runs on its own: a client abort does not cancel it (psrpc, see start()).
        self._spawn(self._run_call(sip_call, joined, done))
        if fault is not None and fault.kind == "hang":  # the call goes on; no response comes
            await asyncio.Event().wait()
        # livekit/sip pkg/sip/client.go createSIPParticipant: without wait_until_answered the
        # response is sent once the participant has joined (newCall -> connectToRoom) and the
        # INVITE runs async (DialAsync); with it, only after Dial returns: answered + DTMF.
        await asyncio.shield(done if req.wait_until_answered else joined)
        if script.drop_response or (fault is not None and fault.kind == "lose_response"):
            raise _ResponseLost()
        if req.wait_until_answered and sip_call.error is not None:
            raise sip_call.error
        return sip_pb.SIPParticipantInfo(
            participant_id=sip_call.participant_id,
            participant_identity=req.participant_identity,
            room_name=req.room_name,
            sip_call_id=sip_call.sip_call_id,
        )

    async def _run_call(
        self, call: SipCall, joined: asyncio.Future[None], done: asyncio.Future[None]
    ) -> None:
        def settle(error: TwirpError | None = None) -> None:
            call.error = call.error or error
            for f in (joined, done):
                if not f.done():
                    f.set_result(None)
            self._touch()

        try:
            await self._dial(call, joined, settle)
        finally:
            settle()

    async def _dial(
        self,
        call: SipCall,
        joined: asyncio.Future[None],
        settle: Callable[[TwirpError | None], None],
    ) -> None:
        req, script = call.request, call.script
        # livekit/sip outbound.go newCall -> connectToRoom: the SIP participant joins the room
        # before the INVITE, with sip.callStatus "dialing" and the request's attributes.
        await asyncio.sleep(self.join_delay)
        attrs = {**req.participant_attributes, CALL_STATUS: "dialing"}
        p = Participant(
            req.participant_identity,
            req.room_name,
            call.participant_id,
            models.ParticipantInfo.Kind.SIP,
            attrs,
            name=req.participant_name,
            metadata=req.participant_metadata,
            call=call,
        )
        self._join(p)
        left = self._left[p.sid]
        call.status, call.joined_at = "dialing", time.monotonic()
        joined.set_result(None)
        self._touch()

        def end(outcome: str, reason: str, error: TwirpError | None) -> None:
            call.outcome = call.outcome or outcome
            call.ended_at = time.monotonic()
            call.end_reason = call.end_reason or reason
            if not left.is_set() and self.participant(p.room, p.identity) is p:
                self._leave(p.room, p.identity, reason)
            settle(error)

        async def until(deadline: float) -> bool:
            """Sleep until ``deadline`` (monotonic); True if the participant left first."""
            if left.is_set():
                return True
            if deadline == math.inf:
                await left.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(left.wait(), max(0.0, deadline - time.monotonic()))
            return left.is_set()

        # outbound.go sipSignal: the ring window bounds the INVITE until the final response.
        ring_limit = req.ringing_timeout.ToTimedelta().total_seconds()
        if ring_limit <= 0:
            ring_limit = SERVER_DEFAULT_RINGING_TIMEOUT
        if req.wait_until_answered:  # livekit/livekit pkg/service/sip.go request deadline
            ring_limit = min(ring_limit, SERVER_DIAL_DEADLINE[True])
        call.invite_at = start = time.monotonic()
        final_at = start + script.delay
        limit_at = start + ring_limit
        # No response at all: the transaction ends at Timer B (INVITE_TIMER_B).
        timer_b_at = start + self.invite_timer_b if not script.provisional else math.inf
        # 180 Ringing (outbound.go sipSignal setState: first 1xx >= 180 -> CallRinging); with
        # only 100 Trying, or nothing, the status stays "dialing" to the end.
        ringing_at = start + self.ringing_delay
        if script.rings and final_at > ringing_at and limit_at > ringing_at:
            if await until(ringing_at):
                self._invite_cancelled(call, end)
                return
            self._set_status(p, "ringing")
        if await until(min(final_at, limit_at, timer_b_at)):
            self._invite_cancelled(call, end)
            return
        if min(final_at, timer_b_at) > limit_at:
            # ring timeout: CANCEL; no SIP status (outbound.go sipResponse); errors.go
            # classifyInviteError: ErrSIPRequestTimeout -> callUnavailable, whether it rang or not
            end("ring_timeout", "USER_UNAVAILABLE", _cancelled_invite_error())
            return
        if timer_b_at < final_at:
            end("no_final_response", "USER_UNAVAILABLE", _no_final_response_error(0))
            return
        if script.kind == "sip_error":
            # outbound.go Invite -> SIPStatus; errors.go classifyInviteError keeps it (the
            # psrpc error carries SIPStatus details -> Twirp meta, livekit/protocol sip.go).
            code, reason = script.sip_status_code, script.sip_status
            # the words the real stack sent (livekit-sip 1.8.0 outbound.go Invite, through
            # psrpc): "INVITE failed" for the codes it names, else "unexpected status"
            named = (400, 404, 480, 486, 488)
            said = "INVITE failed" if code in named else "unexpected status from INVITE response"
            error = TwirpError(
                sip_twirp_code(code),
                f"twirp error unknown: {said}: sip status: {code}: {reason}",
                {"sip_status_code": str(code), "sip_status": reason},
            )
            end("sip_error", _sip_failure_reason(code), error)
            return
        if script.kind == "canceled":
            # errors.go transactionTimeoutError: no final response -> psrpc.Canceled; its
            # ClassifyInvite: callUnavailable, so the room sees USER_UNAVAILABLE
            # (``_sip_failure_reason``; SIP_TRUNK_FAILURE is only the call record's reason).
            responses = int(call.status == "ringing" or script.provisional == "100")
            end("no_final_response", "USER_UNAVAILABLE", _no_final_response_error(responses))
            return
        # 200 OK. outbound.go dialSIP: with DTMF, "automation" while media-sdk dtmf.Write sends
        # it (0.5 s a character, 'w' a 0.5 s pause); then "active". The DTMF is sent on the
        # dial's own context: a room disconnect no longer stops it (sipSignal has returned).
        call.answered_at = time.monotonic()
        call.outcome = "answered"
        if req.dtmf:
            self._set_status(p, "automation")
            await asyncio.sleep(self.dtmf_char_time * len(req.dtmf))
        self._set_status(p, "active")
        call.active_at = time.monotonic()
        settle(None)  # client.go: Dial returned; with wait_until_answered the response goes
        # After the answer: outbound.go waitClose. The room connection closing ends the call
        # (BYE); or the far end hangs up (client.go onBye).
        hangup_at = (
            call.answered_at + script.hangs_up_after
            if script.hangs_up_after is not None
            else math.inf
        )
        if not await until(hangup_at):
            self._set_status(p, "hangup")
            lingers = self.leaves_after_hangup > 0
            if not lingers or not await until(time.monotonic() + self.leaves_after_hangup):
                end("answered", "CLIENT_INITIATED", None)
                return
        end("answered", "", None)

    def _invite_cancelled(self, call: SipCall, end: Callable[..., None]) -> None:
        # The participant left the room while the phone rang: the INVITE is CANCELled.
        self.cancelled_dials.append(call.identity)
        end("cancelled", "", _cancelled_invite_error())

    # --- RoomService -------------------------------------------------------------------------

    def _require(self, room: str, identity: str) -> Participant:
        # livekit/livekit roomservice.go RemoveParticipant (and roommanager.go
        # roomAndParticipantForReq): "participant does not exist" -> not_found.
        p = self.participant(room, identity)
        if p is None:
            raise TwirpError("not_found", "participant does not exist")
        return p

    async def _list_rooms(self, req: room_pb.ListRoomsRequest, _: RecordedCall) -> Message:
        if await self._apply_fault("ListRooms"):
            raise _ResponseLost()
        names = [n for n in self.rooms if not req.names or n in req.names]
        return room_pb.ListRoomsResponse(
            rooms=[
                models.Room(sid=self.rooms[n].sid, name=n, num_participants=len(self.rooms[n]))
                for n in names
            ]
        )

    async def _delete_room(self, req: room_pb.DeleteRoomRequest, _: RecordedCall) -> Message:
        lose = await self._apply_fault("DeleteRoom", req.room)
        # livekit/livekit pkg/service/roomservice.go: an unknown room is "not_found".
        if req.room not in self.rooms:
            raise TwirpError("not_found", "requested room does not exist")
        # roommanager.go DeleteRoom -> room.Close: every participant is disconnected
        # (ROOM_DELETED); the SIP bridge's legs in the room end (outbound.go: ringing INVITEs
        # are cancelled, answered calls get a BYE).
        for identity in list(self.rooms[req.room]):
            self._leave(req.room, identity, "ROOM_DELETED")
        del self.rooms[req.room]
        self.deleted_rooms.append(req.room)
        self._emit(RoomEvent(time.monotonic(), req.room, "room_deleted"))
        if lose:
            raise _ResponseLost()
        return room_pb.DeleteRoomResponse()

    async def _list_participants(
        self, req: room_pb.ListParticipantsRequest, _: RecordedCall
    ) -> Message:
        if await self._apply_fault("ListParticipants", req.room):
            raise _ResponseLost()
        members = self.rooms.get(req.room, {})
        return room_pb.ListParticipantsResponse(
            participants=[members[i].info() for i in sorted(members)]
        )

    async def _get_participant(self, req: room_pb.RoomParticipantIdentity, _: Any) -> Message:
        if await self._apply_fault("GetParticipant", req.room):
            raise _ResponseLost()
        return self._require(req.room, req.identity).info()

    async def _remove_participant(self, req: room_pb.RoomParticipantIdentity, _: Any) -> Message:
        lose = await self._apply_fault("RemoveParticipant", req.room)
        # roomservice.go RemoveParticipant: not_found before the participant exists (a dial
        # whose participant has not joined yet is not stopped: its INVITE still goes out).
        self.remove_participant(req.room, req.identity)
        if lose:
            raise _ResponseLost()
        return room_pb.RemoveParticipantResponse()

    async def _move_participant(self, req: room_pb.MoveParticipantRequest, _: Any) -> Message:
        if not self.move_supported:
            # Self-hosted LiveKit: RoomManager.MoveParticipant returns errors.New("not
            # implemented") (livekit/livekit pkg/service/roommanager.go), which reaches the
            # client through psrpc as an Unknown error: Twirp "unknown", HTTP 500.
            raise TwirpError("unknown", "not implemented")
        if req.room == req.destination_room:  # roomservice.go ErrDestinationSameAsSourceRoom
            raise TwirpError("invalid_argument", "destination room cannot be the same as source")
        lose = await self._apply_fault("MoveParticipant", req.destination_room)
        # Cloud's move: the participant leaves the source room, reconnects into the
        # destination (taking move_delay), then the API answers. A retry after a lost
        # response finds nobody in the source room: not_found.
        p = self._require(req.room, req.identity)
        sid = p.sid
        left = self._left.pop(sid, None)  # the SIP call stays up while it moves
        self._leave(req.room, req.identity, "MIGRATION")
        await asyncio.sleep(self.move_delay)
        p.room = req.destination_room
        self._join(p)
        if left is not None:  # keep the call's room connection watcher
            self._left[sid] = left
        if lose:
            raise _ResponseLost()
        return room_pb.MoveParticipantResponse()

    async def _update_participant(self, req: room_pb.UpdateParticipantRequest, _: Any) -> Message:
        lose = await self._apply_fault("UpdateParticipant", req.room)
        p = self._require(req.room, req.identity)
        if req.name:
            p.name = req.name
        if req.metadata:
            p.metadata = req.metadata
        if req.attributes:
            self._set_attributes(p, dict(req.attributes))
        info = p.info()
        if req.HasField("permission"):
            info.permission.CopyFrom(req.permission)
        if lose:
            raise _ResponseLost()
        return info
