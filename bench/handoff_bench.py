"""Handoff benchmark: how much silence a phone handoff costs the caller and the human.

    python bench/handoff_bench.py            # a few minutes: table, bench/out/results.json, PNG
    python bench/handoff_bench.py --quick    # about 30 s, tiny latencies: smoke test only

Simulated calls run end to end through the real ``AgentSession`` and the real handoff code, with
scripted models of fixed latency, and every time is read from the audio frames the caller and
the human receive. The phases, in order: a new host's first call (empty phrase cache), the
three orderings ("warm handoff", "sequential", "seed"), the answer scenarios (who picks up the
human's phone), the capacity ramp, the worker's fresh processes. What each figure means and how
to read it: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # measured as configured by the code alone: no .env file
    os.environ.setdefault("DOTENV_FILE", os.devnull)

import numpy as np  # noqa: E402

from bench.answers import (  # noqa: E402
    ANSWERS,
    DETAILS_AFTER_HELLO,
    FIGURE_TITLES,
    FIGURES,
    TARGET,
    AnswerCall,
    measure_answer,
    run_answer,
)
from bench.calls import (  # noqa: E402
    METRIC_TITLES,
    METRICS,
    ORDERINGS,
    SEED,
    SEQUENTIAL,
    WARM,
    CallMetrics,
    measure,
    run_call,
)
from bench.capacity import LoopLag, measure_capacity, percentile  # noqa: E402
from bench.sim import Knobs, Trace  # noqa: E402

OUT = ROOT / "bench" / "out"
PNG = ROOT / "bench" / "timeline.png"
QUICK = Knobs(
    llm_ttft=0.02, tts_ttfa=0.02, ring=0.3, hello=0.6, decide=0.1, stt_final=0.05,
    chars_per_second=400, caller_pause=0.05,
)  # fmt: skip


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Phases
# ──────────────────────────────────────────────────────────────────────────────────────────────


T = TypeVar("T")


async def all_together(
    kinds: tuple[str, ...],
    calls: int,
    stagger: float,
    seed: int,
    run: Callable[[str], Awaitable[T]],
) -> tuple[list[T], dict[str, float]]:
    """``calls`` calls of each kind, all live together, starting ``stagger`` s apart in a
    shuffled order (``seed``); returns what each ``run`` returned and the event loop's lag
    meanwhile (ms)."""
    order = [kind for kind in kinds for _ in range(calls)]
    random.Random(seed).shuffle(order)
    ticker = LoopLag()
    ticker.start()

    async def one(i: int, kind: str) -> T:
        await asyncio.sleep(i * stagger)
        return await run(kind)

    try:
        done = await asyncio.gather(*(one(i, kind) for i, kind in enumerate(order)))
    finally:
        await ticker.stop()
    lags = [late * 1000 for _, late in ticker.samples]
    return list(done), {"p50": percentile(lags, 50), "p99": percentile(lags, 99), "max": max(lags)}


async def latency_phase(
    knobs: Knobs, calls: int, vad: Any, stagger: float, phrase_cache: str = ""
) -> tuple[dict[str, list[Trace]], dict[str, float]]:
    """``calls`` calls of each ordering, all live together; the traces by ordering and the
    loop's lag. "warm handoff" calls share the ``phrase_cache`` folder (none: "")."""

    def call(ordering: str) -> Awaitable[Trace]:
        cache = phrase_cache if ordering == WARM else ""
        return run_call(ordering, knobs, vad, phrase_cache=cache)

    traces, lag = await all_together(ORDERINGS, calls, stagger, 7, call)
    by: dict[str, list[Trace]] = {o: [] for o in ORDERINGS}
    for trace in traces:
        by[trace.ordering].append(trace)
    return by, lag


async def answer_phase(
    knobs: Knobs,
    calls: int,
    vad: Any,
    names: tuple[str, ...],
    stagger: float,
    phrase_cache: str = "",
    ring: float | None = None,
) -> tuple[list[AnswerCall], dict[str, float]]:
    """``calls`` "warm handoff" calls per answer scenario, all live together (after the
    orderings' calls: the phrase cache has the opener). ``ring``: each rings at most this long
    (None: as the scenario says)."""

    def call(name: str) -> Awaitable[AnswerCall]:
        return run_answer(name, knobs, vad, phrase_cache=phrase_cache, ring=ring)

    return await all_together(names, calls, stagger, 11, call)


