# Conductor: places requests on prefill/decode workers, journals them in SQL (psycopg for PostgreSQL URLs). No torch.
# Build from the repository root: docker build -f deploy/conductor.Dockerfile -t tsukimi-conductor .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY bench ./bench
COPY sim ./sim
# Only this service's extra.
RUN pip install ".[conductor]" "psycopg[binary]>=3.1"

RUN useradd --system --create-home tsukimi
USER tsukimi
WORKDIR /home/tsukimi

# Defaults matching EXPOSE; docker-compose.yml sets the same values explicitly.
ENV TSUKIMI_HOST=0.0.0.0 TSUKIMI_METRICS_PORT=9101
EXPOSE 9101
CMD ["tsukimi", "conductor"]
