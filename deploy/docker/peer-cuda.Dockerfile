# syntax=docker/dockerfile:1
# A brigade peer for NVIDIA GPUs. The host needs the NVIDIA driver and the NVIDIA Container Toolkit
# (`docker run --gpus all ...`); the CUDA runtime comes inside torch's wheels.
# Build from the repository root:
#   docker build -f deploy/docker/peer-cuda.Dockerfile -t brigade-peer-cuda .
# Configure with BRIGADE_* variables, one per flag of `brigade peer run` (see docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Linux wheels of torch on PyPI are CUDA builds; set TORCH_INDEX to pick another CUDA version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
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
    && mkdir -p /data /cache /swarm \
    && chown brigade:brigade /data /cache /swarm
COPY --from=build /opt/brigade/venv /opt/brigade/venv
COPY --from=build /src/brigade/kernels/default_model/brigade-tiny-stdlib /opt/brigade/models/brigade-tiny-stdlib
ENV PATH=/opt/brigade/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BRIGADE_HOST=0.0.0.0 \
    BRIGADE_PORT=31330 \
    BRIGADE_DHT_LISTEN=/ip4/0.0.0.0/tcp/31331 \
    BRIGADE_IDENTITY=/data/identity.key \
    BRIGADE_DEVICE=cuda \
    BRIGADE_DTYPE=bfloat16
VOLUME ["/data", "/cache"]
USER 10001:10001
WORKDIR /data
EXPOSE 31330 31331
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "brigade.deploy.healthcheck", "peer"]
ENTRYPOINT ["tini", "--", "python", "-m", "brigade.deploy.entrypoint"]
CMD ["peer", "run"]
