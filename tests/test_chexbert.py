"""The CheXbert labeller: the official checkpoint's key names and shapes, strict loading, a hand-set
model whose labels follow from the text, and ``evaluate --labeler chexbert`` end to end.

The key names and shapes below are written out from the official code (stanfordmlgroup/CheXbert
``src/models/bert_labeler.py``: ``nn.DataParallel`` of ``bert`` = transformers' ``BertModel`` and
``linear_heads``), independently of the module under test.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertModel, BertTokenizer

from mambaxray_ctl.evaluation import evaluate
from mambaxray_ctl.metrics.chexbert import (
    BLANK,
    CHEXBERT_CONDITIONS,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    CheXbertLabeler,
    expected_shapes,
    read_checkpoint,
)
from mambaxray_ctl.metrics.clinical import load_labeler

WORDS = [
    "small",
    "left",
    "pleural",
    "effusion",
    "no",
    "heart",
    "size",
    "normal",
    "lungs",
    "are",
    "clear",
    ".",
]
EFFUSION = "effusion"


def official_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """The official ``model_state_dict``: ``module.bert.*`` (BertModel with its pooler, as transformers
    3.0.2 saved it: no position_ids buffer) and ``module.linear_heads.{0..13}``."""
    h, inter = config.hidden_size, config.intermediate_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (config.vocab_size, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{layer}"
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes |= {f"{prefix}.{name}.weight": (h, h), f"{prefix}.{name}.bias": (h,)}
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {f"{prefix}.{name}.weight": (h,), f"{prefix}.{name}.bias": (h,)}
        shapes |= {
            f"{prefix}.intermediate.dense.weight": (inter, h),
            f"{prefix}.intermediate.dense.bias": (inter,),
        }
        shapes |= {f"{prefix}.output.dense.weight": (h, inter), f"{prefix}.output.dense.bias": (h,)}
    shapes |= {"bert.pooler.dense.weight": (h, h), "bert.pooler.dense.bias": (h,)}
    for head in range(14):
        classes = 4 if head < 13 else 2
        shapes |= {f"linear_heads.{head}.weight": (classes, h), f"linear_heads.{head}.bias": (classes,)}
    return {f"module.{key}": shape for key, shape in shapes.items()}


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], legacy: bool = True) -> Path:
    """``torch.save`` as ``src/run_bert.py`` saves (legacy format: the official file is from torch 1.4)."""
    saved = {"epoch": 8, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    return path


def random_state(config: BertConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values scaled like a trained BERT's (LayerNorm gains near 1, small biases, matrices of
    unit gain), so that states differ between tokens and reports."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith("LayerNorm.weight"):
            state[key] = 1 + 0.1 * noise
        elif key.endswith("bias"):
            state[key] = 0.1 * noise
        else:
            state[key] = noise if "embeddings" in key else noise / shape[1] ** 0.5
    return state


def bert_folder(out: Path, hidden: int, layers: int, heads: int) -> Path:
    """A bert-base-uncased-like folder: a WordPiece tokenizer and the config.json of a tiny BERT."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 wide, 1 layer: the hand-set model's."""
    return bert_folder(tmp_path_factory.mktemp("bert"), hidden=2, layers=1, heads=1)


@pytest.fixture(scope="module")
def config(folder: Path) -> BertConfig:
    return BertConfig.from_pretrained(folder)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 wide, 2 layers: random weights give [CLS] states unlike the other tokens'."""
    return bert_folder(tmp_path_factory.mktemp("bert16"), hidden=16, layers=2, heads=2)


def test_key_names_and_shapes_at_bert_base_size() -> None:
    """bert-base-uncased's configuration (BertConfig's defaults), skeleton on the meta device."""
    base = BertConfig()
    assert (base.vocab_size, base.hidden_size, base.num_hidden_layers) == (30522, 768, 12)
    shapes = expected_shapes(base)
    assert {key: tuple(shape) for key, shape in shapes.items()} == official_shapes(base)
    assert len(shapes) == 199 + 28  # BertModel with pooler, 14 heads
    assert tuple(shapes["module.bert.embeddings.word_embeddings.weight"]) == (30522, 768)
    assert tuple(shapes["module.linear_heads.12.weight"]) == (4, 768)
    assert tuple(shapes["module.linear_heads.13.weight"]) == (2, 768)


