# hisa-serve: OpenAI-compatible long-prompt server with HISA sparse attention, on CUDA.
#
#   docker build -t hisa-serve .
#   docker run --gpus all -p 8000:8000 hisa-serve                       # embedded SmolLM2-135M, works offline
#   docker run --gpus all -p 8000:8000 \
#       -v ~/.cache/huggingface:/home/hisa/.cache/huggingface -e HF_TOKEN \
#       hisa-serve --model Qwen/Qwen2.5-7B-Instruct                      # any flag of `hisa-serve --help`
#
# Every hisa-serve flag is also an env var (HISA_MAX_MODEL_LEN, HISA_API_KEY, ...): `docker run -e ...`.
# The install steps live in docker/install.sh, which tests/test_docker.py also runs outside Docker.

# torch 2.11 + CUDA 12.8 + cuDNN 9 + Triton, Python 3.11 (conda in /opt/conda)
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

LABEL org.opencontainers.image.title="hisa-serve" \
      org.opencontainers.image.description="OpenAI-compatible server for very long prompts on one GPU (HISA sparse attention)" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# a C compiler: Triton builds its kernel launchers with it at run time (HISA's kernels, and torch.compile's
# fused kernels in the CUDA-graph decode); older CUDA "runtime" images of PyTorch ship none (pytorch#116696).
# The distribution's own gcc, whatever its version, is what Triton expects.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# the non-root user that serves (uid 1000; an Ubuntu 24.04 base's own uid-1000 user "ubuntu" makes way); its
# caches are writable by any uid too (for `docker run --user ...`)
RUN if getent passwd 1000 > /dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash hisa \
    && mkdir -p /home/hisa/.cache/huggingface /home/hisa/.cache/triton /opt/hisa-serve/home \
    && chown -R hisa:hisa /home/hisa /opt/hisa-serve/home \
    && chmod 1777 /home/hisa/.cache /home/hisa/.cache/huggingface /home/hisa/.cache/triton

# dependencies first (their layer is reused while only the code changes)
COPY docker/requirements.txt docker/install.sh /opt/hisa-serve/src/docker/
RUN sh /opt/hisa-serve/src/docker/install.sh deps

COPY pyproject.toml README.md /opt/hisa-serve/src/
COPY hisa /opt/hisa-serve/src/hisa
COPY server /opt/hisa-serve/src/server
RUN sh /opt/hisa-serve/src/docker/install.sh package /opt/hisa-serve/src \
    && hisa-serve --help > /dev/null

USER 1000:1000
WORKDIR /home/hisa

# the embedded default model, converted once at build time (outside the HF cache volume), so `docker run IMAGE`
# needs no network
ENV HISA_HOME=/opt/hisa-serve/home
RUN sh /opt/hisa-serve/src/docker/install.sh model \
    && chmod -R a+rX /opt/hisa-serve/home

# HF_TOKEN is not baked in: pass it at run time (`-e HF_TOKEN`) for gated models.
ENV HF_HOME=/home/hisa/.cache/huggingface \
    TRITON_CACHE_DIR=/home/hisa/.cache/triton \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HISA_HOST=0.0.0.0 \
    HISA_PORT=8000
VOLUME ["/home/hisa/.cache/huggingface"]

EXPOSE 8000

# /health is 503 while the model loads (a 7B model can take minutes on first download: long start period)
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HISA_PORT', '8000'), timeout=8)"]

ENTRYPOINT ["hisa-serve"]
# no arguments: the embedded model; `docker run IMAGE --model ...` replaces this
CMD []
