"""Lists a server's services through gRPC reflection v1alpha with python's grpcio-reflection
(the protocol python tooling, older grpcurl, Postman and Evans speak). Prints one name per line.

    python reflection_v1alpha.py HOST:PORT
"""
import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main(endpoint):
    with grpc.insecure_channel(endpoint) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
            for service in response.list_services_response.service:
                print(service.name)
            # The file containing a service resolves (what tools do next).
            file_request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="etcdserverpb.KV")
            for file_response in stub.ServerReflectionInfo(iter([file_request]), timeout=10):
                assert file_response.file_descriptor_response.file_descriptor_proto, "no descriptor"
            return


if __name__ == "__main__":
    main(sys.argv[1])
