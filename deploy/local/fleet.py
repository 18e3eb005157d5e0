"""A fleet of adapterd on one machine: replicas sharing one S3 registry, behind nginx.

    python deploy/local/fleet.py start               # S3 (moto) + 3 replicas + nginx + health sidecar
    python deploy/local/fleet.py status
    python deploy/local/fleet.py restart-replica 1   # start replica 1 again, same port and flags
    python deploy/local/fleet.py stop

What runs, all on 127.0.0.1, with its state (fleet.json) and logs in --run-dir:

    moto S3 server        the shared registry (s3_server.py: moto, its conditional writes atomic
                          as S3's are); skipped when --registry names your own S3
    replica-0 .. N-1      `adapterd serve`, each with its own port, metrics port and jobs dir
    nginx                 the gRPC balancer on --port: a consistent hash on the adapterd-adapter
                          header; /adapterd.v1.Training/ goes to replica-0, the training replica
    upstream_health.py    asks each replica's grpc.health.v1 and marks the ones not SERVING
                          `down` in nginx's upstream (nginx open source cannot)

`start` returns once every replica is SERVING and the balancer answers; the processes run
on in the background until `stop`. Flags after `--` go to every `adapterd serve`.
See deploy/local/README.md for how requests are routed and what a dying replica costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import upstream_health

HERE = Path(__file__).resolve().parent
STATE = "fleet.json"
BUCKET = "adapterd-fleet"
TRAINING_REPLICA = 0
# moto accepts any credentials; real S3 takes the usual AWS_* variables from your shell.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "fleet", "AWS_SECRET_ACCESS_KEY": "fleet", "AWS_DEFAULT_REGION": "us-east-1"}

NGINX_CONF = """\
# Written by deploy/local/fleet.py. The same routing as deploy/k8s/router.yaml (Envoy).
worker_processes 1;  # one worker: nginx's passive failure counts are per worker
daemon off;
pid {run}/nginx/nginx.pid;
error_log {run}/nginx/error.log notice;
events {{ worker_connections 4096; }}

