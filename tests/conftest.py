"""Shared session-scoped fixtures: tiny random HF encoders saved with `save_pretrained` (plus their
processors, built offline) and small datasets written in their real on-disk layouts."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ["DAAMKIT_OFFLINE"] = "1"  # tests never download (LPIPS trunks, Inception weights)

AGNEWS_TRAIN = [
    ("3", "Wall St. Bears Claw Back", "Short-sellers, Wall Street's dwindling band, are seeing green again."),
    ("1", "Peace talks resume", 'Leaders met in Geneva on Monday, "hopeful" of a deal.'),
    ("2", "Team wins the final", "The home side won the cup after a late goal."),
    ("4", "New chip unveiled", "The company showed a faster processor for phones."),
    ("1", "Election results due", "Votes are counted across the country tonight."),
    ("2", "Star player injured", "The striker will miss the next three games."),
    ("3", "Oil prices rise", "Crude climbed as supply worries grew."),
    ("4", "Space probe launched", "The probe will study the outer planets for a decade."),
]
AGNEWS_TEST = [
    ("2", "Coach resigns", "The coach left the club after a poor season."),
    ("4", "Software update released", "The update fixes security bugs in the phone software."),
    ("1", "Summit ends", "Leaders agreed on a new trade deal."),
    ("3", "Stocks fall", "Shares dropped after weak earnings."),
]
WORDS = sorted({w.lower() for row in AGNEWS_TRAIN + AGNEWS_TEST for w in " ".join(row[1:]).split()})
SAMPLE_RATE = 16000


def _word_level_tokenizer(specials: list[str], template: str, **special_tokens):
    """A whitespace WordLevel tokenizer over WORDS wrapped as a transformers fast tokenizer (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    unk = special_tokens["unk_token"]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"], **special_tokens
    ), len(vocab)


@pytest.fixture(scope="session")
def tiny_wavlm(tmp_path_factory) -> Path:
    """WavLM with the Large layout (layer-norm conv stack, stable layer norm), 2 layers, d=32, 200x hop."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-wavlm")
    config = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 5, 4), conv_stride=(10, 5, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_buckets=32, max_bucket_distance=64,
    )
    WavLMModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_beit(tmp_path_factory) -> Path:
    """BEiT on 32x32 images (8x8 patches), 2 layers, d=32."""
    import torch
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-beit")
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BeitModel(config).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(folder)
    return folder


def _save_text_encoder(folder: Path, specials: list[str], template: str, special_tokens: dict, build) -> Path:
    """Save `build(vocab_size)` (a seeded random model) and its word-level tokenizer into `folder`."""
    import torch

    torch.manual_seed(0)
    tokenizer, vocab_size = _word_level_tokenizer(specials, template, **special_tokens)
    build(vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama (GQA, 2 layers, d=32) with a BOS-adding tokenizer that has no pad token, like Llama-2's."""
    from transformers import LlamaConfig, LlamaModel

    return _save_text_encoder(
        tmp_path_factory.mktemp("tiny-llama"), ["<unk>", "<s>", "</s>"], "<s> $A",
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        lambda vocab_size: LlamaModel(LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        )),
    )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A BERT-style bidirectional text encoder, 3 layers, d=24, with a [CLS] ... [SEP] tokenizer."""
    from transformers import BertConfig, BertModel

    return _save_text_encoder(
        tmp_path_factory.mktemp("tiny-bert"), ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
        {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        lambda vocab_size: BertModel(BertConfig(
            vocab_size=vocab_size, hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=64,
        ), add_pooling_layer=False),
    )


# ------------------------------------------------------------------ datasets in their real layouts


def _tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


# (speaker-turn suffix, emotion, seconds); "fru" is outside the 4 classes and must be dropped.
IEMOCAP_TURNS = [("F000", "neu", 0.6), ("F001", "exc", 0.8), ("M000", "ang", 0.7), ("M001", "fru", 0.5),
                 ("F002", "sad", 0.9), ("M002", "hap", 0.75)]
IEMOCAP_LONG = ("Ses01F_script01_1_F000", "neu", 11.5)  # 3 chunks: 5 s, 5 s, 1.5 s


@pytest.fixture(scope="session")
def iemocap_dir(tmp_path_factory) -> Path:
    """IEMOCAP_full_release with 5 sessions; Session2's wavs are 8 kHz to exercise resampling."""
    import soundfile

    root = tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release"
    for s in range(1, 6):
        session = root / f"Session{s}"
        emo_dir = session / "dialog" / "EmoEvaluation"
        emo_dir.mkdir(parents=True)
        rate = 8000 if s == 2 else SAMPLE_RATE
        dialogs: dict[str, list[tuple[str, str, float]]] = {
            f"Ses0{s}F_impro01": [(f"Ses0{s}F_impro01_{turn}", emo, sec) for turn, emo, sec in IEMOCAP_TURNS]
        }
        if s == 1:
            dialogs["Ses01F_script01_1"] = [IEMOCAP_LONG]
        for dialog, turns in dialogs.items():
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for k, (utt, emo, seconds) in enumerate(turns):
                wav_dir = session / "sentences" / "wav" / dialog
                wav_dir.mkdir(parents=True, exist_ok=True)
                soundfile.write(wav_dir / f"{utt}.wav", _tone(seconds, rate, seed=s * 10 + k), rate, subtype="PCM_16")
                lines += [f"[{k * 2.0 + 1.0:.4f} - {k * 2.0 + 1.0 + seconds:.4f}]\t{utt}\t{emo}\t[2.5000, 3.0000, 2.0000]",
                          "C-E2:\tNeutral;\t()", ""]
            (emo_dir / f"{dialog}.txt").write_text("\n".join(lines))
        (emo_dir / f"._Ses0{s}F_impro01.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02")  # macOS resource fork
    return root


