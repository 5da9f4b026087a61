"""The benchmarks' own CPU smoke checks (their docstrings' commands), so a library change that breaks a script shows
here; each runs as documented, from the repository root, and must print its table's header.

Left out for their time on 2 CPU cores: generate_throughput.py's `--startup` check (about 26 s: two fresh processes
that each compile) and smollm2_precision.py's (about 6 minutes, 98 s for --goals int8 alone; it needs the GGUF and
tokenized data).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# (script and its documented smoke flags, a column of the table it prints, whether it reads ../shared/data)
SMOKE = {
    "train_throughput": (["--preset", "tiny", "--adapter-layers", "4", "--methods", "adapter", "lora", "--steps", "1",
                          "--warmup", "1", "--global-batch", "16", "--samples", "4"], "real tok/s", False),
    "int8_projections": (["--preset", "tiny", "--device", "cpu", "--repeat", "5"], "% of copy", False),
    # two fresh processes, then the summary, whose int8 row gives its ratio to bf16 as "median x [min x, max x]"
    # (uncompiled: a compile would take minutes)
    "generate_throughput": (["--preset", "tiny-gqa", "--adapter-layers", "2", "--device", "cpu", "--batch", "1",
                             "--rows", "graph", "--new-tokens", "4", "--quantize", "int8", "--processes", "2",
                             "--repeats", "1", "--fresh-caches"],
                            "x [", False),
    "prompt_attention": (["--preset", "tiny", "--device", "cpu", "--tokens", "256", "--rows", "2", "--repeat", "5"],
                         "fwd+bwd us", False),
    # ScienceQA questions and the LLaMA tokenizer from ../shared/data (its defaults, beside the checkout)
    "evaluate_throughput": (["--preset", "SmolLM2-135M", "--adapter-layers", "2", "--limit", "4", "--batch-size",
                             "2", "--max-new-tokens", "4"], "questions/s", True),
}


@pytest.mark.parametrize("script", SMOKE)
def test_benchmark_smoke_check_runs(script, request):
    args, header, reads_shared = SMOKE[script]
    if reads_shared:  # the fixture skips where ../shared/data is absent
        shared = request.getfixturevalue("shared_data")
        # the script's default is the folder beside its own checkout; name the one the tests use
        args = [*args, "--questions", str(shared / "scienceqa" / "test_4241_llava_cqm.json"),
                "--tokenizer", str(shared / "tokenizers" / "llama_sentencepiece_32k.model")]
    # the library this test imports (a checkout's src, not another installed copy); the script's folder comes
    # first on its own path, as `python benchmarks/<script>.py` puts it, for its sibling modules
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert header in proc.stdout, proc.stdout[-2000:]
