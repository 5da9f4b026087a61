"""The image side of multimodal LLaMA-Adapter: multi-scale global features from a frozen CLIP vision tower.

The encoder is frozen, so each image is encoded once into an on-disk cache keyed by ScienceQA pid; training and
evaluation read the cache (`ImageFeatures`) and never run the encoder. Cache folder layout:
  features.npy   float32 (rows, feature_dim), one row per encoded image, in records.jsonl order
  pids.json      the pid of each row
  encoder.json   the encoder's fingerprint, the last run's counts, skipped pids and each image's sha256 (and why
                 the cache it found could not be read, where it rebuilt one: unreadable_cache)

transformers is imported only where an encoder is built: reading a cache does not need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import FEATURES_INFO, POLICIES, VISION_CONFIG, EncodeImagesConfig, TinyClipConfig
from .data import image_read_errors
from .data.paths import inside
from .data.validate import check_validated_records, fetched_folder
from .devices import pick_device
from .errors import EncoderError, ImageError, UnsafePathError
from .io import (
    atomic_dir,
    read_json_object,
    read_jsonl_lines,
    read_npy,
    read_string_list,
    remove_output,
    sha256_file,
    write_json,
)

FORMAT_VERSION = "llama-adapter-image-features/1"
CACHE_FILES = ("features.npy", "pids.json", FEATURES_INFO)
# CLIP's own preprocessing constants (the values the OpenAI CLIP models were trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Every third block from the last, as a spread of scales; indices beyond a shallow model are dropped.
DEFAULT_LAYERS = (-1, -4, -7, -10)
# Preprocessing scales the shortest side to the encoder's size before the centre crop, so a thin strip (1 x 20,000
# pixels, a few bytes as a PNG) would become gigapixels: refused, by pid, as an unreadable image is.
MAX_ASPECT = 64


class VisionEncoder:
    """A frozen Hugging Face CLIPVisionModel read from a local `save_pretrained` folder, on `device` (by default
    the GPU when one is visible, as the CLI picks it: devices.pick_device)."""

    def __init__(self, path: Path, layers: tuple[int, ...] | None = None, device: str | torch.device | None = None):
        from transformers import CLIPVisionModel

        self.path = Path(path)
        for f in (self.path / VISION_CONFIG, self.path / "model.safetensors"):
            if not f.is_file():
                raise EncoderError(f"{self.path}: not a vision encoder folder ({f.name} not found)")
        self.model = CLIPVisionModel.from_pretrained(self.path, local_files_only=True)
        self.device = pick_device(device)
        self.model = self.model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        config = self.model.config
        self.image_size, self.hidden_size = config.image_size, config.hidden_size
        # hidden_states holds the embedding output plus one entry per block: valid indices are -(n+1)..n.
        n = config.num_hidden_layers
        if layers is None:
            layers = tuple(i for i in DEFAULT_LAYERS if -(n + 1) <= i <= n)
        bad = [i for i in layers if not -(n + 1) <= i <= n]
        if not layers or bad:
            raise EncoderError(f"{self.path}: hidden-state layers {bad or '()'} invalid; this model has "
                               f"{n} blocks, so each index must be in {-(n + 1)}..{n}")
        # Stored as non-negative indices so that -1 and n key the same cache.
        self.layers = tuple(i % (n + 1) for i in layers)
        if len(set(self.layers)) != len(self.layers):
            raise EncoderError(f"{self.path}: layers {tuple(layers)} name the same hidden state twice")
        # CLIPVisionModel nests the tower under .vision_model in transformers 4.x, not in 5.x.
        self.post_layernorm = getattr(self.model, "vision_model", self.model).post_layernorm
        self._fingerprint: dict[str, Any] | None = None

    @property
    def feature_dim(self) -> int:
        return len(self.layers) * self.hidden_size

    def fingerprint(self) -> dict[str, Any]:
        """What decides the features: a cache written under another fingerprint is never reused. The kind of
        device is part of it: a GPU's features differ from a CPU's by float rounding (TF32 convolutions, other
        kernels), so a cache made on one kind is encoded again on the other rather than mixed with its rows. The
        folder's path is not: the same files elsewhere (another checkout, a moved results tree) give the same
        features, and an absolute path made two checkouts' caches differ (encoder.json keeps the path as given)."""
        if self._fingerprint is None:  # hashing a real CLIP's weights takes seconds: do it once
            self._fingerprint = {
                "weights_sha256": sha256_file(self.path / "model.safetensors"),
                "config_sha256": sha256_file(self.path / VISION_CONFIG), "layers": list(self.layers),
                "feature_dim": self.feature_dim, "image_size": self.image_size, "device": self.device.type,
            }
        return self._fingerprint

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """CLIP's preprocessing: shortest side to image_size (bicubic), centre crop, [0, 1], CLIP mean/std."""
        image, size = image.convert("RGB"), self.image_size
        w, h = image.size
        scale = size / min(w, h)
        w, h = max(size, int(w * scale)), max(size, int(h * scale))  # truncated, as CLIPImageProcessor does
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        return torch.from_numpy(x).permute(2, 0, 1)

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, feature_dim) float32: per selected layer, the CLS token through post_layernorm (as CLIP's
        pooled output is), concatenated in `layers` order. Bitwise repeatable for the same batch; an image
        at another row or in another batch size may differ by float rounding (~1e-7): BLAS sums in another order."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return torch.cat([self.post_layernorm(hidden[i][:, 0]) for i in self.layers], dim=-1).float().cpu()


