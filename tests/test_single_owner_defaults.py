"""One owner per default: a setting's default is written once, in its dataclass (config.py), and every other
place that needs it (a library function's keyword default, an option of a benchmark) reads it from there. Read
from the source, so that a second literal fails here before it can drift from the first."""

import ast
import dataclasses
from inspect import signature
from pathlib import Path

import llama_adapter.config as config

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every field name of the config dataclasses: a parameter or option of such a name is that setting, unless listed
# below as another thing of the same name.
SETTINGS = {f.name for o in vars(config).values() if dataclasses.is_dataclass(o) and isinstance(o, type)
            for f in dataclasses.fields(o)}
# (file, function or option, name): a literal default of a setting's name that is not that setting.
NOT_THE_SETTING = {
    ("src/llama_adapter/batching.py", "heldout_loss", "rank"): "a process's rank, not LoRAArgs.rank",
    ("src/llama_adapter/checkpoint.py", "load_base", "device"): "the loader's own; commands pick theirs first",
    ("src/llama_adapter/checkpoint.py", "load_model", "device"): "the loader's own; commands pick theirs first",
    ("src/llama_adapter/tokenizer.py", "encode", "bos"): "raw encoding, not complete's PromptFormat.bos",
    # the benchmarks' own subjects: a preset to time, a GPU, timed steps, a decoded batch of their own
    **{(f"benchmarks/{script}.py", "add_argument", "preset"): "the preset timed, not the demo base's pre-training"
       for script in ("evaluate_throughput", "generate_throughput", "int8_projections", "prompt_attention",
                      "train_throughput")},
    **{(f"benchmarks/{script}.py", "add_argument", "device"): "a GPU benchmark's device"
       for script in ("generate_throughput", "int8_projections")},
    ("benchmarks/train_throughput.py", "add_argument", "steps"): "timed steps, not PretrainConfig.steps",
    ("benchmarks/smollm2_precision.py", "add_argument", "batch_size"): "its decoded batch, its own",
}


def literal_defaults(path: Path):
    """(function or "add_argument", name, literal) of each default written as a literal (None apart: "not given")
    for a parameter or an argparse option named after a setting."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults),
                     *((k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)]
            for arg, default in pairs:
                if isinstance(default, ast.Constant) and default.value is not None and arg.arg in SETTINGS:
                    yield node.name, arg.arg, default.value
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
              and isinstance(node.args[0], ast.Constant)):
            name = str(node.args[0].value).lstrip("-").replace("-", "_")
            for kw in node.keywords:
                if (kw.arg == "default" and name in SETTINGS and isinstance(kw.value, ast.Constant)
                        and kw.value.value is not None):
                    yield "add_argument", name, kw.value.value


def test_no_setting_default_is_written_twice():
    """No library function or benchmark option writes a setting's default as a literal of its own (generate's
    temperature 0.0 and top_p 1.0 beside Sampling's, a benchmark's --adapter-len 10 beside AdapterArgs')."""
    files = [*sorted((REPO_ROOT / "src" / "llama_adapter").rglob("*.py")),
             *sorted((REPO_ROOT / "benchmarks").glob("*.py"))]
    found = [(str(p.relative_to(REPO_ROOT)), where, name, value) for p in files
             for where, name, value in literal_defaults(p)]
    second = [f for f in found if f[:3] not in NOT_THE_SETTING]
    assert second == [], "a setting's default written again; read it from its dataclass instead"
    stale = set(NOT_THE_SETTING) - {f[:3] for f in found}
    assert not stale, f"NOT_THE_SETTING lists what no longer is: {sorted(stale)}"


def test_library_defaults_are_the_dataclasses():
    """The keyword defaults of what the commands call are the dataclasses' values themselves."""
    from llama_adapter.cli import load_for_inference
    from llama_adapter.config import CompileConfig, Sampling, TrainConfig
    from llama_adapter.evaluate import ANSWER_TOKENS, answer_by_generation
    from llama_adapter.generate import generate

    params = signature(generate).parameters
    assert params["temperature"].default == Sampling.temperature
    assert params["top_p"].default == Sampling.top_p
    assert params["pad_id"].default == TrainConfig.pad_id
    assert signature(load_for_inference).parameters["compile"].default == CompileConfig.compile
    assert signature(answer_by_generation).parameters["max_new_tokens"].default == ANSWER_TOKENS
