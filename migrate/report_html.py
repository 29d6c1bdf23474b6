"""BATCH report as a self-contained HTML page (`--report=FILE.html`).

`render(report)` takes the batch report as plain data (`BatchReport.to_dict()`)
and returns one HTML document with no external resources: the counts by
outcome and by family, the failures grouped by cause with one example each,
the slowest modules, and a table of every module (sortable by clicking a
column header) with its parity summary. Every text that comes from a module
(paths, error lines) is HTML-escaped.
"""

from __future__ import annotations

import collections
import html
import json
import re
from typing import Any, Mapping, Sequence

SLOWEST = 10

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
#modules th{cursor:pointer;user-select:none}
#modules th.asc::after{content:" \\25B2"}#modules th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
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


def cause(error: str, source: str = "") -> str:
  """The cause of a failure, without what differs between modules: the
  module's own path, quoted names and numbers."""
  text = error or ""
  if source and text.startswith(source):
    text = text[len(source):]
  if text.startswith(("/", ":")):  # The path the message starts with (or its rest).
    text = text.split(": ", 1)[-1]
  text = re.sub(r"'[^']*'", "'…'", text)
  text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
  return text.strip()[:200]


def _e(value: Any) -> str:
  return html.escape("" if value is None else str(value), quote=True)


def _family(module: Mapping[str, Any]) -> str:
  return module.get("family") or "unknown"


def _rel(path: str, root: str) -> str:
  if root and path.startswith(root.rstrip("/") + "/"):
    return path[len(root.rstrip("/")) + 1:]
  return path


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
  """What a person needs to act on, as data: counts by outcome and by
  family, failures grouped by cause (with a count and one example), and
  the slowest modules."""
  modules: Sequence[Mapping[str, Any]] = report.get("modules", [])
  by_family: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  groups: dict[tuple[int, str], list[Mapping[str, Any]]] = collections.defaultdict(list)
  for m in modules:
    by_family[_family(m)][m.get("status", "")] += 1
    if m.get("status") == "failed":
      groups[(int(m.get("exit_code") or 0),
              cause(m.get("error") or "", m.get("source") or ""))].append(m)
  failures = [{"exit_code": code, "cause": text, "count": len(ms),
               "example": ms[0].get("source"), "example_error": ms[0].get("error")}
              for (code, text), ms in sorted(groups.items(),
                                             key=lambda kv: (-len(kv[1]), kv[0]))]
  timed = [m for m in modules if m.get("seconds")]
  slowest = sorted(timed, key=lambda m: -float(m["seconds"]))[:SLOWEST]
  return {"counts": dict(report.get("counts", {})),
          "by_family": {f: dict(c) for f, c in sorted(by_family.items())},
          "failures": failures,
          "slowest": [{"source": m.get("source"), "seconds": m.get("seconds"),
                       "stage_seconds": m.get("stage_seconds", {})} for m in slowest]}


def render(report: Mapping[str, Any], *, title: str = "migrate-hub-module batch") -> str:
  """The report as one self-contained HTML page."""
  s = summarize(report)
  root = report.get("dst_root", "")
  counts = s["counts"]
  statuses = [k for k in counts if k != "total"]
  parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
           f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f"<p>{_e(report.get('started_at'))} · {_e(report.get('seconds'))} s · "
           f"{_e(report.get('jobs'))} worker(s) · output <code>{_e(root)}</code></p>",
           "<div class=summary>"]
  parts.append(f"<span>{_e(counts.get('total', 0))} modules</span>")
  for k in statuses:
    cls = "bad" if k == "failed" and counts[k] else ("ok" if k == "converted" else "")
    parts.append(f"<span class={cls}>{_e(counts[k])} {_e(k)}</span>")
  parts.append("</div>")

  parts.append("<h2>By family</h2><table id=families><thead><tr><th>family</th>" +
               "".join(f"<th>{_e(k)}</th>" for k in statuses) + "</tr></thead><tbody>")
  for family, c in s["by_family"].items():
    parts.append(f"<tr><td>{_e(family)}</td>" +
                 "".join(f"<td class=num>{_e(c.get(k, 0))}</td>" for k in statuses) +
                 "</tr>")
  parts.append("</tbody></table>")

  parts.append("<h2>Failures by cause</h2>")
  if s["failures"]:
    parts.append("<table id=failures><thead><tr><th>modules</th><th>exit</th>"
                 "<th>cause</th><th>example</th></tr></thead><tbody>")
    for f in s["failures"]:
      parts.append(f"<tr><td class=num>{f['count']}</td><td class=num>{f['exit_code']}</td>"
                   f"<td>{_e(f['cause'])}</td><td><code>{_e(f['example'])}</code><br>"
                   f"{_e(f['example_error'])}</td></tr>")
    parts.append("</tbody></table>")
  else:
    parts.append("<p class=ok>none</p>")

  parts.append("<h2>Slowest</h2><table id=slowest><thead><tr><th>module</th>"
               "<th>seconds</th><th>stages</th></tr></thead><tbody>")
  for m in s["slowest"]:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in (m["stage_seconds"] or {}).items())
    parts.append(f"<tr><td><code>{_e(m['source'])}</code></td>"
                 f"<td class=num>{float(m['seconds']):.1f}</td><td>{_e(stages)}</td></tr>")
  parts.append("</tbody></table>")

  parts.append("<h2>Every module</h2><p>Click a column header to sort; a link can ask for a sorted view (<code>#sort=seconds</code>, <code>#sort=-seconds</code>).</p>"
               "<table id=modules><thead><tr><th>module</th><th>family</th><th>status</th>"
               "<th>exit</th><th>seconds</th><th>parity</th><th>error</th></tr></thead><tbody>")
  for m in report.get("modules", []):
    status = m.get("status", "")
    row_class = "failed" if status == "failed" else (
        "skipped" if status.startswith("skipped") else "")
    seconds = float(m.get("seconds") or 0.0)
    parity = m.get("parity_summary") or ""
    parts.append(
        f"<tr class='{row_class}'><td><code>{_e(_rel(m.get('destination', ''), root))}</code></td>"
        f"<td>{_e(_family(m))}</td><td>{_e(status)}</td>"
        f"<td class=num>{_e(m.get('exit_code', 0))}</td>"
        f"<td class=num data-v='{seconds:.3f}'>{seconds:.1f}</td>"
        f"<td>{_e(parity)}</td><td>{_e(m.get('error') or '')}</td></tr>")
  parts.append("</tbody></table>")
  # The data itself, for whoever wants to script against the page.
  data = json.dumps(s).replace("</", "<\\/")
  parts.append(f"<script type=application/json id=summary>{data}</script>")
  parts.append(f"<script>{_SCRIPT}</script></body></html>")
  return "\n".join(parts)