def _probe(agent: str, calls: int = 0, *, quick: bool = False) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.worker_probe", "--agent", agent, "--calls", str(calls)]
    command += ["--quick"] if quick else []
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_SPAWNED_AT": repr(time.time())},
    )


def _collect(proc: subprocess.Popen[str], started: float) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        stage = json.loads(line)
        stages[stage.pop("stage")] = stage
    _, status, usage = os.wait4(proc.pid, 0)
    stages["process"] = {
        "exit_status": status,
        "max_rss_mb": usage.ru_maxrss / 1024,  # /usr/bin/time's maximum resident set size
        "wall_s": time.perf_counter() - started,
    }
    return stages


Run = tuple[str, int, int, dict[str, Any]]  # agent, round, calls, the probe's stages


def memory_probes(calls: int, quick: bool = False, rounds: int = 1) -> list[Run]:
    """Fresh processes for both agents, with 2 and with ``calls`` active calls, ``rounds``
    times. The two agents run side by side (one core each, the same conditions for both), the
    two call counts one after the other (``quick``: 2 calls only, so no RSS per call)."""
    runs: list[Run] = []
    waves = [2] if quick else [2, max(calls, 3)]
    for r in range(rounds):
        for n in waves:
            agents = [("warm", WARM), ("seed", SEED)]
            running = [
                (name, n, _probe(agent, n, quick=quick), time.perf_counter())
                for agent, name in (agents if r % 2 == 0 else agents[::-1])
            ]
            runs += [(name, r, n, _collect(proc, t)) for name, n, proc, t in running]
    return runs


def worker_figures(runs: list[Run]) -> dict[str, Any]:
    """Per agent: import + prewarm and the peak RSS then (medians over all its processes, every
    value kept), what the default turn detector adds, and RSS per call: in each round the slope
    between the two call counts, per phase; the median over rounds."""
    found: dict[str, Any] = {}
    for name in (WARM, SEED):
        mine = [(r, n, stages) for agent, r, n, stages in runs if agent == name]
        if not mine:
            continue
        ready = [stages["ready"] for _, _, stages in mine if "ready" in stages]
        numbers = [k for k in ready[0] if all(isinstance(x.get(k), (int, float)) for x in ready)]
        entry: dict[str, Any] = {
            "processes": len(mine),
            "ready": {k: float(np.median([x[k] for x in ready])) for k in numbers},
            "ready_wall_s_values": [x.get("ready_wall_s") for x in ready],
            "peak_rss_mb_values": [x.get("peak_rss_mb") for x in ready],
            "preload": next((st["preload"] for _, _, st in mine if "preload" in st), {}),
        }
        counts = sorted({n for _, n, _ in mine})
        per_call: dict[str, Any] = {"calls": counts}
        for phase in ("talking", "handoff"):
            key, slopes = f"{phase}_rss_mb", []
            for r in sorted({r for r, _, _ in mine}):
                by_calls = {n: st.get("per_call", {}).get(key) for rr, n, st in mine if rr == r}
                few, many = counts[0], counts[-1]
                if many > few and by_calls.get(few) and by_calls.get(many):
                    slopes.append((by_calls[many] - by_calls[few]) / (many - few))
            per_call[f"{phase}_mb_per_call"] = float(np.median(slopes)) if slopes else None
            per_call[f"{phase}_mb_per_call_values"] = slopes
        entry["per_call"] = per_call
        found[name] = entry
    return found


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Figures
# ──────────────────────────────────────────────────────────────────────────────────────────────


def stats(values: list[float | None]) -> dict[str, Any]:
    real = [v for v in values if v is not None]
    if not real:
        return {"median": None, "p90": None, "values": []}
    return {
        "median": float(np.median(real)),
        "p90": float(np.percentile(real, 90)),
        "values": [round(v, 4) for v in real],
    }


