"""The report's pieces: the paper's numbers and our rows side by side, provenance on every row of ours,
escaping in Markdown and LaTeX, and the ablation axes picked from a grid."""

import copy
import io
import json
import math
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.errors import InputError
from llama_adapter.report import (
    PAPER_LAYERS,
    UNPAIRED,
    UNPAIRED_WHY,
    ReportInputs,
    Run,
    _checked_scores,
    ablation_axis,
    ablation_table,
    ablation_table_name,
    adapter_parameters,
    efficiency_table,
    instruction_table,
    jobs_table,
    load_run,
    mcnemar_p,
    megabytes,
    method_verdict,
    millions,
    p_cell,
    paper_pairs,
    point_settings,
    protocol_notes,
    readable_parts,
    report_tables,
    scienceqa_table,
    to_latex,
    to_markdown,
    trends_table,
)

UNPAIRED_POINT = f"not paired with the center one by one {UNPAIRED_WHY}"  # how an ablation's verdict says it
CATEGORY_ACC = {c: {"accuracy": 50.0, "n": 10} for c in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")}


def run(name: str, layers=4, gate="zero", epochs=5, loss=(1.0, 0.5), acc=60.0, method="adapter") -> Run:
    history = [{"step": i + 1, "epoch": (i + 1) * epochs / len(loss), "loss": v, "gate/layer_02": 0.1 * i,
                "gate/layer_03": 0.2 * i} for i, v in enumerate(loss)]
    return Run(name=name, dataset="scienceqa",
               config={"adapter_layers": layers, "gate_init": gate, "epochs": epochs, "method": method,
                       "base": "results/models/demo-base"},
               metrics={"trainable_parameters": layers * 1284, "world_size": 1, "device": "cpu", "history": history,
                        "val_loss": [0.9, 0.7], "mlflow_run_id": f"run-{name}",
                        "tags": {"config_hash": "abc123", "git_commit": "0123456789abcdef"}},
               scores={"accuracy": acc, "n": 80, "split": "val", "chance": 40.0, "categories": CATEGORY_ACC,
                       "mlflow_run_id": f"eval-{name}"},
               adapter_bytes=21_000, seconds=42.0, data={"records_sha256": "e" * 64},
               trained_on={"records_sha256": "f" * 64})


def point(layers, gate, epochs, method="adapter") -> Run:
    name = f"ablations/adapter_layers~{layers}/gate_init~{gate}/epochs~{epochs}/method~{method}"
    r = run(name, layers, gate, epochs, method=method)
    r.point = point_settings(name)
    return r


CENTER = {"adapter_layers": 4, "gate_init": "zero", "epochs": 5, "method": "adapter"}


@pytest.fixture
def grid() -> list[Run]:
    points = [(4, "zero", 5), (1, "zero", 5), (2, "zero", 5), (4, "random", 5), (4, "zero", 3), (4, "zero", 8),
              (4, "zero", 5, "lora")]
    return [point(*p) for p in points]


def test_a_zero_shot_row_names_the_config_hash_and_commit_of_its_evaluation():
    """A zero-shot row has no training whose metrics.json holds the config hash and commit: they come from its
    evaluation's scores.json, so that every row of ours names them (README: "Reading the report")."""
    trained = run("scienceqa")
    zero_shot = run("scienceqa_zero_shot", acc=45.0)
    zero_shot.config, zero_shot.metrics = {"base": "b", "method": "zero-shot"}, {}
    zero_shot.scores["tags"] = {"config_hash": "abc123", "git_commit": "fedcba9876543210"}
    df = scienceqa_table([trained, zero_shot]).set_index("experiment")
    assert df.loc["scienceqa_zero_shot", "config_hash"] == "abc123"
    assert df.loc["scienceqa_zero_shot", "git_commit"] == "fedcba987654"
    assert df.loc["scienceqa", "git_commit"] == "0123456789ab"  # a trained row keeps its training's


def test_a_trained_row_without_its_trainings_tags_does_not_take_its_evaluations():
    """A training's metrics.json of an older version holds no tags: its row shows none, rather than its
    evaluation's config hash and commit passed off as the training's."""
    older = run("scienceqa")
    del older.metrics["tags"]
    older.scores["tags"] = {"config_hash": "abc123", "git_commit": "fedcba9876543210"}
    row = scienceqa_table([older]).set_index("experiment").loc["scienceqa"]
    assert (row["config_hash"], row["git_commit"]) == (None, None)  # n/a in the written tables


def test_scores_tags_of_another_kind_are_refused_by_key(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({**SCIENCEQA_SCORES, "tags": "abc"}))
    with pytest.raises(InputError, match=r"scores.json: key tags holds 'abc'; expected an object"):
        _checked_scores(path, json.loads(path.read_text()))


def test_adapter_parameters_at_7b_match_the_paper():
    n = adapter_parameters(ModelArgs.from_name("7B"), AdapterArgs(10, 30))
    assert n == 1_229_760 and millions(n) == 1.22976 and megabytes(4 * n) == 4.91904


def test_ablation_axes_hold_the_center_in_the_listed_order(grid):
    def axis(name, values):
        return [r.axis_value(name) for r in ablation_axis(grid, name, CENTER, values)]

    assert axis("adapter_layers", [1, 2, 4]) == [1, 2, 4]
    assert axis("adapter_layers", [4, 1]) == [4, 1]  # the config's order, not sorted
    assert axis("gate_init", ["zero", "random"]) == ["zero", "random"]
    assert axis("epochs", [3, 5, 8]) == [3, 5, 8]
    assert axis("method", ["lora", "adapter"]) == ["lora", "adapter"]
    with pytest.raises(InputError, match=r"no --ablation point sets epochs to \[13\]"):
        axis("epochs", [3, 13])


def test_a_value_listed_twice_on_an_axis_is_refused_not_shown_twice():
    """[1, 4, 4] found the point of 4 twice: three "points" of two settings, which the trend called a rise beyond
    noise (a line through two settings is their difference); [4, 4, 4] gave a slope of 0/0 (NaN), said to be "no
    trend beyond noise". 1 and 1.0 set the same point too."""
    runs = layer_axis({1: range(0, 20), 4: range(0, 56)})
    for values, repeated in (([1, 4, 4], "[4, 4]"), ([4, 4, 4], "[4, 4, 4]"), ([1, 1.0, 4], "[1, 1.0]")):
        with pytest.raises(InputError, match=re.escape(f"--vary adapter_layers: values {repeated} all name the grid "
                                                       "point ablations/adapter_layers~")):
            ablation_axis(runs, "adapter_layers", CENTER, values)


@pytest.mark.parametrize(("center", "vary"), [
    ({"blr": 0.01, "method": "adapter"}, {"blr": [1, 0.01]}),  # a column of floats: the point is named blr~1.0
    ({"lr": None, "epochs": 5, "method": "adapter"}, {"epochs": [3, 5]}),  # a null center: lr~NA
])
def test_the_points_the_workflow_names_are_found(center, vary):
    """The workflow names the grid's folders with Snakemake's Paramspace over a pandas frame of the points (common.smk:
    ablation_points), which writes 1 as 1.0 in a column of floats and a null as NA: the report finds each point by
    its value, not by str() of the config's."""
    paramspace = pytest.importorskip("snakemake.utils").Paramspace
    points = [dict(center)] + [{**center, axis: v} for axis, values in vary.items() for v in values]
    space = paramspace(pd.DataFrame(points).drop_duplicates().reset_index(drop=True), param_sep="~")
    runs = []
    for name in space.instance_patterns:
        runs.append(answered(run(f"ablations/{name}"), range(40)))
        runs[-1].point = point_settings(runs[-1].name)
    for axis, values in vary.items():
        found = ablation_axis(runs, axis, center, values)
        assert [r.axis_value(axis) for r in found] == values
        paired = ablation_table(found, axis, center[axis])["paired_with"]  # with the point at the center's value
        assert paired.iloc[0] == found[1].name and pd.isna(paired.iloc[1])


def test_grid_point_names_are_parsed_or_refused():
    assert point_settings("ablations/adapter_layers~4/method~zero-shot") == {"adapter_layers": "4",
                                                                            "method": "zero-shot"}
    with pytest.raises(InputError, match="ablations/KEY~VALUE"):
        point_settings("scienceqa")


def test_paper_paired_by_rank_only_when_counts_match(grid):
    layers = ablation_table(ablation_axis(grid, "adapter_layers", CENTER, [1, 2, 4]), "adapter_layers", 4)
    assert list(layers["adapter_layers_paper"]) == ["10 of 32", "20 of 32", "30 of 32"]
    assert list(layers["accuracy_paper"]) == [p[2] for p in PAPER_LAYERS]
    assert list(layers["tuned_params_m"]) == [0.001284, 0.002568, 0.005136]  # millions, as the paper's column
    assert list(layers["tuned_params_m_paper"]) == [0.97, 1.37, 1.79]
    gates = ablation_table(ablation_axis(grid, "gate_init", CENTER, ["zero", "random"]), "gate_init", "zero")
    assert list(gates["accuracy_paper"]) == [83.85, 40.77]  # the tables' shared row: the paper's +43.08
    epochs = ablation_table(ablation_axis(grid, "epochs", CENTER, [3, 5, 8]), "epochs", 5)
    assert list(epochs["val_loss_paper"]) == [0.136, 0.241, 0.282]
    assert epochs["train_loss"].iloc[0] == pytest.approx(0.5)  # the last epoch's steps only
    # by rank of the setting, whatever order the config lists them in
    listed = ablation_table(ablation_axis(grid, "epochs", CENTER, [8, 3, 5]), "epochs", 5)
    assert list(listed["epochs_paper"]) == [60, 15, 30] and list(listed["val_loss_paper"]) == [0.282, 0.136, 0.241]
    assert paper_pairs([30, 10, 20], PAPER_LAYERS) == [PAPER_LAYERS[2], PAPER_LAYERS[0], PAPER_LAYERS[1]]


def test_an_axis_of_another_count_than_the_papers_keeps_its_paper_columns_paired_by_value(grid):
    """Every paper ablation table's *_paper columns vanished unless the axis had exactly the paper's number of
    values (README's own `vary: {epochs: [2, 4]}` lost them). An axis of another count keeps them: a setting the
    paper measured stands beside the paper's row of that value, any other beside n/a."""
    assert paper_pairs([1, 2], PAPER_LAYERS) == [None, None]
    assert paper_pairs([30, 1], PAPER_LAYERS) == [PAPER_LAYERS[2], None]  # equal value only
    assert paper_pairs([30.0, 10], PAPER_LAYERS) == [PAPER_LAYERS[2], PAPER_LAYERS[0]]  # 30.0 is 30
    layers = ablation_table(ablation_axis(grid, "adapter_layers", CENTER, [1, 4]), "adapter_layers", 4)
    for column in ("adapter_layers_paper", "tuned_params_m_paper", "accuracy_paper"):
        assert column in layers and layers[column].isna().all(), column
    thirty = [point(30, "zero", 5), point(4, "zero", 5)]
    layers = ablation_table(ablation_axis(thirty, "adapter_layers", CENTER, [4, 30]), "adapter_layers", 4)
    assert list(layers["adapter_layers_paper"].fillna("n/a")) == ["n/a", "30 of 32"]
    assert list(layers["accuracy_paper"].fillna(-1)) == [-1, 83.85]
    two_epochs = [point(4, "zero", 15), point(4, "zero", 5)]
    epochs = ablation_table(ablation_axis(two_epochs, "epochs", CENTER, [5, 15]), "epochs", 5)
    for column in ("epochs_paper", "train_loss_paper", "val_loss_paper", "accuracy_paper"):
        assert column in epochs, column
    assert list(epochs["epochs_paper"].fillna(-1)) == [-1, 15] and list(epochs["accuracy_paper"].fillna(-1)) == [
        -1, 82.08]
    # the equal count still pairs by rank (ours: the paper's settings scaled to another model)
    assert list(ablation_table(ablation_axis(grid, "epochs", CENTER, [3, 5, 8]), "epochs", 5)["epochs_paper"]) == [
        15, 30, 60]


def test_every_ablation_row_has_its_interval_and_method(grid):
    methods = ablation_table(ablation_axis(grid, "method", CENTER, ["adapter", "lora"]), "method", "adapter")
    assert list(methods["method"]) == ["LLaMA-Adapter", "LoRA"]
    assert list(methods["ci95_low"]) == [49.05, 49.05] and list(methods["ci95_high"]) == [70.04, 70.04]
    zero_shot = point(4, "zero", 5, "zero-shot")
    zero_shot.config, zero_shot.metrics = {"base": "b", "method": "zero-shot"}, {}
    row = ablation_table([zero_shot], "method", "adapter").iloc[0]
    assert row["method"] == "zero-shot base" and row["tuned_params_m"] is None and row["train_loss"] is None
    assert row["accuracy"] == 60.0 and row["ci95_low"] == 49.05


def test_the_tables_follow_the_varied_axes():
    assert list(report_tables(["method", "adapter_len"])) == [
        "efficiency", "instruction", "scienceqa", "ablation_method", "ablation_adapter_len", "ablation_trends",
        "generations", "jobs"]
    assert "insertion_layers" in report_tables(["adapter_layers"])


def test_every_row_of_ours_names_its_runs(grid):
    for df in (ablation_table(grid[:3], "adapter_layers", 4), ablation_table(grid[:2], "gate_init", "zero"),
               scienceqa_table(grid[:1])):
        assert (df["mlflow_run"].str.startswith("run-")).all() and (df["eval_run"].str.startswith("eval-")).all()
        assert (df["config_hash"] == "abc123").all() and (df["git_commit"] == "0123456789ab").all()
        assert (df["data_sha256"] == "f" * 12).all()


def test_efficiency_rows(grid):
    lora = run("scienceqa_lora")
    lora.config["method"], lora.metrics["trainable_parameters"] = "lora", 24_576
    zero_shot = Run(name="zs", dataset="scienceqa", config={"base": "b", "method": "zero-shot"}, metrics={},
                    scores={}, adapter_bytes=None, seconds=None, data={})
    df = efficiency_table([grid[0], lora, zero_shot]).set_index(["method", "model"])
    computed = "LLaMA-7B shapes (computed; fp32 file)"
    # One unit per column, ours and the paper's alike: millions of parameters, MB, hours.
    assert df.loc[("LLaMA-Adapter", computed), "tuned_params_m_paper"] == 1.2
    assert df.loc[("LoRA", computed), "tuned_params_m"] == 4.194304  # the paper's 4.2M, counted
    assert df.loc[("LoRA", computed), "storage_mb_paper"] == 16.8
    full = df.loc[("full fine-tuning", "Alpaca (full fine-tuning)")]
    assert (full["tuned_params_m_paper"], full["storage_mb_paper"], full["training_h_paper"]) == (7000, 13000, 3)
    ours = df.loc[("LLaMA-Adapter", f"{grid[0].name} (base demo-base)")]
    assert ours["tuned_params_m"] == 0.005136 and ours["storage_mb"] == 0.021 and ours["training_h"] == 0.0117
    assert ours["mlflow_run"] == f"run-{grid[0].name}"
    theirs = df.loc[("LoRA", "scienceqa_lora (base demo-base)")]
    assert theirs["tuned_params_m"] == 0.024576 and theirs["tuned_params_m_paper"] == 4.2
    assert pd.isna(df.loc[("full fine-tuning", "Alpaca (full fine-tuning)"), "mlflow_run"])
    assert "zero-shot base" not in df.index.get_level_values("method")  # nothing trained, nothing to count


def test_wilson_interval_at_known_values():
    from llama_adapter.report import wilson_interval

    assert wilson_interval(50, 100) == (40.38, 59.62)  # textbook value for 50/100
    assert wilson_interval(0, 10) == (0.0, 27.75) and wilson_interval(10, 10) == (72.25, 100.0)
    assert wilson_interval(0, 0) == (None, None)


def test_wilson_interval_uses_the_exact_95_percent_normal_quantile():
    """z = 1.959964 (scipy.stats.norm.ppf(0.975)), as scipy's binomtest(...).proportion_ci("wilson") and
    statsmodels' proportion_confint(method="wilson") use: z = 1.96 gave 0 of 9 an upper bound of 29.92 (the
    references: 29.9145, 29.91) and 8 of 17 a lower bound of 26.16 (26.1651, 26.17). The module writes z out (its
    import leaves scipy alone): scipy's to the last bit."""
    import scipy.stats

    from llama_adapter.report import Z95, wilson_interval

    assert Z95 == scipy.stats.norm.ppf(0.975)

    assert wilson_interval(0, 9) == (0.0, 29.91) and wilson_interval(9, 9) == (70.09, 100.0)
    assert wilson_interval(8, 17) == (26.17, 69.04) and wilson_interval(4, 9) == (18.88, 73.33)
    assert wilson_interval(0, 1) == (0.0, 79.35) and wilson_interval(1, 1) == (20.65, 100.0)


def test_scienceqa_rows_per_method_with_intervals_and_floor(grid):
    zero_shot = run("scienceqa_zero_shot", acc=45.0)
    zero_shot.config = {"base": "b", "method": "zero-shot"}
    grid[0].scores["unparsed"], zero_shot.scores["unparsed"] = 3, 1995
    for r in (grid[0], zero_shot):
        r.scores["floor"] = {"position": 0, "letter": "A", "correct": 36, "n": 80, "accuracy": 45.0}
    df = scienceqa_table([grid[0], zero_shot]).set_index("experiment")
    assert df.loc[grid[0].name, "ci95_low"] == 49.05 and df.loc[grid[0].name, "ci95_high"] == 70.04
    assert to_markdown(df[["unparsed"]]).split("\n")[2:5] == ["| 3 |", "| 1995 |", "| n/a |"]  # counts, not 3.00
    assert df.loc["scienceqa_zero_shot", "method"] == "zero-shot base"
    assert pd.isna(df.loc["scienceqa_zero_shot", "paper_model"])  # the paper reports no zero-shot row
    floor = df.loc["no model: always (A)"]
    assert floor["method"] == "floor" and floor["accuracy"] == 45.0 and floor["questions"] == 80
    assert len(df) == 3  # one floor row per split, not per run


def test_rows_of_one_split_with_other_floors_show_each_floor():
    """Two rows of one split scored on other questions (other digests) whose floors differ: each floor is a row,
    naming the rows it is of, not the last read standing for both (the other dropped without a word)."""
    a = answered(run("a"), range(0, 48))
    b = answered(run("b", method="lora"), range(0, 40), questions="x" * 64)  # above its floor, not above a's
    a.scores["floor"] = {"position": 0, "letter": "A", "correct": 36, "n": 80, "accuracy": 45.0}
    b.scores["floor"] = {"position": 1, "letter": "B", "correct": 20, "n": 80, "accuracy": 25.0}
    floors = scienceqa_table([a, b]).query("method == 'floor'")
    assert list(floors["experiment"]) == ["no model: always (A), the questions of a",
                                          "no model: always (B), the questions of b"]
    assert list(floors["accuracy"]) == [45.0, 25.0] and list(floors["split"]) == ["val", "val"]
    # The verdict reads each row against its own floor (the rows carry it as floor_row), one sentence a floor.
    table = scienceqa_table([a, b])
    assert dict(zip(table["experiment"], table["floor_row"]))["b"] == "no model: always (B), the questions of b"
    verdict = method_verdict(table)
    assert ("Against answering without a model (always (A), the questions of a: 45.00 [34.58, 55.88] on the val "
            "questions), by the intervals only (the floor keeps no answers one by one to pair): overlapping it: "
            "LLaMA-Adapter (a) 60.00 [") in verdict, verdict
    assert ("Against answering without a model (always (B), the questions of b: 25.00 [16.81, 35.48] on the val "
            "questions), by the intervals only (the floor keeps no answers one by one to pair): above it: LoRA (b) "
            "50.00 [39.30, 60.70].") in verdict, verdict
    # Floors of two splits that answer the same letter share a name: each split's rows are read against their own.
    b.scores["floor"] = {"position": 0, "letter": "A", "correct": 20, "n": 80, "accuracy": 25.0}
    b.scores["split"] = "test"
    verdict = method_verdict(scienceqa_table([a, b]))
    assert verdict.count("LoRA (b)") == 1 and verdict.count("LLaMA-Adapter (a)") == 1, verdict
    assert "on the test questions), by the intervals only (the floor keeps no answers one by one to pair): above it: " \
           "LoRA (b)" in verdict, verdict


def answered(r: Run, right: range, questions: str = "q" * 64) -> Run:
    """`r` as evaluate scores it now: 80 questions, those numbered in `right` answered right."""
    r.scores |= {"questions_sha256": questions, "correct_pids": sorted(str(i) for i in right), "correct": len(right),
                 "accuracy": 100 * len(right) / 80}
    return r


def test_mcnemar_exact_p_at_known_values():
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10) == 2 / 2**10  # every discordant question one way
    assert mcnemar_p(1, 6) == 2 * (1 + 7) / 2**7  # 0.125: six of seven one way is not beyond chance
    assert mcnemar_p(5, 5) == mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(40, 20) == pytest.approx(0.0134893, abs=1e-7)  # scipy.stats.binomtest(20, 60).pvalue
    exact = 2 * sum(math.comb(5000, k) for k in range(2401)) / 2**5000  # summed term by term, as defined
    assert mcnemar_p(2400, 2600) == exact == pytest.approx(0.00488, abs=1e-5)


