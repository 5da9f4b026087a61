"""Snakemake profiles (slurm/, the workflow's default profile) and config/paper-7b.yaml, checked by dry runs.

A dry run needs no SLURM: with -n Snakemake plans the jobs but submits nothing, so sinfo/sbatch are never called.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama_adapter.checkpoint import hf_config
from llama_adapter.config import ModelArgs

REPO = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPO / "slurm" / "config.yaml"
# Snakemake 9 loads profiles/default beside the Snakefile by itself.
DEFAULT_PROFILE = REPO / "profiles" / "default"
PAPER = REPO / "config" / "paper-7b.yaml"

needs_snakemake = pytest.mark.skipif(importlib.util.find_spec("snakemake") is None,
                                     reason="snakemake is not installed (pip install -e '.[workflow]')")
# `executor: slurm` needs the plugin even for a dry run (Snakemake refuses an unknown --executor).
needs_slurm_plugin = pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                                        reason="snakemake-executor-plugin-slurm is not installed")

# What the SLURM profile asks for the GPU rules, as Snakemake reports a job's resources (runtime in minutes).
GPU_JOB = {"gpu": "1", "gpu_model": "a100", "cpus_per_gpu": "8", "mem_mb": "32000",
           "slurm_partition": "<your-gpu-partition>", "slurm_account": "<your-account>"}
RUNTIME = {"train_adapter": "1440", "generate": "60", "evaluate": "120"}


def snakemake(*args: str) -> str:
    """A dry run from the repository root, as a user types it; offline (any network use would fail)."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def job_counts(out: str) -> dict[str, int]:
    """The dry run's 'Job stats' table: rule -> number of jobs."""
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def jobs(out: str, rule: str) -> list[dict]:
    """Each planned job of a rule: its wildcards, resources (name -> printed value) and shell command."""
    found, job = [], None
    for line in out.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            job = {"wildcards": {}, "resources": {}, "shell": ""} if m[1] == rule else None
            if job is not None:
                found.append(job)
        elif job is None:
            continue
        elif m := re.match(r"\s+(wildcards|resources): (.*)$", line):
            job[m[1]] = dict(item.split("=", 1) for item in m[2].split(", "))
        elif line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ")
    return found


# --- the profile files ---------------------------------------------------------------------------------------

def test_profiles_are_yaml_and_slurm_selects_the_plugin():
    profiles = (SLURM_PROFILE.parent, DEFAULT_PROFILE, REPO / "local", REPO / "slurm-cpu")
    for path in [p for folder in profiles for p in folder.rglob("*.yaml")]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    slurm = yaml.safe_load(SLURM_PROFILE.read_text())
    assert slurm["executor"] == "slurm"
    assert set(slurm["set-resources"]) == set(RUNTIME)
    # A key of the workflow's default profile replaces the same key of --profile slurm, and a global `resources`
    # pool caps every job's request (gpu: 0 would submit the GPU rules without GPUs).
    default = yaml.safe_load((DEFAULT_PROFILE / "config.yaml").read_text())
    assert not {"resources", "default-resources", "set-resources", "executor"} & set(default)


@needs_snakemake
def test_default_profile_is_loaded_without_asking(paper_dry_run):
    assert "workflow specific profile" in paper_dry_run


# --- SLURM: the demo DAG through the slurm profile ------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_dry_run() -> str:
    return snakemake("--profile", "slurm", "--forceall")  # -F: every job, whatever results/ already holds


@needs_snakemake
@needs_slurm_plugin
def test_slurm_profile_dry_run(slurm_dry_run):
    assert re.search(r"Using profiles? slurm\b", slurm_dry_run)
    counts = job_counts(slurm_dry_run)
    for rule, runtime in RUNTIME.items():
        assert counts[rule] == len(jobs(slurm_dry_run, rule)) > 0, rule
        for job in jobs(slurm_dry_run, rule):
            assert job["resources"].items() >= {**GPU_JOB, "runtime": runtime}.items(), (rule, job["resources"])
    # the training command is told to expect the GPU the job asked for
    assert all("--expect-gpus 1 " in job["shell"] for job in jobs(slurm_dry_run, "train_adapter"))
    # CPU rules take the default partition and no GPU
    for job in jobs(slurm_dry_run, "tokenize"):
        assert job["resources"]["slurm_partition"] == "<your-partition>"
        assert "gpu" not in job["resources"]


