# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target api    -t qlora-service:api .     # the API (and `qlora migrate` / `qlora admin`)
#   docker build --target worker -t qlora-service:worker .  # one training worker per GPU
#
# Both install the dependencies into /opt/venv in a build stage (rebuilt only when pyproject.toml
# changes), then add the source in the final stage. The source lives in /opt/qlora and is installed
# in editable mode on purpose: app/migrate.py finds alembic.ini and migrations/ next to the app
# package, and they are not package data, so a plain wheel install would leave `qlora migrate`
# without its migrations.

ARG PYTHON_IMAGE=python:3.11-slim
# torch 2.13 on PyPI is built against CUDA 13.0 and brings the whole CUDA user space with it (cuBLAS,
# cuDNN, NCCL... as pip packages). The image therefore only needs the `base` flavour: the variables
# the NVIDIA container toolkit reads and the driver compat shim. A `runtime`/`cudnn` image would add
# a second, different copy of the same libraries on LD_LIBRARY_PATH. Hosts need a driver that
# supports CUDA 13 (>= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG UV_VERSION=0.13.8
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
# An index with CPU builds of torch for the API image (.env.example says where to find one). No default:
# which index serves torch is the builder's choice, and the repository names none.
ARG TORCH_INDEX_URL=""

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# The runtime dependency list, read from pyproject.toml. Installing it on its own keeps the
# multi-GB dependency layers cached across source changes.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml .
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu']))" \
        > requirements-gpu.txt

# ---------------------------------------------------------------- api

FROM ${PYTHON_IMAGE} AS api-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# The API process never imports torch, but the package depends on it: the CPU wheel is ~10x smaller
# than the CUDA one and satisfies `torch>=2.6`, so the next step keeps it. Without TORCH_INDEX_URL,
# torch comes from pip's default index: on Linux the CUDA build, an image a few GB larger that works
# the same.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install torch==${TORCH_VERSION} --index-url "${TORCH_INDEX_URL}"; \
    else \
        echo "TORCH_INDEX_URL is not set: torch from pip's default index (the larger CUDA build)"; \
        pip install torch==${TORCH_VERSION}; \
    fi
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE} AS api
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QLORA_HOME=/data/qlora
RUN groupadd --gid 10001 qlora \
    && useradd --uid 10001 --gid qlora --create-home --shell /usr/sbin/nologin qlora \
    && mkdir -p /data/qlora && chown qlora:qlora /data/qlora && chmod 700 /data/qlora
COPY --from=api-build /opt/venv /opt/venv
WORKDIR /opt/qlora
COPY pyproject.toml README.md alembic.ini ./
COPY migrations/ migrations/
COPY worker/ worker/
COPY app/ app/
# Root owns the source; the service user (10001, numeric so runAsNonRoot checks can see it) reads it.
RUN pip install --no-cache-dir --no-deps -e . && python -m compileall -q app worker migrations
USER 10001:10001
EXPOSE 8000
# slim has no curl; the venv's python is on PATH.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# The worker runs in its own container (target worker), never inside the API's. How many API processes
# serve the port: QLORA_API_WORKERS (docker-compose.yml sets 4), or `--workers N` appended here.
CMD ["qlora", "serve", "--no-worker", "--host", "0.0.0.0"]

# ---------------------------------------------------------------- worker

FROM ${CUDA_IMAGE} AS worker-build
ARG PYTHON_VERSION
ARG TORCH_VERSION
# Python 3.11 from uv (python-build-standalone) rather than the deadsnakes PPA: a relocatable CPython
# that does not depend on which Python versions a PPA still builds for this Ubuntu release, nor on
# reaching Launchpad's keyserver, and that is the same build whatever the CUDA base image.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install ${PYTHON_VERSION} \
    && "$(uv python find ${PYTHON_VERSION})" -m venv /opt/venv
# From PyPI's default index: the Linux wheels there are the CUDA builds.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==${TORCH_VERSION}
COPY --from=requirements /src/requirements.txt /src/requirements-gpu.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt -r /tmp/requirements-gpu.txt
# flash-attention makes padding-free packing the default (training.packing "auto") and runs packed
# rows with varlen kernels. PyPI has only its source, which needs nvcc and an hour to compile, so
# the image takes a prebuilt wheel matching torch, CUDA and Python when given one:
#   docker build --target worker --build-arg FLASH_ATTN_WHEEL=https://.../flash_attn-...whl .
# Without it, packing stays off unless a job asks for it (then SDPA keeps examples apart).
ARG FLASH_ATTN_WHEEL=""
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "${FLASH_ATTN_WHEEL}" ]; then pip install --no-deps "${FLASH_ATTN_WHEEL}"; fi

FROM ${CUDA_IMAGE} AS worker
# CA certificates for workers that download registered models from a hub (unpinned: always the newest).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QLORA_HOME=/data/qlora
RUN groupadd --gid 10001 qlora \
    && useradd --uid 10001 --gid qlora --create-home --shell /usr/sbin/nologin qlora \
    && mkdir -p /data/qlora && chown qlora:qlora /data/qlora && chmod 700 /data/qlora
# The venv's interpreter is a link into /opt/python: both keep the paths they were built at.
COPY --from=worker-build /opt/python /opt/python
COPY --from=worker-build /opt/venv /opt/venv
WORKDIR /opt/qlora
COPY pyproject.toml README.md alembic.ini ./
COPY migrations/ migrations/
COPY worker/ worker/
COPY app/ app/
RUN pip install --no-cache-dir --no-deps -e . && python -m compileall -q app worker migrations
USER 10001:10001
# Arguments come from `docker run ... IMAGE --gpu 0 --gpu-class a100` or compose's `command:`.
ENTRYPOINT ["qlora", "worker"]
