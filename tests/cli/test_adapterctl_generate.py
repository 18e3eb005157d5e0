"""`adapterctl generate` and `adapterctl health` against a real server: the text alone on
stdout, --stream and --json, and one clear stderr line with a distinct exit status per
status code. adapterctl itself never imports torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from adapterctl.cli import main as adapterctl
from adapterd.config import CacheConfig, ModelConfig
from adapterd.engine.parts import load_engine_parts
from adapterd.registry.store import Registry, RegistryResolver, open_storage

from tests.grpc_harness import RunningServer, request

MAX_RANK = 16


@pytest.fixture(scope="module")
def server(model_factory, adapter_factory, tmp_path_factory):
    base = model_factory("llama")
    parts = load_engine_parts(ModelConfig(base_model=base), CacheConfig(gpu_slots=2, max_rank=MAX_RANK))
    registry = Registry(open_storage(tmp_path_factory.mktemp("cli-registry")), spec=parts.spec, max_rank=MAX_RANK)
    registry.push("default", "helper", adapter_factory(base, "llama", seed=11, rank=8))
    s = RunningServer.start(parts, RegistryResolver(registry), cache=CacheConfig(gpu_slots=2, max_rank=MAX_RANK))
    yield s
    s.stop()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = adapterctl(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_text_alone(server, capsys):
    expected = server.inference.Generate(request("Hello", adapter="helper", max_new_tokens=12)).text
    code, out, err = _run(capsys, "--addr", server.addr, "generate", "--adapter", "helper",
                          "--max-new-tokens", "12", "Hello")
    assert (code, out, err) == (0, expected + "\n", "")
    code, out, _ = _run(capsys, "--addr", server.addr, "generate", "--adapter", "helper",
                        "--max-new-tokens", "12", "--stream", "Hello")
    assert (code, out) == (0, expected + "\n")


def test_generate_reads_the_prompt_from_stdin_and_the_address_from_the_environment(server, capsys, monkeypatch):
    expected = server.inference.Generate(request("from stdin", max_new_tokens=5)).text
    monkeypatch.setenv("ADAPTERD_ADDR", server.addr)
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    code, out, _ = _run(capsys, "generate", "--max-new-tokens", "5", "-")
    assert (code, out) == (0, expected + "\n")


def test_generate_json(server, capsys):
    code, out, _ = _run(capsys, "--addr", server.addr, "generate", "--adapter", "helper",
                        "--max-new-tokens", "6", "--logprobs", "--json", "Hello")
    assert code == 0
    body = json.loads(out)
    assert body["adapter"] == "helper@1" and body["prompt_tokens"] == 5
    assert len(body["token_ids"]) == len(body["logprobs"]) == body["completion_tokens"]
    assert body["finish_reason"] in ("LENGTH", "EOS")

    code, out, _ = _run(capsys, "--addr", server.addr, "generate", "--adapter", "helper",
                        "--max-new-tokens", "6", "--stream", "--json", "Hello")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == body["completion_tokens"]
    assert "".join(m["text"] for m in lines) == body["text"]
    assert lines[-1]["finish_reason"] == body["finish_reason"]


@pytest.mark.parametrize("argv, status, exit_code", [
    (["generate", "--adapter", "nobody", "x"], "NOT_FOUND", 15),
    (["generate", "--max-new-tokens", "0", "x"], "INVALID_ARGUMENT", 13),
    (["generate", "--top-p", "1.5", "x"], "INVALID_ARGUMENT", 13),
    (["generate", "--temperature", "-1", "x"], "INVALID_ARGUMENT", 13),
])
def test_errors_are_one_line_with_a_distinct_exit_status(server, capsys, argv, status, exit_code):
    code, out, err = _run(capsys, "--addr", server.addr, *argv)
    assert code == exit_code and out == ""
    assert err.startswith(f"adapterctl: {status}: ") and err.count("\n") == 1


def test_deadline_and_unreachable_server(server, capsys):
    code, _, err = _run(capsys, "--addr", server.addr, "--timeout", "0.05", "generate",
                        "--max-new-tokens", "240", "--ignore-eos", "keep going")
    assert code == 14 and err.startswith("adapterctl: DEADLINE_EXCEEDED") and "--timeout" in err
    code, _, err = _run(capsys, "--addr", "127.0.0.1:1", "generate", "x")
    assert code == 24 and err.startswith("adapterctl: UNAVAILABLE") and "127.0.0.1:1" in err
    assert err.count("\n") == 1


def test_health(server, capsys):
    assert _run(capsys, "--addr", server.addr, "health") == (0, "SERVING\n", "")
    code, out, _ = _run(capsys, "--addr", server.addr, "health", "--service", "adapterd.v1.Inference")
    assert (code, out) == (0, "SERVING\n")


def test_adapterctl_needs_no_torch():
    script = (
        "import sys\n"
        "from adapterctl import cli, client\n"
        "cli.build_parser()\n"
        "assert 'torch' not in sys.modules and 'adapterd' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
