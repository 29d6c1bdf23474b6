"""BATCH report as a self-contained HTML page (`--report=FILE.html`).

`render(report, summary)` takes the batch report as plain data
(`BatchReport.to_dict()`) and its summary (`batch_report.summarize`) and
returns one HTML document with no external resources: the counts by outcome
and by family, the failures grouped by cause with one example each, the
slowest modules, and a table of every module (sortable by clicking a column
header, or by the link: `FILE.html#sort=-seconds`) with its family and parity
summary. Every text that comes from a module (paths, error lines) is
HTML-escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any, Mapping

from migrate import batch_report

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
#modules th{cursor:pointer;user-select:none}
#modules th.asc::after{content:" \\25B2"}#modules th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.nowrap{white-space:nowrap}
tr.failed td{background:#fde8e8}tr.skipped td{color:#666}
.summary span{display:inline-block;margin-right:1.5em;font-size:1.1em}
.ok{color:#1a7f37}.bad{color:#c62828}
code{font-size:.92em}
"""

# Click a header to sort by it; click again to reverse. Numbers sort as numbers.
_SCRIPT = """
document.querySelectorAll('#modules th').forEach(function(th, col) {
  th.addEventListener('click', function() {
    var body = document.querySelector('#modules tbody');
    var asc = !th.classList.contains('asc');
    document.querySelectorAll('#modules th').forEach(function(h) {
      h.classList.remove('asc', 'desc'); });
    th.classList.add(asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b) {
      var x = a.cells[col].dataset.v !== undefined ? a.cells[col].dataset.v : a.cells[col].textContent;
      var y = b.cells[col].dataset.v !== undefined ? b.cells[col].dataset.v : b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r) { body.appendChild(r); });
  });
});
// A link may ask for a sorted view: FILE.html#sort=seconds (or #sort=-seconds).
(function() {
  var m = /^#sort=(-?)(\w+)$/.exec(location.hash);
  if (!m) return;
  document.querySelectorAll('#modules th').forEach(function(th) {
    if (th.textContent === m[2]) { th.click(); if (m[1]) th.click(); }
  });
})();
"""


def _e(value: Any) -> str:
  return html.escape("" if value is None else str(value), quote=True)


def _table(table_id: str, headers: list[str], rows: list[str]) -> str:
  return (f"<table id={table_id}><thead><tr>" +
          "".join(f"<th>{_e(h)}</th>" for h in headers) +
          "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _num(value: Any) -> str:
  return f"<td class=num>{_e(value)}</td>"


def render(report: Mapping[str, Any], summary: Mapping[str, Any], *,
           title: str = "migrate-hub-module batch") -> str:
  """The report as one self-contained HTML page."""
  root = report.get("dst_root", "")
  counts = summary["counts"]
  statuses = [k for k in counts if k != "total"]
  parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
           f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f"<p>{_e(report.get('started_at'))} · {_e(report.get('seconds'))} s · "
           f"{_e(report.get('jobs'))} worker(s) · output <code>{_e(root)}</code></p>",
           "<div class=summary>",
           f"<span>{_e(counts.get('total', 0))} modules</span>"]
  for k in statuses:
    cls = "bad" if k == "failed" and counts[k] else ("ok" if k == "converted" else "")
    parts.append(f"<span class='{cls}'>{_e(counts[k])} {_e(k)}</span>")
  parts.append("</div>")

  parts.append("<h2>By family</h2>")
  parts.append(_table("families", ["family", "modules", *statuses], [
      f"<tr><td>{_e(f['family'])}</td>{_num(f['total'])}" +
      "".join(_num(f.get(k, 0)) for k in statuses) + "</tr>"
      for f in summary["families"]]))

  parts.append("<h2>Failures by cause</h2>")
  if summary["failures"]:
    parts.append(_table("failures", ["modules", "exit", "cause", "example"], [
        f"<tr>{_num(f['count'])}<td class=nowrap>{_e(f['exit_code'])} {_e(f['exit_name'])}</td>"
        f"<td>{_e(f['cause'])}</td><td><code>{_e(f['example'])}</code><br>"
        f"{_e(f['example_error'])}</td></tr>" for f in summary["failures"]]))
  else:
    parts.append("<p class=ok>none</p>")

  parts.append("<h2>Slowest</h2>")
  parts.append(_table("slowest", ["module", "family", "seconds", "stages"], [
      f"<tr><td><code>{_e(m['module'])}</code></td><td>{_e(m['family'])}</td>"
      f"<td class=num>{m['seconds']:.1f}</td>"
      f"<td>{_e(batch_report.format_stages(m['stage_seconds']))}</td></tr>"
      for m in summary["slowest"]]))

  parts.append("<h2>Every module</h2><p>Click a column header to sort; a link "
               "can ask for a sorted view (<code>#sort=seconds</code>, "
               "<code>#sort=-seconds</code>).</p>")
  rows = []
  for m in report.get("modules", []):
    status = m.get("status", "")
    row_class = "failed" if status == "failed" else (
        "skipped" if status.startswith("skipped") else "")
    seconds = float(m.get("seconds") or 0.0)
    module = batch_report.relative_path(m.get("destination", ""), root)
    rows.append(
        f"<tr class='{row_class}'><td><code>{_e(module)}</code></td>"
        f"<td>{_e(m.get('family'))}</td><td>{_e(status)}</td>"
        f"{_num(m.get('exit_code', 0))}"
        f"<td class=num data-v='{seconds:.3f}'>{seconds:.1f}</td>"
        f"<td>{_e(m.get('parity_summary') or '')}</td><td>{_e(m.get('error') or '')}</td></tr>")
  parts.append(_table("modules", ["module", "family", "status", "exit", "seconds",
                                  "parity", "error"], rows))
  # The summary itself, for whoever wants to script against the page; no
  # '<' or '&' of module text can end the script element or open another.
  data = (json.dumps(summary).replace("<", "\\u003c").replace(">", "\\u003e")
          .replace("&", "\\u0026"))
  parts.append(f"<script type=application/json id=summary>{data}</script>")
  parts.append(f"<script>{_SCRIPT}</script></body></html>")
  return "\n".join(parts)
