"""Container health check: exit 0 when the local gRPC server reports SERVING."""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port = sys.argv[1]
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
