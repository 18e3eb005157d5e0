"""`adapterctl health`: the server's grpc.health.v1 status; exit 0 only when SERVING."""

from __future__ import annotations

import argparse

from adapterctl.client import Client


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "health", help="print the server's health status",
        description="Print SERVING, NOT_SERVING (loading the model, or draining) or SERVICE_UNKNOWN; "
        "exit 0 only when SERVING, 1 otherwise.",
    )
    p.add_argument("--service", default="", help='a service name, e.g. adapterd.v1.Inference ("" = the server)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1
