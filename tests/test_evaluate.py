"""Evaluation metrics on hand-made predictions, option likelihoods, held-out loss, and adapters swapped on
one loaded base ("plug with knowledge")."""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

import llama_adapter.evaluate as evaluate_mod
from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.batching import collate, heldout_loss, sample_losses, token_loss_sum
from llama_adapter.checkpoint import load_model, save_adapter, save_meta_checkpoint
from llama_adapter.config import AdapterArgs, LoRAArgs, ModelArgs, Sampling
from llama_adapter.data.tokens import Encoded, TokenDataset, write_split
from llama_adapter.errors import DataError, InputError
from llama_adapter.evaluate import (
    Evaluation,
    answer_by_likelihood,
    evaluate,
    scienceqa_scores,
    score_alpaca,
    sequence_logprobs,
)
from llama_adapter.generate import complete_texts, generate, generate_requests, prompt_text
from llama_adapter.lora import LORA_WEIGHTS, add_lora, is_lora_param, save_lora
from llama_adapter.model import Transformer
from llama_adapter.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=128)


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_sp_model):
    """A random base in Meta layout and two different adapters for it."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(ARGS), root / "base")
    for name, layers in (("a", 2), ("b", 3)):
        m = AdaptedTransformer(ARGS, AdapterArgs(adapter_len=3, adapter_layers=layers, gate_init="random"))
        save_adapter(m, root / f"{name}.safetensors", base_model="random")
    return root, load_tokenizer(llama_sp_model)


def test_scienceqa_scores_on_hand_made_predictions():
    preds = [
        {"categories": ["NAT", "TXT", "G1-6"], "correct": True, "prediction": 0},
        {"categories": ["NAT", "IMG", "G7-12"], "correct": False, "prediction": None},
        {"categories": ["SOC", "NO", "G1-6"], "correct": True, "prediction": 2},
        {"categories": ["SOC", "TXT", "IMG", "G1-6"], "correct": False, "prediction": 1},
    ]
    for pid, p in zip(("q1", "q2", "q3", "q4"), preds):
        p["pid"] = pid
    s = scienceqa_scores(preds)
    assert s["n"] == 4 and s["accuracy"] == 50.0 and s["unparsed"] == 1
    assert s["correct_pids"] == ["q1", "q3"]  # which were right: the report pairs two evaluations by question
    assert s["questions_sha256"] == scienceqa_scores(preds[::-1])["questions_sha256"]  # the set, not the order
    assert s["questions_sha256"] != scienceqa_scores(preds[:3])["questions_sha256"]
    c = s["categories"]
    assert c["NAT"] == {"accuracy": 50.0, "n": 2, "correct": 1} and c["SOC"] == {"accuracy": 50.0, "n": 2, "correct": 1}
    assert c["LAN"] == {"accuracy": None, "n": 0, "correct": 0}  # not available, not 0%
    assert c["TXT"]["accuracy"] == 50.0 and c["IMG"]["accuracy"] == 0.0 and c["NO"]["accuracy"] == 100.0
    assert c["G1-6"] == {"accuracy": round(200 / 3, 2), "n": 3, "correct": 2}
    assert c["G7-12"] == {"accuracy": 0.0, "n": 1, "correct": 0}


def question(pid: str, has_image: bool) -> dict:
    return {"pid": pid, "split": "test", "question": "Which?", "choices": ["x", "y"], "answer": 0, "hint": None,
            "image": f"images/{pid}.png" if has_image else None, "has_image": has_image,
            "subject": "natural science", "grade": "grade3"}


class FeaturesOf:
    """An image feature cache holding rows for `pids` only."""

    def __init__(self, *pids):
        self.pids = set(pids)

    def vectors(self, pids):
        has = np.array([p in self.pids for p in pids])
        return np.ones((len(pids), 4), dtype=np.float32), has


def test_image_questions_without_features_are_listed_and_a_cache_of_none_refused(monkeypatch):
    """An image question the cache holds no features for (encode-images' skip policy) is scored from its text and
    listed in the scores; a cache holding none of the image questions (made of other records) is refused; a
    question without an image reads no row (one there was another record's image)."""
    import llama_adapter.evaluate as evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "answer_by_likelihood",
                        lambda model, tokenizer, records, bs, images=None, source="": seen.update(images=images) or
                        [0] * len(records))
    records = [question("q1", True), question("q2", True), question("q3", False)]
    model = SimpleNamespace(eval=lambda: None)
    scores, _ = evaluation.score_scienceqa(model, None, records, "likelihood", images=FeaturesOf("q2", "q3"))
    assert scores["images_missing"] == ["q1"] and seen["images"][0] is None and seen["images"][1] is not None
    assert seen["images"][2] is None  # a row for a question without an image is not its image
    assert "images_missing" not in evaluation.score_scienceqa(model, None, records, "likelihood",
                                                              images=FeaturesOf("q1", "q2"))[0]
    with pytest.raises(DataError, match="none of the 2 image questions' images .first: q1"):
        evaluation.score_scienceqa(model, None, records, "likelihood", images=FeaturesOf())
    with pytest.raises(DataError, match="question 'q3': given twice"):
        evaluation.score_scienceqa(model, None, records + [question("q3", False)], "likelihood")


@pytest.mark.parametrize("text", ["The answer is B.", "The answer is (B). Option (A) is wrong."])
def test_any_format_is_never_below_the_papers_format(monkeypatch, text):
    """accuracy_any_format credits a model that knows the answer but not the paper's format: an output that format
    reads as right is right in any wording too (a bare letter, or another option named after it, read as none)."""
    import llama_adapter.evaluate as evaluation
    from llama_adapter.data.scienceqa import parse_answer

    monkeypatch.setattr(evaluation, "answer_by_generation", lambda model, tok, records, bs, images=None,
                        compile=False, source="": ([parse_answer(text, 2)] * len(records), [text] * len(records)))
    record = {**question("q1", False), "answer": 1}
    scores, _ = evaluation.score_scienceqa(SimpleNamespace(eval=lambda: None), None, [record], "generate")
    assert scores["correct"] == 1 and scores["any_format"]["correct"] == 1


@pytest.mark.parametrize("text", ["The answer is B. (A) is a distractor.", "The answer is B, not (A)."])
def test_any_format_does_not_credit_a_wrong_answer_in_the_papers_format(monkeypatch, text):
    """accuracy_any_format reads another wording only where the paper's format names no option: an output that
    says "The answer is B" chose B, and an "(A)" elsewhere in it is not a second chance at the right answer (it
    was counted right whenever either reading was, a best of two readings above what the model answered)."""
    import llama_adapter.evaluate as evaluation
    from llama_adapter.data.scienceqa import parse_answer

    monkeypatch.setattr(evaluation, "answer_by_generation", lambda model, tok, records, bs, images=None,
                        compile=False, source="": ([parse_answer(text, 2)] * len(records), [text] * len(records)))
    record = question("q1", False)  # answer 0: (A)
    scores, predictions = evaluation.score_scienceqa(SimpleNamespace(eval=lambda: None), None, [record], "generate")
    assert predictions[0]["prediction"] == 1 and scores["correct"] == 0
    assert scores["any_format"]["correct"] == 0


def test_an_option_without_a_finite_score_is_not_chosen(world, monkeypatch):
    """Likelihood mode: a NaN score is no answer (it became option A), and a finite one beats it."""
    import llama_adapter.evaluate as evaluation

    _, tok = world
    records = [question("q1", False), question("q2", False)]
    monkeypatch.setattr(evaluation, "sequence_logprobs",
                        lambda model, samples, bs: [float("nan"), float("nan"), float("nan"), -3.0])
    model = SimpleNamespace(args=SimpleNamespace(max_seq_len=256))
    assert evaluation.answer_by_likelihood(model, tok, records, 4) == [None, 1]


def test_a_question_too_long_for_the_base_is_named_by_its_pid(world):
    """Generation mode: a question whose prompt leaves the base no position for a new token is refused naming the
    question (its pid), not by its text alone. Likelihood mode refuses one longer than the base's positions (it
    scored them silently)."""
    root, tok = world
    model = load_model(root / "base", root / "a.safetensors")
    records = [question("short", False), {**question("long", False), "question": "Which? " * ARGS.max_seq_len}]
    with pytest.raises(ValueError, match=r"^ScienceQA, question long: prompt .* leaves no position for a new token"):
        evaluate_mod.answer_by_generation(model, tok, records, 2)
    with pytest.raises(ValueError, match=r"^records.jsonl, question long: its prompt and option \(A\) are \d+ tokens "
                                         rf"\(BOS included\), more than the model's max_seq_len {ARGS.max_seq_len}"):
        evaluate_mod.answer_by_likelihood(model, tok, records, 2, source="records.jsonl")


def test_hot_swapped_adapters_equal_separately_loaded(world):
    root, tok = world
    requests = [{"id": 1, "instruction": "Name a colour."}, {"id": 2, "instruction": "Add.", "input": "2 and 3"},
                {"id": 3, "prompt": "Once upon a time", "adapter": "b"}]
    base = load_model(root / "base")
    swapped = generate_requests(base, tok, requests, {"a": root / "a.safetensors", "b": root / "b.safetensors"},
                                Sampling(max_new_tokens=6, temperature=0), batch_size=2)
    assert [(r["id"], r["adapter"]) for r in swapped] == [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "b")]
    for r in swapped:
        alone = load_model(root / "base", root / f"{r['adapter']}.safetensors")
        request = next(q for q in requests if q["id"] == r["id"])
        [out] = generate(alone, [tok.encode(prompt_text(request), bos=True)], 6, tok.eos_id)
        assert r["output"] == tok.decode(out)
    with pytest.raises(ValueError, match="adapter\\(s\\) \\['c'\\]"):
        generate_requests(base, tok, [{"prompt": "x", "adapter": "c"}], {"a": root / "a.safetensors"})


