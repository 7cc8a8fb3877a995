# syntax=docker/dockerfile:1
# OpenRL, CUDA image: the same processes with a CUDA build of torch and the `vllm` extra.
#
#   docker build -f deploy/docker/cuda.Dockerfile -t openrl:0.1.0-cuda .    # from the repository root
#
# torch is the one vLLM pins (vLLM is compiled against it), from PyPI, whose Linux x86_64
# torch wheels are CUDA builds carrying their CUDA runtime as pip packages (nvidia-*-cu12):
# the image needs only the host's NVIDIA driver, which the NVIDIA container toolkit mounts
# into GPU pods. `pip install --dry-run ".[vllm]"` resolved (Nov 2026) to vllm 0.11.2 with
# torch 2.9.0, a CUDA 12.8 build: NVIDIA driver >= 570. EXTRAS= (empty) builds without vLLM
# (the transformers sampler backend), with the newest torch the project allows.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=vllm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY openrl ./openrl
# The project itself is the thing installed here, its dependencies pinned by pyproject.toml.
# hadolint ignore=DL3013
RUN if [ -n "$EXTRAS" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi \
 && pip check \
 && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build: ' + torch.__version__"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 openrl \
 && useradd --system --uid 10001 --gid openrl --home-dir /home/openrl --create-home openrl \
 && mkdir -p /data /cache/huggingface \
 && chown openrl:openrl /data /cache/huggingface
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    OPENRL_DATA_DIR=/data \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/openrl
VOLUME ["/cache/huggingface", "/data"]
EXPOSE 8000 4222
ENTRYPOINT ["openrl"]
CMD ["up", "--host", "0.0.0.0"]
