"""What the phones heard and what SIP they received, read from a packet capture (tcpdump -w).

SIPp plays audio but cannot record (the reference, livekit-real-stack.md), so the test run captures
the phones' UDP on the loopback interface and this module reads it back: each phone's SIP messages
with their times, and the G.711 audio sent to its RTP port, decoded to 8 kHz samples on the
capture's clock, with RFC 4733 key presses. Pure Python and numpy: pcap (Linux cooked or Ethernet
link types), IPv4, UDP, RTP (RFC 3550), PCMU/PCMA (ITU-T G.711), telephone-event (RFC 4733).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RATE = 8000  # G.711
FRAME = 0.02  # seconds: the window the level is judged on (one RTP packet's worth)


def _ulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa << 3) + 0x84) << exponent
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


ULAW, ALAW = _ulaw_table(), _alaw_table()


@dataclass
class Datagram:
    at: float  # capture time, seconds since the epoch
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def read_pcap(path: Path) -> list[Datagram]:
    """The UDP datagrams of an IPv4 capture, in order."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nanos = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link_header = {1: 14, 113: 16, 276: 20, 0: 4, 101: 0}.get(linktype)
    if link_header is None:
        raise ValueError(f"unsupported pcap link type {linktype}")
    out: list[Datagram] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        packet = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        ip = packet[link_header:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport, length = struct.unpack("!HHH", udp[:6])
        src = (".".join(map(str, ip[12:16])), sport)
        dst = (".".join(map(str, ip[16:20])), dport)
        at = sec + frac / (1e9 if nanos else 1e6)
        out.append(Datagram(at, src, dst, bytes(udp[8:length])))
    return out


@dataclass
class SipMessage:
    at: float
    sent: bool  # by the phone (True) or to it (False)
    first_line: str
    headers: dict[str, str]
    body: str

    @property
    def method(self) -> str:
        """INVITE, BYE, CANCEL... for a request; "" for a response."""
        return "" if self.first_line.startswith("SIP/2.0") else self.first_line.split()[0]

    @property
    def status(self) -> int:
        """The response's code (180, 200, 486...); 0 for a request."""
        return int(self.first_line.split()[1]) if self.first_line.startswith("SIP/2.0") else 0

    @property
    def cseq_method(self) -> str:
        return self.headers.get("cseq", "").split()[-1] if self.headers.get("cseq") else ""


def parse_sip(payload: bytes) -> tuple[str, dict[str, str], str] | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not lines or not re.match(r"^(SIP/2\.0 \d{3}|[A-Z]+ \S+ SIP/2\.0)", lines[0]):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return lines[0], headers, body


@dataclass
class KeyPress:
    at: float
    digit: str


@dataclass
class Heard:
    """What one phone heard: its audio (8 kHz, silence where no packet came) from ``start``."""

    start: float
    samples: np.ndarray
    keys: list[KeyPress] = field(default_factory=list)

    def levels(self) -> np.ndarray:
        """RMS of each ``FRAME`` of audio."""
        n = int(RATE * FRAME)
        frames = len(self.samples) // n
        chunk = self.samples[: frames * n].astype(np.float64).reshape(frames, n)
        return np.sqrt(np.mean(chunk**2, axis=1))

    def sound(self, threshold: float = 300.0, min_gap: float = 0.3) -> list[tuple[float, float]]:
        """The spans (capture times) with sound above ``threshold``, gaps shorter than
        ``min_gap`` joined."""
        loud = self.levels() > threshold
        spans: list[list[float]] = []
        for i, on in enumerate(loud):
            if not on:
                continue
            t = self.start + i * FRAME
            if spans and t - spans[-1][1] <= min_gap:
                spans[-1][1] = t + FRAME
            else:
                spans.append([t, t + FRAME])
        return [(a, b) for a, b in spans]

    def tone_level(self, hz: float, start: float, end: float) -> float:
        """How much of the audio between ``start`` and ``end`` is a tone at ``hz``: its share of
        the energy (0..1), by the FFT."""
        a = max(int((start - self.start) * RATE), 0)
        b = min(int((end - self.start) * RATE), len(self.samples))
        if b - a < RATE // 10:
            return 0.0
        x = self.samples[a:b].astype(np.float64)
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / RATE)
        band = (freqs > hz * 0.9) & (freqs < hz * 1.1)
        total = float(spectrum[freqs > 50].sum())
        return float(spectrum[band].sum()) / total if total else 0.0

    def level(self, start: float, end: float) -> float:
        """The RMS of the audio between ``start`` and ``end``."""
        a = max(int((start - self.start) * RATE), 0)
        b = min(int((end - self.start) * RATE), len(self.samples))
        if b <= a:
            return 0.0
        return float(np.sqrt(np.mean(self.samples[a:b].astype(np.float64) ** 2)))

    def windows(self, start: float, end: float, step: float = 0.25) -> list[float]:
        """The starts of the ``step``-long windows between ``start`` and ``end``."""
        return [start + i * step for i in range(max(int((end - start) / step), 0))]

    def silence_longest(self, start: float, end: float, threshold: float = 300.0) -> float:
        """The longest stretch without sound between ``start`` and ``end``, in seconds."""
        levels = self.levels()
        a = max(int((start - self.start) / FRAME), 0)
        b = min(int((end - self.start) / FRAME), len(levels))
        longest = run = 0
        for on in levels[a:b] > threshold:
            run = 0 if on else run + 1
            longest = max(longest, run)
        return longest * FRAME


