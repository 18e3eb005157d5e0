"""`adapterctl chat`: talk to the base model (or an adapter) as a conversation.

On a terminal it is interactive: each line you type is sent with the conversation so far
(GenerateRequest.messages, rendered by the server with the base model's chat template),
and the reply streams in as it is generated. With stdin not a terminal (a pipe, a file) it
reads one message, prints the answer, and exits: for scripts.

    $ adapterctl chat
    you> What is the capital of France?
    The capital of France is Paris.
    you> ^D
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import grpc
from adapterd_api.v1 import inference_pb2 as pb

from adapterctl.client import Client

PROMPT = "you> "
COMMANDS_HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends it"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="a conversation with the base model or an adapter",
        description="Interactive on a terminal: type a message, the reply streams back, and the "
        f"conversation is kept ({COMMANDS_HELP}). With stdin not a terminal: one message is read "
        "from stdin and the answer printed.",
    )
    p.add_argument(
        "--adapter", default="", metavar="NAME",
        help='adapter: "name", "name@VERSION" or "tenant/name@VERSION" (default: "", the base model)',
    )
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message to start the conversation with (default: the template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="tokens per reply at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling, for reproducible replies")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    conversation: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    with Client.from_args(args) as client:
        if not sys.stdin.isatty():
            message = sys.stdin.read().strip()
            if not message:
                print("adapterctl: chat: nothing on stdin to send", file=sys.stderr)
                return 2
            reply(client, args.adapter, [*conversation, ("user", message)], params)
            return 0
        return interactive(client, args.adapter, conversation, params)


def interactive(client: Client, adapter: str, start: list[tuple[str, str]], params: dict) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    print(f"chatting with {adapter or 'the base model'}; {COMMANDS_HELP}", file=sys.stderr)
    conversation = list(start)
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            conversation = list(start)
            print("(a new conversation)", file=sys.stderr)
            continue
        try:
            answer = reply(client, adapter, [*conversation, ("user", line)], params)
        except KeyboardInterrupt:  # stop this reply, keep the conversation as it was
            print("\n(reply stopped; not kept)", file=sys.stderr)
            continue
        except grpc.RpcError as e:  # say why, and let the user go on (or Ctrl-D)
            from adapterctl.cli import error_line

            print(error_line(e, client.addr), file=sys.stderr)
            continue
        conversation += [("user", line), ("assistant", answer)]


def reply(client: Client, adapter: str, messages: list[tuple[str, str]], params: dict) -> str:
    """Stream the reply to stdout; returns its text. A reply cut at --max-new-tokens says so."""
    stream = client.generate_stream(adapter=adapter, messages=messages, **params)
    parts: list[str] = []
    finish = pb.FINISH_REASON_UNSPECIFIED
    try:
        for message in stream:
            parts.append(message.text)
            sys.stdout.write(message.text)
            sys.stdout.flush()
            if message.finish_reason:
                finish = message.finish_reason
    except KeyboardInterrupt:
        stream.cancel()
        raise
    except grpc.RpcError:
        sys.stdout.write("\n")
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if finish == pb.LENGTH:
        print(f"(cut at --max-new-tokens {params['max_new_tokens']})", file=sys.stderr)
    return "".join(parts)
