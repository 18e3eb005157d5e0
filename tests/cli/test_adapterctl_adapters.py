"""End to end: a PEFT adapter pushed with `adapterctl push`, then called over gRPC, gives
the greedy tokens of PeftModel.generate on the same NF4 base; list/show/delete; and the
local check refuses bad adapters before anything is uploaded, with the server's code."""

from __future__ import annotations

import json
import shutil

import adapterd_rules as check
import pytest
import torch
from adapterctl.cli import main as adapterctl
from adapterd.config import CacheConfig, ModelConfig
from adapterd.engine.model import load_base_model
from adapterd.engine.parts import load_engine_parts
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver

from tests.grpc_harness import RunningServer, request

MAX_RANK = 16
NEW_TOKENS = 16
PROMPT = "def mean(xs):"


@pytest.fixture(scope="module")
def base(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    parts = load_engine_parts(ModelConfig(base_model=base), CacheConfig(gpu_slots=2, max_rank=MAX_RANK))
    registry = Registry(LocalStorage(tmp_path_factory.mktemp("registry")), max_rank=MAX_RANK, max_bytes=10 << 20)
    s = RunningServer.start(parts, RegistryResolver(registry), registry=registry,
                            cache=CacheConfig(gpu_slots=2, max_rank=MAX_RANK))
    yield s
    s.stop()


def _ctl(server, *argv) -> int:
    return adapterctl(["--addr", server.addr, *argv])


def _peft_greedy(base, adapter_dir, prompt: str) -> list[int]:
    """PeftModel on its own NF4 copy of the base: greedy generate()."""
    from peft import PeftModel

    model, tokenizer, _ = load_base_model(base, device=torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_pushed_adapter_generates_what_peft_generates(server, base, adapter_factory, capsys):
    adapter = adapter_factory(base, "llama", seed=7, rank=8, alpha=16)  # PEFT, init_lora_weights=False
    assert _ctl(server, "push", str(adapter), "--name", "e2e", "--description", "from PEFT") == 0
    assert capsys.readouterr().out.startswith("pushed default/e2e@1 (sha256 ")
    out = server.inference.Generate(request(PROMPT, "e2e", max_new_tokens=NEW_TOKENS))
    assert out.adapter == "e2e@1"
    expected = _peft_greedy(base, adapter, PROMPT)
    base_only = server.inference.Generate(request(PROMPT, "", max_new_tokens=NEW_TOKENS))
    assert list(base_only.token_ids) != expected  # the adapter changes the output
    assert list(out.token_ids) == expected


def test_list_show_delete(server, base, adapter_factory, capsys):
    adapter = adapter_factory(base, "llama", seed=8, rank=4, alpha=8)
    assert _ctl(server, "push", str(adapter), "--name", "shown", "--public") == 0
    assert _ctl(server, "push", str(adapter), "--name", "shown", "--json") == 0
    pushed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert pushed["ref"] == "default/shown@2" and pushed["visibility"] == "VISIBILITY_PRIVATE"

    assert _ctl(server, "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:7] == ["NAME", "VERSION", "TENANT", "KIND", "RANK", "SIZE", "WHERE"]
    row = next(line.split() for line in table if line.startswith("shown "))
    assert row[:5] == ["shown", "2", "default", "lora", "4"] and "storage" in row

    assert _ctl(server, "list", "--json", "--all-versions", "--name", "shown") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["version"] for r in rows] == [2, 1] and rows[1]["visibility"] == "VISIBILITY_PUBLIC"

    assert _ctl(server, "show", "shown@1") == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert shown["ref"] == "default/shown@1" and shown["rank"] == "4" and "q_proj" in shown["target_modules"]
    assert shown["kind"] == "lora"

    assert _ctl(server, "delete", "shown@2") == 0
    assert capsys.readouterr().out.strip() == "deleted default/shown@2"
    assert _ctl(server, "show", "shown@2") == 15  # NOT_FOUND
    assert "NOT_FOUND" in capsys.readouterr().err
    assert _ctl(server, "delete", "shown") == 0
    assert _ctl(server, "show", "shown") == 15


@pytest.mark.parametrize("case,exit_code,words", [
    ("dora", 13, ["INVALID_ARGUMENT", "no DoRA magnitude vector"]),
    ("pickled", 13, ["INVALID_ARGUMENT", "safe_serialization=True"]),
    ("rank", 13, ["INVALID_ARGUMENT", "max rank 16"]),
    ("other_base", 19, ["FAILED_PRECONDITION", "another base model"]),
    ("truncated", 13, ["INVALID_ARGUMENT", "truncated"]),
])
def test_local_check_refuses_before_upload(server, base, adapter_factory, model_factory, tmp_path, capsys,
                                           case, exit_code, words):
    good = adapter_factory(base, "llama", seed=9, rank=4, alpha=8)
    d = tmp_path / case
    if case == "other_base":
        d = adapter_factory(model_factory("falcon"), "falcon", 1, rank=4, alpha=8)
    elif case == "rank":
        d = adapter_factory(base, "llama", seed=9, rank=32, alpha=8)
    else:
        shutil.copytree(good, d)
        if case == "dora":
            cfg = json.loads((d / check.CONFIG_FILE).read_text())
            (d / check.CONFIG_FILE).write_text(json.dumps({**cfg, "use_dora": True}))
        elif case == "pickled":
            (d / check.WEIGHTS_FILE).rename(d / "adapter_model.bin")
        else:
            blob = (d / check.WEIGHTS_FILE).read_bytes()
            (d / check.WEIGHTS_FILE).write_bytes(blob[:-100])
    assert _ctl(server, "push", str(d), "--name", "bad") == exit_code
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    if case != "pickled":
        assert "checked locally; nothing was uploaded" in err
    assert server.registry.list("default", name="bad")[0] == []
    # --no-check: the server refuses with the same code
    if case not in ("pickled",):
        assert _ctl(server, "push", str(d), "--name", "bad", "--no-check") == exit_code
        assert words[0] in capsys.readouterr().err
