"""Adapter checks: every bad adapter gets its own typed error and a message naming the
problem; good PEFT adapters on tiny Llama, Phi and Falcon load to the exact A/B PEFT uses."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import adapterd_rules as check
import pytest
import torch
from adapterd import errors
from adapterd.engine.demo import save_random_model
from adapterd.engine.model import ModelSpec, model_spec
from adapterd.registry.validate import read_adapter, validate_adapter_files
from safetensors.torch import load_file, save, save_file

ARCHS = {
    "llama": (
        dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "phi": (
        dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    ),
    "falcon": (
        dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
}
MAX_RANK = 16


def _peft_adapter(root: Path, arch: str, out: str, **lora_kwargs):
    """A base model of `arch` (full precision), its spec, and a saved PEFT adapter dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, targets = ARCHS[arch]
    base_dir = root / arch
    if not (base_dir / "config.json").exists():
        save_random_model(base_dir, arch, cfg, seed=0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    spec = model_spec(model, base_dir)
    torch.manual_seed(1)
    lora = LoraConfig(init_lora_weights=False, target_modules=targets, **lora_kwargs)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(root / out)
    return spec, peft_model, root / out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    return {arch: _peft_adapter(root, arch, f"{arch}-lora", r=4, lora_alpha=8) for arch in ARCHS}


@pytest.fixture
def llama(tiny, tmp_path):
    """A fresh copy of the good Llama adapter to break, and the Llama spec."""
    spec, _, src = tiny["llama"]
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return spec, dst


def _config(d: Path) -> dict:
    return json.loads((d / check.CONFIG_FILE).read_text())


def _set_config(d: Path, **changes) -> None:
    cfg = _config(d)
    cfg.update(changes)
    (d / check.CONFIG_FILE).write_text(json.dumps(cfg))


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _edit_header(d: Path, fn) -> None:
    w = d / check.WEIGHTS_FILE
    header, data = _split(w.read_bytes())
    fn(header)
    w.write_bytes(_join(header, data))


def _first_key(d: Path, suffix: str = "lora_A.weight") -> str:
    header, _ = _split((d / check.WEIGHTS_FILE).read_bytes())
    return sorted(k for k in header if k.endswith(suffix))[0]


def _raises(cls, match: str, d: Path, spec: ModelSpec, **kw):
    with pytest.raises(cls, match=match) as info:
        read_adapter(d, spec, kw.pop("max_rank", MAX_RANK), **kw)
    assert type(info.value) is cls, f"expected exactly {cls.__name__}, got {type(info.value).__name__}"
    return info.value


# ---- good adapters ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_adapter_loads_exactly(tiny, arch):
    spec, peft_model, d = tiny[arch]
    w = read_adapter(d, spec, MAX_RANK)
    assert w.rank == 4 and w.alpha == 8 and w.scaling == 2.0
    assert w.target_modules == sorted(ARCHS[arch][1])
    assert set(w.tensors) <= set(spec.linear_shapes)
    assert len(w.tensors) == len(ARCHS[arch][1]) * 2  # every target in both layers
    modules = dict(peft_model.named_modules())
    x = torch.randn(3, 64)
    for path, (a, b) in w.tensors.items():
        in_f, out_f = spec.linear_shapes[path]
        assert a.shape == (4, in_f) and b.shape == (out_f, 4)
        assert a.dtype == torch.float32 and a.device.type == "cpu"
        layer = modules["base_model.model." + path]
        torch.testing.assert_close(a, layer.lora_A["default"].weight)
        torch.testing.assert_close(b, layer.lora_B["default"].weight)
        assert layer.scaling["default"] == w.scaling
        if in_f == 64:  # the reference: base(x) + scale * (x @ A.T) @ B.T equals PEFT's layer
            with torch.no_grad():
                expected = layer(x)
                ours = layer.base_layer(x) + w.scaling * (x @ a.T) @ b.T
            torch.testing.assert_close(ours, expected)
    assert len(w.sha256) == 64 and w.nbytes > 0


def test_rslora_scaling(tmp_path):
    spec, peft_model, d = _peft_adapter(tmp_path, "llama", "rs", r=4, lora_alpha=8, use_rslora=True)
    w = read_adapter(d, spec, MAX_RANK)
    assert w.scaling == pytest.approx(8 / math.sqrt(4)) == 4.0
    layer = dict(peft_model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.scaling["default"] == pytest.approx(w.scaling)


def test_bytes_and_path_agree(tiny):
    spec, _, d = tiny["llama"]
    cfg, weights = (d / check.CONFIG_FILE).read_bytes(), d / check.WEIGHTS_FILE
    a = validate_adapter_files(cfg, weights, spec, MAX_RANK)
    b = validate_adapter_files(cfg, weights.read_bytes(), spec, MAX_RANK)
    assert a.modules == b.modules and a.nbytes == b.nbytes


def test_same_files_same_digest_and_changed_files_differ(llama, tiny):
    spec, d = llama
    first = read_adapter(d, spec, MAX_RANK).sha256
    assert read_adapter(tiny["llama"][2], spec, MAX_RANK).sha256 == first
    _set_config(d, lora_alpha=16)
    assert read_adapter(d, spec, MAX_RANK).sha256 != first


def test_adapter_name_infix_and_half_precision_are_tolerated(llama):
    spec, d = llama
    w = d / check.WEIGHTS_FILE
    tensors = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight"): v.to(torch.bfloat16)
               for k, v in load_file(w).items()}
    save_file(tensors, w)
    got = read_adapter(d, spec, MAX_RANK)
    assert len(got.tensors) == 14 and next(iter(got.tensors.values()))[0].dtype == torch.float32


def test_fan_in_fan_out_on_linear_is_ignored_like_peft(llama):
    # PEFT resets fan_in_fan_out to False for nn.Linear (it only means something for Conv1D).
    spec, d = llama
    _set_config(d, fan_in_fan_out=True)
    assert read_adapter(d, spec, MAX_RANK).rank == 4


# ---- the files ----------------------------------------------------------------------------


def test_pickled_bin_is_refused_with_how_to_convert(llama):
    spec, d = llama
    (d / check.WEIGHTS_FILE).rename(d / "adapter_model.bin")
    e = _raises(errors.PickledWeights, "never loaded", d, spec)
    assert "safe_serialization=True" in str(e) and "save_file" in str(e)
    assert e.code == "INVALID_ARGUMENT"


def test_missing_files(llama):
    spec, d = llama
    (d / check.CONFIG_FILE).unlink()
    _raises(errors.InvalidAdapter, "no adapter_config.json", d, spec)
    (d / check.WEIGHTS_FILE).unlink()
    _raises(errors.InvalidAdapter, "no adapter_model.safetensors", d, spec)


def test_symlink_out_of_the_directory_is_refused(llama, tmp_path):
    spec, d = llama
    outside = tmp_path / "elsewhere.safetensors"
    (d / check.WEIGHTS_FILE).rename(outside)
    os.symlink(outside, d / check.WEIGHTS_FILE)
    _raises(errors.InvalidAdapter, "link out of", d, spec)


# ---- adapter_config.json ------------------------------------------------------------------


def test_config_not_json(llama):
    spec, d = llama
    (d / check.CONFIG_FILE).write_text("{not json")
    _raises(errors.InvalidAdapter, "not valid JSON", d, spec)
    (d / check.CONFIG_FILE).write_text("[1, 2]")
    _raises(errors.InvalidAdapter, "must be a JSON object", d, spec)


def test_config_without_peft_type(llama):
    spec, d = llama
    cfg = _config(d)
    del cfg["peft_type"]
    (d / check.CONFIG_FILE).write_text(json.dumps(cfg))
    _raises(errors.InvalidAdapter, "no peft_type", d, spec)


def test_not_lora(llama):
    spec, d = llama
    _set_config(d, peft_type="ADALORA")
    _raises(errors.UnsupportedAdapter, "'ADALORA' is not supported: this server serves LORA", d, spec)


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("bias", "all", "bias='all'"),
        ("bias", "lora_only", "bias='lora_only'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": 32}, "alpha_pattern"),
        ("lora_bias", True, "lora_bias"),
        ("use_qalora", True, "QALoRA"),
        ("trainable_token_indices", [1, 2], "trainable_token_indices"),
        ("alora_invocation_tokens", [5, 6], "activated LoRA"),
    ],
)
def test_options_that_change_numerics_are_refused(llama, option, value, match):
    spec, d = llama
    _set_config(d, **{option: value})
    _raises(errors.UnsupportedAdapter, match, d, spec)


