"""The demo's local text models: tokenizers, the small Qwen2 LM, the small BERT and the tool command."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from mambaxray_ctl.demo import text_models as demo_models
from mambaxray_ctl.demo.text_models import build_text_encoder, train_causal_lm, train_tokenizer

REPORTS = [
    "the lungs are clear . no pneumothorax .",
    "the cardiac silhouette is enlarged . small left pleural effusion .",
    "there is focal consolidation in the right lower lobe . picc tip 2 cm above the cavoatrial junction .",
    "no acute bony abnormality . t-spine : stable .",
]
TINY_LM = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 32}


def test_lm_tokenizer_round_trips_and_has_its_special_tokens() -> None:
    tokenizer = train_tokenizer(REPORTS, vocab_size=1000)
    assert len(tokenizer) < 1000  # a tiny corpus stops short of the requested size
    for text in [*REPORTS, "Human: <Img></Img> Generate a report. \nAssistant: Ünïcode 2024"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert (
        tokenizer("the lungs")["input_ids"] == tokenizer("the lungs", add_special_tokens=False)["input_ids"]
    )
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_encoder_tokenizer_wraps_with_cls_and_sep() -> None:
    tokenizer = train_tokenizer(REPORTS, vocab_size=500, kind="encoder")
    ids = tokenizer("the lungs are clear .")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.pad_token == "[PAD]"


def test_train_causal_lm_learns_and_saves_a_loadable_model(tmp_path: Path) -> None:
    out = train_causal_lm(
        REPORTS * 4, tmp_path / "lm", steps=40, batch_size=4, lr=1e-2, progress=False, **TINY_LM
    )
    stats = json.loads((out / "training.json").read_text())
    assert stats["last_step_loss"] < 0.5 * stats["first_step_loss"]
    assert stats["corpus_perplexity"] == pytest.approx(torch.tensor(stats["corpus_loss"]).exp().item())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer) == stats["vocab_size"]
    assert model.config.eos_token_id == tokenizer.eos_token_id
    for text in REPORTS:  # the tokenizer class transformers picks for qwen2 encodes as trained
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text and max(ids) < len(tokenizer)


def test_train_causal_lm_is_deterministic(tmp_path: Path) -> None:
    options = {"steps": 3, "batch_size": 2, "progress": False, **TINY_LM}
    first = AutoModelForCausalLM.from_pretrained(train_causal_lm(REPORTS, tmp_path / "a", **options))
    second = AutoModelForCausalLM.from_pretrained(train_causal_lm(REPORTS, tmp_path / "b", **options))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_build_text_encoder_saves_a_loadable_bert(tmp_path: Path) -> None:
    out = build_text_encoder(
        REPORTS, tmp_path / "enc", hidden_size=16, num_layers=1, num_heads=2, max_length=24
    )
    model = AutoModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "bert" and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("no pneumothorax .")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_build_text_encoder_pretrains_with_masked_language_modelling(tmp_path: Path) -> None:
    options = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_length": 32, "progress": False}
    out = build_text_encoder(REPORTS * 8, tmp_path / "mlm", mlm_steps=60, batch_size=8, lr=1e-2, **options)
    stats = json.loads((out / "training.json").read_text())
    assert stats["mlm_steps"] == 60 and stats["last_step_loss"] < 0.5 * stats["first_step_loss"]
    assert AutoTokenizer.from_pretrained(out).mask_token == "[MASK]"
    assert AutoModel.from_pretrained(out).config.hidden_size == 16


def _args(annotation: Path, out: Path, steps: int = 2) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_models.configure_parser(parser)
    return parser.parse_args(
        ["--annotation", str(annotation), "--out", str(out), "--steps", str(steps), "--mlm-steps", "2"]
    )


def test_tool_builds_both_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = [{"id": str(i), "report": report.upper(), "image_path": []} for i, report in enumerate(REPORTS)]
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"world_version": 7, "train": train, "val": [], "test": []}))
    assert demo_models.run(_args(annotation, tmp_path / "text")) == 0
    build = json.loads((tmp_path / "text" / demo_models.BUILD_LOG).read_text())
    assert build == {"recipe": demo_models.RECIPE, "annotation": str(annotation), "world_version": 7}
    assert (tmp_path / "text" / "lm" / "model.safetensors").is_file()
    assert (tmp_path / "text" / "text_encoder" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "text/lm" in out and "text/text_encoder" in out and "perplexity" in out
    # every report was trained inside the stage-3 prompt, with the 37-token image slot
    stats = json.loads((tmp_path / "text" / "lm" / "training.json").read_text())
    assert stats["tokens_per_text"] > 37 + 10 and stats["image_slot_tokens"] == 37


def test_tool_reports_a_missing_annotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "annotation.json"
    assert demo_models.run(_args(missing, tmp_path / "text")) == 1
    assert str(missing) in capsys.readouterr().err


def test_chat_sequences_put_the_slot_tokens_in_the_image_slot_as_report_lm_does() -> None:
    from mambaxray_ctl.text.llm import DEFAULT_PROMPT, DEFAULT_TEMPLATE, split_template

    extra = (*demo_models.FINDING_TOKENS, demo_models.IMAGE_TOKEN)
    tokenizer = train_tokenizer([*REPORTS, DEFAULT_PROMPT], 300, extra_tokens=extra)
    before, after = split_template(DEFAULT_TEMPLATE, DEFAULT_PROMPT)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    report, slot = REPORTS[0], [demo_models.IMAGE_TOKEN, "<|cardiomegaly|>"]
    slot_ids = tokenizer.convert_tokens_to_ids(slot)
    assert tokenizer.unk_token_id not in slot_ids and len(set(slot_ids)) == 2
    (chat,), (labels,) = demo_models._encode_chat(tokenizer, [report], [slot], chat=1.0, seed=0)
    prefix = [tokenizer.bos_token_id, *ids(before), *slot_ids, *ids(after)]
    assert chat.tolist() == [*prefix, *ids(report), tokenizer.eos_token_id]
    assert labels.tolist() == [-100] * len(prefix) + [*ids(report), tokenizer.eos_token_id]  # as stage 3
    (plain,), (plain_labels,) = demo_models._encode_chat(tokenizer, [report], [slot], chat=0.0, seed=0)
    assert (
        plain.tolist()
        == plain_labels.tolist()
        == [tokenizer.bos_token_id, *ids(report), tokenizer.eos_token_id]
    )


def test_chat_batches_keep_each_report_with_its_own_image_slot() -> None:
    sequences = [torch.arange(n) for n in (5, 3, 7)]
    labels = [torch.cat([torch.full((2,), -100), s[2:]]) for s in sequences]
    generator = torch.Generator().manual_seed(0)
    batches = demo_models._batches(
        sequences, labels, max_length=4, batch_size=2, pad_id=99, generator=generator
    )
    seen = []
    for ids, mask, targets in itertools.islice(batches, 3):  # 6 rows = two shuffled passes
        for row, row_mask, row_targets in zip(ids, mask, targets, strict=True):
            length = int(row_mask.sum())
            assert row[:length].tolist() == list(range(length)) and (row[length:] == 99).all()
            assert row_targets[:2].tolist() == [-100, -100] and (row_targets[length:] == -100).all()
            assert row_targets[2:length].tolist() == list(range(2, length))
            seen.append(length)
    assert sorted(seen) == [3, 3, 5, 5, 7, 7]
    packed = demo_models._batches(sequences, None, max_length=4, batch_size=2, pad_id=99, generator=generator)
    ids, mask, targets = next(packed)  # text-only LMs pack: no padding, no mask
    assert ids.shape == (2, 4) and mask is None and torch.equal(ids, targets)


def test_image_slot_holds_one_to_three_tokens_per_positive_finding() -> None:
    report = "The heart is enlarged. No pleural effusion. There is a small left apical pneumothorax."
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        slot = demo_models.image_slot(report, 37, generator)
        assert len(slot) == 37
        findings = [token for token in slot if token != demo_models.IMAGE_TOKEN]
        assert set(findings) == {"<|cardiomegaly|>", "<|pneumothorax_left|>"}
        assert 1 <= findings.count("<|cardiomegaly|>") <= 3
    assert (
        demo_models.image_slot("No pneumothorax. Heart size is normal.", 5, generator)
        == [demo_models.IMAGE_TOKEN] * 5
    )


@pytest.mark.slow
def test_demo_lm_writes_the_findings_its_image_slot_names(tmp_path: Path) -> None:
    """The tool's LM, fed the embeddings of held-out slots, writes reports with those findings
    (macro F1 0.96 measured on 120 validation reports of the default world)."""
    from sklearn.metrics import f1_score

    from mambaxray_ctl.data.cleaning import clean_report
    from mambaxray_ctl.demo.labeller import extract_labels
    from mambaxray_ctl.demo.world import sample_study
    from mambaxray_ctl.text.llm import ReportLM

    train = [{"id": str(i), "report": sample_study(0, i)[1], "image_path": []} for i in range(1680)]
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": train, "val": [], "test": []}))
    parser = argparse.ArgumentParser()
    demo_models.configure_parser(parser)
    assert demo_models.run(parser.parse_args(["--annotation", str(annotation), "--out", str(tmp_path)])) == 0

    lm = ReportLM(str(tmp_path / "lm"), max_target_tokens=64)
    held_out = [clean_report(sample_study(0, i)[1], "iu_xray") for i in range(2000, 2120)]
    generator = torch.Generator().manual_seed(1)
    slots = [demo_models.image_slot(report, 37, generator) for report in held_out]
    visual = lm.input_embeddings(torch.tensor([lm.tokenizer.convert_tokens_to_ids(s) for s in slots]))
    decoding = {"num_beams": 3, "min_new_tokens": 8, "max_new_tokens": 72, "repetition_penalty": 1.0}
    generated = lm.generate(visual, length_penalty=1.0, **decoding)
    truth = [extract_labels(report) for report in held_out]
    predicted = [extract_labels(report) for report in generated]
    assert f1_score(truth, predicted, average="macro", zero_division=0) > 0.9


def test_demo_rebuilds_text_models_of_an_older_recipe_or_world(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mambaxray_ctl.demo.run import _text_models_current

    (tmp_path / "lm").mkdir()
    assert not _text_models_current(tmp_path, 2)  # nothing built yet
    (tmp_path / "lm" / "config.json").write_text("{}")
    assert not _text_models_current(tmp_path, 2)  # built before build.json existed
    assert "older recipe" in capsys.readouterr().err
    build = tmp_path / demo_models.BUILD_LOG
    build.write_text(json.dumps({"recipe": demo_models.RECIPE - 1, "world_version": 2}))
    assert not _text_models_current(tmp_path, 2)
    build.write_text(json.dumps({"recipe": demo_models.RECIPE, "world_version": 1}))
    assert not _text_models_current(tmp_path, 2)
    build.write_text(json.dumps({"recipe": demo_models.RECIPE, "world_version": 2}))
    assert _text_models_current(tmp_path, 2)


def _record_data_builders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the world generator (it writes an empty current world) and the text-model build by
    recorders; returns what they were asked to build, in order."""
    from mambaxray_ctl.demo import text_models, world

    calls: list[str] = []

    def generate(out: Path, **_: object) -> Path:
        calls.append("world")
        empty = {"world_version": world.WORLD_VERSION, "train": [], "val": [], "test": []}
        (out / "annotation.json").write_text(json.dumps(empty))
        return out / "annotation.json"

    monkeypatch.setattr(world, "generate_world", generate)
    monkeypatch.setattr(text_models, "build_text_models", lambda *args: calls.append("text models"))
    return calls


