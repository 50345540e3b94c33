"""Evaluation: TruthfulQA MC, BIG-bench HHH and Vicuna pairwise judging, all by log-likelihood.

The benchmarks take a `LoadedModel` (a peft-wrapped model too) or any scorer, i.e. a callable from
a list of (context, continuation) pairs to a list of `selfalign.scoring.Score`s, and return an
`EvalResult`: one row per item and a summary. One module each:

- `truthfulqa`: TruthfulQA MC1/MC2 and the paper's true/false variant of MC1;
- `hhh`: BIG-bench HHH by answer log-likelihood and by the paper's A/B exam;
- `vicuna`: the Vicuna questions and the pairwise judge;
- `templates`: the prompts (`principles/eval_templates.yaml`) and the layout of the paper's exams,
  bare or in a model's chat format;
- `results`: `EvalResult`, its tables, chart and records;
- `data`: where the benchmark files are read from (`data_dir()`, the prepared public data), and `EvalDataError`.

Their public names are re-exported here, so callers write `from selfalign import evals as ev` and
`ev.truthfulqa_mc(...)`.

It deliberately does not score (`selfalign.scoring` does), generate answers (the Vicuna judge
compares answers made elsewhere), write run directories (the evaluate stage does, with
`EVAL_SCHEMAS` and `item_records`), or download anything: the hub copy of TruthfulQA is read only
when a caller passes `from_hub=True`.
"""

from .data import EvalDataError, data_dir
from .hhh import HHH_SUBSETS, HHHExample, hhh_eval, load_hhh
from .results import (EVAL_SCHEMAS, EvalResult, by_category, item_records, markdown_table, plot_by_category,
                      summary_records, summary_table, write_table)
from .templates import TEMPLATES, exam_requests, load_templates
from .truthfulqa import MCQuestion, load_truthfulqa, mc1, mc2, truthfulqa_mc, truthfulqa_mc_paper
from .vicuna import WEAK_JUDGE_PARAMETERS, judge_note, judge_pair, judge_pairwise, load_vicuna_questions

__all__ = [
    "EVAL_SCHEMAS", "HHH_SUBSETS", "TEMPLATES", "WEAK_JUDGE_PARAMETERS",
    "EvalDataError", "EvalResult", "HHHExample", "MCQuestion",
    "by_category", "data_dir", "exam_requests", "hhh_eval", "item_records", "judge_note", "judge_pair",
    "judge_pairwise",
    "load_hhh", "load_templates", "load_truthfulqa", "load_vicuna_questions", "markdown_table", "mc1", "mc2",
    "plot_by_category", "summary_records", "summary_table", "truthfulqa_mc", "truthfulqa_mc_paper", "write_table",
]
