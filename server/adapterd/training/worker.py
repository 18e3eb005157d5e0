"""The QLoRA training process: one per job, started by jobs.py, never imported by the server.

    python -m adapterd.training.worker JOB_DIR --events-fd FD

It loads its own copy of the base model, quantized as the server's is (--quantization: NF4
with double quantization by default), puts LoRA on it with
PEFT, and trains with transformers' Trainer: cosine schedule with warmup, loss on the
completion tokens only, gradient checkpointing, paged 8-bit AdamW on a GPU (AdamW on the
CPU), early stopping on the validation loss. With --replay-ratio it first asks the base
model general prompts (general.py) and trains on its answers beside the task: by default
on the base's whole next-token distribution there (DistillationTrainer, --replay-loss kl),
else on its answer tokens (ce). With --task-subspace M each LoRA A is kept in the M input
directions where the task's inputs stand out most from general text's (subspace.py). With
--shrink-to-gain G the trained LoRA adapter is scaled down to the smallest strength that
keeps G of its validation gain (shrink.py). Then it saves the adapter and evaluates it beside the
base model (evaluate.py) on the validation split and the retention split (the
--retention-file, else the built-in general set with the base model's answers as
references). A crash or an OOM here ends this process only.

It reads its settings (the spec, the base model, the device) as JSON on stdin and the
checked examples the server wrote into JOB_DIR, and reports
to the server one JSON object per line on FD (a pipe): `status`, `started`, `step`,
`eval`, then `done`, `cancelled` or `error`. SIGTERM asks it to stop: a TrainerCallback
sees the flag at the end of the current step, so a cancel takes at most one step.

The base model is loaded in this fresh process, and bitsandbytes' CPU repacking of 4-bit
weights for inference is switched off here: after a no-grad forward in eval mode (each
validation-loss evaluation) it swaps in a kernel without a backward, and training after it
stalls (on the demo model, an evaluation before the first step left the loss at 4.25 after
70 steps where it reached 2.08 without the repacking).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from adapterd.config import Quantization
from adapterd.engine.model import default_device, load_base_model, parse_dtype, unpacked
from adapterd.training import evaluate, general, shrink, subspace
from adapterd.training.data import (
    IGNORE_INDEX,
    Example,
    collate,
    instruction,
    read_examples,
    tokens,
)
from adapterd.training.spec import ALL_LINEAR, TrainingSpec

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
EVALS_PER_RUN = 10  # validation-loss evaluations over a run (early stopping looks at these)


class Cancelled(Exception):
    pass


class Events:
    """JSON lines to the server. A server that died closes the pipe: this process then
    exits at its next event instead of training on for nobody."""

    def __init__(self, fd: int | None):
        self._out = os.fdopen(fd, "w", buffering=1, encoding="utf-8") if fd is not None else sys.stdout

    def emit(self, type_: str, **fields) -> None:
        try:
            self._out.write(json.dumps({"type": type_, "time": time.time(), **fields}) + "\n")
        except BrokenPipeError:
            os._exit(EXIT_ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapterd.training.worker")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--events-fd", type=int, default=None)
    args = parser.parse_args(argv)
    events = Events(args.events_fd)
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the server's terminal is the server's
    try:
        result = train(args.job_dir, json.load(sys.stdin), events, cancel)
    except Cancelled:
        events.emit("cancelled")
        return EXIT_CANCELLED
    except BaseException as e:  # noqa: BLE001 - everything becomes the job's failure reason
        events.emit("error", message=failure_reason(e), traceback=traceback.format_exc(limit=20))
        return EXIT_ERROR
    events.emit("done", **result)
    return EXIT_OK


def failure_reason(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return f"out of memory while training ({type(e).__name__}); lower --batch-size or --max-seq-len, or raise --grad-accum"
    return f"{type(e).__name__}: {e}"


def train(job_dir: Path, settings: dict, events: Events, cancel: threading.Event) -> dict:
    os.nice(int(settings.get("nice", 0)))
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    spec = TrainingSpec.from_json(settings["spec"])
    device = default_device() if settings["device"] == "auto" else torch.device(settings["device"])
    on_gpu = device.type == "cuda"
    train_examples = read_examples(job_dir / "train.jsonl")
    val_examples = read_examples(job_dir / "validation.jsonl")
    retention_examples = read_examples(job_dir / "retention.jsonl")
    set_seed(spec.seed)

    quantization = settings.get("quantization", "nf4")
    events.emit("status", message=f"loading the base model ({quantization}) on {device}")
    model, tokenizer = prepare_model(settings["base_model"], spec, device, parse_dtype(settings.get("compute_dtype"), device),
                                     quantization)
    if cancel.is_set():
        raise Cancelled
    replay = replay_examples(model, tokenizer, spec, len(train_examples), events)
    bases = task_bases(model, tokenizer, spec, train_examples, replay, events, cancel)
    train_examples = train_examples + replay
    if cancel.is_set():
        raise Cancelled

    def features(examples, replayed=False):
        return [dict(zip(("input_ids", "labels"), tokens(e, tokenizer), strict=True), replay=replayed) for e in examples]

    distill = bool(replay) and spec.replay_loss == "kl"

    steps = total_steps(len(train_examples), spec)
    evaluating = bool(val_examples)
    eval_steps = max(1, math.ceil(steps / EVALS_PER_RUN))
    args = TrainingArguments(
        output_dir=str(job_dir / "checkpoints"),
        num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=spec.warmup_ratio,  # a float below 1 is a fraction of the run
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        gradient_checkpointing=checkpointing(spec),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_8bit" if on_gpu else "adamw_torch",
        bf16=on_gpu and model.dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        seed=spec.seed,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if evaluating else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if evaluating and spec.early_stopping else "no",
        save_steps=eval_steps,
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=evaluating and spec.early_stopping,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
    )
    callbacks = [EventsCallback(events, cancel)]
    if bases:
        callbacks.append(subspace.ProjectionCallback(model, bases))
    if evaluating and spec.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.early_stopping_patience))

    def data_collator(batch):
        out = collate([(f["input_ids"], f["labels"]) for f in batch], tokenizer.pad_token_id)
        if distill:  # which rows are replay, for the distillation loss
            out["replay"] = torch.tensor([f["replay"] for f in batch], dtype=torch.bool)  # (B,)
        return out

    trainer = (DistillationTrainer if distill else Trainer)(
        model=model,
        args=args,
        train_dataset=features(train_examples[: len(train_examples) - len(replay)]) + features(replay, True),
        eval_dataset=features(val_examples) if evaluating else None,
        data_collator=data_collator,
        callbacks=callbacks,
    )
    for quiet in (PrinterCallback, ProgressCallback):  # progress goes to the server as events
        trainer.remove_callback(quiet)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    output = trainer.train()
    if cancel.is_set():
        raise Cancelled
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    train_stats = {
        "steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "stopped_early": stopped_early,
        "train_loss": output.training_loss,
        "best_eval_loss": trainer.state.best_metric,
        "train_runtime_s": output.metrics["train_runtime"],
        "tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_second": trainer.state.num_input_tokens_seen / max(1e-9, output.metrics["train_runtime"]),
        "peak_memory_bytes": peak_memory_bytes(device),
        "replay_examples": len(replay),
    }
    if bases:
        stats = {**subspace.summary(bases), "off_subspace": subspace.off_subspace(model, bases)}
        train_stats.update({f"task_subspace_{k}": v for k, v in stats.items()})  # flat: they become registry metrics

    def progress(message: str) -> None:
        if cancel.is_set():
            raise Cancelled
        events.emit("status", message=message)

    if spec.shrink_to_gain:  # before saving: the published adapter is the shrunk one
        shrunk = shrink.shrink(model, tokenizer, val_examples[: spec.max_eval_examples], spec.shrink_to_gain,
                               batch_size=spec.batch_size, max_new_tokens=spec.eval_max_new_tokens,
                               on_progress=progress)  # a cancel stops it between strengths
        train_stats["adapter_scale"] = shrunk["scale"]
    adapter_dir = job_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    events.emit("status", message="adapter saved" + (" (best validation loss; stopped early)" if stopped_early else ""))

    # Without a validation split, score on (some of) the task's training data, named as such.
    eval_split = "validation" if evaluating else "train"
    eval_examples = val_examples if evaluating else train_examples[: len(train_examples) - len(replay)]
    builtin = not retention_examples  # no --retention-file: the general set, the base's answers as references
    if builtin:
        retention_examples = [instruction(text, tokenizer, i) for i, text in enumerate(general.RETENTION, 1)]
    results = evaluate.compare(
        model,
        tokenizer,
        {eval_split: eval_examples[: spec.max_eval_examples], "retention": retention_examples[: spec.max_eval_examples]},
        batch_size=spec.batch_size,
        max_new_tokens=spec.eval_max_new_tokens,
        base_referenced=frozenset({"retention"}) if builtin else frozenset(),
        on_progress=progress,
    )
    return {"adapter_dir": str(adapter_dir), "training": train_stats, "evaluation": results}


def replay_examples(model, tokenizer, spec: TrainingSpec, n_task: int, events: Events) -> list[Example]:
    """Self-distillation replay: round(replay_ratio x n_task) general prompts (general.REPLAY,
    shuffled by the seed, cycled when more are asked for), answered greedily by the base
    model; trained on as they were generated, cut at --max-seq-len."""
    n = round(spec.replay_ratio * n_task)
    if n == 0:
        return []
    order = list(general.REPLAY)
    random.Random(spec.seed).shuffle(order)
    prompts = [instruction(order[i % len(order)], tokenizer, i + 1) for i in range(n)]
    events.emit("status", message=f"replay: the base model answers {n} general prompts, trained on beside the task")
    return base_answers(model, tokenizer, spec, prompts)


def base_answers(model, tokenizer, spec: TrainingSpec, prompts: list[Example]) -> list[Example]:
    """`prompts` answered greedily by the base model (the adapter off), as generated, cut at
    --max-seq-len."""
    model.eval()
    with model.disable_adapter():
        answered = evaluate.answer(model, tokenizer, prompts, batch_size=max(spec.batch_size, evaluate.GENERATE_BATCH),
                                   max_new_tokens=spec.eval_max_new_tokens)
    model.train()
    cut = spec.max_seq_len
    return [replace(e, input_ids=e.input_ids[:cut], labels=e.labels[:cut]) for e in answered]


def task_bases(model, tokenizer, spec: TrainingSpec, task: list[Example], replay: list[Example], events: Events,
               cancel: threading.Event) -> dict:
    """--task-subspace M: each LoRA layer's subspace (subspace.py) from the task's training
    examples and general ones: the replay examples, or without replay the base model's
    answers to all the replay prompts; every LoRA A projected into it. {} without."""
    if not spec.task_subspace:
        return {}
    general_examples = replay
    if not general_examples:
        prompts = [instruction(text, tokenizer, i + 1) for i, text in enumerate(general.REPLAY)]
        events.emit("status", message=f"task subspace: the base model answers {len(prompts)} general prompts")
        general_examples = base_answers(model, tokenizer, spec, prompts)
    events.emit("status", message=f"task subspace: measuring each LoRA layer's inputs on {len(task)} task and "
                f"{len(general_examples)} general examples")

    def check_cancel():
        if cancel.is_set():
            raise Cancelled

    bases = subspace.task_bases(model, tokenizer, task, general_examples, spec.task_subspace,
                                batch_size=max(spec.batch_size, evaluate.GENERATE_BATCH), on_batch=check_cancel)
    subspace.project(model, bases)
    s = subspace.summary(bases)
    events.emit("status", message=f"task subspace: {spec.task_subspace} input directions in each of {s['layers']} "
                f"LoRA layers; task-to-general energy ratio median {s['ratio_top_median']:.3g} at the top, "
                f"{s['ratio_last_median']:.3g} at the last kept")
    return bases


class DistillationTrainer(Trainer):
    """The Trainer with replay learned as self-distillation (--replay-loss kl, the default):
    on a replay row the loss is KL(base || adapter), the base model's next-token
    distribution (the same model with its adapter disabled, no gradient) against the
    adapter's at every position of the row, prompt and answer. Hard labels (--replay-loss
    ce) teach only the base's greedy token at each answer position; the whole distribution
    keeps the adapter's output on general text close to the base's everywhere, its
    second choices included. Task rows keep the usual cross-entropy on their completion
    tokens. The loss is the mean over both kinds of token in the batch."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        replay = inputs.pop("replay", None)  # (B,) bool; absent in evaluation batches
        labels = inputs.pop("labels")  # (B, T)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = outputs.logits[:, -input_ids.shape[1]:].float()  # (B, T, V): prompt tuning's virtual tokens first
        if replay is None:
            replay = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        targets = labels[:, 1:].masked_fill(replay[:, None], IGNORE_INDEX)  # (B, T-1): task rows' completions
        total = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
        count = (targets != IGNORE_INDEX).sum()
        if replay.any():
            rows = replay.nonzero().squeeze(1)
            with torch.no_grad(), model.disable_adapter():
                teacher = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
            teacher = teacher[:, -input_ids.shape[1]:].float().log_softmax(-1)  # (R, T, V)
            student = logits[rows].log_softmax(-1)  # (R, T, V)
            kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # (R, T)
            mask = attention_mask[rows].bool()  # (R, T): every real position, prompt and answer
            total = total + kl[mask].sum()
            count = count + mask.sum()
        loss = total / count.clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def prepare_model(base_model, spec: TrainingSpec, device: torch.device, compute_dtype: torch.dtype,
                  quantization: Quantization = "nf4"):
    """(PEFT model, tokenizer): the base stored as `quantization` says, as the server serves
    it (NF4 with double quantization by default), LoRA on it per `spec`, gradient
    checkpointing on, ready to train."""
    model, tokenizer, _ = load_base_model(base_model, device=device, compute_dtype=compute_dtype,
                                          quantization=quantization)
    unpacked(model)  # no CPU repacking, even after an evaluation: see the module docstring
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing(spec), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, peft_config(spec))
    return model, tokenizer


