"""One owner per default: a setting's default is written once, in its dataclass (config.py), and every other
place that needs it (a library function's keyword default, an option of a benchmark) reads it from there."""

from inspect import signature


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
