"""Train a smart-home intent classifier: all-MiniLM-L6-v2 + a classification head.

The data are English commands sampled (seeded) from the `home-assistant-intents` templates,
42 intents, split by a hash of the text so train, validation and test share no utterance.
Some intents have only a handful of distinct phrasings ("nevermind", "what time is it"), so
the classes are heavily imbalanced: the loss weights each class by the inverse square root
of its frequency, and the script reports macro-F1 next to accuracy.

    python samples/train_intents.py --output build/intent-model
    python -m exporter --model build/intent-model --task text-classification \\
        --target arm-cpu --eval build/intent-model/test.jsonl

Writes an ordinary Hugging Face directory (AutoModelForSequenceClassification with id2label,
tokenizer files) plus train/validation/test .jsonl files ({"text", "label"}) beside it.
Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def written_by_training(path: Path) -> bool:
    """Whether directory `path` holds only what this script wrote (listed in training.json),
    so that training again may replace it; an empty directory qualifies too."""
    try:
        known = set(json.loads((path / "training.json").read_text(encoding="utf-8"))["files"])
    except FileNotFoundError:
        known = set()
    except (ValueError, KeyError, TypeError):
        return False
    found = (p for p in path.rglob("*") if p.is_symlink() or not p.is_dir())
    return all(p.relative_to(path).as_posix() in known | {"training.json"} for p in found)


NOT_TRAINED_HERE = "this script did not write (they are not listed in its training.json)"


def check_not_in_training_output(path: Path) -> None:
    """Raise FileExistsError where `path` lies inside an earlier output of this script:
    written there, it would be files that output's training.json does not list, and training
    again could not replace that output (nor could it be removed as an old one without
    removing this one)."""
    for parent in path.resolve().parents:
        if (parent / "training.json").is_file() and written_by_training(parent):
            raise FileExistsError(f"Output {str(path)!r} lies inside {str(parent)!r}, an "
                                  f"earlier output of this script, which would then hold files "
                                  f"its training.json does not list (and training again could "
                                  f"not replace it). Choose an --output outside it, e.g. beside "
                                  f"it.")


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for u in rows:
            f.write(json.dumps({"text": u.text, "label": u.intent}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for the trained model")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=800,
                        help="test utterances (validation gets half as many)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-layers", type=int, metavar="N",
                        help="keep the embeddings and the first N encoder layers as the "
                             "checkpoint has them and train only the layers above: with 2 of "
                             "MiniLM's 6, training takes about half the time (the README has "
                             "the accuracy measured); default: train every layer")
    args = parser.parse_args(argv)
    for name, least in (("train_size", 1), ("test_size", 2), ("batch_size", 1), ("seed", 0),
                        ("freeze_layers", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"argument --{name.replace('_', '-')}: must be at least {least}, "
                         f"got {getattr(args, name)}")
    if args.seed >= 2**63:   # torch.manual_seed's limit
        parser.error(f"argument --seed: must be below 2**63, got {args.seed}")
    for name in ("epochs", "lr"):
        if not 0 < getattr(args, name) < float("inf"):
            parser.error(f"argument --{name}: must be a finite number above 0, "
                         f"got {getattr(args, name)}")
    if int(args.epochs * args.train_size / args.batch_size) < 1:
        parser.error(f"--epochs {args.epochs:g} of {args.train_size} utterances in batches of "
                     f"{args.batch_size} is not one training step; train longer.")

    from exporter.report import (
        check_not_in_bundle,
        check_replaceable,
        remove_leftovers,
        replace_dir,
        temp_dir_beside,
    )

    out = Path(args.output)
    try:   # before minutes of training, not after
        check_replaceable(out, ours=written_by_training, why=NOT_TRAINED_HERE)
        check_not_in_bundle(out)   # an exported bundle's manifest would not list the model
        check_not_in_training_output(out)   # nor an earlier model's training.json
        shutil.rmtree(temp_dir_beside(out))   # where the model will be staged can be written
    except OSError as e:   # FileExistsError, PermissionError, a parent that is a file ...
        parser.error(str(e))
    remove_leftovers(out)   # what a killed run left beside it

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from exporter.data import smart_home_utterances
    from exporter.load import resolve_model_dir
    from exporter.validate import macro_f1

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    train = smart_home_utterances(args.train_size, split="train", seed=args.seed)
    validation = smart_home_utterances(args.test_size // 2, split="calibration", seed=args.seed)
    test = smart_home_utterances(args.test_size, split="test", seed=args.seed)
    labels = sorted({u.intent for u in train})
    index = {name: i for i, name in enumerate(labels)}
    # A validation/test utterance of an intent never seen in training cannot be scored fairly.
    validation = [u for u in validation if u.intent in index]
    test = [u for u in test if u.intent in index]
    if len(labels) < 2 or not test:
        parser.error(f"--train-size {args.train_size} gives {len(labels)} intent(s) and "
                     f"{len(test)} test utterances of them; a classifier needs at least 2 "
                     f"intents to tell apart and a test set (try --train-size 200 or more)")
    if not validation:   # its accuracy would be NaN (the mean of nothing) in training.json
        parser.error(f"--test-size {args.test_size} gives {len(validation)} validation "
                     f"utterances of the {len(labels)} intents trained (of the "
                     f"{args.test_size // 2} drawn, half of --test-size, it keeps those of "
                     f"intents seen in training); at least 1 is needed (try --test-size 20 or "
                     f"more)")
    counts = Counter(u.intent for u in train)
    print(f"{len(train)} train / {len(validation)} validation / {len(test)} test utterances, "
          f"{len(labels)} intents; rarest in train: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()[-4:]), file=sys.stderr)

    source = resolve_model_dir("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index)

    if args.freeze_layers is not None:   # no gradients for them: fewer to compute
        layers = model.base_model.encoder.layer
        if args.freeze_layers > len(layers):
            parser.error(f"argument --freeze-layers: the model has {len(layers)} encoder "
                         f"layers, got {args.freeze_layers}")
        for module in (model.base_model.embeddings, *layers[:args.freeze_layers]):
            module.requires_grad_(False)

    def batch(rows):
        enc = tokenizer([u.text for u in rows], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        return enc, torch.tensor([index[u.intent] for u in rows])

    def predict(rows) -> list[int]:
        model.eval()
        out_ids = []
        with torch.no_grad():
            for start in range(0, len(rows), 128):
                enc, _ = batch(rows[start:start + 128])
                out_ids += model(**enc).logits.argmax(-1).tolist()
        model.train()
        return out_ids

    # Inverse square-root frequency: rare intents count more without drowning the rest.
    weights = torch.tensor([1.0 / np.sqrt(counts[name]) for name in labels], dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights / weights.mean())
    steps = int(args.epochs * len(train) / args.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    started = time.time()
    order: list = []
    for step in range(1, steps + 1):
        if not order:
            order = random.sample(train, len(train))
        rows, order = order[:args.batch_size], order[args.batch_size:]
        enc, target = batch(rows)
        loss = loss_fn(model(**enc).logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == steps:
            print(f"  step {step}/{steps}  loss {loss.item():.3f}  "
                  f"{time.time() - started:.0f} s", file=sys.stderr, flush=True)

    results = {}
    for name, rows in (("validation", validation), ("test", test)):
        truth = [index[u.intent] for u in rows]
        predicted = predict(rows)
        results[name] = {
            "accuracy": float(np.mean(np.array(truth) == np.array(predicted))),
            "macro_f1": macro_f1(truth, predicted, len(labels)),
            "utterances": len(rows),
        }
    staging = temp_dir_beside(out)   # written whole, then renamed into place
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, rows in (("train", train), ("validation", validation), ("test", test)):
            write_jsonl(staging / f"{name}.jsonl", rows)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                       if p.is_file())
        (staging / "training.json").write_text(json.dumps(
            {"labels": labels, "train_counts": dict(counts), "results": results,
             "args": vars(args), "seconds": round(time.time() - started, 1), "files": files},
            indent=2) + "\n")
        replace_dir(staging, out, ours=written_by_training, why=NOT_TRAINED_HERE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t, v = results["test"], results["validation"]
    print(f"test accuracy {100 * t['accuracy']:.2f}%, macro-F1 {100 * t['macro_f1']:.2f} "
          f"on {t['utterances']} utterances (validation accuracy {100 * v['accuracy']:.2f}%); "
          f"model in {out}/")
    return 0


def _stop(signum, frame):
    raise SystemExit(128 + signum)   # unwinds through the staging directory's cleanup


if __name__ == "__main__":
    # A CI timeout or `docker stop` sends SIGTERM, a closed terminal SIGHUP: by default they end
    # the process on the spot and leave a half-written staging directory beside the output.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop)
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # the model is written whole at the end (renamed into place)
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
