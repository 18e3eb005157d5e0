"""`adapterctl export NAME@V --merged DIR` against a real server on the tiny Llama: the
directory loads with plain transformers, with no adapter, and its float32 logits equal PEFT's
`merge_and_unload` on the full-precision base (the oracle); the adapter really changes them;
errors are precise."""

from __future__ import annotations

import grpc
import pytest
import torch
from adapterctl import cli
from adapterctl.client import Client
from adapterctl.export import export_merged
from adapterd.app import create_server
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver
from adapterd_api.v1 import export_pb2 as pb
from adapterd_api.v1 import export_pb2_grpc as pb_grpc

from tests.grpc.conftest import MAX_RANK
from tests.grpc_harness import RunningServer

TOKENS = [[5, 17, 99, 3, 42, 120, 7, 64, 200, 11]]


class ExportServer(RunningServer):
    base_model_dir = None

    async def _start(self):
        server, port = create_server(self.config, engine=self.engine, lifecycle=self.lifecycle,
                                     registry=self.registry, base_model_dir=self.base_model_dir)
        await server.start()
        return server, port


@pytest.fixture
def server(parts_for, tiny_base, adapter_factory, tmp_path):
    registry = Registry(LocalStorage(tmp_path / "registry"), max_rank=MAX_RANK)
    adapter = adapter_factory(tiny_base, "llama", seed=7, rank=8, alpha=16)
    registry.push("default", "sql", adapter)
    ExportServer.base_model_dir = tiny_base
    s = ExportServer.start(parts_for(4), RegistryResolver(registry), registry=registry)
    yield s, adapter
    s.stop()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits  # (1, T, V)


def test_merged_export_loads_with_plain_transformers_and_equals_peft_merge(server, tiny_base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, adapter_dir = server
    out = tmp_path / "sql-merged"
    assert cli.main(["--addr", s.addr, "export", "sql@1", "--merged", str(out)]) == 0
    captured = capsys.readouterr()
    assert "received" in captured.err and "100%" in captured.err  # the progress bar
    assert f"to {out}" in captured.out

    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok("hi")["input_ids"] == AutoTokenizer.from_pretrained(tiny_base)("hi")["input_ids"]

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base_logits = logits(base)
    oracle = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    expected = logits(oracle)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_export_errors(server, tmp_path):
    s, _ = server
    with Client(s.addr) as client:
        with pytest.raises(grpc.RpcError) as e:
            export_merged(client, "nope", tmp_path / "a")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == [tmp_path / "registry"]
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.ExportStub(client.channel).ExportMerged(pb.ExportMergedRequest(adapter="sql", dtype="int8")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "float32" in e.value.details()
    (tmp_path / "taken").mkdir()
    assert cli.main(["--addr", s.addr, "export", "sql", "--merged", str(tmp_path / "taken")]) == 2


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_exports_equal_peft_merge(kind, server, tiny_base, kind_adapter_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s, _ = server
    adapter = kind_adapter_factory(tiny_base, "llama", kind, seed=61)
    s.registry.push("default", kind, adapter)
    out = tmp_path / f"{kind}-merged"
    assert cli.main(["--addr", s.addr, "export", kind, "--merged", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base_logits = logits(base)
    expected = logits(PeftModel.from_pretrained(base, adapter).merge_and_unload())
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), expected, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_cannot_be_merged(server, tiny_base, kind_adapter_factory, tmp_path, capsys):
    s, _ = server
    s.registry.push("default", "prompt", kind_adapter_factory(tiny_base, "llama", "prompt_tuning", seed=62))
    assert cli.main(["--addr", s.addr, "export", "prompt", "--merged", str(tmp_path / "p")]) == 19  # FAILED_PRECONDITION
    assert "virtual tokens are an input" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