def test_methods_are_paired_question_by_question_with_the_adapter(grid):
    """Each row is compared with the first LLaMA-Adapter row on the very same questions: the questions only
    each answered right and McNemar's p, which tell a real difference from noise where intervals overlap; a row
    of other questions, or a scores.json without the questions it got right, is left n/a, not paired wrongly."""
    adapter = answered(grid[0], range(0, 48))  # 48 right
    lora = answered(run("scienceqa_lora", method="lora"), range(10, 52))  # 42 right: 4 of the adapter's lost ones
    other = answered(run("other_split"), range(0, 30), questions="x" * 64)
    old = run("written_before")  # no correct_pids
    df = scienceqa_table([adapter, lora, other, old]).set_index("experiment")
    assert pd.isna(df.loc[adapter.name, "paired_with"])  # the reference itself
    row = df.loc["scienceqa_lora"]
    assert row["paired_with"] == adapter.name
    assert (row["only_this_right"], row["only_paired_right"]) == (4, 10)
    assert row["p_paired"] == pytest.approx(mcnemar_p(4, 10))
    assert pd.isna(df.loc["other_split", "paired_with"]) and pd.isna(df.loc["written_before", "p_paired"])
    paired = dict(readable_parts(df.reset_index()))["Paired with another row, question by question"]
    assert list(paired["experiment"]) == ["scienceqa_lora"] and "p_paired" not in dict(readable_parts(df))[None]
    # The reference is a pairable text-only adapter row: not a stale one listed first, nor the multimodal one.
    multimodal = answered(run("scienceqa_mm"), range(0, 60))
    multimodal.config["image_features"] = "features"
    df = scienceqa_table([old, multimodal, adapter, lora]).set_index("experiment")
    assert set(df["paired_with"].dropna()) == {adapter.name} and pd.isna(df.loc[adapter.name, "paired_with"])
    assert df.loc["scienceqa_mm", "only_this_right"] == 12


def test_each_method_table_says_in_words_what_its_paired_tests_and_the_floor_show(grid):
    """The per-method tables get a verdict as the ablations do: each row against the LLaMA-Adapter row question by
    question (beyond chance or not), a row of other questions by its interval only, and on ScienceQA each row
    against the no-model floor by the intervals (the floor keeps no answers to pair); report.md puts it under the
    table's heading."""
    from llama_adapter.report import report_markdown

    adapter = answered(grid[0], range(0, 48))  # 48 of 80 right
    adapter.name = "scienceqa"
    lora = answered(run("scienceqa_lora", method="lora"), range(10, 52))  # 4 only it, 10 only the adapter right
    full = answered(run("scienceqa_full", method="full"), range(0, 80))  # every question: 32 only it
    other = answered(run("other_split"), range(0, 20), questions="x" * 64)  # other questions: 25.00
    floor = {"letter": "A", "correct": 40, "n": 80, "accuracy": 50.0}
    for r in (adapter, lora, full, other):
        r.scores["floor"] = floor
    table = scienceqa_table([adapter, lora, full, other])
    verdict = method_verdict(table)
    assert verdict.startswith(
        "Against the LLaMA-Adapter row (LLaMA-Adapter (scienceqa): 60.00), question by question: LoRA "
        f"(scienceqa_lora): 52.50, p = {p_cell(mcnemar_p(4, 10))}, no difference this data shows; full fine-tuning "
        f"(scienceqa_full): 100.00, p = {p_cell(mcnemar_p(32, 0))}, higher beyond chance. Each p stands alone (no "
        "correction for the 2 comparisons). The row LLaMA-Adapter (other_split) is not paired with the "
        f"LLaMA-Adapter row one by one {UNPAIRED_WHY}, so its verdict rests on the intervals only: 25.00 ["), verdict
    assert ("Against answering without a model (always (A): 50.00 [39.30, 60.70] on the val questions), by the "
            "intervals only (the floor keeps no answers one by one to pair): above it: full fine-tuning "
            "(scienceqa_full) 100.00 [95.42, 100.00]; overlapping it: LLaMA-Adapter (scienceqa) 60.00 [49.05, 70.04], "
            "LoRA (scienceqa_lora) 52.50 [41.70, 63.08]; below it: LLaMA-Adapter (other_split) 25.00 [") in verdict
    assert verdict.endswith("An interval overlapping the floor's leaves a model not shown to answer better than "
                            "that.")
    # no LLaMA-Adapter row keeps its answers one by one: said, not a verdict against nothing; a floor without an
    # interval (no questions) is no floor to be above or below
    for r in (adapter, lora, full, other):
        r.scores.pop("correct_pids")
        r.scores["floor"] = {"letter": "A", "correct": 0, "n": 0, "accuracy": None}
    unpaired = method_verdict(scienceqa_table([adapter, lora, full, other]))
    assert unpaired == ("No row is paired with another one by one (no LLaMA-Adapter row keeps its answers one by one, "
                        "or the others were scored on other questions or samples): compare their intervals only.")
    captions = {k: v for k, v in report_tables([]).items() if k == "scienceqa"}
    md = report_markdown({"scienceqa": table}, captions, [adapter, lora, full, other], {},
                         {"samples": 1, "mean": 1.0, "max": 1})
    assert f"## {captions['scienceqa']}\n\n**Verdict.** Against the LLaMA-Adapter row (" in md


