"""Calibration batches, quality against the original, and healing by distillation.

Healing is a short knowledge-distillation pass on CPU: the compressed model (student) learns
to reproduce a frozen copy of the original (teacher) on unlabelled calibration text, never the
evaluation text. The loss is logit matching (KL at temperature 2 for classifiers, 1 for
decoders; none for plain encoders) plus last-hidden-state matching (mean squared error over
real tokens, divided by the teacher's variance so it is scale-free). Embedding tables stay
frozen (they hold no pruned structure, and a decoder's table is also its LM head).

    >>> heal(job, student, teacher, steps=200, masks={})
    {'steps': 200, 'seconds': 41.2, 'loss_first': 0.61, 'loss_last': 0.05, ...}
"""

from __future__ import annotations

import math
import time

import numpy as np

# What each purpose of batches holds: purpose -> (texts or token windows, batch size).
#   score:   ranking layers, heads and neurons (calibration text)
#   measure: quality against the original (evaluation text, as the validate stage)
#   heal:    distillation (calibration text, a larger pool)
ENCODER_BATCHES: dict[str, tuple[int, int]] = {"score": (256, 32), "measure": (500, 64),
                                                "heal": (2000, 16)}
# Decoders: windows of DECODER_WINDOW tokens of English prose.
DECODER_BATCHES: dict[str, tuple[int, int]] = {"score": (16, 4), "measure": (8, 4),
                                                "heal": (400, 2)}
DECODER_WINDOW = 128

# AdamW learning rate per family; warm up over the first 10% of steps, then cosine decay.
LEARNING_RATE: dict[str, float] = {"bert": 1e-4, "llama": 5e-5}


def _encoder_texts(job, purpose: str) -> list:
    from .data import smart_home_utterances

    count = ENCODER_BATCHES[purpose][0]
    if purpose == "measure":
        return job.evaluation[:count]
    texts = list(job.calibration[:count])
    if len(texts) < count:   # default-domain extra calibration utterances (never eval/test)
        seen = {u.text for u in texts} | {u.text for u in job.evaluation}   # never heal on eval
        extra = smart_home_utterances(count, split="calibration", seed=11)
        texts += [u for u in extra if u.text not in seen][:count - len(texts)]
    return texts


def _decoder_windows(job, purpose: str) -> list[list[int]]:
    from .data import english_prose, split_of
    from .decoder import encode, token_windows

    count = DECODER_BATCHES[purpose][0]
    given = "eval" if purpose == "measure" else "calibration"
    if job.records.get(f"{given}_source"):   # the user's text (--eval measures, as validation)
        from .decoder import _user_windows

        texts = job.evaluation if purpose == "measure" else job.calibration
        return _user_windows(job, texts, given, DECODER_WINDOW)[:count]
    splits = {"score": ("calibration",), "heal": ("train", "calibration"),
              "measure": ("eval", "test")}[purpose]
    ids = encode(job, "\n\n".join(t for t in english_prose() if split_of(t) in splits))
    width = DECODER_WINDOW
    return token_windows(ids, width)[:count]


CALIBRATION_TEXT = "calibration text (never the evaluation text)"


def batches_data(job, batches: list[dict], *, purpose: str) -> str:
    """What `batches` (calibration_batches for `purpose`) hold, as the records say: an
    encoder's short calibration set is topped up with default smart-home utterances
    (_encoder_texts), and then says how many."""
    if job.task == "text-generation":
        return CALIBRATION_TEXT
    given = min(len(job.calibration), ENCODER_BATCHES[purpose][0])
    total = sum(len(b["input_ids"]) for b in batches)
    if total <= given:
        return CALIBRATION_TEXT
    return (f"{given} calibration texts and {total - given} default smart-home utterances "
            f"(never the evaluation text)")


def calibration_batches(job, *, purpose: str) -> list[dict]:
    """Model inputs (torch int64 tensors) for `purpose`, built as the runtime builds them."""
    import torch

    if job.task == "text-generation":
        windows = _decoder_windows(job, purpose)
        size = DECODER_BATCHES[purpose][1]
        return [{"input_ids": torch.tensor(windows[i:i + size]),
                 "attention_mask": torch.ones(len(windows[i:i + size]), DECODER_WINDOW,
                                              dtype=torch.long)}
                for i in range(0, len(windows), size)]
    from runtime.tokenizer import Tokenizer

    from .feeds import pad_batch

    tokenizer = Tokenizer.from_file(job.workdir / "tokenizer.json")
    texts = [u.text for u in _encoder_texts(job, purpose)]
    size = ENCODER_BATCHES[purpose][1]
    names = ["input_ids", "attention_mask", "token_type_ids"]
    batches = []
    for i in range(0, len(texts), size):
        ids = tokenizer.encode_batch(texts[i:i + size], max_length=job.max_length)
        batches.append({k: torch.from_numpy(v)
                        for k, v in pad_batch(ids, pad_id=tokenizer.pad_id,
                                              input_names=names).items()})
    return batches


