"""Read a local data file of any common format into records, each with where it came from.

JSON Lines (``.jsonl``), JSON (``.json``: an array of objects, or JSON Lines under that name, as
``datasets`` accepts), Parquet (``.parquet``) and CSV (``.csv``, with a header row). Every record
comes back with its location (``file:line`` for JSONL and CSV, ``file row N`` for JSON arrays and
Parquet), so an error about a field names the row that holds it. Nothing here needs a network.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from data_modules.jsonl import (DATA_SUFFIXES, existing_file, located_jsonl, may_hold_surrogate, reject_lone_surrogates,
                                resolve_data_path)
from rm_lightning.errors import DataError, first_line

Located = list[tuple[str, dict]]
FILE_SUFFIXES = DATA_SUFFIXES
CSV_FIELD_LIMIT = 2**31 - 1  # the largest the csv module takes on every platform (a C long)


def located_records(path: str | os.PathLike) -> Located:
    """(location, record) for every record of a local file, by its suffix (``FILE_SUFFIXES``)."""
    suffix = Path(path).suffix.lower()
    if resolve_data_path(path).is_dir():
        existing_file(path)  # a folder: named as one, with its data files
    readers = {".jsonl": located_jsonl, ".json": located_json, ".parquet": located_parquet, ".csv": located_csv}
    if suffix not in readers:
        raise DataError(f"{path}: unknown data file type {suffix or '(no suffix)'!r}; expected one of "
                        f"{', '.join(FILE_SUFFIXES)}")
    return readers[suffix](path)


def _objects(resolved: Path, rows: list, kind: str) -> Located:
    """Rows numbered from 1, each checked to be an object (a mapping of column -> value)."""
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{resolved} row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a {kind} object (column -> value), got {type(row).__name__}")
        records.append((where, row))
    if not records:
        raise DataError(f"{resolved}: no records")
    return records


def located_json(path: str | os.PathLike) -> Located:
    """A JSON array of objects (or one object); a file of one object per line is read as JSON Lines."""
    resolved = existing_file(path)
    try:
        text = resolved.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{resolved}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte {err.start + 1}); "
                        f"data files must be UTF-8 encoded") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: JSON Lines under a .json name
            return located_jsonl(resolved)
        raise DataError(f"{resolved}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(content, dict):  # a single object: one line of JSON Lines, or one pretty-printed record
        wrapped = next((key for key, value in content.items() if isinstance(value, list) and value
                        and all(isinstance(v, dict) and "role" not in v for v in value)), None)  # not a conversation
        if wrapped is not None:  # {"data": [...]}: read as one record, it was "missing field 'prompt' (has: data)"
            raise DataError(f"{resolved}: one JSON object whose {wrapped!r} holds {len(content[wrapped])} records; the "
                            f"file's top level must be the list of records (or one record per line)")
        content = [content]
    if not isinstance(content, list):
        raise DataError(f"{resolved}: expected a JSON array of objects (or one object per line), "
                        f"got a {type(content).__name__}")
    records = _objects(resolved, content, "JSON")
    if may_hold_surrogate(text):
        for where, record in records:
            reject_lone_surrogates(record, where)
    return records


def located_parquet(path: str | os.PathLike) -> Located:
    """The rows of a Parquet file as Python values (nested lists and structs included)."""
    resolved = existing_file(path)
    try:
        import pyarrow.parquet as parquet

        rows = parquet.read_table(resolved).to_pylist()
    except ImportError:
        raise DataError(f"{resolved}: reading Parquet needs pyarrow (installed with `datasets`)") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{resolved}: not a readable Parquet file ({first_line(err)[:160]})") from None
    return _objects(resolved, rows, "Parquet")


def located_csv(path: str | os.PathLike) -> Located:
    """The rows of a CSV file with a header row; each located at the line it starts on."""
    resolved = existing_file(path)
    records = []
    # the csv module refuses a cell over 128 KiB ("field larger than field limit"): a long document is valid CSV,
    # which the length caps drop or cut later, as they do the same record in JSON Lines
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        with open(resolved, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            other = next((sep for sep in (";", "\t", "|") if len(header) == 1 and sep in header[0]), None)
            if other:  # a spreadsheet's export in a locale that separates by ';': "missing field 'prompt'" hid it
                raise DataError(f"{resolved}:1: the header is one column, {header[0]!r}: fields separated by "
                                f"{other!r} rather than ','? A .csv file here is comma-separated")
            start = 2  # the line after the header
            for row in reader:
                where = f"{resolved}:{start}"
                if None in row:
                    raise DataError(f"{where}: more values than the header's {len(reader.fieldnames)} columns")
                records.append((where, {name: value for name, value in row.items() if value is not None}))
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DataError(f"{resolved}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                        f"data files must be UTF-8 encoded") from None
    except csv.Error as err:
        raise DataError(f"{resolved}: not valid CSV ({err})") from None
    if not records:
        raise DataError(f"{resolved}: no records")
    return records