def test_rank_above_max(llama):
    spec, d = llama
    e = _raises(errors.UnsupportedAdapter, r"r=4 is above this server's max rank 2", d, spec, max_rank=2)
    assert "--max-rank" in str(e)


@pytest.mark.parametrize("r", [0, -1, "4", True, None])
def test_bad_rank_value(llama, r):
    spec, d = llama
    _set_config(d, r=r)
    _raises(errors.InvalidAdapter, "r must be a positive integer", d, spec)


def test_rank_in_config_disagrees_with_tensors(llama):
    spec, d = llama
    _set_config(d, r=8)
    _raises(errors.InvalidAdapter, "do not have the rank r=8", d, spec)


# ---- against the base model ---------------------------------------------------------------


def test_unknown_target_module(llama):
    spec, d = llama
    key = _first_key(d)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    bogus = module.rsplit(".", 1)[0] + ".foo_proj"

    def rename(h):
        for ab in ("A", "B"):
            h[f"base_model.model.{bogus}.lora_{ab}.weight"] = h.pop(f"base_model.model.{module}.lora_{ab}.weight")

    _edit_header(d, rename)
    e = _raises(errors.UnknownTargetModule, "foo_proj", d, spec)
    assert "q_proj" in str(e)  # says which modules exist
    assert e.code == "INVALID_ARGUMENT"


