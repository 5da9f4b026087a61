"""The Snakemake layer: the DAG resolves from config.yaml, and a bad config key is refused by the schema."""

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from dag import DEMO_RESULTS, REPO, SNAKEMAKE, demo_configfiles, read_csv, snakemake

from llama_adapter.checkpoint import hf_config
from llama_adapter.config import ModelArgs
from llama_adapter.report import mcnemar_p


@pytest.fixture(autouse=True)
def needs_snakemake():
    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")


def test_demo_dag_resolves(tmp_path):
    proc = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rule in ("demo_data", "train_tokenizer", "pretrain_base", "fetch", "validate", "tokenize", "train_adapter",
                 "evaluate", "generate"):
        assert rule in proc.stdout, rule
    # the ablation grid: the center plus one-axis variations, one folder level per parameter
    for point in ("adapter_layers~1/gate_init~zero/epochs~3", "adapter_layers~3/gate_init~random/epochs~3"):
        assert f"results/adapters/ablations/{point}/method~adapter/metrics.json" in proc.stdout
    # the method axis reuses the named baselines' trainings and scores them on the ablation split
    for method in ("lora", "full", "zero-shot"):
        point = f"ablations/adapter_layers~3/gate_init~zero/epochs~3/method~{method}"
        assert f"results/eval/{point}/scores.json" in proc.stdout and f"results/adapters/{point}/" not in proc.stdout
    # every method of the demo: zero-shot is evaluated, never trained
    for name in ("scienceqa_lora", "scienceqa_full", "instruction_lora", "instruction_full"):
        assert f"results/adapters/{name}/metrics.json" in proc.stdout, name
    assert "results/eval/scienceqa_zero_shot/scores.json" in proc.stdout
    assert "results/adapters/scienceqa_zero_shot" not in proc.stdout


