"""The text pipeline: the shipped corpus, char / BPE tokenizers, the positional split, sampling,
the fixed evaluation windows, tokenizer saving and resume checks, and bad input."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import eqprop
from eqprop.data import SHAKESPEARE_PATH, TextCorpus, Tokenizer, load_tokenizer, make_tokenizer, read_text
from eqprop.data import text as text_mod

SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"

# Whitespace around newlines, runs of blank lines, digits, punctuation and multi-byte characters:
# the places where byte-level pre-tokenization could split differently at a chunk boundary.
TRICKY = (
    "First Citizen:\nBefore we proceed  \n\n\nany further, hear me speak.\n \nAll:\tSpeak, speak.\n"
    "It's 1,234 ducats -- naïve café, 東京, ünïcödé!\r\nYou're 'quoted'?\n\n  indented\nend\n"
) * 7


@pytest.fixture(scope="module")
def shakespeare_bpe(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bpe_run")
    return TextCorpus.prepare(tokenizer="bpe", vocab_size=512, run_dir=run_dir), run_dir


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_shipped_corpus_is_installed_with_its_provenance():
    pkg = Path(eqprop.__file__).resolve().parent
    assert pkg in SHAKESPEARE_PATH.parents  # read from the installed package, not the source tree
    raw = SHAKESPEARE_PATH.read_bytes()
    assert hashlib.md5(raw).hexdigest() == SHAKESPEARE_MD5
    text = read_text()
    assert text == raw.decode("utf-8") and len(text) == 1115394
    assert len(set(text)) == 65
    readme = (SHAKESPEARE_PATH.parent / "README.md").read_text(encoding="utf-8")
    assert SHAKESPEARE_MD5 in readme and "public domain" in readme


def test_char_tokenizer_round_trips_the_corpus_in_sorted_order():
    text = read_text()
    corpus = TextCorpus.prepare()
    tok = corpus.tokenizer
    assert tok.kind == "char" and tok.vocab_size == corpus.vocab_size == 65
    n_train = int(len(text) * 0.9)
    assert corpus.train.dtype == torch.int64 and corpus.train.dim() == 1
    assert tok.decode(corpus.train) == text[:n_train] and tok.decode(corpus.val) == text[n_train:]
    # ids are ranks of the characters in sorted order (a Python dict as the independent oracle)
    rank = {c: i for i, c in enumerate(sorted(set(text)))}
    head = text[:5000]
    assert corpus.train[:5000].tolist() == [rank[c] for c in head]
    with pytest.raises(ValueError, match="outside"):
        tok.encode("Zebra ~ é")


def test_bpe_on_shakespeare_round_trips_and_is_fit_on_train_only(shakespeare_bpe):
    corpus, run_dir = shakespeare_bpe
    text = read_text()
    n_train = int(len(text) * 0.9)
    tok = corpus.tokenizer
    assert tok.kind == "bpe" and tok.vocab_size == corpus.vocab_size == 512
    assert tok.decode(corpus.train) == text[:n_train]
    assert tok.decode(corpus.val) == text[n_train:]
    assert int(corpus.train.max()) < 512 and int(corpus.train.min()) >= 0
    # BPE compresses: fewer tokens than characters, more than a quarter of them at 512 ids
    assert len(text) / 4 < corpus.train.numel() + corpus.val.numel() < len(text)
    meta = json.loads((run_dir / "data.json").read_text())
    assert meta["tokenizer_fit_sha256"] == hashlib.sha256(text[:n_train].encode()).hexdigest()
    assert meta["train_chars"] == n_train and meta["corpus_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_bpe_never_sees_the_validation_split(tmp_path):
    # " xyz" is frequent but only in the last 10%: trained on train only, it stays 4 byte tokens.
    train_part = "abc abd " * 450
    data = write(tmp_path / "c.txt", train_part + "xyz " * 100)
    assert int(len(read_text(data)) * 0.9) == len(train_part)
    # 3600 characters of two words run out of pairs to merge before 300 ids: a warning says so
    with pytest.warns(UserWarning, match="fewer than vocab_size=300"):
        corpus = TextCorpus.prepare(data, tokenizer="bpe", vocab_size=300)
    assert corpus.vocab_size < 300 and corpus.tokenizer.requested_vocab_size == 300
    assert corpus.tokenizer.encode(" xyz").numel() == 4
    assert corpus.tokenizer.encode(" abd").numel() == 1  # while the train words merged
    with pytest.warns(UserWarning, match="fewer than vocab_size=300"):
        leaked = make_tokenizer("bpe", read_text(data), vocab_size=300)
    assert leaked.encode(" xyz").numel() == 1  # the check above can fail: trained on all, it merges
    assert corpus.tokenizer.decode(corpus.val) == "xyz " * 100


def test_bpe_training_is_deterministic_and_chunking_is_exact(monkeypatch):
    monkeypatch.setattr(text_mod, "_trained_cache", {})
    a = make_tokenizer("bpe", TRICKY, vocab_size=320)
    monkeypatch.setattr(text_mod, "_trained_cache", {})
    b = make_tokenizer("bpe", TRICKY, vocab_size=320)
    assert a.fingerprint() == b.fingerprint()
    assert a.decode(a.encode(TRICKY)) == TRICKY
    # encoding in chunks (what encode does) = encoding the whole string at once
    whole = a._hf.encode(TRICKY).ids
    for size in (1, 7, 50):
        chunks = text_mod._bpe_chunks(TRICKY, size)
        assert "".join(chunks) == TRICKY and len(chunks) > 3
        assert [i for c in chunks for i in a._hf.encode(c).ids] == whole
    assert a.encode(TRICKY).tolist() == whole


def test_split_is_by_position(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(1000))  # distinct characters: ids = positions
    data = write(tmp_path / "pos.txt", text)
    corpus = TextCorpus.prepare(data, val_fraction=0.25)
    assert corpus.train.tolist() == list(range(750)) and corpus.val.tolist() == list(range(750, 1000))
    assert "750 train / 250 val" in corpus.description and "vocab 1000" in corpus.description


def test_sample_is_reproducible_uniform_and_made_of_real_windows(tmp_path):
    corpus = TextCorpus.prepare(write(tmp_path / "pos.txt", "".join(chr(0x4E00 + i) for i in range(120))))
    train = corpus.train  # ids 0..107, one per position
    x = corpus.sample("train", 6000, 100, torch.Generator().manual_seed(1))
    y = corpus.sample("train", 6000, 100, torch.Generator().manual_seed(1))
    assert x.shape == (6000, 100) and x.dtype == torch.int64 and torch.equal(x, y)
    assert not torch.equal(x, corpus.sample("train", 6000, 100, torch.Generator().manual_seed(2)))
    starts = x[:, 0]
    assert torch.equal(x, train[starts[:, None] + torch.arange(100)])  # contiguous windows of the split
    # uniform over the 9 possible starts: each count within 5 binomial SDs of 6000/9
    counts = torch.bincount(starts, minlength=9)
    assert counts.numel() == 9
    p = 1 / 9
    assert (counts - 6000 * p).abs().max() < 5 * math.sqrt(6000 * p * (1 - p))
    full = corpus.sample("val", 2, 12, torch.Generator().manual_seed(0))
    assert torch.equal(full, corpus.val.expand(2, 12))  # length = split size: the one window


def test_eval_windows_are_fixed_and_evenly_spaced(tmp_path):
    corpus = TextCorpus.prepare(write(tmp_path / "pos.txt", "".join(chr(0x4E00 + i) for i in range(1000))))
    val = corpus.val  # ids 900..999
    w = corpus.eval_windows("val", 10, 7)
    assert w.shape == (7, 10) and torch.equal(w, corpus.eval_windows("val", 10, 7))
    starts = w[:, 0] - 900
    assert torch.equal(w, val[starts[:, None] + torch.arange(10)])
    stride = (100 - 10 + 1) / 7
    steps = starts.diff().tolist()
    assert all(math.floor(stride) <= s <= math.ceil(stride) for s in steps)
    assert 0 <= int(starts[0]) < stride and int(starts[-1]) <= 90
    others = {tuple(corpus.eval_windows("val", 10, 7, seed=s)[:, 0].tolist()) for s in range(1, 6)}
    assert len(others) > 1  # the seed moves the offset
    assert corpus.eval_windows("val", 100, 1)[0].tolist() == val.tolist()
    with pytest.raises(ValueError, match="length=101.*val split"):
        corpus.eval_windows("val", 101, 1)
    with pytest.raises(ValueError, match="n=92"):
        corpus.eval_windows("val", 10, 92)


def test_run_dir_saves_then_reuses_the_tokenizer_and_rejects_a_different_one(tmp_path):
    data = write(tmp_path / "c.txt", TRICKY)
    run = tmp_path / "run"
    first = TextCorpus.prepare(data, tokenizer="bpe", vocab_size=300, run_dir=run)
    saved = run / "tokenizer.json"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == first.tokenizer.fingerprint()
    assert not list(run.glob(".*tmp"))  # the atomic write left no temporary file
    again = TextCorpus.prepare(data, tokenizer="bpe", vocab_size=300, run_dir=run)
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert torch.equal(again.train, first.train) and torch.equal(again.val, first.val)
    loaded = load_tokenizer(saved)
    assert loaded.fingerprint() == first.tokenizer.fingerprint() and loaded.kind == "bpe"
    assert TextCorpus.prepare(data, tokenizer=loaded, run_dir=run).tokenizer.fingerprint() == loaded.fingerprint()

    with pytest.raises(ValueError, match="tokenizer='char'.*kind='bpe'"):
        TextCorpus.prepare(data, tokenizer="char", run_dir=run)
    with pytest.raises(ValueError, match="vocab_size=400.*vocab_size=300"):
        TextCorpus.prepare(data, tokenizer="bpe", vocab_size=400, run_dir=run)
    other = make_tokenizer("bpe", TRICKY[: len(TRICKY) // 2], vocab_size=300)
    with pytest.raises(ValueError, match="fingerprint"):
        TextCorpus.prepare(data, tokenizer=other, run_dir=run)
    changed = write(tmp_path / "d.txt", TRICKY + "more")
    with pytest.raises(ValueError, match="d.txt.*differs.*c.txt"):
        TextCorpus.prepare(changed, tokenizer="bpe", vocab_size=300, run_dir=run)
    with pytest.raises(ValueError, match="val_fraction"):
        TextCorpus.prepare(data, tokenizer="bpe", vocab_size=300, run_dir=run, val_fraction=0.2)

    char_run = tmp_path / "char_run"
    c = TextCorpus.prepare(data, run_dir=char_run)
    assert load_tokenizer(char_run / "tokenizer.json").fingerprint() == c.tokenizer.fingerprint()
    assert c.vocab_size == len(set(TRICKY))


def test_folder_of_text_files(tmp_path):
    write(tmp_path / "b.txt", "second file\n")
    write(tmp_path / "a.txt", "first file")
    write(tmp_path / "notes.md", "not text data")
    assert read_text(tmp_path) == "first file\nsecond file\n"
    corpus = TextCorpus.prepare(str(tmp_path))
    assert corpus.tokenizer.decode(torch.cat([corpus.train, corpus.val])) == "first file\nsecond file\n"


def test_bad_inputs_name_the_argument(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="data=.*nope.txt"):
        read_text(missing)
    with pytest.raises(FileNotFoundError, match="data=.*nope.txt"):
        TextCorpus.prepare(missing)
    with pytest.raises(ValueError, match="data=.*empty"):
        read_text(write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match="data=.*empty"):
        read_text(write(tmp_path / "blank.txt", " \n\n"))
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir" / "x.md", "hello")
    with pytest.raises(ValueError, match="data=.*no \\*.txt"):
        read_text(tmp_path / "dir")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="data=.*not UTF-8.*offset 3"):
        read_text(latin1)
    with pytest.raises(TypeError, match="data must be"):
        read_text(3)

    data = write(tmp_path / "ok.txt", "hello world, hello there\n" * 8)
    with pytest.raises(ValueError, match="kind must be one of.*'word'"):
        TextCorpus.prepare(data, tokenizer="word")
    with pytest.raises(TypeError, match="tokenizer must be"):
        TextCorpus.prepare(data, tokenizer=5)
    with pytest.raises(ValueError, match="needs vocab_size"):
        TextCorpus.prepare(data, tokenizer="bpe")
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        make_tokenizer("bpe", "hello", vocab_size=200)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        make_tokenizer("bpe", "hello", vocab_size=512.0)
    with pytest.raises(ValueError, match="vocab_size.*only for tokenizer='bpe'"):
        make_tokenizer("char", "hello", vocab_size=65)
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        TextCorpus.prepare(data, val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="path="):
        load_tokenizer(tmp_path / "none.json")
    with pytest.raises(ValueError, match="not a saved eqprop tokenizer"):
        load_tokenizer(write(tmp_path / "x.json", '{"a": 1}'))
    damaged = {"format": "eqprop.tokenizer", "version": 1, "kind": "bpe", "vocab_size": 300, "hf": {"model": 1}}
    with pytest.raises(ValueError, match="damaged"):
        load_tokenizer(write(tmp_path / "d.json", json.dumps(damaged)))

    corpus = TextCorpus.prepare(data)  # 200 chars: 180 train, 20 val
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="length=21 is longer than the val split \\(20 tokens\\)"):
        corpus.sample("val", 2, 21, g)
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        corpus.sample("test", 2, 4, g)
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        corpus.sample("train", 0, 4, g)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        corpus.sample("train", 2, 4, 0)
    with pytest.raises(ValueError, match="ids must lie in \\[0, vocab_size=.*got 99"):
        corpus.tokenizer.decode([1, 99])
    assert isinstance(corpus.tokenizer, Tokenizer)