def test_the_instruction_tables_verdict_pairs_samples_with_the_adapter_row():
    adapter = scored_samples(run("instruction"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    lora = scored_samples(run("instruction_lora", method="lora"), [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    for r in (adapter, lora):
        r.dataset = "alpaca"
    verdict = method_verdict(instruction_table([adapter, lora]))
    assert verdict == ("Against the LLaMA-Adapter row (LLaMA-Adapter (instruction)), sample by sample: LoRA "
                       f"(instruction_lora): lower loss on 6 samples, higher on 0, p = {p_cell(mcnemar_p(6, 0))}, "
                       "lower loss beyond chance.")


def test_scores_of_one_digest_but_other_question_counts_are_not_paired():
    """Two scores.json that name the same questions_sha256 but a different n cannot both be of the same questions
    (a hand-edited or mixed-up file): pairing them took the first one's n for both and reported McNemar's p over
    questions that one of them never scored (here 0 of 18 discordant, p 7.6e-06). They are left unpaired, as
    scores of other questions are, and their trend leaves the odd one out."""
    adapter = answered(run("a"), range(0, 48))
    fewer = answered(run("b", method="lora"), range(0, 30))
    fewer.scores |= {"n": 60, "accuracy": 50.0}
    row = scienceqa_table([adapter, fewer]).set_index("experiment").loc["b"]
    assert pd.isna(row.get("paired_with")) and pd.isna(row.get("p_paired"))  # no column: nothing paired
    runs = layer_axis({1: range(0, 20), 2: range(0, 30), 4: range(0, 40), 8: range(0, 30)})
    runs[-1].scores |= {"n": 60, "accuracy": 50.0}
    trend = trends_table({"adapter_layers": runs}).iloc[0]
    assert trend["left_out"] == [8] and trend["items"] == 80


def test_a_p_value_below_the_float_range_is_not_zero():
    assert 0 < mcnemar_p(57, 1633) < 1e-300  # 2 * P(X <= 57) for X ~ Bin(1690, 1/2): below the smallest float
    assert p_cell(mcnemar_p(57, 1633)) == "< 1e-300" and p_cell(mcnemar_p(1, 6)) == "0.125"


def test_ablation_points_are_paired_with_the_center(grid):
    for r, right in zip(grid, (range(0, 48), range(0, 20), range(0, 47))):
        answered(r, right)
    df = ablation_table(ablation_axis(grid, "adapter_layers", CENTER, [1, 2, 4]), "adapter_layers", 4)
    assert list(df["paired_with"].fillna("center")) == [grid[0].name, grid[0].name, "center"]
    assert list(df["only_paired_right"][:2]) == [28, 1] and list(df["only_this_right"][:2]) == [0, 0]
    assert df["p_paired"][0] < 1e-6 and df["p_paired"][1] == 1.0  # 28 questions lost; one is noise
    assert "paired_with" not in ablation_table(ablation_axis(grid, "adapter_layers", CENTER, [1, 2]),
                                               "adapter_layers", 4).dropna(axis=1, how="all")  # center not listed


def test_scienceqa_text_only_pairs_with_the_text_only_paper_row(grid):
    row = scienceqa_table(grid[:1]).iloc[0]
    assert row["paper_model"] == "LLaMA-Adapter_T" and row["accuracy_paper"] == 78.31
    assert row["NAT_paper"] is None and row["chance"] == 40.0 and row["accuracy"] == 60.0


def test_a_p_is_shown_on_its_side_of_005_and_as_a_bound_beyond_floats():
    """The legend reads each p against 0.05: one just below it is not printed as 0.05, nor one just above; a p
    beyond the float range is a bound in the .tex table as in report.md."""
    below, above = mcnemar_p(117, 150), mcnemar_p(125, 159)  # 0.049983, 0.050016
    assert below < 0.05 < above
    assert float(p_cell(below)) < 0.05 < float(p_cell(above)) and p_cell(0.0123456) == "0.0123"
    tex = to_latex(pd.DataFrame({"p_paired": [below, mcnemar_p(57, 1633)], "accuracy": [0.0499832, 0.5]}), "c")
    rows = [line.split(" & ") for line in tex.splitlines() if line.endswith(r"\\")][1:]
    assert float(rows[0][0]) < 0.05 and rows[1][0] == "< 1e-300"
    assert rows[0][1] == "0.05 \\\\"  # not a p: three digits as every other cell


def test_every_accuracy_has_two_decimals_below_1_too():
    """cell showed a number below 1 with three significant digits, meant for the small numbers of other columns (a
    loss, a slope): an accuracy of 0.5% read 0.5 in the Markdown and LaTeX tables and the verdicts, and 0.0 read 0,
    beside 39.84. Every accuracy, its interval, the paper's and chance's, has two decimals; other numbers keep
    theirs (the trends table's interval is a slope's, 0.0412 stays)."""
    from llama_adapter.report import ablation_verdict, readable_markdown, trends_table

    low = run("scienceqa_zero_shot", acc=0.5)
    low.scores["n"] = 400
    low.scores["categories"] = {**CATEGORY_ACC, "NAT": {"accuracy": 0.25, "n": 400, "correct": 1}}
    df = scienceqa_table([run("scienceqa", acc=39.84), low])
    main = readable_markdown(df).split("\n\n")[0].splitlines()
    header = main[0].strip("| ").split(" | ")
    row = dict(zip(header, main[3].strip("| ").split(" | ")))
    assert (row["accuracy"], row["ci95_low"], row["ci95_high"]) == ("0.50", "0.14", "1.80"), row
    assert "| 0.25 [0.04, 1.40] (n=400) |" in readable_markdown(df)
    tex = [line.removesuffix(r" \\").split(" & ") for line in to_latex(df, "c").splitlines() if " & " in line]
    row = dict(zip(tex[0], tex[2]))
    assert (row["accuracy"], row["NAT"], row["chance"]) == ("0.50", "0.25", "40.00"), row

    runs = []
    for layers, accuracy in {1: 0.0, 2: 0.5, 4: 100.0}.items():  # no answers one by one: the intervals speak
        r = point(layers, "zero", 5)
        r.scores |= {"n": 400, "accuracy": accuracy}
        runs.append(r)
    table = ablation_table(runs, "adapter_layers", 4)
    verdict = ablation_verdict(table, trends_table({"adapter_layers": runs}).iloc[0], 4)
    assert "intervals only: 0.00 [0.00, 0.95] against 100.00 [99.05, 100.00]" in verdict, verdict
    assert "intervals only: 0.50 [0.14, 1.80] against" in verdict, verdict
    trend = pd.DataFrame({"axis": ["epochs"], "slope": [0.0123], "ci95_low": [0.0412], "ci95_high": [0.5]})
    assert to_markdown(trend).splitlines()[2] == "| epochs | 0.0123 | 0.0412 | 0.5 |"


def test_tables_without_rows_keep_their_columns():
    for df in (scienceqa_table([]), instruction_table([])):
        assert "experiment" in df.columns and r"\begin{tabular}{}" not in to_latex(df, "c")
        assert pd.read_csv(io.StringIO(df.to_csv(index=False))).columns[0] == "experiment"


def test_an_alpaca_ablation_has_no_paper_numbers_beside_it():
    """The paper's ablations scored ScienceQA: their accuracies and losses are not set beside an Alpaca loss."""
    runs = []
    for epochs in (3, 5, 8):
        runs.append(point(4, "zero", epochs))
        runs[-1].dataset, runs[-1].scores = "alpaca", {"heldout_loss": 1.5, "perplexity": 4.5}
    table = ablation_table(runs, "epochs", 5)
    assert not [c for c in table.columns if c.endswith("_paper")]


def test_markdown_and_latex_escape_cells():
    df = pd.DataFrame([{"a_b": "x|y\nz", "c": math.nan, "d": 0.00123, "e": "50% & $"}])
    md = to_markdown(df)
    assert "x\\|y<br>z" in md and "| n/a |" in md and "0.00123" in md
    tex = to_latex(df, "a caption_with & specials")
    assert r"a\_b" in tex and r"50\% \& \$" in tex and r"\caption{a caption\_with \& specials}" in tex


def test_jobs_table_reads_every_benchmark_file_longest_first(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, seconds in {"train_adapter/ablations/adapter_layers~10/gate_init~zero/epochs~5.tsv": 150.25,
                         "tokenize/alpaca.tsv": 3.0, "pretrain_base.tsv": 61.0}.items():
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:00\t617.7\t1\t1\t1\t1\t1\t1\t1\n")
    df = jobs_table(tmp_path / "benchmarks")
    assert list(df["rule"]) == ["train_adapter", "pretrain_base", "tokenize"]
    assert df["job"].iloc[0] == "ablations/adapter_layers~10/gate_init~zero/epochs~5" and pd.isna(df["job"].iloc[1])
    assert list(df["seconds"]) == [150.2, 61.0, 3.0] and df["max_rss_mb"].iloc[0] == 618
    assert jobs_table(None).empty  # no benchmark folder given: no job rows


def test_jobs_table_keeps_a_job_whose_memory_snakemake_did_not_measure(tmp_path):
    """A job that ends before Snakemake first samples its memory (a fast fetch, a report) gets NA in max_rss and the
    columns after it: the report failed with "cannot convert float NaN to integer", naming no file. Its row is kept,
    its time shown and its memory n/a; a time that is not a number is still refused, naming the file."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, row in {"fetch/alpaca.tsv": "0.4512\t0:00:00" + "\tNA" * 8, "tokenize/alpaca.tsv": "3.0\t0:00:03\t617.7"
                     + "\t1" * 7}.items():
        (tmp_path / "benchmarks" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "benchmarks" / rel).write_text(header + row + "\n")
    df = jobs_table(tmp_path / "benchmarks")
    assert list(df["rule"]) == ["tokenize", "fetch"] and list(df["seconds"]) == [3.0, 0.5]
    assert df["max_rss_mb"].iloc[0] == 618 and pd.isna(df["max_rss_mb"].iloc[1])
    assert to_markdown(df).splitlines()[2:] == ["| tokenize | alpaca | 3.00 | 618 |", "| fetch | alpaca | 0.5 | n/a |"]
    (tmp_path / "benchmarks" / "fetch" / "alpaca.tsv").write_text(header + "NA" + "\tNA" * 9 + "\n")
    with pytest.raises(InputError, match=r"fetch/alpaca\.tsv: not a Snakemake benchmark file"):
        jobs_table(tmp_path / "benchmarks")


def write_benchmark_as_snakemake_does(path, barrier) -> None:
    """Snakemake's write_benchmark_records: the file opened ("wt", emptied), its rows written, closed; here with a
    pause between opening and writing, while the test reads the folder."""
    with open(path, "wt") as f:
        barrier.wait(timeout=60)  # the file is there, empty
        barrier.wait(timeout=60)  # the report has read the folder
        f.write("s\th:m:s\tmax_rss\n7.5\t0:00:07\t100.0\n")


def test_jobs_table_leaves_out_a_job_still_writing_its_benchmark_file(tmp_path):
    """The jobs table reads every file in the folder, also those of jobs outside the report's DAG (another
    invocation's, in the same results folder) that may run as the report does: a file being written is empty until
    Snakemake closes it, and must not fail the report (it is left out, and named in a warning)."""
    import multiprocessing

    done, writing = tmp_path / "benchmarks" / "tokenize" / "alpaca.tsv", tmp_path / "benchmarks" / "evaluate" / "x.tsv"
    for path in (done, writing):
        path.parent.mkdir(parents=True, exist_ok=True)
    done.write_text("s\th:m:s\tmax_rss\n3.0\t0:00:03\t50.0\n")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    job = context.Process(target=write_benchmark_as_snakemake_does, args=(writing, barrier))
    job.start()
    try:
        barrier.wait(timeout=60)
        try:
            with pytest.warns(UserWarning, match=f"{writing}: empty .* not in the jobs table"):
                df = jobs_table(tmp_path / "benchmarks")
        finally:
            barrier.wait(timeout=60)
    finally:
        job.join(timeout=60)
    assert job.exitcode == 0
    assert list(df["rule"]) == ["tokenize"]  # the finished job; the one still writing has no time yet
    assert list(jobs_table(tmp_path / "benchmarks")["rule"]) == ["evaluate", "tokenize"]  # once it is written


def test_assigned_splits_are_said_in_plain_words(grid):
    assert protocol_notes(grid) == []  # ScienceQA's own splits: nothing to say
    assigned = {"rule": "pids ordered by sha256(seed, pid), cut by fraction", "seed": 0,
                "fractions": {"train": 0.45, "val": 0.05, "test": 0.5},
                "records": {"train": 1908, "val": 212, "test": 2121}}
    grid[0].data |= {"source": "test_4241_llava_cqm.json", "assigned_splits": assigned}
    note = " ".join(protocol_notes(grid))
    assert "(4,241)" in note and "train 1,908, val 212, test 2,121" in note
    assert "not the paper's ScienceQA test accuracy" in note


def test_instruction_table_shows_the_loss_before_and_after(grid):
    r = grid[0]
    r.metrics["initial_val_loss"] = 2.0
    r.scores = {"heldout_loss": 1.5, "perplexity": math.exp(1.5), "heldout_samples": 200}
    row = instruction_table([r]).iloc[0]
    assert (row["loss_before"], row["loss_after"], row["heldout_samples"]) == (2.0, 1.5, 200)
    assert row["perplexity_before"] == pytest.approx(math.exp(2.0)) and row["mlflow_run"] == f"run-{r.name}"


def scored_samples(r: Run, losses: list, samples: str = "s" * 64) -> Run:
    """`r` as evaluate scores Alpaca now: each held-out sample's own loss, and a digest of the samples."""
    known = [x for x in losses if x is not None]
    r.scores = {"heldout_loss": sum(known) / len(known), "perplexity": math.exp(sum(known) / len(known)),
                "heldout_samples": len(losses), "samples_sha256": samples, "sample_losses": losses}
    return r


def test_instruction_rows_are_paired_sample_by_sample_with_the_adapter(grid):
    """On Alpaca the pairs are held-out samples: the samples on which each row's loss is the lower (ties and a
    sample without targets count for neither), the mean difference, and the sign test's p; other samples, or a
    scores.json without per-sample losses, are left n/a."""
    adapter = scored_samples(run("instruction"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, None, None])
    lora = scored_samples(run("instruction_lora", method="lora"), [1.5, 2.5, 3.5, 4.5, 5.5, 6.0, None, 9.0])
    full = scored_samples(run("instruction_full", method="full"), [0.5] * 6 + [None, 0.1])
    other = scored_samples(run("other_samples", method="full"), [0.5] * 8, samples="x" * 64)
    old = run("written_before", method="zero-shot")
    old.scores = {"heldout_loss": 2.0, "perplexity": math.exp(2.0), "heldout_samples": 8}
    df = instruction_table([old, adapter, lora, full, other]).set_index("experiment")
    assert pd.isna(df.loc["instruction", "paired_with"]) and pd.isna(df.loc["written_before", "p_paired"])
    assert pd.isna(df.loc["other_samples", "paired_with"])
    row = df.loc["instruction_lora"]
    assert row["paired_with"] == "instruction"
    assert (row["lower_loss_here"], row["lower_loss_paired"]) == (0, 5)  # the tie on sample 6 counts for neither
    assert row["p_paired"] == mcnemar_p(0, 5) and "mean_loss_difference" not in df
    row = df.loc["instruction_full"]
    assert (row["lower_loss_here"], row["lower_loss_paired"]) == (6, 0) and row["p_paired"] == 2 / 2**6
    assert str(df["lower_loss_here"].dtype) == "Int64"
    parts = dict(readable_parts(df.reset_index()))
    paired = parts["Paired with another row, sample by sample"]
    assert list(paired["experiment"]) == ["instruction_lora", "instruction_full"]
    assert "lower_loss_here" not in parts[None] and "only_this_right" not in paired


def test_report_md_keeps_tables_narrow(grid):
    """report.md shows a table's main columns, then its categories and its provenance as tables of their own
    (keyed by the row's name; rows without provenance, such as the floor, left out); the CSV keeps all."""
    grid[0].scores["floor"] = {"letter": "A", "correct": 30, "n": 80, "accuracy": 37.5}
    df = scienceqa_table(grid[:2])
    parts = dict(readable_parts(df))
    main, categories, provenance = parts[None], parts["By category"], parts["Provenance"]
    assert "NAT" not in main and "mlflow_run" not in main and "accuracy" in main and len(main) == len(df)
    assert list(categories.columns[:3]) == ["experiment", "NAT", "SOC"] and len(categories) == 2
    # each with its interval and question count, a count even where the floor's row leaves the column a gap
    assert all(re.fullmatch(r"\S+ \[\S+, \S+\] \(n=\d+\)", v) for v in categories["NAT"]), list(categories["NAT"])
    assert list(provenance.columns) == ["experiment", "mode", "mlflow_run", "eval_run", "config_hash",
                                        "data_sha256", "git_commit"]
    assert len(provenance) == 2 and len(df) == 3  # the floor row has no runs
    efficiency = dict(readable_parts(efficiency_table(grid[:1])))
    assert list(efficiency["Provenance"].columns[:2]) == ["method", "model"] and len(efficiency["Provenance"]) == 1
    assert max(len(part.columns) for part in parts.values()) <= 12
    grid[1].config["image_features"] = "features"  # the multimodal adapter: the paper's per-category row joins
    categories = dict(readable_parts(scienceqa_table(grid[:2])))["By category"]
    assert list(categories["experiment"])[-1] == "paper: LLaMA-Adapter" and categories["NAT"].iloc[-1] == 84.37


SCIENCEQA_SCORES = {"mode": "generate", "n": 80, "correct": 48, "accuracy": 60.0, "categories": CATEGORY_ACC,
                    "unparsed": 0, "chance": 40.0, "any_format": {"correct": 48, "accuracy": 60.0},
                    "floor": {"position": 0, "letter": "A", "correct": 36, "n": 80, "accuracy": 45.0},
                    "split": "test", "task": "scienceqa", "base": "b", "method": "zero-shot", "mlflow_run_id": None}
ALPACA_SCORES = {"heldout_loss": 1.5, "perplexity": math.exp(1.5), "heldout_samples": 200, "task": "alpaca",
                 "base": "b", "method": "zero-shot", "mlflow_run_id": "r"}


def without(scores: dict, *keys: str) -> dict:
    scores = copy.deepcopy(scores)
    *parents, name = keys
    holder = scores
    for key in parents:
        holder = holder[key]
    del holder[name]
    return scores


@pytest.mark.parametrize("scores,key,expected", [
    (SCIENCEQA_SCORES | {"n": "abc"}, "n", "a count"),
    (SCIENCEQA_SCORES | {"n": True}, "n", "a count"),
    (SCIENCEQA_SCORES | {"accuracy": "high"}, "accuracy", "a percentage"),
    (SCIENCEQA_SCORES | {"accuracy": math.nan}, "accuracy", "a percentage"),
    (SCIENCEQA_SCORES | {"accuracy": 600.0}, "accuracy", "a percentage"),
    (SCIENCEQA_SCORES | {"categories": []}, "categories", "an object"),
    (SCIENCEQA_SCORES | {"floor": {"x": 1}}, "floor.letter", "missing"),
    (SCIENCEQA_SCORES | {"floor": {**SCIENCEQA_SCORES["floor"], "n": None}}, "floor.n", "a count"),
    (SCIENCEQA_SCORES | {"chance": [40]}, "chance", "a percentage"),
    (SCIENCEQA_SCORES | {"unparsed": 1.5}, "unparsed", "a count"),
    (SCIENCEQA_SCORES | {"any_format": {"accuracy": "x"}}, "any_format.accuracy", "a percentage"),
    (SCIENCEQA_SCORES | {"any_format": {"correct": "48", "accuracy": 60.0}}, "any_format.correct", "a count"),
    (SCIENCEQA_SCORES | {"any_format": {"correct": -48, "accuracy": 60.0}}, "any_format.correct", "a count"),
    (SCIENCEQA_SCORES | {"split": {"x": 1}}, "split", "a string"),
    (SCIENCEQA_SCORES | {"tags": {"git_commit": 5}}, "tags.git_commit", "a string"),  # a TypeError in provenance
    (SCIENCEQA_SCORES | {"correct": 81}, "correct", "more than n"),
    (SCIENCEQA_SCORES | {"correct_pids": ["1", 2]}, "correct_pids", "a list of distinct question ids"),
    (SCIENCEQA_SCORES | {"correct_pids": ["1", "1"]}, "correct_pids", "a list of distinct question ids"),
    (SCIENCEQA_SCORES | {"correct_pids": ["1", "2"]}, "correct_pids", "but correct is 48"),
    # without correct, the accuracy is held to them (a hand-edited file): 2 of 80 is not 60%, 81 is more than 80
    (without(SCIENCEQA_SCORES, "correct") | {"correct_pids": ["1", "2"]}, "correct_pids",
     "names 2 of n 80 questions, 2.50%, but accuracy is 60.0"),
    (SCIENCEQA_SCORES | {"correct": None, "correct_pids": [str(i) for i in range(47)]}, "correct_pids",
     "names 47 of n 80 questions, 58.75%, but accuracy is 60.0"),
    (without(SCIENCEQA_SCORES, "correct") | {"correct_pids": [str(i) for i in range(81)]}, "correct_pids",
     "names 81 questions, more than n (80)"),
    (SCIENCEQA_SCORES | {"questions_sha256": 7}, "questions_sha256", "a string"),
    (without(SCIENCEQA_SCORES, "categories", "NAT"), "categories.NAT", "missing"),
    (without(SCIENCEQA_SCORES, "accuracy"), "accuracy", "missing"),
    (without(SCIENCEQA_SCORES, "base"), "base", "missing"),
    (SCIENCEQA_SCORES | {"categories": {**CATEGORY_ACC, "IMG": {"accuracy": math.inf, "n": 3}}},
     "categories.IMG.accuracy", "a percentage"),
    (SCIENCEQA_SCORES | {"categories": {**CATEGORY_ACC, "IMG": {"accuracy": 50.0, "n": 10, "correct": 6}}},
     "categories.IMG.accuracy", "but 6 correct of 10 is 60.00"),
    (SCIENCEQA_SCORES | {"categories": {**CATEGORY_ACC, "IMG": {"accuracy": 50.0, "n": 10, "correct": -1}}},
     "categories.IMG.correct", "a count"),
    (SCIENCEQA_SCORES | {"task": ["scienceqa"]}, "task", "scienceqa or alpaca"),
    (without(SCIENCEQA_SCORES, "task"), "task", "missing"),
    (ALPACA_SCORES | {"heldout_loss": math.nan}, "heldout_loss", "a finite number"),
    (ALPACA_SCORES | {"perplexity": "low"}, "perplexity", "a positive number"),
    (ALPACA_SCORES | {"heldout_samples": -1}, "heldout_samples", "a count"),
    (ALPACA_SCORES | {"sample_losses": [1.0, "x"]}, "sample_losses", "a list of per-sample losses"),
    (ALPACA_SCORES | {"sample_losses": [1.0, math.nan]}, "sample_losses", "a list of per-sample losses"),
    (ALPACA_SCORES | {"sample_losses": [1.0, None]}, "sample_losses", "holds 2 losses, but heldout_samples is 200"),
    (ALPACA_SCORES | {"samples_sha256": None}, "samples_sha256", "a string"),
])
def test_mistyped_scores_are_one_error_naming_the_file_and_key(tmp_path, scores, key, expected):
    """Every field of scores.json that the report reads is checked when it is read: a wrong type, a NaN or a
    missing key is one InputError naming the file and the key, not a TypeError or KeyError from a table."""
    (tmp_path / "tokens").mkdir()
    for task in ("scienceqa", "alpaca"):
        (tmp_path / "tokens" / task).mkdir()
        (tmp_path / "tokens" / task / "stats.json").write_text(json.dumps({"dataset": task}))
    inputs = ReportInputs(experiments=["e"], scores={"e": tmp_path / "scores.json"},
                          tokens={t: tmp_path / "tokens" / t for t in ("scienceqa", "alpaca")})
    for good in (SCIENCEQA_SCORES, ALPACA_SCORES, SCIENCEQA_SCORES | {"accuracy": None, "floor": None},
                 SCIENCEQA_SCORES | {"sample_losses": [1.0]},  # a key of the other task's is not read
                 without(SCIENCEQA_SCORES, "correct") | {"correct_pids": [str(i) for i in range(48)]},
                 # 1 of 3 is 33.333...%, stored rounded
                 without(SCIENCEQA_SCORES, "correct") | {"n": 3, "accuracy": 33.33, "any_format": None,
                                                          "correct_pids": ["1"]}):
        (tmp_path / "scores.json").write_text(json.dumps(good))
        assert load_run("e", inputs).scores == good
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'scores.json'}: ")) as e:
        load_run("e", inputs)
    assert f"key {key}" in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


TRAINING_METRICS = {"history": [{"step": 1, "epoch": 1, "loss": 1.0, "gate/layer_03": 0.1}],
                    "trainable_parameters": 10, "world_size": 1, "weights": "adapter.safetensors",
                    "val_loss": [0.9, 0.8], "initial_val_loss": 1.2}


def trained_row(tmp_path, metrics: dict, config: dict | None = None) -> ReportInputs:
    """The inputs of one trained ScienceQA row whose training wrote `metrics` and `config` (a valid one: None)."""
    (tmp_path / "tokens" / "scienceqa").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokens" / "scienceqa" / "stats.json").write_text(json.dumps({"dataset": "scienceqa"}))
    (tmp_path / "scores.json").write_text(json.dumps(SCIENCEQA_SCORES | {"method": "adapter"}))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config or {"base": "b", "train_data": "t"}))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"0")
    return ReportInputs(experiments=["e"], scores={"e": tmp_path / "scores.json"},
                        tokens={"scienceqa": tmp_path / "tokens" / "scienceqa"}, trainings={"e": tmp_path / "run"})


def test_a_validation_loss_that_is_not_finite_is_refused_not_shown_as_na(tmp_path):
    """A table cell of NaN reads "n/a", as a zero-shot row's missing loss does: a diverged validation would hide
    as "not measured". Refused, naming the file and the key."""
    metrics = TRAINING_METRICS
    for bad, ok in (({}, True), ({"val_loss": [0.9, math.nan]}, False), ({"initial_val_loss": math.inf}, False)):
        inputs = trained_row(tmp_path, metrics | bad)
        if ok:
            assert load_run("e", inputs).metrics["val_loss"] == [0.9, 0.8]
            continue
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'run' / 'metrics.json'}: key {next(iter(bad))}")
                           + ".*validation diverged"):
            load_run("e", inputs)