def plan(tmp_path, edit, refused: bool = False) -> str:
    """The dry run's -p output of config.yaml with `edit` applied: a plan, or (refused) its refusal."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(config)
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "-p", "--cores", "1", "--configfile", str(tmp_path / "edited.yaml"), cwd=tmp_path)
    assert (proc.returncode != 0) == refused, (proc.stdout + proc.stderr)[-2000:]
    return proc.stdout + proc.stderr


def test_a_dry_run_past_its_timeout_is_stopped_and_the_next_runs(tmp_path):
    """dag.snakemake's dry runs run in forks of one snakemake process (tests/snakemake_forks.py): one that outlives
    its timeout is killed and raises as subprocess.run's would, and the next dry run is served as before."""
    with pytest.raises(subprocess.TimeoutExpired):
        snakemake("-n", "--cores", "1", cwd=tmp_path, timeout=0.01)
    proc = snakemake("-n", "--cores", "1", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "Job stats" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("experiment", ['"2024"', "2024"])
def test_nested_command_line_config_reads_as_a_config_file_does(tmp_path, experiment):
    """Snakemake reads `--config KEY=VALUE` with YAML's base loader: every scalar inside a mapping or list came as a
    string, and the schema refused `train={epochs: 2}` ('2' is not of type 'integer'). Each value is read as in a
    config file: numbers, null (which drops an experiment), a list's items (the axis's other values and the other
    axes kept), and a quoted number stays a string (the MLflow experiment's name), an unquoted one does not."""
    proc = snakemake("-n", "-p", "--cores", "1", "--configfile", str(REPO / "config.yaml"), "--config",
                     "train={epochs: 2, lr: 0.1}", "experiments={instruction_full: null}",
                     "ablations={vary: {epochs: [2, 4]}}", f"mlflow={{experiment: {experiment}}}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    if experiment == "2024":
        assert proc.returncode != 0 and "2024 is not of type 'string'" in out, out[-3000:]
        return
    assert proc.returncode == 0, out[-3000:]
    trains = [line for line in out.splitlines() if "llama-adapter train " in line]
    assert trains and all(" --epochs " in t and " --lr " in t for t in trains), out[-3000:]
    assert any(" --epochs 2 " in t and " --lr 0.1 " in t for t in trains), out[-3000:]
    assert "epochs~4/method~adapter" in out and "results/adapters/instruction_full/" not in out, out[-3000:]
    assert "ablations/adapter_layers~2/gate_init~zero/epochs~3/method~adapter" in out, out[-3000:]


@pytest.mark.parametrize("text, refusal", [
    ("null", "None is not of type 'string'"),  # not a folder named "null"
    ("yes", "True is not of type 'string'"),  # YAML 1.1, as in a file: quote it for a folder of that name
    ('"yes"', None), ("1e-4", None),  # (YAML 1.1: a string, as in a file; Snakemake read a number)
])
def test_a_top_level_command_line_value_reads_as_a_config_file_does(tmp_path, text, refusal):
    """A top-level `--config KEY=VALUE` scalar was Snakemake's own reading (an int, a float, True or False, else the
    text): `results=null` planned every output under a folder named "null". It is read as a config file reads it,
    so the schema refuses what a file's `results: null` would, and a quoted text or a YAML 1.1 string is a folder."""
    proc = snakemake("-n", "-p", "--cores", "1", "--configfile", str(REPO / "config.yaml"), "--config",
                     f"results={text}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    if refusal:
        assert proc.returncode != 0 and refusal in out and "On instance['results']" in out, out[-3000:]
        return
    assert proc.returncode == 0, out[-3000:]
    folder = yaml.safe_load(text)
    assert f"output: {folder}/adapters/instruction/metrics.json" in out, out[-3000:]


@pytest.mark.parametrize("keys", [
    ("results",), ("base", "source"), ("images", "encoder"), ("generate", "instructions"),
    ("data", "alpaca", "source"), ("evaluate", "split"), ("data", "alpaca", "revision"),
])
def test_an_empty_path_or_name_is_refused_by_the_schema(tmp_path, keys):
    """An empty string where a folder, file, source or split is named: `results: ""` planned every output at the
    root of the file system (/models/demo-base, /adapters/...), an empty encoder a Missing input of an empty path,
    an empty instructions file the working folder, an empty source a fetch of '', an empty revision the hub
    dataset's default branch (the fetch rule left it out); the schema refuses it, by key."""
    def edit(config):
        section = config
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = ""

    refusal = plan(tmp_path, edit, refused=True)
    instance = "".join(f"['{k}']" for k in keys)
    assert "'' should be non-empty" in refusal and f"On instance{instance}" in refusal, refusal[-2000:]


def test_the_feature_cache_stays_in_features_whatever_the_encoder_path_ends_in(tmp_path):
    """The cache is named after the encoder's folder: an encoder given as `CLIP/sub/..` named it `..`, and the
    cache went to results/features/../scienceqa, out of features/. The folder is named as the path resolves."""
    (tmp_path / "clip" / "sub").mkdir(parents=True)
    out = plan(tmp_path, lambda c: c["images"].update(encoder=f"{tmp_path / 'clip' / 'sub'}/.."))
    assert "output: results/features/clip/scienceqa\n" in out, out[-3000:]
    assert "features/../" not in out, out[-3000:]


@pytest.mark.parametrize(("edit", "instance"), [
    (lambda c: c["experiments"].update({"x\n": {"dataset": "alpaca"}}), "['experiments']"),
    (lambda c: c["data"]["alpaca"].update(sha256="0" * 64 + "\n"), "['data']['alpaca']['sha256']"),
])
def test_a_trailing_newline_does_not_pass_a_pattern(tmp_path, edit, instance):
    """The schema's patterns ended in `$`, which (Python's re, as jsonschema reads them) also matches before a last
    newline: an experiment named "x\\n" passed and the plan stopped at 'Missing input files for rule report' (a
    folder name with a newline), a sha256 pin with one failed its fetch after the plan (no digest matches it)."""
    refusal = plan(tmp_path, edit, refused=True)
    assert "does not match" in refusal and f"On instance{instance}" in refusal, refusal[-2000:]


def test_a_missing_instructions_file_is_named_by_its_key(tmp_path):
    """generate.instructions is a file the config gives as an input, as the base and the encoder: missing, the plan
    stopped at 'Missing input files for rule generate', naming a file rather than the config value to edit."""
    out = plan(tmp_path, lambda c: c["generate"].update(instructions="nope/instructions.jsonl"), refused=True)
    assert "config generate.instructions" in out and "nope/instructions.jsonl" in out, out[-2000:]
    assert "Missing input files" not in out, out[-2000:]


def test_command_line_entries_merge_in_their_order(tmp_path):
    """`--config` entries merge as Snakemake merges them: a key given twice is its last value, even where that text
    is not YAML (Snakemake's reading of it; the first, read as YAML, was kept over it), and a mapping given twice
    merges key by key (the first one's epochs was left Snakemake's string '2', which the schema refused)."""
    proc = snakemake("-n", "-p", "--cores", "1", "--configfile", str(REPO / "config.yaml"), "--config",
                     "results=first", "results=@last", "train={epochs: 2}", "train={seed: 3}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "output: @last/adapters/instruction/metrics.json" in out and "first/" not in out, out[-3000:]
    trains = [line for line in out.splitlines() if "llama-adapter train " in line]
    assert any(" --epochs 2 " in t and " --seed 3 " in t for t in trains), out[-3000:]


def test_bad_config_key_is_named(tmp_path):
    assert "gate_innit" in plan(tmp_path, lambda c: c["train"].update(gate_innit="zero"), refused=True)


def test_an_experiment_name_yaml_reads_as_a_number_is_refused_by_the_schema(tmp_path):
    """An unquoted experiment name such as 2024 is the number 2024 to YAML, which the name's pattern (a rule for
    strings) let pass: the plan stopped with a TypeError from sorting the config's keys to hash it. The schema
    refuses it, naming the section and what was expected (quoted, "2024" is a name)."""
    refusal = plan(tmp_path, lambda c: c["experiments"].update({2024: {"dataset": "alpaca"}}), refused=True)
    assert "2024 is not of type 'string'" in refusal and "On instance['experiments']" in refusal, refusal[-2000:]
    assert "TypeError" not in refusal, refusal[-2000:]


def test_a_bad_key_in_a_methods_settings_is_named(tmp_path):
    """ablations.methods.<m> is null or a method's settings: a misspelt key there was refused as "{'lr': 0.03,
    'lrr': 0.1} is not valid under any of the given schemas" (Snakemake reports the first error, the whole
    alternative), naming neither the key nor what was expected. Now as anywhere else: the key, by name."""
    refusal = plan(tmp_path, lambda c: c["ablations"]["methods"]["lora"].update(lrr=0.1), refused=True)
    assert "Additional properties are not allowed ('lrr' was unexpected)" in refusal, refusal[-2000:]
    assert "On instance['ablations']['methods']['lora']" in refusal, refusal[-2000:]
    refusal = plan(tmp_path, lambda c: c["ablations"]["methods"].update(lora="fast"), refused=True)
    assert "'fast' is not of type 'object', 'null'" in refusal, refusal[-2000:]


@pytest.mark.parametrize(("section", "key"), [
    ("tokenize", "seed"), (None, "images"), ("evaluate", "batch_size"), ("ablations", "split"),
])
def test_a_setting_the_rules_read_is_required_by_name(tmp_path, section, key):
    """A config.yaml edited by hand with a setting the rules read taken out (an empty section too) stopped the plan
    with a KeyError from inside a rule or helper; the schema requires it, naming the key and its section."""
    refusal = plan(tmp_path, lambda c: (c[section] if section else c).pop(key), refused=True)
    assert f"'{key}' is a required property" in refusal and "KeyError" not in refusal, refusal[-2000:]
    if section:
        assert f"On instance['{section}']" in refusal, refusal[-2000:]


def test_the_demos_own_sections_may_be_left_out(tmp_path):
    """base.pretrain and data.demo are the demo's alone (config/paper-7b.yaml, which validates on its own, has
    neither): left out, the demo is made with the library's defaults, not stopped by a KeyError."""
    def edit(config):
        del config["base"]["pretrain"], config["data"]["demo"]

    out = plan(tmp_path, edit)
    assert "--vocab-size 1000 " in out and re.search(r"llama-adapter demo-data --out results/demo +>", out), out[-2000:]


def test_a_point_reusing_a_training_is_retrained_through_that_training(tmp_path):
    """The center reuses the scienceqa experiment's training: asked for by its own path (--forcerun), it is refused,
    naming the file to force, instead of training an adapter into a folder that nothing reads."""
    center = "results/adapters/ablations/adapter_layers~3/gate_init~zero/epochs~3/method~adapter/metrics.json"
    proc = snakemake(center, "-n", "--cores", "1", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert ("trains nothing of its own (it reuses scienceqa's training; to train it again, force "
            "results/adapters/scienceqa/metrics.json)") in proc.stdout + proc.stderr, proc.stdout[-2000:]


@pytest.mark.parametrize("path", [
    "results/eval/instructoin/scores.json",  # a misspelt experiment
    "results/adapters/ablations/adapter_layers~9/gate_init~zero/epochs~3/method~adapter/metrics.json",  # no point
    "results/data/alpacca/validated",  # a misspelt dataset
])
def test_a_path_naming_no_experiment_or_dataset_of_the_config_is_no_rule_s(tmp_path, path):
    """A target (or --forcerun) path whose experiment or dataset the config does not name stopped the plan with a
    KeyError from inside a rule's input function; no rule makes it, and the plan says so, naming the path."""
    proc = snakemake(path, "-n", "--cores", "1", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "KeyError" not in out and "InputFunctionException" not in out, out[-2000:]
    assert f"No rule to produce {path}" in out, out[-2000:]


def test_a_training_whose_weights_are_gone_is_refused_at_plan_time(tmp_path):
    """metrics.json is the training rule's output (the weights' name depends on the method): with the weights deleted
    by hand, the DAG took the training as done and its forced evaluation failed on the missing file."""
    metrics = tmp_path / "results" / "adapters" / "instruction_lora" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    proc = snakemake("results/eval/instruction_lora/scores.json", "-n", "--cores", "1", "--configfile",
                     str(REPO / "config.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert ("results/adapters/instruction_lora/adapter_model.safetensors: missing beside "
            "results/adapters/instruction_lora/metrics.json, which says its training finished; to train it again, "
            "delete results/adapters/instruction_lora/metrics.json") in proc.stdout + proc.stderr, proc.stderr[-2000:]
    metrics.unlink()  # as the message says: the training is planned again, its evaluation after it
    proc = snakemake("results/eval/instruction_lora/scores.json", "-n", "--cores", "1", "--configfile",
                     str(REPO / "config.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "results/adapters/instruction_lora/metrics.json" in proc.stdout, proc.stderr[-2000:]


def test_a_seed_axis_trains_the_center_again_with_each_seed(tmp_path):
    """ablations.vary.seed: the center trained again with each other seed (the first reuses the scienceqa
    experiment's training, the center's, as every center point does), each scored and tabled against it."""
    def edit(config):
        config["ablations"]["center"]["seed"] = 0
        config["ablations"]["vary"] = {"seed": [0, 1, 2]}

    out = plan(tmp_path, edit)
    trainings = set(re.findall(r"output: (results/adapters/ablations/\S*/metrics.json)", out))
    assert {re.search(r"seed~(\d)", t).group(1) for t in trainings} == {"1", "2"}, trainings  # seed 0: scienceqa's
    assert all("method~adapter" in t for t in trainings) and "--seed 1 " in out and "--seed 2 " in out
    assert "results/report/ablation_seed.csv" in out


def test_a_seed_axis_lists_the_centers_seed(tmp_path):
    """A seed axis's table and verdict set each retraining against the center's seed: without it among the values,
    the seeds trained again are set against nothing (the report's verdict: the center is not among this axis's
    points), the trainings spent for no comparison. Refused at plan time, naming the seed to add."""
    def edit(config):
        config["ablations"]["center"]["seed"] = 0
        config["ablations"]["vary"] = {"seed": [1, 2]}

    out = plan(tmp_path, edit, refused=True)
    assert "config ablations.vary.seed [1, 2]: leaves out ablations.center's seed 0" in out, out[-2000:]


def test_a_varied_axis_needs_its_value_at_the_center(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    del config["ablations"]["center"]["method"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "ablations.center: no value for ['method']" in proc.stdout + proc.stderr


@pytest.mark.parametrize(("edit", "named"), [
    (lambda c: c["experiments"]["scienceqa"]["train"].update(lora_rank=16), "experiments.scienceqa.train (adapter)"),
    (lambda c: c["ablations"]["vary"].update(lora_rank=[4, 8]) or c["ablations"]["center"].update(lora_rank=8),
     "ablations.center (adapter): ['lora_rank']"),
    (lambda c: c["ablations"]["center"].update(lora_rank=16), "ablations.center (adapter): ['lora_rank']"),
    (lambda c: c["ablations"]["methods"].update(full={"lr": 0.003, "lora_alpha": 8}), "ablations.methods.full"),
])
def test_lora_settings_of_another_method_are_refused_at_plan_time(tmp_path, edit, named):
    """A LoRA setting where no LoRA trains would be ignored by the training but still name it (a varied lora_rank
    at an adapter center: identical trainings); the plan stops naming where it was given. A LoRA experiment's
    own settings plan as before."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode != 0 and named in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["experiments"]["scienceqa_lora"]["train"]["lora_rank"] = 16
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "good.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(("method", "named"), [
    ("lora", "config ablations.vary ['adapter_layers', 'gate_init']: ablations.center's method lora does not read "
             "them"),
    ("full", "config ablations.vary ['adapter_layers', 'gate_init']: ablations.center's method full"),
    ("zero-shot", "config ablations.vary ['adapter_layers', 'epochs', 'gate_init']: ablations.center's method "
                  "zero-shot does not read them, so each point would repeat the center's base under another name; "
                  "expected such an axis only at a center whose method reads it (a trained one: adapter, lora or "
                  "full;"),
])
def test_an_axis_the_center_method_ignores_is_refused_at_plan_time(tmp_path, method, named):
    """The adapter's own settings varied at a LoRA or full center (every axis but method at a zero-shot one) would
    plan points that train the same model again under other names, even with the adapter on the method axis (a
    point varies one axis at the center's method); the plan stops naming the axes and the method."""
    assert named in plan(tmp_path, lambda c: c["ablations"]["center"].update(method=method), refused=True)


def test_a_value_listed_twice_on_an_axis_is_refused_at_plan_time(tmp_path):
    """[1, 3, 3.0] is two settings shown as three points (the report refuses it too, after the grid has trained);
    the schema stops the plan, naming the axis."""
    refusal = plan(tmp_path, lambda c: c["ablations"]["vary"].update(adapter_layers=[1, 3, 3.0]), refused=True)
    assert "non-unique" in refusal and "adapter_layers" in refusal, refusal[-2000:]


def test_an_integer_written_as_a_float_reaches_every_command_as_an_integer(tmp_path):
    """The schema takes 256.0 for an integer (as JSON does), which the CLI refuses ("--max-seq-len 256.0"): outside
    the train settings it planned, and failed in the rule. Every integer setting is passed as one."""
    def edit(config):
        config["tokenize"].update(max_seq_len=256.0)
        config["data"]["demo"].update(questions=720.0)
        config["evaluate"].update(batch_size=32.0)
        config["ablations"]["methods"]["lora"].update(lora_rank=8.0)  # the method axis's LoRA point then trains

    out = plan(tmp_path, edit)
    assert "--max-seq-len 256 " in out and "--questions 720" in out and "--batch-size 32 " in out, out[-2000:]
    assert "--lora-rank 8 " in out, out[-2000:]
    assert "256.0" not in out and "720.0" not in out and "--batch-size 32.0" not in out and "8.0" not in out


@pytest.mark.parametrize(("edit", "named"), [
    (lambda c: c["train"].update(blr=float("nan")), "config train.blr: nan: expected a finite number"),
    (lambda c: c["generate"].update(top_p=float("nan")), "config generate.top_p: nan: expected a finite number"),
    (lambda c: c["ablations"]["vary"].update(blr=[1.0, float("inf")]) or c["ablations"]["center"].update(blr=1.0),
     "config ablations.vary.blr[1]: inf: expected a finite number"),
    (lambda c: c["train"].update(seed=-1), "-1 is less than the minimum of 0"),
    (lambda c: c["tokenize"].update(max_seq_len=2**21), "2097152 is greater than the maximum of 1048576"),
])
def test_a_number_the_cli_would_refuse_is_refused_at_plan_time(tmp_path, edit, named):
    """NaN passes the schema's bounds (it compares false with each) and infinity a bound on one side; a negative
    seed and a length beyond any context passed for want of one: the CLI refused each in the rule, after the plan.
    The plan stops, naming the key."""
    assert named in plan(tmp_path, edit, refused=True)


def test_the_schema_bounds_are_the_clis():
    """The schema's bounds of seeds and token counts are the ranges the CLI's options take (inputs.py)."""
    import argparse

    from llama_adapter.inputs import MAX_TOKENS, random_seed

    definitions = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["definitions"]
    seed, tokens = definitions["seed"], definitions["token_count"]
    assert random_seed(str(seed["minimum"])) == seed["minimum"] and random_seed(str(seed["maximum"]))
    for outside in (seed["minimum"] - 1, seed["maximum"] + 1):
        with pytest.raises(argparse.ArgumentTypeError):
            random_seed(str(outside))
    assert tokens["maximum"] == MAX_TOKENS


def test_an_axis_the_center_method_reads_plans(tmp_path):
    """A full fine-tuning center varies what it reads (epochs) and the method; each epochs point trains."""
    def edit(c):
        c["ablations"]["center"].update(method="full")
        c["ablations"]["vary"].update(adapter_layers=None, gate_init=None)

    out = plan(tmp_path, edit)
    for epochs in (2, 5):
        assert f"results/adapters/ablations/adapter_layers~3/gate_init~zero/epochs~{epochs}/method~full/" in out


def test_grid_values_are_named_and_passed_as_written(tmp_path):
    """An integer setting written 2.0 (a JSON integer to the schema) is 2, in the point's name and on the command
    line (the CLI refuses "2.0"); a float among an axis' integers does not turn them into floats (which renamed,
    and retrained, every point when a value was added); a null at the center does not undo a method's own
    learning rate, and the center still reuses the named experiment's training."""
    out = plan(tmp_path, lambda c: c["ablations"]["vary"].update(adapter_layers=[1, 2.0, 3]))
    assert "ablations/adapter_layers~2/gate_init~zero" in out and "--adapter-layers 2.0" not in out
    out = plan(tmp_path, lambda c: c["ablations"]["vary"].update(blr=[0.009, 1, 2.5]) or c["ablations"]["center"]
               .update(blr=0.009))
    assert "blr~1/" in out and "blr~1.0/" not in out and "blr~2.5/" in out
    out = plan(tmp_path, lambda c: c["ablations"]["center"].update(lr=None))
    assert "results/adapters/ablations/adapter_layers~3/gate_init~zero/epochs~3/lr~NA/method~adapter/" not in out
    full_point = "ablations/adapter_layers~3/gate_init~zero/epochs~3/lr~NA/method~full"
    assert f"results/eval/{full_point}/scores.json" in out  # scored with scienceqa_full's training, its lr kept
    assert f"results/adapters/{full_point}/" not in out


def test_a_method_point_reuses_the_named_training_whatever_the_adapter_settings(tmp_path):
    """The method axis' LoRA and full points hold the center's adapter settings, which their trainings do not read:
    at a center whose adapter_layers differ from the train block's they still reuse scienceqa_lora's and
    scienceqa_full's trainings (they trained second copies)."""
    out = plan(tmp_path, lambda c: c["ablations"]["center"].update(adapter_layers=2))
    for method in ("lora", "full"):
        point = f"ablations/adapter_layers~2/gate_init~zero/epochs~3/method~{method}"
        assert f"results/eval/{point}/scores.json" in out and f"results/adapters/{point}/" not in out
    assert "results/adapters/ablations/adapter_layers~2/gate_init~zero/epochs~3/method~adapter/" in out


def test_an_adapter_in_more_layers_than_a_known_base_has_is_refused_at_plan_time(tmp_path):
    """The demo's base has its preset's 3 layers: an adapter in 5 failed each training, after the base was
    pre-trained; the plan stops, naming the value, the experiments it reaches and the base's layers."""
    refusal = plan(tmp_path, lambda c: c["train"].update(adapter_layers=5), refused=True)
    assert ("config adapter_layers 5 (in ['instruction', 'scienceqa', 'scienceqa_mm']): exceeds the 3 layers of "
            "base.source demo (base.pretrain.preset demo)") in refusal, refusal[-2000:]


@pytest.mark.parametrize(("base", "layers", "refused"), [
    ("path", 2, True), ("path", 3, False), ("hub", 2, True), ("hub of another revision", 2, False),
])
def test_an_adapter_in_more_layers_than_a_base_on_disk_has_is_refused_at_plan_time(tmp_path, base, layers, refused):
    """A base given by path (the paper's own LLaMA weights) or fetched from the hub was read only by its training,
    after a cluster's queue; its settings say its layers, so the plan refuses an adapter in more (the ablation
    point in 3 layers, on a base of 2) and passes one that fits. A hub folder fetched for another revision (its
    name holds none) is not this config's base yet: the training checks the one fetched for it."""
    source = str(tmp_path / "base") if base == "path" else "hf:org/llama@abc123"
    folder = tmp_path / "base" if base == "path" else tmp_path / "results" / "models" / "hf" / "org--llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(ModelArgs(
        dim=64, n_layers=layers, n_heads=4, vocab_size=256, hidden_dim=128))))
    if base != "path":
        fetched = source if base == "hub" else "hf:org/llama@def456"
        (folder / "fetch.json").write_text(json.dumps({"source": fetched}))

    out = plan(tmp_path, lambda c: c.update(base={"source": source}), refused=refused)
    if refused:
        assert ("config adapter_layers 3 (in ['instruction', 'scienceqa', 'scienceqa_mm', "
                "'ablations/adapter_layers~3/gate_init~zero/epochs~3/method~adapter'") in out, out[-2000:]
        assert f"exceeds the 2 layers of base.source '{source}'; expected 1..2" in out, out[-2000:]


def test_a_base_on_disk_whose_settings_cannot_be_read_is_refused_at_plan_time_naming_the_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = plan(tmp_path, lambda c: c.update(base={"source": str(tmp_path / "base")}), refused=True)
    assert (f"config base.source '{tmp_path / 'base'}': {tmp_path / 'base' / 'config.json'}: model_type 'gpt2' is "
            "not a LLaMA architecture") in out, out[-2000:]


def test_fp8_where_every_weight_trains_is_refused_at_plan_time(tmp_path):
    refusal = plan(tmp_path, lambda c: c["train"].update(precision="fp8"), refused=True)
    assert "config train.precision fp8 reaches ['instruction_full', 'scienceqa_full'" in refusal


def test_images_where_no_multimodal_adapter_reads_them_are_refused_at_plan_time(tmp_path):
    """images: true on Alpaca (no images) failed its training (none of the samples has features), with lora or full
    the training refused the features, zero-shot its evaluation (the base alone reads no image): each after the
    plan, once the base was made and every image encoded. The plan stops, naming each experiment and why."""
    def edit(config):
        for name in ("instruction", "instruction_lora", "scienceqa_lora", "scienceqa_full", "scienceqa_zero_shot"):
            config["experiments"][name]["images"] = True

    refusal = plan(tmp_path, edit, refused=True)
    assert ("config experiments.instruction.images true (dataset alpaca, which has no images); "
            "experiments.instruction_lora.images true (dataset alpaca, which has no images; method lora, which "
            "reads no image); experiments.scienceqa_full.images true (method full, which reads no image); "
            "experiments.scienceqa_lora.images true (method lora, which reads no image); "
            "experiments.scienceqa_zero_shot.images true (method zero-shot, which reads no image): the image "
            "features are read by the multimodal adapter alone") in refusal, refusal[-2000:]
    assert "experiments.scienceqa_mm" not in refusal  # the multimodal adapter, on ScienceQA: as it should be


@pytest.mark.parametrize(("edit", "named"), [
    # the point sets its method (the method axis): the method key was overridden without a word
    (lambda c: c["ablations"]["methods"]["lora"].update(method="full"), "ablations.methods.lora.method full"),
    # no method at the center: every point trained LoRA, the adapter_layers axis the same LoRA three times
    (lambda c: (c["ablations"]["center"].pop("method"), c["ablations"]["vary"].update(method=None),
                c["ablations"].update(methods={"adapter": {"method": "lora"}, "lora": {"method": "lora"}})),
     "ablations.methods.adapter.method lora"),
])
def test_another_method_in_a_methods_settings_is_refused_at_plan_time(tmp_path, edit, named):
    """ablations.methods.<m> is the settings of the points that train with <m>: a method key naming another method
    made such points train it under <m>'s settings, or was overridden by the point's own; refused, naming the entry
    (a method key naming <m> itself changes nothing and passes)."""
    refusal = plan(tmp_path, edit, refused=True)
    assert f"config {named}: ablations.methods.<m> holds the settings of the grid points" in refusal, refusal[-2000:]
    assert "ablations.methods.lora.method lora" not in refusal


@pytest.mark.parametrize(("edit", "named"), [
    (lambda c: c["evaluate"].update(split="validation"),
     "evaluate.split 'validation': no such ScienceQA split; data.scienceqa.source 'demo' gives train, val, test"),
    (lambda c: c["ablations"].update(split="dev"), "ablations.split 'dev': no such ScienceQA split"),
    (lambda c: c["data"]["scienceqa"].update(assign_splits={"fractions": {"train": 0.5, "test": 0.5}}),
     "ablations.split 'val': no such ScienceQA split; data.scienceqa.assign_splits gives test, train"),
])
def test_a_split_the_questions_cannot_hold_is_refused_at_plan_time(tmp_path, edit, named):
    """A split to score that the fetched ScienceQA cannot have would fail every evaluation after the trainings;
    the plan stops, naming the config key and the splits there will be: the demo's, a local source's (fetch gives
    train / val / test) or the assigned ones. A hub dataset's split names are its own."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode != 0 and named in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    if "assign_splits" in named:
        return
    local = tmp_path / "sqa"
    local.mkdir()
    config["data"]["scienceqa"] = {"source": str(local)}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "local.yaml"), cwd=tmp_path)
    assert proc.returncode != 0 and f"data.scienceqa.source '{local}' gives train, val, test" in proc.stderr + \
        proc.stdout, (proc.stdout + proc.stderr)[-2000:]
    config["data"]["scienceqa"] = {"source": "hf:derek-thomas/ScienceQA"}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "hub.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def test_assigned_split_fractions_reach_fetch_in_one_order(tmp_path):
    """The fractions of data.scienceqa.assign_splits go to fetch in one order (train, val, test), whatever order
    the config writes them in (here yaml's sorted test, train, val): reordering the keys changes no command."""
    fractions = {"test": 0.5, "train": 0.45, "val": 0.05}
    out = plan(tmp_path, lambda c: c["data"]["scienceqa"].update(assign_splits={"fractions": fractions}))
    [fetched] = [line for line in out.splitlines() if "llama-adapter fetch --dataset scienceqa" in line]
    assert " --assign-splits train=0.45 val=0.05 test=0.5 " in fetched, fetched


def test_an_alpaca_ablation_split_other_than_val_is_refused_at_plan_time(tmp_path):
    """An Alpaca ablation is scored on its held-out val samples whatever ablations.split says: another split is
    refused, naming the key; config.yaml's val plans, each point scored on the held-out tokens."""
    refusal = plan(tmp_path, lambda c: c["ablations"].update(dataset="alpaca", split="test"), refused=True)
    assert ("config ablations.split 'test': an Alpaca ablation is scored by its held-out loss on tokenize's val "
            "samples") in refusal
    out = plan(tmp_path, lambda c: c["ablations"].update(dataset="alpaca"))
    point = "ablations/adapter_layers~1/gate_init~zero/epochs~3/method~adapter"
    [scored] = [line for line in out.splitlines() if "llama-adapter evaluate" in line and f"eval/{point}" in line]
    assert "--task alpaca --data results/tokens/alpaca/val " in scored and "--split" not in scored


def test_the_schema_offers_the_library_choices():
    """The config schema cannot hold defaults or choices of its own: its enums are the library's."""
    from llama_adapter.config import (
        GATE_INITS,
        LORA_TARGETS,
        METHODS,
        MODES,
        POLICIES,
        PRECISIONS,
        PRESETS,
        TASKS,
        TRUNCATION,
    )
    from llama_adapter.data.demo import CELLS
    from llama_adapter.data.validate import ALL_FLAGS

    settings = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    adapter = settings["definitions"]["adapter_settings"]["properties"]
    assert tuple(adapter["gate_init"]["enum"]) == GATE_INITS and tuple(adapter["method"]["enum"]) == METHODS
    assert tuple(adapter["precision"]["enum"]) == PRECISIONS
    target = "|".join(LORA_TARGETS)
    assert adapter["lora_targets"]["pattern"] == f"^({target})(,({target}))*$(?!\\n)"
    stage = {name: spec.get("properties", {}) for name, spec in settings["properties"].items()}
    assert tuple(stage["tokenize"]["truncation"]["enum"]) == TRUNCATION
    assert tuple(stage["evaluate"]["mode"]["enum"]) == MODES
    validation = stage["data"]["validation"]["properties"]
    for policy in (validation["policy"], stage["images"]["policy"]):
        assert tuple(policy["enum"]) == POLICIES
    assert sorted(validation["drop_flags"]["items"]["enum"]) == sorted(ALL_FLAGS)
    assert stage["data"]["demo"]["properties"]["questions"]["minimum"] == len(CELLS)  # generate_demo's minimum
    experiment = settings["properties"]["experiments"]["additionalProperties"]["properties"]
    for dataset in (experiment["dataset"], stage["ablations"]["dataset"]):
        assert sorted(dataset["enum"]) == sorted(TASKS)
    assert tuple(stage["ablations"]["methods"]["propertyNames"]["enum"]) == METHODS
    assert tuple(stage["base"]["pretrain"]["properties"]["preset"]["enum"]) == tuple(PRESETS)


def test_the_lock_pins_pyproject_and_environment_yml_follows_it():
    """requirements.lock (tools/lock.py) pins every dependency of pyproject.toml and its extras at a version the
    specifier allows, each with its hashes; environment.yml holds the same pins; the README, CI and environment.yml
    install the torch the lock was resolved with."""
    import importlib.util
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    lock = (REPO / "requirements.lock").read_text()
    locked = {canonicalize_name(name): version for name, version in tool.pins(lock)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in tool.EXTRAS for r in project["optional-dependencies"][extra]]
    for requirement in wanted:
        version = tool.TORCH if requirement.name == "torch" else locked[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2])  # one entry per package after the header
    assert len(entries) == len(locked) and all("--hash=sha256:" in entry for entry in entries)
    assert "torch" not in locked and not any(name.startswith("nvidia") for name in locked)  # torch: per machine
    assert (REPO / "environment.yml").read_text() == tool.environment_yml(tool.pins(lock))
    for path in (REPO / "README.md", REPO / ".ci" / "run"):
        commands = path.read_text().replace(" && ", "\n")  # the torch install ends a command
        assert f" torch=={tool.TORCH}\n" in commands and "--require-hashes -r requirements.lock" in commands, path


def test_conda_environment_of_the_rules_installs_this_checkout(tmp_path):
    """With --sdm conda Snakemake builds the rules' environment from a copy of environment.yml in a folder of its
    own, then runs environment.post-deploy.sh inside it: the script must install this checkout from
    LLAMA_ADAPTER_SOURCE (which the workflow exports), not from a relative path. conda is not here (Snakemake
    asks for it even to plan with --sdm conda): a fresh venv stands in for the environment."""
    import subprocess
    import sys

    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert not [line for line in pip if line.startswith("-e")]  # a path would be read where Snakemake copies it
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "env")], check=True)
    outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own packages only
    inside = {**outside, "PATH": f"{tmp_path / 'env' / 'bin'}:{os.environ['PATH']}", "LLAMA_ADAPTER_SOURCE": str(REPO)}
    installed = subprocess.run(["bash", str(REPO / "environment.post-deploy.sh")], capture_output=True, text=True,
                               cwd=tmp_path, env=inside)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # the checkout itself, editable (its dependencies are the environment's: --no-deps)
    code = "from importlib.metadata import distribution; print(distribution('llama-adapter-pipeline').read_text(" \
           "'direct_url.json'))"
    found = subprocess.run([str(tmp_path / "env" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                           env=outside)
    assert REPO.as_uri() in found.stdout and '"editable": true' in found.stdout, found.stdout + found.stderr
    assert (tmp_path / "env" / "bin" / "llama-adapter").exists()
    unset = subprocess.run(["bash", str(REPO / "environment.post-deploy.sh")], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "LLAMA_ADAPTER_SOURCE"})
    assert unset.returncode != 0 and "LLAMA_ADAPTER_SOURCE" in unset.stderr


# --- the whole demo DAG, for real (the demo_run fixture, tests/conftest.py) ------------------------------------

def test_demo_report_holds_numbers_with_provenance(demo_run):
    report = demo_run / DEMO_RESULTS / "report"
    tables = {name: read_csv(report / f"{name}.csv") for name in
              ("efficiency", "scienceqa", "insertion_layers", "gate_init", "epochs", "ablation_method", "generations",
               "instruction")}
    assert [r["adapter_layers"] for r in tables["insertion_layers"]] == ["1", "2", "3"]
    assert [r["gate_init"] for r in tables["gate_init"]] == ["zero", "random"]
    assert [r["epochs"] for r in tables["epochs"]] == ["2", "3", "5"]
    methods = {r["method"]: r for r in tables["ablation_method"]}
    assert list(methods) == ["LLaMA-Adapter", "LoRA", "full fine-tuning", "zero-shot base"]
    assert {r["split"] for r in methods.values()} == {"val"}  # scored where the ablations are, not on test
    assert methods["zero-shot base"]["tuned_params_m"] == "" and methods["zero-shot base"]["train_loss"] == ""
    assert methods["LLaMA-Adapter"]["accuracy"] == tables["gate_init"][0]["accuracy"]  # the same center point
    scienceqa = {r["experiment"]: r for r in tables["scienceqa"]}
    assert list(scienceqa) == ["scienceqa", "scienceqa_mm", "scienceqa_lora", "scienceqa_full", "scienceqa_zero_shot",
                               "no model: always (A)"]
    text_only, multimodal = scienceqa["scienceqa"], scienceqa["scienceqa_mm"]
    assert text_only["experiment"] == "scienceqa" and text_only["split"] == "test"
    assert (text_only["paper_model"], text_only["accuracy_paper"]) == ("LLaMA-Adapter_T", "78.31")
    assert multimodal["experiment"] == "scienceqa_mm" and multimodal["split"] == "test"
    assert (multimodal["paper_model"], multimodal["accuracy_paper"], multimodal["IMG_paper"]) == (
        "LLaMA-Adapter", "85.19", "80.32")
    assert 0 <= float(multimodal["IMG"]) <= 100 and float(multimodal["questions"]) == float(text_only["questions"])
    ours = [*tables["insertion_layers"], *tables["gate_init"], *tables["epochs"], *tables["ablation_method"],
            text_only, multimodal]
    for row in ours:
        trained = row.get("method") != "zero-shot base"  # the base alone: no training run (its evaluation's config)
        assert float(row["ci95_low"]) <= float(row["accuracy"]) <= float(row["ci95_high"])
        assert len(row["mlflow_run"]) == (32 if trained else 0) and len(row["eval_run"]) == 32
        assert len(row["config_hash"]) == 12 and len(row["git_commit"]) == 12
        assert len(row["data_sha256"]) == (12 if trained else 0)  # the records trained on: none for the base alone
    for row in tables["epochs"]:
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0
    # Question by question: each method against the adapter on the same questions, each point against its center.
    assert [r["paired_with"] for r in tables["scienceqa"]] == ["", *["scienceqa"] * 4, ""]  # not itself, nor the floor
    assert [r["paired_with"] != "" for r in tables["epochs"]] == [True, False, True]  # the center, 3 epochs, is not
    for row in [*tables["scienceqa"][1:5], tables["epochs"][0], tables["epochs"][2]]:
        assert float(row["p_paired"]) == pytest.approx(mcnemar_p(int(row["only_this_right"]),
                                                                 int(row["only_paired_right"])))
    # Sample by sample: each instruction method against the adapter on the same held-out Alpaca samples.
    instruction = {r["experiment"]: r for r in tables["instruction"]}
    assert [r["paired_with"] for r in instruction.values()] == ["", *["instruction"] * 3]
    for row in list(instruction.values())[1:]:
        lower, higher = int(row["lower_loss_here"]), int(row["lower_loss_paired"])
        assert 0 < lower + higher <= int(row["heldout_samples"])
        assert float(row["p_paired"]) == pytest.approx(mcnemar_p(lower, higher))
    losses = {name: json.loads((demo_run / DEMO_RESULTS / "eval" / name / "scores.json").read_text())["sample_losses"]
              for name in instruction}
    for name in list(instruction)[1:]:  # the samples on which this row's loss, or the adapter's, is the lower
        pairs = [(a, b) for a, b in zip(losses[name], losses["instruction"]) if a is not None and b is not None]
        assert int(instruction[name]["lower_loss_here"]) == sum(a < b for a, b in pairs)
        assert int(instruction[name]["lower_loss_paired"]) == sum(a > b for a, b in pairs)
    efficiency = {(r["method"], r["model"]): r for r in tables["efficiency"]}
    assert efficiency[("LLaMA-Adapter", "LLaMA-7B shapes (computed; fp32 file)")]["tuned_params_m"] == "1.22976"
    for method, name in (("LLaMA-Adapter", "instruction"), ("LoRA", "instruction_lora"),
                         ("full fine-tuning", "instruction_full")):
        row = efficiency[(method, f"{name} (base demo-base)")]  # millions, MB, hours: the paper's units
        assert 0 < float(row["training_h"]) < 1 and 0 < float(row["storage_mb"]) < 10
        assert 0 < float(row["tuned_params_m"]) < 1
    instructions = (REPO / "workflow" / "resources" / "demo_instructions.jsonl").read_text().splitlines()
    per_model = Counter(r["adapter"] for r in tables["generations"])  # each instruction experiment answers all
    assert per_model == {e: len(instructions) for e in
                         ("instruction", "instruction_lora", "instruction_full", "instruction_zero_shot")}
    for name in ("loss_curves_gate_init", "gate_magnitude", "scienceqa_categories", "alpaca_lengths",
                 "ablations"):
        from PIL import Image

        with Image.open(report / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 300
    text = (report / "report.md").read_text()
    assert "| adapter_layers |" in text and "![" in text and "**Provenance**" in text
    assert "Paired with another row, sample by sample" in text
    # the trained rows' commit and config hash; the zero-shot rows, which have no training, add no "unknown"
    assert re.search(r"Git commit: [0-9a-f]{12}\. Config hash: [0-9a-f]{12}\.", text), text[:600]
    # the caption says how the answers were decoded (config.yaml: temperature 0.1, top-p 0.75), not "greedy"
    assert "## Generations of the instruction adapters (sampled at temperature 0.1, top-p 0.75" in text
    assert max(line.count(" | ") for line in text.splitlines() if line.startswith("|")) < 16  # readable widths
    assert (report / "scienceqa.tex").read_text().count(r"\\") == 7  # the header row, five methods' rows, the floor


def test_demo_runs_nest_under_one_parent_mlflow_run(demo_run):
    from mlflow.tracking import MlflowClient

    from llama_adapter.tracking import sqlite_uri

    client = MlflowClient(sqlite_uri(demo_run / DEMO_RESULTS / "mlflow.db"))
    [experiment] = [e for e in client.search_experiments() if e.name == "llama-adapter"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("rule") == "all"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rules = sorted(r.data.tags["rule"] for r in children)
    assert rules == ["evaluate"] * 18 + ["train_adapter"] * 12
    for r in children:
        assert r.data.tags["config_hash"] == parent.data.tags["config_hash"] and r.data.tags["experiment"]
        assert r.data.tags.get("git_commit") == parent.data.tags.get("git_commit")
    trained = {r.data.tags["experiment"]: r for r in children if r.data.tags["rule"] == "train_adapter"}
    assert len(client.get_metric_history(trained["scienceqa"].info.run_id, "loss")) > 5
    # The parent holds the resolved config and its hash; every job's run its datasets, source and environment.
    config = client.download_artifacts(parent.info.run_id, "config.yaml", str(demo_run))
    config = yaml.safe_load(Path(config).read_text())
    assert config["results"] == DEMO_RESULTS and parent.data.params["config_hash"] == parent.data.tags["config_hash"]
    for r in children:
        contexts = sorted(t.value for d in r.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context")
        assert contexts == (["training", "validation"] if r.data.tags["rule"] == "train_adapter" else ["evaluation"])
        assert r.data.tags["mlflow.source.name"] in ("llama_adapter.train", "llama_adapter.evaluate")
        assert "env.torch" in r.data.tags


def test_demo_rerun_does_nothing_and_a_new_grid_point_runs_alone(demo_run):
    proc = snakemake("-n", "--cores", "2", *demo_configfiles(demo_run), cwd=demo_run)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    # The center's keys in another order name the same grid points (the folders follow one order of settings).
    center = config["ablations"]["center"]
    reordered = {**config, "results": DEMO_RESULTS,
                 "ablations": {**config["ablations"], "center": dict(reversed(list(center.items())))}}
    (demo_run / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    proc = snakemake("-n", "--cores", "2", "--configfile", str(demo_run / "reordered.yaml"), cwd=demo_run)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    config["ablations"]["vary"]["epochs"].append(4)
    (demo_run / "more.yaml").write_text(yaml.safe_dump({**config, "results": DEMO_RESULTS}, sort_keys=False))
    proc = snakemake("-n", "--cores", "2", "--configfile", str(demo_run / "more.yaml"), cwd=demo_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = re.findall(r"^(?:local)?rule (\w+):$", proc.stdout, re.M)
    assert sorted(planned) == ["all", "evaluate", "report", "train_adapter"]
    assert f"{DEMO_RESULTS}/adapters/ablations/adapter_layers~3/gate_init~zero/epochs~4/method~adapter/metrics.json" \
        in proc.stdout
    # Another answer mode reruns every ScienceQA evaluation, and nothing that trains (a param that took `input`
    # was left out of Snakemake's params trigger: the earlier mode's scores stayed).
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["evaluate"]["mode"] = "likelihood"
    (demo_run / "mode.yaml").write_text(yaml.safe_dump({**config, "results": DEMO_RESULTS}, sort_keys=False))
    proc = snakemake("-n", "--cores", "2", "--configfile", str(demo_run / "mode.yaml"), cwd=demo_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", proc.stdout.split("Job stats:", 1)[1], re.M))
    scienceqa = [name for name, spec in config["experiments"].items() if spec and spec["dataset"] == "scienceqa"]
    assert "train_adapter" not in counts and int(counts["evaluate"]) >= len(scienceqa), proc.stdout[-3000:]


def test_snakemake_html_report_has_the_captions(demo_run):
    proc = snakemake("--report", "report.html", *demo_configfiles(demo_run), cwd=demo_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (demo_run / "report.html").read_text(errors="replace")
    assert "zero-initialised" in html and "Efficiency" in html


def test_demo_adapter_teaches_the_answer_format(demo_run):
    """The demo's point (data/demo.py): its base knows the world and the quiz layout but answers in its own words,
    so zero-shot it never writes the paper's "The answer is (X)"; the adapter learns that format from the
    training questions and beats the zero-shot base by 15 points or more, beyond both 95% intervals."""
    rows = {r["experiment"]: r for r in read_csv(demo_run / DEMO_RESULTS / "report" / "scienceqa.csv")}
    adapter, zero_shot = rows["scienceqa"], rows["scienceqa_zero_shot"]
    assert float(adapter["accuracy"]) - float(zero_shot["accuracy"]) >= 15
    assert float(adapter["ci95_low"]) > float(zero_shot["ci95_high"])
    assert int(float(zero_shot["unparsed"])) > 0.9 * int(float(zero_shot["questions"]))  # the format, not luck
    assert int(float(adapter["unparsed"])) < 0.1 * int(float(adapter["questions"]))
    # and the paired test on the same questions says the same: far more questions only the adapter answered right
    assert int(zero_shot["only_paired_right"]) > 3 * int(zero_shot["only_this_right"])
    assert float(zero_shot["p_paired"]) < 0.001
    # Read in any wording, the zero-shot base picks letters too: the report shows what it knows apart from format.
    assert float(zero_shot["accuracy_any_format"]) > float(zero_shot["accuracy"])
    for name in ("scienceqa_lora", "scienceqa_full"):  # the baselines sit beside it, with their intervals
        assert float(rows[name]["ci95_low"]) <= float(rows[name]["accuracy"]) <= float(rows[name]["ci95_high"])


def test_an_empty_list_of_image_layers_is_refused_by_the_schema(tmp_path):
    """images.layers: [] passed the schema and was read as null, the encoder's default layers, without a word (an
    empty list has no meaning: encode-images' --layers takes one or more); the schema refuses it, by key."""
    refusal = plan(tmp_path, lambda c: c["images"].update(layers=[]), refused=True)
    assert "[] should be non-empty" in refusal and "On instance['images']['layers']" in refusal, refusal[-2000:]


@pytest.mark.parametrize("section", ["evaluate", "ablations"])
def test_a_split_name_that_reads_as_an_option_is_refused_by_the_schema(tmp_path, section):
    """A split named "-val" passed the plan wherever the splits are not known beforehand (a hub dataset keeps its
    own names) and stopped the evaluate job, whose --split took it for an option; refused by the schema, by key."""
    refusal = plan(tmp_path, lambda c: c[section].update(split="-val"), refused=True)
    assert "'-val' does not match" in refusal and f"On instance['{section}']['split']" in refusal, refusal[-2000:]
