# smtpgate - the internet-facing SMTP front end, in front of Postfix.
#
#   docker build -t smtpgate .
#   docker run -p 25:25 -p 587:587 -e REDIS=redis://redis:6379/0 \
#       -e HOSTNAME=mx.example.com -e LETSENCRYPT=mx.example.com \
#       -v /etc/letsencrypt:/etc/letsencrypt:ro \
#       -e SMTPGATE_NEXT_HOP=postfix:10025 smtpgate
#
# Settings: the environment (see conf/smtpgate.toml for every key), or a TOML
# file mounted and named by SMTPGATE_CONFIG. The process runs as an unprivileged
# user (uid 10025); binding ports 25 and 587 relies on Docker's default
# net.ipv4.ip_unprivileged_port_start=0 inside the container.

# Python 3.13: from 3.12 on, asyncio's get_running_loop() no longer calls getpid() on every
# call (cpython#100363); on 3.11 that cost ~70 syscalls per relayed message.
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY smtpgate ./smtpgate
COPY conf/smtpgate.toml /etc/smtpgate/smtpgate.toml
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10025 smtpgate \
    && useradd --system --uid 10025 --gid 10025 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin smtpgate

WORKDIR /
USER 10025:10025

EXPOSE 25 587 465

# Healthy while this worker can reach Redis and is not draining: /healthz on the metrics
# listener (SMTPGATE_METRICS_LISTEN, 127.0.0.1:9425 by default) answers 200, else 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9425/healthz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpgate"]
CMD ["serve"]
