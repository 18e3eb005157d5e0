"""Typed errors: one class per failure a user can act on, each with its gRPC status.

`code` names the grpc.StatusCode (by name, so nothing here imports grpc). The server's
error interceptor and HTTP layer turn these into status codes; adapterctl turns a check
that fails before an upload into the same exit status the server's answer would give.
This is the only place a failure is given its code. The message says what to change.
"""

from __future__ import annotations

__all__ = [
    "AdapterdError", "InvalidArgument", "NotFound", "AlreadyExists", "ResourceExhausted",
    "FailedPrecondition", "Unauthenticated", "PermissionDenied", "Unavailable", "DeadlineExceeded",
    "Cancelled", "DataLoss", "InvalidName", "InvalidText", "InvalidAdapter", "PickledWeights",
    "UnsupportedAdapter", "CorruptSafetensors", "UnknownTargetModule", "AdapterMismatch",
    "AdapterTooLarge", "ChecksumMismatch",
]


class AdapterdError(Exception):
    """Base class. `code` is a grpc.StatusCode name."""

    code = "INTERNAL"


class InvalidArgument(AdapterdError):
    code = "INVALID_ARGUMENT"


class NotFound(AdapterdError):
    code = "NOT_FOUND"


class AlreadyExists(AdapterdError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(AdapterdError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(AdapterdError):
    code = "FAILED_PRECONDITION"


class Unauthenticated(AdapterdError):
    code = "UNAUTHENTICATED"


class PermissionDenied(AdapterdError):
    code = "PERMISSION_DENIED"


class Unavailable(AdapterdError):
    code = "UNAVAILABLE"


class DeadlineExceeded(AdapterdError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(AdapterdError):
    code = "CANCELLED"


class DataLoss(AdapterdError):
    code = "DATA_LOSS"


# Names and adapters, each distinct so tests and callers can tell them apart.


class InvalidName(InvalidArgument):
    """A registry or tenant name, or a "name@version" reference, that breaks the name rule."""


class InvalidText(InvalidArgument):
    """A free-text field (a description) that cannot be shown as it is."""


class InvalidAdapter(InvalidArgument):
    """The adapter files are malformed or use something the server does not support."""


class PickledWeights(InvalidAdapter):
    """Only a pickled adapter_model.bin was given; it is never unpickled."""


class UnsupportedAdapter(InvalidAdapter):
    """DoRA, bias, modules_to_save, a non-LoRA PEFT type, or rank above the max."""


class CorruptSafetensors(InvalidAdapter):
    """Truncated file, oversized or inconsistent header, sizes that do not match shapes."""


class UnknownTargetModule(InvalidAdapter):
    """A target module the base model does not have, or one the server cannot batch."""


class AdapterMismatch(FailedPrecondition):
    """The adapter does not fit the served base model: absent modules or wrong shapes."""


class AdapterTooLarge(ResourceExhausted):
    """Over --max-adapter-bytes."""


class ChecksumMismatch(DataLoss):
    """A stored adapter file no longer matches its recorded sha256."""