def summarise(by: dict[str, list[Trace]], knobs: Knobs) -> dict[str, Any]:
    orderings: dict[str, Any] = {}
    for ordering, traces in by.items():
        measured = [measure(t, knobs) for t in traces]
        details = sorted({k for m in measured for k in m.detail})
        orderings[ordering] = {
            "calls": len(traces),
            "outcomes": [t.outcome for t in traces],
            "metrics": {m: stats([getattr(x, m) for x in measured]) for m in METRICS},
            "detail": {k: stats([x.detail.get(k) for x in measured]) for k in details},
            "consult_turn_detection": next(
                (t.consult_turn_detection for t in traces if t.consult_turn_detection), None
            ),
            "consult_endpointing": next((t.endpointing for t in traces if t.endpointing), None),
            "human_heard": next((t.human_heard_text for t in traces if t.human_heard_text), []),
        }
    warm = orderings[WARM]["metrics"]
    ratios = {
        ref: {m: _ratio(orderings[ref]["metrics"][m]["median"], warm[m]["median"]) for m in METRICS}
        for ref in (SEQUENTIAL, SEED)
    }
    return {"orderings": orderings, "ratios": ratios}


def at_most(value: float | None, limit: float, what: str, after: str) -> dict[str, Any]:
    """A target that a median (seconds) must not exceed: "details <= 2,200 ms after ..."."""
    return {
        "value": value,
        "limit": limit,
        "met": value is not None and value <= limit + 1e-9,
        "rule": f"{what} <= {limit * 1000:,.0f} ms {after}",
    }


def summarise_answers(calls: list[AnswerCall]) -> dict[str, Any]:
    """Per scenario: the figures (seconds from the end of the utterance that cues the opener),
    what decided who answered, the frames about the caller sent before a person was confirmed,
    and the issue's targets."""
    found: dict[str, Any] = {}
    for name in dict.fromkeys(c.scenario for c in calls):
        measured = [measure_answer(c) for c in calls if c.scenario == name]
        early = [m.get("details_before_confirmation") for m in measured]
        entry: dict[str, Any] = {
            "calls": len(measured),
            "outcomes": [m["outcome"] for m in measured],
            "cue": next((m["cue"] for m in measured if m.get("cue")), None),
            "amd": [m.get("amd") or {} for m in measured],
            "confirmed_by": [m.get("confirmed_by") for m in measured],
            "question_heard": [m.get("question_heard") for m in measured],
            "reference_after_active": stats([m.get("reference_after_active") for m in measured]),
            "figures": {f: stats([m.get(f) for m in measured]) for f in FIGURES},
            "details_before_confirmation": early,
        }
        figures = entry["figures"]
        targets: dict[str, Any] = {}
        opener = figures["opener_after_cue"]["median"]
        targets["opener"] = at_most(opener, TARGET, "opener's first frame", "after its cue")
        if entry["cue"] == "utterance end":
            over = [m.get("opener") for m in measured]
            targets["opener_after_speech"] = {
                "value": min((o for o in over if o is not None), default=None),
                "limit": 0.0,
                "met": all(o is not None and o >= 0 for o in over),
                "rule": "the opener's first frame after the far end's last spoken sample "
                "(every call)",
            }
        details = figures["details_after_ready"]["median"]
        if details is not None or figures["details"]["median"] is not None:
            targets["details"] = at_most(
                details, TARGET, "details", "after the later of opener end and confirmation"
            )
        if name == "person":
            targets["details_after_hello"] = at_most(
                figures["details"]["median"], DETAILS_AFTER_HELLO, "details",
                "after the end of the hello",
            )  # fmt: skip
        targets["never_before_confirmation"] = {
            "value": sum(e or 0 for e in early),
            "limit": 0,
            "met": all(e == 0 for e in early),
            "rule": "no frame about the caller sent before a person is confirmed",
        }
        entry["targets"] = targets
        found[name] = entry
    return found


def first_call(measured: CallMetrics, outcome: str) -> dict[str, Any]:
    """The first "warm handoff" call on a new host (empty phrase cache): what instant words
    cannot help with."""
    return {"outcome": outcome, "greeting": measured.greeting, "announce": measured.announce}


def _ratio(reference: float | None, ours: float | None) -> float | None:
    if reference is None or ours is None or ours <= 0:
        return None
    return reference / ours


