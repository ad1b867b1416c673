from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from layerprune.calibration import TextFile, split_documents
from layerprune.errors import LayerpruneError
from layerprune.models import byte_tokenizer


def test_doc_wrappers_are_stripped() -> None:
    text = '<doc id="1" title="A">\nAlpha text.\n</doc>\n<doc id="2">\nBeta.\n</doc>\n'
    assert split_documents(text) == ["Alpha text.", "Beta."]
    assert split_documents("plain text\n") == ["plain text"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cal.txt"
    path.write_text(text)
    return str(path)


def test_windows_are_deterministic_with_bos(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    text = "".join(f'<doc id="{i}">\n{"abcdefghij" * 5} {i}\n</doc>\n' for i in range(40))
    cal = TextFile(n=6, seq_len=17, seed=3, path=write(tmp_path, text))
    a, b = cal.windows(tok), cal.windows(tok)
    assert a.shape == (6, 17) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert not torch.equal(a, TextFile(n=6, seq_len=17, seed=4, path=cal.path).windows(tok))
    # every window body is a consecutive slice of the EOS-joined token stream
    stream = []
    for i in range(40):
        stream += tok(f"{'abcdefghij' * 5} {i}", add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
    starts = {tuple(stream[j : j + 16]) for j in range(0, len(stream) - 15, 16)}
    assert all(tuple(w[1:].tolist()) in starts for w in a)


def test_without_bos(tmp_path: Path) -> None:
    cal = TextFile(n=2, seq_len=8, add_bos=False, path=write(tmp_path, "x" * 100))
    w = cal.windows(byte_tokenizer())
    assert w.shape == (2, 8) and (w != byte_tokenizer().bos_token_id).all()


def test_text_too_short_is_a_clear_error(tmp_path: Path) -> None:
    cal = TextFile(n=4, seq_len=64, path=write(tmp_path, "too short"))
    with pytest.raises(LayerpruneError, match=r"gives 10 tokens = 0 windows of 64; need n=4"):
        cal.windows(byte_tokenizer())


def test_missing_file_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(
        LayerpruneError, match=r"calibration file '/nonexistent\.txt' does not exist"
    ):
        TextFile(path="/nonexistent.txt")
    with pytest.raises(LayerpruneError, match="n >= 1 and seq_len >= 2; got n=0"):
        TextFile(n=0, path=write(tmp_path, "abc"))


def test_a_file_that_is_not_utf8_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(LayerpruneError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        list(TextFile(path=str(path)).documents())


def test_a_text_file_is_identified_by_its_content_not_its_time(tmp_path: Path) -> None:
    """A data folder provisioned again (new times, same bytes) keeps its caches."""
    first, again = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("some calibration text\n")
    again.write_text("some calibration text\n")
    os.utime(again, ns=(1, 1))
    one, two = (TextFile(path=str(p), n=1, seq_len=4).identity() for p in (first, again))
    assert {k: v for k, v in one.items() if k != "path"} == {
        k: v for k, v in two.items() if k != "path"
    }
    assert one["sha256"] == hashlib.sha256(b"some calibration text\n").hexdigest()
    again.write_text("other calibration text\n")
    assert TextFile(path=str(again), n=1, seq_len=4).identity()["sha256"] != one["sha256"]
