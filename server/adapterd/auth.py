"""Tenants, API tokens, roles and per-tenant limits, read from --auth-file.

The file is TOML (or JSON, by the .json suffix). Tokens are never stored, only their
sha256; `adapterd hash-token --new` makes a token and prints the line to paste:

    [defaults]                      # limits for tenants that set none; 0 = no limit
    max_concurrent_requests = 16    # requests in flight (queued or generating)
    max_queued_requests = 64        # of those, waiting to join the batch
    tokens_per_minute = 0           # prompt + generated tokens, over the last 60 s
    max_training_jobs = 2           # jobs validating, queued or running

    [tenants.acme]
    max_concurrent_requests = 4     # overrides [defaults] for this tenant only

    [[tenants.acme.tokens]]
    name = "ci"                     # shown in logs instead of the token
    hash = "sha256:9f86d081884c7d65..."
    role = "user"                   # admin | user | reader

A presented token is hashed and compared with every stored hash by
`hmac.compare_digest`, without stopping at the first match, so the time taken says
nothing about which hash (or how much of one) matched. Tokens are random and long
(`--new` makes 256-bit ones), so a fast unsalted hash is enough: there is no
dictionary to guess from.

Nothing here imports grpc: the training service uses `TenantLimiter` too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapterd_rules import is_name

from adapterd.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from adapterd.tenancy import ROLES, Principal

_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TOKEN_PREFIX = "adt_"
WINDOW_S = 60.0


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and the entry."""


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; 0 means no limit."""

    max_concurrent_requests: int = 0
    max_queued_requests: int = 0
    tokens_per_minute: int = 0
    max_training_jobs: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f.name} must be an integer >= 0 (0 = no limit), got {v!r}")


@dataclass(frozen=True)
class TokenEntry:
    tenant: str
    name: str
    digest: bytes  # the 32 bytes of sha256(token)
    role: str


@dataclass(frozen=True)
class AuthFile:
    tokens: tuple[TokenEntry, ...]
    quotas: Mapping[str, Quotas] = field(default_factory=dict)  # tenant -> limits
    default_quotas: Quotas = Quotas()

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self.quotas)


def load_auth_file(path: str | Path) -> AuthFile:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AuthFileError(f"--auth-file {path}: cannot read it ({e.strerror})") from e
    try:
        data = json.loads(raw) if path.suffix == ".json" else _load_toml(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AuthFileError(f"--auth-file {path}: not valid {_kind(path)}: {e}") from e
    return parse_auth(data, source=str(path))


def _kind(path: Path) -> str:
    return "JSON" if path.suffix == ".json" else "TOML"


def _load_toml(raw: bytes) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise ValueError("TOML needs Python 3.11 or `pip install tomli`; or use a .json file") from e
    return tomllib.loads(raw.decode("utf-8"))


def parse_auth(data: object, *, source: str = "auth file") -> AuthFile:
    """Build an AuthFile from the parsed TOML/JSON, naming the bad entry on error."""

    def fail(where: str, msg: str) -> AuthFileError:
        return AuthFileError(f"{source}: {where}: {msg}")

    if not isinstance(data, dict):
        raise fail("top level", "expected a table with [tenants.NAME] entries")
    unknown = set(data) - {"defaults", "tenants"}
    if unknown:
        raise fail("top level", f"unknown keys {sorted(unknown)}; expected 'defaults' and 'tenants'")
    default_quotas = _quotas(data.get("defaults", {}), Quotas(), "[defaults]", fail)
    tenants = data.get("tenants")
    if not isinstance(tenants, dict) or not tenants:
        raise fail("[tenants]", "no tenants; add a [tenants.NAME] table with at least one token")

    entries: list[TokenEntry] = []
    quotas: dict[str, Quotas] = {}
    seen: dict[bytes, str] = {}
    for tenant, body in tenants.items():
        where = f"[tenants.{tenant}]"
        if not is_name(tenant):
            raise fail(where, "a tenant name is 1-64 of [a-z0-9._-], starting with a letter or digit")
        if not isinstance(body, dict):
            raise fail(where, "expected a table")
        body = dict(body)
        tokens = body.pop("tokens", None)
        quotas[tenant] = _quotas(body, default_quotas, where, fail)
        if not isinstance(tokens, list) or not tokens:
            raise fail(where, "no tokens; add [[tenants.NAME.tokens]] with hash and role")
        for i, tok in enumerate(tokens):
            twhere = f"{where} token {i + 1}"
            if not isinstance(tok, dict):
                raise fail(twhere, "expected a table with hash, role and name")
            extra = set(tok) - {"name", "hash", "role"}
            if extra:
                raise fail(twhere, f"unknown keys {sorted(extra)}")
            digest = tok.get("hash", "")
            if not isinstance(digest, str) or not _HASH_RE.match(digest):
                raise fail(twhere, "hash must be 'sha256:' and 64 hex digits; run `adapterd hash-token`")
            role = tok.get("role", "user")
            if role not in ROLES:
                raise fail(twhere, f"role {role!r} is not one of {', '.join(ROLES)}")
            name = str(tok.get("name", f"token-{i + 1}"))
            raw = bytes.fromhex(digest.split(":", 1)[1])
            if raw in seen:
                raise fail(twhere, f"the same token hash is already given to {seen[raw]}")
            seen[raw] = f"{where} {name!r}"
            entries.append(TokenEntry(tenant, name, raw, role))
    return AuthFile(tuple(entries), quotas, default_quotas)


def _quotas(body: object, base: Quotas, where: str, fail) -> Quotas:
    if not isinstance(body, dict):
        raise fail(where, "expected a table of limits")
    names = {f.name for f in fields(Quotas)}
    unknown = set(body) - names
    if unknown:
        raise fail(where, f"unknown keys {sorted(unknown)}; limits are {sorted(names)}")
    values = {n: getattr(base, n) for n in names} | dict(body)
    try:
        return Quotas(**values)
    except ValueError as e:
        raise fail(where, str(e)) from e


class Authenticator:
    """Turns the `authorization` metadata value into a Principal, or refuses it."""

    def __init__(self, auth: AuthFile) -> None:
        self._tokens = auth.tokens

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing credentials: send the metadata 'authorization: Bearer <token>' "
                "(adapterctl --token, or ADAPTERD_TOKEN)"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match: TokenEntry | None = None
        for entry in self._tokens:  # no early exit: every hash is compared
            if hmac.compare_digest(digest, entry.digest):
                match = entry
        if match is None:
            raise Unauthenticated("the token is not valid on this server")
        return Principal(match.tenant, match.role)


# --- roles per method -------------------------------------------------------------------

# RPCs that only read (and Generate, which uses an adapter without changing it). Every
# other adapterd RPC changes something and needs the user or admin role; an RPC added
# later is therefore refused to readers until it is listed here.
READ_METHODS = frozenset(
    {"Generate", "GenerateStream", "ListAdapters", "GetAdapter", "GetJob", "ListJobs", "WatchJob"}
)
# Open to anyone who can reach the port: probes and schema discovery carry no data.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


def check_role(principal: Principal, method: str) -> None:
    """Raise PermissionDenied when the principal's role may not call `method`."""
    name = method.rsplit("/", 1)[-1]
    if name in READ_METHODS or principal.can_write():
        return
    raise PermissionDenied(
        f"{name} changes state and needs the 'user' or 'admin' role; "
        f"this token of tenant '{principal.tenant}' has the '{principal.role}' role"
    )


