"""Smoke test of the demo (mod_ext.demo), offline, on a tiny text fixture."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from mod_ext import data as mdata
from mod_ext import demo
from mod_ext.train import load_model

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
    for key in ("dense", "mod", "mod_router_aux"):
        for field in common:
            assert math.isfinite(report[key][field]) and report[key][field] > 0, (key, field)
        curve = report[key]["curve"]
        assert len(curve) >= 2 and curve[0]["train_flops"] == 0
        for point in curve:
            assert all(math.isfinite(point[f]) for f in ("train_flops", "wall_s", "val_loss"))
        assert curve[-1]["train_flops"] == pytest.approx(report[key]["train_flops"])
    for key, rule in (("mod", "predictor"), ("mod_router_aux", "router")):  # both causal methods reported
        r = report[key]
        assert r["causal_rule"] == rule and math.isfinite(r["causal_val_loss"])
        rules = ["causal_routing", "causal_routing_uncalibrated"] + (["causal_routing_router_logits"]
                                                                     if rule == "predictor" else [])
        assert [k for k in r if k.startswith("causal_routing")] == rules
        for name in rules:
            for field in ("accuracy", "recall", "precision", "routed_fraction"):
                assert 0 <= r[name][field] <= 1, (key, name, field)
            assert list(r[name]["per_layer"]) == ["1"]
        assert r["causal_recall"] == r["causal_routing"]["recall"]
        assert len(r["causal_thresholds"]) == 1
        model = load_model(out / f"{key}.pt")  # the calibrated threshold is saved with the model
        assert float(model.mod_layers[0].causal_threshold) == pytest.approx(r["causal_thresholds"][0])
        assert model.cfg.causal_router == rule
        h = r["health"][-1]["layers"]["1"]  # router health, read every 10 steps and at the end
        assert h["nonfinite_router_logits"] == 0 and math.isfinite(h["router_logit_std"])
    assert report["mod"]["sampled"] and "sampled" not in report["mod_router_aux"]
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
    for name in ("dense", "mod", "mod_router_aux"):  # the trained models, to sample from afterwards
        m = load_model(out / f"{name}.pt")
        assert (m.cfg.mod_every == 0) == (name == "dense") and not m.training
        assert m.generate(torch.tensor([[84, 111]]), 4, temperature=0).shape == (1, 6)
    assert report["mod"]["tokens_per_s_wall"] > 0 and "start" in report["load_avg_1min"]
    for png in ("loss_curves.png", "routing.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
