# syntax=docker/dockerfile:1
# The public swarm health dashboard: crawls the DHT, probes peers, serves a page and a JSON API.
# Build from the repository root:
#   docker build -f deploy/docker/dashboard.Dockerfile -t brigade-dashboard .
# Configure with BRIGADE_INITIAL_PEERS, BRIGADE_HOST, BRIGADE_PORT (flags of `brigade dashboard`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# brigade depends on torch; the dashboard never computes, so the small CPU-only build does.
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
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.0-1+b3" \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin brigade \
    && mkdir -p /data /swarm \
    && chown brigade:brigade /data /swarm
COPY --from=build /opt/brigade/venv /opt/brigade/venv
ENV PATH=/opt/brigade/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIGADE_HOST=0.0.0.0 \
    BRIGADE_PORT=8080
USER 10001:10001
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "brigade.deploy.healthcheck", "http"]
ENTRYPOINT ["tini", "--", "python", "-m", "brigade.deploy.entrypoint"]
CMD ["dashboard"]