def targets(
    results: dict[str, Any], knobs: Knobs, workers: dict[str, Any] | None
) -> dict[str, Any]:
    """The issue's targets for "warm handoff", each with the value, the limit and the margin."""
    warm = results["orderings"][WARM]
    m = {k: v["median"] for k, v in warm["metrics"].items()}
    d = {k: v["median"] for k, v in warm["detail"].items()}
    found: dict[str, Any] = {}

    def check(name: str, value: float | None, limit: float | None, why: str) -> None:
        met = value is not None and limit is not None and value <= limit + 1e-9
        found[name] = {
            "value": value,
            "limit": limit,
            "met": met,
            "over_by": None if met or value is None or limit is None else value - limit,
            "rule": why,
        }

    check("greeting", m["greeting"], knobs.tts_ttfa + 0.1, "TTS first audio + 100 ms")
    check("announce", m["announce"], knobs.tts_ttfa + 0.15, "TTS first audio + 150 ms")
    if results.get("first_call"):  # later calls play them from the phrase cache
        check("greeting_later_call", m["greeting"], 0.03, "30 ms, from the phrase cache")
        check("announce_later_call", m["announce"], 0.03, "30 ms, from the phrase cache")
    check("longest_silence", m["longest_silence"], 1.0, "1.0 s")
    endpointing = d.get("endpointing")
    check(
        "human_wait",
        m["human_wait"],
        None if endpointing is None else endpointing + 0.1,
        "the hello's endpointing (as measured: end of hello -> user turn committed) + 100 ms",
    )
    check("overhead", m["overhead"], 0.3, "300 ms")
    if workers:
        ours, seed = workers.get(WARM, {}), workers.get(SEED, {})
        ready = ours.get("ready", {}).get("ready_wall_s")
        check("worker_ready", ready, seed.get("ready", {}).get("ready_wall_s"), "seed's")
        for phase in ("talking", "handoff"):
            key = f"{phase}_mb_per_call"
            check(
                f"rss_per_call_{phase}",
                ours.get("per_call", {}).get(key),
                seed.get("per_call", {}).get(key),
                "seed's",
            )
    return found


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Output
# ──────────────────────────────────────────────────────────────────────────────────────────────


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def table(report: dict[str, Any]) -> str:
    orderings = report["orderings"]
    names = list(orderings)
    lines = [
        f"Handoff figures, ms (median / p90 over {report['config']['calls']} calls per ordering)",
        "",
        f"{'':52}" + "".join(f"{n:>20}" for n in names) + f"{'seq/warm':>10}{'seed/warm':>10}",
    ]
    for metric in METRICS:
        row = f"{METRIC_TITLES[metric]:52}"
        for n in names:
            s = orderings[n]["metrics"][metric]
            row += f"{_ms(s['median']) + ' / ' + _ms(s['p90']):>20}"
        row += f"{_x(report['ratios'][SEQUENTIAL][metric]):>10}"
        row += f"{_x(report['ratios'][SEED][metric]):>10}"
        lines.append(row)
    first = report.get("first_call")
    if first:
        lines.append(
            f"(warm handoff: later calls, phrase cache filled; the first call on a new host: "
            f"greeting {_ms(first['greeting'])}, announce {_ms(first['announce'])})"
        )
    lines.append("")
    lines.append("of which (medians, ms):")
    for key, title in (
        ("dial_delay", "decision -> dial starts"),
        ("endpointing", "end of hello -> user turn committed"),
        ("brief_after_turn", "user turn committed -> first brief frame"),
        ("merge_after_keypress", "keypress -> human moved in"),
        ("connected_after_merge", "human moved in -> caller hears 'connected'"),
    ):
        row = f"  {title:50}"
        for n in names:
            row += f"{_ms(orderings[n]['detail'].get(key, {}).get('median')):>20}"
        lines.append(row)
    lag = report["loop_lag_during_calls_ms"]
    lines.append(
        f"  (event loop lag while these calls ran: p50 {lag['p50']:.1f} ms, "
        f"p99 {lag['p99']:.1f} ms)"
    )
    consult = orderings[WARM]
    lines.append(
        f"  (consult session turn detection: {consult['consult_turn_detection']}, "
        f"endpointing {consult['consult_endpointing']})"
    )
    workers = report.get("worker")
    if workers:
        heading = f"{'Worker (fresh processes)':52}" + "".join(f"{n:>20}" for n in (WARM, SEED))
        lines += ["", heading]
        rows = (
            ("import + prewarm, s (wall, with interpreter)", "ready", "ready_wall_s", 1, "{:.2f}"),
            ("  of which import, s", "ready", "import_s", 1, "{:.2f}"),
            ("peak RSS at ready (whole process), MB", "ready", "peak_rss_mb", 1, "{:.0f}"),
            ("+ default turn detector weights, MB", "preload", "turn_detector_mb", 1, "{:.0f}"),
            ("+ default turn detector load, s", "preload", "turn_detector_s", 1, "{:.2f}"),
            ("RSS per active call, talking, MB", "per_call", "talking_mb_per_call", 1, "{:.1f}"),
            ("RSS per active call, handoff, MB", "per_call", "handoff_mb_per_call", 1, "{:.1f}"),
        )
        for title, stage, key, _, fmt in rows:
            row = f"  {title:50}"
            for n in (WARM, SEED):
                value = workers.get(n, {}).get(stage, {}).get(key)
                row += f"{'-' if value is None else fmt.format(value):>20}"
            lines.append(row)
    capacity = report.get("capacity")
    if capacity:
        bound = " or more (time budget reached)"
        if capacity["reached_limit"]:
            bound = f" (not {capacity['failed_at']})"
        steps = ", ".join(f"{s['calls']}: {s['p99_lag_ms']:.1f}" for s in capacity["steps"])
        lines += [
            "",
            f"Capacity: {capacity['calls']}{bound} talking calls with event-loop lag p99 < "
            f"{capacity['limit_ms']:.0f} ms (calls: p99 ms = {steps})",
        ]
    answers = report.get("answers")
    if answers:
        lines += ["", *answers_table(answers, report["config"]["calls"])]
    lines += ["", "Targets (warm handoff):"]
    for name, t in report["targets"].items():
        unit = "MB" if "rss" in name else "s"
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        limit = "-" if t["limit"] is None else f"{t['limit']:.3f}"
        verdict = (
            "met"
            if t["met"]
            else ("missed" + ("" if t["over_by"] is None else f" by {t['over_by']:.3f} {unit}"))
        )
        lines.append(f"  {name:24} {value:>9} <= {limit:>9} {unit:3} ({t['rule']}): {verdict}")
    return "\n".join(lines)


