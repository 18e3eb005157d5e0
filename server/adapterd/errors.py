"""The server's typed errors: the shared hierarchy of adapterd_rules.errors, where each
class names the gRPC status it maps to. The error interceptor (interceptors.py) and the
HTTP layer (http/errors.py) turn them into status codes; nothing below them imports grpc."""

from adapterd_rules.errors import *  # noqa: F403
from adapterd_rules.errors import __all__  # noqa: F401
