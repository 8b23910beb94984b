"""The standard gRPC health service on both transports, asked with grpcio's own health stubs,
and ``/healthz`` beside ``/metrics``."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evochi.server import EmbeddedServer, ServerConfig
from tests.server.helpers import StubWorker, run

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
TRANSPORTS = ("http2", "grpcio")


def config(transport: str) -> ServerConfig:
    return ServerConfig(population_size=8, worker_timeout=30, transport=transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_check_answers_serving_then_not_serving_once_the_training_finished(transport: str) -> None:
    async def scenario() -> None:
        async with (
            EmbeddedServer(config(transport)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "evochi.v1.EvochiService"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # Workers are served as before, on the same server.
            worker = StubWorker(server.address, cores=1)
            await worker.subscribe()
            await worker.close()
            await server.stop_training()
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == NOT_SERVING

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_watch_streams_the_status_and_its_change(transport: str) -> None:
    async def scenario() -> None:
        async with (
            EmbeddedServer(config(transport)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert (await unknown.read()).status == SERVICE_UNKNOWN
            unknown.cancel()
            calls = [
                stub.Watch(health_pb2.HealthCheckRequest(service=name))
                for name in ("", "evochi.v1.EvochiService")
            ]
            for call in calls:
                assert (await asyncio.wait_for(call.read(), 10)).status == SERVING
            await server.stop_training()
            for call in calls:
                assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
                call.cancel()

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_healthz_beside_metrics(transport: str) -> None:
    def get(url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    async def scenario() -> None:
        async with EmbeddedServer(config(transport)) as server:
            port = server.metrics.serve(0, "127.0.0.1")
            base = f"http://127.0.0.1:{port}"
            assert await asyncio.to_thread(get, base + "/healthz") == (200, "SERVING\n")
            status, body = await asyncio.to_thread(get, base + "/metrics")
            assert status == 200 and "evochi_workers" in body
            await server.stop_training()
            assert await asyncio.to_thread(get, base + "/healthz") == (503, "NOT_SERVING\n")

    run(scenario())
