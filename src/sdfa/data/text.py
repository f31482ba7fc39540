"""Plain text for language modelling: UTF-8 files -> token ids -> windows of ``seq_len`` tokens.

The corpus is one stream of tokens cut into three contiguous parts (90 % train, 5 % validation,
5 % test, in that order), so no test text is seen in training, not even as overlap. A sample is
``seq_len`` tokens and, as its targets, the same window shifted by one token; windows do not
overlap. Tokens are characters (the vocabulary: every character of the corpus, sorted), UTF-8
bytes (256 ids) or a byte-level BPE trained on the training part with the ``tokenizers`` library
(nothing is downloaded).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .core import DataError

SPLITS = (0.9, 0.05, 0.05)  # train, validation, test: contiguous, in this order
TOKENIZERS = ("char", "byte", "bpe")
DEFAULT_BPE_VOCAB = 1000


class TokenWindows(Dataset):
    """Non-overlapping windows of a token stream: sample i is (x, y), y = x shifted by one."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self):
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def __getitem__(self, index):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices):
        starts = torch.as_tensor(indices, dtype=torch.long)[:, None] * self.seq_len
        at = starts + torch.arange(self.seq_len + 1)
        windows = self.tokens[at]
        return windows[:, :-1], windows[:, 1:]

    def head(self, n: int | None) -> TokenWindows:
        """The first ``n`` windows."""
        if n is None or n >= len(self):
            return self
        return TokenWindows(self.tokens[: n * self.seq_len + 1], self.seq_len)


@dataclass
class TextData:
    """A tokenised corpus: three splits of windows and what a model needs to know of them."""

    name: str
    train: TokenWindows
    val: TokenWindows
    test: TokenWindows
    num_classes: int  # the vocabulary size
    input_shape: tuple[int]  # (seq_len,)
    tokenizer: str
    vocabulary: tuple[str, ...] = ()  # char: the characters, in id order
    task: str = "language-model"
    augment: bool = False
    input_dtype: torch.dtype = torch.long

    def decode(self, ids) -> str:
        """Token ids back to text (char and byte tokenizers)."""
        ids = [int(i) for i in ids]
        if self.tokenizer == "char":
            return "".join(self.vocabulary[i] for i in ids)
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        raise ValueError("decode() knows the char and byte tokenizers only")


def text_files(source: str | Path) -> list[Path]:
    """The files of a corpus: one file, every ``*.txt`` of a folder, or a glob pattern."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.glob("*.txt"))
    else:
        found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    if not found:
        raise DataError(
            f"{source}: no text found (give a UTF-8 .txt file, a folder of .txt files, or a "
            "pattern such as 'texts/*_gut.txt')"
        )
    return found


def read_corpus(source: str | Path) -> str:
    parts = []
    for file in text_files(source):
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(
                f"{file}: not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
    return "\n".join(parts)


def parse_tokenizer(spec: str) -> tuple[str, int | None]:
    """``"char"``, ``"byte"``, ``"bpe"`` or ``"bpe:N"`` (N: the BPE vocabulary size)."""
    name, _, size = spec.partition(":")
    if name not in TOKENIZERS or (size and name != "bpe"):
        raise ValueError(f"tokenizer must be char, byte, bpe or bpe:N; got {spec!r}")
    if name != "bpe":
        return name, None
    if size and not (size.isdigit() and int(size) >= 260):
        raise ValueError(
            f"tokenizer bpe:N needs an integer N >= 260 (256 bytes + merges); got {spec!r}"
        )
    return name, int(size) if size else DEFAULT_BPE_VOCAB


def load_text(
    source: str | Path,
    *,
    seq_len: int = 128,
    tokenizer: str = "char",
    train_samples: int | None = None,
    test_samples: int | None = None,
    name: str = "text",
) -> TextData:
    """Read, tokenise and split a corpus (see the module docstring).

    Raises:
        DataError: no files, a file that is not UTF-8, or a corpus too small for one test window.
        ValueError: a bad ``tokenizer`` or ``seq_len``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer; got {seq_len!r}")
    kind, vocab_size = parse_tokenizer(tokenizer)
    text = read_corpus(source)
    cut = [int(len(text) * sum(SPLITS[:i])) for i in (1, 2)]
    parts = text[: cut[0]], text[cut[0] : cut[1]], text[cut[1] :]
    vocabulary: tuple[str, ...] = ()
    if kind == "char":
        vocabulary = tuple(sorted(set(text)))
        index = {c: i for i, c in enumerate(vocabulary)}
        ids = [torch.tensor([index[c] for c in p], dtype=torch.long) for p in parts]
        size = len(vocabulary)
    elif kind == "byte":
        ids = [torch.tensor(list(p.encode("utf-8")), dtype=torch.long) for p in parts]
        size = 256
    else:
        encode, size = _train_bpe(parts[0], vocab_size)
        ids = [torch.tensor(encode(p), dtype=torch.long) for p in parts]
    train, val, test = (TokenWindows(t, seq_len) for t in ids)
    if len(test) == 0 or len(train) == 0:
        raise DataError(
            f"{source}: the corpus is too small for seq_len={seq_len}: its test part (the last "
            f"5 %) holds {len(ids[2])} tokens, fewer than seq_len + 1"
        )
    return TextData(
        name, train.head(train_samples), val, test.head(test_samples), size, (seq_len,),
        tokenizer, vocabulary,
    )


def _train_bpe(text: str, vocab_size: int):
    """A byte-level BPE trained on ``text`` (the training part) with Hugging Face tokenizers."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ValueError(
            "tokenizer bpe needs the tokenizers library: pip install 'sdfa[text]'"
        ) from None
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    bpe.train_from_iterator([lines[i : i + 1000] for i in range(0, len(lines), 1000)], trainer)
    return (lambda s: bpe.encode(s).ids), bpe.get_vocab_size()
