"""A handle on a fleet started by deploy/local/fleet.py: its state file, each replica's
metrics, the balancer's upstream file and access log, and the script's own commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from adapterctl.client import Client
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "deploy" / "local" / "fleet.py"
TRAINING_REPLICA = "replica-0"  # fleet.py routes /adapterd.v1.Training/ there


def write_lora(base_dir: Path, out: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A PEFT LoRA adapter with random weights for the Llama at `base_dir`, written with
    numpy alone: the fleet test needs a valid adapter, not torch in the test process while
    three replicas load on the same cores."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.05).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM",
        "target_modules": sorted({m.split(".")[1] for m in shapes}), "base_model_name_or_path": str(base_dir),
    }))
    return out


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll until `predicate()` is truthy (and return it); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class LogLine:
    start: float  # seconds since the epoch, when nginx got the call
    uri: str
    adapter: str
    upstreams: list[str]  # every replica tried, in order
    http: int
    grpc: str  # the grpc-status sent, "-" when none

    @property
    def served_by(self) -> str:
        return self.upstreams[-1] if self.upstreams else ""


_LOG = re.compile(r'\S+ (?P<msec>[\d.]+) (?P<rt>[\d.]+) (?P<uri>\S+) adapter="(?P<adapter>[^"]*)" '
                  r'upstream="(?P<up>[^"]*)" http=(?P<http>\d+) grpc=(?P<grpc>\S+) grpc_header=(?P<grpc_h>\S+)')


class Fleet:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    # ---- the script ---------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(FLEET), *args, "--run-dir", str(self.run_dir)],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    @property
    def state(self) -> dict:
        return json.loads((self.run_dir / "fleet.json").read_text())

    @property
    def balancer(self) -> str:
        return self.state["balancer"]

    @property
    def replicas(self) -> dict[str, dict]:
        return {n: p for n, p in self.state["processes"].items() if n.startswith("replica-")}

    def name_of(self, addr: str) -> str:
        return next(n for n, p in self.replicas.items() if p["addr"] == addr)

    def alive(self, name: str) -> bool:
        pid = self.replicas[name]["pid"]
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.replicas[name]["pid"], sig)

    def restart(self, name: str, wait: bool = True) -> float:
        """Start a dead replica again; with `wait`, until the balancer routes to it again.
        Returns when the restart began (time.monotonic())."""
        t0 = time.monotonic()
        out = self.cli("restart-replica", name.removeprefix("replica-"), "--no-wait")
        assert out.returncode == 0, out.stderr + out.stdout
        if wait:
            self.wait_rejoined(name)
        return t0

    def wait_rejoined(self, name: str, timeout: float = 90, adapter: str | None = None) -> None:
        """Until the health sidecar marks `name` up again; with `adapter` (one the ring places
        on it), until a call for it is served there too: nginx applies the sidecar's change
        on a graceful reload, a moment after the file is written, and until then its old
        worker routes around the replica."""
        addr = self.replicas[name]["addr"]
        wait_for(lambda: self.alive(name) and addr not in self.down(), timeout, f"{name} back in the balancer")
        assert self.alive(name), f"{name} exited; its log ends: {self.replicas[name]['log']}"
        if adapter is not None:
            wait_for(lambda: set(self.placement([adapter], per_adapter=1)[adapter]) == {name}, 30,
                     f"the balancer to route {adapter} to {name}", every=0.1)

    def ensure_all_up(self) -> None:
        for name in self.replicas:
            if not self.alive(name):
                self.restart(name)
        wait_for(lambda: not self.down(), 30, "every replica up in the balancer")

    # ---- what the balancer does ---------------------------------------------------------

    def down(self) -> set[str]:
        """Replicas the health sidecar has marked down in nginx's upstream."""
        text = (self.run_dir / "nginx" / "upstream.conf").read_text()
        return set(re.findall(r"server (\S+) [^;]* down;", text))

    def access_log(self) -> list[LogLine]:
        lines = []
        for line in (self.run_dir / "nginx" / "access.log").read_text().splitlines():
            m = _LOG.match(line)
            if m is None:
                continue
            ups = [u.strip() for u in re.split(r"[,:]\s", m["up"]) if u.strip() and u.strip() != "-"]
            grpc = m["grpc"] if m["grpc"] != "-" else m["grpc_h"]
            lines.append(LogLine(float(m["msec"]) - float(m["rt"]), m["uri"], m["adapter"], ups, int(m["http"]), grpc))
        return lines

    # ---- each replica -------------------------------------------------------------------

    def client(self, name: str | None = None, timeout: float = 60) -> Client:
        """A client of the balancer, or of one replica directly."""
        return Client(self.replicas[name]["addr"] if name else self.balancer, timeout=timeout)

    def served(self, name: str) -> Counter:
        """adapterd_requests_total{code="OK"} of a replica, by adapter label."""
        with urllib.request.urlopen(self.replicas[name]["metrics"], timeout=5) as r:
            text = r.read().decode()
        out: Counter = Counter()
        for family in text_string_to_metric_families(text):
            if family.name == "adapterd_requests":
                for s in family.samples:
                    if s.name == "adapterd_requests_total" and s.labels.get("code") == "OK":
                        out[s.labels["adapter"]] += s.value
        return out

    def served_all(self) -> dict[str, Counter]:
        return {n: self.served(n) for n in self.replicas if self.alive(n)}

    def placement(self, adapters: list[str], per_adapter: int = 3) -> dict[str, Counter]:
        """Send `per_adapter` requests for each adapter through the balancer; returns, per
        adapter, how many each replica served (from the replicas' own metrics)."""
        before = self.served_all()
        with self.client() as c:
            for a in adapters:
                for i in range(per_adapter):
                    c.generate(f"where {i}", adapter=a, max_new_tokens=2)

        def counted():
            after = self.served_all()
            got = {a: Counter({n: after[n][a] - before.get(n, Counter())[a] for n in after
                               if after[n][a] - before.get(n, Counter())[a] > 0}) for a in adapters}
            return got if all(sum(c.values()) == per_adapter for c in got.values()) else None

        return wait_for(counted, 10, "the replicas' metrics to count every request")
