"""The shell every twistlm HTML page shares: one self-contained file with its CSS, JS and data inline.

A page is ``render_page(kind, title, data)``: the stylesheet and scripts of ``assets/`` inlined, ``data`` embedded as
JSON in a ``<script type="application/json">`` block (with ``<``, ``>``, ``&`` written as ``\\u`` escapes so no text
can close the block), and the page script of ``kind`` drawing everything from that data (all text through
``textContent`` or an HTML escape). Nothing is fetched: a Content-Security-Policy meta tag forbids every network
source (``default-src 'none'``) and lets only the page's own scripts run (by their SHA-256 hashes, so even markup
that slipped into the page could not execute). Script errors and policy violations are written into the page
(``#twistlm-errors``, ``data-errors`` on ``<html>``); the page script writes ``ok`` into ``#render-status`` and the
render time into ``#render-ms`` when it is done.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from functools import cache
from importlib import resources
from typing import Any

ASSETS = "assets"
CSS_ASSET = "page.css"
GUARD_ASSET = "guard.js"
CHARTS_ASSET = "charts.js"
PAGE_SCRIPTS = {"run": "run.js", "report": "report.js", "training": "training.js"}
"""The page script of each page kind."""
DATA_ELEMENT_ID = "twistlm-data"
NON_FINITE = {math.inf: "inf", -math.inf: "-inf"}
"""How ±∞ are written in page data (as results.json does); NaN is written "nan". The page's TW.num reads them back."""
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@cache
def asset(name: str) -> str:
    """The text of one file of ``twistlm/html/assets``."""
    return (resources.files("twistlm.html") / ASSETS / name).read_text(encoding="utf-8")


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as "inf" / "-inf" / "nan", tuples as lists and dict keys as strings."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        return NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def script_json(data: Any) -> str:
    """Compact JSON of ``data`` that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``); values
    JSON cannot hold (paths, objects) are written as their ``str``."""
    text = json.dumps(jsonable(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    for char, escaped in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


def _hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def render_page(kind: str, title: str, data: Any) -> str:
    """The complete HTML document of a page of ``kind`` ("run", "report", "training") showing ``data``."""
    from twistlm import __version__

    guard, charts, page = asset(GUARD_ASSET), asset(CHARTS_ASSET), asset(PAGE_SCRIPTS[kind])
    for script in (guard, charts, page):
        if "</script" in script.lower() or "<!--" in script:
            raise AssertionError("a page script must not contain '</script' or '<!--'")
    policy = (
        "default-src 'none'; script-src " + " ".join(_hash(s) for s in (guard, charts, page)) + "; "
        "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
    )
    title_html = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(policy)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="twistlm {html.escape(__version__)}">\n'
        f"<title>{title_html}</title>\n"
        f"<style>\n{asset(CSS_ASSET)}</style>\n"
        f"<script>{guard}</script>\n"
        "</head>\n<body>\n"
        f"<header><h1>{title_html}</h1></header>\n"
        '<main>\n<pre id="twistlm-errors" hidden></pre>\n'
        '<div id="app"><noscript>This page draws its content with JavaScript; enable it to see it.</noscript></div>\n'
        "</main>\n"
        f'<footer class="muted">twistlm {html.escape(__version__)} · self-contained page, works offline · rendered in '
        '<span id="render-ms">?</span> ms · status <span id="render-status">not rendered</span></footer>\n'
        f'<script type="application/json" id="{DATA_ELEMENT_ID}">{script_json(data)}</script>\n'
        f"<script>{charts}</script>\n"
        f"<script>{page}</script>\n"
        "</body>\n</html>\n"
    )


def read_page_data(page: str) -> Any:
    """The data embedded in a page written by :func:`render_page` (for tests and tools)."""
    start_tag = f'<script type="application/json" id="{DATA_ELEMENT_ID}">'
    start = page.index(start_tag) + len(start_tag)
    return json.loads(page[start : page.index("</script>", start)])
