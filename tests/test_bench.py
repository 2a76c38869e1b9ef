"""The handoff benchmark runs end to end for one call of each ordering and of each answer
scenario (who picks up the human's phone), so it cannot rot.

Only the shape of its output is checked: no timing is asserted (the figures belong in
bench/README.md, measured on a stated machine).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDERINGS = ("warm handoff", "sequential", "seed")
METRICS = {"greeting", "announce", "longest_silence", "human_wait", "overhead"}
ANSWERS = {"person": "connected", "long_greeting": "connected", "voicemail": "voicemail"}
ANSWERS |= {"pbx": "connected", "silent": "connected"}  # who answers -> how the handoff ends


@pytest.mark.slow
def test_bench_measures_every_figure_for_every_ordering(tmp_path):
    png = tmp_path / "timeline.png"
    drawing = importlib.util.find_spec("matplotlib") is not None  # requirements-bench.txt
    command = [
        sys.executable,
        str(ROOT / "bench" / "handoff_bench.py"),
        "--quick",
        "--calls",
        "1",
        "--out",
        str(tmp_path),
        "--png",
        str(png),
    ] + ([] if drawing else ["--no-png"])
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    for ordering in ORDERINGS:
        assert ordering in run.stdout  # the table names every ordering

    report = json.loads((tmp_path / "results.json").read_text())
    for ordering in ORDERINGS:
        measured = report["orderings"][ordering]
        assert measured["outcomes"] == ["connected"], ordering
        assert set(measured["metrics"]) == METRICS
        for name, figure in measured["metrics"].items():
            assert set(figure) == {"median", "p90", "values"}
            if not (ordering == "seed" and name == "human_wait"):  # the seed has no brief
                assert figure["median"] is not None, (ordering, name)
    first = report["first_call"]  # a new host's first call, before the phrase cache has them
    assert first["outcome"] == "connected"
    assert first["greeting"] is not None and first["announce"] is not None
    assert set(report["targets"]) >= {"greeting_later_call", "announce_later_call"}
    assert set(report["ratios"]) == {"sequential", "seed"}
    sequential = report["orderings"]["sequential"]  # its own order, not the project's:
    dialled = sequential["detail"]["dial_delay"]["median"]  # it dials once it has announced
    assert dialled > sequential["metrics"]["announce"]["median"]
    assert set(report["ratios"]["sequential"]) == METRICS
    assert set(report["targets"]) >= METRICS | {"worker_ready", "rss_per_call_handoff"}
    for agent in ("warm handoff", "seed"):
        worker = report["worker"][agent]
        assert worker["ready"]["ready_wall_s"] is not None
        assert worker["ready"]["peak_rss_mb"] is not None
        assert set(worker["per_call"]) >= {"talking_mb_per_call", "handoff_mb_per_call"}
    assert report["capacity"]["steps"]
    assert report["machine"]["nproc"]
    assert png.exists() == drawing

    # who answers the human's phone: every scenario reports its figures
    assert "Who answers" in run.stdout
    answers = report["answers"]["scenarios"]
    assert set(answers) == set(ANSWERS)
    for name, outcome in ANSWERS.items():
        measured = answers[name]
        assert measured["outcomes"] == [outcome], name
        figures = measured["figures"]
        assert figures["opener"]["median"] is not None, name  # everyone hears the opener
        assert measured["details_before_confirmation"] == [0], name  # a safety rule, not timing
        if outcome == "voicemail":
            assert figures["details"]["median"] is None  # nothing about the caller
        else:
            assert figures["details"]["median"] is not None, name
            assert figures["details_after_ready"]["median"] is not None, name
            assert figures["confirmed"]["median"] is not None, name
        if name != "silent":  # a silent line gets no verdict: a key press confirms the person
            assert figures["vad_end"]["median"] is not None, name
            assert figures["verdict"]["median"] is not None, name
            assert measured["amd"][0]["category"] == (
                "human" if outcome != "voicemail" else "machine-vm"
            )
        assert set(measured["targets"]) >= {"opener", "never_before_confirmation"}
    assert "details_after_hello" in answers["person"]["targets"]  # issue 19's, for a person
