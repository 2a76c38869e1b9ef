"""Timing at the phones: the handoff on the real LiveKit stack, measured from what SIPp phones sent
and heard (their captured RTP) and the SIP they received; nothing from the worker's log but the
moment of the transfer decision (the handoff record's ``decided_at``, on the same clock).

    python bench/real_stack_bench.py            # 3 calls of each kind; needs `bash stack/build`

It runs in a network namespace of its own (it re-runs itself under ``unshare -n``), starts the
stack (standins/real_stack.py), and places two kinds of call with the provider stand-ins:

- conference (screened in private, then bridged: self-hosted LiveKit has no MoveParticipant):
  caller answered → first greeting audio; transfer decision → first "please hold" audio; the
  longest silence the caller hears from the decision to the human's answer; caller → human and
  human → caller audio latency through the bridge (a tone each phone sends: first packet that
  carries it out, first that carries it in); the job process's CPU (% of one core) while the
  two talk and the memory it added since the caller was on hold;
- consult (briefed in private; the human here never accepts): the end of the human's hello (the
  last of its sound as it left the phone) → first audio of the opener, → first audio of the
  details.

Figures go to stdout and bench/out/real_stack.json; bench/README.md sets them beside the
in-process benchmark's. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import warm_handoff as wh  # noqa: E402
from standins import phones, real_stack  # noqa: E402
from standins.phones import HumanPhone, Quiet, Say, Tone, audio_file  # noqa: E402
from standins.providers import MS_PER_CHAR, TONE_HZ, ProviderStandIns  # noqa: E402
from standins.recordings import FRAME, Heard  # noqa: E402
from standins.recordings import phones as read_phones  # noqa: E402

ASKS = "I would like to talk to a person, please."
CALLER_TONE, HUMAN_TONE = 1000.0, 1400.0
SUPPORT = {"number": "+15105550101", "description": "Technical support",
           "spoken_name": "our support team"}  # fmt: skip
LOUD = 300.0  # RMS over a 20 ms frame: sound
# the opener's audio: the ElevenLabs stand-in speaks MS_PER_CHAR a character
OPENER_SECONDS = len(wh.OPENER.format(business="Example Dental")) * MS_PER_CHAR / 1000


def first_sound(heard: Heard, after: float, hz: float | None = None) -> float | None:
    """The first 20 ms frame after ``after`` with sound (and, with ``hz``, mostly that tone)."""
    for t in heard.windows(after, heard.start + len(heard.samples) / 8000, FRAME):
        if heard.level(t, t + FRAME) > LOUD and (
            hz is None or heard.tone_level(hz, t - 0.04, t + 0.06) > 0.5
        ):
            return t
    return None


def first_sound_after_quiet(heard: Heard, after: float) -> float | None:
    """The first frame with sound after ``after`` that follows a quiet frame."""
    quiet = False
    for t in heard.windows(after, heard.start + len(heard.samples) / 8000, FRAME):
        loud = heard.level(t, t + FRAME) > LOUD
        if loud and quiet:
            return t
        quiet = quiet or not loud
    return None


class JobUsage(threading.Thread):
    """Samples the call's job process (its pid from the worker's log) every 0.25 s: CPU seconds
    used so far and resident memory, with the wall clock the capture uses."""

    def __init__(self, worker: real_stack.Worker) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.samples: list[tuple[float, float, float]] = []  # (time, cpu s, rss MB)
        self.done = threading.Event()

    def run(self) -> None:
        pid = None
        while not self.done.wait(0.25):
            if pid is None:
                found = re.search(r'initializing process .*?"pid": (\d+)', self.worker.log())
                pid = int(found[1]) if found else None
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return
            cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024
            self.samples.append((time.time(), cpu, rss))

    def between(self, start: float, end: float) -> tuple[float, float] | None:
        """CPU (% of one core) over ``start``..``end``, and the memory at ``end`` (MB)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        (t0, cpu0, _), (t1, cpu1, rss1) = inside[0], inside[-1]
        return 100 * (cpu1 - cpu0) / (t1 - t0), rss1

    def at(self, moment: float) -> float | None:
        """Memory (MB) at the last sample before ``moment``."""
        before = [s for s in self.samples if s[0] <= moment]
        return before[-1][2] if before else None


