"""Evaluation of personality induction: questionnaire inventories, scoring and reports."""
