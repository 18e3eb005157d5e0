"""The metrics the Gateway API Inference Extension's endpoint picker routes by: waiting and
running requests, KV-cache usage, and the LoRA info series (vllm:lora_requests_info's
semantics), moving as HTTP requests run and wait. One batch row, so a second request waits."""

from __future__ import annotations

import http.client
import json

from adapterd.config import CacheConfig, HttpConfig, SchedulerConfig
from adapterd.metrics import Metrics
from prometheus_client import CollectorRegistry, generate_latest

from tests.http.conftest import MAX_RANK, registry_resolver
from tests.http_harness import OpenAIServer


def lora_info(registry) -> list[dict]:
    return [s.labels | {"value": s.value} for m in registry.collect() if m.name == "adapterd_lora_requests_info"
            for s in m.samples]


def send(server, model: str) -> http.client.HTTPConnection:
    """A streamed completion sent; its response (headers come with the first token) not read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    body = {"model": model, "prompt": "go on", "max_tokens": 200, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def test_gateway_metrics_move_and_name_the_adapters(parts_for, registry_store):
    parts = parts_for(4)
    resolver = registry_resolver(registry_store, parts.spec)
    one_row = SchedulerConfig(max_batch_size=1, max_queue=8, max_input_tokens=64, max_total_tokens=256)
    server = OpenAIServer.start(parts, resolver, registry=resolver.registry, scheduler=one_row,
                                metrics=Metrics(CollectorRegistry()), http=HttpConfig(port=0),
                                cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK))
    reg = server.metrics.registry
    try:
        running = send(server, "a0").getresponse()
        assert running.readline().startswith(b"data: ")  # a0 has its row
        waiting_conn = send(server, "a1")
        server.wait_for(lambda s: s["queued"] == 1, what="a1 to wait")
        server.wait_for(lambda s: reg.get_sample_value("adapterd_queue_depth") == 1, what="the waiting gauge")
        assert reg.get_sample_value("adapterd_running_batch_size") == 1
        assert reg.get_sample_value("adapterd_kv_cache_usage_ratio") > 0
        # set at the end of each step: the step that took a1 off the inbox names it
        server.wait_for(lambda s: lora_info(reg)[0]["waiting_lora_adapters"] == "a1", what="the info series")
        (info,) = lora_info(reg)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"], info["max_lora"]) == ("a0", "a1", "4")
        assert info["value"] > 1.6e9  # a timestamp, so the picker takes the newest
        running.close()  # a0's client goes away: a1 gets the row
        waiting = waiting_conn.getresponse()
        assert waiting.readline().startswith(b"data: ")
        server.wait_for(lambda s: s["queued"] == 0 and s["running"] == 1, what="a1 to run")
        waiting.close()
        server.wait_for(lambda s: s["running"] == 0, what="every row to be freed")
        server.wait_for(lambda s: reg.get_sample_value("adapterd_running_batch_size") == 0, what="running gauge")
        server.wait_for(lambda s: lora_info(reg)[0]["running_lora_adapters"] == "", what="the info series")
        (info,) = lora_info(reg)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("", "")
        exposition = generate_latest(reg).decode()
        for name in ("adapterd_queue_depth", "adapterd_running_batch_size", "adapterd_kv_cache_usage_ratio",
                     "adapterd_lora_requests_info"):
            assert f"\n{name}" in exposition
    finally:
        server.stop()
