"""The report's HTML page: one self-contained file (plots as data URIs, a sortable summary table,
every run's config), under a policy that loads nothing from outside it."""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distsgd.report.runs import Run, is_number
from distsgd.report.table import COLUMNS, Column, cell_text


def html_page(runs: list[Run], plots: list[Path], dirs: Sequence[str | Path],
              columns: Sequence[Column] = COLUMNS) -> str:
    e = html.escape
    head = "".join(f'<th scope="col" aria-sort="none"><button type="button" data-type='
                   f'"{"num" if fmt else "text"}">{e(h)}</button></th>'
                   for h, _, fmt, _ in columns)
    rows = "".join(f"<tr>{''.join(_html_cell(get(r), fmt) for _, get, fmt, _ in columns)}</tr>\n"
                   for r in runs)
    figures = "".join(
        f'<figure><img alt="{e(p.stem.replace("_", " "))}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{e(p.name)}'
        "</figcaption></figure>\n" for p in plots)
    configs = "".join(
        f"<details><summary>{e(r.label)} <span class=\"path\">{e(str(r.path))}</span></summary>"
        f"<pre>{e(json.dumps(r.config, indent=2))}</pre></details>\n" for r in runs)
    unfinished = sum(not r.finished for r in runs)
    meta = (f"{len(runs)} runs ({unfinished} unfinished: figures of their last evaluation so far)"
            if unfinished else f"{len(runs)} runs")
    sources = ", ".join(f"<code>{e(str(d))}</code>" for d in dirs)
    made = e(time.strftime("%Y-%m-%d %H:%M:%S"))
    return _PAGE.format(csp=_CSP, meta=meta, sources=sources, made=made, head=head, rows=rows,
                        figures=figures, configs=configs)


def _html_cell(value: Any, fmt: str) -> str:
    text = html.escape(cell_text(value, fmt))
    if not fmt:
        return f"<td>{text}</td>"
    key = repr(float(value)) if is_number(value) else ""  # sorted by the value, not its rounding
    return f'<td class="num" data-value="{key}">{text}</td>'


_SCRIPT = """
"use strict";
// Click a heading to sort by it; again to reverse. Missing values (n/a) stay last either way.
(function () {
  const table = document.getElementById("summary");
  const body = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach(function (th, col) {
    const button = th.querySelector("button");
    button.addEventListener("click", function () {
      const descending = th.getAttribute("aria-sort") === "ascending";
      const numeric = button.dataset.type === "num";
      const key = function (row) {
        const cell = row.cells[col];
        return numeric ? cell.dataset.value : cell.textContent;
      };
      const rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        const x = key(a), y = key(b);
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        const order = numeric ? Number(x) - Number(y)
                              : x.localeCompare(y, undefined, {numeric: true});
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    });
  });
  table.dataset.sortable = "ready";
})();
"""

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1280px;
       padding: 0 1em; color: #222; }
.meta, .path { color: #666; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; border: 0; background: none; cursor: pointer;
            padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
tbody tr:hover { background: #f4f7fb; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: 12px; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
details { margin: .3em 0; }
"""

# No external asset: the page must work offline and from a mail attachment, and this policy makes
# the browser refuse anything a folder's text might smuggle in besides.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distsgd report</title>
<style>""" + _STYLE.replace("{", "{{").replace("}", "}}") + """</style>
</head>
<body>
<h1>distsgd report</h1>
<p class="meta">{meta} from {sources}; made {made}.</p>
<h2>Summary</h2>
<p class="meta">Click a column heading to sort by it. Bytes are per training worker.</p>
<div class="wide"><table id="summary">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}</tbody>
</table></div>
<h2>Plots</h2>
{figures}<h2>Configurations</h2>
{configs}<script>""" + _SCRIPT.replace("{", "{{").replace("}", "}}") + """</script>
</body>
</html>
"""
