# The storage gateway: `docker build -t storage-gateway .`, then see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package and its pinned dependencies (pyproject.toml), installed from this repository.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY backends ./backends
RUN pip install . && rm -rf /build

# Never root; the working directory (./data for the local backend) belongs to this user.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/gateway gateway
USER gateway
WORKDIR /var/lib/gateway

# Every setting comes from GATEWAY_* variables (README, Configuration); none is a secret here.
ENV GATEWAY_SERVER_HOST=0.0.0.0 \
    GATEWAY_SERVER_PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('GATEWAY_SERVER_PORT', '8080') + '/health/ready', timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["gateway", "serve"]
