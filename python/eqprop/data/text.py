"""Text corpora for the language-model trainers: read, tokenize, split, sample (docs/design.md §10).

The shipped corpus is tiny Shakespeare (``SHAKESPEARE_PATH``, provenance in the README next to it);
``data=PATH`` takes the user's own UTF-8 text file or folder of ``*.txt`` files. Nothing is
downloaded.

Two tokenizers: ``"char"`` (the sorted distinct characters of the corpus) and ``"bpe"`` (byte-level
BPE trained with the ``tokenizers`` library, so any text encodes and ``decode(encode(t)) == t``).
``TextCorpus.prepare`` splits the text by position (first ``1 - val_fraction`` of the characters
for training, the rest for validation) *before* tokenizing, trains the tokenizer on the training
split only, and saves it in the run folder so evaluation and resume reuse the same one; a resume
whose tokenizer or corpus differs fails before the first step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "SHAKESPEARE_PATH",
    "read_text",
    "Tokenizer",
    "make_tokenizer",
    "load_tokenizer",
    "TextCorpus",
]

SHAKESPEARE_PATH = Path(__file__).resolve().parent / "tinyshakespeare" / "tinyshakespeare.txt"
"""The shipped tiny Shakespeare corpus: 1,115,394 characters, 65 distinct (README.md beside it)."""

KINDS = ("char", "bpe")
_FORMAT = "eqprop.tokenizer"
_FORMAT_VERSION = 1
_BYTE_ALPHABET = 256  # byte-level BPE starts from one symbol per byte value
TOKENIZER_FILE = "tokenizer.json"
DATA_META_FILE = "data.json"

PathLike = Union[str, "os.PathLike[str]"]

# Per-process caches: tokenizers trained (a few, keyed by their text), and the shipped corpus's ids
# (a user's corpus may be large; its ids are not kept).
_shipped_text: Optional[str] = None
_trained_cache: dict = {}  # (kind, vocab_size, sha256 of the training text) -> payload
_encoded_cache: dict = {}  # (tokenizer fingerprint, sha256 of the text, n_train) -> (train, val)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_path_arg(data, name: str = "data") -> Path:
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"{name} must be None, a str or an os.PathLike path, got {type(data).__name__}: {data!r}")
    return Path(data).expanduser()


def _decode_utf8(raw: bytes, data, file: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data={str(data)!r}: {file} is not UTF-8 text (invalid byte at offset {err.start}); re-encode it as UTF-8"
        ) from None


def read_text(data: Optional[PathLike] = None) -> str:
    """Read a text corpus as one string, exactly as stored (no newline translation).

    ``data``: None for the shipped tiny Shakespeare (``SHAKESPEARE_PATH``); the path of a UTF-8
    text file; or a folder, whose ``*.txt`` files (not recursive) are read in sorted name order and
    joined with ``"\\n"``.

    Raises FileNotFoundError (naming ``data`` and the path) when it does not exist, ValueError when
    the corpus is empty, a folder holds no ``*.txt`` file, or a file is not UTF-8.

    Example: ``len(read_text())`` -> ``1115394``.
    """
    global _shipped_text
    if data is None:
        if _shipped_text is None:
            _shipped_text = _decode_utf8(SHAKESPEARE_PATH.read_bytes(), "tinyshakespeare", SHAKESPEARE_PATH)
        return _shipped_text
    path = _check_path_arg(data)
    if not path.exists():
        raise FileNotFoundError(
            f"data={str(data)!r}: no such file or folder ({path.resolve()}); it needs a UTF-8 text file "
            "or a folder of *.txt files (None for the shipped tiny Shakespeare)"
        )
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data={str(data)!r}: the folder {path.resolve()} holds no *.txt file")
        text = "\n".join(_decode_utf8(f.read_bytes(), data, f) for f in files)
    else:
        text = _decode_utf8(path.read_bytes(), data, path)
    if not text.strip():
        raise ValueError(f"data={str(data)!r}: the corpus at {path.resolve()} is empty (no non-whitespace text)")
    return text


# --- tokenizers ----------------------------------------------------------------------------------


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - tokenizers is a declared dependency
        raise ImportError(
            "tokenizer='bpe' needs the `tokenizers` library (a dependency of eqprop): pip install tokenizers"
        ) from err
    return tokenizers


def _bpe_chunks(text: str, size: int = 1 << 16) -> list:
    """Cut ``text`` into pieces of about ``size`` characters whose byte-level BPE encodings
    concatenate to the encoding of the whole.

    Byte-level pre-tokenization (the GPT-2 regex) never joins across a cut made after a ``"\\n"``
    that follows a non-space and precedes a non-space: the newline is a piece of its own either
    way. Batched encoding of the pieces is several times faster than one 1 MB string.
    """
    out, start, n = [], 0, len(text)
    while start < n:
        end = min(start + size, n)
        while end < n and not (text[end - 1] == "\n" and not text[end - 2].isspace() and not text[end].isspace()):
            end += 1
        out.append(text[start:end])
        start = end
    return out


class Tokenizer:
    """A character-level or byte-level BPE tokenizer with a stable serialized form.

    Build one with ``make_tokenizer`` or ``load_tokenizer``. ``kind`` is ``"char"`` or ``"bpe"``,
    ``vocab_size`` the number of token ids (rows of the embedding). ``encode`` gives a 1-D int64
    tensor, ``decode`` the string back; ``save`` writes the serialized form (JSON) atomically and
    ``fingerprint`` is its sha256 (equal to the sha256 of the saved file).

    Example: ``tok = make_tokenizer("char", "abca"); tok.encode("cab").tolist()`` -> ``[2, 0, 1]``.
    """

    def __init__(self, payload: dict):
        self._payload = payload
        self._serialized = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        self.kind: str = payload["kind"]
        self.vocab_size: int = int(payload["vocab_size"])
        self.requested_vocab_size: Optional[int] = payload.get("requested_vocab_size")
        if self.kind == "char":
            self._chars = payload["chars"]
            # The vocabulary is sorted, so sorted code points map to ids by binary search.
            self._codes = torch.tensor([ord(c) for c in self._chars], dtype=torch.int64)
        else:
            tokenizers = _import_tokenizers()
            self._hf = tokenizers.Tokenizer.from_str(json.dumps(payload["hf"]))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"

    def fingerprint(self) -> str:
        """sha256 (hex) of the serialized form: equal fingerprints encode every text identically.

        Example: ``make_tokenizer("char", "ab").fingerprint()[:8]`` -> a stable 8-hex prefix.
        """
        return hashlib.sha256(self._serialized.encode("ascii")).hexdigest()

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``: a 1-D int64 tensor (length = characters for ``"char"``).

        Raises ValueError for a character outside a ``"char"`` vocabulary (byte-level BPE encodes
        any text). Example: ``make_tokenizer("char", "ab").encode("ba").tolist()`` -> ``[1, 0]``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            return torch.zeros(0, dtype=torch.int64)
        if self.kind == "char":
            # UTF-32 gives one code point per character without a Python loop.
            cps = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)
            ids = torch.searchsorted(self._codes, cps).clamp_(max=self.vocab_size - 1)
            unknown = self._codes[ids] != cps
            if bool(unknown.any()):
                pos = int(unknown.nonzero()[0, 0])
                missing = sorted({text[i] for i in unknown.nonzero()[:, 0].tolist()[:1000]})
                raise ValueError(
                    f"text has characters outside this char tokenizer's vocabulary of {self.vocab_size}: "
                    f"{''.join(missing)!r} (first at position {pos}); build the tokenizer from a text that "
                    "contains them, or use tokenizer='bpe' (byte-level: encodes any text)"
                )
            return ids
        ids = [i for enc in self._hf.encode_batch(_bpe_chunks(text)) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids) -> str:
        """The text of token ids (a 1-D tensor or a sequence of ints), the inverse of ``encode``.

        A BPE window that starts or ends inside a multi-byte character decodes that character as
        U+FFFD. Example: ``tok.decode(tok.encode("hello"))`` -> ``"hello"``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
            ids = ids.tolist()
        else:
            ids = list(ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError("ids must be a 1-D integer tensor or a sequence of ints")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}), got {bad}")
        if self.kind == "char":
            return "".join([self._chars[i] for i in ids])
        return self._hf.decode(ids, skip_special_tokens=False)

    def save(self, path: PathLike) -> None:
        """Write the serialized form to ``path`` atomically (a temporary file, then a rename).

        Example: ``tok.save(run_dir / "tokenizer.json"); load_tokenizer(run_dir / "tokenizer.json")``.
        """
        _atomic_write(_check_path_arg(path, "path"), self._serialized)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_vocab_size(kind: str, vocab_size) -> Optional[int]:
    if kind == "char":
        if vocab_size is not None:
            raise ValueError(
                f"vocab_size is only for tokenizer='bpe' (a char vocabulary is the corpus's distinct characters); "
                f"got vocab_size={vocab_size!r} with 'char': pass None"
            )
        return None
    if vocab_size is None:
        raise ValueError(f"tokenizer='bpe' needs vocab_size, an int > {_BYTE_ALPHABET} (e.g. 512 to 50000)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}: {vocab_size!r}")
    if vocab_size <= _BYTE_ALPHABET:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs > {_BYTE_ALPHABET} "
            f"({_BYTE_ALPHABET} byte symbols + merges), e.g. 512 to 50000"
        )
    return vocab_size


