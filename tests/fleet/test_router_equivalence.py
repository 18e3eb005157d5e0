"""deploy/k8s/router.yaml (Envoy, never run here) routes like deploy/local/ (nginx, run by
test_local_fleet.py): the same hash key, health check, passive ejection and tries."""

from __future__ import annotations

import re
import sys

import pytest
import yaml
from adapterctl.client import ADAPTER_HEADER

from tests.fleet.harness import REPO

K8S = REPO / "deploy" / "k8s"


@pytest.fixture(scope="module")
def local():
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    try:
        import fleet
        import upstream_health

        yield fleet, upstream_health
    finally:
        sys.path.remove(str(REPO / "deploy" / "local"))


@pytest.fixture(scope="module")
def envoy():
    router = next(d for d in yaml.safe_load_all((K8S / "router.yaml").read_text()) if d["kind"] == "ConfigMap")
    return yaml.safe_load(router["data"]["envoy.yaml"])["static_resources"]


def _routes(envoy) -> list[dict]:
    hcm = envoy["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def _cluster(envoy, name: str) -> dict:
    return next(c for c in envoy["clusters"] if c["name"] == name)


def test_the_same_hash_key(envoy, local):
    fleet, upstream_health = local
    inference = next(r for r in _routes(envoy) if r["match"]["prefix"] == "/adapterd.v1.Inference/")
    assert inference["route"]["hash_policy"] == [{"header": {"header_name": ADAPTER_HEADER}}]
    nginx_var = "$http_" + ADAPTER_HEADER.replace("-", "_")
    assert f"map {nginx_var} {upstream_health.HASH_KEY}" in fleet.NGINX_CONF
    assert f"hash {upstream_health.HASH_KEY} consistent;" in upstream_health.render_upstream(["a:1"], set())
    assert _cluster(envoy, "adapterd-serve")["lb_policy"] == "RING_HASH"


def test_the_same_health_check(envoy, local):
    fleet, upstream_health = local
    (hc,) = _cluster(envoy, "adapterd-serve")["health_checks"]
    sidecar = upstream_health.build_parser().parse_args(["--replica=a:1", "--upstream-file=u", "--nginx-pid-file=p"])
    start = fleet.build_parser().parse_args(["start"])
    assert hc["grpc_health_check"] == {}  # service "", as the sidecar asks
    assert float(hc["interval"].rstrip("s")) == start.health_interval == sidecar.interval
    assert float(hc["timeout"].rstrip("s")) == start.health_timeout == sidecar.timeout
    assert hc["unhealthy_threshold"] == sidecar.unhealthy_threshold
    assert hc["healthy_threshold"] == sidecar.healthy_threshold
    # The pods drain for longer than the router takes to drop them.
    args = next(d for d in yaml.safe_load_all((K8S / "serve.yaml").read_text()) if d["kind"] == "Deployment")
    flags = args["spec"]["template"]["spec"]["containers"][0]["args"]
    delay = float(next(f for f in flags if f.startswith("--drain-delay=")).split("=")[1])
    assert delay > sidecar.interval * sidecar.unhealthy_threshold


def test_the_same_passive_ejection_and_tries(envoy, local):
    fleet, upstream_health = local
    outlier = _cluster(envoy, "adapterd-serve")["outlier_detection"]
    passive = upstream_health.Passive()
    assert outlier["consecutive_local_origin_failure"] == passive.max_fails
    assert float(outlier["base_ejection_time"].rstrip("s")) == passive.fail_timeout_s
    tries = int(re.search(r"grpc_next_upstream_tries (\d+);", fleet.NGINX_CONF)[1])
    for route in _routes(envoy):
        if route["route"]["cluster"] == "adapterd-serve":
            assert route["route"]["retry_policy"]["num_retries"] + 1 == tries


def test_training_goes_to_one_replica_in_both(envoy, local):
    fleet, _ = local
    training = next(r for r in _routes(envoy) if r["match"]["prefix"] == "/adapterd.v1.Training/")
    assert training["route"]["cluster"] == "adapterd-train"
    assert re.search(r"location /adapterd\.v1\.Training/ \{\{\s*grpc_pass grpc://adapterd_train;", fleet.NGINX_CONF)
