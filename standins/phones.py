"""Phones that speak SIP and RTP, for the real-stack tests: SIPp (Debian's sip-tester 3.6.1) playing
scenarios written here, with voices from espeak-ng and tones from ffmpeg.

The caller dials livekit-sip's inbound trunk number; the human's phone is where the outbound trunk
sends (127.0.0.1:5070): it rings, then answers, refuses (486, 603, 480) or never answers (and takes
the CANCEL), plays what it says, presses keys (RFC 4733, SIPp's ``play_dtmf``: payload type 96,
announced in its SDP, which livekit-sip follows), and hangs up when told. SIPp cannot record: the
test run captures the phones' traffic (``real_stack.Capture``) and ``recordings.py`` reads it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from standins.real_stack import (
    CALLER_NUMBER,
    CALLER_RTP,
    CALLER_SIP,
    HUMAN_RTP,
    HUMAN_SIP,
    SIP_PORT,
)

# ── What the phones say: 8 kHz mu-law, raw (SIPp's rtp_stream plays the bytes as they are) ─────


@dataclass(frozen=True)
class Say:
    """``text`` spoken by espeak-ng."""

    text: str


@dataclass(frozen=True)
class Tone:
    """A sine tone, loud enough to hear through G.711 and Opus."""

    hz: float
    seconds: float


@dataclass(frozen=True)
class Quiet:
    seconds: float


Sound = Say | Tone | Quiet


def audio_file(folder: Path, name: str, *sounds: Sound, tail: float = 120.0) -> Path:
    """``sounds`` one after the other, then ``tail`` seconds of silence (RTP keeps flowing:
    livekit-sip hangs up after its media timeout), as raw mu-law for SIPp."""
    parts: list[Path] = []
    for i, sound in enumerate((*sounds, Quiet(tail))):
        part = folder / f"{name}.{i}.wav"
        if isinstance(sound, Say):
            subprocess.run(["espeak-ng", "-w", str(part), sound.text], check=True)
        elif isinstance(sound, Tone):
            source = f"sine=frequency={sound.hz}:sample_rate=8000:duration={sound.seconds}"
            _ffmpeg("-f", "lavfi", "-i", source, "-af", "volume=0.5", str(part))
        else:
            source = f"anullsrc=r=8000:cl=mono:d={sound.seconds}"
            _ffmpeg("-f", "lavfi", "-i", source, "-t", str(sound.seconds), str(part))
        parts.append(part)
    out = folder / f"{name}.ulaw"
    inputs = [arg for p in parts for arg in ("-i", str(p))]
    streams = "".join(f"[{i}:a]aresample=8000,aformat=channel_layouts=mono[a{i}];"
                      for i in range(len(parts)))  # fmt: skip
    joined = "".join(f"[a{i}]" for i in range(len(parts)))
    graph = f"{streams}{joined}concat=n={len(parts)}:v=0:a=1"
    _ffmpeg(*inputs, "-filter_complex", graph, "-ar", "8000", "-ac", "1", "-f", "mulaw", str(out))
    for p in parts:
        p.unlink()
    return out


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


# ── SIPp scenarios ────────────────────────────────────────────────────────────────────────────

_HEAD = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="{name}">\n'

_SDP = """v=0
o=phone 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0 96
a=rtpmap:0 PCMU/8000
a=rtpmap:96 telephone-event/8000
a=fmtp:96 0-16
a=sendrecv
"""


def _message(text: str, **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    body = "\n".join(line.strip() for line in text.strip("\n").splitlines())
    return f"<send{extra}><![CDATA[\n\n{body}\n\n]]></send>\n"


def _response(
    first_line: str, tag: str = "", *headers: str, cseq: str = "[last_CSeq:]", sdp: str = "",
    **attrs: str,
) -> str:
    """A response to the last request: its Via, From, To (with our ``tag``), Call-ID and
    CSeq, then ``headers``, then the ``sdp`` body if any."""
    lines = [first_line, "[last_Via:]", "[last_From:]", f"[last_To:]{tag}", "[last_Call-ID:]",
             cseq, *headers]  # fmt: skip
    if sdp:
        lines += ["Content-Type: application/sdp", "Content-Length: [len]", "", sdp]
    else:
        lines.append("Content-Length: 0")
    return _message("\n".join(lines), **attrs)


def _answer_200(tag: str = "", **attrs: str) -> str:
    return _response("SIP/2.0 200 OK", tag, **attrs)


def _play_then_keys(audio: Path | None, keys: tuple[tuple[float, str], ...]) -> tuple[str, float]:
    """Start the audio; press each key at its time (seconds after the start). Returns the XML and
    the time the last key was pressed."""
    xml = ""
    if audio is not None:
        xml += f'<nop><action><exec rtp_stream="{audio},1,0"/></action></nop>\n'
    now = 0.0
    for at, digit in keys:
        if at > now:
            xml += f'<pause milliseconds="{int((at - now) * 1000)}"/>\n'
            now = at
        xml += f'<nop><action><exec play_dtmf="{digit}"/></action></nop>\n'
    return xml, now


def _hang_up_or_take_bye(after: float, by: str, frm: str, to: str) -> str:
    """Wait up to ``after`` seconds for the other side's BYE (answered 200); then hang up."""
    return (
        f'<recv request="BYE" timeout="{int(max(after, 0.01) * 1000)}" ontimeout="hang_up"/>\n'
        + _answer_200(next="end")
        + '<label id="hang_up"/>\n'
        + _message(f"""
            BYE {by} SIP/2.0
            Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
            From: {frm}
            To: {to}
            Call-ID: [call_id]
            CSeq: [cseq] BYE
            Max-Forwards: 70
            Content-Length: 0
        """, retrans="500")  # fmt: skip
        + '<recv response="200" timeout="5000" ontimeout="end"/>\n<label id="end"/>\n'
    )