def run_call(stack: real_stack.Stack, folder: Path, mode: str) -> dict[str, float]:
    folder.mkdir(parents=True)
    with ProviderStandIns.in_thread() as standins:
        standins.stt_says(ASKS)  # then "hello" for whatever comes next
        env = {
            **stack.env, **standins.env(), "SIP_TRUNK_ID": stack.outbound_trunk,
            "HANDOFF_DESTINATIONS": json.dumps({"support": SUPPORT}),
            "BUSINESS_NAME": "Example Dental", "HANDOFF_MODE": mode,
        }  # fmt: skip
        capture = real_stack.Capture(folder / "phones.pcap")
        worker = real_stack.Worker(folder, env)
        usage = JobUsage(worker)
        usage.start()
        sipps: list[phones.Sipp] = []
        try:
            if mode == "conference":
                human_audio = audio_file(folder, "human", Say("Hello, support, Sam speaking."),
                                         Quiet(16), Tone(HUMAN_TONE, 1.5))  # fmt: skip
                sipps.append(phones.human_phone(folder, HumanPhone(
                    ring=6, audio=human_audio, hang_up_after=40)))  # fmt: skip
                caller_audio = audio_file(folder, "caller", Quiet(7), Say(ASKS), Quiet(26),
                                          Tone(CALLER_TONE, 1.5))  # fmt: skip
                sipps.append(phones.call_in(folder, caller_audio, hang_up_after=44))
            else:
                human_audio = audio_file(folder, "human", Say("Hello, this is Sam."))
                sipps.append(phones.human_phone(folder, HumanPhone(
                    ring=3, audio=human_audio, hang_up_after=16)))  # fmt: skip
                caller_audio = audio_file(folder, "caller", Quiet(7), Say(ASKS))
                sipps.append(phones.call_in(folder, caller_audio, hang_up_after=34))
            deadline = time.monotonic() + 90
            for sipp in sipps:
                sipp.wait(max(deadline - time.monotonic(), 0.1))
        finally:
            for sipp in sipps:
                sipp.stop()
            capture.stop()
            usage.done.set()
            worker.stop()
        records = worker.records()
    seen = read_phones(capture.path, caller=(real_stack.CALLER_SIP, real_stack.CALLER_RTP),
                       human=(real_stack.HUMAN_SIP, real_stack.HUMAN_RTP))  # fmt: skip
    caller, human = seen["caller"], seen["human"]
    decided = records[-1]["decided_at"] if records else None
    heard_by_caller, heard_by_human = caller.heard(), human.heard()
    (answered,) = caller.received(200, "INVITE")
    (human_answered,) = human.sent(200, "INVITE")
    out: dict[str, float] = {}
    greeting = first_sound(heard_by_caller, answered.at)
    if greeting is not None:
        out["greeting_ms"] = (greeting - answered.at) * 1000
    if decided is not None:
        hold = first_sound(heard_by_caller, decided, TONE_HZ)
        if hold is not None:
            out["please_hold_ms"] = (hold - decided) * 1000
        out["longest_caller_silence_ms"] = (
            heard_by_caller.silence_longest(decided, human_answered.at, LOUD) * 1000
        )
    if mode == "conference":
        sent = first_sound(caller.said(), human_answered.at, CALLER_TONE)
        came = first_sound(heard_by_human, human_answered.at, CALLER_TONE)
        if sent is not None and came is not None:
            out["caller_to_human_ms"] = (came - sent) * 1000
        sent = first_sound(human.said(), human_answered.at, HUMAN_TONE)
        came = first_sound(heard_by_caller, human_answered.at, HUMAN_TONE)
        if sent is not None and came is not None:
            out["human_to_caller_ms"] = (came - sent) * 1000
        # the bridge's cost: the job process while the two talk (the introduction said, the
        # agent silent; only the relays work), against the caller on hold before the dial
        (bye,) = caller.sent("BYE")
        if sent is not None and (bridged := usage.between(sent - 1.0, bye.at - 0.5)):
            out["bridged_job_cpu_percent"], rss = bridged
            if (held := usage.at(human_answered.at - 2.0)) is not None:
                out["bridged_job_memory_added_mb"] = rss - held
    else:
        hello = human.said().sound(LOUD)
        opener = first_sound(heard_by_human, hello[0][1]) if hello else None
        if hello and opener is not None:
            hello_end = hello[0][1]
            out["hello_end_to_opener_ms"] = (opener - hello_end) * 1000
            # the opener's audio is OPENER_SECONDS long (the stand-in's 65 ms a character):
            # the details are the first sound after it that follows a quiet frame
            opener_end = opener + OPENER_SECONDS
            details = first_sound_after_quiet(heard_by_human, opener_end - 0.1)
            if details is not None:
                out["hello_end_to_details_ms"] = (details - hello_end) * 1000
                out["opener_end_to_details_ms"] = (details - opener_end) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="calls of each kind (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "real_stack.json")
    args = parser.parse_args()
    reason = real_stack.missing()
    if reason.startswith("the real stack runs in a network namespace") and not os.environ.get(
        "REAL_STACK_BENCH_INSIDE"
    ):
        command = " ".join(f"'{a}'" for a in [sys.executable, *sys.argv])
        os.environ["REAL_STACK_BENCH_INSIDE"] = "1"
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"])
    if reason:
        print(reason, file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    calls: dict[str, list[dict[str, float]]] = {"conference": [], "consult": []}
    with tempfile.TemporaryDirectory() as tmp, real_stack.running_stack(Path(tmp)) as stack:
        for i in range(args.calls):
            for mode in calls:
                calls[mode].append(run_call(stack, Path(tmp) / f"{mode}-{i}", mode))
                print(mode, i, calls[mode][-1], flush=True)
    medians = {
        f"{mode}.{key}": round(statistics.median(c[key] for c in runs if key in c), 1)
        for mode, runs in calls.items()
        for key in sorted({k for c in runs for k in c})
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"medians_ms": medians, "calls": calls,
                                    "load_average_1min_at_start": load,
                                    "versions": real_stack.versions()}, indent=2))  # fmt: skip
    print(f"\nmedians of {args.calls} calls (ms, %, MB), load average at start {load:.2f}:")
    for key, value in medians.items():
        print(f"  {key:42} {value:>7,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
