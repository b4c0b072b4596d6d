# syntax=docker/dockerfile:1
# The qaserve image, built from an image context that `make docker` (or `make release`, for both devices) writes:
# this file, the two wheels of VERSION, constraints.txt (every dependency's exact version) and the embedded model.
# DEVICE=cpu: ONNX Runtime, no torch; DEVICE=cuda: torch and ONNX Runtime on CUDA (run with --gpus all).
# A build stage installs the wheels and their pinned dependencies into a virtual environment; the final stage holds
# that environment and the embedded model (with its int8 model.onnx), nothing to build with, as an unprivileged user.
# The export target (`make docker-export`) is `qaserve export` on CPU torch instead: it turns a checkpoint into the
# ONNX directory the CPU image serves (docs/models.md, deploy/k8s/components/model-export).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cpu or cuda: picks the base stage below, and whether torch is installed at all. The image context sets the
# defaults of DEVICE, VERSION and REVISION (make docker, make release), so a bare `docker build CONTEXT` builds it.
ARG DEVICE=cpu
ARG VERSION=unknown
ARG REVISION=unknown
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${PYTHON_IMAGE} AS base-cuda
# The CUDA runtime libraries come with the CUDA torch wheel and onnxruntime-gpu (their nvidia-* dependencies); the
# NVIDIA container toolkit mounts the host's driver into containers that ask for it with these.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The wheels and an empty virtual environment, for the build stages below.
FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/qaserve/venv
WORKDIR /src
COPY constraints.txt ./
COPY wheels/ wheels/

FROM wheels AS build
ARG DEVICE
ARG VERSION
ARG TORCH_VERSION
# The PyTorch wheel index a CUDA build takes torch from: cu130, cu128, ... (one that offers TORCH_VERSION). cu130
# is the CUDA 13 that onnxruntime-gpu 1.31 loads, so both use one set of CUDA libraries.
ARG CUDA_WHEEL=cu130
# CPU: the server's [cpu] extra, ONNX Runtime; the embedded model serves on its model.onnx, so no torch.
# CUDA: torch alone from the PyTorch index's CUDA wheels, then the server's [torch,cuda] extras (onnxruntime-gpu
# with the CUDA and cuDNN libraries it loads); pip installs torch's own dependencies (the CUDA runtime libraries)
# from PyPI. Everything else at the versions constraints.txt pins.
RUN client="wheels/qaserve_client-${VERSION}-py3-none-any.whl" server="wheels/qaserve-${VERSION}-py3-none-any.whl" \
    && if [ "${DEVICE}" = "cuda" ]; then \
        /opt/qaserve/venv/bin/pip install --no-deps --index-url "https://download.pytorch.org/whl/${CUDA_WHEEL}" \
            "torch==${TORCH_VERSION}" \
        && /opt/qaserve/venv/bin/pip install --constraint constraints.txt "${client}" "${server}[torch,cuda]"; \
    else \
        /opt/qaserve/venv/bin/pip install --constraint constraints.txt "${client}" "${server}[cpu]"; \
    fi \
    && /opt/qaserve/venv/bin/pip uninstall --yes pip \
    && find /opt/qaserve/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# `qaserve export` needs torch but no GPU: torch from the PyTorch index's CPU wheels (without the CUDA libraries
# PyPI's torch brings), then the server's [cpu,torch] extras.
FROM wheels AS export-build
ARG VERSION
ARG TORCH_VERSION
RUN /opt/qaserve/venv/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" \
    && /opt/qaserve/venv/bin/pip install --constraint constraints.txt \
        "wheels/qaserve_client-${VERSION}-py3-none-any.whl" "wheels/qaserve-${VERSION}-py3-none-any.whl[cpu,torch]" \
    && /opt/qaserve/venv/bin/pip uninstall --yes pip \
    && find /opt/qaserve/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# The export target, qaserve:VERSION-export, as an unprivileged user: `docker run --rm -v "$PWD:/work"
# qaserve:VERSION-export /work/CHECKPOINT /work/OUT --quantize int8`; a hub id downloads into /tmp/huggingface.
FROM ${PYTHON_IMAGE} AS export
COPY --from=export-build /opt/qaserve/venv /opt/qaserve/venv
ENV PATH=/opt/qaserve/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["qaserve", "export"]

# base-cpu or base-cuda, stages above (tagged there), which hadolint cannot resolve.
# hadolint ignore=DL3006
FROM base-${DEVICE} AS runtime
ARG VERSION
ARG REVISION
LABEL org.opencontainers.image.title="qaserve" \
      org.opencontainers.image.description="gRPC server for extractive question answering" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/qaserve/qaserve" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 qaserve \
    && useradd --system --uid 10001 --gid qaserve --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin qaserve
COPY --from=build /opt/qaserve/venv /opt/qaserve/venv
COPY models/ /opt/qaserve/models/
# Everything the server reads is root's and read-only to it; it writes nothing but, where a hub id is
# configured, the Hugging Face cache under /tmp (a writable emptyDir when the root filesystem is read-only).
ENV PATH=/opt/qaserve/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface \
    QASERVE_MODEL=/opt/qaserve/models/minilm-l6-squadshifts
WORKDIR /tmp
USER 10001:10001
# gRPC, Prometheus /metrics (9464: 9090 is the Prometheus server's own).
EXPOSE 50051 8080 9464
# For docker and compose; Kubernetes probes use gRPC health natively (deploy/k8s). Under TLS set QASERVE_CA_FILE
# (and QASERVE_SERVER_NAME when the certificate does not name localhost) for this check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["qaserve-client", "--target", "localhost:50051", "--timeout", "3", "health"]
ENTRYPOINT ["qaserve"]
CMD ["serve"]