@pytest.mark.parametrize("metrics,config,file,key,expected", [
    ({"history": [1, 2]}, None, "metrics.json", "history", "a list of each step's metrics"),
    ({"history": [{"step": 1, "epoch": 1}]}, None, "metrics.json", "history", "a finite epoch and loss"),
    # a NaN training loss showed as the last epoch's train_loss "n/a", as if not measured
    ({"history": [{"step": 1, "epoch": 1, "loss": math.nan}]}, None, "metrics.json", "history", "finite"),
    ({"history": [{"step": 1, "epoch": 1, "loss": 1.0, "gate/layer_x": 0.1}]}, None, "metrics.json", "history",
     "gate/layer_N"),
    ({"trainable_parameters": "ten"}, None, "metrics.json", "trainable_parameters", "a count"),
    ({"nodes": "2"}, None, "metrics.json", "nodes", "a count"),
    ({"val_loss": "x"}, None, "metrics.json", "val_loss", "a list of finite validation losses"),  # shown as "x"
    ({"val_loss": ["x"]}, None, "metrics.json", "val_loss", "a list of finite validation losses"),
    ({"initial_val_loss": "x"}, None, "metrics.json", "initial_val_loss", "a finite validation loss"),
    ({"weights": None}, None, "metrics.json", "weights", "a string"),
    ({"tags": "x"}, None, "metrics.json", "tags", "an object"),
    ({"tags": {"git_commit": 5}}, None, "metrics.json", "tags.git_commit", "a string"),
    ({"image_samples": "x"}, None, "metrics.json", "image_samples", "an object"),
    ({}, {"base": 3, "train_data": "t"}, "config.json", "base", "a string"),
    ({}, {"base": "b", "train_data": "t", "method": "bogus"}, "config.json", "method", "one of adapter"),
    ({}, {"train_data": "t"}, "config.json", "base", "missing"),
])
def test_a_mistyped_training_file_is_one_error_naming_the_file_and_key(tmp_path, metrics, config, file, key, expected):
    """The fields of a training's metrics.json and config.json that the tables read are checked when read, as
    scores.json's are: a wrong type or a NaN was an AttributeError, TypeError, KeyError or ValueError naming no file
    while the tables were built, or a cell shown as if it held a measurement (a val_loss of "x", a train_loss of
    n/a for a NaN)."""
    assert load_run("e", trained_row(tmp_path, TRAINING_METRICS)).metrics == TRAINING_METRICS
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'run' / file}: ")) as e:
        load_run("e", trained_row(tmp_path, TRAINING_METRICS | metrics, config))
    assert f"key {key}" in str(e.value) and expected in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("stats,key,expected", [
    ({"provenance": "x"}, "provenance", "an object"),
    ({"provenance": {"records_sha256": 5}}, "provenance.records_sha256", "a string"),
    ({"provenance": {"source": ["a"]}}, "provenance.source", "a string"),
    ({"provenance": {"assigned_splits": "x"}}, "provenance.assigned_splits", "an object"),
    ({"provenance": {"assigned_splits": {"records": 5}}}, "provenance.assigned_splits.records", "split"),
    ({"provenance": {"assigned_splits": {"records": {"train": "many"}}}}, "provenance.assigned_splits.records",
     "split"),
    # the protocol note reads the rule and the seed too: a KeyError naming no file where they were left out
    ({"provenance": {"assigned_splits": {"records": {"train": 8}, "seed": 0}}}, "provenance.assigned_splits.rule",
     "missing"),
    ({"provenance": {"assigned_splits": {"records": {"train": 8}, "rule": "r", "seed": "0"}}},
     "provenance.assigned_splits.seed", "a count"),
])
def test_a_mistyped_tokenize_stats_is_one_error_naming_the_file_and_key(tmp_path, stats, key, expected):
    """The provenance of a tokenize folder's stats.json (the data hash, the source and the splits it assigned) is
    read into the provenance columns and the miniature-protocol note: a value of another kind was an
    AttributeError or TypeError naming no file."""
    inputs = trained_row(tmp_path, TRAINING_METRICS)
    stats_path = tmp_path / "tokens" / "scienceqa" / "stats.json"
    assigned = {"records": {"train": 8}, "rule": "r", "seed": 0}
    stats_path.write_text(json.dumps({"dataset": "scienceqa", "provenance": {
        "records_sha256": "f" * 64, "source": "s", "assigned_splits": assigned}}))
    assert load_run("e", inputs).data["source"] == "s"
    stats_path.write_text(json.dumps({"dataset": "scienceqa", **stats}))
    with pytest.raises(InputError, match=re.escape(f"{stats_path}: ")) as e:
        load_run("e", inputs)
    assert f"key {key}" in str(e.value) and expected in str(e.value), str(e.value)


