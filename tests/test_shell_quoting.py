"""Config values reach the rules' shell commands quoted (Snakemake's `:q`): a space or a quote in a path is one
argument, and a value holding `;`, `$(...)` or backticks is never run as a command (issue 16).

Every rule's quoting is also exercised for real by the one full demo run (conftest.py's demo_run), whose results
folder is dag.DEMO_RESULTS, a name with a space and a quote.
"""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from dag import REPO, SNAKEMAKE, snakemake, snakemake_command, snakemake_env

# A space and both kinds of quote: unquoted, `'` ends a quoted word early and a space splits one argument in two.
AWKWARD = "it's a \"dir\""
ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(12)]


@pytest.fixture(autouse=True)
def needs_snakemake():
    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")


def configfile(tmp_path: Path, **overrides) -> list[str]:
    """--configfile arguments: the shipped config.yaml, then `overrides` merged over it key by key."""
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(overrides))
    return ["--configfile", str(REPO / "config.yaml"), str(tmp_path / "override.yaml")]


def test_results_and_source_with_space_and_quote_run(tmp_path):
    source = tmp_path / f"source {AWKWARD}" / "alpaca.json"
    source.parent.mkdir()
    source.write_text(json.dumps(ALPACA))
    results = f"results {AWKWARD}"
    target = f"{results}/data/alpaca/validated"
    proc = snakemake("--cores", "1", target, *configfile(tmp_path, results=results, data={"alpaca": {
        "source": str(source)}}), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    validated = tmp_path / target
    assert len((validated / "records.jsonl").read_text().splitlines()) == len(ALPACA)
    fetched = json.loads((tmp_path / results / "data" / "alpaca" / "fetched" / "fetch.json").read_text())
    assert fetched["source"] == str(source)  # the source path arrived whole, as one argument
    # the MLflow store of the invocation's parent run is in the results folder, not in a folder named by half of it
    assert (tmp_path / results / "mlflow.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["override.yaml", ".snakemake", results,
                                                                 source.parent.name])


INJECTIONS = [
    ("source", "missing.json; touch PWNED #"),
    ("source", "missing.json $(touch PWNED)"),
    ("source", "missing.json `touch PWNED`"),
    ("source", "missing.json | touch PWNED #"),
    ("source", "missing.json\ntouch PWNED #"),
    ("revision", "main; touch PWNED #"),
    ("revision", "$(touch PWNED)"),
]


# Two values per snakemake run, one in each dataset's fetch (each fails on its own, --keep-going runs both): half
# the runs for the same values.
INJECTION_RUNS = [INJECTIONS[i: i + 2] for i in range(0, len(INJECTIONS), 2)]


@pytest.mark.parametrize("injections", INJECTION_RUNS, ids=lambda run: " & ".join(f"{k}={v!r}" for k, v in run))
def test_a_data_value_is_never_run_as_a_command(tmp_path, injections):
    data = {dataset: {"source": value} if key == "source" else {"source": "missing.json", key: value}
            for dataset, (key, value) in zip(("alpaca", "scienceqa"), injections)}
    proc = snakemake("--cores", "1", "--keep-going", *(f"results/data/{d}/fetched" for d in data),
                     *configfile(tmp_path, data=data), cwd=tmp_path, timeout=300)
    assert not (tmp_path / "PWNED").exists(), f"a config value ran as a shell command: one of {injections}"
    assert proc.returncode != 0  # the fetch stage's own errors: the sources do not exist
    for dataset in data:
        assert "missing.json" in (tmp_path / "results" / "logs" / "fetch" / f"{dataset}.log").read_text(), dataset


