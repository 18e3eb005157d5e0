"""The Training service over a real channel, with real worker processes on the tiny Llama:
a job end to end (the loss falls, the published adapter answers its training prompts, its
ROUGE-L beats the base model's), the same for chat data on the chat template, every bad dataset refused with the line named and
nothing queued, and a killed worker failing its job while inference carries on."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest
import torch
from adapterctl import cli
from adapterctl.client import Client
from adapterctl.train import TrainingClient
from adapterd.app import create_server
from adapterd.config import CacheConfig, Config, ServerConfig, TrainingConfig
from adapterd.engine.loop import EngineLoop
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver
from adapterd.training import registry_publisher
from adapterd.training.general import REPLAY
from adapterd.training.jobs import JobManager
from adapterd_api.v1 import adapters_pb2 as apb
from adapterd_api.v1 import inference_pb2 as ipb
from adapterd_api.v1 import training_pb2 as tpb
from adapterd_api.v1 import training_pb2_grpc as tpb_grpc

from tests.engine_runs import greedy_by_forward
from tests.grpc_harness import TEST_SCHEDULER, RunningServer, request

MAX_RANK = 16
MAX_DATASET_BYTES = 8192
# Short question -> code pairs (the test scheduler takes prompts of up to 64 tokens, bytes here).
PAIRS = [
    ("drop rows with NaN", "df.dropna()"),
    ("zeros, 5 of them", "np.zeros(5)"),
    ("read data.csv", "pd.read_csv('data.csv')"),
    ("first 5 rows", "df.head()"),
    ("mean of each column", "df.mean()"),
    ("sort by age", "df.sort_values('age')"),
    ("reshape a to 2x3", "a.reshape(2, 3)"),
    ("count values of col", "df['col'].value_counts()"),
    ("transpose m", "m.T"),
    ("stack a and b vertically", "np.vstack([a, b])"),
    ("group by city and sum", "df.groupby('city').sum()"),
    ("fill NaN with 0", "df.fillna(0)"),
]

# General prompts with references, for the retention file.
GENERAL = [("capital of France", "Paris"), ("2 + 2", "4"), ("opposite of hot", "cold")]


def prompt(question: str) -> str:
    return f"Q: {question}\nA: "


class TrainingServer(RunningServer):
    """The test server with the Training service on a JobManager, publishing to `registry`."""

    def __init__(self, engine, config, registry, jobs: JobManager):
        self.jobs = jobs
        super().__init__(engine, config, registry)
        self.training = tpb_grpc.TrainingStub(self.channel)

    async def _start(self):
        server, port = create_server(self.config, engine=self.engine, lifecycle=self.lifecycle,
                                     registry=self.registry, jobs=self.jobs)
        await server.start()
        return server, port

    def stop(self) -> None:
        super().stop()
        self.jobs.close()


@pytest.fixture
def server(parts_for, tiny_base, tmp_path):
    parts = parts_for(4)
    registry = Registry(LocalStorage(tmp_path / "registry"), spec=parts.spec, max_rank=MAX_RANK)
    jobs = JobManager(
        TrainingConfig(jobs_dir=tmp_path / "training", worker_nice=0, max_dataset_bytes=MAX_DATASET_BYTES),
        base_model=tiny_base, device="cpu", max_rank=MAX_RANK, publish=registry_publisher(registry),
        module_names=parts.spec.linear_shapes,
    ).start()
    cache = CacheConfig(gpu_slots=4, max_rank=MAX_RANK)
    engine = EngineLoop(parts, RegistryResolver(registry), TEST_SCHEDULER, cache).start()
    engine.wait_ready(timeout=60)
    s = TrainingServer(engine, Config(server=ServerConfig(port=0), scheduler=TEST_SCHEDULER, cache=cache),
                       registry, jobs)
    yield s
    s.stop()


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def pairs_file(tmp_path, pairs=PAIRS):
    return write_jsonl(tmp_path / "train.jsonl", [{"prompt": prompt(q), "completion": c} for q, c in pairs])


def watch(server, job_id: str, until=lambda e: False) -> list[tpb.JobEvent]:
    events = []
    stream = server.training.WatchJob(tpb.WatchJobRequest(job_id=job_id), timeout=600)
    for event in stream:
        events.append(event)
        if until(event):
            stream.cancel()
            break
    return events


def generate(server, adapter: str, text: str) -> str:
    return server.inference.Generate(request(text, adapter, max_new_tokens=40)).text


def test_a_job_end_to_end(server, tmp_path, capsys):
    data = pairs_file(tmp_path)
    retention = write_jsonl(tmp_path / "general.jsonl", [{"prompt": prompt(q), "completion": a} for q, a in GENERAL])
    client = TrainingClient(Client(server.addr))
    job = client.create(data, name="pandas-tiny", validation=data, retention=retention, epochs=40,
                        learning_rate=3e-3, batch_size=2, eval_max_new_tokens=40)
    assert job.state == tpb.QUEUED and job.train_examples == job.validation_examples == len(PAIRS)

    events = watch(server, job.id)
    states = [tpb.JobState.Name(e.state) for e in events if e.type == tpb.STATE]
    assert states == ["VALIDATING", "QUEUED", "RUNNING", "SUCCEEDED"]
    losses = [e.loss for e in events if e.type == tpb.STEP]
    assert len(losses) >= 10 and [e.seq for e in events] == list(range(1, len(events) + 1))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 3, f"the loss did not fall: {first:.3f} -> {last:.3f}"

    job = client.get(job.id)
    assert job.state == tpb.SUCCEEDED and job.adapter == "pandas-tiny@1"
    # Served at once, by the running server: each training prompt answered with its completion.
    answers = [generate(server, "pandas-tiny", prompt(q)) for q, _ in PAIRS]
    exact = sum(a == c for a, (_, c) in zip(answers, PAIRS, strict=True))
    assert exact >= 0.9 * len(PAIRS), list(zip(answers, PAIRS, strict=True))
    assert generate(server, "", prompt(PAIRS[0][0])) != PAIRS[0][1]  # the base model does not know them

    val, kept = job.evaluation
    assert (val.split, val.examples, kept.split, kept.examples) == ("validation", len(PAIRS), "retention", len(GENERAL))
    assert kept.adapter.loss > 0 and kept.base.loss > 0  # scored for both, so forgetting would show
    assert val.adapter.rouge_l.f1 > val.base.rouge_l.f1 and val.adapter.rouge_l.f1 > 0.9
    assert val.adapter.loss < val.base.loss
    assert job.training.steps > 0 and job.training.tokens_per_second > 0

    meta = server.adapters.GetAdapter(apb.GetAdapterRequest(adapter="pandas-tiny@1"))
    assert meta.source == apb.SOURCE_TRAINED and meta.job_id == job.id
    assert meta.metrics["validation.adapter.rougeL.f1"] == pytest.approx(val.adapter.rouge_l.f1)
    assert meta.metrics["validation.base.rougeL.f1"] == pytest.approx(val.base.rouge_l.f1)
    assert meta.metrics["retention.base.loss"] == pytest.approx(kept.base.loss)

    assert cli.main(["--addr", server.addr, "jobs", "show", job.id]) == 0
    shown = capsys.readouterr().out
    assert "succeeded" in shown and "ROUGE-L f1" in shown and "pandas-tiny@1" in shown
    assert cli.main(["--addr", server.addr, "jobs", "list"]) == 0
    assert job.id in capsys.readouterr().out
    assert cli.main(["--addr", server.addr, "jobs", "watch", job.id]) == 0  # replays a finished job
    watched = capsys.readouterr().out
    assert "step" in watched and "validation (12 examples)" in watched and "adapter pandas-tiny@1" in watched


def test_a_chat_job_end_to_end(server, tmp_path):
    """{"messages"} data: trained on the base model's chat template, served at once, and
    answering a user who sends the conversation as GenerateRequest.messages, rendered with the
    same template; the reply ends at the template's end of turn."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    client = TrainingClient(Client(server.addr))
    job = client.create(data, name="pandas-chat", validation=data, epochs=40, learning_rate=3e-3, batch_size=2,
                        eval_max_new_tokens=40, max_eval_examples=12)
    events = watch(server, job.id)
    assert [tpb.JobState.Name(e.state) for e in events if e.type == tpb.STATE][-1] == "SUCCEEDED"
    job = client.get(job.id)
    assert job.adapter == "pandas-chat@1"

    def chat(adapter: str, question: str) -> ipb.GenerateResponse:
        return server.inference.Generate(ipb.GenerateRequest(
            adapter=adapter, messages=[ipb.ChatMessage(role="user", content=question)],
            params=ipb.GenerationParams(max_new_tokens=40)))

    # The reply, ended by the template's end of turn (<|end|>: special, so not in the text).
    answers = [chat("pandas-chat", q) for q, _ in PAIRS]
    exact = sum(a.text == c and a.finish_reason == ipb.EOS for a, (_, c) in zip(answers, PAIRS, strict=True))
    assert exact >= 0.9 * len(PAIRS), [(a.text, c) for a, (_, c) in zip(answers, PAIRS, strict=True)]
    assert chat("", PAIRS[0][0]).text != PAIRS[0][1]
    val, kept = job.evaluation  # no retention file: the built-in general set, the base's answers as references
    assert val.adapter.rouge_l.f1 > 0.9 > val.base.rouge_l.f1
    assert (kept.split, kept.examples, kept.references) == ("retention", 12, "base") and job.HasField("retention")


