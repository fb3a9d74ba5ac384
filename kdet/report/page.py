"""The report as blocks (headings, paragraphs, tables, lists, PNG figures), written twice from
the same blocks: one self-contained HTML page (figures inlined as base64 ``data:`` URIs, the
style sheet inline, no script) and a Markdown file whose figures are PNG files beside it."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Figure:
    """A PNG figure; ``name`` is its file name beside the Markdown file (``pr_curves.png``)."""

    name: str
    png: bytes
    caption: str
    width: int | None = None  # display width in CSS pixels; None: the image's own, at most the page's


@dataclass
class Page:
    title: str
    subtitle: str
    blocks: list = field(default_factory=list)


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; }
.text { text-align: left; }
td.text { white-space: normal; min-width: 8em; max-width: 32em; }
caption { caption-side: bottom; color: #555; font-size: 0.9em; padding-top: 0.3em; text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
ul.notes { color: #333; font-size: 0.92em; }
"""


def _is_number(text: str) -> bool:
    """``0.563``, ``0.509 ± 0.004``, ``+0.012``, ``-8%``, ``7.03M``, ``-`` (nothing to show)."""
    head = text.lstrip("+-−").split(" ")[0].rstrip("%MGx")
    try:
        float(head)
        return True
    except ValueError:
        return text == "-"


def _numeric_columns(table: Table) -> list[bool]:
    """Columns whose cells all read as numbers are right-aligned, the others (names, methods,
    paths) left-aligned; the first column, the row names, always at the left."""
    return [i > 0 and all(_is_number(row[i]) for row in table.rows) for i in range(len(table.headers))]


def render_html(page: Page) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(page.title)}</title>",
             f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{e(page.title)}</h1>", f'<p class="subtitle">{e(page.subtitle)}</p>']
    for block in page.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h2>{e(block.text)}</h2>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append('<ul class="notes">' + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            numeric = _numeric_columns(block)
            attrs = ["" if i == 0 or number else ' class="text"' for i, number in enumerate(numeric)]
            rows = ["<tr>" + "".join(f"<th{a}>{e(h)}</th>" for a, h in zip(attrs, block.headers)) + "</tr>"]
            for row in block.rows:
                rows.append("<tr>" + "".join(f"<td{a}>{e(c)}</td>" for a, c in zip(attrs, row)) + "</tr>")
            caption = f"<caption>{e(block.caption)}</caption>" if block.caption else ""
            parts.append(f"<table>{caption}{''.join(rows)}</table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            width = f' width="{block.width}"' if block.width else ""
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.caption)}"{width}>'
                         f"<figcaption>{e(block.caption)}</figcaption></figure>")
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(page: Page) -> str:
    """The Markdown twin; figures are linked by file name (:func:`write_page` writes them)."""
    lines = [f"# {page.title}", "", page.subtitle, ""]
    for block in page.blocks:
        if isinstance(block, Heading):
            lines += [f"## {block.text}", ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---:" if number else "---" for number in _numeric_columns(block)) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
            if block.caption:
                lines += [block.caption, ""]
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.name})", "", f"*{block.caption}*", ""]
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    return "\n".join(lines)


def write_page(page: Page, out: Path) -> tuple[Path, Path]:
    """Write ``out/index.html``, ``out/report.md`` and the figures' PNG files beside them."""
    out.mkdir(parents=True, exist_ok=True)
    names = [b.name for b in page.blocks if isinstance(b, Figure)]
    if len(names) != len(set(names)):
        raise ValueError(f"two report figures share a file name: {names}")
    for block in page.blocks:
        if isinstance(block, Figure):
            (out / block.name).write_bytes(block.png)
    html_path, md_path = out / "index.html", out / "report.md"
    html_path.write_text(render_html(page), encoding="utf-8")
    md_path.write_text(render_markdown(page), encoding="utf-8")
    return html_path, md_path
