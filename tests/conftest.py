"""Shared fixtures: tiny random models built from configs, and random PEFT adapters.

Nothing is downloaded. Models are written once per test session into a temp directory
with the byte-level tokenizer of the demo model; every quantized out_features is a
multiple of 32 (bitsandbytes' CPU path needs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# initializer_range 0.2: peaky logits, so greedy comparisons are not decided by near-ties.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, partial_rotary_factor=0.5, initializer_range=0.2),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                   bias=False, new_decoder_architecture=False, multi_query=True, initializer_range=0.2),
}
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _vocab():
    from adapterd.engine.demo import VOCAB_SIZE

    return VOCAB_SIZE


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(arch) -> directory of a tiny random model of that architecture."""
    from adapterd.engine.demo import save_random_model

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = f"{arch}-{seed}"
        if key not in built:
            built[key] = save_random_model(root / key, arch, dict(TINY[arch], vocab_size=_vocab()), seed)
        return built[key]

    return make


def make_peft_adapter(base_dir: Path, out_dir: Path, *, arch: str, seed: int, rank: int = 8,
                      alpha: int = 16, targets: list[str] | None = None, use_rslora: bool = False) -> Path:
    """Train nothing: a PEFT LoRA adapter with random A and B (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS[arch],
                        init_lora_weights=False, use_rslora=use_rslora, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# IA3 on these, the feedforward ones (input-scaled) first; on Llama also up_proj, one of the
# gate/up siblings whose base layers otherwise run as one fused call.
IA3_TARGETS = {
    "llama": (["up_proj", "down_proj"], ["k_proj", "v_proj"]),
    "phi": (["fc2"], ["k_proj", "v_proj", "dense"]),
    "falcon": (["dense_4h_to_h"], ["query_key_value"]),
}


def make_kind_adapter(base_dir: Path, out_dir: Path, *, arch: str, kind: str, seed: int,
                      virtual_tokens: int = 5) -> Path:
    """A PEFT adapter of `kind` (dora, ia3, prompt_tuning, prefix_tuning) with random,
    non-identity weights, saved as PEFT saves it."""
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    if kind == "dora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                            use_dora=True, lora_dropout=0.0)
    elif kind == "ia3":
        ff, other = IA3_TARGETS[arch]
        config = IA3Config(target_modules=ff + other, feedforward_modules=ff, init_ia3_weights=False)
    elif kind == "prompt_tuning":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    elif kind == "prefix_tuning":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    else:
        raise ValueError(kind)
    peft_model = get_peft_model(model, config)
    if kind == "dora":  # PEFT starts the magnitudes at ||W||, where DoRA is LoRA rescaled by 1: move them
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.5 * torch.rand_like(p))
    if kind == "ia3":  # PEFT's random init is N(0, 1): far from a trained IA3's ~1, and sign-flipping
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def kind_adapter_factory(tmp_path_factory):
    """kind_adapter_factory(base_dir, arch, kind, seed, **kw) -> an adapter directory (cached)."""
    root = tmp_path_factory.mktemp("kind-adapters")
    built: dict[tuple, Path] = {}

    def make(base_dir: Path, arch: str, kind: str, seed: int = 0, **kw) -> Path:
        key = (str(base_dir), arch, kind, seed, tuple(sorted(kw.items())))
        if key not in built:
            built[key] = make_kind_adapter(base_dir, root / f"{arch}-{kind}-{len(built)}", arch=arch, kind=kind,
                                           seed=seed, **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """adapter_factory(base_dir, arch, seed, **kw) -> a PEFT adapter directory (cached)."""
    root = tmp_path_factory.mktemp("adapters")
    built: dict[tuple, Path] = {}

    def make(base_dir: Path, arch: str, seed: int, **kw) -> Path:
        key = (str(base_dir), arch, seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in built:
            built[key] = make_peft_adapter(base_dir, root / f"{arch}-{seed}-{len(built)}", arch=arch, seed=seed, **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's standalone server, its conditional writes made
    atomic as S3's are: deploy/local/s3_server.py) on loopback, for the session. Yields its
    endpoint URL; each test makes its own bucket."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    server = Path(__file__).resolve().parent.parent / "deploy" / "local" / "s3_server.py"
    proc = subprocess.Popen([sys.executable, str(server), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """(endpoint, bucket): a fresh bucket on the loopback S3 server, with test credentials."""
    import uuid

    import boto3

    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=bucket)
    return s3_endpoint, bucket


# Whole modules of slow tests, marked here rather than test by test: each starts training
# worker processes, trains in the test's process, or serves the real model. Single slow
# tests elsewhere carry @pytest.mark.slow. `make test-fast` leaves both out.
SLOW_MODULES = ("tests/training/", "tests/grpc/test_training.py", "tests/unit/test_training_worker.py", "tests/real/")


def pytest_collection_modifyitems(config, items):
    """Slow modules are marked slow. GPU tests run where CUDA is, and are skipped with a
    reason everywhere else."""
    root = config.rootpath
    for item in items:
        where = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if where.startswith(SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