def save_tiny_clip(out: Path, seed: int = TinyClipConfig.seed, image_size: int = 32) -> Path:
    """A tiny random CLIPVisionModel in `save_pretrained` layout: the demo's stand-in for a real CLIP.
    The same seed writes byte-identical files; the caller's torch RNG state is left untouched."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                              patch_size=8, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


# How a cache that training or evaluation cannot read is mended (ImageFeatures' errors say it).
REENCODE = (" (encode it again: encode-images with this cache as --out rebuilds one it cannot read; or snakemake "
            "--forcerun encode_images)")


class ImageFeatures:
    """Read-only view of a feature cache; the features stay memory-mapped."""

    def __init__(self, path: Path, remedy: str = REENCODE):
        """A cache that cannot be read is ImageError naming the file, what was found and what was expected, then
        `remedy` (how to mend it; encode_images, which mends it itself, gives none)."""
        self.path = Path(path)
        missing = [f for f in CACHE_FILES if not (self.path / f).is_file()]
        if missing:
            raise ImageError(f"{self.path}: not an image-feature cache ({', '.join(missing)} not found){remedy}")
        expected = f"a file of the image-feature cache encode-images writes{remedy}"
        self.meta = read_json_object(self.path / FEATURES_INFO, expected, ImageError)
        self.pids = read_string_list(self.path / "pids.json", f"a JSON list of distinct pids (strings), one per row "
                                     f"of features.npy: {expected}", ImageError, "row", distinct=True)
        self.features = read_npy(self.path / "features.npy", str(self.path), f"expected {expected}", ImageError)
        if self.features.ndim != 2 or len(self.features) != len(self.pids):
            raise ImageError(f"{self.path}: features.npy has shape {self.features.shape} "
                             f"but pids.json lists {len(self.pids)} pids")
        self._rows = {pid: i for i, pid in enumerate(self.pids)}

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def digest(self) -> str:
        """sha256 of what the cache holds: its encoder, each row's pid and the sha256 of the image it was encoded
        from (a resumed training checks its features by it)."""
        held = {"encoder": self.meta.get("encoder"), "pids": self.pids, "images": self.meta.get("images")}
        return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()

    def row(self, pid: str) -> int | None:
        return self._rows.get(pid)

    def check_images(self, records: list[dict], records_path: Path) -> None:
        """Refuse rows that are not these records' images: a pid whose image file is not the one its row was
        encoded from (encoder.json's sha256: the image changed since, or the cache was made of other records that
        share pids), or a file that cannot be read. Rows of pids with no image here are not read (evaluate gives
        features to image questions only)."""
        root, encoded = dataset_root(Path(records_path)), self.meta.get("images", {})
        for r in records:
            pid = str(r["pid"])
            if r.get("image") is None or self.row(pid) is None:
                continue
            path = image_path(records_path, root, r["image"])
            try:
                current = sha256_file(path)
            except OSError as e:
                raise ImageError(f"{records_path}: pid {pid}: image {path} cannot be read ({e})") from None
            if current != encoded.get(pid):
                raise ImageError(f"{self.path}: pid {pid}: its features are not of image {path} (sha256 {current}, "
                                 f"the cache's {encoded.get(pid)}); expected the cache encode-images made of "
                                 f"{records_path}: run encode-images again")

    def vectors(self, pids: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(k, dim) float32 features and a (k,) mask; rows of pids without features (None or absent) are zero."""
        index = np.array([-1 if p is None else self._rows.get(p, -1) for p in pids], dtype=np.int64)
        has = index >= 0
        out = np.zeros((len(pids), self.dim), dtype=np.float32)
        out[has] = self.features[index[has]]
        return out, has


