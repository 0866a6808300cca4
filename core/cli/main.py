"""The ``lft`` command line.

Errors that lft understands (``LftError``) are printed as one line, without a traceback, and
exit with status 2. Plugins add subcommands through ``lft_add_commands``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from rich.console import Console

EXAMPLES_RUN = """examples:
  lft run                                   LoRA SFT of the embedded model on the embedded task
  lft run --plugin dpo                      DPO (with LoRA) on the embedded preference pairs
  lft run --plugin full --data chat.jsonl   full fine-tuning on your own conversations
  lft run --config run.yaml lora.r=32 trainer.lr=1e-4
  lft run --output runs/a --resume          continue an interrupted run
  lft run --strict                          refuse to train when a preflight guard warns (see lft check)
"""

RUN_FLAGS = {  # CLI flag -> config key
    "model": "model.path",
    "data": "data.train",
    "eval_data": "data.eval",
    "output": "output",
    "max_steps": "trainer.max_steps",
    "batch_size": "trainer.batch_size",
    "lr": "trainer.lr",
}


def _console() -> Console:
    return Console(highlight=False)


def _err_console() -> Console:
    # soft_wrap: an error stays one line, whatever the terminal width
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _error(message: str) -> int:
    from rich.markup import escape

    _err_console().print(f"[bold red]error:[/] {escape(message)}")  # a message's [brackets] are text
    return 2


def _add_config_sources(parser: argparse.ArgumentParser, with_flags: bool = True) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--plugin",
        "-p",
        action="append",
        default=[],
        metavar="NAME",
        help="select a plugin (repeatable): an objective, a model wrapper, extensions",
    )
    if with_flags:
        parser.add_argument(
            "--model",
            "-m",
            metavar="PATH_OR_ID",
            help="HF folder, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)",
        )
        parser.add_argument(
            "--data",
            "-d",
            action="append",
            metavar="FILE[:WEIGHT]",
            help="training data (.jsonl, .json, .parquet, .csv, hub id); repeat it for a mixture, each "
            "source with its weight: --data a.jsonl:3 --data b.jsonl:1",
        )
        parser.add_argument("--eval-data", metavar="FILE", help="held-out data")
        parser.add_argument("--output", "-o", metavar="DIR", help="output folder (default runs/lft)")
        parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps to train")
        parser.add_argument("--batch-size", type=int, metavar="N", help="examples per micro-batch")
        parser.add_argument("--lr", type=float, metavar="LR", help="peak learning rate")
        parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="set any config key, e.g. lora.r=32 trainer.lr=1e-4 data.max_length=512",
    )


def _resolve(args: argparse.Namespace) -> Any:
    """The run a command describes (``lft.train.engine.Resolved``): its raw settings from the
    config file, the flags and KEY=VALUE overrides (later ones winning), resolved and validated
    once with the command line's plugin manager."""
    from lft import config as cfgmod
    from lft.train.engine import resolve

    data = cfgmod.read_yaml(args.config) if args.config else {}
    from lft.data.files import data_flag

    flags: dict[str, Any] = {key: getattr(args, flag, None) for flag, key in RUN_FLAGS.items()}
    flags["data.train"] = data_flag(getattr(args, "data", None))
    if getattr(args, "resume", False):
        flags["resume"] = True
    if getattr(args, "overwrite", False):
        flags["overwrite"] = True
    if getattr(args, "strict", False):
        flags["guards.strict"] = True
    for key, value in flags.items():
        if value is not None:
            cfgmod.set_dotted(data, key, value)
    for text in args.overrides:
        key, value = cfgmod.parse_override(text)
        cfgmod.set_dotted(data, key, value)
    return resolve(data, args.manager, [p for p in args.plugin], str(args.config or "config"))