def test_the_gate_init_figure_skips_points_that_trained_nothing(tmp_path):
    from llama_adapter.report import loss_curves_figure

    untrained = point(4, "random", 5, "zero-shot")
    untrained.config, untrained.metrics = {"base": "b", "method": "zero-shot"}, {}
    loss_curves_figure([point(4, "zero", 5), untrained], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def scored_run(name="scienceqa", scores=None, metrics=None, config=None):
    """A ScienceQA run as load_run reads it, with `scores`, `metrics` and `config` laid over."""
    from llama_adapter.data.scienceqa import CATEGORIES
    from llama_adapter.report import Run

    history = [{"step": 1, "epoch": 1.0, "loss": 1.0}, {"step": 2, "epoch": 2.0, "loss": 0.5}]
    return Run(name=name, dataset="scienceqa",
               config={"method": "adapter", "base": "b", "adapter_layers": 4, **(config or {})},
               metrics={"trainable_parameters": 1000, "world_size": 1, "history": history, "val_loss": [0.7],
                        "mlflow_run_id": "t", "tags": {}, **(metrics or {})},
               scores={"mode": "generate", "n": 80, "correct": 48, "accuracy": 60.0, "split": "val", "chance": 40.0,
                       "unparsed": 0, "categories": {c: {"accuracy": 50.0, "n": 10} for c in CATEGORIES},
                       "mlflow_run_id": "e", **(scores or {})},
               adapter_bytes=1000, seconds=1.0, data={})


def test_a_row_says_how_its_answers_were_read_and_what_unparsed_means_there():
    """Likelihood mode leaves a question unanswered where no option's score is finite: each row names its mode
    (in report.md beside its runs), and the legend says what `unparsed` counts in each mode."""
    from llama_adapter.report import ablation_table, point_settings, report_markdown

    likelihood = scored_run(scores={"mode": "likelihood", "unparsed": 3})
    assert scienceqa_table([likelihood])["mode"].iloc[0] == "likelihood"
    point = scored_run("ablations/adapter_layers~4", scores={"mode": "likelihood"})
    point.point = point_settings(point.name)
    assert ablation_table([point], "adapter_layers", 4)["mode"].iloc[0] == "likelihood"
    legend = report_markdown({}, {}, [likelihood], {}, {"samples": 1, "mean": 1.0, "max": 1})
    assert "`likelihood`, where `unparsed` counts the questions no option of which got a finite score" in legend
    assert 'reads the first "(X)"' not in legend


def test_a_multimodal_row_counts_its_image_questions_without_image_and_its_trained_images(tmp_path):
    """A multimodal row says how many image questions were scored from their text (images_missing) and how many
    training samples read an image, in a table of their own; a text-only row has none of it; a mistyped
    images_missing is refused by name."""
    from llama_adapter.report import ReportInputs, load_run

    mm = scored_run("scienceqa_mm", scores={"images_missing": ["q1", "q2", "q3"]}, config={"image_features": "f"},
                    metrics={"image_samples": {"train": {"with_image": 5, "samples": 100}, "val": None}})
    df = scienceqa_table([mm, scored_run()])
    assert list(df[["images_missing", "trained_with_image", "trained_samples"]].iloc[0]) == [3, 5, 100]
    assert df[["images_missing", "trained_with_image"]].iloc[1].isna().all()
    images = dict(readable_parts(df))["Image questions"]
    assert list(images["experiment"]) == ["scienceqa_mm"]

    tmp = tmp_path
    (tmp / "tokens").mkdir()
    (tmp / "tokens" / "stats.json").write_text(json.dumps({"dataset": "scienceqa"}))
    (tmp / "scores.json").write_text(json.dumps({**scored_run().scores, "task": "scienceqa", "method": "zero-shot",
                                                 "base": "b", "images_missing": 7}))
    with pytest.raises(InputError, match="images_missing"):
        load_run("e", ReportInputs(experiments=["e"], scores={"e": tmp / "scores.json"},
                                   tokens={"scienceqa": tmp / "tokens"}))


def test_a_category_interval_is_of_its_own_count_of_right_answers():
    """A category's 95% interval is Wilson's of its count of right answers, which evaluate writes beside its
    accuracy: recovered from the accuracy rounded to 0.01 points, the count is off by one above 10,000 questions
    (every split's 21,208, a category of them): 2 right of 12,726 is 0.02%, read back as 3 right."""
    from llama_adapter.evaluate import scienceqa_scores
    from llama_adapter.report import wilson_interval

    predictions = [{"pid": str(i), "prediction": 0, "correct": i < 2, "categories": ["NAT"]} for i in range(12_726)]
    scores = scienceqa_scores(predictions)
    assert scores["categories"]["NAT"] == {"accuracy": 0.02, "n": 12_726, "correct": 2}
    r = run("big")
    r.scores = {**r.scores, "n": 12_726, "correct": 2, "accuracy": 0.02, "categories": scores["categories"]}
    row = scienceqa_table([r]).iloc[0]
    assert (row["NAT_ci95_low"], row["NAT_ci95_high"]) == wilson_interval(2, 12_726) == (0.0, 0.06)
    assert (row["ci95_low"], row["ci95_high"]) == (0.0, 0.06)  # the overall row already read `correct`


def test_the_legend_does_not_read_apart_intervals_as_a_difference_the_paired_test_does_not_show():
    """Two rows of the same five questions, one right on all, the other on none: their 95% intervals are apart
    ([0, 43.45] and [56.55, 100]), yet McNemar's exact p of the five questions only one got right is 0.0625 (as
    scipy.stats.binomtest(0, 5).pvalue). The legend said apart intervals "differ beyond this noise" and a p above
    0.05 "a difference this data does not show": both of one pair. Where two rows scored the same questions, the
    paired test is the test, and the legend says so."""
    from llama_adapter.report import report_markdown

    adapter, zero_shot = run("scienceqa"), run("scienceqa_zero_shot", method="zero-shot")
    for r, right in ((adapter, [str(i) for i in range(5)]), (zero_shot, [])):
        r.scores = {**r.scores, "n": 5, "correct": len(right), "accuracy": 20.0 * len(right),
                    "questions_sha256": "q" * 64, "correct_pids": right}
    df = scienceqa_table([adapter, zero_shot]).set_index("experiment")
    assert df.loc["scienceqa", "ci95_low"] > df.loc["scienceqa_zero_shot", "ci95_high"]  # 56.55 > 43.45
    assert df.loc["scienceqa_zero_shot", "p_paired"] == 0.0625
    legend = report_markdown({}, {}, [], CENTER, {"samples": 1, "mean": 1.0, "max": 1})
    assert "differ beyond this noise" not in legend
    assert "`p_paired` is the test" in legend and "intervals apart" in legend


def test_the_legend_does_not_read_loss_after_as_the_size_of_the_sign_tests_difference():
    """The sign test counts samples; loss_after (evaluate's heldout_loss) is the mean over every target token, so a
    long sample weighs more. Eight short samples (10 tokens) a little lower for LoRA and one long one (200 tokens)
    much higher: lower on 8 of 9, p = 0.039, yet its loss_after is the higher (1.614 against 1.286). The legend
    said loss_after tells "by how much"; it can point the other way, and the legend says so."""
    from llama_adapter.report import report_markdown

    tokens = [10] * 8 + [200]
    adapter = scored_samples(run("instruction"), [2.0] * 8 + [1.0])
    lora = scored_samples(run("instruction_lora", method="lora"), [1.9] * 8 + [1.5])
    for r in (adapter, lora):  # evaluate's heldout_loss: every token's loss over every token
        r.scores["heldout_loss"] = sum(x * n for x, n in zip(r.scores["sample_losses"], tokens)) / sum(tokens)
    row = instruction_table([adapter, lora]).set_index("experiment").loc["instruction_lora"]
    assert (row["lower_loss_here"], row["lower_loss_paired"]) == (8, 1) and row["p_paired"] < 0.05
    assert row["loss_after"] > adapter.scores["heldout_loss"]  # 1.614 > 1.286
    legend = report_markdown({}, {}, [], CENTER, {"samples": 1, "mean": 1.0, "max": 1})
    assert "says by how much" not in legend and "token-weighted" in legend


def test_the_legend_says_its_noise_is_the_questions_not_another_trainings():
    """Each row is one training: the intervals, tests and trends measure the questions drawn, not a retraining with
    another seed, which the legend must not let a reader take them for."""
    from llama_adapter.report import report_markdown

    legend = report_markdown({}, {}, [], CENTER, {"samples": 1, "mean": 1.0, "max": 1})
    assert "for one training of each row" in legend and "another seed" in legend


# --- the ablations' verdicts: a paired linear trend along an ordered axis, each point against the center --------

def layer_axis(rights: dict, questions: dict | None = None) -> list[Run]:
    """The adapter_layers axis of the grid, each point's 80 questions answered right as `rights` says (its
    questions' digest as `questions` says, else one for all)."""
    return [answered(point(layers, "zero", 5), right, questions=(questions or {}).get(layers, "q" * 64))
            for layers, right in rights.items()]


def independent_trend(x: list, outcomes: list[list[float]]) -> tuple[float, float, float]:
    """The paired trend computed another way: numpy's polyfit of each question's (or sample's) outcomes over x,
    their mean, and scipy's t quantile (a column per item of `outcomes`, a row per point)."""
    from scipy.stats import t

    slopes = [np.polyfit(x, column, 1)[0] for column in np.array(outcomes).T]
    half = t.ppf(0.975, len(slopes) - 1) * np.std(slopes, ddof=1) / math.sqrt(len(slopes))
    return float(np.mean(slopes)), float(np.mean(slopes) - half), float(np.mean(slopes) + half)


def right_or_not(runs: list[Run]) -> list[list[float]]:
    return [[float(str(q) in r.scores["correct_pids"]) for q in range(80)] for r in runs]


def verdict_of(runs: list[Run], axis: str, center) -> tuple[pd.Series, str]:
    from llama_adapter.report import ablation_verdict, trends_table

    trend = trends_table({axis: runs}).iloc[0]
    return trend, ablation_verdict(ablation_table(runs, axis, center), trend, center)


def test_a_rising_axis_has_a_positive_trend_beyond_noise():
    """Each question's least-squares slope of its correctness over the number of layers, averaged: the slope of the
    accuracies, with an interval from the questions' spread (Student's t, 79 degrees of freedom), which here
    excludes 0: "rises with adapter_layers beyond this noise"."""
    runs = layer_axis({1: range(0, 20), 2: [*range(5, 30), 70], 4: range(0, 56)})
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    slope, low, high = independent_trend([1, 2, 4], [[100 * y for y in row] for row in right_or_not(runs)])
    assert (trend["trend"], trend["measure"], trend["per"], trend["items"]) == ("paired linear", "accuracy",
                                                                                "adapted layer", 80)
    assert trend["slope"] == pytest.approx(slope) and trend["slope"] == pytest.approx(
        np.polyfit([1, 2, 4], [25.0, 32.5, 70.0], 1)[0])  # the slope of the accuracies themselves
    assert (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert 0 < low and trend["monotone"]
    assert verdict.startswith(f"Accuracy rises with adapter_layers beyond this noise: +{slope:.3g} points per "
                              f"adapted layer, 95% [{low:.3g}, {high:.3g}]")
    assert "no trend beyond noise" not in verdict.lower()


def test_a_flat_axis_has_no_trend_beyond_noise_and_says_what_it_rules_out():
    """Accuracies of 40, 50 and 35 over 1, 2 and 4 layers, the questions right changing from point to point: the
    interval holds 0, and its ends bound the rise and the fall it rules out; the middle point is the highest, which
    a line does not show, so the verdict says the points turn."""
    runs = layer_axis({1: range(0, 32), 2: range(20, 60), 4: range(10, 38)})
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    slope, low, high = independent_trend([1, 2, 4], [[100 * y for y in row] for row in right_or_not(runs)])
    assert trend["slope"] == pytest.approx(slope) and low < 0 < high
    assert (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert verdict.startswith(f"No trend beyond noise: the interval holds 0 (accuracy {slope:+.3g} points per "
                              f"adapted layer, 95% [{low:.3g}, {high:.3g}]")
    # The interval's ends, 0.48293 and -5.48293, rounded away from 0 to three digits: a fall of 5.481 lies in the
    # interval, so "a fall of more than 5.48" (rounded to the nearest) is not ruled out; 5.49 is.
    assert (round(high, 3), round(low, 3)) == (0.483, -5.483)
    assert "a rise of more than 0.483 points or a fall of more than 5.49 points per adapted layer is ruled out at " \
           "95%" in verdict
    assert not trend["monotone"] and "Not monotone" in verdict and "beyond this noise" not in verdict


def test_the_change_said_ruled_out_lies_outside_the_interval():
    """The bounds of "a rise of more than X or a fall of more than Y ... is ruled out at 95%" are the interval's
    ends rounded away from 0 (three significant digits): rounded to the nearest, an end of 4.7318 read "more than
    4.73", and a rise of 4.731, inside the interval, was said to be ruled out."""
    from llama_adapter.report import _bound

    assert [_bound(v) for v in (4.7318, 4.73, 9.9949, 0.0, 1e-9, 123456.7, 0.000123456)] == [
        "4.74", "4.73", "10", "0", "1e-09", "1.24e+05", "0.000124"]
    for v in np.random.default_rng(0).lognormal(0, 3, 2000):
        assert float(_bound(v)) >= v and float(_bound(v)) <= v * 1.011  # one unit of the third digit at most


def test_equal_accuracies_whose_questions_trade_places_have_a_slope_of_exactly_0():
    """Accuracies of 50, 50 and 50 over 1, 2 and 4 layers, 40 questions right at each point but not the same 40:
    the questions' slopes cancel, and their mean in floating point was a rounding error's, 3.55e-16 or 7.1e-16 by
    the order of the questions, shown as "accuracy +3.55e-16 points per adapted layer". The slope is 0; the
    interval, from the questions' spread, is not."""
    from llama_adapter.report import paired_trend

    runs = layer_axis({1: range(0, 40), 2: range(10, 50), 4: range(20, 60)})
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    _, low, high = independent_trend([1, 2, 4], [[100 * y for y in row] for row in right_or_not(runs)])
    assert trend["slope"] == 0.0 and (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low),
                                                                                  pytest.approx(high))
    assert f"(accuracy 0 points per adapted layer, 95% [{low:.3g}, {high:.3g}]" in verdict, verdict
    outcomes = np.zeros((3, 80))
    outcomes[0, :40], outcomes[1, 10:50], outcomes[2, 20:60] = 100, 100, 100
    assert paired_trend([0.3, 0.7, 1.9], outcomes)["slope"] == 0.0  # -1.4e-15 before


def test_an_alpaca_axis_trends_its_held_out_loss_per_sample():
    """On Alpaca the outcome is each held-out sample's loss (its token mean, as the sign test reads it); a sample
    without targets has none at any point and is left out."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 40)
    losses = {e: [*(base - 0.1 * e + rng.normal(0, 0.05, 40)), None] for e in (3, 5, 8)}
    runs = []
    for epochs, sample_losses in losses.items():
        runs.append(scored_samples(point(4, "zero", epochs), [float(x) if x is not None else None
                                                              for x in sample_losses]))
        runs[-1].dataset = "alpaca"
    trend, verdict = verdict_of(runs, "epochs", 5)
    slope, low, high = independent_trend([3, 5, 8], [x[:40] for x in losses.values()])
    assert (trend["measure"], trend["items"]) == ("sample_mean_loss", 40)
    assert trend["slope"] == pytest.approx(slope) and slope == pytest.approx(-0.1, abs=0.02)
    assert (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low), pytest.approx(high)) and high < 0
    assert verdict.startswith(f"Held-out loss falls with epochs beyond this noise: {slope:+.3g} per epoch, "
                              f"95% [{low:.3g}, {high:.3g}] (a paired linear trend over 40 samples")
    assert "Against the center (epochs = 5), sample by sample: epochs = 3: lower loss on 0 samples, higher on " \
           "40, p = " in verdict and "higher loss beyond chance" in verdict


def test_a_categorical_axis_is_summed_up_by_its_paired_tests():
    """No trend for values that are not numbers: each point against the center, beyond chance or not, in words;
    with several points, each p is said to stand alone."""
    zero, random = answered(point(4, "zero", 5), range(0, 40)), answered(point(4, "random", 5), range(1, 42))
    trend, verdict = verdict_of([zero, random], "gate_init", "zero")
    assert trend["trend"] == "none: values not amounts in order" and pd.isna(trend["slope"])
    assert verdict == ("Against the center (gate_init = zero: 50.00), question by question: gate_init = random: "
                       "51.25, p = 1, no difference this data shows.")
    zero_shot = answered(point(4, "zero", 5, "zero-shot"), range(0, 2))
    lora = answered(point(4, "zero", 5, "lora"), range(0, 40))
    _, verdict = verdict_of([zero, lora, zero_shot], "method", "adapter")
    assert verdict == ("Against the center (LLaMA-Adapter: 50.00), question by question: LoRA: 50.00, p = 1, no "
                       f"difference this data shows; zero-shot base: 2.50, p = {p_cell(mcnemar_p(0, 38))}, lower "
                       "beyond chance. Each p stands alone (no correction for the 2 comparisons).")


def test_an_axis_with_a_value_that_is_not_finite_has_no_trend_line():
    """A grid point named epochs~Infinity reads as the number inf (json): the line through it was all NaN, and the
    verdict said "No trend beyond noise: the interval holds 0 (accuracy nan points per epoch, 95% [nan, nan]...)",
    a claim no computation made. An infinite value is no amount a line can run along: no trend, as for names."""
    runs = []
    for epochs, right in {"1": range(0, 20), "2": range(0, 30), "Infinity": range(0, 40)}.items():
        name = f"ablations/adapter_layers~4/gate_init~zero/epochs~{epochs}/method~adapter"
        runs.append(answered(run(name), right))
        runs[-1].point = point_settings(name)
    trend, verdict = verdict_of(runs, "epochs", 1)
    assert trend["trend"] == "none: values not amounts in order" and pd.isna(trend["slope"])
    assert "nan" not in verdict and "trend beyond noise" not in verdict, verdict


def seed_axis() -> list[Run]:
    """The center trained with seeds 0, 1 and 2, each point's 80 questions answered right a little differently."""
    runs = []
    for seed, right in {0: range(0, 40), 1: range(2, 44), 2: range(10, 70)}.items():
        name = f"ablations/adapter_layers~4/gate_init~zero/epochs~5/method~adapter/seed~{seed}"
        r = run(name, 4, "zero", 5)
        r.point = point_settings(name)
        runs.append(answered(r, right))
    return runs


def test_a_seed_axis_measures_retraining_not_a_trend():
    """Seeds name trainings, they are no amount: three seeds of the center get no trend line (a slope over seed
    numbers means nothing), only each retraining against the center's, which says how far training again moves
    the accuracy."""
    trend, verdict = verdict_of(seed_axis(), "seed", 0)
    assert trend["trend"] == "none: values not amounts in order" and pd.isna(trend["slope"])
    assert verdict.startswith("Against the center (seed = 0: 50.00), question by question: seed = 1: 52.50, p = ")
    assert "seed = 2: 75.00, p = " in verdict and "higher beyond chance" in verdict and "No trend line" not in verdict
    assert ablation_table_name("seed")[0] == "ablation_seed"


def test_points_of_other_questions_rest_on_their_intervals_and_a_short_axis_has_no_trend():
    """Points scored on other questions than the center's have no paired test and no paired trend: the verdict says
    so and reads their intervals conservatively (apart, else nothing shown). Two points make no trend; an axis
    without the center pairs nothing."""
    runs = layer_axis({1: range(0, 10), 2: range(0, 45), 4: range(0, 48)},
                      questions={1: "a" * 64, 2: "b" * 64, 4: "c" * 64})
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    assert trend["trend"] == UNPAIRED and pd.isna(trend["slope"])
    assert verdict.startswith(f"No trend line: {UNPAIRED.removeprefix('none: ')}. ")
    assert (f"The point adapter_layers = 1 is {UNPAIRED_POINT}, so its verdict rests on the intervals only: 12.50 "
            "[6.93, 21.50] against 60.00 [49.05, 70.04], apart, lower, which no paired test checks.") in verdict
    assert f"The point adapter_layers = 2 is {UNPAIRED_POINT}" in verdict and "p = " not in verdict


def test_points_without_answers_one_by_one_are_not_said_to_be_of_other_questions():
    """A scores.json that keeps no answers one by one (written before evaluate kept correct_pids) may be of the
    center's very questions: the verdict said the point "was not scored on the center's questions" and read apart
    intervals as "beyond this noise", which for two rows of the same questions they are not (5 of 5 against 0 of
    5: apart, McNemar's p 0.0625)."""
    runs = []
    for layers, accuracy in {1: 0.0, 2: 50.0, 4: 100.0}.items():
        r = point(layers, "zero", 5)
        r.scores |= {"n": 5, "accuracy": accuracy}
        runs.append(r)
    _, verdict = verdict_of(runs, "adapter_layers", 4)
    assert "not scored on the center's questions" not in verdict and "beyond this noise" not in verdict, verdict
    assert f"adapter_layers = 1 is {UNPAIRED_POINT}" in verdict, verdict
    assert "overlapping: no difference shown, none ruled out" in verdict
    _, verdict = verdict_of(layer_axis({2: range(0, 40), 4: range(0, 48)}), "adapter_layers", 4)
    assert verdict.startswith("No trend line: 2 points, a trend needs 3. Against the center")
    _, verdict = verdict_of(layer_axis({4: range(0, 48)}), "adapter_layers", 4)
    assert verdict == "No trend line: 1 point, a trend needs 3.", verdict  # not "1 points"
    _, verdict = verdict_of(layer_axis({1: range(0, 40), 2: range(0, 48)}), "adapter_layers", 4)
    assert verdict.endswith("The center (adapter_layers = 4) is not among this axis's points: no point is paired "
                            "with it.")


def test_the_verdict_pairs_with_the_center_the_table_pairs_with():
    """A center given to the CLI as text ("4") or a boolean sets its point (Run.sets: as the folder name writes
    it), and the table paired every point with it; the verdict said the center "is not among this axis's points:
    no point is paired with it"."""
    runs = ablation_axis(layer_axis({1: range(0, 20), 2: range(5, 30), 4: range(0, 56)}), "adapter_layers",
                         CENTER | {"adapter_layers": "4"}, ["1", "2", "4"])
    _, verdict = verdict_of(runs, "adapter_layers", "4")
    assert "Against the center (adapter_layers = 4: 70.00), question by question: adapter_layers = 1: 25.00" in \
        verdict and "not among" not in verdict, verdict
    runs = []
    for flag, right in {"True": range(0, 40), "False": range(0, 20)}.items():
        name = f"ablations/adapter_layers~4/gate_init~zero/epochs~5/method~adapter/fsdp~{flag}"
        runs.append(answered(run(name), right))
        runs[-1].point = point_settings(name)
    runs = ablation_axis(runs, "fsdp", CENTER | {"fsdp": True}, [True, False])
    assert ablation_table(runs, "fsdp", True)["paired_with"].iloc[1] == runs[0].name
    _, verdict = verdict_of(runs, "fsdp", True)
    assert verdict.startswith("Against the center (fsdp = True: 50.00), question by question: fsdp = False: 25.00"), \
        verdict


def test_report_md_says_each_ablations_verdict_under_its_heading(grid):
    """report.md's ablation section opens with its verdict, and its legend says how the trend is computed; the
    trends table holds the numbers."""
    from llama_adapter.report import report_markdown, trends_table

    runs = layer_axis({1: range(0, 20), 2: range(0, 30), 4: range(0, 56)})
    tables = {"insertion_layers": ablation_table(runs, "adapter_layers", 4),
              "ablation_trends": trends_table({"adapter_layers": runs})}
    captions = {k: v for k, v in report_tables(["adapter_layers"]).items() if k in tables}
    md = report_markdown(tables, captions, runs, CENTER, {"samples": 1, "mean": 1.0, "max": 1})
    assert "## Ablation: number of adapted (top) layers (the paper's beside ours: by rank at its 3 values, else by " \
           "equal value, n/a elsewhere)\n\n**Verdict.** Accuracy rises with adapter_layers beyond " \
           "this noise" in md
    assert "an axis of another count only where a value equals one the paper measured" in md
    assert "least-squares slope of its correctness" in md and "Student's t, n - 1 degrees of freedom" in md
    assert list(tables["ablation_trends"]["items"]) == [80]


def test_a_trend_of_no_spread_is_not_called_beyond_noise_by_a_zero_width_interval():
    """Three questions, each wrong at 1 layer and right at 2 and 4: every question's slope is the same, so the
    slopes' sd is 0 and the t interval has no width. The verdict called it a rise 'beyond this noise' over three
    questions, beside the paired test of the same data saying no difference (p = 0.25)."""
    runs = [answered(point(layers, "zero", 5), right) for layers, right in
            {1: range(0, 0), 2: range(0, 3), 4: range(0, 3)}.items()]
    for r in runs:
        r.scores |= {"n": 3, "accuracy": 100 * r.scores["correct"] / 3}
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    assert f"p = {p_cell(mcnemar_p(0, 3))}, no difference this data shows" in verdict  # the paired test: no
    assert "beyond this noise" not in verdict, verdict
    assert trend["trend"] == "none: every question's slope is the same, no spread to give an interval"
    assert verdict.startswith("No trend line: every question's slope is the same, no spread to give an interval.")


def test_a_flat_trend_of_no_spread_does_not_rule_out_every_change():
    """The same questions right at every point (or the same loss on every sample): each slope exactly 0, their sd
    0, an interval [0, 0]. The verdict said a rise or a fall of more than 0 per adapted layer "is ruled out at
    95%": 80 questions (3 samples) that did not change rule out no small change; the paired tests speak."""
    trend, verdict = verdict_of(layer_axis({1: range(0, 50), 2: range(0, 50), 4: range(0, 50)}), "adapter_layers", 4)
    assert trend["trend"] == "none: every question's slope is the same, no spread to give an interval"
    assert pd.isna(trend["slope"]) and "ruled out" not in verdict, verdict
    assert verdict.startswith("No trend line: every question's slope is the same, no spread to give an interval. "
                              "Against the center (adapter_layers = 4: 62.50), question by question: "
                              "adapter_layers = 1: 62.50, p = 1, no difference this data shows")
    runs = []
    for epochs in (3, 5, 8):
        runs.append(scored_samples(point(4, "zero", epochs), [1.0, 2.0, 3.0]))
        runs[-1].dataset = "alpaca"
    trend, verdict = verdict_of(runs, "epochs", 5)
    assert trend["trend"] == "none: every sample's slope is the same, no spread to give an interval"
    assert "ruled out" not in verdict, verdict


def test_samples_whose_losses_never_change_have_no_spread_whatever_their_values():
    """The same per-sample losses at every point, of values whose mean over the points is not the value itself in
    floating point (0.1 + 0.1 + 0.1 != 0.3): each column less its mean left rounding residues of ~1e-17, so the
    verdict gave a slope of -8e-34 with an interval of width ~4e-33 and said a change of more than 1.39e-33 per
    adapted layer "is ruled out at 95%"; unchanged samples rule out no small change."""
    losses = [float(x) for x in np.random.default_rng(0).uniform(0.1, 3.0, 50)]
    runs = [scored_samples(point(layers, "zero", 5), list(losses)) for layers in (1, 2, 4)]
    for r in runs:
        r.dataset = "alpaca"
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    assert trend["trend"] == "none: every sample's slope is the same, no spread to give an interval", trend["slope"]
    assert "ruled out" not in verdict, verdict


def test_the_legend_does_not_say_the_seeds_noise_goes_unmeasured_beside_a_seed_ablation():
    """With a seed axis the report measures how far training again moves a result (its ablation_seed table and
    verdict): the legend said that amount was one 'this report does not measure'."""
    from llama_adapter.report import report_markdown, trends_table

    runs = seed_axis()
    center = CENTER | {"seed": 0}
    tables = {"ablation_seed": ablation_table(runs, "seed", 0), "ablation_trends": trends_table({"seed": runs})}
    captions = {name: name for name in tables}
    md = report_markdown(tables, captions, [], center, {"samples": 1, "mean": 1.0, "max": 1})
    legend = md.split("\n## ")[0]
    assert "for one training of each row" in legend and "this report does not measure" not in legend, legend
    assert "`ablation_seed`" in legend
    plain = report_markdown({}, {}, [], CENTER, {"samples": 1, "mean": 1.0, "max": 1})
    assert "this report does not measure" in plain and "`ablation_seed`" not in plain


def blr_axis(rights: dict) -> list[Run]:
    """A blr axis at the center's other settings, each point's 80 questions answered right as `rights` says."""
    runs = []
    for blr, right in rights.items():
        name = f"ablations/adapter_layers~4/gate_init~zero/epochs~5/blr~{blr}/method~adapter"
        r = run(name)
        r.point = point_settings(name)
        runs.append(answered(r, right))
    return runs


def test_a_learning_rate_trend_runs_over_its_decades():
    """blr set by decades (0.0009, 0.009, 0.09): the line runs over log10(blr), per 10x blr, as a researcher reads
    a learning-rate sweep; over blr itself the last step (90% of the range) would set it alone. Each question's
    slope over the logarithms, as polyfit computes it."""
    runs = blr_axis({0.0009: range(0, 20), 0.009: range(0, 40), 0.09: range(0, 44)})
    trend, verdict = verdict_of(runs, "blr", 0.009)
    slope, low, high = independent_trend([-4 + math.log10(9), -3 + math.log10(9), -2 + math.log10(9)],
                                         [[100 * y for y in row] for row in right_or_not(runs)])
    assert (trend["per"], trend["slope"]) == ("10× blr", pytest.approx(slope)) and slope == pytest.approx(15.0)
    assert (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert verdict.startswith(f"Accuracy rises with blr beyond this noise: +{slope:.3g} points per 10× blr, 95% "
                              f"[{low:.3g}, {high:.3g}]")
    linear = np.polyfit([0.0009, 0.009, 0.09], [25.0, 50.0, 55.0], 1)[0]  # what a line over blr itself gives
    assert trend["slope"] != pytest.approx(linear)


def alpaca_tokens(folder, lengths=(3, 5, 8, 13)):
    """A tokenize folder of Alpaca: stats.json and train/val splits of samples of `lengths` tokens."""
    (folder / "stats.json").parent.mkdir(parents=True)
    (folder / "stats.json").write_text(json.dumps({"dataset": "alpaca"}))
    for split in ("train", "val"):
        (folder / split).mkdir()
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        np.save(folder / split / "tokens.npy", np.ones(offsets[-1], dtype=np.int32))
        np.save(folder / split / "offsets.npy", offsets.astype(np.int64))
        np.save(folder / split / "loss_mask.npy", np.ones(offsets[-1], dtype=bool))
        np.save(folder / split / "source_index.npy", np.arange(len(lengths), dtype=np.int64))
    return folder


def test_each_figure_is_written_as_png_and_as_the_same_pdf_every_time(tmp_path, monkeypatch):
    """A paper takes the PDF (vectors); the demo's outputs are compared across two runs byte for byte, so neither
    format may carry the day it was written (matplotlib's PDF CreationDate: the two writes are a day apart by the
    clock matplotlib reads it from)."""
    from llama_adapter.report import FIGURES, write_report

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"task": "alpaca", "method": "zero-shot", "base": "b", "heldout_loss": 1.0,
                                  "perplexity": 2.7, "heldout_samples": 4}))
    (tmp_path / "generations.jsonl").write_text(json.dumps({"id": 1, "prompt": "Say hi.", "output": "Hi."}) + "\n")
    inputs = ReportInputs(experiments=["zs"], scores={"zs": scores}, generations={"zs": tmp_path / "generations.jsonl"},
                          tokens={"alpaca": alpaca_tokens(tmp_path / "t")})
    written = []
    for out, day in (("a", "1700000000"), ("b", "1700086400")):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", day)
        write_report(tmp_path / out, inputs, {}, {})
        written.append({f"{name}.{fmt}": (tmp_path / out / f"{name}.{fmt}").read_bytes()
                        for name in FIGURES for fmt in ("png", "pdf")})
    assert written[0] == written[1]
    assert all(data.startswith(b"%PDF-") for name, data in written[0].items() if name.endswith(".pdf"))
    assert all(data.startswith(b"\x89PNG") for name, data in written[0].items() if name.endswith(".png"))
    md = (tmp_path / "a" / "report.md").read_text()
    assert md.count(".pdf") == 1 and "![Token lengths of the Alpaca samples (prompt + response)](alpaca_lengths.png)" \
        in md
    assert "ablations.png" in written[0] and "](ablations.png)" in md


