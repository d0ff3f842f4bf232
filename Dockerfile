# trickle-relay: the relay's gRPC service (and, from the same image, the embedded trickle server
# and processor for trying it out). Build: docker build -t trickle-relay .
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY relay_server relay_server
# The Cython extension and the gRPC stubs are built here, into a wheel.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relay
# gRPC, Prometheus metrics.
EXPOSE 50051 9102
ENV RELAY_LISTEN=0.0.0.0:50051 RELAY_METRICS_LISTEN=0.0.0.0:9102 RELAY_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s CMD python -c "import grpc, sys; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=2); \
sys.exit(s.status != h.HealthCheckResponse.SERVING)"
# SIGTERM drains: health NOT_SERVING, sessions stopped (output channels closed), then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["trickle-relay"]
CMD ["serve"]
