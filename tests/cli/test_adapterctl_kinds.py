"""End to end, every kind: PEFT-made DoRA, IA3, prompt- and prefix-tuning adapters pushed
with `adapterctl push` and called over gRPC give PeftModel's greedy tokens on the same NF4
base; `adapterctl list` shows each kind; a weighted mix over gRPC equals PEFT's
add_weighted_adapter; bad adapters of each kind are refused at push with their exact codes,
and the server keeps serving."""

from __future__ import annotations

import json
import shutil

import adapterd_rules as check
import grpc
import peft.tuners.lora.dora
import pytest
import torch
from adapterctl.cli import main as adapterctl
from adapterd.config import CacheConfig, ModelConfig
from adapterd.engine.model import load_base_model
from adapterd.engine.parts import load_engine_parts
from adapterd.engine.variants import dense_weight
from adapterd.metrics import Metrics
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver
from adapterd_api.v1 import inference_pb2 as ipb
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from tests.engine_runs import greedy_by_forward
from tests.grpc_harness import RunningServer, request

MAX_RANK = 16
MAX_VIRTUAL = 6
NEW_TOKENS = 12
PROMPT = "def mean(xs):"
KINDS = ("dora", "ia3", "prompt_tuning", "prefix_tuning")


@pytest.fixture(scope="module")
def base(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    parts = load_engine_parts(ModelConfig(base_model=base), CacheConfig(gpu_slots=4, max_rank=MAX_RANK))
    registry = Registry(LocalStorage(tmp_path_factory.mktemp("registry")), max_rank=MAX_RANK, max_bytes=10 << 20,
                        max_virtual_tokens=MAX_VIRTUAL)
    metrics = Metrics(CollectorRegistry())
    s = RunningServer.start(parts, RegistryResolver(registry), registry=registry, metrics=metrics,
                            cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK))
    s.prometheus = metrics.registry
    yield s
    s.stop()


def _ctl(server, *argv) -> int:
    return adapterctl(["--addr", server.addr, *argv])


def _peft_greedy(base, adapter_dirs, prompt: str, mix=None) -> list[int]:
    """PeftModel on its own NF4 copy of the base: greedy tokens, one whole forward each (as
    in training). Not generate(): for prompt tuning it gives other tokens than its own
    forward after the first one (PEFT 0.21, transformers 5.24). PEFT's DoRA reads the base
    weight through our dense_weight: its own dequantization misreads the weights
    bitsandbytes repacked for its CPU kernel (see tests/numerics/test_adapter_kinds.py)."""
    from peft import PeftModel

    model, tokenizer, _ = load_base_model(base, device=torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(d, adapter_name=f"a{i}")
    if mix is not None:
        weights, combination = mix
        peft_model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination)
        peft_model.set_adapter("mix")
    peft_model.eval()
    return greedy_by_forward(peft_model, tokenizer(prompt)["input_ids"], NEW_TOKENS)[1]


