"""The wire contract between workers and the coordinator: the ``.proto`` sources and the Python
stubs generated from them (``telemetry_pb2``, ``telemetry_pb2_grpc``).

The stubs are generated, never edited: ``scripts/gen_protos.sh`` writes them, and
``tests/unit/test_telemetry.py`` fails when they no longer match the ``.proto`` files.
Importing this package imports neither protobuf nor grpc; its modules do.

The names below are the rest of the telemetry contract, which the ``.proto`` cannot carry: how a
worker proves it belongs to its job (the per-job secret, sent as gRPC metadata on every
``StreamReports`` call) and where it finds the coordinator's CA certificate for TLS.
"""

__all__ = ["TELEMETRY_CA_ENV", "TELEMETRY_TOKEN_ENV", "TELEMETRY_TOKEN_METADATA"]

#: gRPC metadata key carrying the job's telemetry secret (lowercase, as gRPC requires).
TELEMETRY_TOKEN_METADATA = "gradwire-telemetry-token"
#: Environment variable in which the coordinator hands a launched job its telemetry secret.
TELEMETRY_TOKEN_ENV = "GRADWIRE_TELEMETRY_TOKEN"
#: Environment variable naming a PEM file of CA certificates: set, the worker dials the sink over TLS.
TELEMETRY_CA_ENV = "GRADWIRE_TELEMETRY_CA"