@needs_snakemake
@needs_slurm_plugin
def test_slurm_plugin_turns_the_resources_into_sbatch_options(slurm_dry_run):
    """The resources of a planned training job, handed to the plugin's own sbatch builder."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    printed = jobs(slurm_dry_run, "train_adapter")[0]["resources"]
    job = SimpleNamespace(threads=2, resources=Resources(
        {k: int(v) if v.isdigit() else v for k, v in printed.items() if v != "<TBD>"}))
    params = {"run_uuid": "id", "slurm_logfile": "log", "comment_str": "rule_train_adapter", "account": "",
              "partition": "", "workdir": str(REPO)}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    for option in ("--gpus=a100:1", "--cpus-per-gpu=8", "--mem 32000", "-t 1440"):
        assert f" {option} " in f"{sbatch} ", (option, sbatch)


@needs_snakemake
@needs_slurm_plugin
def test_cpu_profile_fits_a_small_cpu_cluster():
    """slurm-cpu/: the demo through SLURM on nodes without GPUs and with little memory: no job asks for a GPU or
    more than 2 GB, every job names the profile's partition, and training still asks for its warning signal."""
    planned = snakemake("--profile", "slurm-cpu", "--forceall")
    assert re.search(r"Using profiles? slurm-cpu\b", planned)
    every = [job for rule in job_counts(planned) if rule != "all" for job in jobs(planned, rule)]
    assert len(every) > 40
    for job in every:
        resources = job["resources"]
        assert resources.get("gpu", "0") == "0" and resources["slurm_partition"] == "<your-partition>", job
        assert resources["mem_mb"] == "<TBD>" or int(resources["mem_mb"]) <= 2000, job
    assert all(job["resources"]["slurm_extra"] == "--signal=TERM@600" for job in jobs(planned, "train_adapter"))
    assert all("--expect-gpus 0 " in job["shell"] for job in jobs(planned, "train_adapter"))


# --- the paper's configuration --------------------------------------------------------------------------------

