"""The server's configuration: one frozen dataclass per concern, built once from the flags.

`build_parser()` defines every flag of `adapterd serve`, each in the argument group of its
concern; `Config.from_args()` builds the dataclasses, whose `__post_init__` checks the
values and names the flag in the error. Nothing reads the environment here: the config is
passed down explicitly.

To add a concern: write its dataclass with a `from_args(args)` classmethod, its flags in an
`add_*_flags(parser)` function, then add one line to `FLAG_GROUPS` and one field to `Config`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    grace_period_s: float = 30.0
    port_file: Path | None = None

    def __post_init__(self):
        _check(bool(self.host), "--host must not be empty")
        _check(0 <= self.port <= 65535, f"--port must be in 0..65535 (0 = any free port); got {self.port}")
        _check(self.grace_period_s >= 0, f"--grace-period must be >= 0 seconds; got {self.grace_period_s}")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        return cls(args.host, args.port, args.grace_period, args.port_file)


@dataclass(frozen=True)
class ModelConfig:
    base_model: Path | None = None  # None: the built-in demo model
    device: str = "auto"
    compute_dtype: str = "auto"
    quantize: bool = True

    def __post_init__(self):
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"--device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )
        _check(
            self.compute_dtype in ("auto", "float32", "bfloat16", "float16"),
            f"--compute-dtype must be auto, float32, bfloat16 or float16; got {self.compute_dtype!r}",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        return cls(args.base_model, args.device, args.compute_dtype, not args.no_quantize)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_queue: int = 256
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_wait_ms: float = 500.0
    max_stop_sequences: int = 4
    max_stop_length: int = 64

    def __post_init__(self):
        _check(self.max_batch_size >= 1, f"--max-batch-size must be >= 1; got {self.max_batch_size}")
        _check(self.max_queue >= 1, f"--max-queue must be >= 1; got {self.max_queue}")
        _check(self.max_input_tokens >= 1, f"--max-input-tokens must be >= 1; got {self.max_input_tokens}")
        _check(
            self.max_total_tokens > self.max_input_tokens,
            f"--max-total-tokens ({self.max_total_tokens}) must be greater than "
            f"--max-input-tokens ({self.max_input_tokens})",
        )
        _check(self.max_wait_ms >= 0, f"--max-wait-ms must be >= 0; got {self.max_wait_ms}")
        _check(self.max_stop_sequences >= 0, f"--max-stop-sequences must be >= 0; got {self.max_stop_sequences}")
        _check(self.max_stop_length >= 1, f"--max-stop-length must be >= 1; got {self.max_stop_length}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SchedulerConfig:
        return cls(
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
            max_wait_ms=args.max_wait_ms,
            max_stop_sequences=args.max_stop_sequences,
            max_stop_length=args.max_stop_length,
        )


@dataclass(frozen=True)
class CacheConfig:
    registry: Path = Path("adapters")
    gpu_slots: int = 8
    cpu_adapters: int = 64
    cpu_bytes: int = 2 * 2**30
    max_rank: int = 64
    load_workers: int = 2
    failed_load_ttl_s: float = 30.0  # a failed load is not retried before this

    def __post_init__(self):
        _check(self.gpu_slots >= 1, f"--gpu-slots must be >= 1; got {self.gpu_slots}")
        _check(self.cpu_adapters >= 0, f"--cpu-adapters must be >= 0; got {self.cpu_adapters}")
        _check(self.cpu_bytes >= 0, f"--cpu-cache-bytes must be >= 0; got {self.cpu_bytes}")
        _check(self.max_rank >= 1, f"--max-rank must be >= 1; got {self.max_rank}")
        _check(self.load_workers >= 1, f"--load-workers must be >= 1; got {self.load_workers}")
        _check(self.failed_load_ttl_s >= 0, "failed_load_ttl_s must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CacheConfig:
        return cls(
            registry=args.registry,
            gpu_slots=args.gpu_slots,
            cpu_adapters=args.cpu_adapters,
            cpu_bytes=args.cpu_cache_bytes,
            max_rank=args.max_rank,
            load_workers=args.load_workers,
        )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(
            server=ServerConfig.from_args(args),
            model=ModelConfig.from_args(args),
            scheduler=SchedulerConfig.from_args(args),
            cache=CacheConfig.from_args(args),
        )


def add_server_flags(p: argparse._ArgumentGroup) -> None:
    d = ServerConfig()
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument(
        "--port-file", type=Path, default=None,
        help="write the bound port to this file once listening (useful with --port 0)",
    )
    p.add_argument(
        "--grace-period", type=float, default=d.grace_period_s, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may run before they are cancelled (default: %(default)s)",
    )


def add_model_flags(p: argparse._ArgumentGroup) -> None:
    d = ModelConfig()
    p.add_argument(
        "--base-model", type=Path, default=None, metavar="DIR",
        help="local Hugging Face causal-LM directory, loaded in 4-bit NF4 (default: the built-in demo model)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument(
        "--compute-dtype", default=d.compute_dtype,
        help="auto (bf16 on a GPU, float32 on the CPU), float32, bfloat16 or float16 (default: %(default)s)",
    )
    p.add_argument("--no-quantize", action="store_true", help="keep the base model in full precision instead of NF4")


def add_scheduler_flags(p: argparse._ArgumentGroup) -> None:
    d = SchedulerConfig()
    p.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size,
        help="most requests decoded together in one batch (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help="most requests waiting for a batch row; more get RESOURCE_EXHAUSTED at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-input-tokens", type=int, default=d.max_input_tokens,
        help="longest prompt accepted, in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--max-total-tokens", type=int, default=d.max_total_tokens,
        help="most prompt tokens plus max_new_tokens of one request (default: %(default)s)",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms,
        help="requests for adapters already on the accelerator go first, but no request waits longer "
        "than this before it goes first itself (default: %(default)s)",
    )
    p.add_argument(
        "--max-stop-sequences", type=int, default=d.max_stop_sequences,
        help="most stop sequences per request (default: %(default)s)",
    )
    p.add_argument(
        "--max-stop-length", type=int, default=d.max_stop_length,
        help="longest stop sequence, in characters (default: %(default)s)",
    )


def add_cache_flags(p: argparse._ArgumentGroup) -> None:
    d = CacheConfig()
    p.add_argument(
        "--registry", type=Path, default=d.registry, metavar="DIR",
        help="adapter registry root; an adapter NAME is the PEFT directory DIR/NAME (default: ./%(default)s)",
    )
    p.add_argument(
        "--gpu-slots", type=int, default=d.gpu_slots,
        help="adapters resident on the accelerator at once, each in a preallocated slot (default: %(default)s)",
    )
    p.add_argument(
        "--cpu-adapters", type=int, default=d.cpu_adapters,
        help="adapters kept in host memory, ready to copy into a slot (default: %(default)s)",
    )
    p.add_argument(
        "--cpu-cache-bytes", type=int, default=d.cpu_bytes, metavar="BYTES",
        help="bytes of adapter weights kept in host memory (default: %(default)s)",
    )
    p.add_argument(
        "--max-rank", type=int, default=d.max_rank,
        help="largest LoRA rank served; the slots are allocated at this rank (default: %(default)s)",
    )
    p.add_argument(
        "--load-workers", type=int, default=d.load_workers,
        help="threads that read and check adapters off the decode path (default: %(default)s)",
    )


# (group title, flag adder). One line per concern.
FLAG_GROUPS = [
    ("server", add_server_flags),
    ("base model", add_model_flags),
    ("scheduler", add_scheduler_flags),
    ("adapter cache", add_cache_flags),
]


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for title, add in FLAG_GROUPS:
        add(parser.add_argument_group(title))