@pytest.mark.parametrize("legacy", [True, False])
def test_random_checkpoint_loads_strictly_and_labels(tmp_path: Path, wide_folder: Path, legacy: bool) -> None:
    config = BertConfig.from_pretrained(wide_folder)
    state = random_state(config)
    path = save_checkpoint(tmp_path / "chexbert.pth", state, legacy)
    labeler = CheXbertLabeler(path, wide_folder, batch_size=3, device="cpu")
    for key, value in state.items():
        assert torch.equal(labeler.model.state_dict()[key.removeprefix("module.")], value), key

    reports = [
        "small left pleural effusion .",
        "",
        "no effusion .\n\n heart  size normal .",
        "lungs are clear .",
    ]
    classes = labeler.classes(reports)
    assert classes.shape == (4, 14)
    assert np.isin(classes[:, :13], (BLANK, POSITIVE, NEGATIVE, UNCERTAIN)).all()
    assert np.isin(classes[:, 13], (BLANK, POSITIVE)).all()
    assert len({tuple(row) for row in classes}) == len(reports)  # the reports get different labels

    # the reference computation: BERT's last hidden state of [CLS], head i -> observation i
    bert = BertModel(config).eval()
    bert.load_state_dict({k.removeprefix("module.bert."): v for k, v in state.items() if ".bert." in k})
    with torch.no_grad():
        for row, report in zip(classes, reports, strict=True):
            ids = torch.tensor([labeler.tokenizer(" ".join(report.split()))["input_ids"]])
            cls = bert(input_ids=ids).last_hidden_state[:, 0]
            for head in range(14):
                logits = F.linear(
                    cls,
                    state[f"module.linear_heads.{head}.weight"],
                    state[f"module.linear_heads.{head}.bias"],
                )
                assert row[head] == logits.argmax().item()
    one_by_one = CheXbertLabeler(path, wide_folder, batch_size=1, device="cpu").classes(reports)
    assert (one_by_one == classes).all()  # padding is masked out
    assert labeler(reports) == (classes == POSITIVE).astype(int).tolist()


def test_extra_position_ids_buffer_is_accepted_only_as_positions(tmp_path: Path, config: BertConfig) -> None:
    state = random_state(config)
    state["module.bert.embeddings.position_ids"] = torch.arange(32).expand(1, -1)
    assert "bert.embeddings.position_ids" not in read_checkpoint(
        save_checkpoint(tmp_path / "a.pth", state), config
    )
    state["module.bert.embeddings.position_ids"] = torch.zeros(1, 32, dtype=torch.long)
    with pytest.raises(ValueError, match=r"b\.pth: module\.bert\.embeddings\.position_ids does not hold"):
        read_checkpoint(save_checkpoint(tmp_path / "b.pth", state), config)


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: _without(s, "module.linear_heads.13.bias"),
            r"missing keys: module\.linear_heads\.13\.bias",
        ),
        (
            lambda s: _without(s, "module.bert.pooler.dense.weight"),
            r"missing keys: module\.bert\.pooler\.dense\.weight",
        ),
        (
            lambda s: {**s, "module.linear_heads.14.weight": torch.zeros(4, 2)},
            r"unexpected keys: module\.linear_heads\.14\.weight",
        ),
        (
            lambda s: {**s, "module.linear_heads.13.weight": torch.zeros(4, 2)},
            r"wrong shapes: module\.linear_heads\.13\.weight \(4, 2\) \(expected \(2, 2\)\)",
        ),
        (  # a state dict saved without DataParallel
            lambda s: {k.removeprefix("module."): v for k, v in s.items()},
            r"missing keys: module\.bert\.embeddings\.LayerNorm\.bias.*unexpected keys: bert\.",
        ),
    ],
)
def test_mismatched_state_dict_names_file_and_keys(
    tmp_path: Path, config: BertConfig, change, message: str
) -> None:
    path = save_checkpoint(tmp_path / "broken.pth", change(random_state(config)))
    with pytest.raises(ValueError, match=rf"broken\.pth: not a CheXbert state dict .*{message}"):
        read_checkpoint(path, config)


