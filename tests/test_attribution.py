"""Sentence heat maps of a stage-3 module (:mod:`mambaxray_ctl.stages.attribution`) on the tiny world."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambaxray_ctl.backbone.layers import insert_token
from mambaxray_ctl.cli import main
from mambaxray_ctl.data.cleaning import clean_report, split_sentences
from mambaxray_ctl.data.images import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, Normalize, load_image
from mambaxray_ctl.evaluation.explain import write_explanation
from mambaxray_ctl.stages import ReportGenModule
from mambaxray_ctl.stages.attribution import SentenceMap, sentence_heat_maps, token_log_probs

REPORT = "the heart is enlarged . small left pleural effusion . no pneumothorax ."


@pytest.fixture(scope="module")
def module(world: Path) -> ReportGenModule:
    torch.manual_seed(0)
    lm = {"name": str(world / "text" / "lm"), "max_target_tokens": 40}
    return ReportGenModule(backbone={"preset": "test_arm_tiny"}, lm=lm).eval()


@pytest.fixture(scope="module")
def study(world: Path) -> tuple[torch.Tensor, str]:
    """The two views of the first study with a finding, as the module takes them, and its report."""
    annotation = json.loads((world / "annotation.json").read_text())
    entry = next(entry for entry in annotation["train"] if any(entry["labels"]))
    transform = EvalTransform(64, Normalize(IMAGENET_MEAN, IMAGENET_STD))
    images = torch.stack([transform(load_image(world / "images" / path)) for path in entry["image_path"]])
    return images, clean_report(entry["report"], "iu_xray")


def test_one_map_per_sentence_and_view_on_the_patch_grid(
    module: ReportGenModule, study: tuple[torch.Tensor, str]
) -> None:
    images, report = study
    maps = sentence_heat_maps(module, images, torch.ones(2, dtype=torch.bool), report)
    assert [m.sentence for m in maps] == split_sentences(report) and len(maps) >= 2
    grid = module.backbone.config.grid_size
    assert grid == (4, 4)  # 64 px, 16-px patches: the class token is not on the grid
    for item in maps:
        assert isinstance(item, SentenceMap) and item.maps.shape == (2, *grid)
        assert item.maps.dtype == torch.float32 and torch.isfinite(item.maps).all()
        assert (item.maps >= 0).all() and item.maps.sum() > 0
    assert not torch.equal(maps[0].maps, maps[1].maps)  # sentences get their own maps


def test_a_masked_view_gets_zero_and_the_other_its_single_view_map(
    module: ReportGenModule, study: tuple[torch.Tensor, str]
) -> None:
    images, _ = study
    masked = sentence_heat_maps(module, images, torch.tensor([True, False]), REPORT)
    alone = sentence_heat_maps(module, images[:1], torch.tensor([True]), REPORT)
    for both, single in zip(masked, alone, strict=True):
        assert torch.count_nonzero(both.maps[1]) == 0  # the LM never sees the masked view's tokens
        torch.testing.assert_close(both.maps[0], single.maps[0])
        assert both.maps[0].sum() > 0


def test_views_get_their_own_maps(module: ReportGenModule, study: tuple[torch.Tensor, str]) -> None:
    images, _ = study
    valid = torch.ones(2, dtype=torch.bool)
    different = sentence_heat_maps(module, images, valid, REPORT)
    assert all(not torch.allclose(m.maps[0], m.maps[1]) for m in different)
    same = sentence_heat_maps(module, images[[0, 0]], valid, REPORT)
    for item in same:
        torch.testing.assert_close(item.maps[0], item.maps[1])


def _reference_maps(module: ReportGenModule, images: torch.Tensor, tokens: str) -> torch.Tensor:
    """The first sentence's maps computed independently: the backbone's steps written out
    (``VisionMamba._embed`` then ``forward_tokens``), the view mean, the mapper, the sentence tokenised
    on its own (it is a prefix of the report), and the gradient at the chosen tokens."""
    backbone = module.backbone
    with torch.no_grad():
        patches = backbone.patch_embed(images)
    patches.requires_grad_(tokens == "patches")
    sequence = insert_token(patches, backbone.cls_token, patches.shape[1] // 2) + backbone.pos_embed
    features = backbone.forward_tokens(sequence, backbone.grid_size)[0]
    if tokens == "output":
        features = features.detach().requires_grad_(True)
    visual = module.mapper(features.mean(0, keepdim=True))
    ids = torch.tensor(module.llm.tokenizer("the heart is enlarged", add_special_tokens=False)["input_ids"])
    leaf = patches if tokens == "patches" else features
    (grad,) = torch.autograd.grad(token_log_probs(module.llm, visual, ids).sum(), leaf)
    scores = (grad * leaf).sum(-1).detach()
    if tokens == "output":  # the class token sits in the middle
        middle = (scores.shape[1] - 1) // 2
        scores = torch.cat([scores[:, :middle], scores[:, middle + 1 :]], 1)
    return scores.clamp_min(0).reshape(2, 4, 4)


@pytest.mark.parametrize("tokens", ["patches", "output"])
def test_the_cells_are_gradient_times_input_of_the_sentence_log_likelihood(
    module: ReportGenModule, study: tuple[torch.Tensor, str], tokens: str
) -> None:
    images, _ = study
    maps = sentence_heat_maps(module, images, torch.ones(2, dtype=torch.bool), REPORT, tokens=tokens)
    assert maps[0].sentence == "the heart is enlarged"
    torch.testing.assert_close(maps[0].maps, _reference_maps(module, images, tokens))


def test_patch_and_output_tokens_give_different_maps(
    module: ReportGenModule, study: tuple[torch.Tensor, str]
) -> None:
    images, _ = study
    valid = torch.ones(2, dtype=torch.bool)
    patches = sentence_heat_maps(module, images, valid, REPORT)
    output = sentence_heat_maps(module, images, valid, REPORT, tokens="output")
    assert [m.sentence for m in patches] == [m.sentence for m in output]
    assert all(
        a.maps.shape == b.maps.shape and not torch.allclose(a.maps, b.maps)
        for a, b in zip(patches, output, strict=True)
    )
    with pytest.raises(ValueError, match="tokens must be"):
        sentence_heat_maps(module, images, valid, REPORT, tokens="pixels")


def test_token_log_probs_match_the_training_loss(module: ReportGenModule) -> None:
    visual = torch.randn(1, module.backbone.config.num_tokens, module.llm.hidden_size)
    ids = torch.tensor(
        module.llm.tokenizer(REPORT, add_special_tokens=False)["input_ids"] + [module.llm.eos_id]
    )
    with torch.no_grad():
        loss, _ = module.llm(visual, [REPORT])
        log_probs = token_log_probs(module.llm, visual.expand(3, -1, -1), ids)
    assert log_probs.shape == (3, len(ids))
    torch.testing.assert_close(-log_probs[2].mean(), loss)


def test_works_under_no_grad_and_inference_mode_and_restores_the_mode(
    module: ReportGenModule, study: tuple[torch.Tensor, str]
) -> None:
    images, _ = study
    valid = torch.ones(2, dtype=torch.bool)
    reference = sentence_heat_maps(module, images, valid, REPORT)
    module.train()
    try:
        with torch.inference_mode():
            inference_images, inference_mask = images.clone(), valid.clone()  # inference tensors
            inside = sentence_heat_maps(module, inference_images, inference_mask, REPORT)
        with torch.no_grad():
            no_grad = sentence_heat_maps(module, images, valid, REPORT)
        assert module.training and module.backbone.training  # restored
    finally:
        module.eval()
    for a, b, c in zip(reference, inside, no_grad, strict=True):  # eval mode inside: identical maps
        torch.testing.assert_close(a.maps, b.maps)
        torch.testing.assert_close(a.maps, c.maps)
    assert all(p.grad is None for p in module.parameters())
    assert not any(p.requires_grad for p in module.llm.parameters())  # the LM stays frozen


def test_empty_report_and_bad_shapes(module: ReportGenModule, study: tuple[torch.Tensor, str]) -> None:
    images, _ = study
    assert sentence_heat_maps(module, images, torch.ones(2, dtype=torch.bool), " . ") == []
    with pytest.raises(ValueError, match="view_mask"):
        sentence_heat_maps(module, images, torch.ones(3, dtype=torch.bool), REPORT)


# generate --explain ------------------------------------------------------------------------------------
def test_overlays_show_the_map_over_the_grey_image_and_the_page_escapes_text(
    world: Path, tmp_path: Path
) -> None:
    paths = [world / "images" / "demo_00000" / name for name in ("0.png", "1.png")]
    heat = torch.zeros(2, 4, 4)
    heat[0, 0, 3] = 2.0  # top-right cell of view 0; view 1 at half the scale
    heat[1, 3, 0] = 1.0
    maps = [SentenceMap("a <b>bold</b> & sentence", heat), SentenceMap("nothing here", torch.zeros(2, 4, 4))]
    page = write_explanation(tmp_path / "out", paths, "a <b>bold</b> & sentence . nothing here .", maps)
    grey = np.asarray(Image.open(tmp_path / "out" / "view0.png"), dtype=np.int16)
    peak = np.asarray(Image.open(tmp_path / "out" / "sentence00_view0.png"), dtype=np.int16)
    assert peak.shape == (*grey.shape, 3) and grey.shape == (64, 64)
    red, green, blue = peak[8, 56]  # inside the top-right cell: red over the image
    assert red - blue > 100 and red > green
    np.testing.assert_array_equal(peak[56, 8], [grey[56, 8]] * 3)  # far from the peak: the grey image
    half = np.asarray(Image.open(tmp_path / "out" / "sentence00_view1.png"), dtype=np.int16)[56, 8]
    assert half[1] > half[0]  # view 1's peak is half the sentence's scale: green, not red
    empty = np.asarray(Image.open(tmp_path / "out" / "sentence01_view0.png"))
    assert (empty == np.asarray(Image.open(tmp_path / "out" / "view0.png"))[..., None]).all()
    text = page.read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; sentence" in text and "<b>" not in text
    assert "no positive evidence" in text


def _checkpoint(module: ReportGenModule, path: Path) -> Path:
    """A stage-3 checkpoint as Lightning writes one (the module drops its frozen LM)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_generate_explain_writes_the_report_overlays_and_page(
    module: ReportGenModule, world: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = _checkpoint(module, tmp_path / "stage3.ckpt")
    paths = [world / "images" / "demo_00001" / name for name in ("0.png", "1.png")]
    out = tmp_path / "explained"
    decoding = ["--num-beams", "1", "--min-new-tokens", "6", "--max-new-tokens", "12"]
    code = main(["generate", "--ckpt", str(ckpt), *decoding, "--explain", str(out), *map(str, paths)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = captured.out.strip()
    assert (out / "report.txt").read_text().strip() == report
    sentences = split_sentences(report)
    assert sentences, report
    expected = {f"sentence{k:02d}_view{v}.png" for k in range(len(sentences)) for v in range(2)}
    assert {p.name for p in out.glob("sentence*.png")} == expected
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert set(sources) == expected | {"view0.png", "view1.png"}
    assert all((out / source).is_file() for source in sources) and "http" not in page
    assert f"heat maps of {len(sentences)} sentence(s)" in captured.err
