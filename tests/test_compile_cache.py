"""--compile-cache: what one process compiled, another with empty local caches (a job on another node) reuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_cli import run_cli

# One job: a tiny adapted model's decode step compiled under compile_cache (argv: the shared folder, the device,
# and "int8" for int8 weights, bf16 on a GPU); prints inductor's and AOTAutograd's cache counters, and the files
# the job added to its cache folder (what it compiled: generated code, kernel libraries). Each run gets an empty
# TORCHINDUCTOR_CACHE_DIR of its own, as a fresh node would have. test_cuda.py runs it on a GPU.
JOB = """
import json, os, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.compile_cache import compile_cache, listing
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.generate import generate
from llama_adapter.quantize import quantize_int8

shared, device, weights = sys.argv[1:]
torch.manual_seed(0)
with torch.device(device):
    model = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), AdapterArgs(adapter_len=4, adapter_layers=3,
                               gate_init="random"))
model = model.cast_base(torch.bfloat16) if device == "cuda" else model
model = model.eval().requires_grad_(False).fuse_projections()
if weights == "int8":
    quantize_int8(model)
with compile_cache(shared, {"command": "decode", "test": 1, "weights": weights}) as blob:
    local = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    before = listing(local)
    tokens = generate(model, [[1, 5, 9], [1, 42]], max_new_tokens=6, eos_id=-1, compile=True)
    added = sorted(name for name, _ in listing(local) - before)
print(json.dumps({"tokens": tokens, "blob": str(blob), "added": added, "inductor": dict(counters["inductor"]),
                  "aot": dict(counters["aot_autograd"])}))
"""


def job(shared: Path, local: Path, device: str = "cpu", weights: str = "model's") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(local)}
    proc = subprocess.run([sys.executable, "-c", JOB, str(shared), device, weights], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_job_on_a_fresh_node_reuses_what_the_first_compiled(tmp_path):
    shared = tmp_path / "shared cache"
    first = job(shared, tmp_path / "node1")
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1 and not first["inductor"].get("fxgraph_cache_hit")
    blob = Path(first["blob"])
    assert blob.parent == shared and blob.is_file() and [p.name for p in shared.iterdir()] == [blob.name]
    assert any(name.endswith(".so") for name in first["added"])  # a kernel library the C++ compiler built
    written = blob.read_bytes()
    second = job(shared, tmp_path / "node2")
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot"].get("autograd_cache_hit", 0) >= 1
    # nothing compiled again: no code generated, no kernel built (the mega-cache's carried code was rebuilt here)
    assert second["added"] == []
    assert second["tokens"] == first["tokens"] and second["blob"] == first["blob"]
    assert blob.read_bytes() == written  # the second job added nothing, so wrote nothing


def test_compile_cache_without_compile_is_refused(tmp_path):
    proc = run_cli("generate", "--base", str(tmp_path / "base"), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                   str(tmp_path / "o.jsonl"), "--compile-cache", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--compile-cache" in proc.stderr and "without --compile" in proc.stderr
    (tmp_path / "d").mkdir()
    proc = run_cli("evaluate", "--base", str(tmp_path / "base"), "--task", "alpaca", "--data", str(tmp_path / "d"),
                   "--out", str(tmp_path / "o"), "--compile")
    assert proc.returncode == 2
    assert "--compile compiles the decode step, which --task alpaca does not run" in proc.stderr


def test_generate_keeps_its_compiled_step_in_the_given_folder(tmp_path, llama_sp_model):
    """The option flows from the command line: generate --compile --compile-cache writes the decode step's blob."""
    import torch

    from llama_adapter.adapter import AdaptedTransformer
    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.config import ModelArgs

    torch.manual_seed(0)
    save_meta_checkpoint(AdaptedTransformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, hidden_dim=64)),
                         tmp_path / "base")
    (tmp_path / "p.jsonl").write_text('{"instruction": "Name a colour."}\n{"instruction": "Count to three."}\n')
    proc = run_cli("generate", "--base", str(tmp_path / "base"), "--tokenizer", str(llama_sp_model), "--prompts",
                   str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4",
                   "--compile", "--compile-cache", str(tmp_path / "cache"),
                   env_extra={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "local")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["decode"]


def test_concurrent_writers_leave_one_whole_blob(tmp_path):
    """Jobs of one kind may write the same blob at once: each writes a file of its own and renames it into place,
    so a reader meanwhile finds one writer's whole blob, never a cut or a mix, and nothing else is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from llama_adapter.compile_cache import write_blob

    path = tmp_path / "decode-0123.bin"
    blobs = [bytes([i]) * 3_000_000 for i in range(4)]

    def writer(blob: bytes) -> None:
        for _ in range(15):
            write_blob(path, blob)

    reads = []
    with ThreadPoolExecutor(len(blobs)) as pool:
        writers = [pool.submit(writer, b) for b in blobs]
        while not all(w.done() for w in writers):
            if path.exists():
                reads.append(path.read_bytes())
        [w.result() for w in writers]
    assert reads and all(r in blobs for r in reads)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cache_file_that_cannot_be_read_or_would_write_outside_costs_a_cold_compile(tmp_path, capsys):
    """An unreadable file (cut, or another format) and a tar whose members leave the job's folder are each one
    line on stderr: nothing is written outside the folder, and the job compiles from scratch."""
    import io
    import tarfile

    from llama_adapter.compile_cache import unpack

    garbage = tmp_path / "decode-garbage.tar"
    garbage.write_bytes(b"not a tar")
    escaping = tmp_path / "decode-escaping.tar"
    with tarfile.open(escaping, "w:gz") as tar:
        for name in ("fxgraph/ok.py", "../outside.py", "/tmp/absolute.py"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    for path in (garbage, escaping):
        folder = tmp_path / f"job-{path.stem}"
        folder.mkdir()
        unpack(path, folder)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "compiling from scratch" in err
        assert list(folder.iterdir()) == []  # what was extracted before the refusal is gone too
    assert not (tmp_path / "outside.py").exists() and not Path("/tmp/absolute.py").exists()
