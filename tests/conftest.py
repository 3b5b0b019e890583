"""Shared test set-up: offline hub, two CPU threads, GPU tests skipped without a GPU, and the tiny
synthetic world with its tiny text models (session fixture ``world``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic world (30 studies, 64 px) with a tiny causal LM and text encoder in ``text/``."""
    from mambaxray_ctl.data.cleaning import clean_report
    from mambaxray_ctl.demo.text_models import build_text_encoder, train_causal_lm
    from mambaxray_ctl.demo.world import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, n=30, seed=0, size=64, workers=1)
    annotation = json.loads((root / "annotation.json").read_text())
    reports = [clean_report(entry["report"], "iu_xray") for entry in annotation["train"]]
    train_causal_lm(reports, root / "text" / "lm", hidden_size=32, num_layers=1, steps=5, progress=False)
    build_text_encoder(reports, root / "text" / "text_encoder", hidden_size=32, num_layers=1)
    return root
