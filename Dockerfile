# The relay image: `docker build -t outbox-relay .`
# Runs `outbox relay` as an unprivileged user; every setting comes from
# OUTBOX_* variables, *_FILE variables or OUTBOX_SECRETS_DIR (docs/configuration.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox/ outbox/
COPY migrations/ migrations/
# No extra needed: prometheus-client (/metrics on the HTTP port) is a dependency.
RUN pip install . && rm -rf /src

# A numeric UID, so that Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin outbox
USER 10001:10001
WORKDIR /tmp

ENV OUTBOX_HTTP_PORT=9464 \
    OUTBOX_LOG_FORMAT=json
EXPOSE 9464

# Exec form: `outbox` is PID 1 and receives SIGTERM itself (no shell in between),
# finishes the batch in flight and releases its partitions.
ENTRYPOINT ["outbox"]
CMD ["relay"]
