"""Functions the local task YAMLs name with ``!function`` (lm-eval imports this file by its path)."""

from evaluator.reasoning.taskfns import process_results_mc2

__all__ = ["process_results_mc2"]
