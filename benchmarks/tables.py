"""Render the tables of BENCHMARKS.md from the JSON files `tokencomp bench --json` wrote.

    python benchmarks/tables.py benchmarks/cpu                 # print the table
    python benchmarks/tables.py benchmarks/cpu --update BENCHMARKS.md
        # replace the text between <!-- table:cpu --> and <!-- /table:cpu --> with it
"""

import argparse
import json
import re
from pathlib import Path

from tokencomp.bench import MARKDOWN_HEADER, format_markdown_row


def table(folder: Path) -> str:
    reps = [rep for path in sorted(folder.glob("*.json")) for rep in json.loads(path.read_text())]
    reps.sort(key=lambda r: (r["vision_tokens"], r["recipe"]))
    if not reps:
        return "(no results)"
    first = reps[0]
    lines = [
        f"Device {first['device']}, {first['dtype']}, {first['attn']}, {first['threads']} threads; "
        f"models: {', '.join(sorted({r.get('model_spec', r['model']) for r in reps}))}.",
        "",
        MARKDOWN_HEADER,
    ]
    lines += [format_markdown_row(r) for r in reps]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--update", type=Path)
    args = ap.parse_args()
    text = table(args.folder)
    if not args.update:
        print(text)
        return
    tag = args.folder.name
    doc = args.update.read_text()
    pattern = re.compile(rf"(<!-- table:{tag} -->\n).*?(\n<!-- /table:{tag} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{args.update} has no <!-- table:{tag} --> markers")
    args.update.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), doc))


if __name__ == "__main__":
    main()
