# Prefill worker: computes prompt KV caches and ships them to decode workers. CPU torch.
# Build from the repository root: docker build -f deploy/prefill.Dockerfile -t tsukimi-prefill .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY bench ./bench
COPY sim ./sim
# Only this service's extra.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[worker]"

RUN useradd --system --create-home tsukimi
USER tsukimi
WORKDIR /home/tsukimi

# Defaults matching EXPOSE; docker-compose.yml sets the same values explicitly.
ENV TSUKIMI_HOST=0.0.0.0 TSUKIMI_METRICS_PORT=9102 TSUKIMI_KV_PORT=7001
EXPOSE 9102 7001
CMD ["tsukimi", "prefill"]
