# Config validation, the experiment list (named experiments + the ablation grid), path helpers.

from pathlib import Path

import pandas as pd
from snakemake.utils import Paramspace, validate

validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results"]
DEMO = config["base"]["source"] == "demo"
BASE = f"{RESULTS}/models/demo-base" if DEMO else config["base"]["source"]
TOKENIZER = (
    f"{RESULTS}/models/demo-tokenizer.model"
    if DEMO
    else (config["base"]["tokenizer"] or BASE)
)


def ablation_points(ablations):
    """The center, and each listed value of each axis with the other axes at the center."""
    center = ablations["center"]
    points = [dict(center)]
    for axis, values in ablations["vary"].items():
        points += [{**center, axis: v} for v in values]
    return pd.DataFrame(points).drop_duplicates().reset_index(drop=True)


# One folder level per parameter: ablations/adapter_layers~4/gate_init~zero/epochs~5
ABLATIONS = Paramspace(ablation_points(config["ablations"]), param_sep="~")
ABLATION_SETTINGS = {
    f"ablations/{name}": row
    for name, row in zip(
        ABLATIONS.instance_patterns, ABLATIONS.dataframe.to_dict("records")
    )
}
ABLATION_EXPERIMENTS = list(ABLATION_SETTINGS)
EXPERIMENTS = list(config["experiments"]) + ABLATION_EXPERIMENTS


def experiment(name):
    """Dataset and training settings of an experiment: the train defaults, overridden by the experiment."""
    if name in config["experiments"]:
        spec = config["experiments"][name]
        return spec["dataset"], {**config["train"], **spec.get("train", {})}
    return config["ablations"]["dataset"], {
        **config["train"],
        **ABLATION_SETTINGS[name],
    }


INSTRUCTION_EXPERIMENTS = [e for e in EXPERIMENTS if experiment(e)[0] == "alpaca"]


def repository_file(path):
    """A path from the config: as given if it exists from the working directory, else inside the repository
    (files the workflow ships, such as workflow/resources/)."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else Path(workflow.basedir) / p)


INSTRUCTIONS = repository_file(config["generate"]["instructions"])


def cli_options(settings):
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())


def data_source(dataset):
    source = config["data"][dataset]["source"]
    if source != "demo":
        return source
    return (
        f"{RESULTS}/demo/alpaca.json"
        if dataset == "alpaca"
        else f"{RESULTS}/demo/scienceqa"
    )


def evaluation_data(w):
    dataset = experiment(w.experiment)[0]
    if dataset == "scienceqa":
        return f"{RESULTS}/data/scienceqa/validated"
    return f"{RESULTS}/tokens/alpaca"
