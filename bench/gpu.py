"""The engine on one GPU, in one command (at most about 8 minutes on an H100/H200), printing JSON.

    python bench/gpu.py            # Llama-3-8B-shaped random model, NF4, bf16 compute
    python bench/gpu.py --smoke    # the same code paths on a tiny model (any device; a check)

What it measures, in one run:
  peft_agreement        greedy tokens of the paged engine vs PEFT (PeftModel + generate, one
                        adapter at a time) on the same NF4 base, for base and adapter rows in
                        one mixed batch (a small Llama, so PEFT runs in seconds)
  decode_tok_s          16 rows, median per-step time: base, one adapter, 8 adapters mixed
                        (rank-16 all-linear), on the 8B-shaped model; and their ratios
  ttft_ms               one 512-token prompt alone: prefill to first token
  server                the same 8B-shaped model behind the gRPC server: 32 streamed requests
                        over 8 adapters from 16 clients, TTFT p50 and tokens/s
  qlora                 a short QLoRA run (NF4 base, LoRA, paged 8-bit AdamW, bf16) on a small
                        Llama: the loss must fall; first and last loss, tokens/s, peak memory
  quantization          the other --quantization formats, fp4 and int8: peft_agreement and
                        decode_tok_s as above, each on a base in that format
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 vocab_size=128256, tie_word_embeddings=False)
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096, vocab_size=32000, initializer_range=0.2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, vocab_size=512, initializer_range=0.2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(config: dict, device: torch.device, dtype: torch.dtype, quantization: str = "nf4"):
    """A random Llama of `config`, built on `device` and quantized in place (no disk)."""
    from adapterd.engine.demo import build_tokenizer
    from adapterd.engine.model import _quantize_leftover_linears
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    _quantize_leftover_linears(model, quantization, dtype, device)
    model.eval().requires_grad_(False)
    return model, build_tokenizer()


def random_adapter(slots, seed: int, rank: int):
    """Rank-`rank` LoRA weights for every wrapped layer, as the registry's checks give them."""
    from adapterd.resolve import AdapterWeights

    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(rank, layer.in_features, generator=g) * 0.02,
                      torch.randn(layer.out_features, rank, generator=g) * 0.02)
               for name, layer in slots.layers.items()}
    nbytes = sum(a.nbytes + b.nbytes for a, b in tensors.values())
    return AdapterWeights(name=f"random-{seed}", sha256=f"random-{seed}-{rank}", rank=rank, alpha=2.0 * rank,
                          scaling=2.0, target_modules=TARGETS, tensors=tensors, nbytes=nbytes, config={})


def random_adapters(slots, model, n: int, rank: int) -> None:
    for slot in range(1, n + 1):
        slots.load(slot, random_adapter(slots, slot, rank))


def decode_rates(model, tokenizer, slots, device, rows: int, steps: int) -> dict:
    from adapterd.engine import nf4cpu
    from adapterd.engine.generate import Request
    from adapterd.engine.paged import PagedGenerator
    from adapterd.engine.sampling import SamplingParams

    out = {}
    for kind, slot_of in (("base", lambda i: 0), ("one", lambda i: 1), ("mixed8", lambda i: 1 + i % 8)):
        gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=4 << 30)
        gen.add([Request(f"{kind}{i}", [1 + (i * 13 + j) % 250 for j in range(128)],
                         SamplingParams(max_new_tokens=steps + 8, ignore_eos=True), slot_of(i)) for i in range(rows)])
        while any(r.pending > 1 for r in gen.rows):
            gen.step()
        nf4cpu.attach(slots.layers.values())
        times = []
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            gen.step()
            _sync(device)
            times.append(time.perf_counter() - t)
        gen.abort_all()
        out[kind] = rows / statistics.median(times)
    out["mixed8_over_base"] = out["mixed8"] / out["base"]
    out["one_over_base"] = out["one"] / out["base"]
    return out


