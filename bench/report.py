"""`pyproxy bench report DIR`: one self-contained HTML (or markdown) report of a results folder.

It reads what the folder holds (a profile, a compare run, predictions), draws
the plots that go with it and inlines them as data: URLs, so the HTML file can
be mailed or archived on its own.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path


def _sections(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """(title, markdown body, plots) for every kind of result found in the folder."""
    out: list[tuple[str, str, list[Path]]] = []
    if (folder / "profile.json").exists():
        from pyproxy.bench.model import Profile
        from pyproxy.bench.profile import models_table, stage_table, write_plots

        profile = Profile.load(folder / "profile.json")
        plots = write_plots(profile, folder) if profile.points else []
        platform = ", ".join(f"{k}: {v}" for k, v in profile.platform.items())
        out.append(("Profile: stage breakdown", stage_table(profile), []))
        out.append(("Profile: fitted cost models", f"{platform}\n\n{models_table(profile)}", plots))
    if (folder / "results.json").exists() and (folder / "table.md").exists():
        plots = [p for p in (folder / "latency_cdf.png",) if p.exists()]
        out.append(("Side by side", (folder / "table.md").read_text(), plots))
    if (folder / "validation.json").exists() and (folder / "table.md").exists():
        plots = [p for p in (folder / "predicted_vs_measured.png",) if p.exists()]
        out.append(("Predicted vs measured", (folder / "table.md").read_text(), plots))
    if (folder / "predictions.json").exists():
        runs = json.loads((folder / "predictions.json").read_text())["runs"]
        lines = ["| what if | graphs | overhead p50 µs | p99 µs | CPU p50 cores | path moved |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for label, run in runs.items():
            preds = run["predictions"]
            d = run.get("distribution")
            if d:
                lat, cpu = d["latency_overhead_us"], d["cpu_overhead_cores"]
                lines.append(f"| {label} | {d['graphs']} | {lat['p50']:.1f} | {lat['p99']:.1f} "
                             f"| {cpu['p50']:.4f} | {d['critical_path_moved']} |")  # fmt: skip
            else:
                p = preds[0]
                lines.append(f"| {label} | 1 | {p['latency_overhead_us']:.1f} | {p['latency_overhead_us']:.1f} "
                             f"| {p['cpu_overhead_cores']:.4f} | {int(p['critical_path_moved'])} |")  # fmt: skip
        plots = [p for p in (folder / "overhead_cdf.png", folder / "what_if.png") if p.exists()]
        out.append(("Predictions", "\n".join(lines) + "\n", plots))
    return out


def _md_table_to_html(text: str) -> str:
    """Markdown pipe tables to <table>; other lines to paragraphs (all text escaped)."""
    parts: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            trs = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body
            )
            parts.append(f"<table><tr>{cells}</tr>{trs}</table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(parts)


def render_html(folder: Path) -> str:
    body = []
    for title, text, plots in _sections(folder):
        body.append(f"<h2>{html.escape(title)}</h2>\n{_md_table_to_html(text)}")
        for plot in plots:
            data = base64.b64encode(plot.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(plot.stem)}" src="data:image/png;base64,{data}">')
    if not body:
        raise FileNotFoundError(
            f"{folder}: no profile.json, results.json, validation.json or predictions.json"
        )
    style = "body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pyproxy bench: {html.escape(folder.name)}</title>"
            f"<style>{style}</style></head><body><h1>pyproxy bench: {html.escape(folder.name)}</h1>\n"
            + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def render_markdown(folder: Path) -> str:
    out = [f"# pyproxy bench: {folder.name}\n"]
    for title, text, plots in _sections(folder):
        out.append(f"## {title}\n\n{text}")
        out += [f"![{p.stem}]({p.name})\n" for p in plots]
    if len(out) == 1:
        raise FileNotFoundError(
            f"{folder}: no profile.json, results.json, validation.json or predictions.json"
        )
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a results folder of profile, compare or predict")
    parser.add_argument("--format", choices=("html", "markdown"), default="html")


def run(args: argparse.Namespace) -> int:
    try:
        if args.format == "html":
            path, text = args.folder / "report.html", render_html(args.folder)
        else:
            path, text = args.folder / "report.md", render_markdown(args.folder)
    except (OSError, ValueError, KeyError) as exc:
        print(f"pyproxy bench report: {exc}", file=sys.stderr)
        return 2
    path.write_text(text, encoding="utf-8")
    print(path)
    return 0
