"""GenerateRequest.messages on the tiny models: rendered with the base model's chat
template (the generation prompt added), exactly one of prompt and messages, messages
refused on a model without a template, and the template's end-of-turn token ends
generation with finish EOS even where it is not the tokenizer's EOS."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import torch
from adapterd.config import CacheConfig, ModelConfig
from adapterd.engine.parts import load_engine_parts
from adapterd_api.v1 import inference_pb2 as pb
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.grpc_harness import RunningServer, request

CONVERSATION = [("system", "Be brief."), ("user", "hello"), ("assistant", "hi!"), ("user", "and now?")]


def chat(messages, **params) -> pb.GenerateRequest:
    params.setdefault("max_new_tokens", 8)
    return pb.GenerateRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
                              params=pb.GenerationParams(**params))


def _invalid(call, req) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call(req)
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def test_messages_are_the_prompt_the_chat_template_renders(serve, tiny_base):
    server = serve()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in CONVERSATION],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|user|>\nand now?<|end|>\n<|assistant|>\n")
    by_messages = server.inference.Generate(chat(CONVERSATION, max_new_tokens=12, ignore_eos=True))
    by_prompt = server.inference.Generate(request(rendered, max_new_tokens=12, ignore_eos=True))
    assert by_messages.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert list(by_messages.token_ids) == list(by_prompt.token_ids) and len(by_messages.token_ids) == 12
    streamed = list(server.inference.GenerateStream(chat(CONVERSATION, max_new_tokens=12, ignore_eos=True)))
    assert "".join(m.text for m in streamed) == by_messages.text


def test_exactly_one_of_prompt_and_messages(serve):
    server = serve()
    both = chat([("user", "hello")])
    both.prompt = "hello"
    for call in (server.inference.Generate, server.inference.GenerateStream):
        details = _invalid(call, both)
        assert "prompt" in details and "messages" in details and "not both" in details
        details = _invalid(call, pb.GenerateRequest(params=pb.GenerationParams(max_new_tokens=4)))
        assert "prompt must not be empty" in details and "messages" in details
        assert "messages[1].role" in _invalid(call, chat([("user", "hi"), ("robot", "beep")]))
    assert server.engine.stats()["queued"] == 0


@pytest.fixture(scope="module")
def untemplated_base(model_factory, tmp_path_factory):
    """The tiny Llama with its chat template removed."""
    path = tmp_path_factory.mktemp("no-template") / "llama"
    shutil.copytree(model_factory("llama"), path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


def _serve_base(base) -> RunningServer:
    cache = CacheConfig(gpu_slots=1, max_rank=16)
    return RunningServer.start(load_engine_parts(ModelConfig(base_model=base), cache), None, cache=cache)


def test_messages_on_a_model_without_a_chat_template(untemplated_base):
    server = _serve_base(untemplated_base)
    try:
        details = _invalid(server.inference.Generate, chat([("user", "hello")]))
        assert "messages" in details and "no chat template" in details and "prompt" in details
        assert server.inference.Generate(request("hello", max_new_tokens=2)).completion_tokens >= 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def end_of_turn_base(model_factory, tmp_path_factory):
    """The tiny Llama rebuilt to answer <|end|> (the template's end of turn, not the
    tokenizer's EOS) after any text: every embedding is one vector, the attention and MLP
    outputs are zero, so the final hidden state is that vector, and <|end|>'s output row
    points along it."""
    src = model_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id
    with torch.no_grad():
        v = torch.linspace(0.5, 1.5, model.config.hidden_size)
        model.model.embed_tokens.weight.copy_(v.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = v
    path = tmp_path_factory.mktemp("end-of-turn") / "llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, end


def test_the_end_of_turn_token_ends_generation_as_eos(end_of_turn_base):
    base, end = end_of_turn_base
    server = _serve_base(base)
    try:
        for req in (chat([("user", "hello")], max_new_tokens=8), request("plain text", max_new_tokens=8)):
            out = server.inference.Generate(req)
            assert out.finish_reason == pb.EOS and out.completion_tokens == 1, out
            assert "<|end|>" not in out.text
        # The same model runs to the limit where it is asked to ignore the end.
        out = server.inference.Generate(chat([("user", "hello")], max_new_tokens=8, ignore_eos=True))
        assert out.finish_reason == pb.LENGTH and list(out.token_ids) == [end] * 8
    finally:
        server.stop()
