"""`adapterctl generate`: one completion, printed as text (or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys

from google.protobuf.json_format import MessageToDict

from adapterctl.client import Client


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with an adapter (or the base model)",
        description="Generate a completion of PROMPT and print the text alone on stdout.",
    )
    p.add_argument(
        "--adapter", default="", metavar="NAME",
        help='adapter: "name", "name@VERSION" or "tenant/name@VERSION" (default: "", the base model)',
    )
    p.add_argument("--max-new-tokens", type=_non_negative, default=64, metavar="N", help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=_non_negative, default=None, metavar="K", help="sample from the K most likely tokens (default: all)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeats (default: 1)")
    p.add_argument("--seed", type=_non_negative, default=None, metavar="S", help="seed for sampling, for reproducible output")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the text ends with TEXT (repeatable)")
    p.add_argument("--logprobs", action="store_true", help="ask for token log-probabilities (shown with --json)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence, to --max-new-tokens")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as one user message, rendered with the base model's chat template "
                   "(the answer ends at its end of turn); see also `adapterctl chat`")
    p.add_argument("--json", action="store_true", help="print the full response as JSON (one object per message with --stream)")
    p.add_argument("prompt", help='the prompt; "-" reads it from stdin')
    p.set_defaults(run=run)


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {n}")
    return n


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        logprobs=args.logprobs,
        ignore_eos=args.ignore_eos,
    )
    text = {"messages": [("user", prompt)]} if args.chat else {"prompt": prompt}
    with Client.from_args(args) as client:
        if args.stream:
            stream = client.generate_stream(adapter=args.adapter, **text, **params)
            for message in stream:
                if args.json:
                    print(_json(message), flush=True)
                else:
                    sys.stdout.write(message.text)
                    sys.stdout.flush()
            if not args.json:
                sys.stdout.write("\n")
        else:
            response = client.generate(adapter=args.adapter, **text, **params)
            print(_json(response) if args.json else response.text)
    return 0


def _json(message) -> str:
    return json.dumps(
        MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
        ensure_ascii=False,
    )
