"""`adapterctl`: the command line for adapterd.

Each command lives in its own module that exposes `register(subparsers)`; add one to
COMMANDS to add a command. Failures of a call are handled here, in one place: one line on
stderr naming the status code, and an exit status per code (10 + the gRPC code number,
e.g. INVALID_ARGUMENT 13, NOT_FOUND 15, RESOURCE_EXHAUSTED 18, UNAVAILABLE 24).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from adapterctl import adapters, chat, export, generate, health, train
from adapterctl.client import ADDR_ENV, DEFAULT_ADDR, TOKEN_ENV
from adapterctl.terminal import safe

COMMANDS = [generate, chat, health, adapters, train, export]

EXIT_RPC_BASE = 10

HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is adapterd running and reachable at {addr}?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "raise --timeout, or ask for fewer tokens",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is busy; retry later",
    grpc.StatusCode.UNAUTHENTICATED: "check your credentials",
}


def exit_code(code: grpc.StatusCode) -> int:
    return EXIT_RPC_BASE + code.value[0]


def error_line(e: grpc.RpcError, addr: str) -> str:
    """One line: the code name, the server's message, and what to try where that helps."""
    code = e.code()
    details = safe(" ".join((e.details() or "").split()))  # the message, on one line, escaped
    line = f"adapterctl: {code.name}: {details}" if details else f"adapterctl: {code.name}"
    hint = HINTS.get(code)
    return f"{line} ({hint.format(addr=addr)})" if hint else line


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--addr", default=None, metavar="HOST:PORT",
        help=f"adapterd address (default: ${ADDR_ENV}, else {DEFAULT_ADDR})",
    )
    group.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS",
        help="fail a call that takes longer with DEADLINE_EXCEEDED (default: no limit)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS, verified by the system's root CAs")
    group.add_argument("--ca", default=None, metavar="PEM", help="verify the server with this CA instead (implies --tls)")
    group.add_argument("--cert", default=None, metavar="PEM", help="client certificate, for servers that require mTLS")
    group.add_argument("--key", default=None, metavar="PEM", help="private key of --cert")
    group.add_argument(
        "--token", default=None,
        help=f"API token, sent as 'authorization: Bearer TOKEN' (default: ${TOKEN_ENV}); "
        "prefer the variable: a flag shows in the process list",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterctl",
        description="Talk to an adapterd server.",
        epilog="Exit status: 0 on success, 2 for a usage error, 10 + the gRPC status code "
        "number when the server answers with an error (e.g. 15 NOT_FOUND, 24 UNAVAILABLE).",
    )
    add_connection_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together: give both or neither")
    for flag, path in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    try:
        return args.run(args) or 0
    except grpc.RpcError as e:
        from adapterctl.client import default_addr

        print(error_line(e, args.addr or default_addr()), file=sys.stderr)
        return exit_code(e.code())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
