"""Deploy: the Dockerfile and .dockerignore agree with the worker. Offline; no Docker needed."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ── Dockerfile and .dockerignore ────────────────────────────────────────────────────────────


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        steps.append((instruction.upper(), args.strip()))
    return steps


def first(steps: list[tuple[str, str]], instruction: str, pattern: str) -> int:
    for i, (ins, args) in enumerate(steps):
        if ins == instruction and re.search(pattern, args):
            return i
    raise AssertionError(f"Dockerfile has no {instruction} matching {pattern!r}")


def test_dockerfile_base_image_is_slim_python():
    steps = dockerfile()
    froms = [args for ins, args in steps if ins == "FROM"]
    assert froms, "Dockerfile has no FROM"
    assert re.fullmatch(r"python:3\.1\d+(\.\d+)?-slim(-\w+)?", froms[-1].split()[0]), froms[-1]


def test_dockerfile_runs_as_a_non_root_user():
    steps = dockerfile()
    users = [i for i, (ins, _) in enumerate(steps) if ins == "USER"]
    assert users, "Dockerfile has no USER"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), user
    assert users[-1] < first(steps, "CMD", ".")


def test_dockerfile_installs_dependencies_before_copying_the_code():
    steps = dockerfile()
    copy_requirements = first(steps, "COPY", r"(^|\s)requirements\.txt\s")
    install = first(steps, "RUN", r"pip install .*-r requirements\.txt")
    copy_code = first(steps, "COPY", r"(^|\s)(\.|warm_handoff\.py)\s+\S+$")
    assert copy_requirements < install < copy_code


def test_dockerfile_fetches_model_files_at_build():
    steps = dockerfile()
    download = first(steps, "RUN", r"download-files")
    assert first(steps, "RUN", r"pip install") < download


def test_dockerfile_starts_the_worker():
    cmds = [args for ins, args in dockerfile() if ins == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["python", "warm_handoff.py", "start"]


def test_dockerfile_bakes_in_no_secret():
    for ins, args in dockerfile():
        if ins in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", args), f"{ins} {args}"
        if ins in ("COPY", "ADD"):
            assert ".env" not in args.split(), f"{ins} {args}"


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, simplified: a pattern matches a path or one of its parent directories,
    '**/' matches any number of directories, the last matching pattern wins, '!' re-includes."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
            n = len(parts)
            candidates = ["/".join(parts[j : i + 1]) for i in range(n) for j in range(i + 1)]
        else:
            candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_secrets_envs_and_caches_out():
    patterns = dockerignore()
    for path in (".env", ".env.local", ".venv/bin/python", ".pytest_cache/v", "sip/__pycache__/x"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"
    assert ".env" in patterns


def test_dockerignore_keeps_what_the_image_copies():
    patterns = dockerignore()
    for ins, args in dockerfile():
        if ins == "COPY" and "--from" not in args:
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for source in sources:
                if source != ".":
                    assert not ignored(source, patterns), f".dockerignore drops {source}"
                    assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