def test_demo_regenerates_a_world_of_an_older_version_and_its_text_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mambaxray_ctl.demo.run import prepare_demo_data
    from mambaxray_ctl.demo.world import WORLD_VERSION

    calls = _record_data_builders(monkeypatch)
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": []}))  # written before worlds had a version
    (tmp_path / "text" / "lm").mkdir(parents=True)
    (tmp_path / "text" / "lm" / "config.json").write_text("{}")
    build = {"recipe": demo_models.RECIPE, "world_version": WORLD_VERSION}
    (tmp_path / "text" / demo_models.BUILD_LOG).write_text(json.dumps(build))
    assert prepare_demo_data(tmp_path, 10, 0, {})
    assert calls == ["world", "text models"]  # text models follow the world
    assert "older version" in capsys.readouterr().err
    calls.clear()
    annotation.write_text(json.dumps({"world_version": WORLD_VERSION, "train": []}))
    assert prepare_demo_data(tmp_path, 10, 0, {}) and calls == []  # both current: nothing rebuilt


def test_demo_data_only_prepares_the_world_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mambaxray_ctl.demo import run as demo

    calls = _record_data_builders(monkeypatch)
    monkeypatch.setattr(demo, "run_pipeline", lambda *args: pytest.fail("--data-only ran the stages"))
    parser = argparse.ArgumentParser()
    demo.configure_parser(parser)
    assert demo.run(parser.parse_args(["--data", str(tmp_path), "--data-only"])) == 0
    assert calls == ["world", "text models"]
    assert "are current" in capsys.readouterr().out
