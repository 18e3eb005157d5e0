"""The balancer's active health check: a sidecar that keeps nginx's upstream in step with
each replica's grpc.health.v1.

nginx open source checks upstreams only passively (`max_fails`: a connection refused or
reset counts as a failure), and cannot ask a gRPC health service. A replica that is up
but NOT_SERVING (warming up after a restart, or draining on SIGTERM) accepts connections
and would keep its adapters' traffic. So this process does what Envoy's `health_checks`
do in deploy/k8s/router.yaml, with the same check and thresholds:

    every --interval, ask each replica Health/Check(service="") with --timeout;
    not SERVING (NOT_SERVING, an error, no answer) --unhealthy-threshold times in a row
        -> the replica is marked `down` in the upstream file;
    SERVING --healthy-threshold times in a row -> it is marked up again;
    on a change: rewrite the file atomically and SIGHUP nginx (a graceful reload: calls
    in flight finish on the old workers).

`down` keeps the replica's place on nginx's consistent-hash ring, so only its adapters
move (to the next replica on the ring) and come back to it when it is up again.

    python deploy/local/upstream_health.py --upstream-file nginx/upstream.conf \
        --nginx-pid-file nginx/nginx.pid --replica 127.0.0.1:50061 --replica 127.0.0.1:50062
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("upstream_health")

UPSTREAM = "adapterd_serve"
# Requests without the header (List, Push, the base model) get a random key: they spread
# over the replicas, as Envoy's ring hash does when the hash policy finds no header.
HASH_KEY = "$adapterd_hash_key"


@dataclass(frozen=True)
class Passive:
    """nginx's own passive check, on top: a replica whose connection is refused or reset
    is skipped for `fail_timeout_s` (the request goes to the next replica on the ring)."""

    max_fails: int = 1
    fail_timeout_s: float = 5.0


def render_upstream(replicas: list[str], down: set[str], passive: Passive = Passive()) -> str:
    """The `upstream` block nginx includes: every replica in a fixed order (the ring
    depends only on the addresses), those in `down` marked so."""
    lines = [
        "# Written by deploy/local/upstream_health.py; edits are overwritten.",
        f"upstream {UPSTREAM} {{",
        f"    zone {UPSTREAM} 64k;",
        f"    hash {HASH_KEY} consistent;",
    ]
    for addr in replicas:
        flag = " down" if addr in down else ""
        lines.append(f"    server {addr} max_fails={passive.max_fails} fail_timeout={passive.fail_timeout_s:g}s{flag};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check(addr: str, timeout: float) -> str:
    """The replica's serving status name, or the gRPC code name when the call failed."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class Tracker:
    """Up/down per replica with thresholds, as Envoy counts them. A replica's first answer
    decides its state at once (there is no history to weigh)."""

    def __init__(self, replicas: list[str], unhealthy_threshold: int, healthy_threshold: int):
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.up: dict[str, bool | None] = dict.fromkeys(replicas)
        self._streak: dict[str, int] = dict.fromkeys(replicas, 0)

    def observe(self, addr: str, serving: bool) -> bool:
        """Record one answer; True when the replica's state changed."""
        up = self.up[addr]
        if up is None:
            self.up[addr] = serving
            return True
        if serving == up:
            self._streak[addr] = 0
            return False
        self._streak[addr] += 1
        if self._streak[addr] >= (self.healthy_threshold if serving else self.unhealthy_threshold):
            self.up[addr], self._streak[addr] = serving, 0
            return True
        return False

    @property
    def down(self) -> set[str]:
        return {a for a, up in self.up.items() if not up}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def reload_nginx(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as e:
        log.warning("could not reload nginx (pid file %s): %s", pid_file, e)


def run(args: argparse.Namespace, stop: threading.Event) -> None:
    tracker = Tracker(args.replica, args.unhealthy_threshold, args.healthy_threshold)
    passive = Passive(args.max_fails, args.fail_timeout)
    with ThreadPoolExecutor(len(args.replica), thread_name_prefix="check") as pool:
        while not stop.is_set():
            statuses = list(pool.map(lambda a: check(a, args.timeout), args.replica))
            changed = False
            for addr, status in zip(args.replica, statuses, strict=True):
                if tracker.observe(addr, status == "SERVING"):
                    changed = True
                    log.info("%s %s (%s)", addr, "up" if tracker.up[addr] else "down", status)
            text = render_upstream(args.replica, tracker.down, passive)
            if changed and _read(args.upstream_file) != text:
                write_atomically(args.upstream_file, text)
                reload_nginx(args.nginx_pid_file)
            stop.wait(args.interval)


def build_parser() -> argparse.ArgumentParser:
    """The defaults are Envoy's health_checks in deploy/k8s/router.yaml (a test holds them equal)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replica", action="append", required=True, metavar="HOST:PORT",
                   help="a replica's gRPC address; repeat for each, in the same order every time")
    p.add_argument("--upstream-file", type=Path, required=True, help="the file nginx.conf includes")
    p.add_argument("--nginx-pid-file", type=Path, required=True, help="nginx's `pid` file, for the reload")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="between rounds (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="per check (default: %(default)s)")
    p.add_argument("--unhealthy-threshold", type=int, default=2, help="failed checks before down (default: %(default)s)")
    p.add_argument("--healthy-threshold", type=int, default=1, help="passed checks before up (default: %(default)s)")
    p.add_argument("--max-fails", type=int, default=Passive.max_fails, help="nginx max_fails (default: %(default)s)")
    p.add_argument("--fail-timeout", type=float, default=Passive.fail_timeout_s, metavar="SECONDS",
                   help="nginx fail_timeout (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(args, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