def test_a_sampled_answer_is_the_same_whatever_adapters_answer_beside_it(world):
    """Each request samples from a seed of its own, drawn once from the sampling's seed in the requests' order and
    used under every adapter (complete_texts drew fresh seeds at each adapter's turn, so the second adapter's
    answers depended on the first being there): identical adapters give identical answers, and an adapter's answer
    to a request is the same alone as beside others. The rows come in the requests' order (they came grouped by
    adapter), each request's rows in the adapters' order."""
    root, tok = world
    requests = [{"id": i, "prompt": p} for i, p in enumerate(["Once upon a time", "x", "Name a colour.", "Add 2",
                                                              "The sky is"])]
    requests.append({"id": 5, "prompt": "Hello", "adapter": "b"})
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=3)
    base = load_model(root / "base")

    def answers(rows, name):
        return [(r["id"], r["output"]) for r in rows if r["adapter"] == name]

    twins = generate_requests(base, tok, requests, {"a": root / "a.safetensors", "b": root / "a.safetensors"},
                              sampling, batch_size=2)
    assert [(r["id"], r["adapter"]) for r in twins] == [(i, n) for i in range(5) for n in "ab"] + [(5, "b")]
    assert answers(twins, "a") == answers(twins, "b")[:5]
    alone = generate_requests(base, tok, requests, {"b": root / "a.safetensors"}, sampling, batch_size=3)
    assert answers(alone, "b") == answers(twins, "b")
    assert [o for _, o in answers(alone, "b")[:5]] != complete_texts(  # sampled, not greedy
        load_model(root / "base", root / "a.safetensors"), tok, [r["prompt"] for r in requests[:5]],
        Sampling(max_new_tokens=6, temperature=0))
    pair = generate_requests(base, tok, requests, {"a": root / "a.safetensors", "b": root / "b.safetensors"},
                             sampling, batch_size=2)
    b_alone = generate_requests(base, tok, requests, {"b": root / "b.safetensors"}, sampling, batch_size=2)
    assert answers(pair, "b") == answers(b_alone, "b") and answers(pair, "a") == answers(twins, "a")[:5]


