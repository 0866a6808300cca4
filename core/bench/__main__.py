"""Side-by-side benchmark of lft and the most-used peer (trl 1.16) on the same work.

    python -m lft.bench --method sft|dpo|orpo|simpo|grpo|ppo|all [--steps N] [--tools lft,peer]

Both tools get the same model (the embedded SmolLM2-135M-Instruct, converted once to a local
transformers folder that both load), the same data (the shipped task data, conversational), the
same LoRA adapters, batch, max length, precision, optimizer, learning rate and steps. Each runs in
its own process, one after the other. The report gives, per method: median seconds per step after
warm-up, non-pad tokens per second, peak RSS, model FLOP utilisation against this machine's
measured matmul peak, the final loss, and each lft side's ratios to the peer at its defaults and
at its best. ``--sides lft,lft-packed,peer,peer-packed`` runs each tool at its defaults and
packed (sft: packing; dpo: padding-free); ``lft-vllm`` and ``peer-vllm`` sample the online
methods' rollouts with a colocated vLLM engine (lft's ``--plugin vllm``, the peer's
``use_vllm``), and the report splits those steps into generation and the rest, with the rollout's
generated tokens per second. ``--sweep-length 256,512,1024,2048,4096`` also trains
SFT on rows of each length and plots throughput and memory against sequence length.
Install the peer with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lft.bench.common import (
    FORMS,
    METHODS,
    PEER_METHODS,
    PEER_PACKED,
    SIDES,
    VLLM_METHODS,
    Settings,
    flops_per_token,
    matmul_peak,
    write_data,
)


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
        **rollout_summary(steps),
    }


def rollout_summary(steps: list[dict]) -> dict:
    """Online methods: generated tokens per second of generation, and the step split into
    generation and the rest (scoring, rewards, the update)."""
    timed = [s for s in steps if s.get("generation_s")]
    if not timed:
        return {}
    generation = sum(s["generation_s"] for s in timed)
    return {
        "rollout_tokens_per_s": sum(s["generated_tokens"] for s in timed) / generation,
        "generation_s_per_step": statistics.median(s["generation_s"] for s in timed),
        "rest_s_per_step": statistics.median(s["time"] - s["generation_s"] for s in timed),
    }


def run_side(tool: str, settings: Settings, work: Path) -> dict:
    settings_path = work / f"{tool}-{settings.method}-settings.json"
    out = work / f"{tool}-{settings.method}-result.json"
    settings.save(settings_path)
    command = [sys.executable, "-m", "lft.bench.workers", tool, str(settings_path), str(out)]
    print(f"  {tool}: {settings.method}, {settings.steps} steps ...", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SideFailed(f"{tool} {settings.method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


class SideFailed(Exception):
    """One side of the benchmark failed; the report keeps its error and the other sides go on."""


def ratios(lft: dict, peer: dict) -> dict:
    def ratio(key: str) -> float | None:
        a, b = lft.get(key), peer.get(key)
        return a / b if a and b else None

    return {
        "tokens_per_s": ratio("tokens_per_s"),
        "steps_per_s": ratio("steps_per_s"),
        "peak_rss": ratio("peak_rss_mb"),
    }


def compare(sides: list[dict]) -> dict:
    """Every lft side against the peer at its defaults and at its best (its fastest side)."""
    peers = [s for s in sides if s["tool"].startswith("peer")]
    out: dict = {}
    if not peers:
        return out
    default = next((s for s in peers if s["tool"] == "peer"), None)
    best = max(peers, key=lambda s: s["tokens_per_s"])
    out["peer_best"] = best["tool"]
    for side in sides:
        if side["tool"].startswith("lft"):
            out[side["tool"]] = {
                "vs_peer": ratios(side, default) if default else None,
                "vs_peer_best": ratios(side, best),
            }
    return out


SIDE_SETTINGS = {
    "lft": "defaults",
    "lft-packed": "data.packing=true (sft) / data.padding_free=true",
    "lft-packed-checkpointed": "the same with trainer.gradient_checkpointing=true",
    "peer": "defaults (packing=False, padding_free=False)",
    "peer-packed": "packing=True, padding_free=True (sft) / padding_free=True (dpo)",
    "lft-vllm": "--plugin vllm (a colocated vLLM engine samples the rollouts)",
    "peer-vllm": "use_vllm=True, vllm_mode=colocate",
}


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; precision {report['precision']}; batch {report['batch_size']} "
        f"(packed sft: {report.get('packed_batch_size', report['batch_size'])} row(s) of up to the max length); "
        f"max length {report.get('max_length')}; "
        f"LoRA r={report['lora_r']} on {', '.join(report['targets'])}; {report['steps']} steps "
        f"({report['warmup']} warm-up); data {report.get('data', 'the embedded task')}; "
        f"matmul peak {report['peak_tflops']:.2f} TFLOP/s"
        + (
            f"; lft with {', '.join(f'{k}={v}' for k, v in report['lft_overrides'].items())}"
            if report.get("lft_overrides")
            else ""
        )
        + ".",
        "",
        "Sides: " + "; ".join(f"`{k}` {v}" for k, v in SIDE_SETTINGS.items() if k in report.get("sides", [])) + ".",
        "",
        "| method | side | s/step | tokens/s | peak RSS (MB) | MFU | final loss | tokens/s vs peer | steps/s vs peer "
        "| memory vs peer | tokens/s vs peer's best | memory vs peer's best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
    for method, entry in report["methods"].items():
        comparison = entry.get("ratios", {})
        for side in entry["sides"]:
            r = comparison.get(side["tool"]) or {}
            default, best = r.get("vs_peer") or {}, r.get("vs_peer_best") or {}
            best_name = f" ({comparison['peer_best']})" if best else ""
            lines.append(
                f"| {method} | {side['tool']} | {side['median_step_s']:.2f} | {side['tokens_per_s']:.0f} | "
                f"{side['peak_rss_mb']:.0f} | {fmt(side['mfu'], '{:.1%}')} | {fmt(side['final_loss'], '{:.4f}')} | "
                f"{fmt(default.get('tokens_per_s'), '{:.2f}x')} | {fmt(default.get('steps_per_s'), '{:.2f}x')} | "
                f"{fmt(default.get('peak_rss'), '{:.2f}x')} | "
                f"{fmt(best.get('tokens_per_s'), '{:.2f}x')}{best_name} | {fmt(best.get('peak_rss'), '{:.2f}x')} |"
            )
    online = [
        (method, side)
        for method, entry in report["methods"].items()
        for side in entry["sides"]
        if "rollout_tokens_per_s" in side
    ]
    if online:
        lines += [
            "",
            f"Online methods ({report.get('batch_size')} completions a step, "
            f"{report.get('num_generations')} per prompt, up to {report.get('max_new_tokens')} new tokens), the step "
            "split (generation: sampling the completions; the rest: scoring, rewards, the update):",
            "",
            "| method | side | steps/s | rollout tokens/s | generation s/step | rest s/step |",
            "|---|---|---|---|---|---|",
        ]
        for method, side in online:
            lines.append(
                f"| {method} | {side['tool']} | {side['steps_per_s']:.3f} | {side['rollout_tokens_per_s']:.0f} | "
                f"{side['generation_s_per_step']:.2f} | {side['rest_s_per_step']:.2f} |"
            )
    for error in report.get("errors", []):
        first = error["error"].strip().splitlines()[-1] if error["error"].strip() else "failed"
        lines.append(f"\nFailed: {error['case']}, {error['side']}: {first}")
    if report.get("sweep"):
        lines += ["", "Length sweep (sft, batch 1, rows of one length):", ""]
        lines += ["| tokens per row | side | tokens/s | peak RSS (MB) |", "|---|---|---|---|"]
        for row in report["sweep"]:
            lines.append(f"| {row['length']} | {row['tool']} | {row['tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} |")
        for tool, fit in report.get("memory_slope", {}).items():
            lines.append(
                f"\n{tool}: peak RSS grows {fit['mb_per_1k_tokens']:.0f} MB per 1,000 tokens (least squares); a "
                f"quadratic term explains {fit['quadratic_share']:.0%} of the growth at the longest rows "
                "(0% is linear growth)."
            )
    return "\n".join(lines) + "\n"


def memory_slope(sweep: list[dict]) -> dict:
    """Per tool: the least-squares slope of peak RSS against tokens per row, and the share of the
    growth at the longest length that a quadratic term explains (``y = a + b x + c x^2`` fitted by
    least squares: ``c x^2 / (y - a)`` at the longest ``x``; about 0 when memory is linear, about 1
    when the attention matrices dominate)."""
    import numpy as np

    out = {}
    for tool in sorted({r["tool"] for r in sweep}):
        rows = sorted((r for r in sweep if r["tool"] == tool), key=lambda r: r["length"])
        if len(rows) < 3:
            continue
        xs = np.array([r["length"] for r in rows], dtype=float)
        ys = np.array([r["peak_rss_mb"] for r in rows], dtype=float)
        slope = np.polyfit(xs, ys, 1)[0]
        c, b, a = np.polyfit(xs, ys, 2)
        grown = c * xs[-1] ** 2 + b * xs[-1]
        out[tool] = {
            "mb_per_1k_tokens": float(slope * 1000),
            "quadratic_share": float(c * xs[-1] ** 2 / grown) if grown > 0 else float("nan"),
        }
    return out


def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tool in sorted({r["tool"] for r in sweep}):
        rows = sorted((r for r in sweep if r["tool"] == tool), key=lambda r: r["length"])
        lengths = [r["length"] for r in rows]
        left.plot(lengths, [r["tokens_per_s"] for r in rows], marker="o", label=tool)
        right.plot(lengths, [r["peak_rss_mb"] for r in rows], marker="o", label=tool)
    left.set(xlabel="tokens per row", ylabel="tokens/s", title="SFT throughput", xscale="log")
    right.set(xlabel="tokens per row", ylabel="peak RSS (MB)", title="SFT memory", xscale="log")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lft.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sft", help=f"comma-separated, of {', '.join(METHODS)}; or all")
    parser.add_argument(
        "--real-shaped",
        action="store_true",
        help="also train sft and the preference methods on generated data of real-shaped lengths "
        "(lft.bench.conversations: multi-turn chats, 54 to 2,272 tokens) at --real-max-length",
    )
    parser.add_argument("--real-max-length", type=int, default=2048)
    parser.add_argument("--real-steps", type=int, default=0, help="steps on the real-shaped data (default --steps)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--num-generations", type=int, default=4, help="online methods: completions per prompt (grpo's group)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="online methods: longest completion")
    parser.add_argument(
        "--packed-batch-size", type=int, default=1, help="rows per step of the packed sft sides (default 1)"
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--sides",
        "--tools",
        dest="sides",
        default="lft,peer",
        help=f"comma-separated, of {', '.join(SIDES)}: each tool at its defaults and packed",
    )
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2, converted)")
    parser.add_argument(
        "--sweep-length",
        default="",
        metavar="N,N,...",
        help="also train sft on rows of each length (e.g. 256,512,1024,2048,4096), batch 1, lft and peer "
        "at their defaults, and plot tokens/s and peak memory against length",
    )
    parser.add_argument("--sweep-steps", type=int, default=4, help="steps per length of the sweep (1 warm-up)")
    parser.add_argument("--out", default="bench-results", help="folder for JSON, Markdown and PNG")
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
    sides = [t for t in args.sides.split(",") if t]
    unknown = [t for t in sides if t not in SIDES]
    if unknown:
        raise SystemExit(f"--sides {','.join(unknown)}: expected some of {', '.join(SIDES)}")

    import torch

    from lft.model import loading

    model = args.model or loading.local_folder(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lft-bench-"))
    methods = list(METHODS) if args.method == "all" else [m for m in args.method.split(",") if m]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"--method {args.method}: expected some of {', '.join(METHODS)}, or all")
    dtype = "bf16" if args.precision.startswith("bf16") else "fp32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"measuring the {dtype} matmul peak ({device}) ...", flush=True)
    peak = matmul_peak(dtype, device=device)
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores"
        + (f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "packed_batch_size": args.packed_batch_size,
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
        "max_length": args.max_length,
        "lora_r": args.lora_r,
        "data": args.data or "the embedded task",
        "sides": sides,
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

    def settings_for(method: str, data: Path, side: str, **changes: Any) -> Settings:
        packed = "-packed" in side
        lft_overrides = dict(overrides)
        if side.endswith("-checkpointed"):
            lft_overrides["trainer.gradient_checkpointing"] = "true"
        settings = Settings(
            method=method,
            model=str(model),
            data=str(data),
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.packed_batch_size if packed and method == "sft" else args.batch_size,
            max_length=args.max_length,
            precision=args.precision,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            work=str(work),
            lft_overrides=lft_overrides,
            packed=packed,
            vllm=side.endswith("-vllm"),
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
        )
        for key, value in changes.items():
            setattr(settings, key, value)
        return settings

    cases: list[tuple[str, str, Path, dict]] = []  # (report key, method, data file, changes to the settings)
    for method in methods:
        data = Path(args.data).resolve() if args.data else write_data(method, work)
        cases.append((method, method, data, {}))
    for method in [m for m in methods if args.real_shaped and FORMS[m] in ("sft", "pref")]:
        from lft.bench.conversations import write

        pairs = FORMS[method] == "pref"
        data = write(work / ("real-pairs.jsonl" if pairs else "real-conversations.jsonl"), pairs=pairs)
        steps = args.real_steps or args.steps
        changes = {"max_length": args.real_max_length, "steps": steps, "warmup": min(args.warmup, steps - 1)}
        cases.append((f"{method} (real-shaped)", method, data, changes))
    for key, method, data, changes in cases:
        per_token = flops_per_token(str(model), method)
        results = []
        for side in sides:
            tool, packed, on_vllm = side.split("-")[0], "-packed" in side, side.endswith("-vllm")
            if tool == "peer" and (method not in PEER_METHODS or (packed and method not in PEER_PACKED)):
                print(f"  {side}: trl 1.16 has no such {method} here; skipped", flush=True)
                continue
            if on_vllm and method not in VLLM_METHODS[tool]:
                print(f"  {side}: no vLLM rollouts for {method}; skipped", flush=True)
                continue
            if on_vllm and importlib.util.find_spec("vllm") is None:
                print(f"  {side}: vLLM is not installed here (pip install -e '.[vllm]'); skipped", flush=True)
                continue
            settings = settings_for(method, data, side, **changes)
            try:
                summary = summarise(run_side(tool, settings, work), settings, peak, per_token)
            except SideFailed as exc:
                print(exc, flush=True)
                report.setdefault("errors", []).append({"case": key, "side": side, "error": str(exc)[-1500:]})
                continue
            summary["tool"] = side
            results.append(summary)
        report["methods"][key] = {"sides": results, "ratios": compare(results), "max_length": settings.max_length}
        (out / "bench.json").write_text(json.dumps(report, indent=2))  # what is measured so far survives a crash

    if args.sweep_length:
        from transformers import AutoTokenizer

        from lft.bench.conversations import sized

        tokenizer = AutoTokenizer.from_pretrained(str(model))
        sweep = []
        for length in [int(n) for n in args.sweep_length.split(",")]:
            data = sized(work / f"sized-{length}.jsonl", tokenizer, length, rows=4 * args.sweep_steps)
            for tool in [t for t in ("lft", "peer") if any(s.startswith(t) for s in sides)]:
                settings = settings_for(
                    "sft", data, tool, steps=args.sweep_steps, warmup=1, batch_size=1, max_length=length + 64
                )
                try:
                    result = run_side(tool, settings, work)
                except SideFailed as exc:  # e.g. out of memory at the longest rows
                    print(exc, flush=True)
                    report.setdefault("errors", []).append({"case": f"sweep {length}", "side": tool, "error": str(exc)})
                    continue
                summary = summarise(result, settings, peak, flops_per_token(str(model), "sft"))
                summary["length"] = length
                sweep.append(summary)
        report["sweep"] = sweep
        report["memory_slope"] = memory_slope(sweep)
        try:
            plot(sweep, out / "sweep.png")
        except ImportError:
            report["plot"] = "no plot: matplotlib is not installed (pip install -e '.[bench]')"
            print(report["plot"], flush=True)

    (out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table)
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
