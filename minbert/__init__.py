"""minBERT: a BERT encoder on fused kernels that loads HF-format BERT checkpoints."""
from .checkpoint import default_checkpoint_dir
from .config import PRESETS, BertConfig
from .model import BertModel, BertOutput
from .tokenizer import Tokenizer

__all__ = ["BertConfig", "PRESETS", "BertModel", "BertOutput", "Tokenizer", "default_checkpoint_dir"]