@pytest.mark.parametrize("order", [("as given", "a"), ("a", "as given")])
@pytest.mark.parametrize("holding", [None, "b"])
def test_a_none_path_answers_with_the_model_as_it_was_given(world, order, holding):
    """Among adapters swapped in by turns, a None path answers as the model passed in would alone (with the
    adapter it held, if any), wherever it comes in the dict; the adapters' answers are their own."""
    root, tok = world
    requests = [{"id": 1, "prompt": "Once upon a time"}, {"id": 2, "prompt": "x"}]
    sampling = Sampling(max_new_tokens=5, temperature=0)

    def model(adapter):
        return load_model(root / "base", adapter and root / f"{adapter}.safetensors")

    rows = generate_requests(model(holding), tok, requests, {n: None if n == "as given" else root / f"{n}.safetensors"
                                                             for n in order}, sampling)
    for name, alone in (("as given", model(holding)), ("a", model("a"))):
        expected = complete_texts(alone, tok, [r["prompt"] for r in requests], sampling)
        assert [r["output"] for r in rows if r["adapter"] == name] == expected, name


def test_each_adapter_file_is_read_once_however_often_it_is_swapped_in(world, monkeypatch):
    """generate_requests reads every adapter up front (each must fit the base before any is used) and swaps the
    tensors it read into the model, not the files again."""
    import llama_adapter.checkpoint

    reads = []
    read = llama_adapter.checkpoint.read_adapter
    monkeypatch.setattr(llama_adapter.checkpoint, "read_adapter", lambda path: reads.append(path) or read(path))
    root, tok = world
    generate_requests(load_model(root / "base"), tok, [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}],
                      {"a": root / "a.safetensors", "b": root / "b.safetensors"}, Sampling(max_new_tokens=1),
                      batch_size=1)
    assert sorted(reads) == [root / "a.safetensors", root / "b.safetensors"]


def test_each_request_is_tokenized_once_however_many_adapters_answer_it(world, monkeypatch):
    """generate_requests turns each request into token ids once (checking that it fits the base) and decodes every
    adapter's turn from those ids; the answers are those of the texts given to complete_texts."""
    root, tok = world
    requests = [{"id": 1, "prompt": "Once upon a time"}, {"id": 2, "prompt": "x", "adapter": "b"},
                {"id": 3, "instruction": "Add.", "input": "2 and 3"}]
    sampling = Sampling(max_new_tokens=4, temperature=0)
    encoded, encode = [], tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: encoded.append(text) or encode(text, **kw))
    rows = generate_requests(load_model(root / "base"), tok, requests,
                             {"a": root / "a.safetensors", "b": root / "b.safetensors"}, sampling, batch_size=2)
    assert sorted(encoded) == sorted(prompt_text(r) for r in requests)
    for name in ("a", "b"):
        mine = [r for r in requests if r.get("adapter", name) == name]
        expected = complete_texts(load_model(root / "base", root / f"{name}.safetensors"), tok,
                                  [prompt_text(r) for r in mine], sampling, batch_size=2)
        assert [(r["id"], r["output"]) for r in rows if r["adapter"] == name] == [
            (r["id"], o) for r, o in zip(mine, expected)], name


