"""What stages 3 and 4 share: records in, adapter and comparison out.

`fit_and_compare` builds the examples, trains on all but the held-out ones, scores the held-out
answers, and writes the stage's data.jsonl, loss.jsonl, adapter/ and comparison.jsonl; with fewer
than `min_examples` it fails the stage (`Stage.fail`) instead. Which records to train on
(self-aligned answers, identity conversations, a teacher's) is the stage's choice, not this module's.
"""

from __future__ import annotations

from collections import Counter

from ..chat_format import ChatFormat
from ..models import LoadedModel
from .adapters import apply_adapter, remove_adapter
from .compare import compare_on
from .examples import build_examples
from .lora import train_lora
from .settings import process_state, train_settings


def fit_and_compare(stage, loaded: LoadedModel, records: list[dict], chat: ChatFormat, config,
                    holdout_ids: set[str], data_info: dict, forbidden: tuple[str, ...] = ()) -> dict:
    """Turn records (id, prompt, answer) into examples, train on all but the held-out ones, then
    score the held-out answers under the base model and the adapted one. Writes the stage's
    data.jsonl (one line per record: its split or why it was dropped), loss.jsonl, adapter/ and
    comparison.jsonl. Returns the counts for the manifest."""
    from ..records import SCHEMAS, JsonlWriter, StageFailed, drop_reasons, shortfall

    # Two writers on one stage, or a file edited by hand, can repeat an id; trained on, that answer
    # would weigh double, and `by_id` below would silently keep only one of its texts.
    repeated = sorted(key for key, n in Counter(r["id"] for r in records).items() if n > 1)
    if repeated:
        shown = ", ".join(repeated[:10]) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        raise ValueError(f"the training records repeat the ids {shown}: each id must appear once. The file "
                         f"they came from ({data_info.get('data') or stage.path}) is damaged (two processes "
                         "writing one stage?); rerun the stage that wrote it with --restart (its old files are kept "
                         "in <stage>.previous/)")
    state = process_state()
    settings = train_settings(config)
    examples, drops = build_examples(records, loaded, chat, settings.cutoff, settings.overlong, forbidden)
    train = [e for e in examples if e.id not in holdout_ids]
    held = [e for e in examples if e.id in holdout_ids]
    by_id = {r["id"]: r for r in records}
    identity = {r["id"] for r in records if r.get("source") == "identity"}
    answers = [e for e in train if e.id not in identity]  # identity conversations alone engrave nothing
    if len(answers) < config.min_examples:
        # After the stage started: its manifest must say why it stopped, not stay "running".
        reasons = drop_reasons(drops)
        reason = shortfall(f"kept {len(answers)} training examples of {len(records) - len(identity)} records "
                           f"({len(held)} held out), fewer than min_examples={config.min_examples}", reasons)
        reason += ". Give the previous stage more prompts (its limit), or lower min_examples"
        counts = {"records": len(records), "dropped": len(drops), "drop_reasons": reasons, "train": len(train),
                  "holdout": len(held), "identity": len(train) - len(answers)}
        if state.is_main_process:
            raise stage.fail(reason, counts)
        raise StageFailed(stage.name, reason)
    if state.is_main_process:
        with JsonlWriter(stage.path / "data.jsonl", SCHEMAS["sft_example/1"]) as data:
            for e in examples:
                record = by_id[e.id]
                data.write({"id": e.id, "prompt": record["prompt"], "answer": record["answer"],
                            "source": record.get("source", "self_align"), "ended": record.get("ended", True),
                            "split": "holdout" if e.id in holdout_ids else "train", "tokens": len(e.input_ids),
                            "answer_tokens": e.answer_tokens, "target_apart": e.target_apart})
            for d in drops:
                record = by_id[d["id"]]
                data.write({"id": d["id"], "prompt": record["prompt"], "answer": record["answer"],
                            "source": record.get("source", "self_align"), "split": "dropped", "reason": d["reason"]})
    # The adapter's model card (written by train_lora) reports these next to the examples trained on.
    data_info = {**data_info, "holdout_examples": len(held), "dropped_records": len(drops),
                 "identity_examples": sum(e.id in identity for e in train)}
    summary = train_lora(loaded, train, settings, stage.path, seed=config.seed, data_info=data_info)
    counts = {"records": len(records), "dropped": len(drops), "train": len(train), "holdout": len(held),
              "identity": sum(e.id in identity for e in train),
              "unended": sum(not by_id[e.id].get("ended", True) for e in train),
              # answers tokenized after their context, not with it: a token spans the boundary (examples.py)
              "target_apart": sum(e.target_apart for e in examples), **summary}
    if state.is_main_process:
        losses = [row["loss"] for row in stage.read("loss.jsonl")]
        # Single steps are noisy at a few examples a batch: compare whole epochs.
        per_epoch = max(1, len(losses) // settings.epochs)
        counts.update(first_epoch_loss=round(sum(losses[:per_epoch]) / per_epoch, 4),
                      last_epoch_loss=round(sum(losses[-per_epoch:]) / per_epoch, 4))
        if held:
            adapted = apply_adapter(loaded, stage.adapter)
            try:
                rows = compare_on(adapted, held)
            finally:
                remove_adapter(adapted)
            with JsonlWriter(stage.path / "comparison.jsonl", SCHEMAS["comparison/1"]) as out:
                out.write_all(rows)
            counts.update(holdout_base_logprob=round(sum(r["base_logprob"] for r in rows) / len(rows), 4),
                          holdout_adapted_logprob=round(sum(r["adapted_logprob"] for r in rows) / len(rows), 4),
                          holdout_improved=sum(r["adapted_logprob"] > r["base_logprob"] for r in rows))
    state.wait_for_everyone()
    return counts
