"""The wire contract between workers and the coordinator: the ``.proto`` sources and the Python
stubs generated from them (``telemetry_pb2``, ``telemetry_pb2_grpc``).

The stubs are generated, never edited: ``scripts/gen_protos.sh`` writes them, and
``tests/unit/test_telemetry.py`` fails when they no longer match the ``.proto`` files.
Importing this package imports neither protobuf nor grpc; its modules do.
"""
