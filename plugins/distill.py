"""``lft distill``: a teacher (any model lft loads; an adapter is merged into its base in memory)
answers each prompt ``--num-samples`` times with the rollout's batched, KV-cached sampling; the
selected reward plugins score the answers (``lft_reward``, as in an online run) and those reaching
``--min-reward`` are kept (rejection sampling; without rewards, all are). The kept answers are
written as SFT rows ``{"prompt", "completion", ...the prompt's other columns}`` with a report, both
atomically once every prompt is answered, and ``--train`` trains a student on them. See
docs/distillation.md."""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import lft
from lft.errors import ConfigError, DataError, PluginError

#: Columns of a prompt row that an SFT row would read before prompt + completion: not copied.
SHADOWING = ("messages", "text", "completion")
#: The command's options that the report records.
SETTINGS = "num_samples temperature top_p max_new_tokens max_prompts seed keep unique drop_unfinished".split()


class Distill:
    """Extension: adds the ``lft distill`` command (teacher traces, filtered by the reward plugins,
    as SFT data for a student)."""

    name = "distill"
    kind = "extension"

    @lft.hookimpl
    def lft_add_commands(self, cli: Any) -> None:
        add_command(cli)


EXAMPLES = """examples:
  lft distill --teacher runs/sft/final --prompts prompts.jsonl --plugin exact_answer -o traces.jsonl
  lft distill --teacher big-model/ --prompts prompts.jsonl --plugin exact_answer -o traces.jsonl \\
      --train --student small-model/ --output runs/student trainer.max_steps=100
"""


