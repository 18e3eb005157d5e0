"""Metrics: names, labels, the bounded adapter labels, and the /metrics endpoint."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from adapterd.metrics import OTHER, Metrics, TopKLabels, adapter_key
from prometheus_client import CollectorRegistry


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), top_k_adapters=3)


def value(m: Metrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def series_with_label(m: Metrics, label: str) -> set[str]:
    """Every distinct value of `label` over all samples in the registry."""
    return {
        s.labels[label]
        for fam in m.registry.collect()
        for s in fam.samples
        if label in s.labels
    }


def test_adapter_key_is_owner_and_name():
    assert adapter_key("") == adapter_key("", "acme") == "base"
    assert adapter_key("summarizer@3") == "summarizer"
    assert adapter_key("default/summarizer@3") == "summarizer"
    assert adapter_key("summarizer@3", "acme") == "acme/summarizer"
    assert adapter_key("globex/summarizer@12", "acme") == "globex/summarizer"


def test_request_counter_by_adapter_tenant_code(metrics):
    metrics.request_done("a@1", "acme", "OK", 0.2)
    metrics.request_done("acme/a@2", "acme", "OK", 0.3)
    metrics.request_done("a", "acme", "RESOURCE_EXHAUSTED", 0.0)
    metrics.request_done("", "acme", "OK", 0.1)
    ok = dict(tenant="acme", code="OK")
    assert value(metrics, "adapterd_requests_total", adapter="acme/a", **ok) == 2
    assert value(metrics, "adapterd_requests_total", adapter="acme/a", tenant="acme",
                 code="RESOURCE_EXHAUSTED") == 1
    assert value(metrics, "adapterd_requests_total", adapter="base", **ok) == 1
    assert value(metrics, "adapterd_request_duration_seconds_count", adapter="acme/a") == 3
    assert value(metrics, "adapterd_request_duration_seconds_sum", adapter="acme/a") == pytest.approx(0.5)


def test_unknown_adapters_never_earn_a_label(metrics):
    for i in range(50):
        metrics.request_done(f"nope-{i}", "acme", "NOT_FOUND", 0.01)
    assert series_with_label(metrics, "adapter") == {OTHER}
    assert value(metrics, "adapterd_requests_total", adapter=OTHER, tenant="acme",
                 code="NOT_FOUND") == 50


def test_adapter_labels_stay_bounded_under_many_adapters(metrics):
    # Three busy adapters take the K=3 places; a thousand one-off ones fold into "other".
    for _ in range(20):
        for name in ("hot1", "hot2", "hot3"):
            metrics.request_done(name, "default", "OK", 0.01)
            metrics.request_finished(name, arrival=0.0, first_token=0.1, end=0.5,
                                     prompt_tokens=4, generated_tokens=5)
    for i in range(1000):
        metrics.request_done(f"cold-{i}", "default", "OK", 0.01)
        metrics.request_finished(f"cold-{i}", arrival=0.0, first_token=0.1, end=0.5,
                                 prompt_tokens=4, generated_tokens=5)
    assert series_with_label(metrics, "adapter") == {"hot1", "hot2", "hot3", OTHER}
    total = sum(
        value(metrics, "adapterd_requests_total", adapter=a, tenant="default", code="OK")
        for a in ("hot1", "hot2", "hot3", OTHER)
    )
    assert total == 60 + 1000
    assert value(metrics, "adapterd_generation_tokens_total", adapter=OTHER) == 5000


def test_a_newly_busy_adapter_takes_the_place_of_the_least_busy_one(metrics):
    for name, n in (("a", 10), ("b", 10), ("c", 2)):
        for _ in range(n):
            metrics.request_done(name, "default", "OK", 0.01)
    for _ in range(5):
        metrics.request_done("d", "default", "OK", 0.01)
    assert metrics.adapters.labelled == {"a", "b", "d"}
    # c's series are gone, so the count of series stays at K + 1 per label set.
    assert series_with_label(metrics, "adapter") == {"a", "b", "d", OTHER}


def test_topk_hysteresis_does_not_flap():
    demoted = []
    top = TopKLabels(1, on_demote=demoted.append)
    for _ in range(5):
        top.observe("x")
    for _ in range(10):  # y must exceed twice x's count before it takes the place
        top.observe("y")
    assert top.labelled == {"x"}
    top.observe("y")
    assert top.labelled == {"y"} and demoted == ["x"]


def test_topk_memory_is_bounded():
    top = TopKLabels(2, track=100, decay_every=10**9)
    for i in range(10_000):
        top.observe(f"k{i}")
    assert len(top._counts) <= 101


def test_ttft_tpot_and_tokens_from_request_finished(metrics):
    metrics.request_done("a", "default", "OK", 1.0)
    metrics.request_finished("a", arrival=10.0, first_token=10.25, end=11.25,
                             prompt_tokens=7, generated_tokens=5)
    assert value(metrics, "adapterd_time_to_first_token_seconds_count", adapter="a") == 1
    assert value(metrics, "adapterd_time_to_first_token_seconds_sum", adapter="a") == 0.25
    assert value(metrics, "adapterd_time_per_output_token_seconds_sum", adapter="a") == 0.25
    assert value(metrics, "adapterd_prompt_tokens_total", adapter="a") == 7
    assert value(metrics, "adapterd_generation_tokens_total", adapter="a") == 5
    # One token: no gap to time, so no TPOT observation.
    metrics.request_finished("a", arrival=0, first_token=0.1, end=0.1, prompt_tokens=1,
                             generated_tokens=1)
    assert value(metrics, "adapterd_time_per_output_token_seconds_count", adapter="a") == 1


def test_scheduler_cache_and_training_gauges(metrics):
    metrics.set_queue_depth(4)
    metrics.set_batch_size(7)
    metrics.set_resident("device", 3)
    metrics.set_resident("cpu", 9)
    metrics.cache_hit("device")
    metrics.cache_miss("device")
    metrics.cache_miss("cpu")
    metrics.adapter_loaded("cpu", 0.05)
    metrics.adapter_load_failed("DATA_LOSS")
    metrics.adapter_evicted("device")
    metrics.observe_queue_wait(0.02)
    metrics.set_training_jobs({"running": 1, "queued": 2})
    metrics.training_progress("job-1", 10, 1.5)
    assert value(metrics, "adapterd_queue_depth") == 4
    assert value(metrics, "adapterd_running_batch_size") == 7
    assert value(metrics, "adapterd_adapters_resident", tier="cpu") == 9
    assert value(metrics, "adapterd_adapter_cache_hits_total", tier="device") == 1
    assert value(metrics, "adapterd_adapter_cache_misses_total", tier="cpu") == 1
    assert value(metrics, "adapterd_adapter_loads_total", tier="cpu") == 1
    assert value(metrics, "adapterd_adapter_load_duration_seconds_count", tier="cpu") == 1
    assert value(metrics, "adapterd_adapter_load_failures_total", code="DATA_LOSS") == 1
    assert value(metrics, "adapterd_adapter_evictions_total", tier="device") == 1
    assert value(metrics, "adapterd_queue_wait_seconds_count") == 1
    assert value(metrics, "adapterd_training_jobs", state="queued") == 2
    assert value(metrics, "adapterd_training_jobs", state="failed") == 0
    assert value(metrics, "adapterd_training_loss", job="job-1") == 1.5
    metrics.training_finished("job-1")
    assert metrics.registry.get_sample_value("adapterd_training_loss", {"job": "job-1"}) is None


def test_build_info(metrics):
    from adapterd import __version__

    samples = [s for fam in metrics.registry.collect() for s in fam.samples
               if s.name == "adapterd_build_info"]
    assert len(samples) == 1 and samples[0].labels["version"] == __version__


def test_two_servers_in_one_process_do_not_share_metrics():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.request_done("x", "default", "OK", 0.1)
    assert value(b, "adapterd_requests_total", adapter="x", tenant="default", code="OK") == 0


def test_http_exposition(metrics):
    metrics.request_done("a", "default", "OK", 0.1)
    port = metrics.start_http_server("127.0.0.1", 0)
    try:
        assert metrics.http_port == port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'adapterd_requests_total{adapter="a",code="OK",tenant="default"} 1.0' in text
        assert "# TYPE adapterd_time_to_first_token_seconds histogram" in text
    finally:
        metrics.stop_http_server()
    assert metrics.http_port is None


def test_the_metrics_port_serves_only_metrics():
    """The hostile matrix (issue 18, item 8): /metrics and nothing else, GET only."""
    metrics = Metrics(CollectorRegistry())
    metrics.request_done("alice/secret", "alice", "OK", 0.1)
    port = metrics.start_http_server("127.0.0.1", 0)
    try:
        def get(path: str, method: str = "GET") -> tuple[int, bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, b""

        status_, body = get("/metrics")
        assert status_ == 200 and b"adapterd_" in body
        assert get("/metrics?name[]=adapterd_requests_total")[0] == 200
        for path in ("/", "/index.html", "/metrics/", "/debug", "/metricsx"):
            assert get(path)[0] == 404, path
        assert get("/metrics", "POST")[0] == 405
    finally:
        metrics.stop_http_server()