def make_tokenizer(kind: str, text: str, vocab_size: Optional[int] = None) -> Tokenizer:
    """Build a tokenizer from ``text``.

    ``kind="char"``: the vocabulary is the sorted distinct characters of ``text`` (``vocab_size``
    must be None). ``kind="bpe"``: byte-level BPE trained on ``text`` with the ``tokenizers``
    library, ``vocab_size`` ids (> 256: the 256 byte symbols, then merges; fewer, with a warning,
    when ``text`` runs out of pairs to merge). Training is deterministic: the same text and
    ``vocab_size`` give the same fingerprint.

    Example: ``make_tokenizer("bpe", read_text(), vocab_size=512).vocab_size`` -> ``512``.
    """
    kind = _check_kind(kind)
    vocab_size = _check_vocab_size(kind, vocab_size)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text must be non-empty to build a tokenizer from, got ''")
    key = (kind, vocab_size, _sha256(text))
    if key in _trained_cache:
        return Tokenizer(_trained_cache[key])
    if kind == "char":
        chars = "".join(sorted(set(text)))
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "kind": "char", "vocab_size": len(chars)}
        payload.update(requested_vocab_size=None, chars=chars)
    else:
        tk = _import_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,  # library code never prints
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        hf.train_from_iterator(_bpe_chunks(text), trainer=trainer)
        actual = hf.get_vocab_size()
        if actual < vocab_size:
            warnings.warn(
                f"BPE vocabulary has {actual} tokens, fewer than vocab_size={vocab_size}: the training text "
                f"({len(text)} characters) has no more pairs to merge",
                stacklevel=2,
            )
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "kind": "bpe", "vocab_size": actual}
        payload.update(requested_vocab_size=vocab_size, hf=json.loads(hf.to_str()))
    if len(_trained_cache) < 8:  # bounded: a 50k-token BPE is a few MB
        _trained_cache[key] = payload
    return Tokenizer(payload)


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a tokenizer from the file ``Tokenizer.save`` wrote.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a saved
    eqprop tokenizer. Example: ``load_tokenizer("runs/lm/tokenizer.json").kind`` -> ``"bpe"``.
    """
    p = _check_path_arg(path, "path")
    if not p.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no tokenizer file at {p.resolve()}")
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"path={str(path)!r} is not a saved eqprop tokenizer (not JSON: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"path={str(path)!r} is not a saved eqprop tokenizer (no format={_FORMAT!r})")
    if payload.get("version") != _FORMAT_VERSION or payload.get("kind") not in KINDS:
        raise ValueError(
            f"path={str(path)!r}: tokenizer format version {payload.get('version')!r} kind {payload.get('kind')!r} "
            f"is not readable by this eqprop (needs version {_FORMAT_VERSION}, kind in {KINDS})"
        )
    try:
        return Tokenizer(payload)
    except Exception as err:  # a damaged file: the tokenizers library raises its own exception type
        raise ValueError(f"path={str(path)!r}: the saved tokenizer is damaged ({type(err).__name__}: {err})") from None


# --- the corpus ----------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class TextCorpus:
    """A tokenized text corpus split by position into ``train`` and ``val`` (1-D int64 tensors).

    Build it with ``TextCorpus.prepare``. ``vocab_size`` and ``tokenizer`` describe the ids;
    ``description`` is one line for logs. ``sample`` draws random training windows and
    ``eval_windows`` gives a fixed evaluation set.

    Example: ``c = TextCorpus.prepare(); x = c.sample("train", 32, 65, torch.Generator().manual_seed(0))``
    -> ``[32, 65]`` ids; inputs ``x[:, :-1]``, next-token targets ``x[:, 1:]``.
    """

    def __init__(self, train: torch.Tensor, val: torch.Tensor, tokenizer: Tokenizer, description: str):
        self.train = train
        self.val = val
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.description = description

    def __repr__(self) -> str:
        return f"TextCorpus({self.description})"

    @classmethod
    def prepare(
        cls,
        data: Optional[PathLike] = None,
        tokenizer: Union[str, Tokenizer] = "char",
        vocab_size: Optional[int] = None,
        run_dir: Optional[PathLike] = None,
        val_fraction: float = 0.1,
    ) -> "TextCorpus":
        """Read, split, tokenize; reuse or save the tokenizer in ``run_dir``.

        ``data``: as ``read_text`` (None: the shipped tiny Shakespeare). The text is split by
        character position before tokenizing: the first ``floor(n * (1 - val_fraction))``
        characters train, the rest validate. ``tokenizer``: ``"char"`` (the corpus's distinct
        characters — the whole text's, so that no validation character is unencodable; an
        alphabet carries no statistics of the split) or ``"bpe"`` (trained on the training split
        only, ``vocab_size`` required), or a ``Tokenizer`` to use as is.

        ``run_dir``: if ``run_dir/tokenizer.json`` exists (a resume, or an evaluation), it is
        loaded and must match the request — kind, vocab_size, the given Tokenizer's fingerprint,
        and the corpus recorded in ``run_dir/data.json`` — else ValueError saying what differs,
        before any training step. Otherwise the tokenizer is saved there (atomically) with
        ``data.json`` (kind, vocab_size, data path, sha256 of the corpus and of the text the
        tokenizer was trained on).

        Example: ``TextCorpus.prepare(tokenizer="bpe", vocab_size=512, run_dir="runs/lm").vocab_size`` -> ``512``.
        """
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise TypeError(f"val_fraction must be a float in (0, 1), got {type(val_fraction).__name__}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if isinstance(tokenizer, Tokenizer):
            if vocab_size is not None and vocab_size != tokenizer.vocab_size:
                raise ValueError(
                    f"vocab_size={vocab_size} differs from the given tokenizer's vocab_size={tokenizer.vocab_size}"
                )
            kind = tokenizer.kind
        elif isinstance(tokenizer, str):
            kind = _check_kind(tokenizer)
            vocab_size = _check_vocab_size(kind, vocab_size)
        else:
            raise TypeError(f"tokenizer must be 'char', 'bpe' or a Tokenizer, got {type(tokenizer).__name__}")

        text = read_text(data)
        n = len(text)
        n_train = int(n * (1.0 - float(val_fraction)))
        if n_train < 1 or n_train >= n:
            raise ValueError(
                f"val_fraction={val_fraction} leaves an empty split of the {n}-character corpus "
                f"of data={_source(data)!r}"
            )
        train_text, val_text = text[:n_train], text[n_train:]
        corpus_sha = _sha256(text)
        fit_text = text if kind == "char" else train_text
        meta = {
            "kind": kind,
            "data": _source(data),
            "corpus_chars": n,
            "corpus_sha256": corpus_sha,
            "val_fraction": float(val_fraction),
            "train_chars": n_train,
            "tokenizer_fit_on": "whole corpus (alphabet)" if kind == "char" else "train split",
            "tokenizer_fit_sha256": _sha256(fit_text),
        }

        run_path = None if run_dir is None else _check_path_arg(run_dir, "run_dir")
        saved = None if run_path is None else run_path / TOKENIZER_FILE
        if saved is not None and saved.exists():
            tok = load_tokenizer(saved)
            _check_resume(tok, tokenizer, kind, vocab_size, run_path, meta)
        else:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else make_tokenizer(kind, fit_text, vocab_size)
            if run_path is not None:
                meta.update(vocab_size=tok.vocab_size, requested_vocab_size=tok.requested_vocab_size)
                meta["tokenizer_fingerprint"] = tok.fingerprint()
                tok.save(saved)
                _atomic_write(run_path / DATA_META_FILE, json.dumps(meta, indent=1) + "\n")

        key = (tok.fingerprint(), corpus_sha, n_train)
        if key in _encoded_cache:
            train, val = (t.clone() for t in _encoded_cache[key])
        else:
            train, val = tok.encode(train_text), tok.encode(val_text)
            if data is None:
                _encoded_cache[key] = (train.clone(), val.clone())
        desc = (
            f"{_source(data)}: {n:,} chars ({n_train:,} train / {n - n_train:,} val), "
            f"{train.numel() + val.numel():,} tokens ({train.numel():,} / {val.numel():,}), "
            f"{tok.kind} vocab {tok.vocab_size}"
        )
        return cls(train, val, tok, desc)

    def _split(self, split) -> torch.Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def sample(self, split: str, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` windows of ``length`` consecutive token ids with uniform random starts.

        Returns a LongTensor ``[batch, length]`` on the CPU; the same ``generator`` state gives the
        same windows. Ask for ``seq_len + 1`` to get inputs ``x[:, :-1]`` and targets ``x[:, 1:]``.

        Example: ``corpus.sample("train", 8, 129, torch.Generator().manual_seed(0)).shape`` -> ``(8, 129)``.
        """
        ids = self._split(split)
        batch = _check_int("batch", batch, 1)
        length = _check_int("length", length, 1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator (the ids live on the CPU; move the batch to the "
                f"device afterwards), got one on {generator.device}"
            )
        if length > ids.numel():
            raise ValueError(f"length={length} is longer than the {split} split ({ids.numel()} tokens)")
        starts = torch.randint(0, ids.numel() - length + 1, (batch,), generator=generator)
        return ids[starts[:, None] + torch.arange(length)]  # [batch, 1] + [length] -> [batch, length]

    def eval_windows(self, split: str, length: int, n: int, seed: int = 0) -> torch.Tensor:
        """A fixed evaluation set: ``n`` windows of ``length`` tokens at evenly spaced starts.

        The starts are ``floor(u + i * s)``, i = 0..n-1, with stride ``s = (N - length + 1) / n``
        over the split's ``N`` tokens and one offset ``u`` in ``[0, s)`` drawn from ``seed``: the
        windows cover the split evenly and are the same on every call (and every rank). Windows
        overlap when ``n * length > N``. Returns a LongTensor ``[n, length]``.

        Raises ValueError when the split is shorter than ``length`` or has fewer than ``n``
        distinct starts. Example: ``corpus.eval_windows("val", 1280, 32).shape`` -> ``(32, 1280)``.
        """
        ids = self._split(split)
        length = _check_int("length", length, 1)
        n = _check_int("n", n, 1)
        _check_int("seed", seed, 0)
        N = ids.numel()
        if length > N:
            raise ValueError(f"length={length} is longer than the {split} split ({N} tokens)")
        span = N - length + 1  # number of distinct starts
        if n > span:
            raise ValueError(
                f"n={n} windows of length={length} need n distinct starts, but the {split} split "
                f"({N} tokens) has only {span}"
            )
        g = torch.Generator().manual_seed(seed)
        stride = span / n
        u = torch.rand((), generator=g, dtype=torch.float64).item() * stride
        starts = torch.tensor([min(math.floor(u + i * stride), span - 1) for i in range(n)], dtype=torch.int64)
        return ids[starts[:, None] + torch.arange(length)]  # [n, 1] + [length] -> [n, length]


def _source(data) -> str:
    return "tinyshakespeare" if data is None else str(data)


def _check_resume(tok: Tokenizer, requested, kind: str, vocab_size, run_path: Path, meta: dict) -> None:
    """The saved tokenizer must be the one this run asks for, on the same corpus."""
    where = run_path / TOKENIZER_FILE
    if isinstance(requested, Tokenizer):
        if requested.fingerprint() != tok.fingerprint():
            raise ValueError(
                f"tokenizer differs from the one saved in {where}: fingerprint {requested.fingerprint()[:12]} "
                f"vs saved {tok.fingerprint()[:12]} ({tok!r})"
            )
    else:
        if tok.kind != kind:
            raise ValueError(
                f"tokenizer={kind!r} differs from the one saved in {where}: kind={tok.kind!r} "
                f"(vocab_size={tok.vocab_size}); resume with tokenizer={tok.kind!r} or use a new run_dir"
            )
        if kind == "bpe" and vocab_size != tok.requested_vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} differs from the tokenizer saved in {where}: vocab_size="
                f"{tok.requested_vocab_size}; resume with vocab_size={tok.requested_vocab_size} or use a new run_dir"
            )
    meta_path = run_path / DATA_META_FILE
    if meta_path.exists():
        try:
            saved = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"run_dir={str(run_path)!r}: {meta_path} is not valid JSON ({err})") from None
        if saved.get("corpus_sha256") not in (None, meta["corpus_sha256"]):
            raise ValueError(
                f"data={meta['data']!r} ({meta['corpus_chars']:,} chars, sha256 {meta['corpus_sha256'][:12]}) differs "
                f"from the corpus the tokenizer in {where} was made for: data={saved.get('data')!r} "
                f"({saved.get('corpus_chars')} chars, sha256 {str(saved.get('corpus_sha256'))[:12]})"
            )
        if saved.get("val_fraction") not in (None, meta["val_fraction"]):
            raise ValueError(
                f"val_fraction={meta['val_fraction']} differs from the run in {run_path}: "
                f"val_fraction={saved.get('val_fraction')}"
            )
