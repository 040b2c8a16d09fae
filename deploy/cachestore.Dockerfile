# Cachestore: gRPC (health today, the KV block pool later) on 50051. No torch.
# Build from the repository root: docker build -f deploy/cachestore.Dockerfile -t tsukimi-cachestore .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY bench ./bench
COPY sim ./sim
# Only this service's extra.
RUN pip install ".[cachestore]"

RUN useradd --system --create-home tsukimi
USER tsukimi
WORKDIR /home/tsukimi

# Defaults matching EXPOSE; docker-compose.yml sets the same values explicitly.
ENV TSUKIMI_HOST=0.0.0.0 TSUKIMI_METRICS_PORT=9104 TSUKIMI_CACHESTORE_GRPC_PORT=50051 TSUKIMI_CACHESTORE_LANE_PORT=50052 TSUKIMI_KV_PORT=7002
EXPOSE 9104 50051 50052 7002
CMD ["tsukimi", "cachestore"]