# --- per-tenant limits -------------------------------------------------------------------


class RequestLease:
    """One admitted inference request's share of its tenant's limits.

    Admitted as queued; `running()` when it joins the batch; `close(tokens)` once at the
    end (idempotent). A scheduler that never calls `running()` leaves the request
    counted as queued for its whole life, which only makes the queued limit stricter.
    """

    __slots__ = ("_limiter", "tenant", "_queued", "_open")

    def __init__(self, limiter: TenantLimiter, tenant: str) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self._queued = True
        self._open = True

    def running(self) -> None:
        with self._limiter._lock:
            if self._open and self._queued:
                self._queued = False
                self._limiter._state(self.tenant).queued -= 1

    def charge(self, tokens: int) -> None:
        """Count tokens against the tenant's tokens per minute now."""
        if tokens > 0:
            with self._limiter._lock:
                self._limiter._state(self.tenant).window.append((self._limiter._clock(), tokens))

    def close(self, tokens: int = 0) -> None:
        self.charge(tokens)
        with self._limiter._lock:
            if not self._open:
                return
            self._open = False
            st = self._limiter._state(self.tenant)
            st.in_flight -= 1
            if self._queued:
                st.queued -= 1

    def __enter__(self) -> RequestLease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _TenantState:
    in_flight: int = 0
    queued: int = 0
    window: deque = field(default_factory=deque)  # (time, tokens), oldest first

    def tokens_in_window(self, now: float) -> int:
        while self.window and self.window[0][0] <= now - WINDOW_S:
            self.window.popleft()
        return sum(n for _, n in self.window)