def _write_csv_splits(root: Path, header: list[str] | None, convert, **writer_options) -> Path:
    """train.csv / test.csv from AGNEWS_TRAIN / AGNEWS_TEST, each row passed through `convert(index, row)`."""
    for name, rows in (("train", AGNEWS_TRAIN), ("test", AGNEWS_TEST)):
        with open(root / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle, **writer_options)
            if header:
                writer.writerow(header)
            writer.writerows(convert(i, row) for i, row in enumerate(rows))
    return root


@pytest.fixture(scope="session")
def agnews_dir(tmp_path_factory) -> Path:
    """AG News train.csv / test.csv: no header, every field quoted, class 1-4."""
    return _write_csv_splits(tmp_path_factory.mktemp("agnews"), None, lambda i, row: row, quoting=csv.QUOTE_ALL)


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    """cifar-100-python/{train,test,meta} pickles with bytes keys, 12 train and 6 test images."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    fine_names = [f"class_{i:02d}".encode() for i in range(100)]
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20}, handle, protocol=2)
    for name, count in (("train", 12), ("test", 6)):
        labels = [int(x) for x in rng.integers(0, 100, size=count)]
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [x // 5 for x in labels],
            b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


@pytest.fixture(scope="session")
def text_csv_dir(tmp_path_factory) -> Path:
    """The generic text-csv layout: header row with text,label (plus an extra column)."""
    names = {"1": "world", "2": "sports", "3": "business", "4": "tech"}
    return _write_csv_splits(
        tmp_path_factory.mktemp("text-csv"), ["id", "text", "label"],
        lambda i, row: (i, f"{row[1]} {row[2]}", names[row[0]]),
    )


@pytest.fixture(scope="session")
def image_folder_dir(tmp_path_factory) -> Path:
    """DIR/{train,test}/<class>/*.png with images of different sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("image-folder")
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                size = (24 + 8 * i, 40)
                Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def audio_folder_dir(tmp_path_factory) -> Path:
    """DIR/{train,test}/<class>/*.wav clips of different lengths, one at 22.05 kHz."""
    import soundfile

    root = tmp_path_factory.mktemp("audio-folder")
    for split, per_class in (("train", 2), ("test", 1)):
        for c, cls in enumerate(("yes", "no")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                rate = 22050 if (split, cls, i) == ("train", "no", 1) else SAMPLE_RATE
                soundfile.write(root / split / cls / f"{i}.wav", _tone(0.3 + 0.2 * i, rate, seed=c + i), rate)
    return root
