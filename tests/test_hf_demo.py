"""Smoke test of the Hugging Face demo (mod_ext.hf_demo), offline, on a tiny text fixture."""

import json
import math
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="mod_ext.hf_demo needs the [hf] extra")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
pytest.importorskip("matplotlib", reason="mod_ext.hf_demo needs the [demo] extra")

from mod_ext import data as mdata  # noqa: E402
from mod_ext import hf_demo  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "tiny.txt"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Fail loudly if anything tries to fetch the corpus."""
    def no_network(*args, **kwargs):
        raise AssertionError("the hf demo smoke test must not touch the network")

    monkeypatch.setattr(mdata, "fetch_shakespeare", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setenv("MOD_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_hf_demo_quick_on_tiny_text(tmp_path, offline):
    out = tmp_path / "run"
    returned = hf_demo.main(["--data", str(FIXTURE), "--quick", "--out", str(out), "--threads", "1"])
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == json.loads(json.dumps(returned["config"]))
    cfg = report["config"]
    assert cfg["quick"] and cfg["corpus"] == "tiny.txt"
    assert cfg["mod_ext_settings"]["capacity_factor"] == 0.125
    mod_layers = [i for i in range(cfg["n_layer"]) if i % 2 == 1]  # every=2: layers 1, 3, ...
    assert cfg["mod_ext_settings"]["layers"] == mod_layers
    assert report["converted_before_finetune"]["mod_layers"] == mod_layers

    pre = report["pretrain"]
    assert pre["steps"] == cfg["pretrain_steps"] and _finite_positive(pre["val_loss"])
    for key in ("dense", "mod"):
        r = report[key]
        for field in ("val_loss", "train_flops", "flops_per_token", "step_time_s", "tokens_per_s", "train_wall_s"):
            assert _finite_positive(r[field]), (key, field)
        assert r["val_loss"] < 2 * math.log(256)  # nats/byte; a uniform guess is log(256) = 5.5
        curve = r["curve"]
        assert len(curve) >= 2 and curve[0]["step"] == 0 and curve[-1]["step"] == r["steps"]
        # fine-tuning starts where pretraining ended, on the cumulative FLOPs axis
        assert curve[0]["train_flops"] == pytest.approx(pre["train_flops"])
        assert curve[-1]["train_flops"] == pytest.approx(pre["train_flops"] + r["train_flops"])
        for point in curve:
            assert all(math.isfinite(point[f]) for f in ("train_flops", "wall_s", "val_loss"))
        assert r["train_loss"] and all(math.isfinite(p["loss"]) for p in r["train_loss"])
    d, m = report["dense"], report["mod"]
    assert d["steps"] == cfg["dense_steps"] and m["steps"] == cfg["mod_steps"]
    assert m["flops_per_token"] < d["flops_per_token"] and m["steps"] > d["steps"]
    # the same fine-tuning FLOPs, within one MoD step
    assert abs(m["train_flops"] - d["train_flops"]) <= 3 * m["flops_per_token"] * cfg["tokens_per_step"] / 2 + 1
    assert m["params"] > d["params"]  # the routers and predictors

    assert math.isfinite(m["causal_val_loss"]) and m["causal_val_loss"] > 0
    for field in ("predictor_accuracy", "predictor_recall", "causal_routed_fraction"):
        assert 0 <= m[field] <= 1, field
    assert sorted(m["per_layer"], key=int) == [str(i) for i in mod_layers]

    for key in ("dense", "mod"):
        for B in hf_demo.GEN_BATCHES:
            g = report["generation"][key][str(B)]
            assert g["batch"] == B and g["new_tokens"] == cfg["new_tokens"]
            assert _finite_positive(g["tokens_per_s"]) and _finite_positive(g["time_s"])
            assert isinstance(g["text"], str) and g["text"]
            assert 0 <= g["recompute_agreement"] <= 1
            if key == "mod":
                assert sorted(g["drops_per_layer"], key=int) == [str(i) for i in mod_layers]
                assert all(0 <= v <= B * cfg["new_tokens"] for v in g["drops_per_layer"].values())

    assert (out / "summary.md").read_text().startswith("transformers LlamaForCausalLM")
    png = out / "loss_curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
