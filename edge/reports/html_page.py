"""A report as one self-contained HTML page: table, NRBC and rejected cells, chart, flags, gallery."""

from __future__ import annotations

from datetime import datetime
from html import escape

from ..counting.checks import FULL_REVIEW_BANNER
from ..counting.tally import NRBC_CLASS
from .report import CellRecord, ClassCount, Report

# No network, no scripts: the page may only use its own inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#111;max-width:60em;overflow-wrap:break-word}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.5em}
.banner{padding:.7em 1em;font-size:1.2em;font-weight:bold;border-radius:4px}
.preliminary{background:#fde68a;border:3px solid #b45309;color:#7c2d12}
.verified{background:#bbf7d0;border:3px solid #15803d;color:#14532d}
.full-review{background:#fee2e2;border:3px solid #b91c1c;color:#7f1d1d}
table{border-collapse:collapse;max-width:100%} td,th{padding:.25em .6em;border-bottom:1px solid #ccc}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} th{text-align:left}
.flags li{color:#991b1b;margin-bottom:.3em} .flags code{font-weight:bold} .none{color:#555}
.note{color:#444;font-size:.9em}
.chart{width:100%;max-width:480px;height:auto;display:block} #run td{overflow-wrap:anywhere}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:160px;font-size:.75em;text-align:center}
figure a{display:block;color:inherit;text-decoration:none}
figure img,.noimg{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.noimg{line-height:160px;color:#777} .low{color:#b91c1c;font-weight:bold} .field{display:block;color:#555}
figure:target{width:100%} figure:target img{width:min(448px,100%);height:auto;outline:3px solid #2563eb}
@media (max-width:480px){body{margin:.5em;font-size:15px} td,th{padding:.2em .3em}}
@page{size:A4;margin:12mm}
@media print{
body{margin:0;max-width:none;font-size:10pt}
.banner{-webkit-print-color-adjust:exact;print-color-adjust:exact}
.chart{max-width:120mm}
figure{width:27mm;font-size:7pt} figure img,.noimg{width:27mm;height:27mm;line-height:27mm}
figure:target{width:27mm} figure:target img{width:27mm;height:27mm;outline:none}
figure,tr,.chart{break-inside:avoid} h2,h3{break-after:avoid}
}
"""

# Cells below this confidence are highlighted in the gallery for a second look.
LOW_CONFIDENCE = 0.6
_BAR_W, _ROW_H, _LABEL_W = 240, 26, 100


def render_html(report: Report) -> str:
    """The whole report page as a string; every value from the report is escaped. It reads on a phone
    (400 px) and prints on A4; times are shown in this machine's local time with the UTC offset."""
    title = f"White-cell differential: specimen {report.specimen_id}"
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _verification_banner(report),
        _full_review_banner(report),
        _flags_section(report),
        _run_table(report),
        _results_table(report),
        _beside_table(report),
        _bar_chart(report.classes),
        _audit_trail(report),
        _gallery(report),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def local_time(iso: str) -> str:
    """An ISO 8601 time in this machine's local time with its offset, e.g. "2024-05-06 11:30:00 (UTC+02:00)";
    text that is not an ISO time is returned as it is."""
    try:
        when = datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso
    offset = when.strftime("%z")
    return f"{when:%Y-%m-%d %H:%M:%S} (UTC{offset[:3]}:{offset[3:]})"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _verification_banner(report: Report) -> str:
    kind = "verified" if report.verified else "preliminary"
    text = report.verification_text if report.verified else (
        "PRELIMINARY: not verified by a person. Do not use for diagnosis until verified.")
    return f'<p class="banner {kind}" id="verification">{_e(text)}</p>'


def _full_review_banner(report: Report) -> str:
    if not report.needs_full_review:
        return ""
    return f'<p class="banner full-review" id="full-review">{_e(FULL_REVIEW_BANNER)}</p>'


def _audit_trail(report: Report) -> str:
    """The cells the person who signed changed, in order (verified reports only)."""
    if not report.verified:
        return ""
    if not report.changes:
        return '<h2>Changes before sign-off</h2><p class="none" id="changes">none: every cell as classified</p>'
    head = "<tr><th>Cell</th><th>From</th><th>To</th><th>By</th><th>When</th></tr>"
    rows = "".join(f'<tr><td><a href="#cell-{c.cell}">#{c.cell}</a></td><td>{_e(c.from_label)}</td>'
                   f"<td>{_e(c.to_label)}</td><td>{_e(c.operator)}</td><td>{_e(local_time(c.at))}</td></tr>"
                   for c in report.changes)
    return f'<h2>Changes before sign-off</h2><table id="changes">{head}{rows}</table>'


def _run_table(report: Report) -> str:
    rows = [
        ("Specimen", report.specimen_id),
        *((("Accession number", report.accession),) if report.accession else ()),
        *((("Counted by", report.operator),) if report.operator else ()),
        ("Device", report.device_id),
        ("Started", local_time(report.started_at)),
        ("Finished", local_time(report.finished_at) if report.finished_at else "not finished"),
        ("Model", f"{report.model.name} {report.model.version}"),
        *((("Model bundle", report.model.meta_sha256),) if report.model.meta_sha256 else ()),
        *((("Model exported", report.model.created_at),) if report.model.created_at else ()),
        ("Model SHA-256", report.model.sha256),
        ("Calibration profile", report.calibration_profile_id or "none"),
        ("Target", f"{report.target} cells "
                   f"({'reached' if report.target_reached else 'NOT reached'})"),
        ("Frames", f"{report.frames.used} used, {report.frames.skipped_blur} skipped for blur, "
                   f"{report.frames.skipped_motion} skipped for motion"),
        ("White count", "not entered" if report.wbc_10e9_per_l is None
         else f"{report.wbc_10e9_per_l:g} x10^9/L (entered by the operator)"),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<h2>Run</h2><table id="run">{body}</table>'


def _flags_section(report: Report) -> str:
    """Each flag's message (what is wrong and what to do), worst first, with its code."""
    if not report.flags:
        return '<h2>Flags</h2><p class="none" id="flags">none</p>'
    items = "".join(f'<li data-code="{_e(f.code)}">{_e(f.message)} <code>{_e(f.code)}</code></li>'
                    for f in report.flags)
    return f'<h2>Flags</h2><ul class="flags" id="flags">{items}</ul>'


def _results_table(report: Report) -> str:
    wbc = report.wbc_10e9_per_l is not None
    head = ("<tr><th>Class</th><th>Count</th><th>%</th><th>95 % CI</th>"
            + ('<th title="absolute count">x10^9/L</th>' if wbc else "") + "</tr>")
    rows = [f'<tr class="class-row"><td>{_e(c.name)}</td><td class="n">{c.count}</td>'
            f'<td class="n">{c.percent:.1f}</td>'
            f'<td class="n">{c.ci95[0]:.1f}\u2013{c.ci95[1]:.1f}</td>'
            + (f'<td class="n absolute">{report.absolute(c):.2f}</td>' if wbc else "") + "</tr>"
            for c in report.classes]
    empty = "<td></td>" * (3 if wbc else 2)
    rows.append(f'<tr><td>unidentified</td><td class="n">{report.unidentified}</td>{empty}</tr>')
    total = "total" if report.nrbc is None and not report.rejected else "total (with the cells below)"
    rows.append(f'<tr><th>{total}</th><td class="n">{report.total}</td>{empty}</tr>')
    note = ("%: of the identified cells (unidentified ones are not in the 100 %); 95 % CI: the exact binomial "
            "interval of that percent.")
    if wbc:
        note += (f" x10^9/L: the absolute count, the white count entered ({report.wbc_10e9_per_l:g} x10^9/L) "
                 "times the percent.")
    return f'<h2>Differential</h2><table id="results">{head}{"".join(rows)}</table><p class="note">{note}</p>'


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
    return (f'<h2>Chart</h2><svg class="chart" role="img" '
            f'aria-label="percent of identified cells with 95 % intervals" '
            f'viewBox="0 0 {width} {height}">{"".join(bars)}{axis}</svg>')


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
    sections = ["<h2>Counted cells (lowest confidence first)</h2>",
                '<p class="note">Select a cell to enlarge it. Grey beyond an orange line: outside the field.</p>']
    for name, heading in _gallery_groups(report):
        cells = sorted((c for c in report.cells if c.label == name),
                       key=lambda c: (c.confidence, c.id))
        if cells:
            figures = "".join(_figure(c) for c in cells)
            sections.append(f'<h3>{_e(heading)} ({len(cells)})</h3>'
                            f'<div class="gallery" data-class="{_e(name)}">{figures}</div>')
    if len(sections) == 2:
        sections.append('<p class="none">no cell images in this report</p>')
    return "".join(sections)


def _figure(cell: CellRecord) -> str:
    """One gallery cell: a link to itself, so that selecting it enlarges it (CSS :target, no script)."""
    image = (f'<img src="{_e(cell.thumbnail)}" alt="cell {cell.id}">' if cell.thumbnail
             else '<span class="noimg">no image</span>')
    low = ' class="low"' if cell.confidence < LOW_CONFIDENCE else ""
    x, y = cell.slide_xy_um
    where = f"{cell.field}, " if cell.field else ""
    field = f'<span class="field">{_e(cell.field)}</span>' if cell.field else ""
    return (f'<figure id="cell-{cell.id}" title="cell {cell.id}: {_e(where)}x={x:.0f} um, y={y:.0f} um">'
            f'<a href="#cell-{cell.id}">{image}</a>'
            f'<figcaption><span{low}>#{cell.id} {cell.confidence:.2f}</span>{field}</figcaption></figure>')
