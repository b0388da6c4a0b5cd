"""Reasoning per persona through lm-evaluation-harness (the paper's second finding).

- :mod:`.tasks`: the local task configs (stock lm-eval prompts and metrics on local JSONL files) and
  the switch to lm-eval's stock tasks (``BIG5_REASONING__SOURCE=stock``).
- :mod:`.lm`: a persona as an lm-eval model, registered as ``big5``.
- :mod:`.harness`: one persona on one task through ``lm_eval.simple_evaluate``, every item kept.
- :mod:`.runner`, :mod:`.store`: runs of personas x tasks in the database, resumable, never half-done.
- :mod:`.report`: the paper's table (high/low accuracy, paired bootstrap CI, Direct) and its plot.
- :mod:`.routes`, :mod:`.cli`: ``/v1/reasoning`` and ``big5 reason``.

``python -m evaluator.reasoning`` is lm-eval's own CLI with ``big5`` registered and the local tasks included.
"""