def answers_table(answers: dict[str, Any], calls: int) -> list[str]:
    lag = answers["loop_lag_ms"]
    names = list(answers["scenarios"])
    scenarios = answers["scenarios"]
    lines = [
        f"Who answers (warm handoff), ms from the end of the utterance that cues the opener "
        f"(silent: the end of the grace time), median over {calls} call(s)",
        "",
        f"{'':52}" + "".join(f"{n:>18}" for n in names),
    ]

    def row(title: str, cell: Any) -> None:
        lines.append(f"{title:52}" + "".join(f"{cell(scenarios[n]):>18}" for n in names))

    row("outcome", lambda s: ",".join(dict.fromkeys(s["outcomes"])))
    row("(cue: utterance end / grace, s after active)", lambda s: _s(s["reference_after_active"]))
    for figure in FIGURES:
        row(FIGURE_TITLES[figure], lambda s, f=figure: _ms(s["figures"][f]["median"]))
    row("  verdict's reason", lambda s: _amd(s["amd"]))
    row("  confirmed by", lambda s: ",".join(dict.fromkeys(c or "-" for c in s["confirmed_by"])))
    row("  asked whether a person is there", lambda s: _yes(s["question_heard"]))
    row(
        "frames about the caller before confirmation",
        lambda s: sum(e or 0 for e in s["details_before_confirmation"]),
    )
    lines.append(
        f"  (event loop lag while these calls ran: p50 {lag['p50']:.1f} ms, "
        f"p99 {lag['p99']:.1f} ms; the classifier is scripted: its accuracy is not measured)"
    )
    lines += ["", "Targets (who answers):"]
    for name in names:
        for target, t in scenarios[name]["targets"].items():
            value = t["value"]
            shown = (
                "-"
                if value is None
                else (
                    f"{value:.3f} s" if target != "never_before_confirmation" else f"{value} frames"
                )
            )
            verdict = "met" if t["met"] else "missed"
            lines.append(f"  {name + ' ' + target:40} {shown:>12} ({t['rule']}): {verdict}")
    return lines


