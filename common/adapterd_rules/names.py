"""Names in the registry (adapters and tenants) and the references that pick a version:
"name", "name@3", "tenant/name", "tenant/name@3"."""

from __future__ import annotations

import re

from adapterd_rules.errors import InvalidName
from adapterd_rules.text import quote

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN)


def is_name(name: object) -> bool:
    """A registry or tenant name: `[a-z0-9][a-z0-9._-]{0,63}` without '..', never a path or
    anything like one."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def check_name(name: str, what: str = "adapter name") -> str:
    """`name` if it is one (is_name), else InvalidName saying the rule."""
    if not is_name(name):
        raise InvalidName(
            f"{what} {quote(name)} is not valid: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_ref(ref: str) -> tuple[str | None, str, int | None]:
    """"name", "name@3", "tenant/name", "tenant/name@3" -> (tenant or None, name, version or None)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidName("adapter reference is empty: use 'name', 'name@3' or 'tenant/name@3'")
    rest, version = ref, None
    if "@" in ref:
        rest, _, v = ref.rpartition("@")
        # Exactly the digits a version is printed with: "name@01" is not another spelling of
        # "name@1" (one ref, one spelling: routing and caches compare them as strings).
        if not (v.isascii() and v.isdigit() and len(v) <= 9 and v[0] != "0"):
            raise InvalidName(
                f"adapter reference {quote(ref)}: the version after '@' must be a number >= 1, "
                "without leading zeros"
            )
        version = int(v)
    tenant = None
    if "/" in rest:
        tenant, _, rest = rest.partition("/")
        check_name(tenant, "tenant")
    check_name(rest)
    return tenant, rest, version
