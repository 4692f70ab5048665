"""The report as one self-contained HTML file, to send or open anywhere.

It renders the Markdown the report writes (``tables.md``) with its plots embedded as base64 data
URIs, so ``report.html`` needs no other file, no network and no script. The renderer covers the
Markdown the report uses, and nothing more: ``#`` headings, pipe tables (``\\|`` escapes a pipe
in a cell), ``![caption](plot.png)`` lines, ``- `` lists, fenced code blocks, paragraphs, and inline
`` `code` ``, ``**bold**`` and ``[text](url)`` links. An image that is not there is named in the
page instead of silently dropped.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #1b1b1b; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { font-family: ui-monospace, monospace; background: #f4f4f4; }
pre { padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 13px; }
.missing { color: #a00; }
"""

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def inline(text: str) -> str:
    """Escape ``text`` and render `` `code` ``, ``**bold**`` and ``[text](url)``."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]+)`", text):  # code first: nothing inside it is markup
        out.append(_emphasis(text[pos: m.start()]))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    out.append(_emphasis(text[pos:]))
    return "".join(out)


def _link(match: re.Match[str]) -> str:
    text, url = match.group(1), html.unescape(match.group(2))
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        return text  # no javascript: or data: links in a page that promises no script
    return f'<a href="{html.escape(url)}">{text}</a>'


def _emphasis(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", _link, text)


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _table(lines: list[str]) -> str:
    header, rows = _cells(lines[0]), lines[1:]
    if rows and re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", rows[0].strip()):
        rows = rows[1:]
    head = "".join(f"<th>{inline(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in _cells(r)) + "</tr>\n"
                   for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _figure(alt: str, src: str, base: Path) -> str:
    path = base / src
    mime = _MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return f'<p class="missing">plot not found: {html.escape(src)}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{inline(alt)}</figcaption></figure>")


def markdown_to_html(markdown: str, base: Path) -> str:
    """The body of the page for ``markdown``; images are read relative to ``base``."""
    lines = markdown.splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")),
                       len(lines))
            out.append("<pre>" + html.escape("\n".join(lines[i + 1: end])) + "</pre>")
            i = end + 1
            continue
        if stripped.startswith("|"):
            flush()
            end = i
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out.append(_table(lines[i:end]))
            i = end
            continue
        if stripped.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        heading, image = _HEADING.match(stripped), _IMAGE.match(stripped)
        if heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif image:
            flush()
            out.append(_figure(image.group("alt"), image.group("src"), base))
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


def write_html(md_path: Path, title: str) -> Path:
    """Render ``md_path`` (and the plots it names, beside it) into ``report.html`` beside it."""
    md_path = Path(md_path)
    body = markdown_to_html(md_path.read_text(encoding="utf-8"), md_path.parent)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")
    out = md_path.parent / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
