"""The self-contained HTML report: the Markdown the report writes, rendered, plots embedded."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

from ray_fedit.report_html import inline, markdown_to_html, write_html

MD = """# Report of `runs/x`

- model: **smollm2**
- ids [0, 2]; see [docs](docs/report.md)

| Method | safe (%) ↑ | note |
|---|---|---|
| FedAvg | 50.0 [35.4, 62.6] n=48 | a \\| b |
| + defense | <b>31.2</b> | `x\\|y` |

Some text
on two lines.

![Loss per round](loss.png)

![Absent](absent.png)

```
  keep   spacing <here>
```
"""


def test_the_markdown_the_report_writes_renders():
    page = markdown_to_html(MD, Path("/nonexistent"))
    assert "<h1>Report of <code>runs/x</code></h1>" in page
    assert "<li>model: <strong>smollm2</strong></li>" in page
    assert '<a href="docs/report.md">docs</a>' in page
    assert "<th>safe (%) ↑</th>" in page
    assert "<td>a | b</td>" in page  # an escaped pipe stays in its cell
    assert "<td>&lt;b&gt;31.2&lt;/b&gt;</td>" in page  # text is escaped, never markup
    assert "<td><code>x|y</code></td>" in page
    assert "<p>Some text on two lines.</p>" in page
    assert "<pre>  keep   spacing &lt;here&gt;</pre>" in page
    assert page.count("<tr>") == 3 and "---" not in page
    assert '<p class="missing">plot not found: loss.png</p>' in page  # named, not dropped


def test_inline_code_is_not_markup():
    assert inline("`**a**` and **b**") == "<code>**a**</code> and <strong>b</strong>"


def test_links_keep_their_url_and_never_run_script():
    assert inline("[q](https://x.org/?a=1&b=2)") == '<a href="https://x.org/?a=1&amp;b=2">q</a>'
    assert inline("[run](javascript:void)") == "run"
    assert inline("[img](data:text/html,x)") == "img"
    assert inline("[plot](loss.png)") == '<a href="loss.png">plot</a>'


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        self.refs += [(tag, v) for k, v in attrs if k in ("src", "href") and v]


def test_a_run_report_is_one_self_contained_page(tmp_path):
    from ray_fedit.report import write_report
    from tests.unit.test_report import make_run

    run = make_run(tmp_path / "run")
    paths = write_report(run)
    page_path = run / "report" / "report.html"
    assert page_path in paths
    md = (run / "report" / "tables.md").read_text()
    page = _Page()
    page.feed(page_path.read_text())
    assert page.tables == len(re.findall(r"^\|---", md, flags=re.M)) >= 1
    plots = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", md, flags=re.M)
    images = [v for tag, v in page.refs if tag == "img"]
    assert len(images) == len(plots) >= 4
    for name, src in zip(plots, images, strict=True):  # each plot's own bytes, in place
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (run / "report" / name).read_bytes()
    assert all(tag == "img" or v.startswith(("http", "#")) for tag, v in page.refs), page.refs


def test_write_html_puts_the_page_beside_the_markdown(tmp_path):
    (tmp_path / "tables.md").write_text("# T\n")
    out = write_html(tmp_path / "tables.md", "a <title>")
    assert out == tmp_path / "report.html"
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>a &lt;title&gt;</title>" in text
