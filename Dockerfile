# syntax=docker/dockerfile:1
#
# mongo-broker, the sidecar image. Build from the repository root:
#
#   docker build -t mongo-broker:0.1.0 .
#
# The base image is pinned by tag. For byte-for-byte rebuilds pin the digest
# as well: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>.
#
# tests/test_deploy.py runs this file's COPY and pip steps without Docker
# (same files, same commands, a fresh virtualenv), so the install path below
# is the one the test suite exercises. Change them together.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: wheels for both packages and every dependency, at the pinned versions
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the two packages are built from: the build context has no tests,
# benchmarks or virtualenvs (.dockerignore), and editing those keeps this cache.
COPY constraints.txt pyproject.toml README.md ./
COPY clients/python/ clients/python/
COPY broker/ broker/
# Every dependency ships a manylinux wheel for 3.11, so no compiler is needed
# here either; a missing wheel fails the build instead of compiling silently.
RUN pip wheel -c constraints.txt --wheel-dir /wheels ./clients/python .

# --- the image: the wheels installed offline, no build tools, no pip cache
FROM ${PYTHON_IMAGE}

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mongo-broker" \
      org.opencontainers.image.description="A sidecar connection broker for MongoDB: many short-lived workers, one bounded pool, over gRPC." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MONGO_BROKER_CONFIG=/etc/mongo-broker/broker.toml

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and a
# pod's fsGroup can share the socket's group with the app container.
RUN groupadd --system --gid 10001 mongo-broker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mongo-broker \
 && install -d -o 10001 -g 10001 -m 0750 /run/mongo-broker

# The wheels are bind-mounted, not copied: they never become a layer. With
# --no-index the only candidates are the wheels just built at the pinned
# versions, so pinning mongo-broker again here (DL3013) would only drift.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels mongo-broker

# Defaults for a container. A file mounted over this one (a Kubernetes
# ConfigMap) replaces it; MONGO_BROKER_<SECTION>__<KEY> variables override
# single keys, so `docker run -e MONGO_BROKER_DATABASES__appdb__URI=...`
# is enough to start.
COPY --chmod=0644 <<EOF /etc/mongo-broker/broker.toml
[listen]
unix = "/run/mongo-broker/broker.sock"

[health]
tcp = "0.0.0.0:8081"

[metrics]
listen = "0.0.0.0:9464"
EOF

USER 10001:10001
# 8081: grpc.health.v1 for probes; 9464: Prometheus GET /metrics.
EXPOSE 8081 9464
# The broker drains on SIGTERM for up to server.shutdown_grace_s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mongo-broker", "health", "--timeout", "3"]
ENTRYPOINT ["mongo-broker"]
CMD ["serve"]
