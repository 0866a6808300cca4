"""The commands that use trained models: ``lft generate``, ``lft chat``, ``lft eval`` and
``lft merge``. lft's core plugin adds them through ``lft_add_commands``, as any plugin would."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from lft.errors import ConfigError, DataError

GENERATE_EXAMPLES = """examples:
  lft generate "Tom has 3 apples and gets 4 more. How many?"
  lft generate --model runs/lft/final "first prompt" "second prompt"
  lft generate --adapter runs/lft/final --prompts questions.txt --out answers.jsonl
  lft generate --adapter support=runs/a/final --adapter code=runs/b/final --prompt "Hi"
"""


def add_commands(cli: Any) -> None:
    generate = cli.add_parser(
        "generate",
        help="complete prompts with a model and its adapters",
        description="Complete prompts through the model's chat template. With several "
        "named adapters, each one answers (or those chosen with --use).",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(generate)
    generate.add_argument("texts", nargs="*", metavar="PROMPT", help="prompts to complete (as --prompt)")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    source.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts, one a line (or .jsonl rows with 'prompt' or 'messages'); writes JSONL",
    )
    generate.add_argument("--out", metavar="OUT.jsonl", help="write JSONL here instead of to stdout")
    generate.add_argument(
        "--use",
        action="append",
        metavar="NAME",
        help="adapters that answer (repeatable; 'base' is the bare base model); default: every adapter",
    )
    _sampling_args(generate)
    generate.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per generate call")
    generate.set_defaults(handler=cmd_generate)

    chat = cli.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Interactive chat through the model's chat template; the reply streams as "
        "it is generated. Type /adapter NAME to switch adapters, /reset to forget the "
        "conversation, /exit (or Ctrl-D) to quit.",
    )
    _model_args(chat)
    chat.add_argument("--use", metavar="NAME", help="the adapter to start with (default: the first)")
    _sampling_args(chat)
    chat.set_defaults(handler=cmd_chat)

    evaluate = cli.add_parser(
        "eval",
        help="measure a model and its adapters on held-out data",
        description="Measure each held-out file with the installed objective that reads "
        "it (the adapter's own first): a token NLL and perplexity for SFT rows, which "
        "completion of a pair the model prefers for preference rows; and the embedded "
        "task's accuracy on prompt/answer rows. The same code as `lft run`'s summary. With "
        "no --data, the embedded task's held-out files.",
    )
    _model_args(evaluate)
    evaluate.add_argument(
        "--data",
        "-d",
        action="append",
        metavar="FILE",
        help="held-out data (repeatable, one file per objective that reads it, plus prompt/answer rows for the task)",
    )
    evaluate.add_argument("--base", action="store_true", help="also measure the base model without adapters")
    evaluate.add_argument(
        "--task",
        choices=["auto", "arith", "none"],
        help="the embedded task metric (default auto: when the data is the embedded task's)",
    )
    evaluate.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        help="rows used per file (default data.max_eval_rows of the adapter's run, as `lft run` uses)",
    )
    evaluate.add_argument(
        "--baseline",
        action="store_true",
        help="also measure the base model with a system prompt and with solved examples in the prompt (the "
        "prompting baseline of `lft run`) on the task metric",
    )
    evaluate.add_argument("--system-prompt", metavar="TEXT", help="the baseline's system prompt (default: the task's)")
    evaluate.add_argument("--shots", type=int, metavar="K", help="solved examples in the baseline's prompt (default 3)")
    evaluate.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    evaluate.set_defaults(handler=cmd_eval)

    merge = cli.add_parser(
        "merge",
        help="merge an adapter into its base model",
        description="Fold an adapter into its base weights (W + BA) and save a plain "
        "transformers folder with the tokenizer and chat template. A QLoRA adapter is "
        "merged into a full-precision copy of its base.",
    )
    merge.add_argument("adapter", metavar="ADAPTER_DIR")
    merge.add_argument("--out", "-o", required=True, metavar="OUT")
    merge.add_argument(
        "--model", "-m", metavar="PATH_OR_ID", help="the base (default: the one the adapter was trained on)"
    )
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="save the weights in this dtype")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    merge.set_defaults(handler=cmd_merge)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        metavar="PATH_OR_ID",
        help="the base model (default: the adapter's base, else the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--adapter",
        "-a",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter folder, optionally named (repeatable: many adapters on one base)",
    )


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", metavar="TEXT", help="a system message before each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, metavar="N", help="makes sampling reproducible")


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _load(args: argparse.Namespace) -> Any:
    import warnings

    from lft.use.loaded import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(args.model, args.adapter)
    for note in loaded.notes:
        _err().print(f"[yellow]note:[/] {note}")
    return loaded


def _sampling(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("expected --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "system": args.system,
    }


# -- generate --------------------------------------------------------------------------------------


def read_prompts(spec: str) -> list[dict]:
    """Rows with a ``prompt`` (string or messages): from a data file's ``prompt`` or ``messages``
    column (a trailing assistant turn is dropped), or one prompt per line of a text file."""
    from lft.data.files import SUFFIXES, read_rows

    path = Path(spec)
    if path.suffix.lower() not in SUFFIXES:
        if not path.is_file():
            raise DataError(f"prompts file {spec} not found")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        rows = [{"prompt": line} for line in lines if line]
    else:
        rows = []
        source = read_rows(spec)
        for row, where in zip(source.rows, source.where):
            if "prompt" in row:
                rows.append(dict(row))
            elif isinstance(row.get("messages"), list) and row["messages"]:
                messages = row["messages"][:-1] if row["messages"][-1].get("role") == "assistant" else row["messages"]
                rows.append({**row, "prompt": messages})
            else:
                raise DataError(f"{where}: expected a 'prompt' or 'messages' column")
    if not rows:
        raise DataError(f"{spec}: no prompts")
    return rows


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    texts = list(args.texts) + list(args.prompt or [])
    if args.prompts and texts:
        raise ConfigError("lft generate: give prompts as arguments or --prompt, or a file with --prompts, not both")
    if not args.prompts and not texts:
        raise ConfigError('lft generate: no prompt; give one: lft generate "TEXT" (or --prompt TEXT, --prompts FILE)')
    args.prompt = texts
    rows = [{"prompt": p} for p in texts] if texts else read_prompts(args.prompts)
    loaded = _load(args)
    names = args.use or loaded.names or ["base"]
    results = []
    for name in names:
        completions = loaded.generate(
            [r["prompt"] for r in rows], adapter=name, seed=args.seed, batch_size=args.batch_size, **sampling
        )
        results += [
            {**r, "adapter": name if loaded.names else None, "completion": c} for r, c in zip(rows, completions)
        ]
    if args.prompt and not args.out:
        for result in results:
            if len(names) > 1:
                print(f"--- {result['adapter']} ---")
            print(result["completion"])
        return 0
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.out:
        write_text_atomic(Path(args.out), text)
        _err().print(f"wrote {len(results)} completions to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def write_text_atomic(path: Path, text: str) -> None:
    from lft.output.files import atomic_write_text

    atomic_write_text(path, text, "output file")


# -- chat ------------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    sampling = _sampling(args)
    system = sampling.pop("system")
    loaded = _load(args)
    adapter = loaded.resolve(args.use or (loaded.names[0] if loaded.names else None))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    err = _err()
    err.print(
        f"[bold]lft chat[/] · {loaded.label} · adapter {adapter}"
        + (f" (loaded: {', '.join(loaded.names)})" if len(loaded.names) > 1 else "")
        + " · /adapter NAME, /reset, /exit"
    )
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    messages = list(history)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(history)
            err.print("[dim]conversation cleared[/]")
            continue
        if line.startswith("/adapter"):
            try:
                adapter = loaded.resolve(line.split(maxsplit=1)[1].strip() if " " in line else "")
                err.print(f"[dim]now answering with {adapter}[/]")
            except Exception as exc:
                err.print(f"[red]{exc}[/]")
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = loaded.generate(messages, adapter=adapter, streamer=streamer, **sampling)
        messages.append({"role": "assistant", "content": reply})


# -- eval ------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lft.output.files import write_json
    from lft.output.summary import fmt
    from lft.use.loaded import BASE

    loaded = _load(args)
    names = ([BASE] if args.base or not loaded.names else []) + loaded.names
    prepared = loaded.eval_data(args.data, args.task, args.max_rows)
    if args.baseline:
        names = [BASE] + [n for n in names if n != BASE]
    results = {name: loaded.evaluate(adapter=name, prepared=prepared) for name in names}
    if args.baseline:
        results = {**prompting_baselines(loaded, prepared, args), **results}
        names = list(results)
    title = f"lft eval · {loaded.label}" + (f" ({loaded.quantization})" if loaded.quantization else "")
    table = Table(title=title, header_style="bold")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for r in results.values() for k in r if not k.endswith("samples")))
    for key in keys:  # named by the objective plugin that measured them (eval_*) or the task
        table.add_row(key.removeprefix("eval_").replace("_", " "), *[fmt(results[n].get(key)) for n in names])
    console = Console(highlight=False)
    console.print(table)
    for form, info in prepared["files"].items():
        console.print(f"[dim]{form}: {info['file']} ({info['rows']} rows)[/]")
    if args.json:
        write_json(
            Path(args.json),
            {
                "model": loaded.label,
                "adapters": loaded.adapters,
                "quantization": loaded.quantization,
                "data": prepared["files"],
                "results": results,
            },
        )
    return 0


def prompting_baselines(loaded: Any, prepared: dict, args: argparse.Namespace) -> dict:
    """The base model's task accuracy with a system prompt and with solved examples (``lft.guards.baseline``)."""
    from lft.data import task
    from lft.guards import baseline
    from lft.use import evaluate
    from lft.use.loaded import BASE

    if not prepared["task_rows"]:
        raise ConfigError("--baseline compares task accuracies: give prompt/answer rows with --data, or --task arith")
    config = loaded.config
    if args.shots is not None and args.shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {args.shots}")
    system = args.system_prompt or config.eval.system_prompt or task.INSTRUCTION
    shots = baseline.shot_examples([], None, args.shots or config.eval.shots, config.trainer.seed)
    with loaded.using(BASE):
        measured = baseline.measure(
            loaded.model, loaded.tokenizer, prepared["task_rows"], system, shots,
            evaluate.Settings.from_config(config),
        )  # fmt: skip
    return {
        "base + system prompt": measured["system_prompt"],
        f"base + {len(shots)} examples": {"task_accuracy": measured["shots"]["task_accuracy"]},
    }


# -- merge -----------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    from lft.use.loaded import merge

    err = _err()
    info = merge(args.adapter, args.out, model=args.model, dtype=args.dtype, overwrite=args.overwrite)
    if info["trained_on"]:
        err.print(
            f"the adapter was trained on a {info['trained_on']} base; merged into a full-precision copy "
            f"of {info['base']}"
        )
    err.print(f"merged {args.adapter} into {info['base']} -> {info['output']} ({info['dtype']})")
    return 0