# -- commands -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from lft.train.engine import Run, quiet_libraries

    quiet_libraries()
    Run(_resolve(args), quiet=args.quiet).execute()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.table import Table

    manager = args.manager
    infos = sorted(manager.infos.values(), key=lambda i: (i.kind == "core", i.name))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "kind": i.kind,
                        "package": i.package,
                        "version": i.version,
                        "hooks": i.hooks,
                        "source": i.source,
                        "error": i.error,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="lft plugins", header_style="bold")
    for column in ("name", "kind", "package", "version", "hooks"):
        table.add_column(column, overflow="fold")
    for info in infos:
        hooks = ", ".join(h.removeprefix("lft_") for h in info.hooks)
        if info.broken:
            table.add_row(f"[red]{info.name}[/]", "[red]broken[/]", info.package, info.version, f"[red]{info.error}[/]")
        else:
            table.add_row(info.name, info.kind, info.package, info.version, hooks)
    _console().print(table)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(_resolve(args).config.to_yaml(), end="")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from lft import config as cfgmod
    from lft.errors import ConfigError

    cls = cfgmod.config_class(cfgmod.plugin_sections(args.manager))
    try:
        config = cfgmod.load(cls, file=args.file)
        args.manager.select(config.plugins)
    except ConfigError as exc:
        console = _err_console()
        console.print(f"[bold red]error:[/] {args.file}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            console.print(f"  - {problem}")
        return 2
    _console().print(f"[green]ok[/] {args.file}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from lft import config as cfgmod

    cls = cfgmod.config_class(cfgmod.plugin_sections(args.manager))
    print(json.dumps(cls.model_json_schema(), indent=2))
    return 0


# -- parser ---------------------------------------------------------------------------------------


def build_parser(manager: Any) -> argparse.ArgumentParser:
    from lft import __version__

    parser = argparse.ArgumentParser(
        prog="lft",
        description="Fine-tune language models: SFT, LoRA, QLoRA, reward models, DPO, ORPO, SimPO, PPO, GRPO. "
        "Every method is a plugin; `lft plugins` lists what is installed.",
        epilog="Run `lft COMMAND --help` for a command's options. Docs: docs/index.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="train a model",
        description="Train a model with the selected plugins. "
        "Flags are shortcuts for config keys; KEY=VALUE sets any key.",
        epilog=EXAMPLES_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_sources(run)
    run.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    run.add_argument("--strict", action="store_true", help="stop before training when a preflight guard warns")
    run.set_defaults(handler=cmd_run)

    plugins = sub.add_parser(
        "plugins",
        help="list installed plugins",
        description="List every installed plugin: name, kind, package, version and hooks.",
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(handler=cmd_plugins)

    config = sub.add_parser(
        "config", help="show, validate or describe configs", description="Work with run configurations."
    )
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved config as YAML",
        description="Resolve a config from a file, flags and KEY=VALUE overrides and print it.",
    )
    _add_config_sources(show)
    show.set_defaults(handler=cmd_config_show)
    validate = config_sub.add_parser(
        "validate", help="check a config file", description="Validate a YAML config file and list every problem."
    )
    validate.add_argument("file", metavar="FILE")
    validate.set_defaults(handler=cmd_config_validate)
    schema = config_sub.add_parser(
        "schema",
        help="print the JSON schema",
        description="Print the JSON schema of the config, with every plugin's section.",
    )
    schema.set_defaults(handler=cmd_config_schema)

    try:
        manager.pm.hook.lft_add_commands(cli=sub)
    except Exception as exc:  # a plugin's command must not break lft's own
        _error(f"a plugin failed to add its commands: {exc}")
    parser.set_defaults(manager=manager)  # one plugin manager for the whole command
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lft.errors import LftError

    try:
        from lft.plugin.manager import PluginManager

        parser = build_parser(PluginManager())
        args, rest = parser.parse_known_args(argv)
        # KEY=VALUE overrides may come between flags, which argparse's positionals do not allow.
        if hasattr(args, "overrides"):
            args.overrides = list(args.overrides) + [r for r in rest if "=" in r and not r.startswith("-")]
            rest = [r for r in rest if not ("=" in r and not r.startswith("-"))]
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if not getattr(args, "handler", None):
            parser.print_help()
            return 0
        return int(args.handler(args) or 0)
    except LftError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted")


if __name__ == "__main__":
    sys.exit(main())