def test_a_lora_answers_every_request_alone_and_is_refused_among_adapters(world, tmp_path):
    """A LoRA given to generate_requests is merged once and answers as the model loaded with it does; merged for
    good, it cannot take turns with another adapter: refused by name before the model is touched."""
    root, tok = world
    lora = add_lora(load_model(root / "base"), LoRAArgs(rank=2, targets=("wq", "wv", "w2")))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if is_lora_param(name):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    save_lora(lora, tmp_path / "lora", "random")
    requests = [{"id": 1, "prompt": "Once upon a time"}, {"id": 2, "instruction": "Add.", "input": "2 and 3"}]
    sampling = Sampling(max_new_tokens=5, temperature=0)
    [r1, r2] = generate_requests(load_model(root / "base"), tok, requests, {"l": tmp_path / "lora"}, sampling)
    merged = load_model(root / "base", tmp_path / "lora" / LORA_WEIGHTS)
    plain = load_model(root / "base")
    for request, row in ((requests[0], r1), (requests[1], r2)):
        ids = [tok.encode(prompt_text(request), bos=True)]
        assert row["adapter"] == "l" and row["output"] == tok.decode(generate(merged, ids, 5, tok.eos_id)[0])
    assert [r1["output"], r2["output"]] != [tok.decode(generate(plain, [tok.encode(prompt_text(q), bos=True)], 5,
                                                                tok.eos_id)[0]) for q in requests]
    base = load_model(root / "base")
    with pytest.raises(InputError, match="adapter l=.*cannot take turns with other adapters"):
        generate_requests(base, tok, requests, {"a": root / "a.safetensors", "l": tmp_path / "lora"}, sampling)
    assert base.adapter is None and not getattr(base, "merged_lora", None)


def test_the_decode_steps_cache_is_named_after_the_adapter_it_decodes_with(world, monkeypatch):
    """A bare base given adapters: the compile cache's kind names the adapters' shape, not the bare base's (whose
    file it would otherwise share and overwrite)."""
    import llama_adapter.compile_cache

    kinds = []
    monkeypatch.setattr(llama_adapter.compile_cache, "compile_cache", lambda folder, kind: kinds.append(kind)
                        or contextlib.nullcontext())
    root, tok = world
    generate_requests(load_model(root / "base"), tok, [{"id": 1, "prompt": "x"}], {"a": root / "a.safetensors"},
                      Sampling(max_new_tokens=1))
    [kind] = kinds
    shape = load_model(root / "base", root / "a.safetensors").adapter.to_dict()
    del shape["adapter_len"]  # the compiled code serves any (test_generate: a decoding cache file)
    assert kind["adapter"] == shape


def test_sequence_logprobs_and_likelihood_choice(world):
    root, tok = world
    model = load_model(root / "base", root / "a.safetensors").eval()
    ids = np.asarray(tok.encode("Question: x\nAnswer: The answer is (B).", bos=True), dtype=np.int64)
    mask = np.arange(len(ids)) >= 5
    [lp] = sequence_logprobs(model, [(ids, mask)], batch_size=4)
    with torch.no_grad():
        manual = -token_loss_sum(model, collate([[(ids, mask)]], pad_id=0)).item()
    assert lp == pytest.approx(manual, rel=1e-5)
    record = {"pid": "1", "question": "Which?", "choices": ["red", "blue", "green"], "answer": 1, "hint": ""}
    [choice] = answer_by_likelihood(model, tok, [record], batch_size=2)
    from llama_adapter.data.scienceqa import qcm_prompt, qcm_target

    n_prompt = len(tok.encode(qcm_prompt(record), bos=True))
    scores = []
    for k in range(3):
        full = np.asarray(tok.encode(qcm_prompt(record) + qcm_target({**record, "answer": k}), bos=True))
        scores.append(sequence_logprobs(model, [(full, np.arange(len(full)) >= n_prompt)], 1)[0])
    assert choice == int(np.argmax(scores))


def test_sequence_logprobs_in_batches_of_like_length_score_each_sample_as_alone(world, monkeypatch):
    """Samples are batched by length, longest first; each score comes back at its sample's place, the score it
    has alone."""
    import llama_adapter.evaluate as evaluation

    root, tok = world
    model = load_model(root / "base", root / "a.safetensors").eval()
    texts = ["Q: a\nA: yes.", "Question: which of these is the longest answer here?\nAnswer: this one, by far.",
             "Q: b\nA: no.", "Question: and a middling one?\nAnswer: this."]
    samples = []
    for text in texts:
        ids = np.asarray(tok.encode(text, bos=True), dtype=np.int64)
        samples.append((ids, np.arange(len(ids)) >= 3))
    alone = [sequence_logprobs(model, [s], batch_size=1)[0] for s in samples]
    batches = []
    monkeypatch.setattr(evaluation, "collate", lambda rows, **kw: batches.append([len(r[0][0]) for r in rows])
                        or collate(rows, **kw))
    assert sequence_logprobs(model, samples, batch_size=2) == pytest.approx(alone, rel=1e-5)
    lengths = sorted((len(s[0]) for s in samples), reverse=True)
    assert batches == [lengths[:2], lengths[2:]]
    assert len(set(alone)) == len(alone)