def test_an_empty_generations_file_is_refused_not_shown_as_no_generations(tmp_path):
    """generate refuses a prompt file without prompts, so its JSONL holds a line per prompt: an empty one (a copy
    cut short, a file truncated) gave the adapter no row in the generations table without a word, and a report
    written whole. Refused, naming the file; a malformed line names its line."""
    from llama_adapter.report import generations_table

    adapter = scored_samples(run("instruction"), [1.0])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'empty.jsonl'}: holds no generations")):
        generations_table({"instruction": tmp_path / "empty.jsonl"}, [adapter])
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": 1, "prompt": "### Instruction:\nSay hi.", "output": "Hi."}))
    assert list(generations_table({"instruction": tmp_path / "one.jsonl"}, [adapter])["output"]) == ["Hi."]
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'bad.jsonl'}, line 1: ")):
        generations_table({"instruction": tmp_path / "bad.jsonl"}, [adapter])


def test_generations_holding_a_unicode_line_separator_are_read_whole(tmp_path):
    """generate writes its answers as UTF-8 JSON Lines (write_jsonl: a line per answer, ended by "\n" alone): an
    answer holding U+2028, U+2029 or NEL (U+0085), which JSON leaves unescaped, was cut there by str.splitlines, and
    the report refused the file generate wrote as malformed. Its lines are read as generate ends them."""
    from llama_adapter.io import write_jsonl
    from llama_adapter.report import generations_table

    adapter = scored_samples(run("instruction"), [1.0])
    outputs = ["Hi.\u2028There.", "One\u2029two\x85three."]
    write_jsonl(tmp_path / "g.jsonl", [{"id": i, "prompt": "### Instruction:\nSay hi.", "output": o}
                                       for i, o in enumerate(outputs)])
    assert list(generations_table({"instruction": tmp_path / "g.jsonl"}, [adapter])["output"]) == outputs


