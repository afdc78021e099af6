"""The gRPC adapter: softgate.v1.LossService over grpc.aio (codec, servicer, error mapping,
server bootstrap). `softgate.serve` runs it; tests may use `GrpcServer` directly."""

from softgate.grpc.server import GrpcServer
from softgate.grpc.servicer import RUN_METADATA_KEY, SERVICE_NAME, LossServicer

__all__ = ["RUN_METADATA_KEY", "SERVICE_NAME", "GrpcServer", "LossServicer"]
