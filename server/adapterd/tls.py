"""Server TLS credentials from --tls-cert / --tls-key / --tls-client-ca.

With a client CA the server requires and verifies a client certificate (mTLS): a client
without one fails the handshake before any RPC runs. The files are read once, at
start-up, and a missing or unreadable one is an error that names its flag.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from e
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path}: not a PEM file")
    return data


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    chain = _read("--tls-cert", cert)
    private_key = _read("--tls-key", key)
    ca = _read("--tls-client-ca", client_ca) if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )
