"""Server reflection as both grpc.reflection.v1 and v1alpha.

Current clients (grpcurl, grpc-js, Postman) ask v1 first; grpcio-reflection ships only
v1alpha. v1's reflection.proto is v1alpha's, field for field, under another package, so
we register that file (renamed) in the descriptor pool — clients can reflect on v1 itself —
and serve v1 calls with grpcio-reflection's own servicer: the bytes on the wire are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_METHOD = "ServerReflectionInfo"


def _register_v1() -> descriptor.FileDescriptor:
    """grpc/reflection/v1/reflection.proto, made from the v1alpha file, in the default pool."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName("grpc/reflection/v1/reflection.proto")
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = f.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    return pool.AddSerializedFile(proto.SerializeToString())


V1_FILE = _register_v1()
# v1 message classes, for clients (and tests) that speak v1.
V1Request = message_factory.GetMessageClass(V1_FILE.message_types_by_name["ServerReflectionRequest"])
V1Response = message_factory.GetMessageClass(V1_FILE.message_types_by_name["ServerReflectionResponse"])


def add_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection for `service_names` (plus both reflection services) under v1 and v1alpha."""
    servicer = reflection.aio.ReflectionServicer([*service_names, V1_SERVICE, V1ALPHA_SERVICE])
    for name in (V1_SERVICE, V1ALPHA_SERVICE):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {_METHOD: handler}),))
