"""``lft check`` (the preflight guards, without training) and ``lft inspect`` (the label-mask viewer).

Both read and format data exactly as ``lft run`` does, through the selected objective's
``lft_format_example``, and load only the tokenizer when no selected plugin loads models its own way.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lft.losses.logprobs import IGNORE_INDEX


def _data_flags(parser: argparse.ArgumentParser) -> None:
    from lft.cli.main import _add_config_sources

    _add_config_sources(parser, with_flags=False)
    parser.add_argument("--model", "-m", metavar="PATH_OR_ID", help="model whose tokenizer is used (default: embedded)")
    parser.add_argument(
        "--data",
        "-d",
        action="append",
        metavar="FILE[:WEIGHT]",
        help="training data, repeatable for a weighted mixture (default: the objective's embedded data)",
    )
    parser.add_argument("--eval-data", metavar="FILE", help="held-out data")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def add_commands(cli: Any) -> None:
    check = cli.add_parser(
        "check",
        help="preflight: template lint, data lint, contamination",
        description="Run the guards that look at the data, exactly as `lft run` does before "
        "training, and report what they find. Exit status 1 when a guard reports an error "
        "(or, with --strict, a warning).",
    )
    _data_flags(check)
    check.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="FILE",
        help="also check the training data for overlap with FILE (repeatable), e.g. a benchmark",
    )
    check.add_argument("--strict", action="store_true", help="warnings fail the check too")
    check.set_defaults(handler=cmd_check)
    inspect = cli.add_parser(
        "inspect",
        help="show how examples are tokenised and which tokens are trained",
        description="Format rows with the selected objective, exactly as training does, and "
        "show every token: trained (in the label mask) or masked, special tokens visible.",
    )
    _data_flags(inspect)
    inspect.add_argument("-n", type=int, default=3, metavar="N", help="examples to show (default 3)")
    inspect.set_defaults(handler=cmd_inspect)


def prepare(args: argparse.Namespace, console: Console) -> tuple[Any, Any, Any]:
    """The run (not started) and tokenizer a command works with."""
    from lft.cli.main import _resolve
    from lft.train.engine import Run, quiet_libraries

    quiet_libraries()
    run = Run(_resolve(args), console=console)
    return run.config, run, load_tokenizer(run)


def load_tokenizer(run: Any) -> Any:
    """The run's tokenizer: loaded alone when only lft's own loader is selected, else through the hook."""
    from lft.model import loading

    impls = run.hook.lft_load_model.get_hookimpls()
    if all(impl.plugin_name == "core" for impl in impls):
        mc = run.config.model
        source = loading.local_folder(mc.path, mc.gguf_file)
        tokenizer = loading.load_tokenizer(source, mc.trust_remote_code, mc.revision)
        try:
            from transformers import GenerationConfig

            run.guards.generation_config = GenerationConfig.from_pretrained(source)
        except Exception:  # a folder without generation_config.json: nothing to compare with
            run.guards.generation_config = None
        return tokenizer
    return run.load()[1]


# -- lft check ------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from lft.errors import LftError
    from lft.guards.findings import TITLES, Finding
    from lft.output.summary import print_guards

    out = Console(highlight=False)
    console = Console(stderr=True, highlight=False) if args.json else out
    config, run, tokenizer = prepare(args, console)
    guards = config.section("guards")
    guards.contamination.against = list(guards.contamination.against) + list(args.against)
    guards.strict = guards.strict or args.strict
    run.guards.check_only = True
    info: dict = {}
    try:
        _, _, info = run.read_data(tokenizer)
    except LftError as exc:  # the guards that ran before the failure still report
        run.guards.findings.append(
            Finding("format", "error", detail="the data cannot be formatted", problems=[str(exc)])
        )
    findings = run.guards.findings
    failing = ("error", "warning") if guards.strict else ("error",)
    ok = not any(f.status in failing for f in findings)
    if args.json:
        print(json.dumps({"ok": ok, "data": info, "findings": [f.as_dict() for f in findings]}, indent=2, default=str))
        return 0 if ok else 1
    print_guards(out, [f.as_dict() for f in findings], title="lft check")
    for finding in findings:
        if finding.problems or (finding.fired and finding.examples):
            out.print(f"[bold]{TITLES.get(finding.guard, finding.guard)}[/]")
            for problem in finding.problems:
                out.print(f"  - {escape(problem)}")
            for example in finding.examples:
                out.print(f"    [dim]{escape(example)}[/]")
    warned = sum(f.status == "warning" for f in findings)
    if ok:
        out.print("[green]check passed[/]" + (f" with {warned} warning(s); --strict would fail" if warned else ""))
    else:
        out.print("[red]check failed[/]" + (" (--strict: warnings fail)" if guards.strict and warned else ""))
    return 0 if ok else 1


# -- lft inspect ----------------------------------------------------------------------------------


def token_view(
    tokenizer: Any, ids: list[int], labels: list[int] | None, positions: list[int] | None = None
) -> list[dict]:
    """One entry per token: id, text, whether it is trained, whether it is special, and in a
    packed row (``positions``) whether it starts another example."""
    special = set(tokenizer.all_special_ids or [])
    return [
        {
            "id": int(t),
            "text": tokenizer.decode([t], skip_special_tokens=False),
            "trained": labels is not None and labels[i] != IGNORE_INDEX,
            "special": int(t) in special,
            "starts_example": positions is not None and i > 0 and positions[i] == 0,
        }
        for i, t in enumerate(ids)
    ]


def render(tokens: list[dict], colour: bool) -> Text:
    """Trained tokens on green, masked ones dim, special tokens magenta; neighbouring tokens alternate
    shades so their boundaries show. Without colour, trained runs are wrapped in ⟦ ⟧."""
    text = Text()
    inside = False
    for i, token in enumerate(tokens):
        if token.get("starts_example"):
            text.append(" ┃ ", style="bold yellow" if colour else "")  # the boundary between packed examples
        piece = token["text"].replace("\n", "↵\n").replace("\t", "→")
        if not colour and token["trained"] != inside:
            text.append("⟦" if token["trained"] else "⟧")
            inside = token["trained"]
        if token["trained"]:
            style = "black on green" if i % 2 else "black on bright_green"
        else:
            style = "grey50" if i % 2 else "grey70"
        if token["special"]:
            style = "bold magenta" + (" on green" if token["trained"] else "")
        text.append(piece, style=style if colour else "")
    if inside and not colour:
        text.append("⟧")
    return text


def cmd_inspect(args: argparse.Namespace) -> int:
    from lft.data.files import read_train, train_label
    from lft.data.packing import pack, packable
    from lft.errors import DataError
    from lft.guards.template import pairs

    out = Console(highlight=False)
    config, run, tokenizer = prepare(args, Console(stderr=True, highlight=False) if args.json else out)
    rows = read_train(config)
    max_length = config.data.max_length
    shown: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    examples: list[dict[str, Any]] = []
    places: list[str] = []
    for row, where in zip(rows.rows, rows.where):
        try:
            feature = run.hook.lft_format_example(example=row, tokenizer=tokenizer, config=config)
        except (DataError, KeyError, TypeError, ValueError) as exc:
            errors.append(f"{where}: {exc}")
            continue
        if feature is None or "skip" in feature:
            errors.append(f"{where}: skipped ({(feature or {}).get('skip', 'no plugin formats this row')})")
            continue
        parts = pairs(feature)
        length = max((len(ids) for _, ids, _ in parts), default=0)
        trained = sum(sum(t != IGNORE_INDEX for t in labels) for _, _, labels in parts if labels is not None)
        total = sum(len(ids) for _, ids, _ in parts)
        truncated = bool(feature.get("truncated")) or length > max_length
        records.append(
            {"where": where, "length": length, "trained": trained, "masked": total - trained, "truncated": truncated}
        )
        examples.append({k: v for k, v in feature.items() if k != "truncated"})
        places.append(where)
        if len(shown) < args.n:
            shown.append(
                {
                    "where": where,
                    "truncated": truncated,
                    "parts": {name or "input_ids": token_view(tokenizer, ids, labels) for name, ids, labels in parts},
                }
            )
    longest = max(records, key=lambda r: r["length"], default=None)
    stats = {
        "rows": len(rows),
        "examples": len(records),
        "trained_tokens": sum(r["trained"] for r in records),
        "masked_tokens": sum(r["masked"] for r in records),
        "truncated": sum(r["truncated"] for r in records),
        "max_length": max_length,
        "longest": longest and {"where": longest["where"], "length": longest["length"]},
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "data": train_label(config),
    }
    if config.data.packing and packable(examples):  # show the rows training will see, boundaries marked
        packed, wheres = pack(examples, max_length, places)
        stats["packed_rows"] = len(packed)
        shown = [
            {
                "where": where,
                "truncated": False,
                "parts": {"input_ids": token_view(tokenizer, row["input_ids"], row["labels"], row["position_ids"])},
            }
            for row, where in list(zip(packed, wheres))[: args.n]
        ]
    if args.json:
        print(json.dumps({"examples": shown, "stats": stats}, indent=2))
        return 0
    colour = out.color_system is not None
    legend = (
        Text.assemble(("trained", "black on green"), "  ", ("masked", "grey50"), "  ", ("<special>", "bold magenta"))
        if colour
        else Text("⟦trained⟧ masked")
    )
    out.print(
        Text.assemble("lft inspect ", (train_label(config), "bold"), f"  objective {run.selection.objective}  ", legend)
    )
    for example in shown:
        out.rule(f"{example['where']}" + ("  (truncated at data.max_length)" if example["truncated"] else ""))
        for name, tokens in example["parts"].items():
            if len(example["parts"]) > 1:
                out.print(f"[bold]{name}[/]")
            out.print(render(tokens, colour))
            n_trained = sum(t["trained"] for t in tokens)
            out.print(f"[dim]{len(tokens)} tokens: {n_trained} trained, {len(tokens) - n_trained} masked[/]")
    table = Table(title="tokens", header_style="bold", show_header=False)
    trained, masked = stats["trained_tokens"], stats["masked_tokens"]
    table.add_row("examples", f"{stats['examples']} of {stats['rows']} rows")
    table.add_row("trained tokens", f"{trained:,} ({100 * trained / max(1, trained + masked):.1f}%)")
    table.add_row("masked tokens", f"{masked:,}")
    table.add_row("truncated at max_length", f"{stats['truncated']} (data.max_length={max_length})")
    if "packed_rows" in stats:
        table.add_row("packed rows", f"{stats['packed_rows']} (data.packing, examples marked ┃)")
    if longest:
        table.add_row("longest example", f"{longest['length']} tokens ({longest['where']})")
    if errors:
        table.add_row("[red]not formatted[/]", escape(f"{len(errors)}, e.g. {errors[0]}"))
    out.print(table)
    return 0