def test_files_that_are_no_checkpoint(tmp_path: Path, folder: Path, config: BertConfig) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=r"garbage\.pth: not a checkpoint torch\.load\(weights_only=True\) can read"
    ):
        read_checkpoint(garbage, config)
    bare = tmp_path / "bare.pth"
    torch.save(random_state(config), bare)  # the state dict alone
    with pytest.raises(ValueError, match=r"bare\.pth: expected a dict with a 'model_state_dict'"):
        read_checkpoint(bare, config)
    with pytest.raises(ValueError, match=r"CheXbert checkpoint .*missing\.pth: no such file"):
        CheXbertLabeler(tmp_path / "missing.pth", folder)
    with pytest.raises(ValueError, match=r"BERT tokenizer folder .*: no config\.json"):
        CheXbertLabeler(garbage, tmp_path)
    with pytest.raises(ValueError, match="uncertain must be one of"):
        CheXbertLabeler(garbage, folder, uncertain="maybe")  # type: ignore[arg-type]


# The hand-set model. Word embeddings are 0 but for "effusion" ([1, 0]), positions and types 0, so the
# embedding LayerNorm gives [1, -1] for "effusion" and [0, 0] for every other token; attention is uniform
# (query = key = 0) and copies values (value = output = identity), so [CLS]'s state after its LayerNorm
# is [1, -1] when the report has "effusion" and [0, 0] otherwise; the feed-forward block adds 0.
# Heads: weights 0 and a bias that makes a constant class win, except two that follow "effusion".
CONSTANT = {
    "cardiomegaly": POSITIVE,
    "support_devices": POSITIVE,
    "lung_lesion": UNCERTAIN,
    "fracture": NEGATIVE,
}
FOLLOWS_EFFUSION = {"pleural_effusion": (BLANK, POSITIVE), "edema": (NEGATIVE, UNCERTAIN)}  # (without, with)


def hand_set_state(config: BertConfig, folder: Path) -> dict[str, torch.Tensor]:
    state = {key: torch.zeros(shape) for key, shape in official_shapes(config).items()}
    for key in state:
        if "LayerNorm.weight" in key:
            state[key] = torch.ones(2)
    layer = "module.bert.encoder.layer.0.attention"
    state[f"{layer}.self.value.weight"] = torch.eye(2)
    state[f"{layer}.output.dense.weight"] = torch.eye(2)
    effusion_id = BertTokenizer.from_pretrained(folder).convert_tokens_to_ids(EFFUSION)
    state["module.bert.embeddings.word_embeddings.weight"][effusion_id] = torch.tensor([1.0, 0.0])
    for head, name in enumerate(CHEXBERT_CONDITIONS):
        bias = torch.zeros(state[f"module.linear_heads.{head}.bias"].shape)
        if name in FOLLOWS_EFFUSION:
            without, with_ = FOLLOWS_EFFUSION[name]
            bias[without] = 1.0
            state[f"module.linear_heads.{head}.weight"][with_] = torch.tensor([5.0, -5.0])  # 10 with effusion
        else:
            bias[CONSTANT.get(name, BLANK)] = 1.0
        state[f"module.linear_heads.{head}.bias"] = bias
    return state


def expected_classes(report: str) -> list[int]:
    present = EFFUSION in report.split()
    return [
        FOLLOWS_EFFUSION[name][present] if name in FOLLOWS_EFFUSION else CONSTANT.get(name, BLANK)
        for name in CHEXBERT_CONDITIONS
    ]


@pytest.fixture
def hand_set(tmp_path: Path, folder: Path, config: BertConfig) -> Path:
    return save_checkpoint(tmp_path / "chexbert.pth", hand_set_state(config, folder))


def test_hand_set_model_gives_the_known_labels(hand_set: Path, folder: Path) -> None:
    reports = ["small left pleural effusion .", "heart size normal .", "", "no effusion ."]
    negative = CheXbertLabeler(hand_set, folder, device="cpu")
    assert negative.classes(reports).tolist() == [expected_classes(report) for report in reports]
    positive_names = {"cardiomegaly", "support_devices"}
    assert negative(reports)[1] == [int(name in positive_names) for name in CHEXBERT_CONDITIONS]
    assert negative(reports)[0] == [
        int(name in positive_names | {"pleural_effusion"}) for name in CHEXBERT_CONDITIONS
    ]
    positive = load_labeler("chexbert", weights=hand_set, tokenizer=folder, uncertain="positive")
    uncertain_too = positive_names | {"lung_lesion", "pleural_effusion", "edema"}
    assert positive(reports)[0] == [int(name in uncertain_too) for name in CHEXBERT_CONDITIONS]
    assert positive(reports)[1] == [
        int(name in positive_names | {"lung_lesion"}) for name in CHEXBERT_CONDITIONS
    ]


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    return evaluate.run(parser.parse_args(list(argv)))


