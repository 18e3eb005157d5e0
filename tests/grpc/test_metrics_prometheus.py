"""A real Prometheus scrapes a real adapterd: what Prometheus counts is what the clients saw.

Debian's `prometheus` package provides the binary (.ci/run installs it). The server runs
on loopback with its own CollectorRegistry and /metrics on a free port; Prometheus
scrapes it every second and also loads deploy/'s recording rules; the test then reads
everything back through Prometheus's HTTP API, and runs every query of the Grafana
dashboard against it, so a renamed metric breaks this test rather than a dashboard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from adapterd.config import CacheConfig
from adapterd.metrics import Metrics
from adapterd.registry.directory import DirectoryResolver
from prometheus_client import CollectorRegistry

from tests.grpc_harness import RunningServer, request

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "adapterd-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "adapterd-dashboard.json"


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is missing in CI: .ci/run must install Debian's prometheus package")
        pytest.skip("the prometheus binary is absent here (apt-get install prometheus); CI installs it")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on loopback, scraping one target every second."""

    def __init__(self, binary: str, workdir: Path, target: str):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n  - job_name: adapterd\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(promql)}

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, label: str, expected: dict, timeout: float = 30) -> dict:
        """Poll until the query, grouped by `label`, equals `expected` (scrapes take a second)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.by(promql, label)
            if got == expected or time.monotonic() > deadline:
                return got
            time.sleep(0.25)

    def target_health(self) -> str:
        with urllib.request.urlopen(self.url + "/api/v1/targets", timeout=5) as r:
            targets = json.load(r)["data"]["activeTargets"]
        return ",".join(t["health"] for t in targets)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def stack(prometheus_binary, parts_for, registry_root, tmp_path):
    """(server, metrics, prometheus): adapterd with /metrics on a free port, and Prometheus on it."""
    metrics = Metrics(CollectorRegistry())
    server = RunningServer.start(
        parts_for(2), DirectoryResolver(registry_root), metrics=metrics,
        cache=CacheConfig(gpu_slots=2, max_rank=16),
    )
    metrics_port = metrics.start_http_server("127.0.0.1", 0)
    prometheus = None
    try:
        prometheus = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{metrics_port}")
        yield server, metrics, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        metrics.stop_http_server()
        server.stop()


def call(server: RunningServer, adapter: str, max_new_tokens: int, stream: bool) -> tuple[str, int]:
    """One request as a client sees it: (status code name, completion tokens received)."""
    req = request(f"hello {adapter}", adapter=adapter, max_new_tokens=max_new_tokens)
    try:
        if stream:
            messages = list(server.inference.GenerateStream(req, timeout=60))
            return "OK", messages[-1].completion_tokens
        return "OK", server.inference.Generate(req, timeout=60).completion_tokens
    except grpc.RpcError as e:
        return e.code().name, 0


@pytest.mark.slow
def test_prometheus_counts_what_the_clients_saw(stack):
    server, metrics, prom = stack
    # Base model and two adapters (unary and streaming, concurrently), an unknown adapter,
    # a bad parameter, and an adapter whose weights are corrupt.
    plan = (
        [("", 6, False)] * 6 + [("", 5, True)] * 4
        + [("a0", 4, False)] * 5 + [("a1", 4, True)] * 3
        + [("no-such-adapter", 4, False)] * 3 + [("", 0, False)] * 2 + [("corrupt", 4, False)] * 2
    )
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda p: (p[0], *call(server, *p)), plan))
    seen = Counter(code for _, code, _ in outcomes)
    assert {"OK", "NOT_FOUND", "INVALID_ARGUMENT"} <= set(seen), seen
    assert seen["OK"] == 18

    got = prom.eventually("sum by (code) (adapterd_requests_total)", "code", dict(seen))
    assert got == dict(seen), f"Prometheus {got} != clients {dict(seen)}; targets: {prom.target_health()}"

    # Per adapter, for the served ones: a0 and a1 have their own labels (top-K).
    ok_by_adapter = Counter((a or "base") for a, code, _ in outcomes if code == "OK")
    got = prom.eventually('sum by (adapter) (adapterd_requests_total{code="OK"})', "adapter", dict(ok_by_adapter))
    assert got == dict(ok_by_adapter)

    # TTFT: one observation per served request, in real buckets; tokens as the clients got them.
    assert prom.scalar("sum(adapterd_time_to_first_token_seconds_count)") == seen["OK"]
    inf_bucket = prom.scalar('sum(adapterd_time_to_first_token_seconds_bucket{le="+Inf"})')
    assert inf_bucket == seen["OK"]
    p50 = prom.scalar("histogram_quantile(0.5, sum by (le) (adapterd_time_to_first_token_seconds_bucket))")
    assert p50 is not None and 0 < p50 < 30
    # TPOT needs two tokens; a request the model ends with EOS at once has none.
    assert 0 < prom.scalar("sum(adapterd_time_per_output_token_seconds_count)") <= seen["OK"]
    assert prom.scalar("sum(adapterd_generation_tokens_total)") == sum(n for _, _, n in outcomes)
    assert prom.scalar("sum(adapterd_queue_wait_seconds_count)") == seen["OK"]
    assert prom.scalar('sum(adapterd_adapter_loads_total{tier="cpu"})') >= 2  # a0, a1
    assert prom.scalar("sum(adapterd_adapter_load_failures_total)") >= 1  # corrupt
    assert prom.scalar("count(adapterd_build_info)") == 1

    # deploy/'s recording rules evaluate on this data.
    deadline = time.monotonic() + 20
    while not prom.query("adapterd:requests:rate5m") and time.monotonic() < deadline:
        time.sleep(0.25)
    assert prom.query("adapterd:requests:rate5m"), "the recording rules in deploy/prometheus never evaluated"


@pytest.mark.slow
def test_every_dashboard_query_runs_on_real_data(stack):
    server, metrics, prom = stack
    for adapter in ("", "a0"):
        assert call(server, adapter, 3, stream=False)[0] == "OK"
    prom.eventually("sum(adapterd_requests_total)", "", {"": 2.0})

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) > 20
    exported = {fam.name for fam in metrics.registry.collect()}
    for expr in exprs:
        for name in re.findall(r"\b(adapterd_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|count|sum|total|info)$", "", name)
            assert base in exported or name in exported, f"dashboard uses unknown metric {name}"
        promql = (expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
                  .replace("$tenant", ".*").replace("$adapter", ".*"))
        prom.query(promql)  # asserts status == success: it parses and evaluates
