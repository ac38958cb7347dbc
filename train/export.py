"""What a finished stage leaves behind: model directories that other tools load.

- ``save_multitask`` / ``load_multitask``: the multitask model (``OUT/best``): the encoder as an
  HF BERT directory (``minbert`` and ``transformers`` load it), the tokenizer, the task heads in
  ``heads.safetensors`` and ``multitask.json`` (head spec, scores, step, training config).
- ``save_encoder``: an HF BERT directory with the tokenizer and extra files (the SimCSE stage's
  ``OUT/simcse``).
- ``fresh_temp_dir`` / ``swap_in``: every directory is built under ``<name>.tmp`` and renamed into
  place, so a crash leaves the old directory or the new one, never a half-written one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kernels._cli import UserError
from minbert.heads import MultitaskBert, MultitaskSpec
from minbert.lora import merge_lora
from minbert.model import BertModel
from minbert.tokenizer import Tokenizer

MULTITASK_META = "multitask.json"
HEADS = "heads.safetensors"
HEAD_PREFIXES = ("heads.", "head_layers.", "shared_pair.")  # MultitaskBert's own (the rest is bert.*)


class ExportError(UserError):
    """An exported directory is missing a file or holds one that does not load."""


def fresh_temp_dir(directory: str | Path) -> Path:
    """An empty ``<directory>.tmp`` to build ``directory`` in (see ``swap_in``)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, directory: str | Path) -> None:
    """Replace ``directory`` by the complete ``tmp`` (renames only: a crash leaves the old one or
    the new one, never a half-written one)."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save_encoder(state: dict[str, torch.Tensor], bert_config, tokenizer: Tokenizer, directory: Path,
                 files: dict[str, str] | None = None) -> Path:
    """Write the encoder ``state`` (``BertModel`` names) as an HF BERT directory with the
    tokenizer and ``files`` (name -> text), atomically."""
    tmp = fresh_temp_dir(directory)
    bert = BertModel(bert_config)
    bert.load_state_dict(state)
    bert.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    swap_in(tmp, directory)
    return Path(directory)


def save_multitask(state: dict, bert_config, spec: MultitaskSpec, tokenizer: Tokenizer,
                   directory: Path, extra: dict | None = None) -> None:
    """Write an exported multitask model (``state``: ``MultitaskBert`` names): the encoder as an
    HF BERT directory, the heads beside it, and ``multitask.json``."""
    from safetensors.torch import save_file

    tmp = fresh_temp_dir(directory)
    state = merge_lora(state)  # LoRA adapters folded in: the encoder is a plain BERT
    bert = BertModel(bert_config)
    bert.load_state_dict({k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")})
    bert.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith(HEAD_PREFIXES)},
              str(tmp / HEADS))
    meta = {"spec": spec.to_dict(), **(extra or {})}
    (tmp / MULTITASK_META).write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(tmp, directory)


def load_multitask(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MultitaskBert, dict]:
    """Load an exported model (see ``save_multitask``) for prediction. A missing or unreadable
    file is an ``ExportError`` that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory (expected an exported model such as "
                          "runs/NAME/best)")
    meta_file, heads_file = directory / MULTITASK_META, directory / HEADS
    for f in (meta_file, heads_file):
        if not f.is_file():
            raise ExportError(f"{directory} is not a complete exported multitask model: {f.name} is "
                              "missing (export it again, e.g. by resuming the run)")
    try:
        meta = json.loads(meta_file.read_text())
        spec = MultitaskSpec.from_dict(meta["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{meta_file}: not a valid multitask description ({type(e).__name__}: {e})") from None
    try:
        bert = BertModel.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:  # incomplete config.json, missing or wrong weights
        raise ExportError(f"{directory}: the encoder does not load: {e}") from None
    model = MultitaskBert(bert, spec)
    try:
        heads = load_file(str(heads_file))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{heads_file}: unreadable ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(heads, strict=False)
    except RuntimeError as e:  # shapes that do not match multitask.json's heads
        raise ExportError(f"{heads_file} does not match {MULTITASK_META}: {e}") from None
    missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise ExportError(f"{heads_file}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), meta