def test_generations_of_several_adapters_in_one_file_keep_each_rows_adapter(tmp_path):
    """generate --adapter A=... --adapter B=... writes each row's adapter: the table named every row after the
    experiment alone, so the file read as one adapter answering each id twice. Where the file holds several
    adapters, a row is named EXPERIMENT/ADAPTER; one adapter's file (the workflow's, named after the experiment or
    not) keeps the experiment's name."""
    from llama_adapter.io import write_jsonl
    from llama_adapter.report import generations_table

    adapter = scored_samples(run("instruction"), [1.0])
    write_jsonl(tmp_path / "two.jsonl", [{"id": i, "adapter": a, "prompt": "### Instruction:\nSay hi.", "output": o}
                                         for i in (1, 2) for a, o in (("A", f"a{i}"), ("B", f"b{i}"))])
    table = generations_table({"instruction": tmp_path / "two.jsonl"}, [adapter])
    assert list(zip(table["adapter"], table["id"], table["output"])) == [
        ("instruction/A", 1, "a1"), ("instruction/B", 1, "b1"), ("instruction/A", 2, "a2"), ("instruction/B", 2, "b2")]
    write_jsonl(tmp_path / "one.jsonl", [{"id": i, "adapter": "base", "prompt": "### Instruction:\nSay hi.",
                                          "output": "o"} for i in (1, 2)])
    assert list(generations_table({"instruction": tmp_path / "one.jsonl"}, [adapter])["adapter"]) == ["instruction"] * 2
    for bad in ('{"id": 1, "adapter": 3, "prompt": "p", "output": "o"}', "[1]"):  # (a list: AttributeError before)
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'bad.jsonl'}, line 1: expected a JSON object")):
            generations_table({"instruction": tmp_path / "bad.jsonl"}, [adapter])


def drawn(monkeypatch, tmp_path, figure, runs, *args):
    """The Axes a figure function drew (the array of its panels, for one of several), as it was saved; `args`
    after the path."""
    import llama_adapter.report as report

    saved = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda plt, fig, ax, path, title: (saved.append(ax),
                                                                            save(plt, fig, ax, path, title)))
    figure(runs, tmp_path / "figure.png", *args)
    return saved[0]


def test_the_loss_curves_are_labelled_with_their_unit_and_series(monkeypatch, tmp_path):
    from llama_adapter.report import loss_curves_figure

    ax = drawn(monkeypatch, tmp_path, loss_curves_figure, [point(4, "zero", 5), point(4, "random", 5)])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "training loss (nats per target token)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gate init: zero", "gate init: random"]


@pytest.mark.filterwarnings("error:No artists with labels")
def test_a_figure_without_data_says_so_instead_of_an_empty_legend(monkeypatch, tmp_path):
    """A config that varies no gate_init, or trains no adapter, had blank axes (and matplotlib's warning)."""
    from llama_adapter.report import gate_figure, loss_curves_figure

    for figure in (loss_curves_figure, gate_figure):
        ax = drawn(monkeypatch, tmp_path, figure, [])
        assert ax.get_legend() is None and "no run of this report" in ax.texts[0].get_text()


def test_the_category_figure_draws_each_interval_and_the_papers_numbers_the_table_has(monkeypatch, tmp_path):
    """The text-only adapter's paper number (LLaMA-Adapter_T, an average only) was in the table but not in the
    figure, which showed only the multimodal paper's bars."""
    from llama_adapter.report import PAPER_SCIENCEQA, category_figure, wilson_interval

    ax = drawn(monkeypatch, tmp_path, category_figure, [scored_run()])  # 48 of 80 right, text-only
    assert ax.get_ylabel() == "accuracy (%), 95% interval"
    from matplotlib.container import BarContainer

    def whiskers(bars):
        return [(round(low, 2), round(high, 2)) for (_, low), (_, high) in bars.errorbar.lines[2][0].get_segments()]

    ours, paper = (c for c in ax.containers if isinstance(c, BarContainer))
    assert ours.get_label() == "scienceqa" and paper.get_label() == "paper: LLaMA-Adapter"
    assert whiskers(ours)[0] == wilson_interval(48, 80)  # the average's
    assert whiskers(ours)[1:] == [wilson_interval(5, 10)] * 8  # 50% of 10 in each category
    assert [b.get_height() for b in paper] == list(PAPER_SCIENCEQA["LLaMA-Adapter"].values())
    assert paper.errorbar is None  # published without intervals
    text_only = next(c for c in ax.collections if c.get_label() == "paper: LLaMA-Adapter_T (average only)")
    assert {y for segment in text_only.get_segments() for _, y in segment} == {78.31}
    multimodal = drawn(monkeypatch, tmp_path, category_figure, [scored_run(config={"image_features": "f"})])
    assert all(not c.get_label().startswith("paper: LLaMA-Adapter_T") for c in multimodal.collections)