def _s(figure: dict[str, Any]) -> str:
    return "-" if figure["median"] is None else f"{figure['median']:.2f}"


def _yes(flags: list[bool]) -> str:
    return ",".join(dict.fromkeys("yes" if f else "no" for f in flags))


def _amd(seen: list[dict[str, Any]]) -> str:
    labels = [f"{a['category']}/{a['reason']}" if a else "-" for a in seen]
    return ",".join(dict.fromkeys(labels))


def machine() -> dict[str, Any]:
    try:
        from importlib.metadata import version

        agents = version("livekit-agents")
    except Exception:
        agents = "?"
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "livekit_agents": agents,
    }


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Main
# ──────────────────────────────────────────────────────────────────────────────────────────────


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/handoff_bench.py",
        description="Measure the silence in a phone handoff: warm handoff vs sequential vs seed.",
    )
    d = Knobs()
    p.add_argument("--calls", type=int, default=3, help="calls per ordering (default 3)")
    p.add_argument("--llm-ttft", type=float, default=d.llm_ttft, help="LLM time to first token, s")
    p.add_argument("--tts-ttfa", type=float, default=d.tts_ttfa, help="TTS time to first audio, s")
    p.add_argument("--ring", type=float, default=d.ring, help="the human's phone rings this long")
    p.add_argument("--hello", type=float, default=d.hello, help="hello ends this long after pickup")
    p.add_argument("--decide", type=float, default=d.decide, help="keypress this long after brief")
    p.add_argument("--stt-final", type=float, default=d.stt_final, help="STT final after speech, s")
    p.add_argument("--chars-per-second", type=float, default=d.chars_per_second, help="TTS rate")
    p.add_argument("--stagger", type=float, default=0.1, help="seconds between call starts")
    p.add_argument("--probe-calls", type=int, default=8, help="calls for RSS per call")
    p.add_argument(
        "--worker-rounds", type=int, default=1, help="repeat the worker processes (precision)"
    )
    p.add_argument("--capacity-budget", type=float, default=8.0, help="seconds for the ramp")
    p.add_argument("--no-worker", action="store_true", help="skip the worker processes")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity ramp")
    p.add_argument("--quick", action="store_true", help="tiny latencies, a few seconds; smoke test")
    p.add_argument(
        "--scenarios",
        type=scenario_names,
        default=ANSWERS,
        help=f"who answers the human's phone: all (default), none, or some of {','.join(ANSWERS)}",
    )
    p.add_argument(
        "--no-phrase-cache", action="store_true", help="warm handoff: every sentence live"
    )
    p.add_argument("--out", type=Path, default=OUT, help="directory for results.json")
    p.add_argument("--png", type=Path, default=PNG, help="timeline image (needs matplotlib)")
    p.add_argument("--no-png", action="store_true", help="do not draw the timeline")
    p.add_argument("--verbose", action="store_true", help="show the framework's warnings")
    return p.parse_args(argv)


def scenario_names(value: str) -> tuple[str, ...]:
    if value == "all":
        return ANSWERS
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in ANSWERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; known: {ANSWERS}")
    return names


def knobs_from(args: argparse.Namespace) -> Knobs:
    if args.quick:
        return QUICK
    return replace(
        Knobs(),
        llm_ttft=args.llm_ttft,
        tts_ttfa=args.tts_ttfa,
        ring=args.ring,
        hello=args.hello,
        decide=args.decide,
        stt_final=args.stt_final,
        chars_per_second=args.chars_per_second,
    )


