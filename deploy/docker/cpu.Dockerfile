# syntax=docker/dockerfile:1
# OpenRL, CPU image: every process (`openrl gateway|trainer|sampler|rewarder|nats|up`).
#
#   docker build -f deploy/docker/cpu.Dockerfile -t openrl:0.1.0-cpu .     # from the repository root
#   docker run --rm -p 8000:8000 -v openrl-data:/data openrl:0.1.0-cpu      # `openrl up`, the whole stack
#
# torch is pinned as scripts/install.sh pins it (2.13.0), from the PyTorch CPU index so pip
# never pulls a CUDA build. The default model (openrl/tiny-qwen3, built offline) is baked
# into /opt/openrl/hf; the kustomize dev-cpu overlay copies it into each pod's HF cache.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY openrl ./openrl
RUN pip install . && pip check

FROM ${PYTHON_IMAGE} AS runtime
ARG PREPARE_DEFAULT_MODEL=1
RUN groupadd --system --gid 10001 openrl \
 && useradd --system --uid 10001 --gid openrl --home-dir /home/openrl --create-home openrl \
 && mkdir -p /data /cache/huggingface /opt/openrl/hf \
 && chown openrl:openrl /data /cache/huggingface /opt/openrl/hf
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    OPENRL_DATA_DIR=/data
USER 10001:10001
# A few minutes on the build machine's CPU, once; pods then start without building it.
RUN if [ "$PREPARE_DEFAULT_MODEL" = "1" ]; then HF_HOME=/opt/openrl/hf HF_HUB_OFFLINE=1 openrl prepare; fi
WORKDIR /home/openrl
# The HF cache (model weights) and the data dir (`openrl up` / `openrl nats` state).
VOLUME ["/cache/huggingface", "/data"]
EXPOSE 8000 4222
ENTRYPOINT ["openrl"]
CMD ["up", "--host", "0.0.0.0"]