def test_lora_on_lm_head_is_refused(llama):
    spec, d = llama
    w = d / check.WEIGHTS_FILE
    t = load_file(w)
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    t["base_model.model.lm_head.lora_B.weight"] = torch.zeros(320, 4)
    save_file(t, w)
    _raises(errors.UnknownTargetModule, "lm_head is not supported", d, spec)


def test_adapter_for_another_base_model(tiny):
    llama_spec = tiny["llama"][0]
    falcon_dir = tiny["falcon"][2]
    e = _raises(errors.AdapterMismatch, "trained for another base model", falcon_dir, llama_spec)
    assert e.code == "FAILED_PRECONDITION"


def test_shapes_of_another_base_model(llama):
    spec, d = llama
    shapes = {k: (in_f * 2, out_f) for k, (in_f, out_f) in spec.linear_shapes.items()}
    wider = ModelSpec("wider", "x" * 64, shapes)
    _raises(errors.AdapterMismatch, r"down_proj takes 128 -> 64 features in the adapter, 256 -> 64 in the served base model", d, wider)


def test_embedding_lora_is_refused(llama):
    spec, d = llama
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320),
               "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 4)}, d / check.WEIGHTS_FILE)
    _raises(errors.UnknownTargetModule, "embeddings", d, spec)


def test_dora_magnitude_without_use_dora_is_refused(llama):
    spec, d = llama
    _edit_header(d, lambda h: h.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        h.pop(_first_key(d))))
    _raises(errors.InvalidAdapter, "does not set use_dora", d, spec)


