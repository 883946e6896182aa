"""Data files -> (location, record) pairs: JSON lines, a JSON array, or CSV / TSV with a header row; and the small
JSON files a flag names (a checkpoint's config, state or identity: :func:`read_json`).

Locations are 'file:line' (JSON lines, CSV / TSV: the line a row starts on) or 'file: element N' (a JSON array);
an unreadable file stops with a :class:`DataError` naming the file and the line.
"""

import csv
import io
import json

from glmtune.errors import DataError, GlmtuneError

DATA_README = "see data/README.md for the formats"


def read_json(path: str, flag: str, missing: str) -> dict:
    """The JSON file at ``path``, which ``flag`` points to; one :class:`GlmtuneError` line when it is not there
    (``missing``: what to say) or cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GlmtuneError(missing) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise GlmtuneError(f"{flag}: {path} is corrupt: {error}") from None


def is_tabular(path: str) -> bool:
    return path.endswith((".csv", ".tsv"))


def file_records(path: str):
    """(location, record) pairs: 'file:line' for JSON lines and CSV / TSV, 'file: element N' for a JSON array."""
    text = _read_text(path)
    if is_tabular(path):
        return _table_records(path, text, "\t" if path.endswith(".tsv") else ",")
    return _json_records(path, text)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    bom = b"\xef\xbb\xbf"
    body = raw[len(bom) :] if raw.startswith(bom) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + len(raw) - len(body)
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {offset}); save the file as UTF-8") from None


def _json_records(path: str, text: str):
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON array ({error.msg}, column {error.colno})") from None
        for index, value in enumerate(values):
            yield f"{path}: element {index}", value
        return
    # Split on "\n" only: str.splitlines() would also break records at U+2028 and friends, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno}); {DATA_README}"
            ) from None


def _table_records(path: str, text: str, delimiter: str):
    """Rows after the header row as dicts; a row with another number of fields stops with its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, line = None, 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted cell may span lines: name the row's first
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
            elif len(row) != len(header):
                raise DataError(
                    f"{path}:{start}: {len(row)} fields, but the header row has {len(header)} ({', '.join(header)})"
                )
            else:
                yield f"{path}:{start}", dict(zip(header, row))
    except csv.Error as error:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{path}:{reader.line_num}: malformed {kind} ({error})") from None