# (generated, reference) with and without "effusion": pleural effusion has tp 1, fp 1, fn 1.
PAIRS = [
    ("small left pleural effusion .", "left pleural effusion ."),
    ("left pleural effusion .", "lungs are clear ."),
    ("heart size normal .", "small effusion ."),
    ("lungs are clear .", "heart size normal ."),
]


@pytest.mark.parametrize(
    ("uncertain", "micro", "macro", "micro5", "macro5"),
    [
        # positives: cardiomegaly and support devices (tp 4 each), pleural effusion (tp 1, fp 1, fn 1)
        ("negative", 9 / 10, 2.5 / 14, 5 / 6, 1.5 / 5),
        # and uncertain counted: lung lesion (tp 4), edema (tp 1, fp 1, fn 1)
        ("positive", 14 / 16, 4 / 14, 6 / 8, 2 / 5),
    ],
)
def test_evaluate_command_end_to_end(
    tmp_path: Path,
    hand_set: Path,
    folder: Path,
    capsys: pytest.CaptureFixture,
    uncertain: str,
    micro: float,
    macro: float,
    micro5: float,
    macro5: float,
) -> None:
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": str(i), "generated": gen, "reference": ref} for i, (gen, ref) in enumerate(PAIRS)]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    argv = [str(predictions), "--dataset", "chexpert_plus", "--meteor", "off", "--labeler", "chexbert"]
    argv += ["--labeler-weights", str(hand_set), "--labeler-tokenizer", str(folder)]
    assert run_command(*argv, "--labeler-uncertain", uncertain) == 0

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for kind in ("precision", "recall", "F1"):  # tp, fp and fn are equal here, so P = R = F1
        assert metrics[f"CE_{kind}_micro"] == pytest.approx(micro)
        assert metrics[f"CE_{kind}_macro"] == pytest.approx(macro)
        assert metrics[f"CE5_{kind}_micro"] == pytest.approx(micro5)
        assert metrics[f"CE5_{kind}_macro"] == pytest.approx(macro5)
    assert metrics["CE_F1/pleural_effusion"] == pytest.approx(0.5)
    assert metrics["clinical_subsets"] == {
        "5": ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]
    }
    assert metrics["labeler"] == "CheXbertLabeler"
    assert metrics["labeler_settings"] == {
        "weights": str(hand_set),
        "tokenizer": str(folder),
        "uncertain": uncertain,
    }
    out = capsys.readouterr().out
    assert f"clinical efficacy (CheXbertLabeler, uncertain counted as {uncertain})" in out
    assert re.search(rf"\n14 findings, micro +{micro:.3f} +{micro:.3f} +{micro:.3f}\n", out)
    assert re.search(rf"\n5 findings, macro +{macro5:.3f} +{macro5:.3f} +{macro5:.3f}\n", out)


def test_evaluate_command_errors(tmp_path: Path, hand_set: Path, capsys: pytest.CaptureFixture) -> None:
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        json.dumps({"id": "1", "generated": "a .", "reference": "b ."}) + "\n", encoding="utf-8"
    )
    base = [str(predictions), "--dataset", "chexpert_plus", "--meteor", "off"]
    assert run_command(*base, "--labeler", "chexbert", "--labeler-weights", str(hand_set)) == 1
    assert "--labeler chexbert needs --labeler-weights FILE" in capsys.readouterr().err
    assert run_command(*base, "--labeler-weights", str(hand_set)) == 1  # no labeller for chexpert_plus
    assert "--labeler-weights configure a labeller named by --labeler, and none is" in capsys.readouterr().err
    assert run_command(*base, "--labeler", "demo", "--labeler-weights", str(hand_set)) == 1
    assert (
        "cannot be built with weights: got an unexpected keyword argument 'weights'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "metrics.json").exists()