http {{
    client_body_temp_path {run}/nginx/tmp/body;
    proxy_temp_path {run}/nginx/tmp/proxy;
    fastcgi_temp_path {run}/nginx/tmp/fastcgi;
    uwsgi_temp_path {run}/nginx/tmp/uwsgi;
    scgi_temp_path {run}/nginx/tmp/scgi;
    # One line per call: when it ended, how long it took, where it went (every replica tried,
    # in order), and its status (grpc-status in the trailers, or in the headers of an error).
    log_format grpc '$time_iso8601 $msec $request_time $request_uri adapter="$http_adapterd_adapter" '
                    'upstream="$upstream_addr" http=$status grpc=$sent_trailer_grpc_status '
                    'grpc_header=$sent_http_grpc_status';
    access_log {run}/nginx/access.log grpc;

    # The hash key: the adapter header when there is one; else a random key per request,
    # so List, Push and base-model calls spread (Envoy's ring hash does the same).
    map $http_adapterd_adapter $adapterd_hash_key {{
        ""      $request_id;
        default $http_adapterd_adapter;
    }}

    include {run}/nginx/upstream.conf;  # adapterd_serve, rewritten by upstream_health.py

    upstream adapterd_train {{
        server {train};
    }}

    server {{
        listen {host}:{port} http2;  # plaintext HTTP/2 (h2c), as gRPC clients speak it
        http2_max_concurrent_streams 1024;
        client_max_body_size 0;      # PushAdapter and CreateJob upload files; the server has its limits
        client_body_timeout 1h;
        grpc_read_timeout 1h;        # WatchJob and long streams stay open
        grpc_send_timeout 1h;
        grpc_connect_timeout 2s;
        # A replica that refuses the connection (dead, or draining) or resets it before
        # it answers: the call goes to the next one on the ring, if nothing was sent upstream
        # yet. Calls it had already taken are not replayed here (nginx cannot tell which
        # are idempotent); they fail with UNAVAILABLE and clients retry those that are.
        grpc_next_upstream error timeout;
        grpc_next_upstream_tries 3;

        location /adapterd.v1.Training/ {{
            grpc_pass grpc://adapterd_train;  # jobs live on the training replica
        }}
        location / {{
            grpc_pass grpc://adapterd_serve;
        }}

        # No replica could take the call: a gRPC status, not an HTML page.
        error_page 502 503 504 = @unavailable;
        location @unavailable {{
            default_type application/grpc;
            add_header grpc-status 14 always;
            add_header grpc-message "adapterd fleet: no replica could take the call; retry" always;
            return 204;
        }}
    }}
}}
"""


# ---- processes ----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    """True while the process runs. A zombie (killed, not yet reaped: the fleet's processes
    are nobody's children once `start` returns) counts as gone."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def spawn(proc: dict) -> int:
    """Start `proc` (argv, cwd, env overrides, log) in its own session; returns the pid."""
    Path(proc["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(proc["log"], "ab") as log:
        child = subprocess.Popen(
            proc["argv"], cwd=proc["cwd"], env={**os.environ, **proc.get("env", {})},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    proc["pid"] = child.pid
    return child.pid


def terminate(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send `sig`, wait up to `timeout` for the process to end, then SIGKILL it."""
    if not alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    wait_gone(pid, timeout)


def wait_gone(pid: int | None, timeout: float) -> None:
    """Wait up to `timeout` for the process to end, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def health(addr: str, timeout: float = 2.0) -> str:
    return upstream_health.check(addr, timeout)


def wait_serving(name: str, proc: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while health(proc["addr"]) != "SERVING":
        if not alive(proc["pid"]):
            raise SystemExit(f"{name} exited during start-up; its log ({proc['log']}) ends:\n{tail(proc['log'])}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} was not SERVING after {timeout:g} s; see {proc['log']}")
        time.sleep(0.2)


def tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- state --------------------------------------------------------------------------------


def load_state(run: Path) -> dict:
    try:
        return json.loads((run / STATE).read_text())
    except FileNotFoundError:
        raise SystemExit(f"no fleet in {run} (start one with: fleet.py start --run-dir {run})") from None


def save_state(run: Path, state: dict) -> None:
    upstream_health.write_atomically(run / STATE, json.dumps(state, indent=2) + "\n")


def replicas(state: dict) -> list[tuple[str, dict]]:
    return [(n, p) for n, p in state["processes"].items() if n.startswith("replica-")]


# ---- commands -----------------------------------------------------------------------------


def start(args: argparse.Namespace) -> int:
    run: Path = args.run_dir.resolve()
    if (run / STATE).exists() and any(alive(p.get("pid")) for p in load_state(run)["processes"].values()):
        raise SystemExit(f"a fleet is already running from {run}: `fleet.py stop --run-dir {run}` first")
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if nginx is None:
        raise SystemExit("nginx not found: install it (Debian: apt-get install nginx)")
    (run / "nginx" / "tmp").mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    port = args.port or free_port(host)
    state: dict = {"balancer": f"{host}:{port}", "registry_refresh_s": args.registry_refresh, "processes": {}}
    procs = state["processes"]
    try:
        registry, s3 = args.registry, []
        if registry is None:
            s3_port = free_port(host)
            procs["moto"] = {"argv": [sys.executable, str(HERE / "s3_server.py"), "-H", host, "-p", str(s3_port)],
                             "cwd": str(run), "env": MOTO_ENV, "log": str(run / "moto.log"),
                             "addr": f"http://{host}:{s3_port}"}
            spawn(procs["moto"])
            _wait_moto(procs["moto"])
            registry = f"s3://{BUCKET}/registry"
            s3 = ["--s3-endpoint", procs["moto"]["addr"], "--s3-region", MOTO_ENV["AWS_DEFAULT_REGION"]]
        state["registry"] = registry
        threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.replicas)
        # Long enough for the sidecar to see NOT_SERVING twice and reload nginx, with a margin.
        drain_delay = args.drain_delay if args.drain_delay is not None else 2 * args.health_interval + 1
        for i in range(args.replicas):
            rdir = run / f"replica-{i}"
            rdir.mkdir(parents=True, exist_ok=True)
            rport, mport = free_port(host), free_port(host)
            procs[f"replica-{i}"] = {
                "argv": [sys.executable, "-m", "adapterd", "serve", "--host", host, "--port", str(rport),
                         "--metrics-host", host, "--metrics-port", str(mport), "--base-model", str(args.base_model),
                         "--registry", registry, *s3, "--registry-refresh", str(args.registry_refresh),
                         "--jobs-dir", str(rdir / "jobs"), "--grace-period", str(args.grace_period),
                         "--drain-delay", str(drain_delay),
                         "--torch-threads", str(threads), *args.serve_args],
                "cwd": str(rdir), "env": (MOTO_ENV if "moto" in procs else {}) | {"OMP_NUM_THREADS": str(threads)},
                "log": str(rdir / "log"), "addr": f"{host}:{rport}", "metrics": f"http://{host}:{mport}/metrics",
            }
            spawn(procs[f"replica-{i}"])
        save_state(run, state)
        with ThreadPoolExecutor(args.replicas) as pool:
            list(pool.map(lambda r: wait_serving(r[0], r[1], args.start_timeout), replicas(state)))

        addrs = [p["addr"] for _, p in replicas(state)]
        upstream_health.write_atomically(run / "nginx" / "upstream.conf", upstream_health.render_upstream(addrs, set()))
        conf = run / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(run=run, host=host, port=port,
                                          train=procs[f"replica-{TRAINING_REPLICA}"]["addr"]))
        check = subprocess.run([nginx, "-t", "-q", "-p", str(run / "nginx"), "-c", str(conf),
                                "-e", str(run / "nginx" / "error.log")], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"nginx refused {conf}:\n{check.stderr}")
        procs["nginx"] = {"argv": [nginx, "-p", str(run / "nginx"), "-c", str(conf), "-e", str(run / "nginx" / "error.log")],
                          "cwd": str(run), "log": str(run / "nginx" / "stderr.log"), "addr": state["balancer"]}
        spawn(procs["nginx"])
        hc = ["--interval", str(args.health_interval), "--timeout", str(args.health_timeout)]
        procs["health"] = {"argv": [sys.executable, str(HERE / "upstream_health.py"),
                                    "--upstream-file", str(run / "nginx" / "upstream.conf"),
                                    "--nginx-pid-file", str(run / "nginx" / "nginx.pid"), *hc,
                                    *[f"--replica={a}" for a in addrs]],
                           "cwd": str(run), "log": str(run / "health.log")}
        spawn(procs["health"])
        save_state(run, state)
        wait_serving("the balancer", procs["nginx"], 30)
    except BaseException:
        _stop(state)
        (run / STATE).unlink(missing_ok=True)
        raise
    print(f"adapterd fleet: {args.replicas} replicas behind nginx at {state['balancer']}")
    print(f"registry {registry}" + (f" on {procs['moto']['addr']}" if "moto" in procs else ""))
    for name, p in replicas(state):
        print(f"  {name}  {p['addr']}  metrics {p['metrics']}  log {p['log']}")
    print(f"try:  adapterctl --addr {state['balancer']} generate 'Hello'")
    print(f"stop: {Path(sys.argv[0]).name} stop --run-dir {run}")
    return 0


def _wait_moto(proc: dict) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(proc["addr"] + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if not alive(proc["pid"]) or time.monotonic() > deadline:
                raise SystemExit(f"moto's S3 server did not start; see {proc['log']}") from None
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=proc["addr"], region_name=MOTO_ENV["AWS_DEFAULT_REGION"],
                 aws_access_key_id="fleet", aws_secret_access_key="fleet").create_bucket(Bucket=BUCKET)


def _stop(state: dict) -> None:
    """In order: the sidecar (so it reloads nothing), nginx (graceful: SIGQUIT lets calls in
    flight finish), the replicas (SIGTERM: each drains), the registry last."""
    procs = state["processes"]
    terminate(procs.get("health", {}).get("pid"), timeout=10)
    terminate(procs.get("nginx", {}).get("pid"), signal.SIGQUIT, timeout=15)
    with ThreadPoolExecutor(max(1, len(procs))) as pool:
        list(pool.map(_stop_replica, [p for _, p in replicas(state)]))
    terminate(procs.get("moto", {}).get("pid"), timeout=10)


DELAY_LINE = "(--drain-delay)"  # what `adapterd serve` logs as its drain delay begins


def _stop_replica(proc: dict) -> None:
    """SIGTERM; with the balancer gone there is nobody to wait for, so once the replica
    says it is in its --drain-delay, a second SIGTERM cuts the delay short. (A second
    signal after the delay would cut off calls in flight: it is sent only inside one.)"""
    pid = proc.get("pid")
    if not alive(pid):
        return
    argv = proc["argv"]
    delay = float(argv[argv.index("--drain-delay") + 1]) if "--drain-delay" in argv else 0.0
    seen = _count(proc["log"], DELAY_LINE)
    os.kill(pid, signal.SIGTERM)
    if delay >= 1.0:
        deadline = time.monotonic() + delay / 2
        while time.monotonic() < deadline and _count(proc["log"], DELAY_LINE) == seen:
            time.sleep(0.05)
        if _count(proc["log"], DELAY_LINE) > seen and time.monotonic() < deadline:
            os.kill(pid, signal.SIGTERM)
    wait_gone(pid, timeout=60)


def _count(path: str, text: str) -> int:
    try:
        return Path(path).read_text(errors="replace").count(text)
    except OSError:
        return 0


def stop(args: argparse.Namespace) -> int:
    run = args.run_dir.resolve()
    state = load_state(run)
    _stop(state)
    (run / STATE).unlink(missing_ok=True)
    print(f"adapterd fleet in {run} stopped (logs stay there)")
    return 0


def status(args: argparse.Namespace) -> int:
    state = load_state(args.run_dir.resolve())
    print(f"balancer {state['balancer']}, registry {state['registry']}")
    everything_up = True
    for name, p in state["processes"].items():
        up = alive(p.get("pid"))
        line = f"  {name:<10} pid {p.get('pid')}  {'running' if up else 'gone'}"
        if name.startswith("replica-") or name == "nginx":
            line += f"  {p['addr']}  {health(p['addr']) if up else ''}"
        everything_up &= up
        print(line)
    return 0 if everything_up else 1


def restart_replica(args: argparse.Namespace) -> int:
    run = args.run_dir.resolve()
    state = load_state(run)
    name = f"replica-{args.index}"
    proc = state["processes"].get(name)
    if proc is None:
        raise SystemExit(f"no {name} in this fleet")
    if alive(proc.get("pid")):
        raise SystemExit(f"{name} is running (pid {proc['pid']}); stop it first")
    spawn(proc)
    save_state(run, state)
    if not args.no_wait:
        wait_serving(name, proc, args.start_timeout)
    print(f"{name} started again on {proc['addr']} (pid {proc['pid']}); the health sidecar puts it back")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet.py", description=__doc__.split("\n")[0],
                                epilog="Flags after -- go to every `adapterd serve`.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=Path(".adapterd/fleet"),
                        help="state and logs (default: %(default)s)")
    commands = p.add_subparsers(dest="command", required=True)

    s = commands.add_parser("start", parents=[common], help="start the fleet; returns once it serves")
    s.add_argument("--replicas", type=int, default=3)
    s.add_argument("--port", type=int, default=50050, help="the balancer's port; 0 picks a free one (default: %(default)s)")
    s.add_argument("--base-model", type=Path, default=None,
                   help="the base model directory of every replica (default: the small random demo model)")
    s.add_argument("--registry", default=None, metavar="s3://BUCKET/PREFIX",
                   help="an S3 registry of your own (with --s3-endpoint etc. after --, and AWS_* variables); "
                   "default: a moto S3 server started here")
    s.add_argument("--registry-refresh", type=float, default=2.0, metavar="SECONDS",
                   help="how soon a replica sees a push made through another (default: %(default)s)")
    s.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="how long a replica drains on SIGTERM (default: %(default)s)")
    s.add_argument("--drain-delay", type=float, default=None, metavar="SECONDS",
                   help="each replica's --drain-delay (default: twice the health interval, plus 1 s)")
    s.add_argument("--torch-threads", type=int, default=0, help="per replica (default: the cores / replicas)")
    s.add_argument("--health-interval", type=float, default=1.0, metavar="SECONDS",
                   help="between health checks of the sidecar (default: %(default)s)")
    s.add_argument("--health-timeout", type=float, default=2.0, metavar="SECONDS")
    s.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS")
    s.set_defaults(func=start)

    commands.add_parser("stop", parents=[common], help="drain and stop everything").set_defaults(func=stop)
    commands.add_parser("status", parents=[common], help="what runs, and each replica's health").set_defaults(func=status)

    r = commands.add_parser("restart-replica", parents=[common], help="start a replica that died, with its old port and flags")
    r.add_argument("index", type=int)
    r.add_argument("--no-wait", action="store_true", help="return at once instead of when it is SERVING")
    r.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS")
    r.set_defaults(func=restart_replica)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.serve_args = serve_args
    if getattr(args, "base_model", "unset") is None:
        from adapterd.engine.demo import demo_model_dir

        args.base_model = demo_model_dir()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
