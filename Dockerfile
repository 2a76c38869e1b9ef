# syntax=docker/dockerfile:1
# The Warm Handoff worker, in the layout of LiveKit's Python agent template
# (livekit-cli pkg/agentfs/examples/python.pip.Dockerfile). Configuration comes from the
# environment at run time; no .env or secret is baked into the image. See "Deploy" in docs/wiring-sip.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The worker runs as an unprivileged user.
ARG UID=10001
RUN adduser \
    --disabled-password \
    --gecos "" \
    --home "/home/appuser" \
    --shell "/sbin/nologin" \
    --uid "${UID}" \
    appuser

WORKDIR /home/appuser

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
# Every pinned package ships a manylinux wheel, so no compiler is needed.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# Callback requests and the webhook outbox: mount a volume here (see "Deploy" in docs/wiring-sip.md);
# a new named volume takes this folder's owner.
RUN mkdir -p /var/lib/warm-handoff && chown appuser:appuser /var/lib/warm-handoff

USER appuser

# Fetch the plugins' model files at build time, so a new worker starts without downloading.
# (`python warm_handoff.py download-files` does the same but is deprecated since
# livekit-agents 1.5.10.)
RUN python -m livekit.agents download-files

COPY --chown=appuser:appuser warm_handoff.py ./

# Health check: GET / on 8081 answers "OK" while the worker is connected to LiveKit.
EXPOSE 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/', timeout=4)"]

# Exec form: python is PID 1 and gets SIGTERM itself, so `docker stop` drains active calls.
CMD ["python", "warm_handoff.py", "start"]
