"""Validates a job report page (HTML) and says what it shows.

Parses the page with html5lib in strict mode (any parse error is a failure: the page must be
valid HTML5) and prints one JSON object: the section headings, the stage boxes of the graph,
the task bars of the timeline, the checks' rows, the elements the page holds (a sample row
with markup in it must stay text, never become an element), and its whole text.

Usage: check_report.py PAGE.html   (or - for standard input)
"""

import json
import sys

import html5lib

NS = "{http://www.w3.org/1999/xhtml}"
SVG = "{http://www.w3.org/2000/svg}"


def text(element):
    return "".join(element.itertext())


def main():
    source = sys.stdin.buffer.read() if sys.argv[1] == "-" else open(sys.argv[1], "rb").read()
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=True)
    try:
        document = parser.parse(source)
    except html5lib.html5parser.ParseError as error:
        print(json.dumps({"valid": False, "error": str(error)}))
        return
    tags = sorted({element.tag.split("}")[-1] for element in document.iter() if isinstance(element.tag, str)})
    svgs = document.findall(f".//{SVG}svg")
    graph = [s for s in svgs if s.get("aria-label") == "stage graph"]
    timeline = [s for s in svgs if s.get("aria-label") == "task timeline"]
    stage_boxes = [text(g.find(f"{SVG}title")) for g in graph[0].iter(f"{SVG}g")] if graph else []
    task_bars = [text(r.find(f"{SVG}title")) for r in timeline[0].iter(f"{SVG}rect")] if timeline else []
    checks = []
    for row in document.iter(f"{NS}tr"):
        cells = row.findall(f"{NS}td")
        if len(cells) == 4 and cells[0].find(f"{NS}code") is not None:
            checks.append([text(c).strip() for c in cells])
    print(
        json.dumps(
            {
                "valid": True,
                "title": text(document.find(f".//{NS}title")),
                "headings": [text(h) for h in document.iter(f"{NS}h2")],
                "stage_boxes": stage_boxes,
                "task_bars": task_bars,
                "checks": checks,
                "tags": tags,
                "bold": [text(b) for b in document.iter(f"{NS}b")],
                "text": text(document),
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
