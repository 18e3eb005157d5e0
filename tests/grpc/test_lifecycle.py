"""The server as a process: reflection, health, and draining on SIGTERM with streams open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from adapterctl.client import Client
from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.grpc_harness import request


def test_reflection_lists_the_services(serve):
    server = serve()
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert {"adapterd.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def _wait_serving(addr: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with Client(addr, timeout=2) as client:
        while True:
            assert proc.poll() is None, "adapterd exited during start-up"
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "adapterd did not become SERVING"
            time.sleep(0.2)


def _wait_draining(health, addr: str, timeout: float = 60) -> None:
    """Until the health stream says NOT_SERVING, then until the listener takes no new
    connection (server.stop has begun). A call that races the start of server.stop() is
    answered CANCELLED by grpc core; after it, a new call is UNAVAILABLE."""
    try:
        for update in health:
            if update.status != health_pb2.HealthCheckResponse.SERVING:
                break
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "adapterd did not start draining"
    deadline = time.monotonic() + timeout
    while True:
        probe = grpc.insecure_channel(addr)
        try:
            grpc.channel_ready_future(probe).result(timeout=1)
        except grpc.FutureTimeoutError:
            return  # no connection within a second on loopback: nothing listens
        finally:
            probe.close()
        assert time.monotonic() < deadline, "adapterd kept taking new connections while draining"


@pytest.mark.slow
def test_sigterm_drains_open_streams_and_exits_zero(tiny_base, registry_store, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterd", "serve", "--port", "0", "--port-file", str(port_file),
         "--base-model", str(tiny_base), "--registry", str(registry_store), "--max-rank", "16",
         "--gpu-slots", "4", "--max-input-tokens", "64", "--max-total-tokens", "256",
         "--grace-period", "60", "--metrics-port", "-1", "--jobs-dir", str(tmp_path / "jobs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.1)
        addr = f"127.0.0.1:{port_file.read_text().strip()}"
        _wait_serving(addr, proc)

        channel = grpc.insecure_channel(addr)
        stub = pb_grpc.InferenceStub(channel)
        # Long streams: with 1 thread and a tiny model, 240 tokens take a good second or more
        # (ignore_eos: the random model's greedy answers may end at EOS after a few tokens).
        streams = [stub.GenerateStream(request(f"stream {i}", adapter=f"a{i}", max_new_tokens=240, ignore_eos=True))
                   for i in range(4)]
        results: list[list] = [[] for _ in streams]
        started = threading.Barrier(len(streams) + 1)

        def read(i):
            it = iter(streams[i])
            results[i].append(next(it))
            started.wait()
            results[i].extend(it)

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        for t in readers:
            t.start()
        started.wait(timeout=60)
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        _wait_draining(health, addr)

        new_channel = grpc.insecure_channel(addr)
        try:
            pb_grpc.InferenceStub(new_channel).Generate(request("too late"), timeout=10)
            raise AssertionError("a call after SIGTERM succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        new_channel.close()

        for t in readers:
            t.join(timeout=120)
        for msgs in results:  # every stream open at SIGTERM ran to its full length
            last = msgs[-1]
            assert last.finish_reason == pb.LENGTH
            assert last.completion_tokens == len(msgs) == 240
        channel.close()
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "draining" in log and "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
