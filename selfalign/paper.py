"""The paper's settings (SELF-ALIGN on LLaMA-65B, as IBM/Dromedary's scripts on branch dromedary_v1
ran it) beside ours: one table, the source of the README's difference table and of chapter 7's.

`PAPER` holds, per stage and setting, the paper's value, where it comes from, and why our default
differs where it does; `profiles/full.yaml` sets every one of them, and a test checks that the full
profile's dry run equals a table of the paper's values kept in the tests. `NOT_SETTINGS` lists what
the paper did that no setting here reproduces. `difference_table()` compares any resolved settings
(the defaults, a profile) with the paper. This module only describes; it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

SCRIPTS = "IBM/Dromedary, branch dromedary_v1"
CPU = "sized for the book's CPU run on a 135M model"


@dataclass(frozen=True)
class PaperValue:
    value: object
    source: str  # where the paper's value is written
    why: str = ""  # why our default differs (empty: it does not)


def _p(value, source, why=""):
    return PaperValue(value, source, why)


STEP1 = "training/step1_topic_guided_red_teaming_self_instruct"
PAPER: dict[str, dict[str, PaperValue]] = {
    "prompts": {
        "n_self_instruct": _p(267597, "paper, Table 1 (Self-Instruct prompts kept)", CPU),
        "k_seeds": _p(5, f"{STEP1}/scripts/vanilla_self_instruct_65b_base.sh (--num_prompt_instructions 5)",
                      "a shorter request for the CPU run (our 24 seed prompts)"),
        "k_generated": _p(0, f"{STEP1}/generate_vanilla_instruction.py (samples from the seed tasks only)",
                          "Self-Instruct's own recipe shows a generated prompt too; with 24 seeds it varies the requests"),
        "temperature": _p(1.0, f"{STEP1}/scripts/*.sh (--temperature 1.0)"),
        "list_top_p": _p(0.98, f"{STEP1}/scripts/vanilla_self_instruct_65b_base.sh (--top_p 0.98)"),
        "list_max_new_tokens": _p(1024, f"{STEP1}/scripts/vanilla_self_instruct_65b_base.sh (--generate_max_len)", CPU),
        "rouge_threshold": _p(0.7, f"{STEP1}/generate_vanilla_instruction.py (max ROUGE-L > 0.7 dropped)"),
        "rouge_sources": _p(("self_instruct",), f"{STEP1}/merge_tgrt_question.py (red-team: (type, topic) dedup only)",
                            "our original filter, which also drops red-team questions that near-copy a seed question"),
        "topics_per_type": _p(5000, "paper: 99,121 red-team prompts over 20 types, one per topic", CPU),
        "topic_max_words": _p(3, f"{STEP1}/generate_tgrt_topic.py (a topic of more than 3 words is dropped)",
                              "our original bound, kept for the book's runs"),
        "topics_shown": _p(5, f"{STEP1}/scripts/tgrt_topic_generate_65b_base.sh (--num_examples 5)",
                           "at CPU scale every seed topic and the few found fit the prompt"),
        "topic_max_new_tokens": _p(128, f"{STEP1}/scripts/tgrt_topic_generate_65b_base.sh (--generate_max_len)", CPU),
        "red_team_scheme": _p("mixed", f"{STEP1}/generate_tgrt_question.py (5 mixed-type examples, 5 hints a request)",
                              "our original scheme, kept for the book's runs: one request per (type, topic) after that "
                              "type's own seed questions"),
        "k_seed_questions": _p(5, f"{STEP1}/scripts/tgrt_question_generate_65b_base.sh (--num_examples 5)"),
        "questions_per_request": _p(5, f"{STEP1}/scripts/tgrt_question_generate_65b_base.sh "
                                       "(--num_instructions_to_generate 5)"),
        "question_top_p": _p(0.95, f"{STEP1}/scripts/tgrt_question_generate_65b_base.sh (--top_p 0.95)"),
        "question_max_new_tokens": _p(77, f"{STEP1}/scripts/tgrt_question_generate_65b_base.sh (--generate_max_len "
                                          "384 a request of 5 questions; ours is per question)", CPU),
    },
    "self-align": {
        "limit": _p(0, "paper: every prompt is answered", CPU),
        "temperature": _p(0.5, "step2 scripts/self_align_generate_65b_base.sh (--temperature 0.5)"),
        "top_p": _p(0.95, "step2 scripts/self_align_generate_65b_base.sh (--top_p 0.95)"),
        "max_new_tokens": _p(256, "step2 scripts/self_align_generate_65b_base.sh (--generate_max_len 256)", CPU),
        "assistant": _p("Watson", "prompts/watson_self_align_prompt.txt"),
        "suppress": _p(("Sorry",), "step2 generate_self_align_response.py (logit_bias on 'Sorry': -100)",
                       "off by default so the book shows the model's own openings"),
        "drop_apologies": _p(True, "step2 merge_and_fileter_self_align_with_dummy.py (answers opening \"I'm sorry\")",
                             "by default only blanket refusals are dropped: a CPU run has few answers to spare"),
        "constrain_format": _p(False, "step2 generate_self_align_response.py (free sampling; the format is parsed after)",
                               "a 135M model cites principles by wrong numbers and names and loses the answer marker; "
                               "the format's grammar holds it to valid citations (records say `constrained`)"),
        "max_answer_sentences": _p(0, "step2 generate_self_align_response.py (the answer runs to a stop or 256 tokens)",
                                   "with the grammar, a small model's answers end whole within the CPU run's "
                                   "160 tokens instead of being cut off and dropped"),
    },
    "engrave": {
        "rank": _p(16, "step3 scripts/finetune_dromedary_65b_non_verbose.sh (--lora_r=16)"),
        "lora_alpha": _p(16.0, "training/finetune.py (lora_alpha 16)"),
        "lora_dropout": _p(0.05, "training/finetune.py (lora_dropout 0.05)"),
        "target_modules": _p(("q_proj", "k_proj", "v_proj", "o_proj"), "step3 script (--lora_target_modules)"),
        "learning_rate": _p(4e-4, "step3 script (LEARNING_RATE=4e-4)"),
        "warmup_steps": _p(100, "step3 script (--num_warmup_steps 100)", "a CPU run has a few dozen steps"),
        "epochs": _p(1, "step3 script (NUM_EPOCHS=1)", "a few dozen examples need several passes"),
        "total_batch_size": _p(768, "step3 script (TOTAL_BATCH_SIZE=768)", "a CPU run has fewer examples than that"),
        "cutoff": _p(512, "step3 script (--cutoff_len 512)"),
        "overlong": _p("truncate", "training/finetune.py (tokenizer truncation at cutoff_len)",
                       "dropping keeps every CPU example whole; truncation is a setting"),
        "holdout": _p(0.0, "paper: no held-out answers", "a fifth is held out to measure engraving on the CPU"),
    },
    "verbose": {
        "temperature": _p(0.3, "step4 scripts/verbose_response_generate_65b_dromedary_non_verbose.sh (--temperature 0.3)"),
        "top_p": _p(0.7, "step4 script (--top_p 0.7)"),
        "max_new_tokens": _p(512, "step4 script (--generate_max_len 512)", CPU),
        "warmup_steps": _p(100, "step4 scripts/finetune_dromedary_65b_final.sh (--num_warmup_steps 100)",
                           "a CPU run has a few dozen steps"),
        "epochs": _p(1, "step4 finetune script (NUM_EPOCHS=1)", "a few dozen examples need several passes"),
        "total_batch_size": _p(768, "step4 finetune script (TOTAL_BATCH_SIZE=768)", "a CPU run has fewer examples"),
        "cutoff": _p(768, "step4 finetune script (--cutoff_len 768)"),
        "overlong": _p("truncate", "training/finetune.py (tokenizer truncation at cutoff_len)",
                       "dropping keeps every CPU example whole; truncation is a setting"),
    },
}

# What the paper did that no setting here reproduces: (stage, the paper, ours, why).
NOT_SETTINGS = [
    ("prompts", "Self-Instruct requests list instruction/input pairs, and the kept set is deduplicated again "
                "across shards by exact text", "a numbered list of prompts; one ROUGE-L pass over all candidates",
     "our seeds are prompts, not (instruction, input) tasks; one process sees every candidate"),
    ("prompts", "topics grown over 9 brainstorming epochs and trimmed to the smallest type's count",
     "brainstorming rounds until every type has topics_per_type", "the same balance, reached per type"),
    ("self-align", "answers cut off at 256 tokens are kept (cut at the last space, no end marker)",
     "dropped ('truncated at max_new_tokens')", "a cut answer teaches a half thought; stage 4 keeps its cut answers, "
                                                "without the end marker"),
    ("verbose", "3- and 4-gram frequency penalties (1.0, 2.0) on word-start tokens of the generated text",
     "repetition_penalty 1.1 and no repeated 6-gram, over the generated tokens only",
     "transformers has no n-gram frequency penalty; ours also ignores the prompt, as Dromedary's does"),
    ("evaluate", "Vicuna answers judged by GPT-4", "judged by a local model (default: the base model), flagged weak",
     "no hosted model is reachable from this project's machines"),
]


def difference_table(resolved: dict | None = None):
    """One row per paper setting: the paper's value and source, ours (the resolved settings, by
    default the stage defaults), whether they differ and why. `resolved` is a dry run's dict."""
    import pandas as pd

    if resolved is None:
        from .profiles import resolve

        resolved = resolve({}).as_dict()
    rows = []
    for stage, settings in PAPER.items():
        for name, paper in settings.items():
            ours = resolved[stage][name] if stage in resolved else None
            same = _same(ours, paper.value)
            rows.append({"stage": stage, "setting": name, "paper": _show(paper.value), "ours": _show(ours),
                         "differs": not same, "why": "" if same else paper.why, "source": paper.source})
    return pd.DataFrame(rows)


