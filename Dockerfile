# The exporter image: `conduit-otel-cache serve` (deploy/kubernetes/). Not built by CI (no
# container runtime there); the install step is the README's ("Kubernetes").
#   docker build -t conduit-otel-cache:0.1.0 .
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/conduit-otel-cache && /opt/conduit-otel-cache/bin/pip install '.[serve,otlp]'
WORKDIR /
RUN rm -rf /build
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["/opt/conduit-otel-cache/bin/conduit-otel-cache"]
CMD ["serve", "--host", "0.0.0.0", "--port", "9464"]
