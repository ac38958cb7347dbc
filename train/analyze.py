"""Look inside a model: what each layer knows, and where the trained model goes wrong.

    python -m train.analyze layers [--checkpoint DIR] --data DIR --out DIR [--tasks sst,quora,sts]
                                   [--epochs N] [--max-train N] [--max-eval N]
    python -m train.analyze errors --checkpoint DIR --data DIR --out DIR [--max-eval N] [--top K]

``layers``: layer utility. The encoder is frozen; every layer's pooled output (embeddings, 1..L)
is computed once per example and cached, then one probe per layer and task is trained on it: the
task's own head type (a linear layer on the pooled vector, on ``[u, v, |u-v|, u*v]`` for a
bi-encoder, on the cosine for a cosine head; SST and Quora with cross-entropy, STS with MSE, as in
training) on a seeded subset of the training file, scored on a seeded subset of dev. Works on an
export of this system (its heads' forms and pooling are used) and on any HF BERT directory (the
embedded checkpoint by default; pairs as cross-encoders, mean pooling). Writes ``layers.json``
and ``layers.png``. "cls" pooling probes the layer's [CLS] vector: BERT's pooler belongs to the
last layer only.

``errors``: an export on dev. SST 5x5 and Quora 2x2 confusion matrices (counts and row-normalised),
the STS predicted-vs-gold scatter, per-class precision / recall / F1, and ``errors.md`` with the
most confidently wrong examples per task. Writes ``errors.json`` beside the PNGs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minbert.heads import NUM_SENTIMENT_CLASSES, HeadSpec, MultitaskBert, MultitaskSpec, mean_pool

from .data import MULTITASK_TASKS, load_task
from .figures import AnalysisError, pyplot, run_cli, save_figure, write_json
from .tasks import _length, decide_scores, encode_batch, metric, sharded_map

METRIC_NAMES = {"sst": "accuracy", "quora": "accuracy", "sts": "pearson"}
TASK_LABELS = {"sst": "SST accuracy", "quora": "Quora accuracy", "sts": "STS Pearson"}
CLASS_NAMES = {"sst": ["negative", "somewhat neg.", "neutral", "somewhat pos.", "positive"],
               "quora": ["not paraphrase", "paraphrase"]}
DEFAULT_MAX_LENGTH = 64  # tokens per sequence when the checkpoint does not say (the CPU configs' value)


# ----------------------------------------------------------------------------- shared
def subset(examples: list, limit: int | None, seed: int, tag: str) -> list:
    """A seeded random ``limit`` of ``examples`` in file order (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = sorted(random.Random(f"{seed}/{tag}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _check_dir(path: Path | None, what: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise AnalysisError(f"{what} {str(path)!r} does not exist (or is not a directory)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in MULTITASK_TASKS]
    if unknown or not tasks:
        raise AnalysisError(f"--tasks: unknown task(s) {unknown or text!r}; choose from "
                            f"{', '.join(MULTITASK_TASKS)}")
    return tasks


# ----------------------------------------------------------------------------- layers
def load_encoder(checkpoint: str | Path | None):
    """(BertModel, Tokenizer, MultitaskSpec or None, train config dict, resolved directory): an
    export or a run directory holding ``best/`` brings its heads' spec and training lengths; a
    plain HF BERT directory (None: the embedded checkpoint) brings neither."""
    from minbert.checkpoint import default_checkpoint_dir
    from minbert.model import BertModel
    from minbert.tokenizer import Tokenizer

    _check_dir(checkpoint, "checkpoint")
    path = default_checkpoint_dir() if checkpoint is None else Path(checkpoint)
    if (path / "best" / "multitask.json").is_file():
        path = path / "best"
    spec, train_config = None, {}
    if (path / "multitask.json").is_file():
        meta = json.loads((path / "multitask.json").read_text())
        spec = MultitaskSpec.from_dict(meta["spec"])
        train_config = meta.get("train_config", {})
    bert = BertModel.from_pretrained(path).eval()
    return bert, Tokenizer.from_pretrained(path), spec, train_config, path


@torch.no_grad()
def layer_features(bert, tokenizer, task: str, examples: list, hs: HeadSpec, max_length: int,
                   batch_size: int, device: torch.device, progress=None) -> torch.Tensor:
    """(N, L + 1, F) probe inputs of every layer (embeddings first), one encoder pass per example:
    the pooled vector (F = H), ``[u, v, |u-v|, u*v]`` (bi-encoder concat, F = 4H), or cos(u, v)
    (bi-encoder cosine, F = 1)."""
    def pooled(input_ids, attention_mask, token_type_ids) -> torch.Tensor:  # (B, L + 1, H)
        states = bert(input_ids, attention_mask, token_type_ids, output_hidden_states=True).hidden_states
        if hs.pooling == "cls":
            return torch.stack([h[:, 0] for h in states], 1).float()
        return torch.stack([mean_pool(h, attention_mask) for h in states], 1).float()

    def run(batch: list) -> torch.Tensor:
        kwargs, _, _ = encode_batch(tokenizer, task, batch, hs.form, max_length, device)
        u = pooled(kwargs["input_ids"], kwargs["attention_mask"], kwargs["token_type_ids"])
        if task == "sst" or hs.form == "cross":
            return u.cpu()
        v = pooled(kwargs["input_ids_b"], kwargs["attention_mask_b"], kwargs["token_type_ids_b"])
        if hs.head == "concat":
            return torch.cat([u, v, (u - v).abs(), u * v], -1).cpu()
        return F.cosine_similarity(u, v, dim=-1).unsqueeze(-1).cpu()

    return sharded_map(run, examples, batch_size, _length, progress)


def train_probe(task: str, hs: HeadSpec, x_train: torch.Tensor, y_train: torch.Tensor,
                x_eval: torch.Tensor, epochs: int, lr: float, weight_decay: float, batch_size: int,
                seed: int) -> torch.Tensor:
    """Fit the task's head type on (N, F) features; returns its decided predictions on ``x_eval``.

    Features are standardised with the training set's statistics (the embedding layer's scale
    is far from the top layers'); the loss is the training loss (``MultitaskBert.loss``). A
    bi-encoder STS cosine head has no parameters: the cosine mapped to [0, 5] is the prediction.
    """
    if task == "sts" and hs.form == "bi" and hs.head == "cosine":
        return MultitaskBert.decide(task, (x_eval[:, 0] + 1.0) * 2.5)
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_eval = (x_train - mu) / sd, (x_eval - mu) / sd
    g = torch.Generator().manual_seed(seed)
    out = NUM_SENTIMENT_CLASSES if task == "sst" else 1
    probe = torch.nn.Linear(x_train.shape[1], out)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=g)
        probe.bias.zero_()
        if task == "sts":
            probe.bias.fill_(float(y_train.mean()))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            pred = probe(x_train[idx])
            loss = MultitaskBert.loss(task, pred if task == "sst" else pred.squeeze(-1), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = probe(x_eval)
        return MultitaskBert.decide(task, pred if task == "sst" else pred.squeeze(-1)).float()


def probe_spec(task: str, spec: MultitaskSpec | None) -> HeadSpec:
    """The export's head for ``task``, or for a plain encoder: cross-encoder pairs, mean pooling
    (an encoder without heads has no trained pooler, and the embedding layer's [CLS] vector is
    the same for every input)."""
    if spec is not None:
        if task not in spec.tasks:
            raise AnalysisError(f"the checkpoint has no {task!r} head (heads: {', '.join(spec.tasks)}); "
                                "leave it out of --tasks")
        return spec.tasks[task]
    return HeadSpec(form="cross", pooling="mean")


def layers(checkpoint, data_dir: Path, out_dir: Path, tasks: list[str], epochs: int = 20,
           max_train: int | None = 2000, max_eval: int | None = 500, max_length: int | None = None,
           batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0,
           progress: bool = True) -> dict:
    """Layer utility (see the module docstring); writes ``layers.json`` and ``layers.png``."""
    from tqdm import tqdm

    _check_dir(data_dir, "data directory")
    bert, tokenizer, spec, train_config, path = load_encoder(checkpoint)
    device = _device()
    bert = bert.to(device)
    n_layers = bert.config.num_hidden_layers
    data = {}
    for task in tasks:
        train = subset(load_task(task, "train", data_dir, warn=False).examples, max_train, seed, f"{task}/train")
        dev = subset(load_task(task, "dev", data_dir, warn=False).examples, max_eval, seed, f"{task}/dev")
        data[task] = (train, dev)
    bar = tqdm(total=sum(len(a) + len(b) for a, b in data.values()), desc="layers: encode",
               disable=not progress, dynamic_ncols=True)
    result = {"checkpoint": str(path), "kind": "export" if spec is not None else "encoder",
              "layers": ["embeddings"] + [str(i) for i in range(1, n_layers + 1)],
              "settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                           "batch_size": batch_size, "seed": seed, "max_train": max_train,
                           "max_eval": max_eval},
              "tasks": {}}
    features = {}
    for task, (train, dev) in data.items():
        hs = probe_spec(task, spec)
        length = max_length or train_config.get("tasks", {}).get(task, {}).get("max_length", DEFAULT_MAX_LENGTH)
        x = layer_features(bert, tokenizer, task, train + dev, hs, length, batch_size, device, bar)
        features[task] = (hs, length, x[:len(train)], x[len(train):])
    bar.close()

    bar = tqdm(total=len(tasks) * (n_layers + 1), desc="layers: probes", disable=not progress,
               dynamic_ncols=True)
    for task, (hs, length, x_train, x_dev) in features.items():
        train, dev = data[task]
        y_train = torch.tensor([e.label for e in train], dtype=torch.long if task == "sst" else torch.float32)
        gold = [e.label for e in dev]
        scores = []
        for layer in range(n_layers + 1):
            pred = train_probe(task, hs, x_train[:, layer], y_train, x_dev[:, layer], epochs, lr,
                               weight_decay, batch_size, seed * 1000 + layer)
            scores.append(metric(task, pred, gold))
            bar.update(1)
        best = max(range(len(scores)), key=scores.__getitem__)
        result["tasks"][task] = {
            "metric": METRIC_NAMES[task], "probe": {"form": hs.form, "pooling": hs.pooling, "head": hs.head,
                                                    "features": int(x_train.shape[-1])},
            "max_length": length, "train_examples": len(train), "eval_examples": len(dev),
            "scores": scores, "best_layer": result["layers"][best]}
    bar.close()

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = list(range(n_layers + 1))
    for task, r in result["tasks"].items():
        probe = r["probe"]
        kind = "sentence" if task == "sst" else probe["form"] + ("" if probe["form"] == "cross" else f" {probe['head']}")
        ax.plot(xs, r["scores"], marker="o",
                label=f"{TASK_LABELS[task]} ({kind}, {probe['pooling']} pooling; n={r['eval_examples']})")
    ax.set_xticks(xs, ["emb"] + [str(i) for i in range(1, n_layers + 1)])
    ax.set_xlabel("layer (frozen encoder)")
    ax.set_ylabel("dev score of the layer's probe")
    label = "the embedded checkpoint" if checkpoint is None else \
        (path.parent.name if path.name == "best" else path.name)
    result["title"] = f"Layer utility of {label}: frozen encoder, one linear probe per layer"
    ax.set_title(result["title"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out_dir = Path(out_dir)
    result["figure"] = save_figure(fig, out_dir / "layers.png").name
    write_json(out_dir / "layers.json", result)
    return result


# ----------------------------------------------------------------------------- errors
def per_class(confusion: torch.Tensor) -> list[dict]:
    """Precision, recall, F1 and support per class of a (gold x predicted) count matrix."""
    rows = []
    for c in range(confusion.shape[0]):
        tp = float(confusion[c, c])
        predicted, support = float(confusion[:, c].sum()), float(confusion[c].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        rows.append({"class": c, "precision": p, "recall": r,
                     "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(support)})
    return rows


def confusion_matrix(gold: torch.Tensor, predicted: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts, rows = gold class, columns = predicted class."""
    return torch.bincount(gold.long() * n + predicted.long(), minlength=n * n).reshape(n, n)


def _text(example) -> str:
    if hasattr(example, "sentence"):
        return example.sentence
    return f"{example.sentence1} ‖ {example.sentence2}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _plot_confusion(task: str, counts: torch.Tensor, normalised: torch.Tensor, title: str, path: Path) -> None:
    plt = pyplot()
    n = counts.shape[0]
    names = CLASS_NAMES[task]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.4) if n > 2 else (7.0, 3.4))
    for ax, matrix, sub, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                 (axes[1], normalised, "row-normalised (recall on the diagonal)", "{:.2f}")):
        ax.imshow(matrix.numpy(), cmap="Blues", vmin=0)
        for i in range(n):
            for j in range(n):
                v = float(matrix[i, j])
                hi = v > 0.6 * float(matrix.max()) if float(matrix.max()) > 0 else False
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="white" if hi else "black")
        ax.set_xticks(range(n), names, rotation=30 if n > 2 else 0, ha="right" if n > 2 else "center",
                      fontsize=8)
        left = ax is axes[0]
        ax.set_yticks(range(n), names if left else [""] * n, fontsize=8)
        ax.set_xlabel("predicted")
        if left:
            ax.set_ylabel("gold")
        ax.set_title(sub, fontsize=9)
    fig.suptitle(title)
    save_figure(fig, path)


def _plot_scatter(gold: list[float], predicted: list[float], title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(gold, predicted, s=6, alpha=0.4)
    ax.plot([0, 5], [0, 5], color="grey", lw=1, ls="--")
    ax.set_xlim(-0.2, 5.2)
    ax.set_ylim(-0.2, 5.2)
    ax.set_xlabel("gold similarity")
    ax.set_ylabel("predicted similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def errors(checkpoint, data_dir: Path, out_dir: Path, max_eval: int | None = None, top: int = 10,
           batch_size: int = 64, dtype: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Confusion matrices, STS scatter, per-class scores and the most confidently wrong dev
    examples of an export; writes ``errors.json``, ``errors.md`` and the PNGs."""
    from tqdm import tqdm

    from .predict import load_member, member_scores

    _check_dir(data_dir, "data directory")
    _check_dir(checkpoint, "checkpoint")
    if not (Path(checkpoint) / "multitask.json").is_file() and \
            not (Path(checkpoint) / "best" / "multitask.json").is_file():
        raise AnalysisError(f"{checkpoint} holds no multitask.json: `errors` needs a trained model with "
                            "heads; pass an export (runs/NAME/best) or a run directory")
    device = _device()
    member = load_member(checkpoint, device, dtype)
    out_dir = Path(out_dir)
    tasks = [t for t in MULTITASK_TASKS if t in member.model.spec.tasks]
    dev = {t: subset(load_task(t, "dev", data_dir, warn=False).examples, max_eval, seed, f"{t}/dev")
           for t in tasks}
    bar = tqdm(total=sum(len(v) for v in dev.values()), desc="errors: predict", disable=not progress,
               dynamic_ncols=True)
    result = {"checkpoint": member.name, "max_eval": max_eval, "tasks": {}}
    name = Path(member.name).name if Path(member.name).name != "best" else Path(member.name).parent.name
    md = [f"# Errors of `{member.name}` on dev", ""]
    for task in tasks:
        examples = dev[task]
        scores = member_scores(member, task, examples, batch_size, device, bar)
        predicted = decide_scores(task, scores)
        gold = torch.tensor([e.label for e in examples], dtype=torch.float64)
        r: dict = {"n": len(examples)}
        if task in ("sst", "quora"):
            n = NUM_SENTIMENT_CLASSES if task == "sst" else 2
            counts = confusion_matrix(gold, predicted, n)
            normalised = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
            probs = scores if task == "sst" else torch.stack([1 - scores, scores], -1)
            confidence = probs.gather(1, predicted.long().unsqueeze(1)).squeeze(1)
            wrong = (predicted != gold).nonzero().squeeze(1).tolist()
            wrong.sort(key=lambda i: -float(confidence[i]))
            r.update(accuracy=metric(task, predicted, gold.tolist()), classes=CLASS_NAMES[task],
                     confusion=counts.tolist(), confusion_normalised=normalised.tolist(),
                     per_class=per_class(counts))
            r["macro_f1"] = sum(c["f1"] for c in r["per_class"]) / n
            r["title"] = f"{name}: {task.upper() if task == 'sst' else 'Quora'} dev, accuracy " \
                         f"{r['accuracy']:.3f} (n={len(examples)})"
            r["figure"] = f"{task}_confusion.png"
            _plot_confusion(task, counts, normalised, r["title"], out_dir / r["figure"])
            r["most_confident_errors"] = [
                {"id": examples[i].id, "text": _text(examples[i]), "gold": int(gold[i]),
                 "predicted": int(predicted[i]), "confidence": float(confidence[i])} for i in wrong[:top]]
            md += [f"## {task.upper() if task == 'sst' else 'Quora'}: accuracy {r['accuracy']:.4f}, "
                   f"macro F1 {r['macro_f1']:.4f} (n={len(examples)})", "",
                   "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
            md += [f"| {c['class']} {CLASS_NAMES[task][c['class']]} | {c['precision']:.3f} | "
                   f"{c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |" for c in r["per_class"]]
            md += ["", f"Most confidently wrong ({len(wrong)} wrong in all):", "",
                   "| id | text | gold | predicted | confidence |", "| --- | --- | --- | --- | --- |"]
            md += [f"| {e['id']} | {_md(e['text'])} | {e['gold']} | {e['predicted']} | {e['confidence']:.3f} |"
                   for e in r["most_confident_errors"]]
        else:
            r["pearson"] = metric(task, predicted, gold.tolist())
            r["points"] = {"id": [e.id for e in examples], "gold": gold.tolist(), "predicted": predicted.tolist()}
            r["title"] = f"{name}: STS dev, Pearson {r['pearson']:.3f} (n={len(examples)})"
            r["figure"] = "sts_scatter.png"
            _plot_scatter(r["points"]["gold"], r["points"]["predicted"], r["title"], out_dir / r["figure"])
            err = (predicted.double() - gold).abs()
            worst = sorted(range(len(examples)), key=lambda i: -float(err[i]))[:top]
            r["largest_errors"] = [{"id": examples[i].id, "text": _text(examples[i]), "gold": float(gold[i]),
                                    "predicted": float(predicted[i])} for i in worst]
            md += [f"## STS: Pearson {r['pearson']:.4f} (n={len(examples)})", "",
                   "Largest errors |predicted - gold|:", "",
                   "| id | sentences | gold | predicted |", "| --- | --- | --- | --- |"]
            md += [f"| {e['id']} | {_md(e['text'])} | {e['gold']:.2f} | {e['predicted']:.2f} |"
                   for e in r["largest_errors"]]
        md.append("")
        result["tasks"][task] = r
    bar.close()
    write_json(out_dir / "errors.json", result)
    (out_dir / "errors.md").write_text("\n".join(md))
    return result


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default="data/", help="directory of the CS224N files (default: data/)")
    common.add_argument("--out", required=True, help="directory for the JSON, PNG and Markdown files")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--seed", type=int, default=0, help="seed of the example subsets and probes")
    common.add_argument("--no-progress", action="store_true")

    lay = sub.add_parser("layers", parents=[common], help="probe every layer of a frozen encoder")
    lay.add_argument("--checkpoint", default=None,
                     help="an HF BERT directory, an export or a run directory (default: the embedded checkpoint)")
    lay.add_argument("--tasks", default="sst,quora,sts", help="comma-separated (default: sst,quora,sts)")
    lay.add_argument("--epochs", type=int, default=20, help="probe training epochs (default: 20)")
    lay.add_argument("--max-train", type=int, default=2000,
                     help="training examples per task for the probes (default: 2000; 0 = all)")
    lay.add_argument("--max-eval", type=int, default=500,
                     help="dev examples per task (default: 500; 0 = all)")
    lay.add_argument("--max-length", type=int, default=None,
                     help=f"tokens per sequence (default: the export's training value, else {DEFAULT_MAX_LENGTH})")
    lay.add_argument("--lr", type=float, default=1e-3, help="probe learning rate (default: 1e-3)")

    err = sub.add_parser("errors", parents=[common], help="confusion matrices, STS scatter, hard cases")
    err.add_argument("--checkpoint", required=True, help="an export (runs/NAME/best) or a run directory")
    err.add_argument("--max-eval", type=int, default=0, help="dev examples per task (default: 0 = all)")
    err.add_argument("--top", type=int, default=10, help="wrong examples listed per task (default: 10)")
    err.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                     help="precision (default: bf16 if the model was trained in bf16, else fp32)")
    args = ap.parse_args(argv)

    for flag in ("max_train", "max_eval", "epochs"):
        if getattr(args, flag, 0) is not None and getattr(args, flag, 0) < 0:
            ap.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.command == "layers":
        r = layers(args.checkpoint, Path(args.data), Path(args.out), _parse_tasks(args.tasks), args.epochs,
                   args.max_train or None, args.max_eval or None, args.max_length, args.batch_size,
                   args.lr, seed=args.seed, progress=not args.no_progress)
        for task, t in r["tasks"].items():
            print(f"{task}: {t['metric']} per layer " + " ".join(f"{s:.3f}" for s in t["scores"])
                  + f" (best: layer {t['best_layer']})")
        print(f"wrote {Path(args.out) / 'layers.json'} and {Path(args.out) / 'layers.png'}")
    else:
        r = errors(args.checkpoint, Path(args.data), Path(args.out), args.max_eval or None, args.top,
                   args.batch_size, args.dtype, args.seed, progress=not args.no_progress)
        for task, t in r["tasks"].items():
            print(t["title"])
        print(f"wrote {Path(args.out) / 'errors.json'}, errors.md and the PNGs beside it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