def test_a_failed_evaluation_leaves_no_output_folder_of_its_own(world, tmp_path, monkeypatch):
    """An evaluation that fails on its input once it has made its --out folder (a question too long for the base)
    removed its files but left the folder, empty, behind; a folder it made is removed with them, and one that was
    there before is left as it was (the user's)."""
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    root, tok = world
    (tmp_path / "data").mkdir()
    long = {**question("long", False), "split": "test", "question": "Which? " * ARGS.max_seq_len}
    (tmp_path / "data" / "records.jsonl").write_text(json.dumps(long) + "\n")
    for out in (tmp_path / "new" / "out", tmp_path / "there"):
        ev = Evaluation("scienceqa", root / "base", None, tmp_path / "data", out, split="test", mode="likelihood")
        with pytest.raises(ValueError, match="question long"):
            evaluate(load_model(root / "base"), tok, ev, records=[long])
        (tmp_path / "there").mkdir(exist_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mlflow", "new", "there"]
    assert not any((tmp_path / "new").iterdir()) and not any((tmp_path / "there").iterdir())


def test_evaluation_writes_its_every_output_once_and_its_run(mlflow_store, world, tmp_path, monkeypatch):
    """One library call owns scores.json (the scores, the split, what was scored, the MLflow run), the
    predictions and the MLflow run, which holds both files; a crash while scoring ends the run FAILED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("LLAMA_ADAPTER_TAGS", json.dumps({"config_hash": "c0ffee"}))  # as the workflow sets it
    root, tok = world
    model = load_model(root / "base", root / "a.safetensors")
    records = [{"pid": str(i), "split": "test", "question": f"Is {i} big?", "choices": ["yes", "no"], "answer": i % 2,
                "hint": "h" if i % 3 else "", "image": None, "has_image": i == 4, "subject": "natural science",
                "grade": f"grade{i + 1}"} for i in range(8)]
    # The folder's other splits: evaluate scores ev.split's questions alone, the train split's set the floor.
    training = [{**r, "pid": f"t{i}", "split": "train", "answer": 1} for i, r in enumerate(records[:3])]
    validated = records + training + [{**records[0], "pid": "v0", "split": "val"}]
    (root / "data").mkdir(exist_ok=True)  # the validated folder the records were read from
    (root / "data" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validated))
    client = MlflowClient(f"sqlite:///{mlflow_store}")
    for mode in ("likelihood", "generate"):
        ev = Evaluation("scienceqa", root / "base", root / "a.safetensors", root / "data", tmp_path / mode,
                        split="test", mode=mode, tags={"experiment": "x"})
        scores = evaluate(model, tok, ev, records=validated, batch_size=4)
        assert scores["mode"] == mode and scores["n"] == 8 and scores["split"] == "test"
        assert scores["floor"] == {"position": 1, "letter": "B", "correct": 4, "n": 8, "accuracy": 50.0}
        assert (scores["task"], scores["method"], scores["base"]) == ("scienceqa", "adapter", str(root / "base"))
        assert scores["training"] is None  # an adapter without its training's metrics.json beside it
        # the provenance a row without a training (zero-shot) takes from its evaluation in the report
        assert scores["tags"]["config_hash"] == "c0ffee" and set(scores["tags"]) <= {"config_hash", "git_commit"}
        assert json.loads((tmp_path / mode / "scores.json").read_text()) == scores
        rows = list(csv.DictReader(open(tmp_path / mode / "predictions.csv")))
        assert [r["pid"] for r in rows] == [str(i) for i in range(8)]
        assert scores["accuracy"] == pytest.approx(100 * sum(r["correct"] == "True" for r in rows) / 8, abs=0.01)
        run = client.get_run(scores["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["accuracy"] == scores["accuracy"]
        assert run.data.params["method"] == "adapter" and run.data.tags["experiment"] == "x"
        # the tokenizer it encoded and decoded with, as one param (its vocabulary's digest and file)
        assert json.loads(run.data.params["tokenizer"]) == {"vocabulary_sha256": tok.vocabulary_digest(),
                                                             "source": tok.source}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"scores.json", "predictions.csv", "environment"} <= artifacts
        [scored] = run.inputs.dataset_inputs  # the questions scored, in MLflow's Datasets
        tags = {t.key: t.value for t in scored.tags}
        assert scored.dataset.name == "scienceqa/test" and tags["mlflow.data.context"] == "evaluation"
        assert (tags["questions"], tags["split"]) == ("8", "test")
        assert run.data.tags["mlflow.source.name"] == "llama_adapter.evaluate" and "env.python" in run.data.tags
    assert scores["categories"]["G7-12"]["n"] == 2  # grades 7 and 8
    logged = (tmp_path / "likelihood" / "metrics.jsonl").read_text()
    again = Evaluation("scienceqa", root / "base", root / "a.safetensors", root / "data", tmp_path / "likelihood",
                       split="test", mode="likelihood")
    evaluate(model, tok, again, records=validated, batch_size=4)
    assert (tmp_path / "likelihood" / "metrics.jsonl").read_text() == logged  # this run's log, not both runs'
    absent = Evaluation("scienceqa", root / "base", None, root / "data", tmp_path / "absent", split="tset")
    with pytest.raises(DataError, match=r"records.jsonl: no questions in split 'tset'; splits present: "
                                        r"\['test', 'train', 'val'\]"):
        evaluate(model, tok, absent, records=validated)
    assert not (tmp_path / "absent").exists()  # stopped before its MLflow run or any file
    broken = Evaluation("scienceqa", root / "base", None, root / "data", tmp_path / "broken", mode="generate")
    with pytest.raises(KeyError):
        evaluate(model, tok, broken, records=[{"pid": "1"}])  # no question: scoring fails
    [failed] = [r for r in client.search_runs([run.info.experiment_id]) if r.info.status == "FAILED"]
    assert failed.data.params["method"] == "zero-shot" and not (tmp_path / "broken" / "scores.json").exists()
    assert not (tmp_path / "broken" / "metrics.jsonl").exists()
    # a question too long for the base is named with the records file it came from
    long = {**records[0], "pid": "long", "question": "Is it big? " * ARGS.max_seq_len}
    too_long = Evaluation("scienceqa", root / "base", None, root / "data", tmp_path / "long", mode="likelihood")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(root / 'data' / 'records.jsonl'))}, question long: its "
                                         "prompt and option"):
        evaluate(model, tok, too_long, records=[long])


def test_compiled_decoding_keeps_its_code_in_the_compile_cache_from_python(mlflow_store, world, tmp_path, monkeypatch):
    """evaluate() and generate_requests() called from Python keep the compiled decode step in their compile_cache
    as the commands do (the cache was the command line's alone): one file for the step, shared by both when they
    decode as many rows; without compile, no file."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local"))
    torch._dynamo.reset()
    root, tok = world
    model = load_model(root / "base", root / "a.safetensors").eval().fuse_projections()
    records = [{"pid": str(i), "split": "test", "question": f"Is {i} big?", "choices": ["yes", "no"], "answer": 0,
                "hint": "", "image": None, "has_image": False} for i in range(3)]
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = tmp_path / "cache"
    plain = Evaluation("scienceqa", root / "base", root / "a.safetensors", root / "data", tmp_path / "plain",
                       split="test", mode="generate")
    evaluate(model, tok, plain, records=records, batch_size=2, compile_cache=str(cache))
    assert not cache.exists()  # nothing compiled, nothing kept
    ev = Evaluation("scienceqa", root / "base", root / "a.safetensors", root / "data", tmp_path / "compiled",
                    split="test", mode="generate")
    evaluate(model, tok, ev, records=records, batch_size=2, compile=True, compile_cache=str(cache))
    [blob] = cache.iterdir()
    assert blob.name.startswith("decode-") and blob.stat().st_size > 0
    requests = [{"id": i, "instruction": f"Say {i}."} for i in range(2)]
    generate_requests(model, tok, requests, {"a": None}, Sampling(max_new_tokens=3), batch_size=2, compile=True,
                      compile_cache=str(cache))
    assert list(cache.iterdir()) == [blob]  # the same step at the same rows: the same file


