"""The frozen CLIP image encoder and its per-pid feature cache, on a tiny random CLIP written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llama_adapter import multimodal
from llama_adapter.devices import pick_device
from llama_adapter.errors import DataError
from llama_adapter.multimodal import (
    EncoderError,
    ImageError,
    ImageFeatures,
    VisionEncoder,
    encode_images,
    save_tiny_clip,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def encoder(clip_dir) -> VisionEncoder:
    return VisionEncoder(clip_dir, layers=(-1, -3), device="cpu")  # the same features on any machine


def _image(colour: str, size: tuple[int, int] = (48, 40)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (20, 16), colour), (10, 12))
    return image


def _dataset(root: Path, images: dict[str, str], without_image: tuple[str, ...] = ("9",)) -> Path:
    """A validated-layout dataset: records.jsonl in root/validated, images under root/fetched (relative paths)."""
    (root / "fetched" / "images").mkdir(parents=True, exist_ok=True)
    (root / "validated").mkdir(exist_ok=True)
    records = []
    for pid, colour in images.items():
        _image(colour).save(root / "fetched" / "images" / f"{pid}.png")
        records.append(_record(pid, f"../fetched/images/{pid}.png"))
    records += [_record(pid, None) for pid in without_image]
    path = root / "validated" / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # validate names the fetched folder, inside which the records' image paths must stay
    (root / "validated" / "validation.json").write_text(json.dumps({"source": str(root / "fetched")}))
    return path


def _record(pid: str, image: str | None) -> dict:
    """A record as validate keeps it."""
    return {"pid": pid, "question": "?", "choices": ["yes", "no"], "answer": 0, "image": image,
            "has_image": image is not None}


def _count_calls(encoder: VisionEncoder, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = encoder.encode

    def counted(images):
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(encoder, "encode", counted)
    return calls


def test_tiny_clip_is_byte_identical_per_seed(clip_dir, tmp_path):
    again, other = save_tiny_clip(tmp_path / "again", seed=0), save_tiny_clip(tmp_path / "other", seed=1)
    for name in ("config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (clip_dir / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (clip_dir / "model.safetensors").read_bytes()


def test_encoder_features(encoder):
    assert encoder.feature_dim == 2 * 32 and encoder.layers == (4, 2)
    red, blue = _image("red"), _image("blue")
    features = encoder.encode([red, blue, red])
    assert features.shape == (3, 64) and features.dtype == torch.float32
    assert torch.equal(encoder.encode([red, blue, red]), features)  # the same batch: bitwise repeatable
    # Another row or batch size may change the BLAS summation order: equal up to float rounding only.
    torch.testing.assert_close(features[2], features[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode([red])[0], features[0], atol=1e-5, rtol=0)
    assert not torch.allclose(features[0], features[1], atol=1e-3)
    # The last layer's slice is CLIP's own pooled output (CLS through post_layernorm).
    pooled = encoder.model(pixel_values=encoder.preprocess(red)[None]).pooler_output[0]
    torch.testing.assert_close(features[0, :32], pooled)


def test_preprocess_matches_clip_image_processor(encoder):
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = _image("green", size=(71, 45))
    expected = torch.as_tensor(np.asarray(reference(images=image, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(encoder.preprocess(image), expected, atol=1e-5, rtol=0)


def test_bad_layers_and_folders(clip_dir, tmp_path):
    with pytest.raises(ValueError, match=rf"{clip_dir}.*-5\.\.4"):
        VisionEncoder(clip_dir, layers=(-1, -7))
    assert VisionEncoder(clip_dir).layers == (4, 1)  # the default (-1, -4, -7, -10) cut to 4 blocks
    with pytest.raises(EncoderError, match=rf"{tmp_path / 'absent'}.*config.json"):
        VisionEncoder(tmp_path / "absent")


def test_cache_is_reused_and_extended(encoder, tmp_path, monkeypatch):
    records = _dataset(tmp_path, {"1": "red", "2": "blue", "3": "green"})
    out = tmp_path / "features"
    calls = _count_calls(encoder, monkeypatch)
    first = encode_images(encoder, records, out, batch_size=2)
    assert first == {"encoded": 3, "reused": 0, "n_skipped": 0, "rows": 3, "feature_dim": 64, "skipped": [],
                     "unreadable_cache": None}
    assert calls == [2, 1]
    features = np.load(out / "features.npy")
    assert json.loads((out / "pids.json").read_text()) == ["1", "2", "3"]
    assert json.loads((out / "encoder.json").read_text())["encoder"] == encoder.fingerprint()

    calls.clear()
    assert encode_images(encoder, records, out)["reused"] == 3 and calls == []
    np.testing.assert_array_equal(np.load(out / "features.npy"), features)

    records = _dataset(tmp_path, {"1": "red", "2": "blue", "3": "green", "4": "yellow"})
    summary = encode_images(encoder, records, out)
    assert (summary["encoded"], summary["reused"], calls) == (1, 3, [1])
    np.testing.assert_array_equal(np.load(out / "features.npy")[:3], features)

    calls.clear()  # a changed image under a cached pid is encoded again
    _image("purple").save(tmp_path / "fetched" / "images" / "2.png")
    assert encode_images(encoder, records, out)["encoded"] == 1 and calls == [1]


def test_the_same_encoder_elsewhere_reuses_the_cache(encoder, clip_dir, tmp_path, monkeypatch):
    """The fingerprint is what decides the features (weights, config, layers, size, device), not the folder's
    absolute path: encoder.json held /abs/path/results/models/demo-clip, so two checkouts of the same DAG wrote
    different caches, and the same encoder in another folder (a moved results tree) encoded every image again."""
    import shutil

    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    encode_images(encoder, records, tmp_path / "features")
    moved = VisionEncoder(shutil.copytree(clip_dir, tmp_path / "moved-clip"), layers=(-1, -3), device="cpu")
    assert moved.fingerprint() == encoder.fingerprint()
    assert encode_images(moved, records, tmp_path / "features")["reused"] == 2
    assert "path" not in json.loads((tmp_path / "features" / "encoder.json").read_text())["encoder"]


def test_other_encoder_reencodes_everything(encoder, clip_dir, tmp_path, monkeypatch):
    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    encode_images(encoder, records, tmp_path / "features")
    other = VisionEncoder(clip_dir, layers=(-1,))
    summary = encode_images(other, records, tmp_path / "features")
    assert (summary["encoded"], summary["reused"], summary["feature_dim"]) == (2, 0, 32)
    assert ImageFeatures(tmp_path / "features").dim == 32


def test_missing_image_fails_or_is_skipped(encoder, tmp_path, monkeypatch):
    records = _dataset(tmp_path, {"1": "red", "2": "blue", "3": "green"})
    (tmp_path / "fetched" / "images" / "2.png").unlink()
    (tmp_path / "fetched" / "images" / "3.png").write_bytes(b"not a png")
    out = tmp_path / "features"
    calls = _count_calls(encoder, monkeypatch)
    with pytest.raises(ImageError, match=r"records\.jsonl: pid 2: image .*2\.png"):
        encode_images(encoder, records, out)
    assert not out.exists() and calls == []

    summary = encode_images(encoder, records, out, policy="skip")
    assert (summary["rows"], summary["n_skipped"], summary["skipped"]) == (1, 2, ["2", "3"])
    assert json.loads((out / "encoder.json").read_text())["skipped"] == ["2", "3"]
    assert ImageFeatures(out).pids == ["1"]
    (tmp_path / "fetched" / "images" / "1.png").unlink()  # the last one too: a cache with no features is an error
    with pytest.raises(ImageError, match=r"records\.jsonl: every image was skipped \(3, first pid 1\)"):
        encode_images(encoder, records, out, policy="skip")
    assert not out.exists()
    with pytest.raises(ValueError, match="policy"):
        encode_images(encoder, records, out, policy="ignore")


def test_image_features_reader(encoder, tmp_path):
    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    encode_images(encoder, records, tmp_path / "features")
    cache = ImageFeatures(tmp_path / "features")
    assert cache.dim == 64 and cache.row("2") == 1 and cache.row("9") is None
    vectors, has = cache.vectors(["2", None, "9", "1"])
    assert vectors.shape == (4, 64) and vectors.dtype == np.float32
    np.testing.assert_array_equal(has, [True, False, False, True])
    np.testing.assert_array_equal(vectors[[1, 2]], 0)
    np.testing.assert_allclose(vectors[[0, 3]], encoder.encode([_image("blue"), _image("red")]).numpy(), atol=1e-5)
    (tmp_path / "features" / "pids.json").unlink()
    with pytest.raises(ImageError, match=rf"{tmp_path / 'features'}.*pids.json"):
        ImageFeatures(tmp_path / "features")


@pytest.mark.parametrize("kept", [0, 10, -100])  # bytes of the file kept: none, a cut header, cut data
def test_a_damaged_features_file_is_named(encoder, tmp_path, kept):
    """An empty or truncated features.npy (a copy of the cache cut short) was numpy's EOFError traceback or
    its bare "mmap length is greater than file size", naming no file, in evaluate and train."""
    encode_images(encoder, _dataset(tmp_path, {"1": "red", "2": "blue"}), tmp_path / "features")
    features = tmp_path / "features" / "features.npy"
    features.write_bytes(features.read_bytes()[:kept])
    with pytest.raises(ImageError, match=rf"{tmp_path / 'features'}: features.npy is not a readable numpy array"):
        ImageFeatures(tmp_path / "features")


@pytest.mark.parametrize("pids, needle", [('{"0": "1", "1": "2"}', "holds a JSON dict"),
                                          ('["1", 2]', "row 1 is not a string (int 2)"),
                                          ('["1", "1"]', "row 1 repeats row 0's '1'"),
                                          ('["1", ', "not valid JSON")])
def test_a_pids_file_of_the_wrong_kind_is_named(encoder, tmp_path, pids, needle):
    """pids.json names each row of features.npy: an object (the rows' pids as its keys), a pid that is no string or
    one given twice was read as it came, and image questions found no features (or another's row: the last of a
    repeated pid's), scored from their text unsaid; now an ImageError naming the file, what it holds and what was
    expected, as a token split's keys.json (io.read_string_list)."""
    encode_images(encoder, _dataset(tmp_path, {"1": "red", "2": "blue"}), tmp_path / "features")
    (tmp_path / "features" / "pids.json").write_text(pids)
    with pytest.raises(ImageError) as e:
        ImageFeatures(tmp_path / "features")
    assert str(e.value).startswith(f"{tmp_path / 'features' / 'pids.json'}"), str(e.value)
    assert needle in str(e.value) and "expected" in str(e.value) and "encode-images" in str(e.value), str(e.value)


@pytest.mark.parametrize("damage, reason", [
    (lambda out: (out / "features.npy").write_bytes((out / "features.npy").read_bytes()[:-100]),
     "features.npy is not a readable numpy array"),  # truncated
    (lambda out: (out / "features.npy").unlink(), "features.npy not found"),
    (lambda out: np.save(out / "features.npy", np.zeros((2, 5), np.float32)), "features.npy has 5 columns"),
    (lambda out: (out / "pids.json").write_text('["1", '), "pids.json: not valid JSON"),
    (lambda out: (out / "pids.json").write_text('["1", "1"]'), "row 1 repeats row 0's '1'"),
    (lambda out: (out / "encoder.json").write_text((out / "encoder.json").read_text()[:-40]),
     "encoder.json: not valid JSON"),
    (lambda out: (out / "encoder.json").write_text(json.dumps(
        {**json.loads((out / "encoder.json").read_text()), "images": ["1", "2"]})), "encoder.json: images"),
])
def test_an_unreadable_cache_of_an_earlier_run_is_encoded_again(encoder, tmp_path, monkeypatch, capsys, damage,
                                                                reason):
    """The cache is encode-images' own output, read back only to reuse its rows: one an earlier run left that cannot
    be read (truncated, a file missing or damaged) stopped the command, naming it and saying to delete it; it is now
    encoded again whole, said in one line on stderr (the job's log) and in the summary (encoder.json too), with the
    images it encoded again counted. Training and evaluation, which read it as an input, still refuse it."""
    records, out = _dataset(tmp_path, {"1": "red", "2": "blue"}), tmp_path / "features"
    encode_images(encoder, records, out)
    fresh = np.load(out / "features.npy")
    damage(out)
    calls = _count_calls(encoder, monkeypatch)
    capsys.readouterr()
    summary = encode_images(encoder, records, out)
    assert (summary["encoded"], summary["reused"], calls) == (2, 0, [2])
    assert reason in summary["unreadable_cache"], summary["unreadable_cache"]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"llama-adapter: image-feature cache {out} left by an earlier run cannot be read ("), line
    assert reason in line and line.endswith("); rebuilding it: 2 image(s) go to the encoder"), line
    assert json.loads((out / "encoder.json").read_text())["unreadable_cache"] == summary["unreadable_cache"]
    np.testing.assert_array_equal(ImageFeatures(out).features, fresh)
    again = encode_images(encoder, records, out)  # whole again: reused, and nothing said
    assert (again["reused"], again["unreadable_cache"], capsys.readouterr().err) == (2, None, "")


def test_a_cache_the_system_will_not_open_stops_the_run(encoder, tmp_path, monkeypatch):
    """A cache file the file system refuses (permission, I/O) is not a damaged cache: encode-images stops, naming the
    file, before encoding anything (it took the cache for damaged, encoded every image again, and could not then
    replace a folder it may not read), and the cache is left as it was."""
    import builtins
    import errno
    import os

    records, out = _dataset(tmp_path, {"1": "red", "2": "blue"}), tmp_path / "features"
    encode_images(encoder, records, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    def refusing(real_open):  # the file, however it is opened (numpy's open, os.open)
        def refused(path, *args, **kwargs):
            if isinstance(path, str | os.PathLike) and Path(path) == out / "features.npy":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        return refused

    monkeypatch.setattr(os, "open", refusing(os.open))
    monkeypatch.setattr(builtins, "open", refusing(builtins.open))
    calls = _count_calls(encoder, monkeypatch)
    with pytest.raises(PermissionError, match="Permission denied") as e:
        encode_images(encoder, records, out)
    monkeypatch.undo()
    assert e.value.filename == str(out / "features.npy") and calls == []
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("line,fault", [
    ("[1, 2]", "not an object"),
    (json.dumps({"pid": "1", "question": "?", "image": None}), "choices not 2-5 strings"),
    (json.dumps(_record("2", None)), "repeated pid"),
])
def test_records_are_checked_as_validate_keeps_them_before_any_image(encoder, tmp_path, monkeypatch, line, fault):
    """encode-images reads a validated records.jsonl, checked as tokenize and evaluate check it: a line that is no
    record validate would keep is one DataError naming the file and line; no image is hashed or encoded."""
    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    records.write_text(records.read_text() + line + "\n")
    calls, hashed = _count_calls(encoder, monkeypatch), []
    monkeypatch.setattr(multimodal, "sha256_file", lambda path: hashed.append(path))
    with pytest.raises(DataError, match=rf"{records}: 1 of 4 records are not valid scienceqa records \(first: "
                                        rf"line 4, record 3: {fault}"):
        encode_images(encoder, records, tmp_path / "features")
    assert calls == [] and hashed == [] and not (tmp_path / "features").exists()


def test_default_device_is_the_clis(clip_dir):
    """As the CLI: the GPU when one is visible, else the CPU; the fingerprint names the kind of device."""
    default = VisionEncoder(clip_dir)
    assert default.device == pick_device(None) and default.fingerprint()["device"] == pick_device(None).type


def test_a_cache_made_on_another_kind_of_device_is_encoded_again(encoder, clip_dir, tmp_path, monkeypatch):
    """A GPU's features differ from a CPU's by float rounding, so a cache is reused only on its kind of device.
    The other kind here is the meta device (no data), whose encoder differs from `encoder` by its device alone;
    it cannot compute, so its batches go through `encoder`: what is tested is which rows are reused."""
    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    encode_images(encoder, records, tmp_path / "features")
    other = VisionEncoder(clip_dir, layers=(-1, -3), device="meta")
    assert {k: v for k, v in other.fingerprint().items() if v != encoder.fingerprint()[k]} == {"device": "meta"}
    calls = _count_calls(encoder, monkeypatch)
    monkeypatch.setattr(other, "encode", encoder.encode)
    summary = encode_images(other, records, tmp_path / "features")
    assert (summary["encoded"], summary["reused"], calls) == (2, 0, [2])
    assert json.loads((tmp_path / "features" / "encoder.json").read_text())["encoder"]["device"] == "meta"
    calls.clear()  # and back on the CPU: the meta-made cache is not taken either
    assert (encode_images(encoder, records, tmp_path / "features")["reused"], calls) == (0, [2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_caches_are_not_mixed(clip_dir, tmp_path):
    """The same on real devices: each kind's run re-encodes the other's cache, and reuses its own."""
    records = _dataset(tmp_path, {"1": "red", "2": "blue"})
    out = tmp_path / "features"
    gpu = VisionEncoder(clip_dir, layers=(-1, -3), device="cuda")
    cpu = VisionEncoder(clip_dir, layers=(-1, -3), device="cpu")
    assert (encode_images(cpu, records, out)["encoded"], encode_images(gpu, records, out)["reused"]) == (2, 0)
    assert encode_images(gpu, records, out)["reused"] == 2 and encode_images(cpu, records, out)["reused"] == 0


def _damaged_png() -> bytes:
    """A PNG whose second IDAT chunk has a garbage type: PIL opens it, and decoding raises SyntaxError ("broken PNG
    file"), not OSError."""
    import io

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((300, 300, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    second = raw.find(b"IDAT", raw.find(b"IDAT") + 4)
    raw[second: second + 4] = b"\x00\x01\x02\x03"
    return bytes(raw)


def test_a_damaged_png_and_a_thin_strip_are_unreadable_images_by_pid(encoder, tmp_path):
    """A PNG with a damaged chunk (SyntaxError: it crashed the skip policy and escaped the fail policy's message)
    and a 1 x 5000 strip (preprocessing would scale it to 32 x 160,000 before the crop; gigapixels for a real
    CLIP) are refused by pid like any unreadable image."""
    records = _dataset(tmp_path, {"1": "red", "2": "blue", "3": "green"})
    (tmp_path / "fetched" / "images" / "2.png").write_bytes(_damaged_png())
    Image.new("RGB", (1, 5000), "red").save(tmp_path / "fetched" / "images" / "3.png")
    with pytest.raises(ImageError, match=r"pid 2: image .*2\.png cannot be read"):
        encode_images(encoder, records, tmp_path / "features")
    summary = encode_images(encoder, records, tmp_path / "features", policy="skip")
    assert summary["skipped"] == ["2", "3"] and ImageFeatures(tmp_path / "features").pids == ["1"]


@pytest.fixture
def multimodal_world(tmp_path, encoder, llama_sp_model):
    """A tiny base (tokenizer beside it), a multimodal adapter reading the tiny CLIP's 64-wide features, one reading
    32-wide ones, and a validated dataset A with the cache encode-images made of it."""
    from llama_adapter.adapter import AdaptedTransformer
    from llama_adapter.checkpoint import save_adapter, save_meta_checkpoint
    from llama_adapter.config import AdapterArgs, ModelArgs

    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=256)
    torch.manual_seed(0)
    for name, width in (("mm", encoder.feature_dim), ("narrow", 32)):
        model = AdaptedTransformer(args, AdapterArgs(adapter_len=3, adapter_layers=2, visual_dim=width,
                                                     visual_hidden=8))
        if name == "mm":
            save_meta_checkpoint(model, tmp_path / "base")
            (tmp_path / "base" / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
        save_adapter(model, tmp_path / f"{name}.safetensors", base_model=str(tmp_path / "base"))
    encode_images(encoder, _dataset(tmp_path / "A", {"1": "red", "2": "blue"}), tmp_path / "cacheA")
    return tmp_path


def test_evaluate_reads_a_multimodal_adapters_own_images_or_refuses(multimodal_world, capsys, monkeypatch):
    """A multimodal adapter is evaluated with the cache of its own width, made of these records' images: without
    --image-features (every image question was scored from its text), with a cache of another width (a matmul
    error after loading), with the cache of other records sharing their pids, or after an image changed (both
    read the old features), it is refused by name, in one line."""
    from llama_adapter import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{multimodal_world}/mlflow.db")
    w = multimodal_world
    _dataset(w / "B", {"1": "green", "2": "yellow"})

    def refused(adapter, data, *features):
        rc = cli.main([str(a) for a in ("evaluate", "--task", "scienceqa", "--base", w / "base", "--adapter",
                                        w / adapter, "--data", w / data / "validated", *features, "--out",
                                        w / "eval", "--mode", "likelihood")])
        err = capsys.readouterr().err
        assert rc not in (0, None) and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (w / "eval" / "scores.json").exists()
        return err

    assert "expected --image-features" in refused("mm.safetensors", "A")
    assert "features 64 wide, but --adapter" in refused("narrow.safetensors", "A", "--image-features", w / "cacheA")
    assert "pid 1: its features are not of image" in refused("mm.safetensors", "B", "--image-features",
                                                             w / "cacheA")
    _image("green").save(w / "A" / "fetched" / "images" / "2.png")
    assert "pid 2: its features are not of image" in refused("mm.safetensors", "A", "--image-features",
                                                             w / "cacheA")


def test_generate_says_a_multimodal_adapter_answers_from_text_alone(multimodal_world, capsys, monkeypatch):
    """generate's prompts carry no image: a multimodal adapter answers them from their text, and the command says
    so (it did not)."""
    from llama_adapter import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{multimodal_world}/mlflow.db")
    w = multimodal_world
    (w / "prompts.jsonl").write_text('{"id": "a", "instruction": "Name a colour."}\n')
    assert cli.main([str(a) for a in ("generate", "--base", w / "base", "--adapter", f"mm={w / 'mm.safetensors'}",
                                      "--prompts", w / "prompts.jsonl", "--out", w / "out.jsonl",
                                      "--max-new-tokens", "2")]) in (0, None)
    assert "note: mm read images, which --prompts do not carry" in capsys.readouterr().err
    assert (w / "out.jsonl").is_file()
