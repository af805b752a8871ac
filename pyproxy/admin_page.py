"""The admin server's `/` page: each listener's stage breakdown as a stacked bar, live from /stats.

Self-contained (no external assets): inline CSS and script, SVG bars. Each
stage keeps one colour on every bar so a reader (or a screenshot check) can
compare widths; a bar's width is split in proportion to the stages' ns.
"""

from __future__ import annotations

import json

# Fixed colours in stage order; filters take the rest in turn.
STAGE_COLOURS = {
    "ipc": "#1f77b4",
    "read": "#ff7f0e",
    "write": "#2ca02c",
    "notify": "#d62728",
    "parse": "#9467bd",
    "other": "#8c564b",
}
FILTER_COLOURS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000080", "#808000")
BAR_WIDTH = 600
BAR_HEIGHT = 40

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pyproxy</title>
<style>
body { font-family: sans-serif; margin: 1em 2em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { padding: 1px 8px; text-align: right; }
.key { display: inline-block; width: 0.9em; height: 0.9em; }
</style></head>
<body>
<h1>pyproxy: where each request's time goes</h1>
<p id="status">loading /stats?format=json …</p>
<div id="listeners"></div>
<script>
const STAGE_COLOURS = __STAGE_COLOURS__;
const FILTER_COLOURS = __FILTER_COLOURS__;
const WIDTH = __BAR_WIDTH__, HEIGHT = __BAR_HEIGHT__;
const every = Number(new URLSearchParams(location.search).get("every") || 2) * 1000;

function colour(stage, index) {
  return STAGE_COLOURS[stage] || FILTER_COLOURS[index % FILTER_COLOURS.length];
}

function render(snap) {
  const root = document.getElementById("listeners");
  root.textContent = "";
  for (const [name, l] of Object.entries(snap.listeners)) {
    const unit = l.mode === "tcp" ? "message" : "request";
    const per = unit === "message" ? l.messages : l.requests;
    const stages = Object.entries(l.stages);
    const total = stages.reduce((sum, [, s]) => sum + s.ns, 0);
    const h = document.createElement("h2");
    h.textContent = `${name} (${l.mode}, ${l.kind}): ${per} ${unit}s`;
    root.appendChild(h);
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("width", WIDTH); svg.setAttribute("height", HEIGHT);
    svg.setAttribute("shape-rendering", "crispEdges");
    svg.dataset.listener = name;
    let x = 0, filters = 0;
    const table = document.createElement("table");
    table.innerHTML = `<tr><th></th><th>stage</th><th>µs/${unit}</th><th>share</th></tr>`;
    for (const [stage, s] of stages) {
      const c = colour(stage, stage.startsWith("filter:") ? filters++ : 0);
      const w = total ? Math.round((x + s.ns) / total * WIDTH) - Math.round(x / total * WIDTH) : 0;
      const rect = document.createElementNS(svgNS, "rect");
      rect.setAttribute("x", Math.round(x / total * WIDTH) || 0); rect.setAttribute("y", 0);
      rect.setAttribute("width", w); rect.setAttribute("height", HEIGHT);
      rect.setAttribute("fill", c);
      svg.appendChild(rect);
      x += s.ns;
      const row = table.insertRow();
      row.dataset.stage = stage;
      row.innerHTML = `<td><span class="key" style="background:${c}"></span></td><td>${stage}</td>` +
        `<td class="per">${per ? (s.ns / per / 1000).toFixed(2) : "0.00"}</td>` +
        `<td class="share">${total ? (s.ns / total * 100).toFixed(1) : "0.0"}%</td>`;
    }
    root.appendChild(svg);
    root.appendChild(table);
  }
}

async function refresh() {
  try {
    const response = await fetch("/stats?format=json", {cache: "no-store"});
    render(await response.json());
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "cannot read /stats: " + err;
  }
}
refresh();
setInterval(refresh, every);
</script>
</body></html>
"""


def live_page() -> bytes:
    return (
        PAGE.replace("__STAGE_COLOURS__", json.dumps(STAGE_COLOURS))
        .replace("__FILTER_COLOURS__", json.dumps(list(FILTER_COLOURS)))
        .replace("__BAR_WIDTH__", str(BAR_WIDTH))
        .replace("__BAR_HEIGHT__", str(BAR_HEIGHT))
        .encode()
    )
