"""--max-total-tokens and --max-input-tokens come from the base model when not set: the tiny
Llama (max_position_embeddings 512) starts and serves with no limit flags; a flag above what
the model supports is refused at start-up, naming both numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from adapterd.config import CacheConfig, ConfigError, SchedulerConfig
from adapterd.engine.loop import EngineLoop

from tests.grpc_harness import RunningServer, request


def test_a_512_position_model_serves_with_no_limit_flags(parts_for):
    parts = parts_for(8)
    assert parts.model.config.max_position_embeddings == 512
    server = RunningServer.start(parts, None, scheduler=SchedulerConfig())  # what `serve` gets with no flags
    try:
        assert (server.engine.config.max_input_tokens, server.engine.config.max_total_tokens) == (511, 512)
        out = server.inference.Generate(request("x" * 400, max_new_tokens=112, ignore_eos=True))
        assert (out.prompt_tokens, out.completion_tokens) == (400, 112)  # 512 in all: the model's whole window
        with pytest.raises(grpc.RpcError) as e:
            server.inference.Generate(request("x" * 400, max_new_tokens=113))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max total tokens (512)" in e.value.details()
    finally:
        server.stop()


def test_an_explicit_limit_above_the_model_is_refused_naming_both_numbers(parts_for):
    engine = EngineLoop(parts_for(8), None, SchedulerConfig(max_total_tokens=4096), CacheConfig(gpu_slots=8, max_rank=16))
    engine.start()
    with pytest.raises(ConfigError, match=r"--max-total-tokens 4096 exceeds the base model's max_position_embeddings \(512\)"):
        engine.wait_ready(timeout=60)
    engine.stop()


def test_limits_from_the_model_within_the_defaults():
    assert SchedulerConfig().for_model(8192) == SchedulerConfig(max_input_tokens=1024, max_total_tokens=2048)
    assert SchedulerConfig().for_model(None) == SchedulerConfig(max_input_tokens=1024, max_total_tokens=2048)
    # A flag the model allows is kept, and the other limit makes room for it.
    assert SchedulerConfig(max_input_tokens=3000).for_model(8192).max_total_tokens == 3001
    assert SchedulerConfig(max_total_tokens=600).for_model(8192).max_input_tokens == 599
    with pytest.raises(ConfigError, match=r"--max-input-tokens 512 .* max_position_embeddings \(512\)"):
        SchedulerConfig(max_input_tokens=512).for_model(512)


def test_serve_refuses_to_start_with_a_limit_above_the_model(tiny_base, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "adapterd", "serve", "--port", "0", "--base-model", str(tiny_base),
         "--max-total-tokens", "4096", "--metrics-port", "-1", "--registry", str(tmp_path / "registry"),
         "--jobs-dir", str(tmp_path / "jobs"), "--max-batch-size", "2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "--max-total-tokens 4096 exceeds the base model's max_position_embeddings (512)" in done.stderr