def caller_scenario(audio: Path, *, hang_up_after: float, keys=()) -> str:
    """Dial the inbound trunk's number; once answered play ``audio`` (and press ``keys``); hang
    up ``hang_up_after`` seconds after the answer unless the other side did first."""
    frm = (
        f'"Test caller" <sip:{CALLER_NUMBER}@[local_ip]:[local_port]>'
        ";tag=[pid]SIPpTag00[call_number]"
    )
    to = "<sip:[service]@[remote_ip]:[remote_port]>"
    invite = _message(f"""
        INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
        Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
        From: {frm}
        To: {to}
        Call-ID: [call_id]
        CSeq: [cseq] INVITE
        Contact: <sip:{CALLER_NUMBER}@[local_ip]:[local_port]>
        Max-Forwards: 70
        Content-Type: application/sdp
        Content-Length: [len]

        {_SDP.replace(chr(10), chr(10) + "        ")}
    """, retrans="500")  # fmt: skip
    ack = _message(f"""
        ACK [next_url] SIP/2.0
        Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
        From: {frm}
        To: {to}[peer_tag_param]
        Call-ID: [call_id]
        CSeq: [cseq] ACK
        Contact: <sip:{CALLER_NUMBER}@[local_ip]:[local_port]>
        Max-Forwards: 70
        Content-Length: 0
    """)  # fmt: skip
    played, pressed = _play_then_keys(audio, tuple(keys))
    return (
        _HEAD.format(name="caller")
        + invite
        + '<recv response="100" optional="true"/>\n<recv response="180" optional="true"/>\n'
        + '<recv response="183" optional="true"/>\n<recv response="200" rrs="true"/>\n'
        + ack
        + played
        + _hang_up_or_take_bye(hang_up_after - pressed, "[next_url]", frm, to + "[peer_tag_param]")
        + "</scenario>\n"
    )


