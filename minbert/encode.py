"""Encode sentences with a BERT checkpoint and print their cosine similarities.

    python -m minbert.encode                                   # built-in example sentences
    python -m minbert.encode "A man plays guitar." "Someone is playing an instrument."
    python -m minbert.encode --checkpoint path/to/bert-base-uncased --pooling cls ...
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import kernels

from .model import BertModel
from .tokenizer import Tokenizer

EXAMPLES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "Shares dropped steeply on Wall Street.",
]


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, H) -> (B, H): the [CLS] vector, or the mean over real tokens."""
    if how == "cls":
        return last_hidden_state[:, 0]
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, L, 1)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def encode(model: BertModel, tokenizer: Tokenizer, sentences: list[str], pooling: str = "mean",
           batch_size: int = 64) -> torch.Tensor:
    """(N, hidden) sentence embeddings, in batches, with the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i:i + batch_size]).to(device)
        h = model(batch.input_ids, batch.attention_mask, batch.token_type_ids).last_hidden_state
        out.append(pool(h, batch.attention_mask, pooling).float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sentences", nargs="*", help="sentences to compare (default: built-in examples)")
    ap.add_argument("--checkpoint", default=None,
                    help="HF-format BERT directory (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    ap.add_argument("--backend", choices=kernels.BACKENDS, default=None,
                    help="kernels backend (default: $MINBERT_KERNELS, else triton on CUDA, eager elsewhere)")
    args = ap.parse_args(argv)
    sentences = args.sentences or EXAMPLES
    if len(sentences) < 2:
        ap.error("give at least two sentences to compare")
    if args.backend:
        kernels.set_backend(args.backend)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BertModel.from_pretrained(args.checkpoint, device=device)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    emb = F.normalize(encode(model, tokenizer, sentences, args.pooling), dim=-1)
    sim = emb @ emb.T  # (N, N) cosine similarities

    print(f"checkpoint: {args.checkpoint or 'embedded all-MiniLM-L6-v2'} | pooling: {args.pooling} | "
          f"kernels: {kernels.get_backend()} | device: {device}")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s}")
    print("cosine similarity:")
    print("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i in range(len(sentences)):
        print(f"  [{i}] " + "".join(f"{sim[i, j].item():8.3f}" for j in range(len(sentences))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
