"""Base models from the Hugging Face hub: `hf:ORG/NAME[@REVISION]` as a plain local Hugging Face folder.

Only what loading needs is downloaded: the configs, the tokenizer's files and the safetensors weights that
`checkpoint.read_hf_checkpoint` reads, never a repository's other copies of the same weights (.bin, .pth,
ONNX, GGUF, Mistral's consolidated.safetensors). huggingface_hub keeps them in its cache (HF_HUB_CACHE), which
it reads alone under HF_HUB_OFFLINE=1, so a machine without the hub uses a model fetched there once or a cache
copied onto it. `fetch_base` copies the files into a folder of their own with fetch.json, which records the
commit the revision resolved to and each file's size and sha256: a branch such as main moves, a commit does not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .data import FETCH_INFO
from .data.paths import is_file_name
from .errors import CheckpointError, PretrainedFetchError
from .io import atomic_dir, sha256_file, write_json

PREFIX = "hf:"
DEFAULT_REVISION = "main"  # what huggingface_hub fetches when no revision is given
# The loader's files besides the weights: config.json, the weights' index, and the tokenizer (tokenizer.json with
# its config, or a SentencePiece tokenizer.model); generation_config.json and special_tokens_map.json go along
# for transformers, which loads the same folder.
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
EXPECTED = "a LLaMA-family model (config.json with model_type llama or mistral) with safetensors weights"
FORM = "hf:ORG/NAME[@REVISION]"


@dataclass(frozen=True)
class HubModel:
    """A model repository on the hub at a revision (a branch, a tag or a commit sha)."""

    repo_id: str
    revision: str = DEFAULT_REVISION

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}@{self.revision}"

    @property
    def folder_name(self) -> str:
        """ORG--NAME: a folder name of its own per repository (a repo id never holds `--`)."""
        return self.repo_id.replace("/", "--")


def hub_model(text: str) -> HubModel | None:
    """The hub model `text` names: `hf:ORG/NAME[@REVISION]`, or without `hf:` if it is a well-formed repo id
    (the caller tries it as a path first); None for text without `hf:` that is no repo id. Text with `hf:`
    that names no model is a PretrainedFetchError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = text.removeprefix(PREFIX).partition("@")  # a repo id never holds @, a branch may
    try:
        if repo_id.count("/") != 1 or (at and not revision):
            raise HFValidationError("expected ORG/NAME, then @REVISION if one is given")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        if not text.startswith(PREFIX):
            return None
        raise PretrainedFetchError(f"{text}: not a hub model ({e}); expected {FORM}") from None
    return HubModel(repo_id, revision or DEFAULT_REVISION)


def parse_source(text: str) -> HubModel:
    """The model of a `hf:` source (as base.source and fetch-base take it)."""
    if not text.startswith(PREFIX):
        raise PretrainedFetchError(f"{text}: expected {FORM}")
    return hub_model(text)


def hub_snapshot(model: HubModel) -> tuple[Path, str, list[str]]:
    """(the hub cache's folder of `model`, the commit sha its revision resolved to, the names of the files that
    loading needs in that folder), downloading what the cache lacks. The config is checked before the weights
    are downloaded, so that a model of another architecture costs no weights."""
    from .checkpoint import hf_model_args, hf_weight_files, read_config

    folder = _download(model, model.revision, list(SMALL_FILES))
    commit = folder.name  # the cache's snapshots/<commit sha>
    where = f"{model} (commit {commit})"
    if not (folder / "config.json").is_file():
        raise PretrainedFetchError(f"{where}: no config.json; expected {EXPECTED}")
    try:
        hf_model_args(read_config(folder / "config.json"), f"{where} config.json")
        indexed = hf_weight_files(folder)
        # The index is the repository's word: its names are used as file names here only if they are plain ones.
        if odd := [name for name in indexed if not is_file_name(name)]:
            raise PretrainedFetchError(f"{where}: model.safetensors.index.json names {odd}, which are no files of "
                                       f"the repository's top folder; expected {EXPECTED}")
        # Pinned to the commit: the weights come from the same one as the config, even if the branch moves.
        folder = _download(model, commit, indexed or ["model*.safetensors"])
        weights = hf_weight_files(folder)
    except CheckpointError as e:
        raise PretrainedFetchError(f"{e}; expected {EXPECTED}") from None
    if not weights:
        raise PretrainedFetchError(f"{where}: no safetensors weights (model*.safetensors, or the files of "
                                   f"model.safetensors.index.json); expected {EXPECTED}")
    missing = [name for name in weights if not (folder / name).is_file()]
    if missing:
        raise PretrainedFetchError(f"{where}: model.safetensors.index.json names {missing}, which the repository "
                                   f"(or an incomplete hub cache) lacks; expected {EXPECTED}")
    return folder, commit, [name for name in SMALL_FILES if (folder / name).is_file()] + weights


