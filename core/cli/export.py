"""``lft export``: a model or an adapter as a GGUF file for llama.cpp and Ollama (``lft.use.export``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """examples:
  lft export runs/lft/final -o smollm-task.gguf                 # an adapter, merged, in f16
  lft export runs/full/final --outtype q8_0 -o model-q8.gguf    # 8-bit blocks, half the size
  ollama create smollm-task -f Modelfile && ollama run smollm-task   # the Modelfile beside the file
"""


def add_command(cli: Any) -> None:
    parser = cli.add_parser(
        "export",
        help="write a model or an adapter as a GGUF file for llama.cpp and Ollama",
        description="Write a model or an adapter (merged into its base first) as one GGUF file with its "
        "tokenizer and chat template, check it by reading it back with transformers and comparing logits, "
        "and write an Ollama Modelfile beside it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", metavar="MODEL_OR_ADAPTER", help="a model folder, hub id, .gguf file or adapter folder"
    )
    parser.add_argument("-o", "--out", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="the file format (gguf)")
    parser.add_argument(
        "--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="weight type (default f16; norms stay f32)"
    )
    parser.add_argument("--model", metavar="BASE", help="the base an adapter merges into (default: its own)")
    parser.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lft.use.export import export

    info = export(args.source, args.out, args.outtype, model=args.model)
    err = Console(stderr=True, highlight=False)
    err.print(
        f"exported {info['source']} -> {info['output']} ({info['outtype']}, {info['bytes'] / 1e6:.1f} MB); "
        f"checked against the source: KL {info['kl_mean']:.2g} nats/token on average, {info['kl_max']:.2g} at most "
        f"(tolerance {info['tolerance']['kl_mean']:g}, {info['tolerance']['kl_max']:g}); the same greedy token at "
        f"{info['greedy_agreement']:.0%} of positions"
    )
    err.print(f"Ollama: {info['modelfile']} (template: {info['template']})")
    print(info["output"], file=sys.stdout)
    return 0