def perplexity(logits: list, batches: list[dict]) -> float:
    """exp(mean next-token cross-entropy) of a decoder's logits per batch on its input_ids."""
    import torch

    total = count = 0.0   # per token: a short last batch weighs what its tokens do
    for x, b in zip(logits, batches, strict=True):
        targets = b["input_ids"][:, 1:].flatten()
        total += float(torch.nn.functional.cross_entropy(
            x[:, :-1].flatten(0, 1).double(), targets, reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)


def quality(job, model, original, batches: list[dict]) -> dict:
    """The compressed model against the original on `batches`.

    feature-extraction: cosine of sentence embeddings pooled as the bundle pools them
    (mean, min); classification:
    cosine of logits, top-1 agreement and, with labelled evaluation text, accuracy of both;
    decoders: perplexity of both and next-token agreement."""
    import torch

    from runtime.model import pool

    model.eval()
    ours, ref, masks = [], [], []
    with torch.no_grad():
        for batch in batches:
            a, b = model(**batch), original(**batch)
            if job.task == "feature-extraction":   # the bundle's own pooling, as validate
                mode = job.pooling.get("mode", "mean")
                mask = batch["attention_mask"].numpy()
                a, b = (torch.from_numpy(pool(x.last_hidden_state.numpy(), mask, mode=mode,
                                              normalize=False)) for x in (a, b))
            else:
                a, b = a.logits, b.logits
            ours.append(a)
            ref.append(b)
            masks.append(batch["attention_mask"])
    if job.task == "text-generation":
        out = {}
        for name, logits in (("perplexity", ours), ("original-perplexity", ref)):
            out[name] = round(perplexity(logits, batches), 4)
        agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).flatten()
                           for x, y in zip(ours, ref, strict=True)])
        out["next-token-agreement"] = round(float(agree.float().mean()), 4)
        return out
    a, b = torch.cat(ours), torch.cat(ref)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    out = {"cosine": round(float(cos.mean()), 5), "min-cosine": round(float(cos.min()), 5)}
    if job.task == "text-classification":
        out["agreement"] = round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 5)
        labels = [u.intent for u in _encoder_texts(job, "measure")]
        if labels and all(label in job.labels for label in labels):
            truth = torch.tensor([job.labels.index(label) for label in labels])
            out["accuracy"] = round(float((a.argmax(-1) == truth).float().mean()), 5)
            out["original-accuracy"] = round(float((b.argmax(-1) == truth).float().mean()), 5)
    return out


def _loss(job, student_out, teacher_out, mask):
    """Distillation loss: KL on logits (classifiers, decoders) + scale-free hidden MSE."""
    import torch.nn.functional as F

    m = mask[..., None].float()
    hs, ht = student_out.hidden_states[-1], teacher_out.hidden_states[-1]
    hidden = (((hs - ht) ** 2) * m).sum() / (m.sum() * hs.shape[-1]) / ht[mask.bool()].var()
    if job.task == "feature-extraction":
        return hidden
    t = 2.0 if job.task == "text-classification" else 1.0
    s_logits, t_logits = student_out.logits / t, teacher_out.logits / t
    if s_logits.dim() == 3:    # decoders: per real token
        s_logits, t_logits = s_logits[mask.bool()], t_logits[mask.bool()]
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                  reduction="batchmean") * t * t
    return kl + hidden


def heal(job, student, teacher, *, steps: int, masks: dict, batches: list | None = None) -> dict:
    """Distil `teacher` into `student` for `steps` AdamW steps on calibration text (or
    `batches`); sparsity `masks` ({weight: keep mask}) are re-applied after every step.
    Returns a record."""
    import torch

    data = CALIBRATION_TEXT
    if batches is None:
        batches = calibration_batches(job, purpose="heal")
        data = batches_data(job, batches, purpose="heal")
    params = [p for name, p in student.named_parameters() if "embed" not in name]
    for name, p in student.named_parameters():
        p.requires_grad_("embed" not in name)
    lr = LEARNING_RATE[student.config.model_type]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    student.eval()   # no dropout: the teacher is deterministic, so is the target
    started = time.perf_counter()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(**batch, output_hidden_states=True)
        loss = _loss(job, student(**batch, output_hidden_states=True), target,
                     batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for weight, mask in masks.items():
                weight.mul_(mask)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            job.log(f"  healing step {step + 1}/{steps}: loss {np.mean(losses[-10:]):.4f} "
                    f"({time.perf_counter() - started:.0f} s)")
    seconds = round(time.perf_counter() - started, 1)
    window = max(1, min(10, steps // 2))   # first and last steps apart: the loss's trend
    return {"steps": steps, "seconds": seconds, "learning_rate": lr,
            "batches": len(batches), "batch_size": int(batches[0]["input_ids"].shape[0]),
            "loss_first": round(float(np.mean(losses[:window])), 5),
            "loss_last": round(float(np.mean(losses[-window:])), 5),
            "data": data,
            "loss": "KL on logits + hidden-state MSE / teacher variance"
                    if job.task != "feature-extraction" else "hidden-state MSE / variance"}
