"""Frozen encoders, dataset readers, the feature cache and `daamkit classify extract`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from daamkit.classify import datasets
from daamkit.classify.datasets import chunk_bounds, load_task
from daamkit.classify.encoders import FrozenEncoder, masked_mean
from daamkit.classify.extract import extract_features
from daamkit.classify.feature_cache import FeatureCache
from daamkit.cli.main import app
from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import set_quiet

from conftest import AGNEWS_TRAIN, IEMOCAP_LONG, IEMOCAP_TURNS

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet():
    set_quiet(True)
    yield
    set_quiet(False)


def _encoder(folder, **kwargs) -> FrozenEncoder:
    return FrozenEncoder.from_pretrained(str(folder), device="cpu", **kwargs)


# ------------------------------------------------------------------ encoders


@pytest.mark.parametrize(
    "fixture, modality, layers, hidden",
    [("tiny_wavlm", "audio", 2, 32), ("tiny_beit", "image", 2, 32), ("tiny_llama", "text", 2, 32),
     ("tiny_bert", "text", 3, 24)],
)
def test_encoder_shapes_and_layers(request, fixture, modality, layers, hidden):
    from PIL import Image

    folder = request.getfixturevalue(fixture)
    raw = {
        "audio": [np.random.default_rng(0).normal(size=n).astype(np.float32) for n in (4000, 2500)],
        "image": [Image.new("RGB", (32, 32), (10, 200, 30)), Image.new("RGB", (48, 20), (90, 0, 255))],
        "text": ["peace talks resume", "the home side won the cup after a late goal"],
    }[modality]
    encoder = _encoder(folder)
    assert encoder.modality == modality and encoder.layers == list(range(1, layers + 1))
    assert encoder.sampling_rate == (16000 if modality == "audio" else None)
    features = encoder.encode(raw)
    assert features.shape == (2, layers, hidden) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    with_embeddings = _encoder(folder, include_embeddings=True)
    assert with_embeddings.layers == list(range(layers + 1))
    full = with_embeddings.encode(raw)
    assert full.shape == (2, layers + 1, hidden)
    torch.testing.assert_close(full[:, 1:], features)


def test_masked_mean_matches_loop():
    hidden = torch.randn(3, 7, 5)
    lengths = torch.tensor([7, 2, 4])
    expected = torch.stack([hidden[b, : lengths[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(masked_mean(hidden, lengths), expected)
    torch.testing.assert_close(masked_mean(hidden.half(), None), hidden.half().float().mean(1))


@pytest.mark.parametrize("fixture", ["tiny_wavlm", "tiny_llama", "tiny_bert"])
def test_padding_does_not_change_features(request, fixture):
    encoder = _encoder(request.getfixturevalue(fixture))
    if encoder.modality == "audio":
        rng = np.random.default_rng(3)
        short, long = rng.normal(size=3000).astype(np.float32), rng.normal(size=9000).astype(np.float32)
        prepared = encoder.prepare([short, long])
        (_, inputs, frames), = prepared.parts
        assert inputs["attention_mask"][0].sum() == 3000 and frames[0] < frames[1]  # really padded
    else:
        short, long = "oil prices rise", " ".join(w for row in AGNEWS_TRAIN for w in row[2].split())
        prepared = encoder.prepare([short, long])
        (_, inputs, lengths), = prepared.parts
        assert lengths[0] < inputs["input_ids"].shape[1]  # really padded
    alone = encoder.encode([short])[0]
    padded = encoder.forward(prepared)[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encoder.encode([long])[0], alone, atol=1e-3)


def test_audio_without_attention_mask_runs_equal_length_groups(tmp_path, tiny_wavlm):
    folder = tmp_path / "wavlm-no-mask"
    shutil.copytree(tiny_wavlm, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "return_attention_mask": False}))
    encoder = _encoder(folder)
    rng = np.random.default_rng(4)
    waves = [rng.normal(size=n).astype(np.float32) for n in (3000, 9000, 3000)]
    prepared = encoder.prepare(waves)
    assert [rows for rows, _, _ in prepared.parts] == [[0, 2], [1]]
    assert all("attention_mask" not in inputs for _, inputs, _ in prepared.parts)
    together = encoder.forward(prepared)
    for i, wave in enumerate(waves):
        torch.testing.assert_close(together[i], encoder.encode([wave])[0], atol=1e-5, rtol=1e-5)


def test_llama_tokenizer_gets_a_pad_token_and_right_padding(tiny_llama):
    tokenizer = _encoder(tiny_llama).processor
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"


def test_encoder_errors(tmp_path, tiny_bert):
    with pytest.raises(DaamkitError, match="neither a local folder nor in the Hugging Face cache"):
        FrozenEncoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(DaamkitError, match="unknown `dtype`"):
        FrozenEncoder.from_pretrained(str(tiny_bert), dtype="float8")
    no_tokenizer = tmp_path / "bert-without-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_bert / "config.json", no_tokenizer / "config.json")
    with pytest.raises(DaamkitError, match="has no tokenizer for its text model"):
        FrozenEncoder.from_pretrained(str(no_tokenizer))


# ------------------------------------------------------------------ datasets


def test_iemocap_reader_merges_labels_chunks_and_keeps_sessions(iemocap_dir):
    data = load_task("iemocap", iemocap_dir.parent)
    assert data.classes == ["neu", "hap", "ang", "sad"] and data.grouping == "session"
    split = data.splits["all"]
    kept_turns = [t for t in IEMOCAP_TURNS if t[1] != "fru"]
    assert len(split) == 5 * len(kept_turns) + 3  # the 11.5 s utterance gives 5 s + 5 s + 1.5 s chunks
    assert not any("M001" in item["id"] for item in split.items)  # frustration dropped
    by_id = {item["id"]: (item, label) for item, label in zip(split.items, split.labels)}
    assert by_id["Ses03F_impro01_F001#0"][1] == by_id["Ses03F_impro01_M002#0"][1] == 1  # exc and hap -> hap
    assert by_id["Ses04F_impro01_M000#0"][1] == 2 and by_id["Ses05F_impro01_F002#0"][1] == 3
    long_utt = IEMOCAP_LONG[0]
    chunks = [i for i, item in enumerate(split.items) if item["utterance"] == long_utt]
    assert [split.items[i]["id"] for i in chunks] == [f"{long_utt}#{k}" for k in range(3)]
    assert [len(split.load(i)) for i in chunks] == [80000, 80000, 24000]
    assert {split.items[i]["group"] for i in chunks} == {"Session1"}
    assert {item["group"] for item in split.items} == {f"Session{s}" for s in range(1, 6)}
    resampled = next(i for i, item in enumerate(split.items) if item["id"] == "Ses02F_impro01_F000#0")
    assert len(split.load(resampled)) == 0.6 * 16000 and split.load(resampled).dtype == np.float32  # from 8 kHz


def test_chunk_bounds_drop_only_short_tails():
    assert chunk_bounds(3 * 16000, 16000) == [(0, 48000)]
    assert chunk_bounds(10 * 16000 + 8000, 16000) == [(0, 80000), (80000, 160000)]
    assert chunk_bounds(11 * 16000, 16000)[-1] == (160000, 176000)


def test_agnews_reader(agnews_dir):
    data = load_task("agnews", agnews_dir)
    train = data.splits["train"]
    assert data.classes == ["World", "Sports", "Business", "Sci/Tech"] and data.grouping is None
    assert len(train) == 8 and len(data.splits["test"]) == 4
    assert train.load(0) == "Wall St. Bears Claw Back Short-sellers, Wall Street's dwindling band, are seeing green again."
    assert '"hopeful"' in train.load(1)
    assert train.labels[:4] == [2, 0, 1, 3] and train.items[0] == {"id": "train/0", "group": None, "utterance": None}


def test_cifar100_reader(cifar100_dir):
    import pickle

    data = load_task("cifar100", cifar100_dir)
    assert len(data.classes) == 100 and data.classes[7] == "class_07"
    test = data.splits["test"]
    raw = pickle.loads((cifar100_dir / "cifar-100-python" / "test").read_bytes(), encoding="bytes")
    assert len(test) == 6 and test.labels == raw[b"fine_labels"]
    image = np.asarray(test.load(2))
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[..., 1], raw[b"data"][2, 1024:2048].reshape(32, 32))  # green plane


def test_generic_readers(text_csv_dir, image_folder_dir, audio_folder_dir):
    text = load_task("text-csv", text_csv_dir)
    assert text.classes == ["business", "sports", "tech", "world"] and text.splits["train"].labels[0] == 0
    images = load_task("image-folder", image_folder_dir)
    assert images.classes == ["cat", "dog"] and len(images.splits["train"]) == 6
    assert images.splits["train"].load(5).mode == "RGB" and images.splits["test"].items[1]["id"] == "test/dog/0.png"
    audio = load_task("audio-folder", audio_folder_dir)
    train = audio.splits["train"]
    assert audio.classes == ["no", "yes"] and train.items[1]["id"] == "train/no/1.wav#0"
    assert train.items[1]["utterance"] == "train/no/1.wav"
    assert len(train.load(1)) == round(0.5 * 16000)  # 22.05 kHz file resampled


def test_audio_folder_clips_are_cut_into_5_second_chunks(tmp_path):
    """Like IEMOCAP: 5 s chunks that keep their clip as utterance id; a trailing piece under 1 s is dropped."""
    import soundfile

    for split in ("train", "test"):
        for cls, seconds in (("a", 11.5), ("b", 5.4)):
            (tmp_path / split / cls).mkdir(parents=True)
            soundfile.write(tmp_path / split / cls / "clip.wav", np.zeros(int(seconds * 8000), np.float32), 8000)
    train = load_task("audio-folder", tmp_path).splits["train"]
    assert [item["id"] for item in train.items] == ["train/a/clip.wav#0", "train/a/clip.wav#1", "train/a/clip.wav#2",
                                                   "train/b/clip.wav#0"]
    assert {item["utterance"] for item in train.items} == {"train/a/clip.wav", "train/b/clip.wav"}
    assert train.labels == [0, 0, 0, 1] and [len(train.load(i)) for i in range(4)] == [80000, 80000, 24000, 80000]


def test_text_csv_saved_with_a_utf8_bom_is_read(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("text,label\nfirst,pos\nsecond,neg\n", encoding="utf-8-sig")
    data = load_task("text-csv", tmp_path)
    assert data.classes == ["neg", "pos"] and data.splits["train"].load(0) == "first"


def load_logged(task: str, root):
    """`load_task` with its log lines on stderr (this module runs quiet)."""
    set_quiet(False)
    try:
        return load_task(task, root)
    finally:
        set_quiet(True)


def test_text_csv_header_in_any_case_and_rows_without_text_or_label_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "train.csv").write_text(' Text ,LABEL,id\n"one, with a comma",pos,1\n,neg,2\ntwo,,3\n\nthree,neg,4\n')
    (tmp_path / "test.csv").write_text("text,label,id\nfour,pos,5\n")
    data = load_logged("text-csv", tmp_path)
    train = data.splits["train"]
    assert data.classes == ["neg", "pos"] and [train.load(i) for i in range(len(train))] == ["one, with a comma", "three"]
    assert train.labels == [1, 0]
    assert "train.csv: skipped 2 row(s) with an empty text or label (line(s) 3, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_text_csv_exported_with_semicolons_or_tabs_is_read(tmp_path, delimiter):
    for split in ("train", "test"):
        rows = ["id", "label", "text"], ["1", "pos", "first, with a comma"], ["2", "neg", "second"]
        (tmp_path / f"{split}.csv").write_text("".join(delimiter.join(row) + "\n" for row in rows))
    data = load_task("text-csv", tmp_path)
    assert data.classes == ["neg", "pos"] and data.splits["train"].load(0) == "first, with a comma"


@pytest.mark.parametrize("content, message", [
    ('text,label\nok,pos\n\n"a\nb",pos,extra\n', r"train.csv:4: 3 field\(s\) where the header has 2; a text with a comma"),
    ('text,label\nok,pos\n"never closed,neg\nlast,pos\n', r"train.csv:3: 1 field\(s\) where the header has 2"),
    ("text,label\nd\xe9j\xe0,pos\n".encode("latin-1"), r"train.csv is not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
    ("words,tag\nok,pos\n", "train.csv has no column\\(s\\) text, label; the header needs text,label"),
])
def test_malformed_text_csv_is_one_line_naming_the_row(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (tmp_path / "test.csv").write_text("text,label\nfour,pos\n")
    with pytest.raises(DaamkitError, match=message):
        load_task("text-csv", tmp_path)


def test_image_folder_skips_and_counts_unreadable_images_and_applies_exif_orientation(image_folder_dir, tmp_path,
                                                                                      capsys):
    from PIL import Image

    root = tmp_path / "images"
    shutil.copytree(image_folder_dir, root)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    whole = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "cut.png").write_bytes(whole[: len(whole) // 2])
    rotated = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))  # stored 30 wide, 10 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90 degrees clockwise": a viewer shows it 10 wide, 30 high
    rotated.save(root / "test" / "cat" / "phone.jpg", exif=exif)
    data = load_logged("image-folder", root)
    assert "skipped 2 of 8 train image file(s): 2 unreadable" in capsys.readouterr().err
    train, test = data.splits["train"], data.splits["test"]
    assert len(train) == 6 and not any("broken" in item["id"] or "cut" in item["id"] for item in train.items)
    phone = next(i for i, item in enumerate(test.items) if item["id"].endswith("phone.jpg"))
    assert test.load(phone).size == (10, 30)


def test_audio_folder_skips_and_counts_unreadable_and_empty_clips(audio_folder_dir, tmp_path, capsys):
    import soundfile

    root = tmp_path / "audio"
    shutil.copytree(audio_folder_dir, root)
    (root / "train" / "yes" / "noise.wav").write_bytes(b"RIFF but not really a wave file")
    soundfile.write(root / "train" / "no" / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    data = load_logged("audio-folder", root)
    assert "skipped 2 of 6 train audio file(s) that cannot be read or hold no samples" in capsys.readouterr().err
    assert data.splits["train"].items == load_task("audio-folder", audio_folder_dir).splits["train"].items


def test_max_items_spreads_and_changes_the_fingerprint(iemocap_dir):
    full = load_task("iemocap", iemocap_dir)
    small = load_task("iemocap", iemocap_dir, max_items=10)
    assert len(small.splits["all"]) == 10
    assert {item["group"] for item in small.splits["all"].items} == {f"Session{s}" for s in range(1, 6)}
    assert small.fingerprint != full.fingerprint == load_task("iemocap", iemocap_dir).fingerprint


def test_reader_errors(tmp_path, agnews_dir, text_csv_dir):
    with pytest.raises(DaamkitError, match="unknown task"):
        load_task("mnist", tmp_path)
    bad = tmp_path / "agnews"
    shutil.copytree(agnews_dir, bad)
    (bad / "test.csv").write_text('"5","t","d"\n')
    with pytest.raises(DaamkitError, match=r"test.csv:1: unknown label '5'"):
        load_task("agnews", bad)
    csv_dir = tmp_path / "csv"
    shutil.copytree(text_csv_dir, csv_dir)
    (csv_dir / "test.csv").write_text("text,label\n")
    with pytest.raises(DaamkitError, match="split 'test' of text-csv data .* is empty"):
        load_task("text-csv", csv_dir)
    (csv_dir / "test.csv").write_text("text,label\nhello,weather\n")
    with pytest.raises(DaamkitError, match="unknown label 'weather'"):
        load_task("text-csv", csv_dir)


# ------------------------------------------------------------------ extraction and the cache


def test_extract_iemocap_with_wavlm(tmp_path, iemocap_dir, tiny_wavlm):
    summary = extract_features("iemocap", iemocap_dir, str(tiny_wavlm), tmp_path / "feats", batch_size=4, device="cpu")
    cache = FeatureCache.open(tmp_path / "feats")
    manifest = cache.manifest
    assert manifest["grouping"] == "session" and manifest["splits"] == {"all": {"num_items": 28, "complete": True}}
    assert manifest["layers"] == [1, 2] and manifest["num_layers"] == 2 and manifest["hidden_size"] == 32
    assert manifest["dtype"] == "float16" and manifest["encoder"] == str(tiny_wavlm.resolve())
    split = cache.split("all")
    assert split.features.shape == (28, 2, 32) and split.features.dtype == np.float16
    assert isinstance(split.features, np.memmap) and split.labels.dtype == np.int64
    assert split.items[0] == {"id": "Ses01F_impro01_F000#0", "group": "Session1", "utterance": "Ses01F_impro01_F000"}
    data = load_task("iemocap", iemocap_dir)
    encoder = _encoder(tiny_wavlm)
    last = len(split) - 1
    expected = encoder.encode([data.splits["all"].load(last)])[0].numpy()
    np.testing.assert_allclose(split.features[last].astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    assert summary["splits"]["all"]["computed"] == 28


def test_extract_cifar_with_beit_and_reuse_without_model(tmp_path, cifar100_dir, tiny_beit, monkeypatch):
    out = tmp_path / "feats"
    first = extract_features("cifar100", cifar100_dir, str(tiny_beit), out, batch_size=5, device="cpu")
    assert first["splits"]["train"] == {"num_items": 12, "computed": 12, "reused": False,
                                        "seconds": first["splits"]["train"]["seconds"]}
    cache = FeatureCache.open(out)
    assert cache.split("train").features.shape == (12, 2, 32) and cache.split("test").labels.shape == (6,)

    def boom(*args, **kwargs):
        raise AssertionError("a valid cache must not load or run the encoder")

    monkeypatch.setattr(FrozenEncoder, "forward", boom)
    monkeypatch.setattr(FrozenEncoder, "load", boom)
    second = extract_features("cifar100", cifar100_dir, str(tiny_beit), out, batch_size=5, device="cpu")
    assert all(s["reused"] and s["computed"] == 0 for s in second["splits"].values())


def test_resume_after_interruption(tmp_path, agnews_dir, tiny_llama, monkeypatch):
    clean = extract_features("agnews", agnews_dir, str(tiny_llama), tmp_path / "clean", batch_size=3, device="cpu")
    assert clean["splits"]["train"]["computed"] == 8
    original = FrozenEncoder.forward
    calls = {"n": 0}

    def interrupted(self, prepared):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, prepared)

    monkeypatch.setattr(FrozenEncoder, "forward", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        extract_features("agnews", agnews_dir, str(tiny_llama), out, batch_size=3, device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"] == {"num_items": 8, "complete": False}
    committed = [json.loads(line)["row"] for line in (out / "train" / "items.0.partial.jsonl").read_text().splitlines()]
    assert committed == list(range(6))
    with pytest.raises(DaamkitError, match="incomplete"):
        FeatureCache.open(out).split("train")

    counted = {"rows": 0}

    def counting(self, prepared):
        counted["rows"] += prepared.size
        return original(self, prepared)

    monkeypatch.setattr(FrozenEncoder, "forward", counting)
    resumed = extract_features("agnews", agnews_dir, str(tiny_llama), out, batch_size=3, device="cpu")
    assert resumed["splits"]["train"]["computed"] == 2 and counted["rows"] == 2 + 4  # rest of train + all of test
    for name in ("train", "test"):
        a, b = FeatureCache.open(out).split(name), FeatureCache.open(tmp_path / "clean").split(name)
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.items == b.items
    assert not list((out / "train").glob("*.partial.jsonl"))


def test_cli_extract_and_refusing_mixed_encoders(tmp_path, agnews_dir, tiny_llama, tiny_bert):
    out = tmp_path / "feats"
    args = ["classify", "extract", "--task", "agnews", "--data", str(agnews_dir), "--out", str(out),
            "--device", "cpu", "--batch-size", "4"]
    result = runner.invoke(app, [*args, "--encoder", str(tiny_bert), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [1, 2, 3] and summary["splits"]["test"]["num_items"] == 4
    cache = FeatureCache.open(out)
    manifest, train = cache.manifest, cache.split("train")
    texts = load_task("agnews", agnews_dir).splits["train"]
    row_text = [texts.load(int(item["id"].split("/")[1])) for item in train.items]
    assert [len(t) for t in row_text] == sorted(map(len, row_text), reverse=True)  # longest first
    assert list(train.labels) == [texts.labels[int(item["id"].split("/")[1])] for item in train.items]
    assert manifest["classes"] == ["World", "Sports", "Business", "Sci/Tech"] and manifest["task"] == "agnews"
    result = runner.invoke(app, [*args, "--encoder", str(tiny_llama)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: feature cache")
    assert "encoder is" in result.stderr
    result = runner.invoke(app, [*args, "--encoder", str(tiny_bert), "--include-embeddings"])
    assert result.exit_code == 2 and "layers is [1, 2, 3] in the cache but [0, 1, 2, 3] now" in result.stderr
    result = runner.invoke(app, [*args, "--encoder", str(tiny_bert)])
    assert result.exit_code == 0 and "train: 8 items x 3 layers x 24 (reused)" in result.stdout
    config = tmp_path / "extract.toml"
    elsewhere = tmp_path / "elsewhere"
    config.write_text(f'task = "agnews"\ndata = "{agnews_dir}"\nbatch-size = 2\nout = "{elsewhere}"\n')
    result = runner.invoke(app, ["classify", "extract", "--config", str(config), "--encoder", str(tiny_bert),
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "test: 4 items x 3 layers x 24 (reused)" in result.stdout
    assert not elsewhere.exists()  # --out on the command line beats the file


@pytest.mark.parametrize("task, fixture, model", [("audio-folder", "audio_folder_dir", "tiny_wavlm"),
                                                  ("image-folder", "image_folder_dir", "tiny_beit")])
def test_extract_generic_folders(request, tmp_path, task, fixture, model, monkeypatch):
    data_dir = request.getfixturevalue(fixture)
    calls = []  # an encoder on the CPU keeps freed memory for reuse, as `vqvae train` does
    monkeypatch.setattr("daamkit.classify.extract.reuse_freed_memory", lambda: calls.append(True))
    summary = extract_features(task, data_dir, str(request.getfixturevalue(model)), tmp_path / "f", device="cpu")
    cache = FeatureCache.open(tmp_path / "f")
    assert cache.split("test").items[0]["id"].startswith("test/") and summary["splits"]["test"]["computed"] == 2
    assert cache.split("train").features.shape[1:] == (2, 32) and cache.manifest["grouping"] is None
    assert calls == [True]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-data", "data folder .* does not exist"),
        ("missing-file", "train.csv is missing"),
        ("unknown-task", "unknown task 'mnist'"),
        ("modality", "task agnews is text data but .* is a image encoder"),
        ("no-encoder", "neither a local folder nor in the Hugging Face cache"),
        ("missing-option", "--encoder is required"),
    ],
)
def test_cli_extract_errors_are_one_line(tmp_path, agnews_dir, tiny_bert, tiny_beit, case, message):
    import re

    empty = tmp_path / "empty"
    empty.mkdir()
    options = {"--task": "agnews", "--data": str(agnews_dir), "--encoder": str(tiny_bert), "--out": str(tmp_path / "o")}
    if case == "missing-data":
        options["--data"] = str(tmp_path / "nowhere")
    elif case == "missing-file":
        options["--data"] = str(empty)
    elif case == "unknown-task":
        options["--task"] = "mnist"
    elif case == "modality":
        options["--encoder"] = str(tiny_beit)
    elif case == "no-encoder":
        options["--encoder"] = str(tmp_path / "no-model")
    else:
        del options["--encoder"]
    result = runner.invoke(app, ["classify", "extract", "--device", "cpu", *[x for kv in options.items() for x in kv]])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.output


def test_audio_items_too_short_for_the_encoder(tiny_wavlm):
    with pytest.raises(DaamkitError, match="too short"):
        _encoder(tiny_wavlm).encode([np.zeros(40, dtype=np.float32)])


def test_dataset_module_lists_every_task():
    assert set(datasets.TASK_MODALITY) == {"iemocap", "agnews", "cifar100", "text-csv", "image-folder", "audio-folder"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_fill_the_same_cache_as_one(tmp_path, agnews_dir, tiny_bert):
    """torchrun with 2 CPU processes (gloo): each encodes every other batch into the one memmap."""
    import os
    import subprocess
    import sys

    single = extract_features("agnews", agnews_dir, str(tiny_bert), tmp_path / "single", batch_size=2, device="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "daamkit.cli.main", "classify", "extract", "--task",
               "agnews", "--data", str(agnews_dir), "--encoder", str(tiny_bert), "--out", str(tmp_path / "sharded"),
               "--batch-size", "2", "--device", "cpu", "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = FeatureCache.open(tmp_path / "single"), FeatureCache.open(tmp_path / "sharded")
    assert {k: v for k, v in a.manifest.items()} == b.manifest
    for name in single["splits"]:
        np.testing.assert_array_equal(a.split(name).features, b.split(name).features)
        np.testing.assert_array_equal(a.split(name).labels, b.split(name).labels)
        assert a.split(name).items == b.split(name).items
    assert not (tmp_path / "sharded" / ".extract.lock").exists()


def test_a_second_extraction_into_a_locked_cache_is_refused(tmp_path, agnews_dir, tiny_bert):
    import os

    out = tmp_path / "cache"
    out.mkdir()
    lock = out / ".extract.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(), "since": "now"}))
    result = runner.invoke(app, ["classify", "extract", "--task", "agnews", "--data", str(agnews_dir), "--encoder",
                                 str(tiny_bert), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and f"pid {os.getpid()}" in result.stderr and "being written by another" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and lock.exists()
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": __import__("socket").gethostname(), "since": "then"}))
    extract_features("agnews", agnews_dir, str(tiny_bert), out, batch_size=4, device="cpu")  # a stale lock is taken over
    assert not lock.exists() and FeatureCache.open(out).is_complete("train")