class TenantLimiter:
    """Per-tenant concurrent requests, queued requests, tokens per minute, training jobs.

    `admit(tenant)` is called where an inference request is accepted; it raises
    ResourceExhausted naming the limit that was hit. With no quotas (single-tenant
    mode) nothing is ever refused. Thread-safe: the engine thread calls `running()`.
    """

    def __init__(
        self,
        quotas: Mapping[str, Quotas] | None = None,
        default: Quotas | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self._quotas = dict(quotas or {})
        self._default = default or Quotas()
        self._clock = clock
        self._on_reject = on_reject
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    @classmethod
    def from_auth(cls, auth: AuthFile | None, **kw) -> TenantLimiter:
        if auth is None:
            return cls(**kw)
        return cls(auth.quotas, auth.default_quotas, **kw)

    def quotas(self, tenant: str) -> Quotas:
        return self._quotas.get(tenant, self._default)

    def _state(self, tenant: str) -> _TenantState:
        st = self._tenants.get(tenant)
        if st is None:
            st = self._tenants[tenant] = _TenantState()
        return st

    def _refuse(self, tenant: str, limit: str, value: int, what: str, hint: str) -> ResourceExhausted:
        if self._on_reject is not None:
            self._on_reject(tenant, limit)
        return ResourceExhausted(
            f"tenant '{tenant}' is at its limit of {value} {what} ({limit}); {hint}"
        )

    def admit(self, tenant: str) -> RequestLease:
        q = self.quotas(tenant)
        with self._lock:
            st = self._state(tenant)
            if q.max_concurrent_requests and st.in_flight >= q.max_concurrent_requests:
                raise self._refuse(tenant, "max_concurrent_requests", q.max_concurrent_requests,
                                   "concurrent requests", "wait for one to finish")
            if q.max_queued_requests and st.queued >= q.max_queued_requests:
                raise self._refuse(tenant, "max_queued_requests", q.max_queued_requests,
                                   "queued requests", "retry when the queue has drained")
            if q.tokens_per_minute:
                used = st.tokens_in_window(self._clock())
                if used >= q.tokens_per_minute:
                    raise self._refuse(tenant, "tokens_per_minute", q.tokens_per_minute,
                                       "tokens per minute", "retry later")
            st.in_flight += 1
            st.queued += 1
        return RequestLease(self, tenant)

    def check_training_jobs(self, tenant: str, active: int) -> None:
        """Call before creating a job; `active` = the tenant's jobs not yet finished."""
        q = self.quotas(tenant)
        if q.max_training_jobs and active >= q.max_training_jobs:
            raise self._refuse(tenant, "max_training_jobs", q.max_training_jobs,
                               "training jobs", "wait for a job to finish or cancel one")

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._state(tenant).in_flight

    def queued(self, tenant: str) -> int:
        with self._lock:
            return self._state(tenant).queued


# --- `adapterd hash-token` ---------------------------------------------------------------



def hash_token_command(new: bool = False) -> int:
    """`adapterd hash-token [--new]`; returns the exit status."""
    if new:
        token = new_token()
        print(f"token: {token}")
        print(f'hash = "{hash_token(token)}"')
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        print("adapterd hash-token: no token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0