def encode_images(encoder: VisionEncoder, records_path: Path, out_dir: Path, policy: str = EncodeImagesConfig.policy,
                  batch_size: int = EncodeImagesConfig.batch_size) -> dict[str, Any]:
    """Cache `encoder`'s features of every record's image (records.jsonl order) in `out_dir`. `records_path` is a
    validated folder's records.jsonl: a record validate would not keep is a DataError before any image is read.

    Rows of a cache with the same fingerprint are reused when the pid's image file is unchanged (same sha256);
    only the rest go through the encoder. A cache an earlier run left that cannot be read (earlier_cache) is encoded
    again whole, said in one line on stderr and in the summary's "unreadable_cache" (null otherwise). The cache is
    rewritten whole and atomically, holding exactly the current records' images. A missing/unreadable image, a
    record with has_image but no image file, or an image path leaving the dataset (`dataset_root`) fails the run
    (policy "fail", nothing written) or is left out and listed under "skipped" (policy "skip")."""
    if policy not in POLICIES:
        raise ValueError(f"image policy must be 'fail' or 'skip', not {policy!r}")
    records_path, out_dir = Path(records_path), Path(out_dir)
    root = dataset_root(records_path)
    skipped: list[str] = []

    def unreadable(pid: str, path: Any, why: Any) -> None:
        if policy == "fail":
            remove_output(out_dir)  # a failed run leaves no earlier cache that training would take for this one's
            raise ImageError(f"{records_path}: pid {pid}: image {path} cannot be read ({why}); "
                             "rerun with the skip policy to leave such images out") from None
        skipped.append(pid)

    lines = read_jsonl_lines(records_path, expected="the records.jsonl that the validate stage writes")
    # As tokenize and evaluate check them: each an object as validate keeps it (a string pid, a string or null
    # image path), no pid twice (features are keyed by pid).
    check_validated_records("scienceqa", records_path, lines)
    wanted = []
    for _, r in lines:
        pid = r["pid"]
        if r.get("image") is not None:
            try:  # the records file is data too: its image paths must stay inside the dataset
                wanted.append((pid, image_path(records_path, root, r["image"])))
            except UnsafePathError as e:
                unreadable(pid, r["image"], e)
        elif r.get("has_image"):  # the source names an image that was not shipped or not stored
            unreadable(pid, None, "the record has an image but no image file; fetch.json counts these as "
                                  "images_missing")
    fingerprint = encoder.fingerprint()

    old, unreadable_cache = earlier_cache(out_dir, fingerprint)

    # Hash first: a missing file fails before any encoding, and a changed image is not served stale features.
    digests: dict[str, str] = {}
    for pid, path in wanted:
        try:
            digests[pid] = sha256_file(path)
        except OSError as e:
            unreadable(pid, path, e)
    features = np.zeros((len(wanted), encoder.feature_dim), dtype=np.float32)
    done = np.zeros(len(wanted), dtype=bool)
    todo = []
    for k, (pid, path) in enumerate(wanted):
        if pid not in digests:
            continue
        if old is not None and old.meta["images"].get(pid) == digests[pid] and (i := old.row(pid)) is not None:
            features[k], done[k] = old.features[i], True
        else:
            todo.append((k, pid, path))
    reused = int(done.sum())
    if unreadable_cache is not None:
        print(f"llama-adapter: image-feature cache {out_dir} left by an earlier run cannot be read ({unreadable_cache})"
              f"; rebuilding it: {len(todo)} image(s) go to the encoder", file=sys.stderr)

    for start in range(0, len(todo), batch_size):
        images, rows = [], []
        for k, pid, path in todo[start:start + batch_size]:
            try:
                with Image.open(path) as im:
                    if max(im.size) > MAX_ASPECT * min(im.size):
                        raise ValueError(f"{im.size[0]} x {im.size[1]} pixels, more than {MAX_ASPECT} times as long "
                                         "as wide")
                    images.append(im.convert("RGB"))
                rows.append(k)
            except image_read_errors() as e:
                unreadable(pid, path, e)
        if images:
            features[rows], done[rows] = encoder.encode(images).numpy(), True

    pids = [pid for (pid, _), ok in zip(wanted, done) if ok]
    if skipped and not pids:  # the skip policy is for a few bad images, not for a cache without features
        remove_output(out_dir)
        raise ImageError(f"{records_path}: every image was skipped ({len(skipped)}, first pid {skipped[0]}); expected "
                         f"images under the dataset folder {root} (rerun with --policy fail to see why each failed)")
    summary = {"encoded": len(pids) - reused, "reused": reused, "n_skipped": len(skipped), "rows": len(pids),
               "feature_dim": encoder.feature_dim, "unreadable_cache": unreadable_cache}
    del old  # drop the memory map of the files about to be replaced
    with atomic_dir(out_dir, remove_on_failure=True) as tmp:
        np.save(tmp / "features.npy", features[done])
        write_json(tmp / "pids.json", pids)
        write_json(tmp / FEATURES_INFO, {"format": FORMAT_VERSION, "encoder": fingerprint,
                                          "encoder_path": str(encoder.path), "records": str(records_path),
                                          **summary, "skipped": skipped,
                                          "images": {p: digests[p] for p in pids}})
    return {**summary, "skipped": skipped}


