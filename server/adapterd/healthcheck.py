"""`python -m adapterd.healthcheck`: exit 0 when the server's grpc.health.v1 says SERVING.

For container HEALTHCHECKs and Kubernetes exec probes. Kubernetes' own gRPC probe
cannot speak TLS; this one can. Flags default to the ADAPTERD_HEALTH_* environment
variables, so one image works with and without TLS:

    ADAPTERD_HEALTH_ADDRESS   127.0.0.1:50051
    ADAPTERD_HEALTH_CA        CA that signed the server certificate (turns TLS on)
    ADAPTERD_HEALTH_CERT/KEY  client certificate and key, when the server requires mTLS
    ADAPTERD_HEALTH_SERVER_NAME  the name in the server certificate, when it is not the address
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str,
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
    service: str = "",
    timeout: float = 3.0,
) -> str:
    """The serving status name of `service` at `address` ("SERVING", "NOT_SERVING", ...)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m adapterd.healthcheck", description=__doc__.split("\n")[0])
    p.add_argument("--address", default=env("ADAPTERD_HEALTH_ADDRESS", "127.0.0.1:50051"))
    p.add_argument("--ca", type=Path, default=env("ADAPTERD_HEALTH_CA"))
    p.add_argument("--cert", type=Path, default=env("ADAPTERD_HEALTH_CERT"))
    p.add_argument("--key", type=Path, default=env("ADAPTERD_HEALTH_KEY"))
    p.add_argument("--server-name", default=env("ADAPTERD_HEALTH_SERVER_NAME"))
    p.add_argument("--service", default="", help="a service name; '' = the whole server")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        status = check(args.address, ca=args.ca, cert=args.cert, key=args.key,
                       server_name=args.server_name, service=args.service, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
