"""What one training job asks for: the adapter's name and the hyperparameters.

The defaults are the ones users know from hosted fine-tuning APIs and the QLoRA paper:
3 epochs, learning rate 2e-4 on a cosine schedule with warmup, LoRA rank 16 and alpha 32
with dropout 0.05 on every linear layer, early stopping on the validation loss, and a
tenth of the data held out for validation when no validation file is given.

Each check names the `adapterctl train` flag to change. The spec travels to the worker
process as JSON (`to_json` / `from_json`), and is stored with the job.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from adapterd_rules import DEFAULT_MAX_VIRTUAL_TOKENS, MAX_SCALING, check_name, check_text, quote

from adapterd.errors import InvalidArgument

ALL_LINEAR = "all-linear"
# What a job trains: the adapter kinds the engine serves (--use-dora makes a lora job DoRA).
METHODS = ("lora", "ia3", "prompt-tuning", "prefix-tuning")
MAX_REPLAY_RATIO = 10.0
MAX_TASK_SUBSPACE = 65536
REPLAY_LOSSES = ("kl", "ce")  # the base's distribution, or its greedy tokens


@dataclass(frozen=True)
class TrainingSpec:
    name: str
    description: str = ""
    epochs: float = 3.0
    learning_rate: float = 2e-4
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    seed: int = 0
    early_stopping: bool = True
    early_stopping_patience: int = 3  # evaluations without a better validation loss
    val_split: float = 0.1  # used only without a validation file
    warmup_ratio: float = 0.03
    max_eval_examples: int = 100  # per evaluated split, for the ROUGE generations
    eval_max_new_tokens: int = 128
    # Self-distillation replay: the base model's answers to general prompts, this many per
    # task example, trained on beside the task (general.py); 0 = none.
    replay_ratio: float = 0.0
    # How replay is learned: "kl", the base model's whole next-token distribution on each
    # replay example (self-distillation); "ce", cross-entropy on its greedy answer tokens.
    replay_loss: str = "kl"
    # LoRA A restricted to this many input directions per layer, those where the task's
    # inputs stand out most from general text's (subspace.py); 0 = unrestricted.
    task_subspace: int = 0
    # After training, the LoRA adapter shrunk to the smallest strength that keeps this share
    # of its validation ROUGE-L gain over the base (shrink.py); 0 = as trained.
    shrink_to_gain: float = 0.0
    min_retention: float = 0.0  # fail the job, unpublished, when retention is below this; 0 = no check
    method: str = "lora"
    use_dora: bool = False
    virtual_tokens: int = 20  # prompt and prefix tuning

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _need(bool(self.name), "--name is required: the adapter's name in the registry")
        # The registry's own rule, checked now rather than at publishing, after the training.
        check_name(self.name, "--name")
        # Shown to users as it is (adapterctl jobs show, the published adapter's description).
        check_text(self.description, "--description")
        _need(math.isfinite(self.epochs) and 0 < self.epochs <= 1000, f"--epochs must be in (0, 1000]; got {self.epochs}")
        _need(
            math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1,
            f"--lr must be in (0, 1]; got {self.learning_rate}",
        )
        _need(1 <= self.rank <= 1024, f"--rank must be in 1..1024; got {self.rank}")
        _need(math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be a finite number > 0; got {self.alpha}")
        # Checked now, not when the trained adapter is published: the registry refuses a
        # scaling (alpha / rank) whose outputs would not be finite.
        _need(
            self.alpha / self.rank <= MAX_SCALING,
            f"--alpha {self.alpha:g} with --rank {self.rank} gives a LoRA scaling (alpha / rank) of "
            f"{self.alpha / self.rank:g}, above the limit of {MAX_SCALING:g}: the adapter's outputs would not "
            f"be finite numbers; use an --alpha of at most {MAX_SCALING * self.rank:g}",
        )
        _need(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}")
        _need(
            len(self.target_modules) > 0 and all(m and m.strip() == m for m in self.target_modules),
            f"--target-modules must be all-linear or a comma-separated list of module names; got {quote(','.join(self.target_modules))}",
        )
        _need(
            ALL_LINEAR not in self.target_modules or len(self.target_modules) == 1,
            "--target-modules: all-linear cannot be combined with module names",
        )
        _need(1 <= self.batch_size <= 1024, f"--batch-size must be in 1..1024; got {self.batch_size}")
        _need(1 <= self.grad_accum <= 1024, f"--grad-accum must be in 1..1024; got {self.grad_accum}")
        _need(8 <= self.max_seq_len <= 131072, f"--max-seq-len must be in 8..131072; got {self.max_seq_len}")
        _need(0 <= self.seed < 2**63, f"--seed must be in 0..2^63-1; got {self.seed}")
        _need(self.early_stopping_patience >= 1, "early_stopping_patience must be >= 1")
        _need(0 <= self.val_split < 1, f"--val-split must be in [0, 1); got {self.val_split}")
        _need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1); got {self.warmup_ratio}")
        _need(self.max_eval_examples >= 1, f"--max-eval-examples must be >= 1; got {self.max_eval_examples}")
        _need(
            1 <= self.eval_max_new_tokens <= 4096,
            f"--eval-max-new-tokens must be in 1..4096; got {self.eval_max_new_tokens}",
        )

        _need(
            math.isfinite(self.replay_ratio) and 0 <= self.replay_ratio <= MAX_REPLAY_RATIO,
            f"--replay-ratio must be in [0, {MAX_REPLAY_RATIO:g}] (general examples per task example); "
            f"got {self.replay_ratio}",
        )
        _need(self.replay_loss in REPLAY_LOSSES,
              f"unknown --replay-loss {quote(self.replay_loss)}; one of {', '.join(REPLAY_LOSSES)}")
        _need(
            math.isfinite(self.min_retention) and 0 <= self.min_retention <= 1,
            f"--min-retention must be in [0, 1] (the adapter's share of the base model's ROUGE-L on the "
            f"retention set; 0 = no check); got {self.min_retention}",
        )
        _need(self.method in METHODS, f"unknown --method {quote(self.method)}; one of {', '.join(METHODS)}")
        _need(not self.use_dora or self.method == "lora",
              f"--use-dora is a LoRA option (DoRA); it cannot be combined with --method {self.method}")
        _need(1 <= self.virtual_tokens <= DEFAULT_MAX_VIRTUAL_TOKENS,
              f"--virtual-tokens must be in 1..{DEFAULT_MAX_VIRTUAL_TOKENS}; got {self.virtual_tokens}")
        _need(0 <= self.task_subspace <= MAX_TASK_SUBSPACE,
              f"--task-subspace must be in 0..{MAX_TASK_SUBSPACE} (input directions per LoRA layer; 0 = off); "
              f"got {self.task_subspace}")
        _need(not self.task_subspace or (self.method == "lora" and not self.use_dora),
              "--task-subspace restricts LoRA's A matrices: it needs --method lora without --use-dora")
        _need(math.isfinite(self.shrink_to_gain) and 0 <= self.shrink_to_gain <= 1,
              "--shrink-to-gain must be in [0, 1] (the share of the validation gain the shrunk adapter keeps; "
              f"0 = off); got {self.shrink_to_gain}")
        _need(not self.shrink_to_gain or (self.method == "lora" and not self.use_dora),
              "--shrink-to-gain scales LoRA's B matrices: it needs --method lora without --use-dora")

    @property
    def kind(self) -> str:
        """The kind of adapter the job publishes (adapterd_rules.KINDS)."""
        if self.method == "lora":
            return "dora" if self.use_dora else "lora"
        return self.method.replace("-", "_")

    @property
    def peft_target_modules(self) -> str | list[str]:
        """What LoraConfig(target_modules=) takes: PEFT's "all-linear" string, or names."""
        return ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except InvalidArgument:
            # Stored by a server with older rules: the job stays readable as it was created.
            spec = object.__new__(cls)
            for f in fields(cls):
                object.__setattr__(spec, f.name, values.get(f.name, f.default))
            object.__setattr__(spec, "target_modules", tuple(spec.target_modules))
            return spec


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)
