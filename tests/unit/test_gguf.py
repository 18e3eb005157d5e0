"""GGUF base models: a tiny GGUF written here with the `gguf` package (the tiny random Llama,
its weights in float32, q/k permuted as llama.cpp writes them) converts into a directory
whose logits equal the float model's; the conversion is cached by the file's sha256; a
truncated or foreign file gets an error naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from adapterd.engine.gguf import CorruptGguf, UnsupportedGguf, converted_dir
from adapterd.engine.model import base_model_dir, load_base_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q and k (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    import gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = tok.convert_ids_to_tokens(list(range(c.vocab_size)))
    special = set(tok.all_special_ids)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(c.vocab_size)])  # 3: control
    w.add_token_scores([0.0] * c.vocab_size)  # no merges: transformers derives none from single bytes
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(model_factory, tmp_path_factory) -> tuple[Path, Path]:
    """(the float model's directory, the same model as a GGUF file)."""
    base = model_factory("llama")
    return base, write_llama_gguf(base, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_converted_gguf_gives_the_float_models_logits_and_tokens(tiny_gguf, tmp_path):
    base, path = tiny_gguf
    converted = base_model_dir(path, cache_dir=tmp_path)  # what --base-model FILE.gguf does
    assert converted.parent == tmp_path and (converted / "model.safetensors").is_file()

    cpu = torch.device("cpu")
    ref, ref_tok, _ = load_base_model(base, device=cpu, quantization="none")
    got, got_tok, spec = load_base_model(converted, device=cpu, quantization="none")
    text = "<|user|>\nhello, GGUF<|end|>\n<|assistant|>\n"
    ids = ref_tok(text, return_tensors="pt")["input_ids"]
    assert got_tok(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert got_tok.chat_template == ref_tok.chat_template
    assert got.config.max_position_embeddings == ref.config.max_position_embeddings
    assert spec.linear_shapes == {k: v for k, v in _linear_shapes(ref).items()}
    # And it loads in NF4 like any directory.
    quantized, _, _ = load_base_model(converted, device=cpu)
    with torch.no_grad():
        assert quantized(ids).logits.argmax(-1).shape == ids.shape


def _linear_shapes(model) -> dict:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def test_second_start_reuses_the_conversion_keyed_by_sha256(tiny_gguf, model_factory, tmp_path):
    _, path = tiny_gguf
    lines: list[str] = []
    first = converted_dir(path, tmp_path, progress=lines.append)
    assert len(lines) == 2 and "converting tiny-llama.F32.gguf" in lines[0] and "converted" in lines[1]
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    lines.clear()
    again = converted_dir(path, tmp_path, progress=lines.append)
    assert again == first and lines == []  # no conversion, no progress line
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    # Another file under the same name is another model: a directory of its own.
    other = write_llama_gguf(model_factory("llama", seed=1), tmp_path / "elsewhere.gguf")
    renamed = tmp_path / "same-name" / path.name
    renamed.parent.mkdir()
    renamed.write_bytes(other.read_bytes())
    assert converted_dir(renamed, tmp_path, progress=lines.append) != first


@pytest.mark.parametrize("keep", [0.5, 0.99, 64 / 10**9])
def test_truncated_gguf_is_refused_with_the_file_named(tiny_gguf, tmp_path, keep):
    _, path = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(16, int(len(data) * keep))])
    cache = tmp_path / "cache"
    with pytest.raises(CorruptGguf) as e:
        base_model_dir(cut, cache_dir=cache)
    assert str(cut) in str(e.value) and ("truncated" in str(e.value) or "not a complete GGUF" in str(e.value))
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-converted left behind


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    with pytest.raises(CorruptGguf, match="not a complete GGUF file"):
        base_model_dir(junk, cache_dir=tmp_path / "cache")


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "frobnitz")
    w.add_name("odd")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGguf, match="architecture 'frobnitz'"):
        converted_dir(path, tmp_path / "cache")
