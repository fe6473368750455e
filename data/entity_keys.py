"""Named-entity keys of texts (spaCy): the key of a document for entity-keyed memory routing.

"Entities as Experts" (Févry et al. 2020) routes by the entities a text mentions. Here a document's key
is the first named entity of one of KEY_LABELS in its first window; a prompt is routed by the first of
its entities that is a known key. Names, places and organisations identify whose facts a text needs;
dates and numbers do not (they are the answers), so they are not keys.
"""
from __future__ import annotations

KEY_LABELS = ("PERSON", "ORG", "GPE", "LOC", "FAC", "NORP", "EVENT", "WORK_OF_ART", "PRODUCT", "LAW", "LANGUAGE")


def keys_fingerprint(labels=KEY_LABELS) -> str:
    """8 hex characters naming what entity keys depend on: the spaCy pipeline `load_spacy()` loads first
    (installed package and version, read without loading it) and the key labels. Caches of keys carry it,
    so keys made by another pipeline are never reused."""
    import hashlib
    import importlib.metadata

    from data.tagging import SPACY_MODELS

    pipeline = "none"
    for name in SPACY_MODELS:
        try:
            pipeline = f"{name}=={importlib.metadata.version(name)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return hashlib.sha256(f"{pipeline}|{','.join(labels)}".encode()).hexdigest()[:8]


def entity_keys(texts: list[str], nlp=None, batch_size: int = 128, labels=KEY_LABELS) -> list[list[str]]:
    """For each text, the texts of its named entities with a label in `labels`, in order of appearance
    (duplicates removed). `nlp`: a spaCy pipeline (default: data.tagging.load_spacy())."""
    if nlp is None:
        from data.tagging import load_spacy

        nlp = load_spacy()
    wanted = set(labels)
    out = []
    with nlp.select_pipes(enable=ner_pipes(nlp)):  # the same entities, without the tagger's work
        for doc in nlp.pipe(texts, batch_size=batch_size):
            seen: list[str] = []
            for ent in doc.ents:
                if ent.label_ in wanted and ent.text not in seen:
                    seen.append(ent.text)
            out.append(seen)
    return out


def ner_pipes(nlp) -> list[str]:
    """The pipes the entity recogniser needs: `ner`, and the shared `tok2vec` only when `ner` listens to it
    (in en_core_web_sm, `ner` has a tok2vec of its own, so tok2vec, tagger and attribute_ruler can rest)."""
    try:
        arch = nlp.config["components"]["ner"]["model"]["tok2vec"]["@architectures"]
    except KeyError:  # an unusual pipeline: run all of it
        return list(nlp.pipe_names)
    return [p for p in nlp.pipe_names if p == "ner" or (p == "tok2vec" and "Listener" in arch)]