def test_dry_run_commands_parse_back_to_the_config_values(tmp_path):
    """Every planned job's command, split as the shell splits it, holds each value as exactly one argument."""
    results = f"out {AWKWARD}; touch PWNED"
    revision = "v1 $(touch PWNED) `touch PWNED`"
    proc = snakemake("-n", "-p", "--cores", "1", *configfile(tmp_path, results=results, data={
        "alpaca": {"source": f"{tmp_path}/a {AWKWARD}.json", "revision": revision}}), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [line.removeprefix("Shell command: ") for line in proc.stdout.splitlines()
                if line.startswith("Shell command: ") and line != "Shell command: None"]
    assert len(commands) > 10
    for command in commands:
        argv = shlex.split(command)
        assert "touch" not in argv and "PWNED" not in argv, command
        # every job reads or writes under the results folder, named as one argument
        assert any(a.startswith(results) for a in argv), command
    [fetch] = [shlex.split(c) for c in commands if " fetch --dataset alpaca " in c]
    assert fetch[fetch.index("--source") + 1] == f"{tmp_path}/a {AWKWARD}.json"
    assert fetch[fetch.index("--revision") + 1] == revision
    [report] = [shlex.split(c) for c in commands if c.startswith("llama-adapter report ")]
    assert json.loads(report[report.index("--center") + 1]) == {"adapter_layers": 3, "gate_init": "zero", "epochs": 3,
                                                                "method": "adapter"}
    assert json.loads(report[report.index("--vary") + 1])["method"] == ["adapter", "lora", "full", "zero-shot"]
    # The report is told each file by role as NAME=PATH: every row has its scores, and the ablation center, with
    # the named ScienceQA experiment's settings, reads that experiment's training.
    roles = {}
    for flag, value in zip(report, report[1:]):
        if flag in ("--scores", "--training", "--generations", "--tokens"):
            name, _, path = value.partition("=")
            assert path.startswith(results), value
            roles.setdefault(flag, {})[name] = path
    rows = [v for f, v in zip(report, report[1:]) if f in ("--experiment", "--ablation")]
    assert sorted(roles["--scores"]) == sorted(rows) and set(roles["--tokens"]) == {"alpaca", "scienceqa"}
    center = "ablations/adapter_layers~3/gate_init~zero/epochs~3/method~adapter"
    assert roles["--training"][center] == roles["--training"]["scienceqa"] == f"{results}/adapters/scienceqa"
    assert not any("zero-shot" in name or "zero_shot" in name for name in roles["--training"])
    # The trainings' benchmark files, named before they are written: optional, a missing one no error
    assert "--optional-train-benchmark" in report and "--train-benchmark" not in report
    trains = [shlex.split(c) for c in commands if c.startswith("exec llama-adapter train ")]
    tags = [dict(t[i + 1].split("=", 1) for i, a in enumerate(t) if a == "--tag") for t in trains]
    assert {t["experiment"] for t in tags} >= {"instruction", "scienceqa"}
    assert all(t["rule"] == "train_adapter" for t in tags)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"experiments": {"x; touch PWNED": {"dataset": "alpaca"}}}, "x; touch PWNED"),
    ({"experiments": {"../escape": {"dataset": "alpaca"}}}, "../escape"),
    ({"results": "-rf"}, "results"),
    ({"results": "out{x}"}, "results"),
    ({"results": "out$(touch PWNED)"}, "results"),  # the SLURM executor's sbatch --wrap="..." would run it
    ({"base": {"source": "--help"}}, "base.source"),
])
def test_values_quoting_cannot_make_safe_are_refused_by_name(tmp_path, overrides, named):
    proc = snakemake("-n", "--cores", "1", *configfile(tmp_path, **overrides), cwd=tmp_path)
    assert proc.returncode != 0
    assert named in proc.stdout + proc.stderr
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["plain", "a space", "it's", "semi;colon", "hash#x", "pct%20x", "tick`x`"])
def test_sqlite_uri_names_the_file_mlflow_writes(tmp_path, name):
    """The default store `sqlite:///<results>/mlflow.db` for a results folder with any character in its name:
    SQLAlchemy does not percent-decode, and a `?` would start its query."""
    import mlflow

    from llama_adapter.tracking import sqlite_path, sqlite_uri

    db = tmp_path / name / "mlflow.db"
    db.parent.mkdir()
    uri = sqlite_uri(db)
    assert sqlite_path(uri) == db
    client = mlflow.MlflowClient(uri)
    client.create_run(client.create_experiment("e", artifact_location=(db.parent / "mlartifacts").as_uri()))
    assert db.is_file() and [p.name for p in tmp_path.iterdir()] == [name]


def test_sqlite_uri_refuses_a_question_mark(tmp_path):
    from llama_adapter.tracking import sqlite_uri

    with pytest.raises(ValueError, match=r"holds '\?'"):
        sqlite_uri(tmp_path / "ques?tion" / "mlflow.db")


def test_a_question_mark_in_results_needs_another_mlflow_store(tmp_path):
    """The default store, a SQLite file in the results folder, cannot be named by a sqlite:/// URI through a '?':
    refused by name at plan time, unless MLflow's store is named elsewhere (the config or the environment,
    which wins)."""
    args = ("-n", "--cores", "1", *configfile(tmp_path, results="res?x"))
    proc = snakemake(*args, cwd=tmp_path)
    assert proc.returncode != 0 and "holds '?'" in proc.stdout + proc.stderr
    env = snakemake_env() | {"MLFLOW_TRACKING_URI": (tmp_path / "store").as_uri()}
    proc = subprocess.run(snakemake_command(*args, cwd=tmp_path), capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.glob("res?x/mlflow.db"))
