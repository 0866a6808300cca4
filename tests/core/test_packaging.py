"""The wheel holds every subpackage and the shipped data; the console script is declared."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = [
    "lft",
    "lft.plugins",
    "lft.adapters",
    "lft.losses",
    "lft.assets",
    "lft.plugins.sft",
    "lft.plugins.lora",
    "lft.plugins.full",
    "lft.plugins.qlora",
    "lft.losses.logprobs",
    "lft.adapters.lora",
    "lft.adapters.quantize",
    "lft.adapters.attach",
    "lft.adapters.merge",
    "lft.cli.main",
    "lft.cli.check",
    "lft.cli.use",
    "lft.use.loaded",
    "lft.plugin.testing",
    "lft.guards",
    "lft.guards.monitor",
    "lft.output.report",
    "lft.plugins.dpo",
    "lft.plugins.orpo",
    "lft.plugins.simpo",
    "lft.plugins.reward",
    "lft.plugins.preference",
    "lft.losses.dpo",
    "lft.adapters.value_head",
    "lft.model.reference",
    "lft.adapters.scorer",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheels = list(out.glob("lft-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_contains_every_folder_and_the_task_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("lft/plugins/", "lft/adapters/", "lft/losses/", "lft/assets/"):
        assert any(n.startswith(folder) and n.endswith(".py") for n in names), folder
    assert sum(n.startswith("lft/assets/arith-") and n.endswith(".jsonl") for n in names) == 6
    assert "lft/assets/general-retain.jsonl" in names and "lft/assets/general-mix.jsonl" in names
    assert any(n.startswith("lft/guards/") and n.endswith(".py") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[lft]" in entry_points and "sft = lft.plugins.sft:SFT" in entry_points
    assert "[console_scripts]" in entry_points and "lft = lft.cli.main:main" in entry_points
    assert "[pytest11]" in entry_points


def test_every_subpackage_imports_from_the_wheel(wheel):
    """Import from the wheel itself (zip import), not from the source tree."""
    code = (
        "import sys, importlib; sys.path.insert(0, sys.argv[1]);"
        f"mods = {SUBPACKAGES!r};"
        "[importlib.import_module(m) for m in mods];"
        "import lft, lft.data.task;"
        "assert lft.__file__.startswith(sys.argv[1]), lft.__file__;"
        "assert lft.data.task.path('sft', 'train').name == 'arith-sft-train.jsonl'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(wheel)], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_lft_drops_bitsandbytes_missing_kernel_warning():
    """peft imports bitsandbytes, whose CPU backend warns about an optional kernel on every run
    (CPUs with AVX512-BF16 only); lft drops that warning."""
    bare = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True)
    if "gemm_4bit_forward" not in bare.stderr:
        pytest.skip("bitsandbytes does not warn on this machine")
    quiet = subprocess.run([sys.executable, "-c", "import lft, peft"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "gemm_4bit_forward" not in quiet.stderr