def ttft_ms(model, tokenizer, slots, device, tokens: int) -> float:
    from adapterd.engine.generate import Request
    from adapterd.engine.paged import PagedGenerator
    from adapterd.engine.sampling import SamplingParams

    gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=1 << 30, step_tokens=tokens)
    times = []
    for i in range(3):
        gen.add([Request(f"t{i}", [1 + (i + j) % 250 for j in range(tokens)], SamplingParams(max_new_tokens=1), 1)])
        _sync(device)
        t = time.perf_counter()
        while gen.num_running:
            gen.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def peft_agreement(device, dtype, config: dict, workdir: Path, quantization: str = "nf4") -> float:
    """Our mixed batch vs PeftModel alone per adapter, greedy, on the same base (NF4 unless
    `quantization` says otherwise). With int8, LLM.int8's outlier columns are chosen per batch,
    so rows of a mixed batch may differ from PEFT's one at a time a little more."""
    from adapterd.engine.demo import save_random_model
    from adapterd.engine.generate import Request
    from adapterd.engine.lora import inject_lora
    from adapterd.engine.model import load_base_model
    from adapterd.engine.paged import PagedGenerator
    from adapterd.engine.sampling import SamplingParams
    from adapterd.registry.validate import read_adapter
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = workdir / "small"
    if not base.exists():  # one base and adapter pair for every quantization
        save_random_model(base, "llama", {**config, "vocab_size": 263}, seed=0)
    adapters = []
    for i in range(2):
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(10 + i)
        get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(
            workdir / f"peft{i}")
        adapters.append(workdir / f"peft{i}")
    prompts = [[5 + (7 * i + j) % 200 for j in range(20 + 9 * i)] for i in range(6)]
    want = []
    for i, ids in enumerate(prompts):
        model, _, _ = load_base_model(base, device=device, compute_dtype=dtype, quantization=quantization)
        slot = i % 3
        if slot:
            model = PeftModel.from_pretrained(model, adapters[slot - 1]).eval()
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=16, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
        want.append(out[0, len(ids):].tolist())
    model, tokenizer, spec = load_base_model(base, device=device, compute_dtype=dtype, quantization=quantization)
    slots = inject_lora(model, num_slots=3, max_rank=8)
    for s, path in enumerate(adapters, start=1):
        slots.load(s, read_adapter(path, spec, 8))
    gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=256 << 20, eos_token_ids=set())
    gen.add([Request(str(i), ids, SamplingParams(max_new_tokens=16, ignore_eos=True), i % 3)
             for i, ids in enumerate(prompts)])
    got: dict[str, list[int]] = {}
    while gen.num_running:
        for ev in gen.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
    same = sum(a == b for i, w in enumerate(want) for a, b in zip(got[str(i)], w, strict=False))
    return same / sum(len(w) for w in want)


def through_server(model, tokenizer, slots, spec, requests: int, clients: int, new_tokens: int) -> dict:
    """The engine loop and gRPC server in this process, on the already loaded model."""
    from adapterctl.client import Client
    from adapterd.app import Lifecycle, create_server
    from adapterd.config import CacheConfig, Config, SchedulerConfig, ServerConfig
    from adapterd.engine.loop import EngineLoop
    from adapterd.engine.parts import EngineParts
    from adapterd.resolve import ResolvedAdapter

    class RandomAdapters:  # "a0".."a7": random rank-16 weights, loaded through the adapter cache
        def resolve(self, tenant, ref):
            seed = 100 + int(ref[1:])
            return ResolvedAdapter(key=ref, name=ref, load=lambda spec, max_rank: random_adapter(slots, seed, 16))

    scheduler = SchedulerConfig(max_batch_size=32)  # limits from the model
    cache = CacheConfig(gpu_slots=slots.num_slots - 1, max_rank=slots.max_rank)
    engine = EngineLoop(EngineParts(model, tokenizer, slots, spec), RandomAdapters(), scheduler, cache).start()
    engine.wait_ready(600)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    config = Config(server=ServerConfig(port=0), scheduler=scheduler, cache=cache)

    async def start():
        server, port = create_server(config, engine=engine, lifecycle=Lifecycle(engine))
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    ttft, tokens = [], 0
    lock = threading.Lock()
    work = iter(range(requests))

    def client_thread():
        nonlocal tokens
        with Client(f"127.0.0.1:{port}", timeout=600) as c:
            while (i := next(work, None)) is not None:
                t0 = time.perf_counter()
                first = None
                for msg in c.generate_stream(f"request {i} " * 20, adapter=f"a{i % 8}", max_new_tokens=new_tokens,
                                             ignore_eos=True):
                    first = first or time.perf_counter()
                    with lock:
                        tokens += len(msg.token_ids)
                ttft.append(first - t0)

    with Client(f"127.0.0.1:{port}", timeout=600) as c:  # warm: every adapter loaded once
        for i in range(8):
            c.generate("warm up", adapter=f"a{i}", max_new_tokens=2)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
    engine.stop(60)
    return {"ttft_p50_ms": statistics.median(ttft) * 1000, "tok_s": tokens / wall, "requests": requests}


