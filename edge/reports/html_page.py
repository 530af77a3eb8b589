"""A report as one self-contained HTML page: table, NRBC and rejected cells, chart, flags, gallery."""

from __future__ import annotations

from html import escape

from ..counting.tally import NRBC_CLASS
from .report import CellRecord, ClassCount, Report

# No network, no scripts: the page may only use its own inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#111;max-width:60em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.5em}
.banner{padding:.7em 1em;font-size:1.2em;font-weight:bold;border-radius:4px}
.preliminary{background:#fde68a;border:3px solid #b45309;color:#7c2d12}
.verified{background:#bbf7d0;border:3px solid #15803d;color:#14532d}
table{border-collapse:collapse} td,th{padding:.25em .7em;border-bottom:1px solid #ccc}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{text-align:left}
.flags li{color:#991b1b;font-weight:bold} .none{color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:96px;font-size:.75em;text-align:center}
figure img,.noimg{width:96px;height:96px;object-fit:contain;background:#eee;display:block}
.noimg{line-height:96px;color:#777} .low{color:#b91c1c;font-weight:bold}
"""

# Cells below this confidence are highlighted in the gallery for a second look.
LOW_CONFIDENCE = 0.6
_BAR_W, _ROW_H, _LABEL_W = 360, 26, 110


def render_html(report: Report) -> str:
    """The whole report page as a string; every value from the report is escaped."""
    title = f"White-cell differential: specimen {report.specimen_id}"
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _verification_banner(report),
        _run_table(report),
        _flags_section(report),
        _results_table(report),
        _beside_table(report),
        _bar_chart(report.classes),
        _gallery(report),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _verification_banner(report: Report) -> str:
    kind = "verified" if report.verified else "preliminary"
    text = report.verification if report.verified else (
        "PRELIMINARY: not verified by a person. Do not use for diagnosis until verified.")
    return f'<p class="banner {kind}" id="verification">{_e(text)}</p>'


def _run_table(report: Report) -> str:
    rows = [
        ("Specimen", report.specimen_id), ("Device", report.device_id),
        ("Started", report.started_at), ("Finished", report.finished_at or "not finished"),
        ("Model", f"{report.model.name} {report.model.version}"),
        ("Model SHA-256", report.model.sha256),
        ("Calibration profile", report.calibration_profile_id or "none"),
        ("Target", f"{report.target} cells "
                   f"({'reached' if report.target_reached else 'NOT reached'})"),
        ("Frames", f"{report.frames.used} used, {report.frames.skipped_blur} skipped for blur, "
                   f"{report.frames.skipped_motion} skipped for motion"),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>Run</h2><table>{body}</table>"


def _flags_section(report: Report) -> str:
    if not report.quality_flags:
        return '<h2>Quality flags</h2><p class="none" id="flags">none</p>'
    items = "".join(f"<li>{_e(flag)}</li>" for flag in report.quality_flags)
    return f'<h2>Quality flags</h2><ul class="flags" id="flags">{items}</ul>'


def _results_table(report: Report) -> str:
    head = ("<tr><th>Class</th><th>Count</th><th>% of identified</th>"
            "<th>95 % CI (exact)</th></tr>")
    rows = [f'<tr class="class-row"><td>{_e(c.name)}</td><td class="n">{c.count}</td>'
            f'<td class="n">{c.percent:.1f}</td>'
            f'<td class="n">{c.ci95[0]:.1f} to {c.ci95[1]:.1f}</td></tr>'
            for c in report.classes]
    rows.append(f'<tr><td>unidentified</td><td class="n">{report.unidentified}</td>'
                '<td></td><td></td></tr>')
    total = "total" if report.nrbc is None and not report.rejected else "total (with the cells below)"
    rows.append(f'<tr><th>{total}</th><td class="n">{report.total}</td><td></td><td></td></tr>')
    return f"<h2>Differential</h2><table id=\"results\">{head}{''.join(rows)}</table>"


def _beside_table(report: Report) -> str:
    """Nucleated red cells per 100 WBC and rejected detections, apart from the 100%."""
    rows = []
    if report.nrbc is not None:
        per = "n/a (no white cell identified)" if report.nrbc.per_100_wbc is None \
            else f"{report.nrbc.per_100_wbc:.1f} per 100 WBC"
        rows.append(f'<tr id="nrbc"><td>NRBC (nucleated red cells, {NRBC_CLASS})</td>'
                    f'<td class="n">{report.nrbc.count}</td><td>{_e(per)}</td></tr>')
    rows += [f'<tr class="rejected-row"><td>{_e(r.name)}: not white cells (rejected)</td>'
             f'<td class="n">{r.count}</td><td>not counted in any result</td></tr>' for r in report.rejected]
    if not rows:
        return ""
    head = "<tr><th>Cells</th><th>Count</th><th>Reported as</th></tr>"
    return (f'<h2>Counted beside the differential (not in the 100 %)</h2>'
            f'<table id="beside">{head}{"".join(rows)}</table>')


def _bar_chart(classes: tuple[ClassCount, ...]) -> str:
    height = _ROW_H * len(classes) + 24
    width = _LABEL_W + _BAR_W + 60
    bars = [_bar(i, c) for i, c in enumerate(classes)]
    axis = (f'<text x="{_LABEL_W}" y="{height - 4}" font-size="11">0 %</text>'
            f'<text x="{_LABEL_W + _BAR_W - 30}" y="{height - 4}" font-size="11">100 %</text>')
    return (f'<h2>Chart</h2><svg role="img" '
            f'aria-label="percent of identified cells with 95 % intervals" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{"".join(bars)}{axis}</svg>')


def _bar(index: int, c: ClassCount) -> str:
    y = index * _ROW_H + 4
    mid = y + (_ROW_H - 8) / 2
    x_lo, x_hi = (_LABEL_W + _BAR_W * v / 100 for v in c.ci95)
    return (f'<text x="0" y="{mid + 4:.1f}" font-size="13">{_e(c.name)}</text>'
            f'<rect x="{_LABEL_W}" y="{y}" width="{_BAR_W * c.percent / 100:.1f}" '
            f'height="{_ROW_H - 8}" fill="#2563eb"/>'
            f'<line x1="{x_lo:.1f}" x2="{x_hi:.1f}" y1="{mid:.1f}" y2="{mid:.1f}" '
            f'stroke="#111" stroke-width="2"/>'
            f'<text x="{_LABEL_W + _BAR_W + 6}" y="{mid + 4:.1f}" font-size="12">'
            f'{c.percent:.1f} %</text>')


def _gallery_groups(report: Report) -> list[tuple[str, str]]:
    """(label, heading) of every group of counted cells, in report order."""
    groups = [(c.name, c.name) for c in report.classes]
    if report.nrbc is not None:
        groups.append((NRBC_CLASS, f"{NRBC_CLASS}: NRBC, not in the differential"))
    groups += [(r.name, f"{r.name}: not a white cell (rejected)") for r in report.rejected]
    return groups + [("unidentified", "unidentified")]


def _gallery(report: Report) -> str:
    """Every counted cell, grouped by class (NRBC and rejected ones too, for verification)."""
    sections = ["<h2>Counted cells (lowest confidence first)</h2>"]
    for name, heading in _gallery_groups(report):
        cells = sorted((c for c in report.cells if c.label == name),
                       key=lambda c: (c.confidence, c.id))
        if cells:
            figures = "".join(_figure(c) for c in cells)
            sections.append(f'<h3>{_e(heading)} ({len(cells)})</h3>'
                            f'<div class="gallery" data-class="{_e(name)}">{figures}</div>')
    if len(sections) == 1:
        sections.append('<p class="none">no cell images in this report</p>')
    return "".join(sections)


def _figure(cell: CellRecord) -> str:
    image = (f'<img src="{_e(cell.thumbnail)}" alt="cell {cell.id}">' if cell.thumbnail
             else '<span class="noimg">no image</span>')
    low = ' class="low"' if cell.confidence < LOW_CONFIDENCE else ""
    x, y = cell.slide_xy_um
    return (f'<figure title="cell {cell.id} at x={x:.0f} um, y={y:.0f} um">{image}'
            f'<figcaption{low}>#{cell.id} {cell.confidence:.2f}</figcaption></figure>')
