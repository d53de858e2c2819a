"""Smoke test of the demo (mod_ext.demo), offline, on a tiny text fixture."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from mod_ext import data as mdata
from mod_ext import demo

FIXTURE = Path(__file__).parent / "fixtures" / "tiny.txt"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Fail loudly if anything tries to fetch the corpus."""
    def no_network(*args, **kwargs):
        raise AssertionError("the demo smoke test must not touch the network")

    monkeypatch.setattr(mdata, "fetch_shakespeare", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setenv("MOD_EXT_CACHE", str(tmp_path / "cache"))


def test_demo_quick_on_tiny_text(tmp_path, offline):
    out = tmp_path / "run"
    demo.main(["--data", str(FIXTURE), "--quick", "--out", str(out), "--threads", "2"])
    report = json.loads((out / "report.json").read_text())

    common = ["val_loss", "train_flops", "flops_per_token", "step_time_s", "tokens_per_s"]
    for key in ("dense", "mod"):
        for field in common:
            assert math.isfinite(report[key][field]) and report[key][field] > 0, (key, field)
        curve = report[key]["curve"]
        assert len(curve) >= 2 and curve[0]["train_flops"] == 0
        for point in curve:
            assert all(math.isfinite(point[f]) for f in ("train_flops", "wall_s", "val_loss"))
        assert curve[-1]["train_flops"] == pytest.approx(report[key]["train_flops"])
    for field in ("predictor_accuracy", "predictor_recall", "causal_val_loss"):
        assert math.isfinite(report["mod"][field]), field
    assert 0 <= report["mod"]["predictor_accuracy"] <= 1 and 0 <= report["mod"]["predictor_recall"] <= 1
    assert report["mod"]["flops_per_token"] < report["dense"]["flops_per_token"]
    # same training-FLOP budget (default --match flops), within one MoD step
    assert report["mod"]["train_flops"] == pytest.approx(report["dense"]["train_flops"], rel=0.2)

    assert isinstance(report["sample"], str) and report["sample"].startswith(demo.PROMPT)
    assert report["dense"]["sample"].startswith(demo.PROMPT)
    for key in ("dense", "mod"):  # both models sample through the KV cache
        assert math.isfinite(report[key]["decode_tokens_per_s"]) and report[key]["decode_tokens_per_s"] > 0
    routed, drops = report["mod"]["sample_routed_per_layer"], report["mod"]["sample_drops_per_layer"]
    mod_layers = [str(i) for i in range(report["config"]["n_layer"]) if i % 2 == 1]
    assert list(routed) == list(drops) == mod_layers
    n_tokens = len(demo.PROMPT.encode()) + report["config"]["sample_tokens"] - 1  # tokens fed to the model
    assert all(0 <= routed[k] and 0 <= drops[k] and routed[k] + drops[k] <= n_tokens for k in mod_layers)
    cfg = report["config"]
    assert cfg["corpus"] == "tiny.txt" and cfg["n_tokens"] == FIXTURE.stat().st_size
    assert cfg["quick"] and cfg["dense_steps"] > 0 and cfg["mod_steps"] > 0
    for name in ("dense", "mod"):  # both trained models, to sample from afterwards
        from mod_ext.train import load_model

        m = load_model(out / f"{name}.pt")
        assert (m.cfg.mod_every == 0) == (name == "dense") and not m.training
        assert m.generate(torch.tensor([[84, 111]]), 4, temperature=0).shape == (1, 6)
    assert report["mod"]["tokens_per_s_wall"] > 0 and "start" in report["load_avg_1min"]
    for png in ("loss_curves.png", "routing.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