def test_non_lora_tensor_is_refused(llama):
    spec, d = llama
    _edit_header(d, lambda h: h.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.bias", h.pop(_first_key(d))))
    _raises(errors.UnsupportedAdapter, "not a LoRA A/B weight", d, spec)


def test_lora_a_without_b(llama):
    spec, d = llama
    t = load_file(d / check.WEIGHTS_FILE)
    del t[_first_key(d, "lora_B.weight")]
    save_file(t, d / check.WEIGHTS_FILE)
    _raises(errors.InvalidAdapter, "has lora_A but no lora_B", d, spec)


def test_adapter_touching_no_module(llama):
    spec, d = llama
    (d / check.WEIGHTS_FILE).write_bytes(save({}))
    _raises(errors.InvalidAdapter, "touch no module", d, spec)


def test_non_finite_weights(llama):
    spec, d = llama
    t = load_file(d / check.WEIGHTS_FILE)
    k = _first_key(d)
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    save_file(t, d / check.WEIGHTS_FILE)
    _raises(errors.InvalidAdapter, "NaN or infinite", d, spec)


def test_too_large(llama):
    spec, d = llama
    e = _raises(errors.AdapterTooLarge, "above this server's limit of 1000", d, spec, max_bytes=1000)
    assert e.code == "RESOURCE_EXHAUSTED"


# ---- safetensors --------------------------------------------------------------------------


def _corrupt(d: Path, blob: bytes) -> None:
    (d / check.WEIGHTS_FILE).write_bytes(blob)


def _blob(d: Path) -> bytes:
    return (d / check.WEIGHTS_FILE).read_bytes()


def test_truncated_file(llama):
    spec, d = llama
    _corrupt(d, _blob(d)[:-10])
    _raises(errors.CorruptSafetensors, "truncated", d, spec)
    _corrupt(d, _blob(d)[:5])
    _raises(errors.CorruptSafetensors, "too short", d, spec)


def test_truncated_inside_header(llama):
    spec, d = llama
    _corrupt(d, _blob(d)[:40])
    _raises(errors.CorruptSafetensors, "runs past the end", d, spec)


def test_oversized_header(llama):
    spec, d = llama
    _corrupt(d, struct.pack("<Q", 200_000_000) + b"{}" + b" " * 100)
    _raises(errors.CorruptSafetensors, "above the 100000000-byte limit", d, spec)


def test_header_not_json(llama):
    spec, d = llama
    _corrupt(d, struct.pack("<Q", 6) + b"{oops}")
    _raises(errors.CorruptSafetensors, "header is not valid JSON", d, spec)


def test_trailing_bytes(llama):
    spec, d = llama
    _corrupt(d, _blob(d) + b"junk")
    _raises(errors.CorruptSafetensors, "bytes after the last tensor", d, spec)


def test_offsets_out_of_range(llama):
    spec, d = llama
    k = _first_key(d)

    def shift(h):
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 10**9, e + 10**9]

    _edit_header(d, shift)
    _raises(errors.CorruptSafetensors, "a gap|truncated", d, spec)


def test_overlapping_offsets(llama):
    spec, d = llama
    keys = sorted(k for k in _split(_blob(d))[0] if k != "__metadata__")

    def overlap(h):
        h[keys[1]]["data_offsets"] = list(h[keys[0]]["data_offsets"])
        h[keys[1]]["shape"] = list(h[keys[0]]["shape"])

    _edit_header(d, overlap)
    _raises(errors.CorruptSafetensors, "overlaps", d, spec)


def test_size_does_not_match_shape(llama):
    spec, d = llama
    k = _first_key(d)
    _edit_header(d, lambda h: h[k].__setitem__("shape", [4, 129]))  # down_proj A is (4, 128)
    _raises(errors.CorruptSafetensors, "needs 2064 bytes, its data_offsets give 2048", d, spec)


def test_unknown_and_unsupported_dtype(llama):
    spec, d = llama
    k = _first_key(d)
    _edit_header(d, lambda h: h[k].__setitem__("dtype", "Q4"))
    _raises(errors.CorruptSafetensors, "unknown dtype 'Q4'", d, spec)
    _edit_header(d, lambda h: h[k].__setitem__("dtype", "I32"))
    _raises(errors.UnsupportedAdapter, "dtype I32", d, spec)


def test_duplicate_header_key(llama):
    spec, d = llama
    header, data = _split(_blob(d))
    k = _first_key(d)
    text = json.dumps(header)
    dup = text[:-1] + f', "{k}": ' + json.dumps(header[k]) + "}"
    _corrupt(d, struct.pack("<Q", len(dup)) + dup.encode() + data)
    _raises(errors.CorruptSafetensors, "repeats the key", d, spec)


@pytest.mark.parametrize("entry", [[], {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [0]}])
def test_malformed_entries(llama, entry):
    spec, d = llama
    _edit_header(d, lambda h: h.__setitem__(_first_key(d), entry))
    _raises(errors.CorruptSafetensors, "adapter_model.safetensors", d, spec)


# ---- names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "A", "-x", ".x", "a/b", "..", "a..b", "a\x00b", "/abs", "x" * 65, "é"])
def test_bad_names(name):
    with pytest.raises(check.InvalidName, match="not valid"):
        check.check_name(name)


@pytest.mark.parametrize("ref,parsed", [
    ("sql", (None, "sql", None)),
    ("sql@3", (None, "sql", 3)),
    ("acme/sql@12", ("acme", "sql", 12)),
    ("acme/sql", ("acme", "sql", None)),
])
def test_parse_ref(ref, parsed):
    assert check.parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["sql@0", "sql@x", "sql@", "a/b/c", "../etc@1", "sql@-1", "@1"])
def test_bad_refs(ref):
    with pytest.raises(check.InvalidName):
        check.parse_ref(ref)