@needs_snakemake
def test_paper_config_validates_on_its_own():
    from snakemake.utils import validate

    config = yaml.safe_load(PAPER.read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # every required key, no typo
    assert config["base"]["source"] != "demo" and config["data"]["alpaca"]["source"] == "hf:tatsu-lab/alpaca"


@needs_snakemake
def test_unedited_paper_config_names_every_value_to_edit(tmp_path):
    """A plan of config/paper-7b.yaml as shipped stops at once, naming each placeholder path by its config key,
    not at 'Missing input files' for the first one a rule needs."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(PAPER),
                           "--config", f"results={tmp_path / 'results'}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "Missing input files" not in proc.stdout + proc.stderr
    for key in ("base.source '/path/to/llama/7B'", "base.tokenizer", "images.encoder", "EDIT"):
        assert key in proc.stdout + proc.stderr, key


@pytest.fixture(scope="module")
def paper_tmp(tmp_path_factory) -> Path:
    """config/paper-7b.yaml pointed at a fake Meta LLaMA-1 layout (a dry run checks the files exist, and reads
    params.json for the base's layers) and at a results folder of its own."""
    tmp = tmp_path_factory.mktemp("paper-7b")
    (tmp / "llama" / "7B").mkdir(parents=True)
    for name in ("7B/consolidated.00.pth", "tokenizer.model"):
        (tmp / "llama" / name).touch()
    (tmp / "llama" / "7B" / "params.json").write_text(json.dumps(ModelArgs.from_name("7B").to_dict()))
    (tmp / "clip").mkdir()
    config = yaml.safe_load(PAPER.read_text())
    config["images"]["encoder"] = str(tmp / "clip")
    config["results"] = str(tmp / "results")
    config["base"]["source"] = str(tmp / "llama" / "7B")
    config["base"]["tokenizer"] = str(tmp / "llama" / "tokenizer.model")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # key order names folders
    return tmp


@pytest.fixture(scope="module")
def paper_dry_run(paper_tmp) -> str:
    return snakemake("--configfile", str(paper_tmp / "config.yaml"))


@needs_snakemake
def test_paper_config_dry_run(paper_dry_run, paper_tmp):
    counts = job_counts(paper_dry_run)
    assert {rule: counts.get(rule, 0) for rule in (
        "demo_data", "train_tokenizer", "pretrain_base", "fetch", "validate", "tokenize", "train_adapter",
        "evaluate", "generate")} == {
        "demo_data": 0, "train_tokenizer": 0, "pretrain_base": 0,  # the real base: no demo stages
        "fetch": 2, "validate": 2, "tokenize": 2,
        # instruction(_lora), scienceqa(_mm, _lora), 6 ablation points (the center is scienceqa's, the LoRA point
        # scienceqa_lora's); zero-shot experiments are evaluated without training, and the full fine-tunes are
        # dropped at 7B. Evaluated: 7 named experiments and 8 ablation points (6 adapters, LoRA, zero-shot)
        "train_adapter": 10, "evaluate": 15, "generate": 3}
    assert counts.get("encode_images") == 1 and counts.get("make_vision_encoder", 0) == 0
    readme = (Path(__file__).parents[1] / "README.md").read_text()  # the README's plan is this plan
    assert f"the plan: {counts['train_adapter']} trainings, {counts['evaluate']} evaluations" in readme
    ablations = {f"ablations/adapter_layers~{layers}/gate_init~{gate}/epochs~{epochs}/method~adapter"
                 for layers, gate, epochs in [(30, "zero", 30), (10, "zero", 30), (20, "zero", 30),
                                              (30, "random", 30), (30, "zero", 15), (30, "zero", 60)]}
    trained = {job["wildcards"]["experiment"]: job["shell"] for job in jobs(paper_dry_run, "train_adapter")}
    center = "ablations/adapter_layers~30/gate_init~zero/epochs~30/method~adapter"
    assert set(trained) == {"instruction", "instruction_lora", "scienceqa", "scienceqa_mm", "scienceqa_lora"
                            } | ablations - {center}
    assert " --method lora " in trained["instruction_lora"] and " --lr 0.0003 " in trained["instruction_lora"]
    assert " --method " not in trained["instruction"]  # the adapter: the default
    features = f"{paper_tmp}/results/features/clip/scienceqa"
    assert f"--image-features {features}" in trained["scienceqa_mm"] and "--image-features" not in trained["scienceqa"]
    [center_scored] = [job for job in jobs(paper_dry_run, "evaluate") if job["wildcards"]["experiment"] == center]
    assert "/adapters/scienceqa/adapter.safetensors " in center_scored["shell"]
    for option in ("--adapter-len 10", "--adapter-layers 30", "--gate-init zero", "--epochs 5", "--warmup-epochs 2",
                   "--blr 0.009", "--weight-decay 0.02", "--global-batch 64"):  # the paper's Alpaca recipe
        assert f" {option} " in trained["instruction"], option
    assert " --epochs 30 " in trained["scienceqa"]
    assert all(" --expect-gpus 0 " in cmd for cmd in trained.values())  # without --profile slurm: no GPU asked
    fetched = " ".join(job["shell"] for job in jobs(paper_dry_run, "fetch"))
    assert "--source hf:tatsu-lab/alpaca " in fetched and "--source hf:derek-thomas/ScienceQA " in fetched
    scored = {job["wildcards"]["experiment"]: job["shell"] for job in jobs(paper_dry_run, "evaluate")}
    assert all("--split val --mode generate" in scored[name] for name in ablations)
    assert "--split test --mode generate" in scored["scienceqa"]
    assert "--adapter" not in scored["scienceqa_zero_shot"] and "--adapter" not in scored["instruction_zero_shot"]
    assert "/adapters/scienceqa_lora/adapter_model.safetensors " in scored["scienceqa_lora"]
    assert f"--image-features {features}" in scored["scienceqa_mm"]
    lora_point = center.replace("method~adapter", "method~lora")  # scored on val with scienceqa_lora's training
    assert "/adapters/scienceqa_lora/adapter_model.safetensors " in scored[lora_point]
    assert "--split val" in scored[lora_point]
    assert "--adapter" not in scored[center.replace("method~adapter", "method~zero-shot")]
    # compile: true (train, evaluate): each compiling job keeps its compiled code in the results' shared cache; the
    # Alpaca evaluations decode nothing, so they compile nothing
    cache = f"--compile-cache {paper_tmp}/results/cache/compile"
    assert all(" --compile " in cmd and f" {cache} " in f"{cmd} " for cmd in trained.values())
    assert f" --compile {cache} " in scored["scienceqa"] and "--compile" not in scored["instruction"]
    assert not (paper_tmp / "results").exists()  # a dry run writes nothing


# --- the local GPU profile ------------------------------------------------------------------------------------

@needs_snakemake
def test_local_profile_gives_each_gpu_rule_one_gpu():
    out = snakemake("--profile", "local", "--configfile", "config/smollm2.yaml", "--forceall")
    for rule in ("train_adapter", "generate", "evaluate"):
        assert all(job["resources"]["gpu"] == "1" for job in jobs(out, rule)), rule
    assert all("--expect-gpus 1 " in job["shell"] and job["shell"].startswith("exec llama-adapter train ")
               for job in jobs(out, "train_adapter"))
    assert len(jobs(out, "fetch_smollm2")) == 1
    # The miniature protocol: real shared data, ScienceQA split by the seeded rule, no image experiment.
    fetched = {job["wildcards"]["dataset"]: job["shell"] for job in jobs(out, "fetch")}
    assert "--source ../shared/data/scienceqa/test_4241_llava_cqm.json " in fetched["scienceqa"]
    assert "--assign-splits train=0.45 val=0.05 test=0.5 --split-seed 0 " in fetched["scienceqa"]
    assert "--assign-splits" not in fetched["alpaca"]
    trained = {job["wildcards"]["experiment"] for job in jobs(out, "train_adapter")}
    assert "scienceqa_mm" not in trained and not jobs(out, "encode_images") and len(trained) == 11
    assert all("--split test " in job["shell"] for job in jobs(out, "evaluate")
               if not job["wildcards"]["experiment"].startswith("instruction"))
    [full] = [job for job in jobs(out, "evaluate") if job["wildcards"]["experiment"] == "scienceqa_full"]
    assert "/adapters/scienceqa_full/model " in full["shell"] and "--adapter" not in full["shell"]
    out = snakemake("--profile", "local", "--configfile", "config/smollm2.yaml", "--forceall",
                    "--resources", "gpu=2", "--set-resources", "train_adapter:gpu=2")
    assert all(job["shell"].startswith("exec env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun --standalone "
                                       "--nproc-per-node 2 -m llama_adapter.cli train ")
               for job in jobs(out, "train_adapter"))


# --- two nodes: config/llama2-70b-2x8.yaml through slurm/2x8 ------------------------------------------------

TWO_NODE_PROFILE = REPO / "slurm" / "2x8" / "config.yaml"
LAYOUT = {"nodes", "gpu", "tasks_per_node", "mpi", "mem_mb"}  # what the two-node profile changes for training


def test_two_node_profile_differs_from_slurm_only_in_the_training_layout():
    one, two = (yaml.safe_load(p.read_text()) for p in (SLURM_PROFILE, TWO_NODE_PROFILE))
    assert {k: v for k, v in one.items() if k != "set-resources"} == {
        k: v for k, v in two.items() if k != "set-resources"}
    for rule in RUNTIME:
        a, b = one["set-resources"][rule], two["set-resources"][rule]
        assert {k: v for k, v in a.items() if k not in LAYOUT} == {k: v for k, v in b.items() if k not in LAYOUT}
    assert {k: two["set-resources"]["train_adapter"][k] for k in LAYOUT} == {
        "nodes": 2, "gpu": 16, "tasks_per_node": 8, "mpi": "srun", "mem_mb": 1000000}


@pytest.fixture(scope="module")
def seventy_b_dry_run(tmp_path_factory) -> tuple[Path, str]:
    """config/llama2-70b-2x8.yaml pointed at a fake Hugging Face layout (a dry run checks it exists, and reads
    config.json for the base's layers)."""
    tmp = tmp_path_factory.mktemp("llama2-70b")
    base = tmp / "Llama-2-70b-hf"
    base.mkdir()
    for name in ("model-00001-of-00015.safetensors", "tokenizer.model"):
        (base / name).touch()
    (base / "config.json").write_text(json.dumps(hf_config(ModelArgs.from_name("Llama-2-70B"))))
    config = yaml.safe_load((REPO / "config" / "llama2-70b-2x8.yaml").read_text())
    config["base"]["source"], config["results"] = str(base), str(tmp / "results")
    config["train"]["lr"] = None  # the schema's null: the option left out, for TrainConfig's blr rule
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp, snakemake("--profile", "slurm/2x8", "--configfile", str(tmp / "config.yaml"))


@needs_snakemake
@needs_slurm_plugin
def test_seventy_b_config_trains_over_two_nodes(seventy_b_dry_run):
    """Each training: 2 nodes x 8 GPUs, FSDP2; the rule's srun starts a torchrun per node; the plugin asks SLURM
    for both nodes and all 16 GPUs."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    tmp, out = seventy_b_dry_run
    counts = job_counts(out)
    assert (counts["train_adapter"], counts["evaluate"], counts["generate"]) == (2, 5, 2)
    for job in jobs(out, "generate"):  # its own instructions, not the demo's made-up words merged from config.yaml
        assert "workflow/resources/paper_instructions.jsonl" in job["shell"] and "--max-new-tokens 512" in job["shell"]
    trained = {job["wildcards"]["experiment"]: job for job in jobs(out, "train_adapter")}
    assert set(trained) == {"instruction", "scienceqa"}  # the ablation center reuses scienceqa's training
    for job in trained.values():
        assert job["shell"].startswith(
            "exec srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task 64 --gres gpu:8 "
            "--kill-on-bad-exit=1 --label python -m llama_adapter.launch --nproc-per-node 8 -- train "), job["shell"]
        for option in ("--expect-gpus 8 --expect-world-size 16", "--fsdp", "--adapter-layers 30",
                       "--global-batch 64", "--rows-per-micro-batch 2"):
            assert f" {option} " in job["shell"], option
        assert " --lr " not in job["shell"]

    class Resources(dict):
        __getattr__ = dict.__getitem__

    printed = trained["instruction"]["resources"]
    job = SimpleNamespace(threads=1, resources=Resources(
        {k: int(v) if v.isdigit() else v for k, v in printed.items() if v != "<TBD>"}))
    params = {"run_uuid": "id", "slurm_logfile": "log", "comment_str": "rule_train_adapter", "account": "",
              "partition": "", "workdir": str(REPO)}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    for option in ("--nodes=2", "--gpus=a100:16", "--ntasks-per-node=8", "--cpus-per-gpu=8", "--mem 1000000"):
        assert f" {option} " in f"{sbatch} ", (option, sbatch)
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch
    assert not (tmp / "results").exists()


@needs_snakemake
def test_a_real_base_is_not_asked_the_demos_instructions(seventy_b_dry_run):
    """A config without a generate block of its own inherits config.yaml's, the demo's made-up instructions: with
    a base and data other than the demo's, the plan stops naming the key, rather than a real model answering
    them."""
    tmp, _ = seventy_b_dry_run
    config = yaml.safe_load((tmp / "config.yaml").read_text())
    del config["generate"]
    (tmp / "no-generate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                           str(tmp / "no-generate.yaml")], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "config generate.instructions: 'workflow/resources/demo_instructions.jsonl' is the demo's" in said


@needs_snakemake
def test_several_nodes_need_the_mpi_resource_and_an_even_split():
    base = ["--configfile", "config.yaml", "--forceall", "results/adapters/scienceqa/metrics.json"]
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead}
    for resources, message in ((["train_adapter:nodes=2"], "needs the resource mpi=srun"),
                               (["train_adapter:nodes=2", "train_adapter:gpu=3", "train_adapter:mpi=srun"],
                                "must split evenly")):
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", *base, "--set-resources", *resources],
                              cwd=REPO, env=env, text=True, capture_output=True, timeout=180)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
