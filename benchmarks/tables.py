"""Print the Markdown tables of BENCHMARKS.md from the JSON files `tokencomp bench --json` wrote."""

import json
import sys
from pathlib import Path

from tokencomp.bench import MARKDOWN_HEADER, format_markdown_row

for folder in sys.argv[1:]:
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        for rep in json.loads(path.read_text()):
            rows.append((rep["vision_tokens"], rep["recipe"], format_markdown_row(rep), rep))
    rows.sort(key=lambda r: (r[0], r[1]))
    first = rows[0][3] if rows else None
    if first:
        print(f"{first['device']} {first['dtype']} {first['attn']}, {first['threads']} threads\n")
    print(MARKDOWN_HEADER)
    for _, _, row, _ in rows:
        print(row)
    print()