def checkpointing(spec: TrainingSpec) -> bool:
    """Gradient checkpointing, except for prefix tuning, which PEFT refuses it for (its keys
    and values enter every layer through the cache)."""
    return spec.method != "prefix-tuning"


# IA3's feedforward modules (their input is scaled) where a job names its own target modules.
FEEDFORWARD_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2", "c_proj")


def peft_config(spec: TrainingSpec):
    """The PEFT config of the job's method: LoRA (DoRA with --use-dora), IA3, prompt or prefix tuning."""
    if spec.method == "lora":
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=spec.peft_target_modules, bias="none", task_type="CAUSAL_LM",
                          use_dora=spec.use_dora)
    if spec.method == "ia3":
        if spec.target_modules == (ALL_LINEAR,):  # PEFT's defaults for the model: attention k/v and the MLP's output
            return IA3Config(task_type="CAUSAL_LM")
        targets = list(spec.target_modules)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                         feedforward_modules=[t for t in targets if t in FEEDFORWARD_NAMES])
    if spec.method == "prompt-tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.virtual_tokens)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.virtual_tokens)


def total_steps(n_train: int, spec: TrainingSpec) -> int:
    """Optimizer steps of a full run, as the Trainer counts them."""
    per_epoch = max(1, math.ceil(math.ceil(n_train / spec.batch_size) / spec.grad_accum))
    return math.ceil(spec.epochs * per_epoch)


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class EventsCallback(TrainerCallback):
    """Reports progress to the server and stops training at the end of a step once
    cancelled."""

    def __init__(self, events: Events, cancel: threading.Event):
        self.events = events
        self.cancel = cancel
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.events.emit("started", total_steps=state.max_steps, epochs=args.num_train_epochs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.cancel.is_set():
            control.should_training_stop = True
            control.should_evaluate = control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        elapsed = time.monotonic() - self.started
        if "loss" in logs:
            self.events.emit(
                "step",
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=logs.get("epoch", state.epoch),
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                tokens_per_second=state.num_input_tokens_seen / max(elapsed, 1e-9),
                elapsed_s=elapsed,
            )
        if "eval_loss" in logs:
            self.events.emit("eval", step=state.global_step, total_steps=state.max_steps, eval_loss=logs["eval_loss"])


if __name__ == "__main__":
    sys.exit(main())
