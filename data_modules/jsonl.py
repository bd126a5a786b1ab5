"""Read preference files line by line, failing with the file and line of the first bad record."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Sequence

from rm_lightning.errors import DataError
from rm_lightning.pairs import check_text_fields

DATA_ENV = "RM_LIGHTNING_DATA"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where the shared reference data lives: ``$RM_LIGHTNING_DATA``, default ``../shared/data``."""
    return Path(os.environ.get(DATA_ENV, _PROJECT_ROOT.parent / "shared" / "data")).expanduser()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists (absolute or relative to the working dir), else under ``data_root()``,
    else under the project folder (its shipped examples, e.g. ``examples/persona_conversations/train.jsonl``,
    from any working dir)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    for root in (data_root(), _PROJECT_ROOT):
        if (root / candidate).exists():
            return root / candidate
    return candidate


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # what ``data_modules.files.located_records`` reads


def existing_file(path: str | os.PathLike) -> Path:
    """The file ``path`` names (as given, or under the data root), or one DataError line.

    A folder is named a folder, with the data files in it: "not found" or "unknown file type '(no
    suffix)'" for a folder that is right there (a downloaded dataset's, ``ultrafeedback`` for
    ``ultrafeedback/train.jsonl``) sent the user looking for the wrong mistake.
    """
    resolved = resolve_data_path(path)
    if resolved.is_dir():
        files = sorted(p.name for p in resolved.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        shown = ", ".join(files[:8]) + (f" (and {len(files) - 8} more)" if len(files) > 8 else "")
        holds = f"its data files: {shown}" if files else f"it holds no {', '.join(DATA_SUFFIXES)} file"
        raise DataError(f"{resolved}: a folder, not a data file; {holds}")
    if not resolved.is_file():
        raise DataError(f"data file not found: {path} ({where_looked(path)})")
    return resolved


def where_looked(path: str | os.PathLike) -> str:
    """Every folder ``resolve_data_path`` searched and, when one holds a file of a near name, that file's path as
    it would be given. Naming only the last place tried (the project folder) hid that the data root was searched,
    and asked to set ``$RM_LIGHTNING_DATA`` when it was set: a misspelt name sent the user after the wrong fix."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        roots, looked = [Path("/")], f"looked at {candidate}"
    else:
        data_label = f"${DATA_ENV}" if DATA_ENV in os.environ else f"default data folder; set ${DATA_ENV} to move it"
        named: dict[Path, str] = {}
        for root, label in ((Path.cwd().resolve(), "working folder"), (data_root().resolve(), data_label),
                            (_PROJECT_ROOT, "project folder")):
            named.setdefault(root, label)  # a folder that is two of them is named once, by the first
        roots = list(named)
        looked = "looked under " + ", ".join(f"{root} ({label})" for root, label in named.items())
    for root in roots:
        folder = root / candidate.parent
        names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        near = difflib.get_close_matches(candidate.name, names, n=1, cutoff=0.75)
        if near:
            return f"{looked}; did you mean {candidate.parent / near[0]}?"
    return looked


def read_jsonl(path: str | os.PathLike, fields: Sequence[str] = ()) -> list[dict]:
    """All records of a JSON Lines file; each must be an object with string ``fields``."""
    return [record for _, record in located_jsonl(path, fields)]


def may_hold_surrogate(text: str) -> bool:
    """Whether JSON ``text`` escapes a UTF-16 surrogate (``\\ud800`` to ``\\udfff``, either case): a test on the
    raw text, so that records without one (nearly all) are never re-encoded."""
    return "\\ud" in text or "\\uD" in text


def reject_lone_surrogates(record: dict, where: str) -> None:
    """JSON may escape half of a UTF-16 pair (``"\\ud800"``, common in scraped text): Python reads it as a
    string the tokenizer cannot encode, which failed deep inside it without the line."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: holds a lone UTF-16 surrogate (\\u{ord(err.object[err.start]):04x}), which is "
                        f"not text; remove it or pair it") from None


def located_jsonl(path: str | os.PathLike, fields: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """(``file:line``, record) for every record of a JSON Lines file (UTF-8; each an object with string ``fields``)."""
    resolved = existing_file(path)
    records = []
    with open(resolved, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{resolved}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                                f"the line); data files must be UTF-8 encoded") from None
            if not line.strip():
                continue
            try:  # without its line break: a record cut short is then named at its own end, not "at column 1"
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                # a lone "[" or "{" opens JSON written over several lines (json.dump's indent), which JSON Lines is not
                spread = line.strip() in ("[", "{")
                rename = "" if resolved.suffix.lower() == ".json" else " (or name the file .json)"
                hint = (f"; this looks like JSON spread over several lines: JSON Lines has one record per "
                        f"line{rename}") if spread else ""
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}){hint}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if may_hold_surrogate(line):
                reject_lone_surrogates(record, where)
            check_text_fields(record, fields, where)
            records.append((where, record))
    if not records:
        raise DataError(f"{resolved}: no records")
    return records
