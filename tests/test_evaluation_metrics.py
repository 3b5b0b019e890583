"""Language metrics: golden numbers, parity with direct pycocoevalcap calls, DDP gathering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mambaxray_ctl.demo.findings import LABEL_NAMES
from mambaxray_ctl.demo.labeller import DemoWorldLabeler
from mambaxray_ctl.metrics.clinical import ClinicalEfficacy, clinical_scores
from mambaxray_ctl.metrics.report import (
    ReportMetrics,
    decode_texts,
    encode_texts,
    score_reports,
    sentence_bleu4,
    truncate_references,
)

FIXTURE = Path(__file__).parent / "fixtures" / "evaluation" / "golden_pairs.json"
# pycocoevalcap 1.2 on golden_pairs.json, computed once; a change here means the scorers changed.
GOLDEN = {
    "BLEU_1": 0.5973017161909844,
    "BLEU_2": 0.5204150552212813,
    "BLEU_3": 0.4597573531460868,
    "BLEU_4": 0.4064198934419212,
    "ROUGE_L": 0.6360641863260774,
    "CIDEr": 3.351624415791027,
}
GOLDEN_METEOR = 0.3318446728312968


def load_pairs() -> list[tuple[str, str, str]]:
    return [(row["id"], row["generated"], row["reference"]) for row in json.loads(FIXTURE.read_text())]


def direct_scores(pairs: list[tuple[str, str, str]]) -> dict[str, float]:
    """pycocoevalcap called by hand, studies in sorted id order as score_reports does."""
    gts = {study: [ref] for study, _, ref in sorted(pairs)}
    res = {study: [hyp] for study, hyp, _ in sorted(pairs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU_{n}": value for n, value in enumerate(bleu, start=1)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def update(metric: ReportMetrics, pairs: list[tuple[str, str, str]]) -> None:
    ids, hyps, refs = zip(*pairs, strict=True)
    metric.update(list(ids), list(hyps), list(refs))


def test_report_metrics_equal_direct_pycocoevalcap_and_golden_numbers(capsys: pytest.CaptureFixture) -> None:
    pairs = load_pairs()
    metric = ReportMetrics(meteor=False)
    shuffled = pairs[7:] + pairs[:7]
    update(metric, shuffled[:5])
    update(metric, shuffled[5:])
    scores = metric.compute()
    assert scores == direct_scores(pairs)
    assert scores == pytest.approx(GOLDEN, rel=1e-12)
    assert all(type(value) is float for value in scores.values())
    assert capsys.readouterr().out == ""  # Bleu's verbose printing is off
    assert metric.corpus() == shuffled
    assert (metric.num_duplicates, metric.num_conflicts) == (0, 0)


@pytest.mark.slow  # the JVM and METEOR's paraphrase table take 6-20 s to load
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_with_java() -> None:
    pairs = load_pairs()
    scores = score_reports({s: h for s, h, _ in pairs}, {s: r for s, _, r in pairs}, meteor=True)
    assert scores["METEOR"] == pytest.approx(GOLDEN_METEOR, rel=1e-9)
    assert scores["BLEU_4"] == GOLDEN["BLEU_4"]


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_failure_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "METEOR_JAR", "missing-meteor.jar")
    with pytest.raises(RuntimeError, match=r"METEOR .* failed: .*missing-meteor\.jar"):
        score_reports({"a": "x ."}, {"a": "y ."}, meteor=True)


def test_meteor_off_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    pairs = load_pairs()[:3]
    hyps, refs = {s: h for s, h, _ in pairs}, {s: r for s, _, r in pairs}
    assert "METEOR" not in score_reports(hyps, refs, meteor="auto")
    with pytest.raises(RuntimeError, match="java"):
        score_reports(hyps, refs, meteor=True)
    with pytest.raises(RuntimeError, match="java"):
        ReportMetrics(meteor=True)


def test_score_reports_rejects_bad_corpora() -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        score_reports({}, {})
    with pytest.raises(ValueError, match="same study ids"):
        score_reports({"a": "x ."}, {"b": "x ."}, meteor=False)
    with pytest.raises(TypeError, match="study 'a'"):
        score_reports({"a": None}, {"a": "x ."}, meteor=False)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="meteor"):
        score_reports({"a": "x ."}, {"a": "x ."}, meteor="yes")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="empty"):
        ReportMetrics(meteor=False).compute()


def test_duplicates_keep_first_and_count_conflicts() -> None:
    pairs = load_pairs()[:4]
    metric = ReportMetrics(meteor=False)
    update(metric, pairs)
    update(metric, [pairs[0]])  # sampler padding: same study, same text
    assert metric.compute() == direct_scores(pairs)
    assert (metric.num_duplicates, metric.num_conflicts) == (1, 0)

    metric.reset()
    update(metric, pairs)
    update(metric, [(pairs[1][0], "something else .", pairs[1][2])])
    assert metric.compute() == direct_scores(pairs)
    assert (metric.num_duplicates, metric.num_conflicts) == (1, 1)
    assert metric.corpus() == pairs


def test_update_checks_lengths_and_types() -> None:
    metric = ReportMetrics(meteor=False)
    with pytest.raises(ValueError, match="2 ids, 1 hypotheses"):
        metric.update(["a", "b"], ["x ."], ["y .", "z ."])
    with pytest.raises(TypeError, match=r"ids\[0\] is int"):
        metric.update([1], ["x ."], ["y ."])  # type: ignore[list-item]


def test_text_state_round_trip() -> None:
    texts = ["", "the heart . ", "épanchement\npleural", "a|||b", "x" * 1000]
    encoded = encode_texts(texts)
    assert encoded.dtype == torch.uint8
    assert decode_texts([encoded[:0], encoded]) == texts
    assert decode_texts(torch.cat([encode_texts(["a"]), encode_texts(["b", ""])])) == ["a", "b", ""]
    assert decode_texts([]) == []


def test_sentence_bleu4() -> None:
    text = "the heart is normal . the lungs are clear ."
    assert sentence_bleu4(text, text) == pytest.approx(1.0, abs=1e-8)
    assert sentence_bleu4("no pneumothorax .", text) < 1e-6
    hyp, ref = load_pairs()[2][1:]
    assert sentence_bleu4(hyp, ref) == Bleu(4).compute_score({0: [ref]}, {0: [hyp]}, verbose=0)[0][3]


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"])
    tokenizer.train_from_iterator([r for _, _, r in load_pairs()], trainer=trainer)
    # a BOS post-processor: truncation must not count it, decoding must not show it
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]")


def test_truncate_references() -> None:
    tokenizer = make_tokenizer()
    references = {"a": "the heart size is normal . the lungs are clear .", "b": "no pneumothorax ."}
    assert truncate_references(references, tokenizer, 100) == references
    assert truncate_references(references, tokenizer, 5) == {
        "a": "the heart size is normal",
        "b": "no pneumothorax .",
    }
    with pytest.raises(ValueError, match="max_length"):
        truncate_references(references, tokenizer, 0)


# ------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pairs = load_pairs()
        half = len(pairs) // 2
        # DistributedSampler-style split: the last rank is padded with a repeat of the first sample
        mine = pairs[:half] if rank == 0 else [*pairs[half:], pairs[0]]
        metric = ReportMetrics(meteor=False)
        update(metric, mine[:3])
        update(metric, mine[3:])
        lonely = ReportMetrics(meteor=False)  # a rank without any sample must not break the gather
        if rank == 0:
            update(lonely, pairs)
        labeler = DemoWorldLabeler()
        clinical = ClinicalEfficacy(labeler.label_names)
        ids, hyps, refs = zip(*mine, strict=True)
        clinical.update(list(ids), labeler(hyps), torch.tensor(labeler(refs)))
        result = {
            "scores": metric.compute(),
            "corpus": metric.corpus(),
            "duplicates": [metric.num_duplicates, metric.num_conflicts],
            "lonely": lonely.compute(),
            "clinical": clinical.compute(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_gather_matches_single_process(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    pairs = load_pairs()
    labeler = DemoWorldLabeler()
    expected_clinical = clinical_scores(
        labeler([h for _, h, _ in pairs]), labeler([r for _, _, r in pairs]), LABEL_NAMES
    )
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["scores"] == direct_scores(pairs)
        assert result["lonely"] == direct_scores(pairs)
        assert [tuple(row) for row in result["corpus"]] == pairs
        assert result["duplicates"] == [1, 0]
        assert result["clinical"] == expected_clinical
