"""Helpers the evaluator's tests share."""

from __future__ import annotations

import asyncio

from evaluator.runner import AssessmentRunner
from evaluator.schemas import AssessRequest


def run_assessment(runner: AssessmentRunner, request: AssessRequest) -> str:
    """Prepare and run one assessment to its end, here; returns its id."""
    assessment_id, resolved, instrument = runner.prepare(request)
    asyncio.run(runner.run(assessment_id, request, resolved, instrument))
    return assessment_id