def qlora(device, dtype, config: dict, workdir: Path, steps: int) -> dict:
    """NF4 base + LoRA + paged 8-bit AdamW on a small Llama, fitting one batch: the loss falls."""
    import bitsandbytes as bnb
    from adapterd.engine.demo import save_random_model
    from adapterd.training.spec import TrainingSpec
    from adapterd.training.worker import prepare_model

    base = save_random_model(workdir / "qlora-base", "llama", {**config, "vocab_size": 263}, seed=3)
    spec = TrainingSpec(name="bench", rank=16, alpha=32, target_modules=TARGETS)
    model, _ = prepare_model(base, spec, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    on_gpu = device.type == "cuda"
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-3) if on_gpu else torch.optim.AdamW(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (8, 256), generator=g).to(device)
    losses = []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    return {"optimizer": type(opt).__name__, "first_loss": losses[0], "last_loss": losses[-1],
            "loss_fell": losses[-1] < 0.8 * losses[0], "train_tok_s": steps * ids.numel() / wall,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None}


def other_quantization(quantization: str, device, dtype, big: dict, small: dict, workdir: Path, steps: int) -> dict:
    """peft_agreement and decode_tok_s on a base in `quantization` instead of NF4."""
    from adapterd.engine.lora import inject_lora

    agreement = peft_agreement(device, dtype, small, workdir, quantization)
    model, tokenizer = build(big, device, dtype, quantization)
    slots = inject_lora(model, num_slots=9, max_rank=16)
    random_adapters(slots, model, 8, 16)
    rates = decode_rates(model, tokenizer, slots, device, rows=16, steps=steps)
    del model, slots
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peft_agreement": agreement, "decode_tok_s": rates}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models: a quick check of every path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    big, small = (TINY, TINY) if args.smoke else (LLAMA3_8B, SMALL)
    steps = 8 if args.smoke else 32
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "model": "tiny" if args.smoke else "llama-3-8b-shaped (random), NF4"}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["peft_agreement"] = peft_agreement(device, dtype, small if not args.smoke else TINY, tmp)
        out["qlora"] = qlora(device, dtype, small, tmp, 30 if args.smoke else 40)
        out["quantization"] = {q: other_quantization(q, device, dtype, big, small, tmp, steps) for q in ("fp4", "int8")}
    from adapterd.engine.lora import inject_lora
    from adapterd.engine.model import model_spec

    model, tokenizer = build(big, device, dtype)
    slots = inject_lora(model, num_slots=9, max_rank=16)
    random_adapters(slots, model, 8, 16)
    out["build_s"] = time.perf_counter() - t_start
    out["decode_tok_s"] = decode_rates(model, tokenizer, slots, device, rows=16, steps=steps)
    out["ttft_ms_512"] = ttft_ms(model, tokenizer, slots, device, 64 if args.smoke else 512)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(model.config.to_json_string())
        spec = model_spec(model, Path(tmp))
    out["server"] = through_server(model, tokenizer, slots, spec, requests=8 if args.smoke else 32,
                                   clients=4 if args.smoke else 16, new_tokens=8 if args.smoke else 64)
    out["total_s"] = time.perf_counter() - t_start
    print(json.dumps(out, indent=1, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))


if __name__ == "__main__":
    main()