def _download(model: HubModel, revision: str, patterns: list[str]) -> Path:
    """snapshot_download of the files matching `patterns` (none in a subfolder); the hub's errors as one line
    naming the model and what was expected."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(model.repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=["*/*"]))
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1, or the hub unreachable) and not in the cache
        offline = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
        raise PretrainedFetchError(
            f"{model}: revision {revision} of {model.repo_id} is not in the local hub cache {constants.HF_HUB_CACHE} "
            f"and the hub cannot be reached{offline}; expected the model fetched once where the hub is reachable, "
            "or its cache folder copied to HF_HUB_CACHE") from None
    except GatedRepoError:
        raise PretrainedFetchError(f"{model}: {model.repo_id} is gated; accept its terms on the hub and log in "
                                   "(`hf auth login`, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise PretrainedFetchError(f"{model}: no model repository {model.repo_id} on the hub (a private one needs "
                                   "a login: `hf auth login`, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise PretrainedFetchError(f"{model}: {model.repo_id} has no revision {revision!r}; expected a branch, a "
                                   "tag or a commit sha") from None
    except (OSError, ValueError) as e:  # the connection, the disk, an answer of the hub
        raise PretrainedFetchError(f"{model}: cannot be fetched from the hub ({type(e).__name__}: {e})") from None


def cached_folder(base: str | Path) -> Path | None:
    """The hub cache's folder that resolve_base would read for `base`, where the cache already holds the revision
    it names; None for a path, for text that names no hub model, or for a model the cache lacks. Nothing is
    downloaded: the command line's checks ask it before any command runs."""
    try:
        if Path(base).exists() or (model := hub_model(str(base))) is None:
            return None
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.repo_id, revision=model.revision, local_files_only=True))
    except (PretrainedFetchError, OSError, ValueError):  # the hub's "not in the cache" errors are among these
        return None


def resolve_base(base: str | Path) -> Path:
    """A base checkpoint's path: `base` itself if it exists or names no hub model (then the loader's own error
    names it), else the hub model's folder in the hub cache (downloaded if need be)."""
    path = Path(base)
    if path.exists() or (model := hub_model(str(base))) is None:
        return path
    try:
        return hub_snapshot(model)[0]
    except PretrainedFetchError as e:
        if str(base).startswith(PREFIX):
            raise
        raise PretrainedFetchError(f"{base}: no such file or folder, nor a hub model: {e}") from None


def fetch_base(source: str, out_dir: str | Path) -> dict:
    """Write the files that loading needs of the hub model `source` (`hf:ORG/NAME[@REVISION]`) into `out_dir`, a
    plain Hugging Face folder that `checkpoint.load_model` loads, with fetch.json (the source, the revision asked
    for and the commit it resolved to, each file's name, size and sha256); return fetch.json's content. The
    folder appears whole or not at all, and a failed fetch leaves no earlier one behind."""
    with atomic_dir(Path(out_dir), remove_on_failure=True) as tmp:
        model = parse_source(source)
        folder, commit, names = hub_snapshot(model)
        files = []
        for name in names:
            shutil.copyfile(folder / name, tmp / name)  # the cache's file, not its symlink into blobs/
            files.append({"name": name, "size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)})
        meta = {
            "source": source,
            "repo_id": model.repo_id,
            "revision": model.revision,
            "commit": commit,
            "files": files,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(tmp / FETCH_INFO, meta)
    return meta


def fetched_source(folder: str | Path) -> str | None:
    """The source that the fetch.json of `folder` (a `fetch_base` folder) records; None where it has none or it
    cannot be read. A base's folder is named without its revision, so one fetched for another revision is told
    apart from this source's by this."""
    try:
        source = json.loads((Path(folder) / FETCH_INFO).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None
