# Gateway: the OpenAI-compatible HTTP API (/v1/*, /health, /metrics on one port). No torch.
# Build from the repository root: docker build -f deploy/gateway.Dockerfile -t tsukimi-gateway .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY bench ./bench
COPY sim ./sim
# Only this service's extra.
RUN pip install ".[gateway]"

RUN useradd --system --create-home tsukimi
USER tsukimi
WORKDIR /home/tsukimi

# Defaults matching EXPOSE; docker-compose.yml sets the same values explicitly.
ENV TSUKIMI_HOST=0.0.0.0 TSUKIMI_GATEWAY_PORT=8000
EXPOSE 8000
CMD ["tsukimi", "gateway"]