@dataclass(frozen=True)
class HumanPhone:
    """How the human's phone behaves: rings ``ring`` seconds, then ``answer`` (a SIP final
    code: 200 answers; 486, 603, 480 refuse; None never answers and waits for the CANCEL);
    once answered plays ``audio``, presses ``keys`` (seconds after the answer) and hangs up
    ``hang_up_after`` seconds after the answer unless the other side did first.
    ``responds=False``: a phone that is off, or a host that is down: it takes the INVITE (and
    its retransmissions, and a CANCEL) and sends nothing back at all, not even 100 Trying."""

    ring: float = 2.0
    answer: int | None = 200
    audio: Path | None = None
    keys: tuple[tuple[float, str], ...] = ()
    hang_up_after: float = 60.0
    responds: bool = True

    def scenario(self) -> str:
        tag = ";tag=[pid]SIPpTag01[call_number]"
        contact = "Contact: <sip:human@[local_ip]:[local_port];transport=[transport]>"
        xml = _HEAD.format(name="human")
        if not self.responds:
            return xml + (
                '<recv request="INVITE"/>\n'
                '<recv request="CANCEL" timeout="120000" ontimeout="end"/>\n'
                '<label id="end"/>\n</scenario>\n'
            )
        # SIPp refuses a scenario with a variable it sets and never uses
        dialog = ('<ereg regexp=".*" search_in="hdr" header="From:" assign_to="remote"/>'
                  '<ereg regexp=".*" search_in="hdr" header="To:" assign_to="local"/>')
        xml += ('<recv request="INVITE" crlf="true" rrs="true"><action>'
                '<ereg regexp=".*" search_in="hdr" header="CSeq:" assign_to="invite_cseq"/>'
                + (dialog if self.answer == 200 else "") + "</action></recv>\n")  # fmt: skip
        xml += _response("SIP/2.0 180 Ringing", tag, contact)
        ring_ms = 3_600_000 if self.answer is None else int(self.ring * 1000)
        xml += f'<recv request="CANCEL" timeout="{ring_ms}" ontimeout="final"/>\n'
        xml += _answer_200(tag)  # to the CANCEL
        xml += _response("SIP/2.0 487 Request Terminated", tag, cseq="CSeq: [$invite_cseq]")
        xml += '<recv request="ACK" timeout="5000" ontimeout="end" next="end"/>\n'
        xml += '<label id="final"/>\n'
        if self.answer is None:
            return xml + '<label id="end"/>\n</scenario>\n'
        if self.answer != 200:
            reason = {486: "Busy Here", 603: "Decline", 480: "Temporarily Unavailable"}
            xml += _response(f"SIP/2.0 {self.answer} {reason.get(self.answer, 'Refused')}", tag)
            xml += '<recv request="ACK" timeout="5000" ontimeout="end"/>\n<label id="end"/>\n'
            return xml + "</scenario>\n"
        xml += _response("SIP/2.0 200 OK", tag, contact, sdp=_SDP.strip(), retrans="500")
        xml += '<recv request="ACK" crlf="true"/>\n'
        played, pressed = _play_then_keys(self.audio, self.keys)
        xml += played
        xml += _hang_up_or_take_bye(
            self.hang_up_after - pressed, "[next_url]", f"[$local]{tag}", "[$remote]"
        )
        return xml + "</scenario>\n"


@dataclass
class Sipp:
    """One SIPp process playing one call."""

    folder: Path
    name: str
    process: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)

    def start(self, scenario: str, *args: str) -> Sipp:
        path = self.folder / f"{self.name}.xml"
        path.write_text(scenario)
        log = open(self.folder / f"{self.name}.sipp.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-m", "1", "-nostdin", "-nd",
             "-trace_err", "-timeout_error", "-timeout", "600s", *args],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        return self

    def wait(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def human_phone(folder: Path, behaviour: HumanPhone) -> Sipp:
    """The human's phone, listening where the outbound trunk sends."""
    return Sipp(folder, "human").start(
        behaviour.scenario(), "-p", str(HUMAN_SIP), "-mp", str(HUMAN_RTP)
    )


def call_in(folder: Path, audio: Path, *, hang_up_after: float, keys=()) -> Sipp:
    """The caller, dialling the inbound trunk's number at livekit-sip."""
    from standins.real_stack import INBOUND_NUMBER

    scenario = caller_scenario(audio, hang_up_after=hang_up_after, keys=keys)
    return Sipp(folder, "caller").start(
        scenario, "-s", INBOUND_NUMBER, f"127.0.0.1:{SIP_PORT}",
        "-p", str(CALLER_SIP), "-mp", str(CALLER_RTP),
    )  # fmt: skip
