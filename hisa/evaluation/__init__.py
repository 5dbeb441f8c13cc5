"""``hisa-eval``: how close HISA stays to dense attention on a given model and text.

- :func:`evaluate_windows` — perplexity of dense vs HISA, next-token KL(dense‖HISA) and top-1 agreement
  over the same token windows (:mod:`.metrics` has the position-by-position maths);
- :func:`run_trial` — one needle-in-a-haystack trial answered densely and with HISA;
- :func:`run_evaluation` — both over a grid of lengths/depths, then :func:`write_report`
  (results.json, report.md, needle_heatmap.png).
"""

from .metrics import MetricAccumulator, compare_hidden, compare_logits, sparse_positions
from .needle import Needle, NeedleTrial, answer_is_correct, build_prompt, make_needle, plan_trial, run_planned, run_trial
from .perplexity import evaluate_windows, final_hidden, text_windows
from .report import summary_line, write_report
from .runner import EvalSettings, run_evaluation

__all__ = [
    "EvalSettings",
    "MetricAccumulator",
    "Needle",
    "NeedleTrial",
    "answer_is_correct",
    "build_prompt",
    "compare_hidden",
    "compare_logits",
    "evaluate_windows",
    "final_hidden",
    "make_needle",
    "plan_trial",
    "run_planned",
    "run_evaluation",
    "run_trial",
    "sparse_positions",
    "summary_line",
    "text_windows",
    "write_report",
]
