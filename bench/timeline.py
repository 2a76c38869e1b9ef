"""Draw one call of each ordering on one time axis (0 = the model's transfer decision): what the
caller hears, the human's phone, what the human says and hears. Needs matplotlib
(``requirements-bench.txt``); without it ``draw`` returns None."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.calls import ORDERINGS, SEED, caller_audible, label_of, measure, spans
from bench.sim import Knobs, Trace, hold_intervals

COLOURS = {
    "greeting": "#4c72b0",
    "please hold": "#dd8452",
    "connected": "#55a868",
    "speech": "#8c8c8c",
    "hold": "#b8a9d9",
    "ringing": "#f2c94c",
    "hello": "#937860",
    "brief": "#2a9d8f",
    "opener": "#8ab17d",
    "silence": "#d62728",
}
LANES = ("caller hears", "human's phone", "human says", "human hears")


def _pick(traces: list[Trace]) -> Trace | None:
    done = [t for t in traces if t.decision is not None and t.merged is not None]
    return done[0] if done else (traces[0] if traces else None)


def _gaps(trace: Trace, start: float, end: float, at_least: float) -> list[tuple[float, float]]:
    gaps, cursor = [], start
    for a, b in sorted(caller_audible(trace)):
        if b <= cursor:
            continue
        if a >= end:
            break
        if a - cursor >= at_least:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if end - cursor >= at_least:
        gaps.append((cursor, end))
    return gaps


def _panel(ax: Any, trace: Trace, knobs: Knobs) -> None:
    zero = trace.decision or trace.present or 0.0
    y = {lane: len(LANES) - 1 - i for i, lane in enumerate(LANES)}

    def bar(lane: str, start: float, end: float, colour: str, text: str = "", **kw: Any) -> None:
        ax.broken_barh(
            [(start - zero, max(end - start, 0.02))], (y[lane] - 0.35, 0.7), color=colour, **kw
        )
        if text and end - start > 0.6:
            ax.text(
                (start + end) / 2 - zero, y[lane], text, ha="center", va="center",
                fontsize=7.5, color="white", clip_on=True,
            )  # fmt: skip

    for start, end, text in spans(trace.caller_ear):
        label = label_of(text)
        bar("caller hears", start, end, COLOURS[label], label)
        if label == "connected" and end - start <= 0.6:  # the call is measured until it starts
            ax.annotate(
                '"You\'re now connected..."', (end - zero + 0.15, y["caller hears"]),
                fontsize=7.5, va="center", color=COLOURS["connected"],
            )  # fmt: skip
    for start, end in hold_intervals(trace, trace.ended or zero):
        bar("caller hears", start, end, COLOURS["hold"], "hold audio", hatch="//", alpha=0.9)
    metrics = measure(trace, knobs)
    if trace.decision is not None:
        end = trace.ended or trace.decision
        if trace.merged is not None:
            heard = trace.caller_ear.heard
            after = [h.start for h in heard if h.audible and h.start >= trace.merged]
            end = after[0] if after else end
        for start, stop in _gaps(trace, trace.decision, end, 0.15):
            bar("caller hears", start, stop, COLOURS["silence"], "silence", alpha=0.35)
    if trace.dial_start is not None:
        answered = trace.answered or trace.dial_start
        bar("human's phone", trace.dial_start, answered, COLOURS["ringing"], "ringing")
    if trace.hello_start is not None:
        bar("human says", trace.hello_start, trace.hello_end or trace.hello_start,
            COLOURS["hello"])  # fmt: skip
        ax.annotate(
            '"Hello?"', (trace.hello_start - zero, y["human says"] + 0.38), fontsize=7.5,
            ha="left", va="bottom",
        )  # fmt: skip
        if trace.ordering == SEED:
            bar("caller hears", trace.hello_start, trace.hello_end or trace.hello_start,
                COLOURS["hello"])  # fmt: skip
    if trace.keypress is not None:
        ax.plot([trace.keypress - zero], [y["human says"]], marker="s", color="black", ms=5)
        ax.annotate("presses 1", (trace.keypress - zero, y["human says"] + 0.38), fontsize=7.5)
    if trace.ordering == SEED:
        heard = spans(trace.caller_ear, since=trace.answered or 0.0)
        for start, end, text in heard:
            bar("human hears", max(start, trace.answered or start), end,
                COLOURS[label_of(text)], "the caller's room")  # fmt: skip
    else:
        for start, end, _ in spans(trace.human_ear):
            bar("human hears", start, end, COLOURS["brief"], "brief")
    if trace.opener is not None:  # nothing about the caller until a person is confirmed
        bar("human hears", *trace.opener, COLOURS["opener"], "opener")
    if metrics.human_wait and trace.hello_end is not None:
        end = trace.opener[0] if trace.opener else trace.hello_end + metrics.human_wait
        bar("human hears", trace.hello_end, end, COLOURS["silence"], alpha=0.35)
        ax.annotate(
            f"to the brief {metrics.human_wait:.2f} s", (trace.hello_end - zero,
            y["human hears"] + 0.38), fontsize=7.5, ha="left", va="center", color="#8b0000",
        )  # fmt: skip
    ax.axvline(0, color="black", lw=1)
    ax.annotate("decision", (0, len(LANES) - 0.45), fontsize=7.5, ha="left", va="bottom")
    if trace.merged is not None:
        ax.axvline(trace.merged - zero, color=COLOURS["connected"], lw=1, ls="--")
        ax.annotate("merge", (trace.merged - zero, len(LANES) - 0.45), fontsize=7.5,
                    ha="left", va="bottom")  # fmt: skip
    ax.set_yticks([y[lane] for lane in LANES], LANES, fontsize=8.5)
    ax.set_ylim(-0.6, len(LANES) - 0.1)
    silence = "-" if metrics.longest_silence is None else f"{metrics.longest_silence:.2f} s"
    wait = "no brief" if metrics.human_wait is None else f"{metrics.human_wait:.2f} s"
    ax.set_title(
        f"{trace.ordering}: longest caller silence {silence}, human wait {wait}, "
        f"merge {(trace.merged or zero) - zero:.1f} s after the decision",
        fontsize=10, loc="left",
    )  # fmt: skip
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)


def draw(traces: dict[str, list[Trace]], knobs: Knobs, path: Path) -> str | None:
    """Draw the first completed call of each ordering; returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    picked = [(o, _pick(traces.get(o, []))) for o in ORDERINGS]
    picked = [(o, t) for o, t in picked if t is not None]
    if not picked:
        return None
    fig, axes = plt.subplots(len(picked), 1, figsize=(13, 2.6 * len(picked) + 0.6), sharex=True)
    axes = axes if len(picked) > 1 else [axes]
    for ax, (_, trace) in zip(axes, picked, strict=True):
        _panel(ax, trace, knobs)
    lefts = [(t.present or 0) - (t.decision or 0) for _, t in picked]
    rights = [(t.ended or 0) - (t.decision or 0) for _, t in picked]
    axes[-1].set_xlim(min(lefts) - 0.3, max(rights) + 3.0)  # room for the "connected" note
    axes[-1].set_xlabel("seconds from the model's transfer decision", fontsize=9)
    fig.suptitle(
        f"One simulated call per ordering (LLM first token {knobs.llm_ttft * 1000:.0f} ms, "
        f"TTS first audio {knobs.tts_ttfa * 1000:.0f} ms, ring {knobs.ring:g} s, "
        f"hello {knobs.hello:g} s, framework default endpointing)",
        fontsize=10.5,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
