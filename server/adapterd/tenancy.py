"""Who is calling: the principal of the current RPC, carried in a contextvar.

The auth interceptor sets it; without --auth-file every call is the single tenant
"default" with the admin role. Services read it with `current_principal()` and pass the
tenant down explicitly: nothing below the services reads the contextvar.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

DEFAULT_TENANT = "default"
ROLES = ("admin", "user", "reader")


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str = "admin"  # admin | user | reader

    def can_write(self) -> bool:
        return self.role in ("admin", "user")


SINGLE_TENANT = Principal(DEFAULT_TENANT, "admin")

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "adapterd_principal", default=SINGLE_TENANT
)


def current_principal() -> Principal:
    return _principal.get()


def set_principal(principal: Principal) -> contextvars.Token:
    return _principal.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    _principal.reset(token)