def earlier_cache(out_dir: Path, fingerprint: dict[str, Any]) -> tuple[ImageFeatures | None, str | None]:
    """The cache an earlier encode_images left in `out_dir`, if made with this encoder (`fingerprint`), for its rows
    to be reused, and None; or None and why it cannot be read (truncated, a file missing or damaged). The cache is
    encode_images' own output, read back only to save encoding: one it cannot read is encoded again whole, not
    refused (training and evaluation, which read it as their input, refuse it: ImageFeatures). Without encoder.json,
    or of another encoder or format, there is nothing to reuse and nothing to say. A file the system will not open
    (permission, I/O) is not a damaged cache: its OSError stops the run before any image is encoded, as the cache
    could not be replaced either."""
    if not (out_dir / FEATURES_INFO).is_file():
        return None, None
    for name in CACHE_FILES:
        try:
            os.close(os.open(out_dir / name, os.O_RDONLY))
        except (FileNotFoundError, IsADirectoryError):
            pass  # a file missing: said below, and encoded again
    try:
        meta = read_json_object(out_dir / FEATURES_INFO, "the cache's encoder.json", ImageError)
        if meta.get("format") != FORMAT_VERSION or meta.get("encoder") != fingerprint:
            return None, None  # another encoder's or format's: encoded anew, nothing to say
        old = ImageFeatures(out_dir, remedy="")  # (mended here)
        if not isinstance(old.meta.get("images"), dict):
            raise ImageError(f"{out_dir / 'encoder.json'}: images is a {type(old.meta.get('images')).__name__}; "
                             "expected each pid's image sha256")
        if old.dim != fingerprint["feature_dim"]:
            raise ImageError(f"{out_dir}: features.npy has {old.dim} columns; expected the encoder's "
                             f"{fingerprint['feature_dim']}")
        return old, None
    except ImageError as e:
        return None, " ".join(str(e).split())  # one line


def image_path(records_path: Path, root: Path, image: str) -> Path:
    """A record's image file (its path relative to the records file), refused (UnsafePathError) where it leaves
    the dataset folder `root`."""
    return inside(root, os.path.relpath(os.path.normpath(Path(records_path).parent / image), root))


def dataset_root(records_path: Path) -> Path:
    """The folder a records file's image paths must stay inside: the fetched dataset that validation.json
    beside a validated records file names, else the records file's own folder."""
    return fetched_folder(records_path.parent) or records_path.parent
