"""Markdown tables: written by the benchmark and check reports, read back by the GPU check's report."""
from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def read_tables(text: str) -> list[list[dict[str, str]]]:
    """Every table in markdown `text`, as rows keyed by the header (cells stripped, bold marks removed)."""
    tables, header, rows = [], None, []
    for line in [*text.splitlines(), ""]:
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            if header is not None:
                tables.append(rows)
            header, rows = None, []
        elif header is None:
            header = cells
        elif not all(set(c) <= set("-:") for c in cells):  # the separator line
            rows.append(dict(zip(header, cells, strict=False)))
    return tables