def test_a_lora_rank_trend_runs_over_its_doublings():
    """lora_rank set by doublings (4, 8, 16, 32): the line runs over log2 of the rank, per doubling, as the blr axis
    runs per 10x; a rank of 0 (no LoRA) has no logarithm, and the trend says so rather than failing."""
    def rank_axis(rights: dict) -> list[Run]:
        runs = []
        for rank, right in rights.items():
            name = f"ablations/adapter_layers~4/gate_init~zero/epochs~5/lora_rank~{rank}/method~lora"
            r = run(name, method="lora")
            r.point = point_settings(name)
            runs.append(answered(r, right))
        return runs

    runs = rank_axis({4: range(0, 20), 8: range(0, 30), 16: range(0, 44), 32: range(0, 48)})
    trend, verdict = verdict_of(runs, "lora_rank", 8)
    slope, low, high = independent_trend([2, 3, 4, 5], [[100 * y for y in row] for row in right_or_not(runs)])
    assert (trend["per"], trend["slope"]) == ("doubling of lora_rank", pytest.approx(slope))
    assert (trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert f"points per doubling of lora_rank, 95% [{low:.3g}, {high:.3g}]" in verdict, verdict
    trend, _ = verdict_of(rank_axis({0: range(0, 20), 8: range(0, 30), 16: range(0, 44)}), "lora_rank", 8)
    assert trend["trend"] == "none: a line over lora_rank's logarithm needs values above 0"


def ablation_tables(axes: dict[str, list[Run]], center: dict) -> dict[str, pd.DataFrame]:
    """The tables write_report makes of ablation axes: one per axis and the trends."""
    from llama_adapter.report import trends_table

    return {**{ablation_table_name(a)[0]: ablation_table(runs, a, center[a]) for a, runs in axes.items()},
            "ablation_trends": trends_table(axes)}


def trend_line(ax):
    return next(line for line in ax.get_lines() if line.get_label().startswith("trend "))


def test_the_ablations_figure_draws_each_ordered_axis_as_its_tables_do(monkeypatch, tmp_path):
    """A panel per axis of ordered numbers (gate_init, categorical, has its table only): the points and whiskers
    are the table's accuracies and Wilson intervals, the center's point is marked, the paper's accuracies stand at
    the settings they are paired with, and the trend line has the trends table's slope, labelled as the verdict
    says it; blr's runs over its decades on a log axis."""
    from llama_adapter.report import ablations_figure

    center = {"adapter_layers": 4, "gate_init": "zero", "blr": 0.009}
    axes = {"adapter_layers": layer_axis({1: range(0, 20), 2: [*range(5, 30), 70], 4: range(0, 56)}),
            "gate_init": [point(4, "zero", 5), point(4, "random", 5)],
            "blr": blr_axis({0.0009: range(0, 20), 0.009: range(0, 40), 0.09: range(0, 44)})}
    tables = ablation_tables(axes, center)
    layers, blr = drawn(monkeypatch, tmp_path, ablations_figure, tables, center)
    trends = tables["ablation_trends"].set_index("axis")
    for ax, axis in ((layers, "adapter_layers"), (blr, "blr")):
        table = tables[ablation_table_name(axis)[0]]
        (ours,) = ax.containers
        assert ours.lines[0].get_xydata().tolist() == [[x, y] for x, y in zip(table[axis], table["accuracy"])]
        assert [(low, high) for (_, low), (_, high) in ours.lines[2][0].get_segments()] == \
            list(zip(table["ci95_low"], table["ci95_high"]))
        (mark,) = [line for line in ax.get_lines() if line.get_label().startswith("center")]
        assert mark.get_xydata().tolist() == [[center[axis], table["accuracy"][table[axis] == center[axis]].item()]]
        along = np.log10 if axis == "blr" else np.asarray  # what the slope is per: 10x blr, an adapted layer
        (t0, y0), (t1, y1) = [(along(x), y) for x, y in trend_line(ax).get_xydata()]
        assert (y1 - y0) / (t1 - t0) == pytest.approx(trends.loc[axis, "slope"])
        # through the points' mean
        assert y0 + (y1 - y0) / (t1 - t0) * (np.mean(along(table[axis].to_numpy(float))) - t0) == pytest.approx(
            table["accuracy"].mean())
    assert trend_line(layers).get_label() == "trend +15.5 points per adapted layer, 95% [11.8, 19.3]"
    assert [line.get_xydata().tolist() for line in layers.get_lines() if line.get_label().startswith("paper")] \
        == [[[layers_, p[2]] for layers_, p in zip((1, 2, 4), PAPER_LAYERS)]]
    assert (layers.get_xscale(), blr.get_xscale()) == ("linear", "log")
    assert (layers.get_xlabel(), blr.get_xlabel()) == ("adapter_layers: number of adapted layers", "blr (log scale)")
    assert layers.get_ylabel() == "accuracy (%), 95% interval"


def test_the_ablations_figure_of_no_ordered_axis_says_so_and_is_the_same_every_time(monkeypatch, tmp_path):
    """A config whose ablations vary only categorical axes (or none) still writes the figure the workflow declares,
    saying why it is empty; and a drawn figure is the same bytes on another day, as the others are."""
    from llama_adapter.report import ablations_figure

    center = {"gate_init": "zero"}
    ax = drawn(monkeypatch, tmp_path, ablations_figure,
               ablation_tables({"gate_init": [point(4, "zero", 5), point(4, "random", 5)]}, center), center)
    assert ax.texts[0].get_text() == "no ablation of this report varies an axis of ordered numbers"
    center = {"epochs": 5}
    tables = ablation_tables({"epochs": [answered(point(4, "zero", e), range(0, e * 8)) for e in (3, 5, 8)]}, center)
    written = []
    for out, day in (("a", "1700000000"), ("b", "1700086400")):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", day)
        (tmp_path / out).mkdir()
        ablations_figure(tables, tmp_path / out / "ablations.png", center)
        written.append([(tmp_path / out / f"ablations.{fmt}").read_bytes() for fmt in ("png", "pdf")])
    assert written[0] == written[1]


# --- what an Alpaca trend measures, and a trend over the points paired with each other ----------------------------

def alpaca_axis(sample_losses: dict, tokens: list[int]) -> list[Run]:
    """An Alpaca epochs axis: each point's held-out samples' own losses (None: a scores.json that kept none, as
    before evaluate kept them), and its heldout_loss as evaluate writes it, the mean over every target token
    (`tokens` of them in each sample), so that a long sample weighs more."""
    runs = []
    for epochs, losses in sample_losses.items():
        r = point(4, "zero", epochs)
        r.dataset = "alpaca"
        token_weighted = float(np.average([x if x is not None else math.nan for x in losses[0]], weights=tokens)) \
            if losses[1] else losses[0]
        r.scores = {"heldout_loss": token_weighted, "perplexity": math.exp(token_weighted),
                    "heldout_samples": len(tokens), **({"samples_sha256": "s" * 64, "sample_losses": losses[0]}
                                                       if losses[1] else {})}
        runs.append(r)
    return runs


def rising_short_falling_long(rng, epochs=(3, 5, 8)) -> tuple[dict, list[int]]:
    """Eight one-token samples whose loss rises with epochs and one of 200 tokens whose loss falls: the mean of the
    samples' losses rises, the token-weighted loss falls."""
    tokens = [1] * 8 + [200]
    return {e: ([*(1.0 + 0.1 * e + rng.normal(0, 0.05, 8)), 4.0 - 0.3 * e], True) for e in epochs}, tokens


def test_an_alpaca_figure_draws_the_per_sample_losses_its_trend_is_fitted_on(monkeypatch, tmp_path):
    """The trend of an Alpaca axis is fitted over each sample's loss, the samples weighing alike; the figure drew
    it through the token-weighted heldout_loss, which here falls while the per-sample mean rises: a line rising
    through falling points. The points it runs through are now the samples' mean loss (the table's
    sample_mean_loss), the token-weighted loss drawn beside them under its own name, and the verdict says which
    loss its trend measures."""
    from llama_adapter.report import ablations_figure

    losses, tokens = rising_short_falling_long(np.random.default_rng(1))
    runs = alpaca_axis(losses, tokens)
    center = {"epochs": 5}
    tables = ablation_tables({"epochs": runs}, center)
    per_sample = [float(np.mean(x)) for x, _ in losses.values()]  # each point's samples, weighing alike
    token_weighted = [float(np.average(x, weights=tokens)) for x, _ in losses.values()]
    assert np.polyfit([3, 5, 8], per_sample, 1)[0] > 0 > np.polyfit([3, 5, 8], token_weighted, 1)[0]
    table = tables["epochs"]
    assert table["sample_mean_loss"].tolist() == pytest.approx(per_sample)
    assert table["heldout_loss"].tolist() == pytest.approx(token_weighted)
    ax = drawn(monkeypatch, tmp_path, ablations_figure, tables, center)
    (ours,) = [line for line in ax.get_lines() if line.get_label().startswith("ours: mean")]
    assert ours.get_xydata() == pytest.approx(np.array([[3, 5, 8], per_sample]).T)
    (weighted,) = [line for line in ax.get_lines() if "token-weighted" in line.get_label()]
    assert weighted.get_xydata() == pytest.approx(np.array([[3, 5, 8], token_weighted]).T)
    slope, low, high = independent_trend([3, 5, 8], [x for x, _ in losses.values()])
    (t0, y0), (t1, y1) = trend_line(ax).get_xydata()
    assert (y1 - y0) / (t1 - t0) == pytest.approx(slope) == pytest.approx(np.polyfit([3, 5, 8], per_sample, 1)[0])
    assert y0 + (y1 - y0) / (t1 - t0) * (np.mean([3, 5, 8]) - t0) == pytest.approx(np.mean(per_sample))
    trend, verdict = verdict_of(runs, "epochs", 5)
    assert trend["measure"] == "sample_mean_loss"
    assert "each sample's loss (its token mean), the samples weighing alike (`sample_mean_loss`), not every " \
           "token alike (`heldout_loss`)" in verdict, verdict


def four_layer_axis(unpaired: dict) -> list[Run]:
    """Points at 1, 2, 4 (the center) and 8 layers, rising, on the same 80 questions, but for those in `unpaired`:
    None, a scores.json without answers one by one (an older run); else the digest of other questions."""
    runs = layer_axis({1: range(0, 20), 2: [*range(5, 30), 70], 4: range(0, 56), 8: range(0, 60)},
                      questions={layers: digest for layers, digest in unpaired.items() if digest})
    for r in runs:
        if r.axis_value("adapter_layers") in unpaired and not unpaired[r.axis_value("adapter_layers")]:
            del r.scores["correct_pids"], r.scores["questions_sha256"]
    return runs


@pytest.mark.parametrize("unpaired", [{8: None}, {8: "o" * 64}, {4: None}, {1: "o" * 64}])
def test_a_trend_runs_over_the_points_paired_with_each_other_and_names_those_left_out(unpaired):
    """One point not paired one by one with the others (an older run's scores, or other questions) took the whole
    axis's trend with it. The trend is over the points paired with each other, as an independent fit over them
    gives it, and the verdict names the point left out; the center may be that point."""
    runs = four_layer_axis(unpaired)
    paired = [r for r in runs if r.axis_value("adapter_layers") not in unpaired]
    x = [r.axis_value("adapter_layers") for r in paired]
    trend, verdict = verdict_of(runs, "adapter_layers", 4)
    slope, low, high = independent_trend(x, [[100 * y for y in row] for row in right_or_not(paired)])
    assert (trend["trend"], trend["items"], trend["points"]) == ("paired linear", 80, 4)
    assert (trend["slope"], trend["ci95_low"], trend["ci95_high"]) == (pytest.approx(slope), pytest.approx(low),
                                                                       pytest.approx(high))
    assert trend["left_out"] == list(unpaired)
    assert f"(a paired linear trend over 80 questions, adapter_layers {min(x)} to {max(x)})" in verdict, verdict
    named = ", ".join(f"adapter_layers = {v}" for v in unpaired)
    assert (f"Left out of the trend: {named}, not paired one by one with the other {len(paired)} points "
            f"{UNPAIRED_WHY}.") in verdict, verdict


@pytest.mark.parametrize("unpaired, why", [
    ({1: None, 8: None}, "none: 2 of 4 points paired one by one, a trend needs 3"),
    ({1: None, 2: None, 8: None}, UNPAIRED),  # one point: paired with none
    ({1: None, 2: None, 4: None, 8: None}, UNPAIRED),
    ({1: "a" * 64, 2: "b" * 64, 4: "c" * 64, 8: "d" * 64}, UNPAIRED)])
def test_fewer_paired_points_than_a_trend_needs_give_none_and_say_why(unpaired, why):
    trend, verdict = verdict_of(four_layer_axis(unpaired), "adapter_layers", 4)
    assert trend["trend"] == why and pd.isna(trend["slope"])
    assert verdict.startswith(f"No trend line: {why.removeprefix('none: ')}."), verdict
    # Two points paired with each other: the rest are named as not paired with them; fewer: no point is named.
    assert trend["left_out"] == ([1, 8] if why != UNPAIRED else [])


def test_the_figure_marks_the_points_left_out_of_the_trend(monkeypatch, tmp_path):
    """The trend line runs through the mean of the points it is fitted on, and each point left out of it is marked
    and named; an Alpaca point without its samples' losses is drawn at its token-weighted loss only."""
    from llama_adapter.report import ablations_figure

    center = {"adapter_layers": 4, "epochs": 5}
    losses, tokens = rising_short_falling_long(np.random.default_rng(2))
    losses[13] = (2.5, False)  # an older run's scores: the token-weighted loss alone
    axes = {"adapter_layers": four_layer_axis({8: None}), "epochs": alpaca_axis(losses, tokens)}
    tables = ablation_tables(axes, center)
    layers, epochs = drawn(monkeypatch, tmp_path, ablations_figure, tables, center)
    trends = tables["ablation_trends"].set_index("axis")
    for ax, fitted_x, fitted_y, left_out in (
            (layers, [1, 2, 4], [25.0, 32.5, 70.0], [8, 75.0]),
            (epochs, [3, 5, 8], [np.mean(losses[e][0]) for e in (3, 5, 8)], [13, 2.5])):
        axis = ax.get_title()
        (t0, y0), (t1, y1) = trend_line(ax).get_xydata()
        assert (y1 - y0) / (t1 - t0) == pytest.approx(trends.loc[axis, "slope"])
        assert y0 + (y1 - y0) / (t1 - t0) * (np.mean(fitted_x) - t0) == pytest.approx(np.mean(fitted_y))
        (mark,) = [line for line in ax.get_lines() if line.get_label().startswith("left out")]
        assert mark.get_label() == f"left out of the trend (not paired): {axis} = {left_out[0]}"
        assert mark.get_xydata().tolist() == [left_out]


def test_a_list_cell_reads_as_its_values_in_markdown_and_latex():
    """ablation_trends' left_out holds a list per row: report.md and the .tex table show its values, or none, not
    Python's brackets."""
    from llama_adapter.report import to_latex, to_markdown

    df = pd.DataFrame({"axis": ["epochs", "blr"], "left_out": [[8, 13], []]})
    assert to_markdown(df).splitlines()[2:] == ["| epochs | 8, 13 |", "| blr | none |"]
    assert r"epochs & 8, 13 \\" in to_latex(df, "trends") and r"blr & none \\" in to_latex(df, "trends")


def test_an_alpaca_center_without_its_samples_losses_is_still_circled(monkeypatch, tmp_path):
    """The center's circle stood at the table's sample_mean_loss, which an older run's scores (no per-sample
    losses) leave empty: the circle was drawn at NaN, i.e. not at all. It circles the point as drawn, at its
    token-weighted loss."""
    from llama_adapter.report import ablations_figure

    losses, tokens = rising_short_falling_long(np.random.default_rng(3), epochs=(3, 8, 13))
    losses[5] = (2.5, False)  # the center: an older run's scores, the token-weighted loss alone
    center = {"epochs": 5}
    ax = drawn(monkeypatch, tmp_path, ablations_figure, ablation_tables({"epochs": alpaca_axis(losses, tokens)},
                                                                         center), center)
    (circle,) = [line for line in ax.get_lines() if line.get_label() == "center (epochs = 5)"]
    assert circle.get_xydata().tolist() == [[5, 2.5]]


def test_scores_of_another_method_than_the_training_are_refused_naming_both_files(tmp_path):
    """--scores x=<an adapter's evaluation> --training x=<a LoRA training> gave a row labelled LoRA with the
    adapter's numbers: what evaluate scored (scores.json's method) must be what the training trained."""
    inputs = trained_row(tmp_path, TRAINING_METRICS, {"base": "b", "train_data": "t", "method": "lora"})
    with pytest.raises(InputError) as e:
        load_run("e", inputs)
    said = str(e.value)
    assert str(tmp_path / "scores.json") in said and str(tmp_path / "run" / "config.json") in said, said
    assert "adapter" in said and "lora" in said and "expected" in said, said
    # A config.json without a method is the default's (adapter): the row is the same method as its scores
    assert load_run("e", trained_row(tmp_path, TRAINING_METRICS)).method == "adapter"


def test_scores_of_another_training_folder_are_refused(tmp_path):
    """evaluate records the folder of the training it scored (scores.json's training): a --training naming another
    folder is refused, naming both; a recorded folder that no longer exists (results moved) is not compared."""
    inputs = trained_row(tmp_path, TRAINING_METRICS)
    scores = json.loads((tmp_path / "scores.json").read_text())
    (tmp_path / "other").mkdir()
    for recorded, refused in ((tmp_path / "run", False), (tmp_path / "other", True), (tmp_path / "gone", False)):
        (tmp_path / "scores.json").write_text(json.dumps(scores | {"training": str(recorded)}))
        if not refused:
            assert load_run("e", inputs).name == "e"
            continue
        with pytest.raises(InputError, match=re.escape(f"--training e={tmp_path / 'run'}: ") + ".*"
                           + re.escape(str(tmp_path / "other"))):
            load_run("e", inputs)


def ablation_row(tmp_path, name: str, config: dict, scores: dict | None = None) -> ReportInputs:
    """The inputs of one grid point `name` whose training wrote `config` (scores: its scores.json laid over)."""
    inputs = trained_row(tmp_path, TRAINING_METRICS, {"base": "b", "train_data": "t", **config})
    if scores is not None:
        (tmp_path / "scores.json").write_text(json.dumps(SCIENCEQA_SCORES | scores))
    return ReportInputs(experiments=[], ablations=[name], scores={name: inputs.scores["e"]},
                        tokens=inputs.tokens, trainings={} if scores and scores.get("method") == "zero-shot"
                        else {name: inputs.trainings["e"]})


@pytest.mark.parametrize("name,config,key,named,trained", [
    ("ablations/adapter_layers~7/method~adapter", {"adapter_layers": 2}, "adapter_layers", "7", "2"),
    ("ablations/gate_init~random/method~adapter", {"gate_init": "zero"}, "gate_init", "random", "'zero'"),
    ("ablations/blr~0.01/method~adapter", {"blr": 0.009}, "blr", "0.01", "0.009"),
    ("ablations/lr~0.001/method~adapter", {"lr": None}, "lr", "0.001", "None"),
    ("ablations/epochs~3/method~lora", {"epochs": 3, "method": "adapter"}, "method", "lora", "'adapter'"),
])
def test_a_grid_point_whose_training_has_other_settings_is_refused(tmp_path, name, config, key, named, trained):
    """An ablation point's values came from its name alone: ablations/adapter_layers~7 over a training of 2 layers
    was reported as 7 layers, gate_init~random over a zero-init run as random. Each setting the name holds is
    compared with the training's config.json, as the same typed value (Run.sets)."""
    scores = {"method": config.get("method", "adapter")}
    with pytest.raises(InputError) as e:
        load_run(name, ablation_row(tmp_path, name, config, scores))
    said = str(e.value)
    assert said.startswith(f"--ablation {name}: ") and str(tmp_path / "run" / "config.json") in said, said
    assert f"{key} to {named}" in said and f"{key} = {trained}" in said and "expected" in said, said


@pytest.mark.parametrize("name,config", [
    ("ablations/adapter_layers~2/gate_init~zero/epochs~3/method~adapter",
     {"adapter_layers": 2, "gate_init": "zero", "epochs": 3}),
    ("ablations/blr~1.0/lr~NA/method~adapter", {"blr": 1, "lr": None}),  # Paramspace's 1.0 and NA
    # a null at the center sets nothing: a method's own setting (ablations.methods.lora.lr) trains there
    ("ablations/lr~NA/method~lora", {"lr": 0.0003, "method": "lora"}),
    # a LoRA point reuses a named LoRA training whose adapter settings it does not read (common.smk: trained_as)
    ("ablations/adapter_layers~2/method~lora", {"adapter_layers": 30, "method": "lora"}),
    ("ablations/lora_rank~8/method~adapter", {"method": "adapter"}),  # a setting config.json does not hold
])
def test_a_grid_point_whose_training_has_its_settings_is_read(tmp_path, name, config):
    run = load_run(name, ablation_row(tmp_path, name, config, {"method": config.get("method", "adapter")}))
    assert run.point == point_settings(name)


def test_a_zero_shot_grid_point_is_compared_by_its_method(tmp_path):
    name = "ablations/adapter_layers~2/method~zero-shot"
    assert load_run(name, ablation_row(tmp_path, name, {}, {"method": "zero-shot"})).method == "zero-shot"
    other = "ablations/adapter_layers~2/method~adapter"
    with pytest.raises(InputError, match=re.escape(f"--ablation {other}: ") + ".*method to adapter.*zero-shot"):
        load_run(other, ablation_row(tmp_path, other, {}, {"method": "zero-shot"}))


def test_the_data_hash_is_of_the_records_the_row_trained_on(tmp_path):
    """data_sha256 ("the sha256 of its training records") came from the --tokens folder of the dataset scored,
    not from what the row trained on, and a zero-shot row, which trains on nothing, got one too. Now: the records
    named by the stats.json beside the training's train_data split (config.json), n/a where it is not there, and
    n/a for a zero-shot row."""
    inputs = trained_row(tmp_path, TRAINING_METRICS)
    (tmp_path / "tokens" / "scienceqa" / "stats.json").write_text(json.dumps(
        {"dataset": "scienceqa", "provenance": {"records_sha256": "b" * 64}}))
    trained_on = tmp_path / "other_tokens"
    (trained_on / "train").mkdir(parents=True)
    (trained_on / "stats.json").write_text(json.dumps({"dataset": "scienceqa",
                                                       "provenance": {"records_sha256": "a" * 64}}))
    config = tmp_path / "run" / "config.json"
    config.write_text(json.dumps({"base": "b", "train_data": str(trained_on / "train")}))
    assert load_run("e", inputs).provenance["data_sha256"] == "a" * 12
    config.write_text(json.dumps({"base": "b", "train_data": str(tmp_path / "nowhere" / "train")}))
    assert load_run("e", inputs).provenance["data_sha256"] is None  # not recorded: n/a, not the scored data's
    (tmp_path / "scores.json").write_text(json.dumps(SCIENCEQA_SCORES))  # zero-shot: nothing trained
    assert load_run("e", replace(inputs, trainings={})).provenance["data_sha256"] is None
    # a mistyped stats.json of the training data is one error naming it, as the scored dataset's
    (trained_on / "stats.json").write_text(json.dumps({"dataset": "scienceqa", "provenance": {"records_sha256": 5}}))
    config.write_text(json.dumps({"base": "b", "train_data": str(trained_on / "train")}))
    (tmp_path / "scores.json").write_text(json.dumps(SCIENCEQA_SCORES | {"method": "adapter"}))
    with pytest.raises(InputError, match=re.escape(f"{trained_on / 'stats.json'}: key provenance.records_sha256")):
        load_run("e", inputs)


def test_a_grid_point_no_axis_shows_is_refused_naming_it(grid):
    """An --ablation point matched by no --vary value with the other axes at the --center was dropped without a
    word (a typo'd point, a value left out of --vary): refused, naming it, as an unmatched --scores name is. The
    center's own point is no such point: the workflow's grid always holds it, shown where an axis lists its value."""
    from llama_adapter.report import check_every_point_shown

    vary = {"adapter_layers": [1, 2, 4], "gate_init": ["zero", "random"], "epochs": [3, 5, 8],
            "method": ["adapter", "lora"]}
    axes = {axis: ablation_axis(grid, axis, CENTER, values) for axis, values in vary.items()}
    check_every_point_shown(grid, axes, CENTER)
    stray = point(2, "random", 5)  # two axes off the center: no table shows it
    with pytest.raises(InputError, match=re.escape(f"--ablation: [{stray.name!r}] ") + ".*--vary.*--center"):
        check_every_point_shown([*grid, stray], axes, CENTER)
    epochs = {"epochs": ablation_axis(grid, "epochs", CENTER, [3, 8])}  # the center (5 epochs) not listed: kept
    shown = [grid[0], grid[4], grid[5]]
    check_every_point_shown(shown, epochs, CENTER)
    with pytest.raises(InputError, match=re.escape(repr(grid[1].name))):
        check_every_point_shown([*shown, grid[1]], epochs, CENTER)
    with pytest.raises(InputError, match=re.escape(repr(grid[1].name))):
        check_every_point_shown([grid[1]], {}, CENTER)  # no --vary at all


def test_a_training_benchmark_file_named_must_be_there_unless_optional(tmp_path):
    """--train-benchmark NAME=PATH of a PATH that does not exist was ignored, the training's wall time n/a without a
    word: refused, naming the option. The workflow names each training's benchmark file before it is written
    (common.smk report_options), as --optional-train-benchmark: a missing one leaves the wall time n/a."""
    inputs = trained_row(tmp_path, TRAINING_METRICS)
    inputs.tokens["alpaca"] = tmp_path / "tokens" / "scienceqa"
    bench = tmp_path / "train.tsv"
    for given in ({"train_benchmarks": {"e": bench}}, {"optional_train_benchmarks": {"e": bench}}):
        named = replace(inputs, **given)
        if "train_benchmarks" in given:
            named.check()  # the options' check reads no file (a usage error touches nothing): the file's is apart
            with pytest.raises(InputError, match=re.escape(f"--train-benchmark e={bench}: missing; expected")):
                named.check_benchmark_files()
        else:
            named.check_benchmark_files()
            assert load_run("e", named).seconds is None
    bench.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t100\n")
    for given in ({"train_benchmarks": {"e": bench}}, {"optional_train_benchmarks": {"e": bench}}):
        replace(inputs, **given).check_benchmark_files()
        assert load_run("e", replace(inputs, **given)).seconds == 12.5
    with pytest.raises(InputError, match=re.escape("--optional-train-benchmark: ['x'] name(s) no --experiment")):
        replace(inputs, optional_train_benchmarks={"x": bench}).check()
