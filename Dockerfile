# archsync processes (capture, worker, init). Built by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# README* is optional: the glob lets the build succeed before a README exists.
COPY pyproject.toml README* ./
COPY archsync ./archsync
COPY connectors ./connectors
COPY processors ./processors
COPY schemas ./schemas
COPY topology ./topology

RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin archsync

USER archsync

# Prometheus metrics (ARCHSYNC_METRICS_PORT).
EXPOSE 9400

CMD ["archsync", "--help"]