def test_a_stop_signal_ends_the_evaluation_killed_with_nothing_written(mlflow_store, world, tmp_path, monkeypatch):
    """scancel or a time limit (SIGTERM) in the middle of scoring: the MLflow run ends KILLED (tagged with the
    signal), not RUNNING forever; no predictions or scores are left; the signal's handler is put back after."""
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    import llama_adapter.evaluate as evaluate_mod
    from llama_adapter.errors import StoppedBySignal

    root, tok = world

    def cancelled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(evaluate_mod, "score_scienceqa", cancelled)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.json").write_text("{}")  # an earlier run's: must not pass for this one's
    before = signal.getsignal(signal.SIGTERM)
    ev = Evaluation("scienceqa", root / "base", None, root / "data", tmp_path / "out", mode="likelihood")
    with pytest.raises(StoppedBySignal):
        evaluate_mod.evaluate(load_model(root / "base"), tok, ev, records=[{"pid": "1"}])
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "out" / "scores.json").exists() and not (tmp_path / "out" / "predictions.csv").exists()
    client = MlflowClient(f"sqlite:///{mlflow_store}")
    [run] = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "SIGTERM"


def random_split(folder, n: int, longest: int, seed: int, without_targets=()) -> tuple[TokenDataset, Encoded]:
    """A token split of n random samples (BOS, up to `longest` tokens, EOS), each a target from its fourth
    token on; those numbered in `without_targets` none."""
    rng = np.random.default_rng(seed)
    enc = Encoded([], [], [], [])
    for i in range(n):
        t = np.concatenate([[1], rng.integers(3, 500, rng.integers(4, longest)), [2]]).astype(np.int32)
        mask = np.zeros(len(t), dtype=bool) if i in without_targets else np.arange(len(t)) >= 3
        enc.tokens.append(t), enc.masks.append(mask), enc.source_index.append(i)
    write_split(folder, enc, np.arange(n))
    return TokenDataset(folder), enc


