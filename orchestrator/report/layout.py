"""The report's layout: run facts and sections as one self-contained HTML page, or as Markdown.

The HTML page carries its style inline and refers to the figures by file name next to it, so it opens from
disk and fetches nothing.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from orchestrator.report.labels import norm
from orchestrator.report.section import Section

__all__ = ["html_page", "markdown_page"]

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: center; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #7a5a00; background: #fff8e0; padding: 0.4em 0.8em; border-left: 3px solid #e0b000; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _html_table(table: pd.DataFrame) -> str:
    text = table.to_html(escape=True, na_rep="", border=0)
    return text.replace("✓ ", "✓<br>").replace("✗ ", "✗<br>")


def html_page(title: str, facts: dict[str, str], sections: list[Section]) -> str:
    """The report as one HTML page: title, run facts (spec.yaml folded away), then each section."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Run facts</h2><table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items() if k != "spec"]
    parts.append("</table>")
    if facts.get("spec"):
        parts.append(f"<details><summary>spec.yaml as run</summary><pre>{e(facts['spec'])}</pre></details>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.intro:
            parts.append(f"<p>{e(s.intro)}</p>")
        parts += [f'<p class="note">{e(n)}</p>' for n in s.notes]
        if s.table is not None and len(s.table):
            parts.append(_html_table(s.table))
        if s.figures:
            parts.append('<div class="figures">')
            parts += [
                f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
                for name, caption in s.figures
            ]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(value: Any) -> str:
    return norm(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: pd.DataFrame) -> str:
    flat = table.reset_index() if not isinstance(table.index, pd.RangeIndex) else table
    header = [_md_cell(c) for c in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join(lines)


def markdown_page(title: str, facts: dict[str, str], sections: list[Section]) -> str:
    """The report as Markdown, the same content as `html_page` (the spec in a <details> block)."""
    parts = [f"# {title}", "", "## Run facts", "", "| fact | value |", "|---|---|"]
    parts += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in facts.items() if k != "spec"]
    if facts.get("spec"):
        parts += [
            "",
            "<details><summary>spec.yaml as run</summary>",
            "",
            "```yaml",
            facts["spec"].rstrip(),
            "```",
            "",
            "</details>",
        ]
    for s in sections:
        parts += ["", f"## {s.title}", ""]
        if s.intro:
            parts += [s.intro, ""]
        parts += [f"> {n}" for n in s.notes]
        if s.table is not None and len(s.table):
            parts += [_md_table(s.table), ""]
        parts += [f"![{caption}]({name})" for name, caption in s.figures]
    return "\n".join(parts) + "\n"
