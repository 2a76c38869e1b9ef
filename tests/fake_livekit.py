"""A local fake of the LiveKit server API, speaking LiveKit's Twirp protocol on 127.0.0.1.

The real ``livekit.api.LiveKitAPI`` client (and ``JobContext.api`` in livekit-agents, built
from ``LIVEKIT_URL`` / ``LIVEKIT_API_KEY`` / ``LIVEKIT_API_SECRET``) talks to it over HTTP::

    async with FakeLiveKitServer() as lk:
        lk.script_dial(DialScript.sip_error(486), DialScript.answer(delay=0.2))
        async with api.LiveKitAPI(lk.url, API_KEY, API_SECRET) as lkapi: ...
        assert lk.calls_to("CreateSIPParticipant")[0].request.sip_call_to == "+15550100"

Wire format (as ``livekit/api/twirp_client.py`` expects): ``POST /twirp/livekit.<Service>/<Method>``
with a serialized protobuf body and ``Authorization: Bearer <JWT>``; success is HTTP 200 with a
protobuf body, errors are JSON ``{"code", "msg", "meta"}`` with the Twirp HTTP status.
Auth is checked with ``TokenVerifier``: a missing/bad token gets ``unauthenticated`` (401), a
missing grant ``permission_denied`` (403). Unknown routes get ``bad_route`` (404).

Dial outcomes (``DialScript``, consumed FIFO by CreateSIPParticipant; default: answer now):

* ``DialScript.answer(delay=0)`` -> ``SIPParticipantInfo``; the identity joins ``rooms[room]``.
* ``DialScript.sip_error(code, reason=None, delay=0)`` -> the client raises ``api.SipCallError``.
* ``DialScript.canceled(delay=0)`` -> plain ``ServerError``, code ``canceled`` (HTTP 408), no SIP
  meta.
* ``DialScript.server_error(delay=0)`` -> ``internal`` (HTTP 500). Every attempt is recorded in
  ``calls`` (retries of one logical request share ``RecordedCall.request_id``).
* ``DialScript.hang()`` -> never answers; when the client aborts (timeout or task cancelled),
  aiohttp cancels the handler and the identity is appended to ``cancelled_dials``.

Outcomes apply whether or not ``wait_until_answered`` is set (the fake does not model failures
reported after the API call returned).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from google.protobuf.message import DecodeError, Message
from livekit.api import TokenVerifier
from livekit.api.access_token import Claims
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import sip as sip_pb

API_KEY = "devkey"
API_SECRET = "a-very-long-test-secret-at-least-32-chars!!"

# Twirp error code -> HTTP status (Twirp spec v7). The client retries (fails over on) 5xx only.
# fmt: off
TWIRP_HTTP_STATUS = {
    "canceled": 408, "unknown": 500, "invalid_argument": 400, "malformed": 400,
    "deadline_exceeded": 408, "not_found": 404, "bad_route": 404, "already_exists": 409,
    "permission_denied": 403, "unauthenticated": 401, "resource_exhausted": 429,
    "failed_precondition": 412, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
    "internal": 500, "unavailable": 503, "dataloss": 500,
}

# SIP status -> Twirp code, as LiveKit's server maps it: livekit/protocol `livekit/sip.go`
# (`sipCodeToGRPCCode`, `SIPStatus.GRPCStatus`, `SIPStatus.TwirpErrorMeta`), updated by
# livekit/protocol PR #1766 (480/486: ResourceExhausted -> FailedPrecondition). The gRPC code
# becomes the same-named Twirp code (livekit/psrpc errors.go), so every SIP failure is a 4xx and
# is never retried by the client's failover logic.
SIP_TWIRP_CODE = {
    300: "invalid_argument", 301: "not_found", 302: "not_found",
    400: "invalid_argument", 401: "permission_denied", 402: "permission_denied",
    403: "permission_denied", 404: "not_found", 407: "unauthenticated",
    408: "deadline_exceeded", 410: "not_found", 480: "failed_precondition",
    481: "not_found", 484: "invalid_argument", 485: "invalid_argument",
    486: "failed_precondition", 487: "aborted", 488: "invalid_argument", 491: "aborted",
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


def sip_twirp_code(status: int) -> str:
    """Twirp code LiveKit uses for a failed call with SIP ``status``."""
    default = "failed_precondition" if 500 <= status < 600 else "invalid_argument"
    return SIP_TWIRP_CODE.get(status, default)


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


@dataclass(frozen=True)
class DialScript:
    """One scripted CreateSIPParticipant outcome; build it with the classmethods."""

    kind: str  # "answer" | "sip_error" | "canceled" | "server_error" | "hang"
    delay: float = 0.0
    sip_status_code: int = 0
    sip_status: str = ""

    @classmethod
    def answer(cls, delay: float = 0.0) -> DialScript:
        return cls("answer", delay)

    @classmethod
    def sip_error(cls, code: int, reason: str | None = None, delay: float = 0.0) -> DialScript:
        """Call failed with SIP ``code`` (reason defaults to the standard phrase)."""
        return cls("sip_error", delay, code, reason or SIP_REASONS.get(code, f"SIP {code}"))

    @classmethod
    def canceled(cls, delay: float = 0.0) -> DialScript:
        """No answer / cancelled, without a SIP status: Twirp ``canceled`` (408)."""
        return cls("canceled", delay)

    @classmethod
    def server_error(cls, delay: float = 0.0) -> DialScript:
        """Twirp ``internal`` (HTTP 500), which the client treats as retryable."""
        return cls("server_error", delay)

    @classmethod
    def hang(cls) -> DialScript:
        """Never answer; the request ends only when the client gives up."""
        return cls("hang")


@dataclass
class RecordedCall:
    service: str  # e.g. "SIP", "RoomService"
    method: str  # e.g. "CreateSIPParticipant"
    request: Message  # the decoded protobuf request
    grants: Claims  # decoded by TokenVerifier
    at: float  # time.monotonic() when received
    request_id: str = ""  # X-Livekit-Request-Id; the same for all retries of one call


Check = Callable[[Claims, Any], None]
Handler = Callable[[Any], Awaitable[Message]]


def _denied(what: str) -> TwirpError:
    return TwirpError("permission_denied", f"permissions denied: requires {what}")


def _need_sip_call(claims: Claims, req: Any) -> None:
    if not (claims.sip and claims.sip.call):
        raise _denied("sip.call")


def _need_room_admin(claims: Claims, req: Any) -> None:
    # LiveKit requires video.room == request room; the fake also accepts an unscoped token.
    v = claims.video
    if not (v and v.room_admin and v.room in ("", req.room)):
        raise _denied(f"video.roomAdmin for room {req.room!r}")
    dest = getattr(req, "destination_room", None)
    if dest is not None and v.destination_room not in (None, "", dest):
        raise _denied(f"video.destinationRoom {dest!r}")


def _need_room_create(claims: Claims, req: Any) -> None:
    # DeleteRoom: LiveKit checks roomCreate (EnsureCreatePermission); the client sends that.
    if not (claims.video and claims.video.room_create):
        raise _denied("video.roomCreate")


def _need_room_list(claims: Claims, req: Any) -> None:
    if not (claims.video and (claims.video.room_list or claims.video.room_admin)):
        raise _denied("video.roomList")


class FakeLiveKitServer:
    """In-process LiveKit API server on 127.0.0.1 (random free port). See module docstring."""

    def __init__(self, *, api_key: str = API_KEY, api_secret: str = API_SECRET) -> None:
        self.api_key, self.api_secret = api_key, api_secret
        self.url = ""
        self.calls: list[RecordedCall] = []
        self.rejected: list[tuple[str, str]] = []  # (method, twirp code) refused before handling
        self.rooms: dict[str, set[str]] = {}
        self.deleted_rooms: list[str] = []
        self.cancelled_dials: list[str] = []
        self.move_supported = True
        self._verifier = TokenVerifier(api_key, api_secret)
        self._script: deque[DialScript] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._stopping = False
        sip, rm = sip_pb, room_pb
        # fmt: off
        self._routes: dict[tuple[str, str], tuple[type[Message], Check, Handler]] = {
            ("SIP", "CreateSIPParticipant"):
                (sip.CreateSIPParticipantRequest, _need_sip_call, self._create_sip_participant),
            ("RoomService", "ListRooms"): (rm.ListRoomsRequest, _need_room_list, self._list_rooms),
            ("RoomService", "DeleteRoom"):
                (rm.DeleteRoomRequest, _need_room_create, self._delete_room),
            ("RoomService", "ListParticipants"):
                (rm.ListParticipantsRequest, _need_room_admin, self._list_participants),
            ("RoomService", "GetParticipant"):
                (rm.RoomParticipantIdentity, _need_room_admin, self._get_participant),
            ("RoomService", "RemoveParticipant"):
                (rm.RoomParticipantIdentity, _need_room_admin, self._remove_participant),
            ("RoomService", "MoveParticipant"):
                (rm.MoveParticipantRequest, _need_room_admin, self._move_participant),
            ("RoomService", "UpdateParticipant"):
                (rm.UpdateParticipantRequest, _need_room_admin, self._update_participant),
        }
        # fmt: on

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/twirp/{service}/{method}", self._dispatch)
        # handler_cancellation: a client disconnect cancels the handler task (off by default
        # since aiohttp 3.7); that is how an aborted dial is detected.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._inflight):  # e.g. hanging dials: don't wait for them
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLiveKitServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- test helpers ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }

    def calls_to(self, method: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.method == method]

    def script_dial(self, *outcomes: DialScript) -> None:
        """Queue outcomes for the next CreateSIPParticipant requests (FIFO)."""
        self._script.extend(outcomes)

    def add_participant(self, room: str, identity: str) -> None:
        self.rooms.setdefault(room, set()).add(identity)

    # --- Twirp plumbing ----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        pkg, _, service = request.match_info["service"].partition(".")
        method = request.match_info["method"]
        route = self._routes.get((service, method))
        try:
            if request.method != "POST" or pkg != "livekit" or route is None:
                raise TwirpError("bad_route", f"no handler for {request.method} {request.path}")
            req_cls, check, handler = route
            try:
                claims = self._authenticate(request)
                msg = req_cls.FromString(await request.read())
                check(claims, msg)
            except (TwirpError, DecodeError) as e:
                err = e if isinstance(e, TwirpError) else TwirpError("malformed", str(e))
                self.rejected.append((method, err.code))
                raise err from None
            rid = request.headers.get("X-Livekit-Request-Id", "")
            self.calls.append(RecordedCall(service, method, msg, claims, time.monotonic(), rid))
            reply = await handler(msg)
            return web.Response(body=reply.SerializeToString(), content_type="application/protobuf")
        except TwirpError as e:
            return e.response()
        finally:
            self._inflight.discard(task)

    def _authenticate(self, request: web.Request) -> Claims:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise TwirpError("unauthenticated", "missing bearer token")
        try:
            return self._verifier.verify(token)
        except jwt.PyJWTError as e:  # bad signature, wrong key (issuer), expired, garbage...
            raise TwirpError("unauthenticated", f"invalid token: {e}") from None

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    # --- SIP ---------------------------------------------------------------------------------

    async def _create_sip_participant(
        self, req: sip_pb.CreateSIPParticipantRequest
    ) -> sip_pb.SIPParticipantInfo:
        script = self._script.popleft() if self._script else DialScript.answer()
        try:
            if script.kind == "hang":
                await asyncio.Event().wait()
            await asyncio.sleep(script.delay)
        except asyncio.CancelledError:
            if not self._stopping:  # the client aborted the request
                self.cancelled_dials.append(req.participant_identity)
            raise
        if script.kind == "sip_error":
            code, reason = script.sip_status_code, script.sip_status
            raise TwirpError(
                sip_twirp_code(code),
                f"sip status {code}: {reason}",
                {"sip_status_code": str(code), "sip_status": reason},
            )
        if script.kind == "canceled":
            raise TwirpError("canceled", "call was not answered")
        if script.kind == "server_error":
            raise TwirpError("internal", "internal server error")
        self.add_participant(req.room_name, req.participant_identity)
        return sip_pb.SIPParticipantInfo(
            participant_id=self._next_id("PA"),
            participant_identity=req.participant_identity,
            room_name=req.room_name,
            sip_call_id=self._next_id("SCL"),
        )

    # --- RoomService -------------------------------------------------------------------------

    @staticmethod
    def _participant(identity: str, **fields: Any) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            identity=identity, state=models.ParticipantInfo.ACTIVE, **fields
        )

    def _require(self, room: str, identity: str) -> None:
        if identity not in self.rooms.get(room, ()):
            raise TwirpError("not_found", "participant not found")

    async def _list_rooms(self, req: room_pb.ListRoomsRequest) -> room_pb.ListRoomsResponse:
        names = [n for n in self.rooms if not req.names or n in req.names]
        return room_pb.ListRoomsResponse(
            rooms=[
                models.Room(sid=f"RM_{n}", name=n, num_participants=len(self.rooms[n]))
                for n in names
            ]
        )

    async def _delete_room(self, req: room_pb.DeleteRoomRequest) -> room_pb.DeleteRoomResponse:
        # livekit/livekit pkg/service/roomservice.go: an unknown room is "not_found".
        if req.room not in self.rooms:
            raise TwirpError("not_found", "room not found")
        del self.rooms[req.room]
        self.deleted_rooms.append(req.room)
        return room_pb.DeleteRoomResponse()

    async def _list_participants(
        self, req: room_pb.ListParticipantsRequest
    ) -> room_pb.ListParticipantsResponse:
        return room_pb.ListParticipantsResponse(
            participants=[self._participant(i) for i in sorted(self.rooms.get(req.room, ()))]
        )

    async def _get_participant(self, req: room_pb.RoomParticipantIdentity) -> Message:
        self._require(req.room, req.identity)
        return self._participant(req.identity)

    async def _remove_participant(self, req: room_pb.RoomParticipantIdentity) -> Message:
        self._require(req.room, req.identity)
        self.rooms[req.room].discard(req.identity)
        return room_pb.RemoveParticipantResponse()

    async def _move_participant(self, req: room_pb.MoveParticipantRequest) -> Message:
        if not self.move_supported:  # self-hosted LiveKit: Cloud-only feature
            raise TwirpError("unimplemented", "MoveParticipant is not supported")
        if req.room == req.destination_room:
            raise TwirpError("invalid_argument", "destination room is the same as source room")
        self._require(req.room, req.identity)
        self.rooms[req.room].discard(req.identity)
        self.add_participant(req.destination_room, req.identity)
        return room_pb.MoveParticipantResponse()

    async def _update_participant(self, req: room_pb.UpdateParticipantRequest) -> Message:
        self._require(req.room, req.identity)
        attrs = dict(req.attributes)
        info = self._participant(
            req.identity, name=req.name, metadata=req.metadata, attributes=attrs
        )
        if req.HasField("permission"):
            info.permission.CopyFrom(req.permission)
        return info