def test_heldout_loss_is_the_token_mean(world, tmp_path):
    root, _ = world
    model = load_model(root / "base", root / "b.safetensors")
    ds, _ = random_split(tmp_path / "val", 7, 20, seed=0)
    loss = heldout_loss(model, ds, row_len=64, rows_per_batch=2, pad_id=0, device="cpu")
    with torch.no_grad():
        total = sum(token_loss_sum(model, collate([[ds[i]]], 0)).item() for i in range(7))
    assert loss == pytest.approx(total / sum(int(ds[i][1][1:].sum()) for i in range(7)), rel=1e-5)


def test_a_heldout_split_without_targets_is_an_error_not_nan(world, tmp_path):
    root, _ = world
    ds, _ = random_split(tmp_path / "val", 3, 20, seed=0, without_targets=(0, 1, 2))
    with pytest.raises(DataError, match=f"held-out split {tmp_path / 'val'}: none of its 3 samples has a target"):
        score_alpaca(load_model(root / "base"), SimpleNamespace(pad_id=0), ds, row_len=64, batch_size=2)


def test_sample_losses_are_each_samples_own_whatever_the_packing(world, tmp_path):
    """Each held-out sample's summed loss and target count, in the split's order, as if it were scored alone,
    though packed several to a row and rows to a batch (first-fit decreasing reorders them); a sample without
    targets counts 0. score_alpaca's token mean is theirs, and each sample's mean is in its scores."""
    root, _ = world
    model = load_model(root / "base", root / "b.safetensors")
    ds, enc = random_split(tmp_path / "val", 9, 30, seed=1, without_targets=(4,))
    sums, counts = sample_losses(model, ds, row_len=64, rows_per_batch=2, pad_id=0, device="cpu")
    with torch.no_grad():
        alone = [token_loss_sum(model, collate([[ds[i]]], 0)).item() for i in range(9)]
    assert list(counts) == [int(ds[i][1][1:].sum()) for i in range(9)] and counts[4] == 0
    assert sums == pytest.approx(alone, rel=1e-5, abs=1e-6)
    scores = score_alpaca(model, SimpleNamespace(pad_id=0), ds, row_len=64, batch_size=2)
    assert scores["heldout_loss"] == pytest.approx(sum(alone) / counts.sum(), rel=1e-6)
    assert scores["sample_losses"][4] is None
    assert scores["sample_losses"][0] == pytest.approx(alone[0] / counts[0], rel=1e-5)
    assert scores["samples_sha256"] == TokenDataset(tmp_path / "val").digest()
    enc.tokens[0] = enc.tokens[0].copy()
    enc.tokens[0][1] += 1  # another sample: another digest, so the report does not pair the two
    write_split(tmp_path / "other", enc, np.arange(9))
    assert TokenDataset(tmp_path / "other").digest() != scores["samples_sha256"]


