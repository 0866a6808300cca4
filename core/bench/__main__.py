"""Side-by-side benchmark of lft and the most-used peer (trl 1.16) on the same work.

    python -m lft.bench --method sft|dpo|orpo|simpo|grpo|ppo|all [--steps N] [--tools lft,peer]

Both tools get the same model (the embedded SmolLM2-135M-Instruct, converted once to a local
transformers folder that both load), the same data (the shipped task data, conversational), the
same LoRA adapters, batch, max length, precision, optimizer, learning rate and steps. Each runs in
its own process, one after the other. The report gives, per method: median seconds per step after
warm-up, non-pad tokens per second, peak RSS, model FLOP utilisation against this machine's
measured matmul peak, the final loss, and lft/peer ratios. ``--sweep-turns 1,2,4`` repeats SFT
with longer multi-turn examples and plots throughput and memory against sequence length.
Install the peer with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lft.bench.common import METHODS, PEER_METHODS, Settings, flops_per_token, matmul_peak, write_data


def summarise(result: dict, settings: Settings, peak: float, per_token: float) -> dict:
    steps = result["steps"][settings.warmup :] or result["steps"]
    times = [s["time"] for s in steps]
    tokens = sum(s["tokens"] for s in steps)
    losses = [s["loss"] for s in result["steps"] if s.get("loss") is not None]
    tail = losses[-5:]
    tokens_per_s = tokens / sum(times) if sum(times) > 0 else 0.0
    return {
        "tool": result["tool"],
        "steps": len(result["steps"]),
        "median_step_s": statistics.median(times),
        "steps_per_s": 1 / statistics.median(times),
        "tokens_per_s": tokens_per_s,
        "peak_rss_mb": result["peak_rss_mb"],
        "mfu": tokens_per_s * per_token / peak if tokens_per_s else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "losses": losses,
    }


def run_side(tool: str, settings: Settings, work: Path) -> dict:
    settings_path = work / f"{tool}-{settings.method}-settings.json"
    out = work / f"{tool}-{settings.method}-result.json"
    settings.save(settings_path)
    command = [sys.executable, "-m", "lft.bench.workers", tool, str(settings_path), str(out)]
    print(f"  {tool}: {settings.method}, {settings.steps} steps ...", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} {settings.method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def ratios(lft: dict, peer: dict) -> dict:
    def ratio(key: str) -> float | None:
        a, b = lft.get(key), peer.get(key)
        return a / b if a and b else None

    return {
        "tokens_per_s": ratio("tokens_per_s"),
        "steps_per_s": ratio("steps_per_s"),
        "peak_rss": ratio("peak_rss_mb"),
    }


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; precision {report['precision']}; batch {report['batch_size']}; "
        f"LoRA r={report['lora_r']} on {', '.join(report['targets'])}; {report['steps']} steps "
        f"({report['warmup']} warm-up); data {report.get('data', 'the embedded task')}; "
        + ("the peer packs its rows; " if report.get("peer_packing") else "")
        + f"matmul peak {report['peak_tflops']:.2f} TFLOP/s"
        + (
            f"; lft with {', '.join(f'{k}={v}' for k, v in report['lft_overrides'].items())}"
            if report.get("lft_overrides")
            else ""
        )
        + ".",
        "",
        "| method | tool | s/step | tokens/s | peak RSS (MB) | MFU | final loss | lft/peer tokens/s | lft/peer steps/s | lft/peer memory |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in report["methods"].items():
        for side in entry["sides"]:
            r = entry.get("ratios", {}) if side["tool"] == "lft" else {}
            fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
            lines.append(
                f"| {method} | {side['tool']} | {side['median_step_s']:.2f} | {side['tokens_per_s']:.0f} | "
                f"{side['peak_rss_mb']:.0f} | {fmt(side['mfu'], '{:.1%}')} | {fmt(side['final_loss'], '{:.4f}')} | "
                f"{fmt(r.get('tokens_per_s'), '{:.2f}x')} | {fmt(r.get('steps_per_s'), '{:.2f}x')} | "
                f"{fmt(r.get('peak_rss'), '{:.2f}x')} |"
            )
    return "\n".join(lines) + "\n"


def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tool in ("lft", "peer"):
        rows = [r for r in sweep if r["tool"] == tool]
        if not rows:
            continue
        lengths = [r["tokens_per_example"] for r in rows]
        left.plot(lengths, [r["tokens_per_s"] for r in rows], marker="o", label=tool)
        right.plot(lengths, [r["peak_rss_mb"] for r in rows], marker="o", label=tool)
    left.set(xlabel="tokens per example", ylabel="tokens/s", title="SFT throughput")
    right.set(xlabel="tokens per example", ylabel="peak RSS (MB)", title="SFT memory")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lft.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sft", choices=[*METHODS, "all"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--tools", default="lft,peer", help="comma-separated: lft, peer")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2, converted)")
    parser.add_argument("--sweep-turns", default="", help="SFT only: e.g. 1,2,4 problems per example")
    parser.add_argument("--out", default="bench-results", help="folder for JSON, Markdown and PNG")
    parser.add_argument(
        "--peer-packing",
        action="store_true",
        help="SFT: the peer packs its rows too (packing=True, padding_free=True), for a side-by-side with data.packing",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="train on this file instead of the embedded task (.jsonl, .json, .parquet, .csv, in the method's format); "
        "python -m lft.bench.conversations writes one with real-shaped lengths",
    )
    parser.add_argument(
        "--lft-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra lft config key (repeatable), e.g. lora.frozen_dtype=float32 to measure an "
        "optimisation switched off",
    )
    args = parser.parse_args(argv)

    from lft.model import loading

    model = args.model or loading.local_folder(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lft-bench-"))
    tools = [t for t in args.tools.split(",") if t]
    methods = list(METHODS) if args.method == "all" else [args.method]
    dtype = "bf16" if args.precision.startswith("bf16") else "fp32"
    print(f"measuring the {dtype} matmul peak ...", flush=True)
    peak = matmul_peak(dtype)
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "lora_r": args.lora_r,
        "data": args.data or "the embedded task",
        "peer_packing": args.peer_packing,
        "steps": args.steps,
        "warmup": args.warmup,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "peak_tflops": peak / 1e12,
        "methods": {},
    }

    overrides = {}
    for item in args.lft_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--lft-set {item}: expected KEY=VALUE")
        overrides[key] = value
    report["lft_overrides"] = overrides

    def settings_for(method: str, data: Path) -> Settings:
        return Settings(
            method=method,
            model=str(model),
            data=str(data),
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            max_length=args.max_length,
            precision=args.precision,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            work=str(work),
            lft_overrides=overrides,
            peer_packing=args.peer_packing,
        )

    for method in methods:
        settings = settings_for(method, Path(args.data).resolve() if args.data else write_data(method, work))
        per_token = flops_per_token(str(model), method)
        sides = []
        for tool in tools:
            if tool == "peer" and method not in PEER_METHODS:
                print(f"  peer: no {method} in trl 1.16; lft alone", flush=True)
                continue
            sides.append(summarise(run_side(tool, settings, work), settings, peak, per_token))
        entry: dict = {"sides": sides}
        by_tool = {s["tool"]: s for s in sides}
        if "lft" in by_tool and "peer" in by_tool:
            entry["ratios"] = ratios(by_tool["lft"], by_tool["peer"])
        report["methods"][method] = entry

    if args.sweep_turns:
        sweep = []
        for turns in [int(t) for t in args.sweep_turns.split(",")]:
            data = write_data("sft", work, turns=turns, rows=400)
            settings = settings_for("sft", data)
            for tool in tools:
                summary = summarise(run_side(tool, settings, work), settings, peak, flops_per_token(str(model), "sft"))
                rows = [json.loads(x) for x in data.read_text().splitlines()]
                summary["tokens_per_example"] = _mean_tokens(str(model), rows)
                summary["turns"] = turns
                sweep.append(summary)
        report["sweep"] = sweep
        plot(sweep, out / "sweep.png")

    (out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table)
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _mean_tokens(model: str, rows: list[dict]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows[:50]]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)


if __name__ == "__main__":
    sys.exit(main())