async def measure_all(args: argparse.Namespace, knobs: Knobs) -> dict[str, Any]:
    # as a job process starts in production: the forkserver's warm-up, then its gc.freeze() (so
    # no collection walks the import-time heap: 100+ ms pauses otherwise), then the prewarm
    import livekit.agents.ipc._preload  # noqa: F401
    import livekit.agents.ipc._preload_freeze  # noqa: F401
    from livekit.plugins import silero

    vad = silero.VAD.load()  # what warm_handoff.prewarm does once per process
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    stagger = 0.0 if args.quick else args.stagger
    with tempfile.TemporaryDirectory(prefix="bench-phrases-") as folder:
        phrase_cache = "" if args.no_phrase_cache else folder
        first = None
        if phrase_cache:  # a new host's first call: nothing saved yet
            first = await run_call(WARM, knobs, vad, phrase_cache=phrase_cache)
        by, lag = await latency_phase(knobs, args.calls, vad, stagger, phrase_cache)
        phases["calls"], mark = time.perf_counter() - mark, time.perf_counter()
        answered: list[AnswerCall] = []
        if args.scenarios:
            answered, answer_lag = await answer_phase(
                knobs,
                args.calls,
                vad,
                args.scenarios,
                stagger,
                phrase_cache,
                ring=knobs.ring if args.quick else None,
            )
            phases["answers"], mark = time.perf_counter() - mark, time.perf_counter()
    report = summarise(by, knobs)
    report["phrase_cache"] = bool(phrase_cache)
    if first is not None:
        report["first_call"] = first_call(measure(first, knobs), first.outcome)
    report["loop_lag_during_calls_ms"] = lag
    if answered:
        report["answers"] = {
            "scenarios": summarise_answers(answered),
            "loop_lag_ms": answer_lag,
            "classifier": "scripted (mailbox words -> machine-vm, else human): accuracy not "
            "measured",
            "rings": "as each scenario says (4 s, the voicemail 22 s, the PBX 0 s)"
            + (f", at most {knobs.ring:g} s (--quick)" if args.quick else ""),
        }
    report["traces"] = by
    report["phases_s"] = phases
    if not args.no_capacity:
        capacity = await measure_capacity(
            vad,
            knobs,
            budget=1.0 if args.quick else args.capacity_budget,
            start=1 if args.quick else 8,
            settle=0.2 if args.quick else 0.8,
            window=0.5 if args.quick else 1.4,
        )
        report["capacity"] = asdict(capacity)
        phases["capacity"] = time.perf_counter() - mark
    return report


@contextlib.contextmanager
def self_hosted() -> Iterator[None]:
    """Measure a self-hosted worker (``start``): outside LiveKit Cloud and dev/console mode the
    framework's default turn detector is the local model, not the cloud one."""
    cloud = ("LIVEKIT_DEV_MODE", "LIVEKIT_REMOTE_EOT_URL")
    saved = {k: os.environ.pop(k) for k in cloud if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    with self_hosted():
        return _main(parse(argv))


def _main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    knobs = knobs_from(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    report = asyncio.run(measure_all(args, knobs))
    traces: dict[str, list[Trace]] = report.pop("traces")
    workers = None
    if not args.no_worker:  # after the rest, so the machine is otherwise idle
        mark = time.perf_counter()
        runs = memory_probes(args.probe_calls, args.quick, args.worker_rounds)
        workers = worker_figures(runs)
        report["worker"] = workers
        report["phases_s"]["worker"] = time.perf_counter() - mark
    report["config"] = {"calls": args.calls, "quick": args.quick, **asdict(knobs)}
    report["machine"] = machine()
    report["machine"]["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    report["targets"] = targets(report, knobs, workers)
    if not args.no_png:
        from bench.timeline import draw

        mark = time.perf_counter()
        report["timeline_png"] = draw(traces, knobs, args.png)
        report["phases_s"]["png"] = time.perf_counter() - mark
    report["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(
            f"\nNote: the machine was already busy (1-minute load average {load_before:.2f} "
            "at the start); the figures may be inflated. Run it again on a quiet machine."
        )
    print(
        f"\nWrote {args.out / 'results.json'}"
        + (f" and {report['timeline_png']}" if report.get("timeline_png") else "")
        + f" in {report['elapsed_s']:.0f} s on {report['machine']['nproc']} cores, "
        f"Python {report['machine']['python']}."
    )
    return report


if __name__ == "__main__":
    main()
