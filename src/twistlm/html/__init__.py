"""Self-contained HTML views (inline SVG/JS/CSS, no network): a run (:mod:`run_page`), an evaluation
(:mod:`report_page`) and a training run (:mod:`training_page`), sharing the shell of :mod:`template`."""

from twistlm.html.report_page import write_report_page
from twistlm.html.run_page import write_run_page
from twistlm.html.template import read_page_data
from twistlm.html.training_page import write_training_page

__all__ = ["read_page_data", "write_report_page", "write_run_page", "write_training_page"]
