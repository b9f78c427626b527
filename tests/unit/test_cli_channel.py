"""The CLI's channel to the controller takes replies larger than gRPC's default 4 MB (issue 35.4: `slinfer
status` at 5,000 nodes is 6.4 MB)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from slinfer import tls
from slinfer.config import Config

REPLY = 6_400_000


def _server() -> tuple[grpc.Server, int]:
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"x" * REPLY

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Big": grpc.unary_unary_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_reply_above_4_mb_reaches_the_cli() -> None:
    server, port = _server()
    try:
        with tls.sync_channel(f"127.0.0.1:{port}", Config()) as channel:
            assert len(channel.unary_unary("/t.T/Big")(b"", timeout=20)) == REPLY
        # The control: a channel with gRPC's defaults refuses the same reply.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/t.T/Big")(b"", timeout=20)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)
