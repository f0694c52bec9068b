"""The HTML view of an evaluation (``report.html`` beside ``report.md``; :func:`twistlm.report.write_report`).

Shows the bounds on log Z against K for every proposal (lower solid, upper dashed, 95% CI bands, the exact log Z when
known), the bounds table, the KL table with its intervals, and a few exact σ samples next to draws from each
proposal (``EvaluationReport.examples``, see :mod:`twistlm.report_samples`).

Data contract: ``EvaluationReport.to_dict()`` (the content of results.json) plus ``"kind": "report"`` and
``"title"``; ``examples`` is ``{"exact": [text, ...], "exact_method": str, "proposals": {name: [{"text", "weight",
"log_weight", "log_phi"}, ...]}}`` or null.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from twistlm.files import atomic_write_text
from twistlm.html.template import render_page

if TYPE_CHECKING:
    from twistlm.report import EvaluationReport

DEFAULT_TITLE = "twistlm evaluation"


def report_data(report: EvaluationReport, title: str = DEFAULT_TITLE) -> dict:
    """The data the report page embeds."""
    return {"kind": "report", "title": title, **report.to_dict()}


def render_report_page(report: EvaluationReport, title: str = DEFAULT_TITLE) -> str:
    return render_page("report", title, report_data(report, title))


def write_report_page(report: EvaluationReport, path: str | os.PathLike, title: str = DEFAULT_TITLE) -> Path:
    """Write the report page to ``path`` atomically; returns the path."""
    return atomic_write_text(path, render_report_page(report, title))
