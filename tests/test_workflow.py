"""The Snakemake layer: the DAG resolves from config.yaml, and a bad config key is refused by the schema."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args, cwd=REPO):
    # The rules call `llama-adapter`, which lives beside this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd), *args],
                          capture_output=True, text=True, timeout=300, env=env)


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
    assert "results/adapters/ablations/adapter_layers~1/gate_init~zero/epochs~5/adapter.safetensors" in proc.stdout
    assert "results/adapters/ablations/adapter_layers~4/gate_init~random/epochs~5/adapter.safetensors" in proc.stdout


def test_bad_config_key_is_named(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["train"]["gate_innit"] = "zero"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "gate_innit" in proc.stdout + proc.stderr


def test_environment_yml_mirrors_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["workflow"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) - {"-e ."} == wanted
    assert f"python{project['requires-python']}" in env["dependencies"]