@pytest.fixture
def fixed_peft_dora(monkeypatch):
    monkeypatch.setattr(peft.tuners.lora.dora, "dequantize_module_weight", dense_weight)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_pushed_and_served_as_peft(kind, server, base, kind_adapter_factory, capsys, fixed_peft_dora):
    adapter = kind_adapter_factory(base, "llama", kind, seed=51)
    assert _ctl(server, "push", str(adapter), "--name", f"k-{kind.replace('_', '-')}") == 0
    assert f"{kind}" in capsys.readouterr().out
    out = server.inference.Generate(request(PROMPT, f"k-{kind.replace('_', '-')}", max_new_tokens=NEW_TOKENS,
                                            ignore_eos=True))
    expected = _peft_greedy(base, [adapter], PROMPT)
    base_only = server.inference.Generate(request(PROMPT, "", max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert list(base_only.token_ids) != expected, "the adapter must change the tokens"
    assert list(out.token_ids) == expected
    tokenized = server.inference.Generate(request(PROMPT, "", max_new_tokens=1)).prompt_tokens
    assert out.prompt_tokens == tokenized  # the virtual tokens are not the caller's prompt

    resident = server.prometheus.get_sample_value(
        "adapterd_adapters_resident_by_kind", {"tier": "device", "kind": kind})
    assert resident == 1  # the metrics show the kind of what is in the slots

    assert _ctl(server, "list", "--json", "--name", f"k-{kind.replace('_', '-')}") == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["kind"] == kind
    assert row["virtual_tokens"] == (5 if kind.endswith("tuning") else 0)


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_mix_over_grpc_equals_peft(combination, server, base, adapter_factory, capsys):
    dirs = [adapter_factory(base, "llama", seed=52, rank=8, alpha=16), adapter_factory(base, "llama", seed=53, rank=8, alpha=8)]
    for i, d in enumerate(dirs):
        assert _ctl(server, "push", str(d), "--name", f"{combination}{i}") == 0
    capsys.readouterr()
    mix = ipb.GenerateRequest(prompt=PROMPT, params=ipb.GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                              adapters=[ipb.WeightedAdapter(adapter=f"{combination}0", weight=0.7),
                                        ipb.WeightedAdapter(adapter=f"{combination}1", weight=0.3)],
                              combination=combination)
    out = server.inference.Generate(mix)
    assert out.adapter == f"{combination}0@1*0.7+{combination}1@1*0.3"
    assert list(out.token_ids) == _peft_greedy(base, dirs, PROMPT, mix=([0.7, 0.3], combination))


def test_bad_mixes_are_invalid_argument(server, base, adapter_factory, kind_adapter_factory, capsys):
    assert _ctl(server, "push", str(adapter_factory(base, "llama", seed=54, rank=8)), "--name", "m-lora") == 0
    assert _ctl(server, "push", str(kind_adapter_factory(base, "llama", "ia3", seed=55)), "--name", "m-ia3") == 0
    capsys.readouterr()

    def mix(*parts, adapter="", combination="linear"):
        return ipb.GenerateRequest(prompt=PROMPT, adapter=adapter, combination=combination,
                                   params=ipb.GenerationParams(max_new_tokens=4),
                                   adapters=[ipb.WeightedAdapter(adapter=a, weight=w) for a, w in parts])

    for req, words in [
        (mix(("m-lora", 1.0), adapter="m-lora"), "not both"),
        (mix(("m-lora", 1.0), combination="ties"), "combination must be one of linear, cat"),
        (mix(("m-lora", 0.5), ("m-lora", 0.5)), "appears twice"),
        (mix(("m-lora", float("nan"))), "finite number"),
        (mix(("m-lora", 0.5), ("m-ia3", 0.5)), "kind ia3; only lora adapters can be mixed"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            server.inference.Generate(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
        assert words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        server.inference.Generate(mix(("m-lora", 0.5), ("nobody", 0.5)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _edit(src, dst, *, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / check.CONFIG_FILE).read_text())
        cfg.update(config)
        (dst / check.CONFIG_FILE).write_text(json.dumps(cfg))
    if tensors:
        t = load_file(dst / check.WEIGHTS_FILE)
        t = tensors(t)
        save_file(t, dst / check.WEIGHTS_FILE)
    return dst


def _nan_first(suffix):
    def edit(t):
        key = next(k for k in sorted(t) if k.endswith(suffix))
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
        return t
    return edit


def _bad(case, base, kind_adapter_factory, tmp):
    ia3, dora = kind_adapter_factory(base, "llama", "ia3", seed=56), kind_adapter_factory(base, "llama", "dora", seed=56)
    prompt = kind_adapter_factory(base, "llama", "prompt_tuning", seed=56)
    prefix = kind_adapter_factory(base, "llama", "prefix_tuning", seed=56)
    d = tmp / case
    if case == "ia3_wrong_shape":  # down_proj's vector is (1, in); the config says it scales the output
        return _edit(ia3, d, config={"feedforward_modules": ["up_proj"]})
    if case == "ia3_modules_to_save":
        return _edit(ia3, d, config={"modules_to_save": ["lm_head"]})
    if case == "ia3_nan":
        return _edit(ia3, d, tensors=_nan_first("ia3_l"))
    if case == "dora_missing_magnitude":
        return _edit(dora, d, tensors=lambda t: {k: v for k, v in t.items() if not k.endswith(
            "layers.1.self_attn.q_proj.lora_magnitude_vector")})
    if case == "dora_nan":
        return _edit(dora, d, tensors=_nan_first("lora_magnitude_vector"))
    if case == "prompt_too_many_virtual_tokens":
        return kind_adapter_factory(base, "llama", "prompt_tuning", seed=56, virtual_tokens=MAX_VIRTUAL + 1)
    if case == "prompt_missing_embeddings":
        return _edit(prompt, d, tensors=lambda t: {"prompt_embedding": t["prompt_embeddings"]})
    if case == "prompt_other_base":
        return _edit(prompt, d, config={"token_dim": 32}, tensors=lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :32].contiguous()})
    if case == "prefix_wrong_layers":
        return _edit(prefix, d, config={"num_layers": 3})
    raise AssertionError(case)


# (case, adapterctl's exit status: 10 + the gRPC code, words of the message)
BAD_KINDS = [
    ("ia3_wrong_shape", 13, "not in feedforward_modules"),
    ("ia3_modules_to_save", 13, "modules_to_save"),
    ("ia3_nan", 13, "NaN"),
    ("dora_missing_magnitude", 13, "no DoRA magnitude vector"),
    ("dora_nan", 13, "NaN"),
    ("prompt_too_many_virtual_tokens", 13, f"above this server's limit of {MAX_VIRTUAL}"),
    ("prompt_missing_embeddings", 13, "holds only 'prompt_embeddings'"),
    ("prompt_other_base", 19, "trained for another base model"),
    ("prefix_wrong_layers", 13, "has shape"),
]


@pytest.mark.parametrize("case,exit_code,words", BAD_KINDS)
def test_bad_adapters_of_each_kind_are_refused_at_push(case, exit_code, words, server, base, kind_adapter_factory,
                                                        tmp_path, capsys):
    d = _bad(case, base, kind_adapter_factory, tmp_path)
    assert _ctl(server, "push", str(d), "--name", "bad") == exit_code
    assert words in capsys.readouterr().err
    assert server.inference.Generate(request(PROMPT, "", max_new_tokens=2)).completion_tokens == 2