def add_command(cli: Any) -> None:
    parser = cli.add_parser(
        "distill",
        help="sample a teacher's answers, keep the correct ones, train a student on them",
        description="A teacher answers every prompt --num-samples times; with reward plugins (--plugin "
        "exact_answer) only the answers whose reward reaches --min-reward are kept. The kept answers are "
        "written as prompt/completion rows to OUT.jsonl, with a report in OUT.report.json; --train then "
        "trains a student on them with SFT (KEY=VALUE overrides set the student's run).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--teacher", "-t", metavar="PATH_OR_ADAPTER", help="model or adapter folder (default: the embedded SmolLM2)"
    )
    parser.add_argument("--prompts", required=True, metavar="FILE", help="rows with a 'prompt' (.jsonl, .json, ...)")
    parser.add_argument("--out", "-o", required=True, metavar="OUT.jsonl", help="where the kept rows go")
    parser.add_argument("--num-samples", "-n", type=int, default=4, metavar="N", help="answers per prompt (4)")
    parser.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature (0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold (1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (128)")
    parser.add_argument("--max-prompts", type=int, metavar="N", help="use the first N prompts only")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per generation call (16)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (0)")
    parser.add_argument("--plugin", "-p", action="append", default=[], metavar="REWARD", help="a reward plugin")
    parser.add_argument(
        "--min-reward",
        type=float,
        metavar="R",
        help="keep answers whose reward is at least R (default: the full score, the sum of the rewards' "
        "positive weights: 1.0 for exact_answer)",
    )
    parser.add_argument(
        "--keep", choices=["all", "best"], default="all", help="all passing answers, or the best one per prompt"
    )
    parser.add_argument("--unique", action="store_true", help="drop an answer that repeats a kept one of its prompt")
    parser.add_argument("--drop-unfinished", action="store_true", help="drop answers cut off at --max-new-tokens")
    parser.add_argument("--train", action="store_true", help="then train a student on the kept rows (SFT)")
    parser.add_argument("--student", metavar="PATH", help="the student (default: the embedded SmolLM2)")
    parser.add_argument("--output", metavar="DIR", help="the student's run folder (default runs/lft)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing student run folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings of the student's run")
    parser.set_defaults(handler=cmd_distill)


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0:
        raise ConfigError("expected --num-samples, --max-new-tokens and --batch-size >= 1 and --temperature >= 0")
    if not 0 < args.top_p <= 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise ConfigError("expected 0 < --top-p <= 1 and --max-prompts >= 1")
    if not args.plugin and (args.min_reward is not None or args.keep == "best"):
        raise ConfigError("--min-reward and --keep best need a reward plugin: add --plugin exact_answer (or another)")
    if Path(args.out).expanduser().resolve() == Path(args.prompts).expanduser().resolve():
        raise ConfigError(f"-o {args.out} is the prompts file; write the kept rows elsewhere")
    if (args.student or args.output) and not args.train:
        raise ConfigError("--student and --output set the student's run: add --train")


def read_prompts(spec: str, limit: int | None) -> list[dict]:
    from lft.data.files import read_rows

    source = read_rows(spec)
    rows = source.rows[:limit] if limit else source.rows
    for row, where in zip(rows, source.where):
        prompt = row.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            found = f"found {', '.join(row) or 'no columns'}" if "prompt" not in row else "it is empty or not text"
            raise DataError(f"{where}: expected a 'prompt' (text or messages) in every row; {found}")
    return rows


def teacher_source(spec: str | None) -> str | None:
    """The teacher's model path: an lft run folder stands for its ``final/`` adapter."""
    marks = ("config.json", "adapter_config.json")
    path = Path(spec or "").expanduser()
    if spec and not any((path / f).is_file() for f in marks) and any((path / "final" / f).is_file() for f in marks):
        return str(path / "final")
    return spec


def raw_settings(settings: list, **keys: Any) -> dict:
    """Raw run settings from ``KEY=VALUE`` pairs and dotted ``keys`` (``model__path``), None ones left out."""
    from lft import config as cfgmod

    data: dict = {}
    for key, value in [*settings, *((k.replace("__", "."), v) for k, v in keys.items() if v is not None)]:
        cfgmod.set_dotted(data, key, value)
    return data


def split_overrides(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``(reward settings, student settings)``: a reward plugin's section applies to the scoring too."""
    from lft import config as cfgmod

    pairs = [cfgmod.parse_override(text) for text in args.overrides]
    scoring = [(k, v) for k, v in pairs if k.split(".")[0] in args.plugin]
    student = [(k, v) for k, v in pairs if k.split(".")[0] not in args.plugin]
    if student and not args.train:
        raise ConfigError(f"{student[0][0]}=... sets the student's run: add --train, or drop it")
    return scoring, student


def scoring_config(args: argparse.Namespace, settings: list) -> Any:
    """The config the teacher is loaded and the answers scored with (``Resolved``)."""
    from lft.online.rewards import reward_plugins
    from lft.train.engine import resolve

    data = raw_settings(settings, model__path=teacher_source(args.teacher), data__train=str(args.prompts))
    resolved = resolve(data, args.manager, list(args.plugin), "lft distill")
    for name in set(args.plugin) - set(reward_plugins(resolved.selection.hook)):
        known = [n for n in args.manager.available() if hasattr(args.manager.infos[n].obj, "lft_reward")]
        raise PluginError(f"--plugin {name} scores no answers (no lft_reward); reward plugins: {', '.join(known)}")
    return resolved


def student_run(args: argparse.Namespace, settings: list) -> Any:
    """The student's ``lft run --plugin sft --data OUT``, validated (config, output folder) before
    the teacher answers. On the embedded task's prompts, its held-out data, task metric and
    suggested settings are used for every key left unset."""
    from lft import config as cfgmod
    from lft.data import task
    from lft.train.engine import Run, resolve

    data = raw_settings(settings, model__path=args.student, output=args.output, data__train=str(args.out))
    if args.overwrite:
        data["overwrite"] = True
    names = ["sft"]
    if task.is_embedded(args.prompts):
        listed = data["plugins"] if isinstance(data.get("plugins"), list) else []
        suggested = args.manager.select([*listed, *names]).hook.lft_default_data() or {}
        unset = {"data.eval": suggested.get("eval"), "eval.task": "arith", **(suggested.get("settings") or {})}
        for key, value in unset.items():
            if value is not None and cfgmod.get_dotted(data, key, cfgmod.MISSING) is cfgmod.MISSING:
                cfgmod.set_dotted(data, key, value)
    run = Run(resolve(data, args.manager, names, "lft distill --train"), quiet=args.quiet)
    run.check_output()
    return run


def sample(args: argparse.Namespace, resolved: Any, rows: list[dict], say: Any) -> dict:
    """Every prompt's answers, whether each ended, and their rewards (``None`` without rewards)."""
    import torch

    from lft.data import chat
    from lft.online.rewards import score
    from lft.online.rollout import RolloutSettings, generate_tokens, is_stop, left_pad, repeat_columns, stop_mask
    from lft.use import evaluate

    config, hook = resolved.config, resolved.selection.hook
    loaded = hook.lft_load_model(config=config, quantization_config=None)
    if loaded is None:
        raise lft.ModelError("no plugin could load the teacher")
    (model, tokenizer), loaded = loaded, None
    gpu = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if gpu else "cpu")
    model.to(device).eval().requires_grad_(False)
    settings = RolloutSettings(args.max_new_tokens, args.temperature, args.top_p, args.num_samples)
    stop_ids = sorted(chat.end_of_turn_ids(tokenizer))
    pad_id = tokenizer.pad_token_id
    n = args.num_samples
    out: dict[str, Any] = {"completions": [], "stopped": [], "rewards": [], "scores": {}}
    torch.manual_seed(args.seed)
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        texts = [chat.prompt_text(tokenizer, r["prompt"]) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids, mask = left_pad(enc["input_ids"], enc["attention_mask"], pad_id)
        with evaluate.autocast(config.trainer.precision, device):
            completion_ids = generate_tokens(model, ids, mask, settings, stop_ids, pad_id)
        real = stop_mask(completion_ids, stop_ids)
        completions = [tokenizer.decode(c[m], skip_special_tokens=True) for c, m in zip(completion_ids, real)]
        stopped = (is_stop(completion_ids, stop_ids) & real).any(-1).tolist()
        out["completions"] += completions
        out["stopped"] += stopped
        if args.plugin:
            columns = {key: [r.get(key) for r in chunk] for key in dict.fromkeys(k for r in chunk for k in r)}
            prompts = [r["prompt"] for r in chunk for _ in range(n)]
            batch = {
                **repeat_columns(columns, n),
                "prompts": prompts,
                "completions": completions,
                "completion_ids": completion_ids.masked_fill(~real, pad_id),
                "completion_mask": real,
                "stopped": torch.tensor(stopped),
                "num_generations": n,
            }
            rewards = score(hook, prompts, completions, batch, config)
            out["rewards"] += rewards.total.tolist()
            for name, values in rewards.scores.items():
                out["scores"].setdefault(name, (rewards.weights[name], []))[1].extend(values.tolist())
        say(f"[dim]answered {min(start + len(chunk), len(rows))} of {len(rows)} prompts[/]")
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


def choose(args: argparse.Namespace, sampled: dict, prompts: int) -> tuple[list[list[int]], float | None]:
    """The kept samples of each prompt (indices into the samples), and the threshold used."""
    n, rewards = args.num_samples, sampled["rewards"]
    threshold = args.min_reward
    if args.plugin and threshold is None:
        threshold = sum(max(w, 0.0) for w, _ in sampled["scores"].values())
    kept = []
    for p in range(prompts):
        idx = [i for i in range(p * n, (p + 1) * n) if sampled["stopped"][i] or not args.drop_unfinished]
        if args.plugin:
            idx = [i for i in idx if rewards[i] >= threshold - 1e-9]
            if args.keep == "best" and idx:
                idx = [max(idx, key=lambda i: (rewards[i], -i))]
        if args.unique:  # the first of each distinct answer
            idx = sorted({sampled["completions"][i].strip(): i for i in reversed(idx)}.values())
        kept.append(idx)
    return kept, threshold


def cmd_distill(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lft.model import loading
    from lft.output.files import atomic_write_text, write_json
    from lft.train.engine import quiet_libraries

    quiet_libraries()
    console = Console(highlight=False, quiet=args.quiet)
    started = time.perf_counter()
    check_args(args)
    scoring_settings, student_settings = split_overrides(args)
    rows = read_prompts(args.prompts, args.max_prompts)
    resolved = scoring_config(args, scoring_settings)
    run = student_run(args, student_settings) if args.train else None
    teacher = resolved.config.model.path
    label = f"the embedded {loading.DEFAULT_MODEL_NAME}" if loading.is_default(teacher) else str(teacher)
    console.print(f"[bold]lft distill[/]: {label} answers {len(rows)} prompts x {args.num_samples}")
    sampled = sample(args, resolved, rows, console.print)
    kept, threshold = choose(args, sampled, len(rows))
    total, count = len(sampled["completions"]), sum(len(k) for k in kept)
    if run is not None and not count:
        raise DataError(f"no answer of {total} passed (reward >= {threshold:g}); nothing to train the student on")
    lines = []
    for row, idx in zip(rows, kept):
        other = {k: v for k, v in row.items() if k not in ("prompt", *SHADOWING)}
        lines += [{"prompt": row["prompt"], "completion": sampled["completions"][i], **other} for i in idx]
    out = Path(args.out).expanduser()
    report = {
        "teacher": label,
        "prompts_file": str(args.prompts),
        "output": str(out),
        "prompts": len(rows),
        "samples": total,
        "kept": count,
        "kept_share": count / max(1, total),
        "per_prompt_kept": [len(idx) for idx in kept],
        "prompts_without_answer": sum(not idx for idx in kept),
        "unfinished": sum(not s for s in sampled["stopped"]),
        "mean_reward": sum(sampled["rewards"]) / total if sampled["rewards"] else None,
        "settings": {
            **{key: getattr(args, key) for key in SETTINGS},
            "rewards": {k: {"weight": w, "mean": sum(v) / total} for k, (w, v) in sampled["scores"].items()} or None,
            "min_reward": threshold,
            "student": str(run.output) if run is not None else None,
        },
        "time_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "distilled data")
    write_json(out.with_name(out.stem + ".report.json"), report)
    console.print(f"kept {count} of {total} answers ({report['kept_share']:.0%}) from {len(rows)} prompts -> {out}")
    if run is not None:
        run.execute()
    return 0