def test_generate_cli_writes_jsonl_naming_the_adapter(world, tmp_path, llama_sp_model):
    root, _ = world
    (tmp_path / "prompts.jsonl").write_text('{"id": "q1", "instruction": "Say hi."}\n{"prompt": "Hello"}\n')
    proc = subprocess.run([sys.executable, "-m", "llama_adapter.cli", "generate", "--base", str(root / "base"),
                           "--tokenizer", str(llama_sp_model), "--adapter", f"first={root / 'a.safetensors'}",
                           "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                           "--max-new-tokens", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "generated: 2/2" in proc.stderr  # progress, as a line in a log (no terminal here)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["adapter"]) for r in rows] == [("q1", "first"), (2, "first")]
    # generate's default: the paper's sampling, recorded with each answer for the report's caption
    assert {r["decoding"] for r in rows} == {"sampled at temperature 0.1, top-p 0.75, seed 0, at most 4 new tokens"}
    assert rows[0]["adapter_path"].endswith("a.safetensors")


def sigterm(*args, **kwargs):
    """A stop signal where an evaluation step would run, as scancel or a time limit sends it."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends
    raise AssertionError("the signal did not stop the evaluation")


@pytest.fixture
def stopped_evaluation(mlflow_store, world, tmp_path, monkeypatch):
    """Evaluates the world's base on one question (likelihood mode) into tmp_path/out under stop_signals_raise,
    as the command line runs it, where the test has planted a stop (`stop`: what the evaluation raises), with an
    MLflow store of its own (the variables the tracker sets undone after the test). Returns the one MLflow run
    it recorded and the files left in its folder; it fails on a run left open (it would be the next test's
    parent) and ends it."""
    from mlflow.tracking import MlflowClient

    from llama_adapter.errors import stop_signals_raise
    from llama_adapter.tracking import MLFLOW_DEFAULTS

    for name, value in MLFLOW_DEFAULTS.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    root, tok = world
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "records.jsonl").write_text('{"pid": "1"}\n')
    out = tmp_path / "out"
    end_run = mlflow.end_run  # as it is before a test patches it

    def run(stop: type[BaseException]):
        ev = Evaluation("scienceqa", root / "base", None, tmp_path / "data", out, mode="likelihood")
        with pytest.raises(stop), stop_signals_raise():
            evaluate(load_model(root / "base"), tok, ev, records=[{"pid": "1"}])
        left_open = mlflow.active_run()
        end_run()
        assert left_open is None
        client = MlflowClient(f"sqlite:///{mlflow_store}")
        [recorded] = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id])
        return recorded, sorted(p.name for p in out.iterdir()) if out.exists() else []

    return run


def scored(monkeypatch):
    """score_scienceqa answering the one question right at once."""
    monkeypatch.setattr(evaluate_mod, "score_scienceqa",
                        lambda *a: ({"accuracy": 100.0}, [{"pid": "1", "categories": ["NAT"], "correct": True}]))


def test_a_stop_signal_as_the_evaluation_records_its_inputs_ends_it_killed(stopped_evaluation, tmp_path,
                                                                           monkeypatch):
    """SIGTERM while the opened MLflow run records what is evaluated (the data's digest, the params), before
    scoring: the run ends KILLED, not FINISHED by MLflow's exit hook, and an earlier run's scores are gone."""
    from llama_adapter.errors import StoppedBySignal
    from llama_adapter.tracking import Tracker

    monkeypatch.setattr(Tracker, "log_params", sigterm)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.json").write_text("{}")  # an earlier run's: must not pass for this one's
    run, left = stopped_evaluation(StoppedBySignal)
    assert (run.info.status, run.data.tags["stopped_by"], left) == ("KILLED", "SIGTERM", [])


def test_ctrl_c_in_the_middle_of_scoring_ends_the_evaluation_killed(stopped_evaluation, monkeypatch):
    """Ctrl-C stops an evaluation as SIGTERM does (and as it stops a training): the MLflow run ends KILLED, tagged
    SIGINT, not FAILED as a crash would."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_mod, "score_scienceqa", interrupted)
    run, _ = stopped_evaluation(KeyboardInterrupt)
    assert (run.info.status, run.data.tags["stopped_by"]) == ("KILLED", "SIGINT")


def test_a_stop_signal_while_the_scores_are_logged_ends_the_evaluation_killed(stopped_evaluation, monkeypatch):
    """SIGTERM once scores.json is written, while the run logs the scores and uploads the files (a server's calls:
    seconds): the files are removed (the command line would remove them too), so the run must end KILLED, not
    FINISHED by MLflow's exit hook with the scores of an evaluation that left none."""
    from llama_adapter.errors import StoppedBySignal
    from llama_adapter.tracking import Tracker

    scored(monkeypatch)
    monkeypatch.setattr(Tracker, "log_artifact", sigterm)
    run, left = stopped_evaluation(StoppedBySignal)
    assert (run.info.status, run.data.tags["stopped_by"], left) == ("KILLED", "SIGTERM", [])


def test_a_stop_signal_while_the_evaluation_run_ends_leaves_no_scores(stopped_evaluation, monkeypatch):
    """SIGTERM while the finished evaluation's MLflow run is being ended (a server's calls, the system-metrics
    thread's join: seconds): Tracker.close ends the run KILLED, so the scores must go as a stop's outputs do, not
    stay beside a run that says the evaluation was killed."""
    from llama_adapter.errors import StoppedBySignal

    real = mlflow.end_run

    def end_run(status="FINISHED"):
        if status == "FINISHED":
            sigterm()
        real(status)

    scored(monkeypatch)
    monkeypatch.setattr(mlflow, "end_run", end_run)
    run, left = stopped_evaluation(StoppedBySignal)
    assert (run.info.status, left) == ("KILLED", [])


def test_scores_record_the_training_they_score(tmp_path):
    """scores.json names the folder of the training it scored (`training`), which the report compares with the
    row's --training: an adapter's folder, a full fine-tune's above its model folder, none for a bare base."""
    from llama_adapter.evaluate import scored_training

    (tmp_path / "adapters" / "x" / "model").mkdir(parents=True)
    (tmp_path / "adapters" / "x" / "metrics.json").write_text(json.dumps({"method": "full"}))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "metrics.json").write_text(json.dumps({"method": "lora"}))
    assert scored_training(tmp_path / "adapters" / "x" / "model", None) == str(tmp_path / "adapters" / "x")
    assert scored_training(tmp_path / "base", tmp_path / "lora" / "adapter_model.safetensors") == str(tmp_path / "lora")
    assert scored_training(tmp_path / "base", tmp_path / "lora") == str(tmp_path / "lora")
    assert scored_training(tmp_path / "base", None) is None  # zero-shot: nothing trained
    assert scored_training(tmp_path / "base", tmp_path / "elsewhere" / "a.safetensors") is None  # made elsewhere
