# syntax=docker/dockerfile:1
# Aquila node image: `docker build -t aquila:latest .`, then `docker compose up` (compose.yaml).
# It listens on 0.0.0.0, so it refuses to start without a cluster secret (production mode):
#   docker run -e AQUILA_CLUSTER_SECRET=$(openssl rand -hex 32) -p 127.0.0.1:8470:8470 aquila:latest
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . /src
RUN pip install . \
    && rm -rf /src

RUN groupadd --system --gid 10001 aquila \
    && useradd --system --uid 10001 --gid aquila --home-dir /data --no-create-home aquila \
    && mkdir -p /data \
    && chown aquila:aquila /data

ENV AQUILA_HOST=0.0.0.0 \
    AQUILA_PORT=8470 \
    AQUILA_DATA=/data

WORKDIR /data
USER aquila:aquila
VOLUME /data

# HTTP on TCP, gossip on UDP: same port number.
EXPOSE 8470/tcp 8470/udp

# No curl in slim images: probe with the standard library. /healthz needs no key.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AQUILA_PORT', '8470'), timeout=2)"]

ENTRYPOINT ["aquila"]
CMD ["serve"]