@dataclass
class Phone:
    """One phone's view of a capture: its SIP port and RTP port."""

    sip_port: int
    rtp_port: int
    datagrams: list[Datagram]

    def sip(self) -> list[SipMessage]:
        out = []
        for d in self.datagrams:
            sent = d.src[1] == self.sip_port
            if not sent and d.dst[1] != self.sip_port:
                continue
            parsed = parse_sip(d.payload)
            if parsed is not None:
                out.append(SipMessage(d.at, sent, *parsed))
        return out

    def received(self, what: str | int, of: str = "") -> list[SipMessage]:
        """The SIP messages the phone received: requests by method, responses by code (``of``
        a request's method: ``received(200, "INVITE")``)."""
        return self._matching(False, what, of)

    def sent(self, what: str | int, of: str = "") -> list[SipMessage]:
        return self._matching(True, what, of)

    def _matching(self, sent: bool, what: str | int, of: str) -> list[SipMessage]:
        return [
            m
            for m in self.sip()
            if m.sent == sent
            and (m.method == what or m.status == what)
            and (not of or m.cseq_method == of)
        ]

    def heard(self) -> Heard:
        """The audio sent to the phone's RTP port, placed by RTP timestamp within each stream
        (a new SSRC starts where its first packet arrived)."""
        return _decode([d for d in self.datagrams if d.dst[1] == self.rtp_port])

    def said(self) -> Heard:
        """The audio the phone sent from its RTP port (what it played, as it left it)."""
        return _decode([d for d in self.datagrams if d.src[1] == self.rtp_port])


def _decode(datagrams: list[Datagram]) -> Heard:
    packets = [d for d in datagrams if len(d.payload) > 12]
    if not packets:
        return Heard(0.0, np.zeros(0, np.int16))
    start = packets[0].at
    audio: dict[int, np.ndarray] = {}
    keys: list[KeyPress] = []
    anchors: dict[int, tuple[int, float]] = {}  # ssrc: (first timestamp, its capture time)
    seen_events: set[tuple[int, int]] = set()
    for d in packets:
        p = d.payload
        if p[0] >> 6 != 2:
            continue
        csrc = p[0] & 0x0F
        pt = p[1] & 0x7F
        timestamp, ssrc = struct.unpack("!II", p[4:12])
        offset = 12 + 4 * csrc
        if p[0] & 0x10 and len(p) >= offset + 4:
            offset += 4 + 4 * struct.unpack("!H", p[offset + 2 : offset + 4])[0]
        body = p[offset:]
        if pt in (0, 8):
            base, base_at = anchors.setdefault(ssrc, (timestamp, d.at))
            index = int((base_at - start) * RATE) + ((timestamp - base) & 0xFFFFFFFF)
            decoded = (ULAW if pt == 0 else ALAW)[np.frombuffer(body, np.uint8)]
            audio[index] = decoded
        elif len(body) >= 4 and (timestamp, ssrc) not in seen_events:
            seen_events.add((timestamp, ssrc))  # RFC 4733: one event per timestamp
            event = body[0]
            digit = "0123456789*#"[event] if event < 12 else f"event {event}"
            keys.append(KeyPress(d.at, digit))
    length = max((i + len(a) for i, a in audio.items()), default=0)
    samples = np.zeros(length, np.int16)
    for i, a in audio.items():
        samples[i : i + len(a)] = a
    return Heard(start, samples, keys)


def phones(capture: Path, **ports: tuple[int, int]) -> dict[str, Phone]:
    """``phones(pcap, caller=(5080, 6000), human=(5070, 6100))``: each phone's view."""
    datagrams = read_pcap(capture)
    return {name: Phone(sip, rtp, datagrams) for name, (sip, rtp) in ports.items()}


def timeline(phone: Phone, hz: float = 200.0, step: float = 0.5) -> str:
    """What a phone heard and received, a line per ``step`` (for reading a failed test)."""
    heard = phone.heard()
    events = sorted(phone.sip(), key=lambda m: m.at)
    lines = []
    end = heard.start + len(heard.samples) / RATE
    origin = min([heard.start, *(m.at for m in events)])
    for t in heard.windows(heard.start, end, step):
        level = heard.level(t, t + step)
        share = heard.tone_level(hz, t, t + step) if level > 100 else 0.0
        bar = "#" * min(int(level / 200), 30)
        lines.append(f"{t - origin:7.2f}  {bar:30}  {hz:.0f} Hz {share:.2f}")
    for m in events:
        lines.append(f"{m.at - origin:7.2f}  {'->' if m.sent else '<-'} {m.first_line}")
    return "\n".join(sorted(lines, key=lambda line: float(line.split()[0])))