def chapter_table(resolved: dict):
    """Chapter 7's table: per paper setting, the paper's value, the given settings' (a profile's
    dry run), our default, and why the default differs."""
    table = difference_table(resolved).rename(columns={"ours": "this profile"})
    defaults = difference_table()
    table.insert(4, "our default", defaults["ours"])
    table["why the default differs"] = defaults["why"]
    table["profile differs"] = table.pop("differs")
    return table.drop(columns=["why"])[["stage", "setting", "paper", "this profile", "profile differs", "our default",
                                        "why the default differs", "source"]]


def markdown_differences() -> str:
    """The README's table: every default that differs from the paper, then what no setting covers."""
    table = difference_table()
    lines = ["| stage | setting | paper | our default | why ours differs |", "|---|---|---|---|---|"]
    for _, row in table[table["differs"]].iterrows():
        lines.append(f"| {row['stage']} | `{row['setting']}` | {row['paper']} | {row['ours']} | {row['why']} |")
    for stage, paper, ours, why in NOT_SETTINGS:
        lines.append(f"| {stage} | (not a setting) | {paper} | {ours} | {why} |")
    return "\n".join(lines)


def _same(ours, paper) -> bool:
    if isinstance(paper, tuple):
        return list(ours or []) == list(paper)
    if isinstance(paper, float) and isinstance(ours, (int, float)):
        return abs(ours - paper) < 1e-12
    return ours == paper


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


MARKERS = ("<!-- paper-differences:start -->\n", "<!-- paper-differences:end -->")


def update_readme(path) -> None:
    """Put the table between the README's markers (`python -m selfalign.paper README.md`)."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    Path(path).write_text(text[:start] + markdown_differences() + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":  # python -m selfalign.paper [README.md]: print the table, or write it there
    import sys

    update_readme(sys.argv[1]) if len(sys.argv) > 1 else print(markdown_differences())
