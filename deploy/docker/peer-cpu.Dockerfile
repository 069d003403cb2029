# syntax=docker/dockerfile:1
# A brigade peer for machines without a GPU; the same image runs a bootstrap node (command: dht).
# Build from the repository root:
#   docker build -f deploy/docker/peer-cpu.Dockerfile -t brigade-peer-cpu .
# Configure with BRIGADE_* variables, one per flag of `brigade peer run` (see docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch first, from its CPU-only wheel index: the default one would pull a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/brigade/venv
ENV PATH=/opt/brigade/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY . /src/brigade
RUN pip install /src/brigade

FROM ${PYTHON_IMAGE}
# tini is PID 1: it forwards SIGTERM (the peer drains) and reaps hivemind's forked children.
# Pinned to the one version in the base image's Debian release (bookworm).
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.0-1+b3" \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin brigade \
    && mkdir -p /data /cache /swarm \
    && chown brigade:brigade /data /cache /swarm
COPY --from=build /opt/brigade/venv /opt/brigade/venv
COPY --from=build /src/brigade/kernels/default_model/brigade-tiny-stdlib /opt/brigade/models/brigade-tiny-stdlib
ENV PATH=/opt/brigade/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    HF_HOME=/cache/huggingface \
    BRIGADE_HOST=0.0.0.0 \
    BRIGADE_PORT=31330 \
    BRIGADE_DHT_LISTEN=/ip4/0.0.0.0/tcp/31331 \
    BRIGADE_IDENTITY=/data/identity.key \
    BRIGADE_DEVICE=cpu
# /data: the identity key (the same peer id across restarts); /cache: downloaded checkpoints.
VOLUME ["/data", "/cache"]
USER 10001:10001
WORKDIR /data
EXPOSE 31330 31331
# A peer is healthy when it answers its Info RPC; loading a big model can take minutes.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "brigade.deploy.healthcheck", "peer"]
ENTRYPOINT ["tini", "--", "python", "-m", "brigade.deploy.entrypoint"]
CMD ["peer", "run"]
