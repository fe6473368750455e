"""`bios`: a seeded generator of synthetic biographies with a ground-truth knowledge base.

Each person has fixed attributes (birth date, birth city, university, field, employer, employer city,
...). A document is one short biography paragraph about one person: the name, then a random subset
of the person's attributes, each rendered by one of several paraphrase templates, in random order.
The number of documents per person follows a Zipf law over a random ranking of people, so a few
people appear hundreds of times and most only a handful of times.

The *answer string* of an attribute appears verbatim in every sentence that states it, so the number
of times a probe's answer occurs in the person's training documents is exact. That count (computed
from the training split only, see `probes_from_docs`) and its frequency bucket are stored per probe.

Default size (2,000 people, max 800 documents per person): ~14k documents, ~1M BPE tokens, which
trains a tiny model on a 2-core CPU in minutes. Same seed -> byte-identical output.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from model.atomic import atomic_write
from model.errors import ConfigError, DataError, check_range

# --- value pools (invented combinations; names are common given/family names) ---------------------
FIRST_F = """Ada Alice Amelia Anna Audrey Beatrice Camille Charlotte Clara Daisy Dora Edith Eleanor Elena
Eliza Emma Esther Eva Fiona Flora Frances Grace Hannah Harriet Helen Ida Irene Iris Isabel Jane Julia
June Laura Lena Lillian Lucy Lydia Mabel Margaret Maria Marion Martha Maya Miriam Naomi Nina Nora Olive
Olivia Paula Pearl Rosa Ruth Sarah Sofia Stella Susan Tessa Vera Violet Wendy Zoe""".split()
FIRST_M = """Aaron Adrian Albert Alfred Andrew Arthur Benjamin Bernard Caleb Carl Charles Daniel David Edgar
Edmund Edward Elias Ernest Felix Frank George Gilbert Harold Henry Hugo Isaac Jacob James Jonah Joseph
Julian Karl Leo Leonard Louis Lucas Marcus Martin Matthew Max Nathan Oliver Oscar Owen Patrick Paul Peter
Philip Ralph Raymond Robert Samuel Simon Stefan Thomas Tobias Victor Walter William""".split()
LAST = """Abbott Acosta Adler Alvarez Andersen Archer Arnold Atkins Bailey Baker Barker Becker Bennett Berg
Bishop Blake Bowen Boyd Bradley Brandt Brennan Brooks Bryant Burke Caldwell Cameron Carlson Carter Castillo
Chambers Chandler Chen Clarke Coleman Collins Conway Cooper Crawford Cross Dalton Daniels Dawson Decker
Delgado Dixon Doyle Drake Duncan Dunn Eastman Ellis Engel Erikson Farrell Fischer Fleming Fletcher Ford
Foster Franklin Fuller Garrison Gibson Gilbert Graham Grant Griffin Hahn Hale Hammond Hansen Hardy Harper
Hartmann Hayes Hoffman Holland Horvath Hughes Ingram Jensen Kaplan Keller Kennedy Kimura Klein Koch Larsen
Lawson Lindqvist Lowell Lucero Maddox Marsh Mendez Mercer Meyer Molina Moreau Morrison Nakamura Navarro
Nielsen Novak Olsen Ortega Palmer Park Pearson Perrin Petrov Porter Quinn Ramirez Reed Reyes Richter Romero
Rossi Russo Salazar Sanders Schmidt Schneider Serrano Shaw Silva Sinclair Sorensen Spencer Stanton Sterling
Sullivan Tanaka Thornton Torres Tucker Vance Vargas Vogel Wagner Walsh Warren Weber Whitaker Winter Yamada
Young Zimmerman Osborne Whitfield Abernathy""".split()
CITIES = """Amsterdam Athens Atlanta Auckland Baltimore Barcelona Berlin Bogota Boston Brisbane
Brussels Budapest Cairo Calgary Copenhagen Dallas Denver Dresden Florence Geneva
Glasgow Hamburg Helsinki Houston Istanbul Jakarta Lagos Leeds Leipzig Lima Lisbon Liverpool Lyon
Madrid Manchester Marseille Milan Montreal Moscow Nairobi Naples Oslo Ottawa Oxford Paris
Perth Philadelphia Pittsburgh Porto Prague Quebec Rotterdam Salzburg Santiago Seattle Seville
Shanghai Singapore Stockholm Stuttgart Sydney Tallinn Turin Valencia Vancouver Venice 
Warsaw """.split()
UNIVERSITIES = [
    "Harvard University", "Yale University", "Princeton University", "Stanford University",
    "Columbia University", "Cornell University", "Duke University", "Rice University",
    "Brown University", "Purdue University", "Tufts University", "Emory University",
    "the University of Chicago", "the University of Michigan", "the University of Toronto",
    "the University of Cambridge", "the University of Edinburgh", "the University of Vienna",
    "the University of Tokyo", "the University of Melbourne", "the Sorbonne", "ETH Zurich",
    "Heidelberg University", "Leiden University", "Uppsala University", "McGill University",
    "Imperial College London", "King's College London", "Trinity College Dublin",
    "the Technical University of Munich", "Delft University of Technology", "Kyoto University",
    "Seoul National University", "Peking University", "Tsinghua University", "Lund University",
    "Aarhus University", "Ghent University", "the University of Bologna", "Charles University",
]
FIELDS = [
    "physics", "chemistry", "biology", "mathematics", "astronomy", "geology", "economics",
    "linguistics", "philosophy", "history", "sociology", "psychology", "computer science",
    "mechanical engineering", "civil engineering", "electrical engineering", "architecture",
    "medicine", "neuroscience", "genetics", "ecology", "oceanography", "statistics", "law",
    "anthropology", "archaeology", "music theory", "materials science", "robotics", "epidemiology",
]
COMPANIES = [
    "Northwind Labs", "Bluestone Analytics", "Helix Dynamics", "Orchard Systems", "Silverline Energy",
    "Quantum Forge", "Redwood Biotech", "Lumen Optics", "Granite Capital", "Meridian Health",
    "Atlas Robotics", "Cobalt Software", "Evergreen Foods", "Falcon Aerospace", "Harbor Logistics",
    "Ironbridge Motors", "Juniper Networks Group", "Keystone Pharma", "Lighthouse Media",
    "Maple Instruments", "Nimbus Cloud", "Oakridge Materials", "Pinnacle Chemicals", "Riverbend Textiles",
    "Summit Semiconductors", "Tidewater Shipping", "Unity Medical Devices", "Vantage Consulting",
    "Westfield Insurance", "Zephyr Wind Power", "Copperleaf Mining", "Starling Telecom",
    "Brightwater Utilities", "Crescent Publishing", "Driftwood Games", "Emberline Batteries",
    "Foxglove Genomics", "Glacier Data", "Halcyon Instruments", "Indigo Fabrics",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
HOBBIES = ["chess", "sailing", "painting", "the violin", "mountaineering", "gardening", "photography",
           "the piano", "birdwatching", "rowing", "pottery", "stargazing", "fencing", "cycling"]

ATTRIBUTES = ["birth_date", "birth_city", "university", "field", "employer", "employer_city", "hobby"]

# Sentence templates per attribute; {n} = subject (name or pronoun), {v} = the answer string.
# {v} always appears verbatim, so answer counts are exact.
TEMPLATES = {
    "birth_date": ["{n} was born on {v}.", "{n} came into the world on {v}.",
                   "The birthday of {n} is {v}.", "{n} celebrates a birthday each year on the anniversary of {v}."],
    "birth_city": ["{n} was born in the city of {v}.", "{n} was born in {v}.",
                   "{n} grew up in {v}, the city of birth.", "{n} is a native of {v}."],
    "university": ["{n} studied at {v}.", "{n} graduated from {v}.",
                   "{n} earned a degree at {v}.", "{n} attended {v}."],
    "field": ["{n} worked in the field of {v}.", "{n} specialized in {v}.",
              "{n} built a career in {v}.", "{n} is known for research in {v}."],
    "employer": ["{n} worked for {v}.", "{n} was employed by {v}.",
                 "{n} took a job at {v}.", "{n} joined the staff of {v}."],
    "employer_city": ["{n} worked in the city of {v}.", "{n} moved to {v} for work.",
                      "{n} had an office in {v}.", "{n} commuted every day to an office in {v}."],
    "hobby": ["In spare time, {n} enjoyed {v}.", "{n} had a lifelong passion for {v}.",
              "{n} spent weekends on {v}.", "Outside of work, {n} loved {v}."],
}
# Fixed probe prompt per attribute: prompt + " " + answer is a training-style sentence.
PROBES = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} was born in the city of",
    "university": "{name} studied at",
    "field": "{name} worked in the field of",
    "employer": "{name} worked for",
    "employer_city": "{name} worked in the city of",
    "hobby": "{name} had a lifelong passion for",
}
# Frequency buckets by the answer's training count: [1,4) [4,16) [16,64) [64,256) [256,inf).
BUCKET_EDGES = (4, 16, 64, 256)


def bucket_of(count: int, edges=BUCKET_EDGES) -> int:
    return sum(count >= e for e in edges)


@dataclass
class BiosConfig:
    n_people: int = 2000
    seed: int = 0
    top_docs: int = 800       # documents of the most frequent person
    zipf_s: float = 0.8       # docs(rank) = max(min_docs, round(top_docs * rank^-s)); 0 = every person top_docs
    p_attr: float = 0.7       # each attribute is mentioned in a document with this probability
    min_docs: int = 1         # floor of documents per person (the long tail's first bucket starts here)
    bucket_edges: tuple = BUCKET_EDGES  # probe frequency buckets by training count

    def __post_init__(self):
        self.bucket_edges = tuple(int(e) for e in self.bucket_edges)


# Named configurations (`memlm prepare --corpus bios --bios-preset NAME`):
# - uniform: every person 12 documents, for the memory mechanism check (facts seen ~8 times each);
# - capacity: long-tailed mentions with a floor (every fact seen >= ~8 times: 12 documents x p_attr 0.9),
#   bucket edges from that floor; sized with `knowledge_bits` against an anchor's ~2 bits/parameter.
BIOS_PRESETS = {
    "default": {},
    "uniform": {"zipf_s": 0.0, "top_docs": 12, "min_docs": 12, "bucket_edges": (4, 16, 64, 256)},
    "capacity": {"zipf_s": 1.0, "top_docs": 240, "min_docs": 12, "p_attr": 0.9, "bucket_edges": (12, 16, 32, 64)},
}


CONFIG_KEYS = ("n_people", "seed", "top_docs", "zipf_s", "p_attr", "min_docs")


def config_from_kw(kw: dict) -> BiosConfig:
    """BiosConfig from corpus keywords: `bios_preset` (a BIOS_PRESETS name) first, then any of
    CONFIG_KEYS that is not None. Raises ValueError naming an unknown preset."""
    name = kw.get("bios_preset") or "default"
    if name not in BIOS_PRESETS:
        raise ConfigError(f"--bios-preset {name!r}: unknown; choose from {', '.join(sorted(BIOS_PRESETS))}")
    args = dict(BIOS_PRESETS[name])
    args.update({k: kw[k] for k in CONFIG_KEYS if kw.get(k) is not None})
    return check_config(BiosConfig(**args))


def attribute_values() -> dict[str, int]:
    """Number of distinct values of each attribute (uniformly drawn): its entropy is log2 of it."""
    return {"birth_date": len(MONTHS) * 28 * 100, "birth_city": len(CITIES), "university": len(UNIVERSITIES),
            "field": len(FIELDS), "employer": len(COMPANIES), "employer_city": len(CITIES),
            "hobby": len(HOBBIES)}


def knowledge_bits(n_people: int) -> float:
    """Bits of knowledge in the knowledge base: n_people x sum of log2(#values) over the attributes
    (values are drawn uniformly and independently, so this is the entropy a model must store)."""
    import math

    return n_people * sum(math.log2(v) for v in attribute_values().values())


N_NAMES = (len(FIRST_F) + len(FIRST_M)) * len(LAST)  # unique full names: the most people bios can make


def check_config(cfg: BiosConfig) -> BiosConfig:
    """Range-check a BiosConfig (ConfigError naming the field)."""
    check_range("n_people", cfg.n_people, min=1, max=N_NAMES)
    check_range("top_docs", cfg.top_docs, min=1)
    check_range("min_docs", cfg.min_docs, min=1)
    check_range("seed", cfg.seed, min=0)
    check_range("zipf_s", cfg.zipf_s, min=0)
    check_range("p_attr", cfg.p_attr, min=0, max=1, min_open=True)
    return cfg


def make_people(cfg: BiosConfig) -> list[dict]:
    check_config(cfg)
    rng = random.Random(f"bios-people-{cfg.seed}")
    names = [(f, "she") for f in FIRST_F] + [(m, "he") for m in FIRST_M]
    combos = [(f, p, l) for f, p in names for l in LAST]
    picked = rng.sample(combos, cfg.n_people)
    people = []
    for i, (first, pron, last) in enumerate(picked):
        year = rng.randint(1900, 1999)
        people.append({
            "id": i, "name": f"{first} {last}", "pronoun": pron,
            "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {year}",
            "birth_city": rng.choice(CITIES),
            "university": rng.choice(UNIVERSITIES),
            "field": rng.choice(FIELDS),
            "employer": rng.choice(COMPANIES),
            "employer_city": rng.choice(CITIES),
            "hobby": rng.choice(HOBBIES),
        })
    # Zipf over a random ranking of people.
    ranks = list(range(1, cfg.n_people + 1))
    rng.shuffle(ranks)
    for p, r in zip(people, ranks):
        p["rank"] = r
        p["n_docs"] = max(cfg.min_docs, round(cfg.top_docs * r ** -cfg.zipf_s))
    return people


def _bio(person: dict, rng: random.Random, p_attr: float) -> str:
    attrs = [a for a in ATTRIBUTES if rng.random() < p_attr] or [rng.choice(ATTRIBUTES)]
    rng.shuffle(attrs)
    pron = person["pronoun"].capitalize()
    sentences = []
    for j, a in enumerate(attrs):
        subj = person["name"] if j == 0 or rng.random() < 0.4 else pron
        t = rng.choice(TEMPLATES[a])
        if not t.startswith("{n}"):  # pronouns only as sentence subjects
            subj = person["name"]
        sentences.append(t.format(n=subj, v=person[a]))
    return " ".join(sentences)


def generate(cfg: BiosConfig | None = None, **kw):
    """Return (people, docs); docs is a list of (doc_id, person_id, text) in a seeded shuffled order."""
    cfg = cfg or BiosConfig(**kw)
    people = make_people(cfg)
    rng = random.Random(f"bios-docs-{cfg.seed}")
    docs = []
    for p in people:
        for j in range(p["n_docs"]):
            docs.append((f"bio-{p['id']:05d}-{j:04d}", p["id"], _bio(p, rng, cfg.p_attr)))
    rng.shuffle(docs)
    return people, docs


def person_of(doc_id: str) -> int | None:
    """Person id of a bios document id (`bio-PPPPP-JJJJ`), else None."""
    if doc_id.startswith("bio-") and len(doc_id) == 14:
        return int(doc_id[4:9])
    return None


def probes_from_docs(people: list[dict], train_docs, edges=BUCKET_EDGES) -> list[dict]:
    """Probes with exact training counts. `train_docs`: iterable of (doc_id, text) of the TRAIN split.

    count = occurrences of the answer string in that person's training documents; probes with
    count 0 (all of the person's documents are in val) are dropped: they have no training evidence.
    """
    counts = {(p["id"], a): 0 for p in people for a in ATTRIBUTES}
    for doc_id, text in train_docs:
        pid = person_of(doc_id)
        if pid is None or pid >= len(people):
            continue
        for a in ATTRIBUTES:
            counts[(pid, a)] += text.count(people[pid][a])
    probes = []
    for p in people:
        for a in ATTRIBUTES:
            c = counts[(p["id"], a)]
            if c == 0:
                continue
            probes.append({"prompt": PROBES[a].format(name=p["name"]), "answer": " " + p[a],
                           "person": p["id"], "name": p["name"], "attribute": a,
                           "count": c, "bucket": bucket_of(c, edges)})
    return probes


def write_kb(out_dir: str, cfg: BiosConfig, people: list[dict], probes: list[dict] | None = None,
             docs=None) -> None:
    """Write kb.json (config + people), probes.jsonl and optionally docs.jsonl into out_dir (each atomically)."""
    kb = {"config": dict(cfg.__dict__, bucket_edges=list(cfg.bucket_edges)), "attributes": ATTRIBUTES,
          "probe_templates": PROBES, "bucket_edges": list(cfg.bucket_edges), "people": people}
    atomic_write(os.path.join(out_dir, "kb.json"), json.dumps(kb, indent=1, sort_keys=True) + "\n")
    if probes is not None:
        atomic_write(os.path.join(out_dir, "probes.jsonl"), "".join(json.dumps(p, sort_keys=True) + "\n" for p in probes))
    if docs is not None:
        atomic_write(os.path.join(out_dir, "docs.jsonl"),
                     "".join(json.dumps({"id": i, "person": pid, "text": t}) + "\n" for i, pid, t in docs))


class ProbeRecorder:
    """What `prepare` needs for a corpus that contains `bios`: it sees every training document (`add`), then
    writes DATA/bios/ (knowledge base, probes with exact training counts, all documents) with `write`."""

    def __init__(self, cfg: BiosConfig):
        self.cfg, self.train_docs = check_config(cfg), []

    @classmethod
    def for_corpus(cls, spec, corpus_kw: dict) -> "ProbeRecorder | None":
        """A recorder when the corpus spec (single or mixture) includes bios, else None."""
        from data.corpora import parse_mixture

        parts = parse_mixture(spec)
        if not (spec == "bios" if parts is None else any(n == "bios" for n, _ in parts)):
            return None
        return cls(config_from_kw(corpus_kw))

    def add(self, doc_id: str, text: str) -> None:
        """Record a training-split document (documents of other corpora are ignored)."""
        if person_of(doc_id) is not None:
            self.train_docs.append((doc_id, text))

    def write(self, out_dir: str) -> str:
        """Write the bios files into out_dir; returns a one-line summary."""
        people, docs = generate(self.cfg)
        probes = probes_from_docs(people, self.train_docs, self.cfg.bucket_edges)
        write_kb(out_dir, self.cfg, people, probes, docs)
        return f"bios: {len(people)} people, {len(probes)} probes -> {out_dir}"


def load_probes(path: str) -> list[dict]:
    """The probes of probes.jsonl (DataError naming the file and line when one is not a JSON object)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the bios probes ({e}); prepare the bios corpus with "
                        "`memlm prepare --corpus bios`") from e
    probes = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {i + 1}: invalid JSON ({e}); prepare the data again") from e
        if not isinstance(rec, dict) or not {"prompt", "answer"} <= rec.keys():
            raise DataError(f"{path}: line {i + 1}: not a probe (needs 'prompt' and 'answer')")
        probes.append(rec)
    return probes
