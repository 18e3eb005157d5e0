"""`adapterd` command line: `adapterd serve [flags]`; `adapterd serve --help` explains each."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from adapterd.config import Config, ConfigError, add_serve_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterd", description="Serve many LoRA adapters on one 4-bit base model over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server (Inference, health, reflection) until SIGTERM/SIGINT, "
        "then drain: new calls get UNAVAILABLE, in-flight calls finish within --grace-period.",
    )
    add_serve_flags(serve)
    hash_token = commands.add_parser(
        "hash-token",
        help="print the hash of an API token for --auth-file",
        description="Print the hash of an API token for --auth-file. The token is read from standard "
        "input, never from the command line (shells keep that in their history).",
    )
    hash_token.add_argument("--new", action="store_true", help="make a new random token; print it, then its hash")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config = Config.from_args(args)
        except ConfigError as e:
            parser.error(str(e))
        # Before torch loads OpenMP. Between parallel regions a worker spins a bounded while
        # (about a millisecond) before it sleeps: a decode step is hundreds of short regions,
        # and waking a sleeping worker for each one made 2 threads slower than 1 on 2 cores
        # (README, "Figures"). Spinning without a bound (ACTIVE) would keep a core busy while
        # the server idles. The user's settings win.
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ.setdefault("GOMP_SPINCOUNT", "1000000")
        # `kill -USR1 PID` prints every thread's stack to stderr: for a server that seems stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        from adapterd.app import main as serve_main  # grpc and torch only once flags are good

        return serve_main(config)
    if args.command == "hash-token":
        from adapterd.auth import hash_token_command

        return hash_token_command(new=args.new)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