def _bad(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


GOOD = {"prompt": "Q: x\nA: ", "completion": "y"}
BAD_DATASETS = {
    "malformed-line": ([GOOD, GOOD, '{"prompt": "Q", '], {}, "training file line 3: not valid JSON"),
    "unknown-format": ([GOOD, {"input": "q", "output": "a"}], {}, "training file line 2: unknown format"),
    "empty-file": ([], {}, "training file is empty"),
    "over-max-bytes": ([{"text": "x" * 1000}] * 10, {}, "larger than --max-dataset-bytes (8192 bytes): line 9"),
    "longer-than-max-seq-len": ([GOOD, {"prompt": "p" * 40, "completion": "c" * 30}], {"max_seq_len": 64},
                                "training file line 2: the example is 71 tokens, longer than --max-seq-len 64"),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_bad_datasets_are_invalid_argument_naming_the_line(server, tmp_path, case):
    rows, hyper, message = BAD_DATASETS[case]
    path = _bad(tmp_path, rows) if rows else (tmp_path / "empty.jsonl")
    path.touch()
    with pytest.raises(grpc.RpcError) as e:
        TrainingClient(Client(server.addr)).create(path, name="bad", **hyper)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    assert list(server.training.ListJobs(tpb.ListJobsRequest()).jobs) == []  # nothing queued


def test_bad_validation_file_and_spec(server, tmp_path):
    client = TrainingClient(Client(server.addr))
    data = pairs_file(tmp_path)
    bad = write_jsonl(tmp_path / "val.jsonl", [GOOD, "not json"])
    for kwargs, message in (
        ({"validation": bad}, "validation file line 2: not valid JSON"),
        ({"rank": 64}, "--rank 64 is above this server's --max-rank 16"),
        ({"target_modules": ["q_proj", "wq"]}, "--target-modules: the base model has no linear module named wq"),
        ({"learning_rate": 0.0}, "--lr must be in (0, 1]"),
        ({"method": "loha"}, "unknown --method 'loha'; one of lora, ia3, prompt-tuning, prefix-tuning"),
        ({"method": "ia3", "use_dora": True}, "--use-dora is a LoRA option (DoRA); it cannot be combined with --method ia3"),
        ({"method": "prompt-tuning", "virtual_tokens": 500}, "--virtual-tokens must be in 1..128"),
        ({"replay_ratio": -1.0}, "--replay-ratio must be in [0, 10]"),
        ({"replay_ratio": 1.0, "replay_loss": "mse"}, "unknown --replay-loss 'mse'; one of kl, ce"),
        ({"task_subspace": 70000}, "--task-subspace must be in 0..65536"),
        ({"task_subspace": 8, "method": "ia3"}, "--task-subspace restricts LoRA's A matrices: it needs --method lora"),
        ({"shrink_to_gain": 2.0}, "--shrink-to-gain must be in [0, 1]"),
        ({"shrink_to_gain": 0.9, "method": "prompt-tuning"}, "--shrink-to-gain scales LoRA's B matrices"),
        ({"shrink_to_gain": 0.9, "val_split": 0.0},
         "--shrink-to-gain chooses the adapter's strength on the validation split, and there is none"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            client.create(data, name="x", **kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        server.training.GetJob(tpb.GetJobRequest(job_id="ftjob-nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method,use_dora,kind", [
    ("lora", True, "dora"), ("ia3", False, "ia3"), ("prompt-tuning", False, "prompt_tuning"),
    ("prefix-tuning", False, "prefix_tuning"),
])
def test_each_method_trains_publishes_its_kind_and_serves_peft_tokens(method, use_dora, kind, server, tmp_path,
                                                                     monkeypatch):
    """A short job of each method: the published adapter is of that kind, served at once, and
    its served greedy tokens equal PeftModel's with the saved adapter (one forward per token)."""
    import peft.tuners.lora.dora
    from adapterd.engine.model import load_base_model
    from adapterd.engine.variants import dense_weight
    from peft import PeftModel

    retention = write_jsonl(tmp_path / "general.jsonl", [{"prompt": prompt(q), "completion": a} for q, a in GENERAL])
    client = TrainingClient(Client(server.addr))
    name = f"m-{kind.replace('_', '-')}"
    job = client.create(pairs_file(tmp_path), name=name, validation=pairs_file(tmp_path), retention=retention,
                        epochs=3, learning_rate=3e-2 if method.endswith("tuning") else 3e-3, batch_size=4,
                        method=method, use_dora=use_dora or None, virtual_tokens=4,
                        max_eval_examples=2, eval_max_new_tokens=8)
    watch(server, job.id)
    job = client.get(job.id)
    assert job.state == tpb.SUCCEEDED, job.error
    meta = server.adapters.GetAdapter(apb.GetAdapterRequest(adapter=job.adapter))
    assert meta.kind == kind and meta.virtual_tokens == (4 if method.endswith("tuning") else 0)

    text = prompt(PAIRS[0][0])
    served = server.inference.Generate(request(text, name, max_new_tokens=8, ignore_eos=True))
    version = server.registry.resolve("default", job.adapter)
    saved = tmp_path / "saved"
    saved.mkdir()
    for fname, data in server.registry.read_files(version).items():
        (saved / fname).write_bytes(data)
    monkeypatch.setattr(peft.tuners.lora.dora, "dequantize_module_weight", dense_weight)  # see test_adapter_kinds
    model, tokenizer, _ = load_base_model(server.jobs.base_model)
    peft_model = PeftModel.from_pretrained(model, saved).eval()
    assert list(served.token_ids) == greedy_by_forward(peft_model, tokenizer(text)["input_ids"], 8)[1]


def test_a_task_subspace_job_publishes_a_lora_reading_only_its_directions(server, tmp_path):
    """--task-subspace M: the published adapter is plain LoRA, served at once with PeftModel's
    greedy tokens, and each layer's A reads its input along M directions only: rank 4 A
    matrices of rank M, and q, k and v of one layer (one input, one subspace) within M
    together where unrestricted they would span 3 x 4."""
    from adapterd.engine.model import load_base_model
    from peft import PeftModel
    from safetensors.torch import load_file

    client = TrainingClient(Client(server.addr))
    job = client.create(pairs_file(tmp_path), name="narrow", validation=pairs_file(tmp_path), epochs=3,
                        learning_rate=3e-3, batch_size=4, rank=4, task_subspace=2, max_eval_examples=2,
                        eval_max_new_tokens=8)
    events = watch(server, job.id)
    job = client.get(job.id)
    assert job.state == tpb.SUCCEEDED, job.error
    assert job.hyperparameters.task_subspace == 2
    messages = [e.message for e in events]
    assert any(m.startswith(f"task subspace: the base model answers {len(REPLAY)} general prompts") for m in messages), messages
    assert any("task subspace: 2 input directions in each of" in m for m in messages), messages
    meta = server.adapters.GetAdapter(apb.GetAdapterRequest(adapter=job.adapter))
    assert meta.kind == "lora" and meta.metrics["training.task_subspace_off_subspace"] < 1e-5

    saved = tmp_path / "saved"
    saved.mkdir()
    for fname, data in server.registry.read_files(server.registry.resolve("default", job.adapter)).items():
        (saved / fname).write_bytes(data)
    weights = load_file(saved / "adapter_model.safetensors")
    a = {k: v for k, v in weights.items() if "lora_A" in k}
    assert a and all(torch.linalg.matrix_rank(w, rtol=1e-4) == 2 for w in a.values())
    qkv = [torch.cat([v for k, v in a.items() if f"layers.{i}.self_attn." in k and k.split(".")[-3] in
                      ("q_proj", "k_proj", "v_proj")]) for i in range(2)]
    assert all(w.shape[0] == 12 and torch.linalg.matrix_rank(w, rtol=1e-4) == 2 for w in qkv)

    text = prompt(PAIRS[0][0])
    served = server.inference.Generate(request(text, "narrow", max_new_tokens=8, ignore_eos=True))
    model, tokenizer, _ = load_base_model(server.jobs.base_model)
    peft_model = PeftModel.from_pretrained(model, saved).eval()
    assert list(served.token_ids) == greedy_by_forward(peft_model, tokenizer(text)["input_ids"], 8)[1]


def test_a_shrink_to_gain_job_publishes_the_shrunk_adapter_and_serves_it(server, tmp_path):
    """--shrink-to-gain G: the job walks the strengths down from 1 on the validation split,
    reports each and the one chosen, and publishes that adapter: a plain LoRA adapter,
    served at once with PeftModel's greedy tokens."""
    from adapterctl.train import describe
    from adapterd.engine.model import load_base_model
    from adapterd.training.shrink import SCALES
    from peft import PeftModel

    client = TrainingClient(Client(server.addr))
    job = client.create(pairs_file(tmp_path), name="shrunk", validation=pairs_file(tmp_path), epochs=10,
                        learning_rate=1e-2, batch_size=4, rank=4, no_early_stopping=True, shrink_to_gain=0.5,
                        max_eval_examples=12, eval_max_new_tokens=8)
    messages = [e.message for e in watch(server, job.id)]
    job = client.get(job.id)
    assert job.state == tpb.SUCCEEDED, job.error
    assert job.hyperparameters.shrink_to_gain == 0.5
    scale = job.training.adapter_scale
    assert scale in SCALES
    assert f"shrinking the adapter: chose strength {scale:g} (at least 0.5 of the validation gain kept)" in messages
    walked = [m for m in messages if m.startswith("shrinking the adapter: strength") and "keeps" in m]
    kept = [float(m.split("keeps ")[1].split("%")[0]) / 100 for m in walked]
    # Every strength taken keeps at least half the gain; the walk stops at the first that does not.
    assert len(walked) == round((1 - scale) * 10) + (scale > SCALES[-1])
    assert all(k >= 0.5 for k in kept[: round((1 - scale) * 10)]) and (scale == SCALES[-1] or kept[-1] < 0.5)
    validation = next(e for e in job.evaluation if e.split == "validation")
    assert validation.adapter.rouge_l.f1 > validation.base.rouge_l.f1  # a gain, and some of it kept
    assert (f"shrunk to strength {scale:g}" in describe(job)) == (scale < 1)

    meta = server.adapters.GetAdapter(apb.GetAdapterRequest(adapter=job.adapter))
    assert meta.kind == "lora"
    text = prompt(PAIRS[0][0])
    served = server.inference.Generate(request(text, "shrunk", max_new_tokens=8, ignore_eos=True))
    saved = tmp_path / "saved"
    saved.mkdir()
    for fname, data in server.registry.read_files(server.registry.resolve("default", job.adapter)).items():
        (saved / fname).write_bytes(data)
    model, tokenizer, _ = load_base_model(server.jobs.base_model)
    peft_model = PeftModel.from_pretrained(model, saved).eval()
    assert list(served.token_ids) == greedy_by_forward(peft_model, tokenizer(text)["input_ids"], 8)[1]


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _until(condition, timeout=60.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_job_pauses_while_serving_resumes_after_and_cancels_while_paused(server, tmp_path):
    """The pacer (pacing.py) as the server runs it: a training worker stops while requests are
    served, makes no step meanwhile, goes on once idle, and a cancel while paused ends it as
    cancelled (continued, it stops at its step's end) well before the kill grace."""
    import time

    busy = [False]
    server.jobs.pace(lambda: busy[0])
    client = TrainingClient(Client(server.addr))
    job = client.create(pairs_file(tmp_path), name="paced", epochs=1000, batch_size=1)
    watch(server, job.id, until=lambda e: e.type == tpb.STEP)
    pid = server.jobs.running_pid(job.id)
    busy[0] = True
    assert _until(lambda: _proc_state(pid) == "T"), "the worker pauses while the server is busy"
    step = client.get(job.id).step
    time.sleep(1.0)
    assert client.get(job.id).step == step  # no training while paused
    busy[0] = False
    assert _until(lambda: client.get(job.id).step > step), "it trains on once the server is idle"
    busy[0] = True
    assert _until(lambda: _proc_state(pid) == "T")
    started = time.monotonic()
    client.cancel(job.id)
    assert _until(lambda: client.get(job.id).state == tpb.CANCELLED, timeout=20)
    assert time.monotonic() - started < 20 and "cancelled by the user" in client.get(job.id).error


def test_a_killed_worker_fails_its_job_and_inference_carries_on(server, tmp_path):
    before = generate(server, "", "Q: hello\nA: ")
    job = TrainingClient(Client(server.addr)).create(pairs_file(tmp_path), name="doomed", epochs=1000, batch_size=1)
    watch(server, job.id, until=lambda e: e.type == tpb.STEP)
    queued = TrainingClient(Client(server.addr)).create(pairs_file(tmp_path), name="later")
    assert queued.state == tpb.QUEUED  # one job at a time
    assert cli.main(["--addr", server.addr, "jobs", "cancel", queued.id]) == 0
    assert server.training.GetJob(tpb.GetJobRequest(job_id=queued.id)).state == tpb.CANCELLED
    os.kill(server.jobs.running_pid(job.id), signal.SIGKILL)  # as the OOM killer would

    events = watch(server, job.id)
    assert events[-1].type == tpb.STATE and events[-1].state == tpb.FAILED
    job = server.training.GetJob(tpb.GetJobRequest(job_id=job.id))
    assert job.state == tpb.FAILED and "killed by SIGKILL" in job.error and not job.adapter
    assert Client(server.addr).health() == "SERVING"
    assert generate(server, "", "Q: hello\nA: ") == before
    with pytest.raises(grpc.RpcError) as e:
        generate(server, "doomed", "Q: hello\nA: ")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was published
