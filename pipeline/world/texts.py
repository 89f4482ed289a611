"""Five procedurally generated text classification tasks mirroring the paper's NLP benchmark
(Appendix B.2: BERT merged on AG News, Yelp, Amazon, Yahoo Answers and DBPedia), written as
Hugging Face publishes text datasets (parquet shards with `text` and `label`).

A text mixes class cue words, its task's *register* (`DOMAINS`: newswire, restaurant talk,
shopping talk, forum questions, encyclopedia prose), shared function words and random words
of the whole world. All tasks share one vocabulary, and related classes share cue words
(sports in AG News, Yahoo and DBPedia's athletes; business and companies; politics and office
holders), so merged models interfere as real ones do. Difficulty follows the paper's: topic
and entity tasks are easy; the star ratings are hard because each polarity word is drawn
around the star with spread, so neighbouring stars overlap; Yahoo's topics are blurred by cue
words strayed from other topics. Pretraining text (`corpus`) carries the same cue words in a
neutral web register, so a pretrained model knows the words but has not seen the benchmarks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cache.files import atomic_path
from pipeline.errors import PipelineError

TASKS = {
    "agnews": "news topic (AG News): world, sports, business, science/tech",
    "yelp": "restaurant and business review stars (Yelp): 1 to 5 stars",
    "amazon": "product review stars (Amazon): 1 to 5 stars",
    "yahoo": "question topic (Yahoo Answers): 10 topics",
    "dbpedia": "entity type (DBPedia-14): 14 types",
}
TASK_NAMES = tuple(TASKS)

GENERAL = """the a an of and to in is it was for on with that this at by from as be are were has have had
but or not its their they he she his her there which so very also all some one two after before over about
into more than when up out new year time first most other only just like who been will would can""".split()
WEB = """online post blog page site link share comments read click via update posted today here check stuff
thing things people really anyway lot pretty maybe think got get see pic thread forum users video""".split()
DOMAINS = {  # (what the register is, its words)
    "agnews": ("newswire", """reuters ap afp said reported announced officials monday tuesday wednesday
        thursday friday according spokesman statement yesterday sources reports week percent""".split()),
    "yelp": ("restaurant talk", """we ordered visited place restaurant food staff waiter menu table dinner
        lunch ambience server went tonight friends parking reservation wait drinks dessert""".split()),
    "amazon": ("shopping talk", """bought purchased item product shipping package arrived seller box price
        returned battery quality size fits works use instructions refund delivery""".split()),
    "yahoo": ("forum questions", """question answer how why what does anyone know help please should asked
        answers thanks advice wondering someone tell need""".split()),
    "dbpedia": ("encyclopedia prose", """refers encyclopedia article notable named formerly known since century
        originally later currently former whose""".split()),
}

CLASSES = {  # task -> {class name: cue words}; the star tasks draw theirs from POLARITY
    "agnews": {
        "world": "minister president government election troops war peace talks embassy rebels border capital "
                 "parliament ceasefire nations",
        "sports": "football soccer league season coach team players match championship cup goalkeeper "
                  "tournament striker olympic victory playoffs",
        "business": "stocks shares market profit quarterly earnings investors company oil prices economy bank "
                    "merger sales dollar",
        "science/tech": "software internet computer microsoft google space nasa scientists researchers "
                        "technology wireless chip study genome",
    },
    "yelp": {f"{s} star{'s' * (s > 1)}": "" for s in range(1, 6)},
    "amazon": {f"{s} star{'s' * (s > 1)}": "" for s in range(1, 6)},
    "yahoo": {
        "society & culture": "religion god church culture tradition beliefs bible holiday history customs",
        "science & mathematics": "math equation physics chemistry biology theory atoms planet calculate formula",
        "health": "doctor pain diet symptoms medicine weight sleep disease headache exercise",
        "education & reference": "school college homework teacher exam degree grammar essay university library",
        "computers & internet": "computer software internet windows laptop virus email download website password",
        "sports": "football team players season coach game league soccer basketball baseball",
        "business & finance": "money job bank loan credit tax invest stocks salary business",
        "entertainment & music": "music song band movie singer album guitar lyrics celebrity tv",
        "family & relationships": "boyfriend girlfriend marriage wedding parents kids love friend divorce dating",
        "politics & government": "president government election vote war law congress senator democrats "
                                 "republicans",
    },
    "dbpedia": {
        "company": "company founded headquartered subsidiary corporation inc manufacturer products revenue "
                   "employees",
        "educational institution": "school university college students campus academy faculty enrolled",
        "artist": "singer musician painter band songwriter guitarist rapper recorded",
        "athlete": "footballer players league season club team olympic midfielder",
        "office holder": "politician served member elected minister senator party governor mayor",
        "mean of transportation": "ship aircraft locomotive launched navy engine vessel car",
        "building": "building church hotel built tower historic architect floors listed",
        "natural place": "river mountain lake island peak flows elevation range",
        "village": "village population district municipality census county commune rural",
        "animal": "species moth snail beetle genus bird spider found",
        "plant": "species genus plant flowering shrub native tree orchid leaves",
        "album": "album released studio records tracks debut single ep",
        "film": "film directed starring drama comedy screenplay released documentary",
        "written work": "novel book published author written magazine newspaper poems",
    },
}
CUES = {task: [words.split() for words in classes.values()] for task, classes in CLASSES.items()}

POLARITY = {  # stars (in half steps) -> sentiment words, shared by both review tasks
    1.0: "awful terrible horrible worst disgusting", 1.5: "dreadful useless pathetic",
    2.0: "bad poor disappointing", 2.5: "mediocre subpar lacking", 3.0: "okay average fine ordinary",
    3.5: "decent alright reasonable", 4.0: "good nice solid", 4.5: "great excellent wonderful",
    5.0: "superb amazing perfect outstanding fantastic",
}
POLARITY_EXTRA = {  # each review domain's own sentiment words
    "yelp": {1.0: "inedible", 2.0: "rude greasy", 2.5: "bland", 3.5: "tasty", 4.5: "delicious friendly"},
    "amazon": {1.0: "defective broken", 2.0: "flimsy", 2.5: "cheap", 3.5: "handy", 4.0: "sturdy",
               4.5: "reliable", 5.0: "flawless"},
}
SPREAD = 0.9  # std (in stars) of each polarity word around the review's star

MIX = {  # task -> (share of cue words, share of register words, share of cues strayed from another class)
    "agnews": (0.25, 0.25, 0.1), "yelp": (0.25, 0.3, 0.0), "amazon": (0.25, 0.3, 0.0),
    "yahoo": (0.22, 0.25, 0.35), "dbpedia": (0.3, 0.25, 0.05),
}
WEB_DOMAIN_SHARE = 0.15  # pretraining text: share of register slots that use the task's register, not the web's


def _check(task: str) -> None:
    if task not in TASKS:
        raise PipelineError(f"unknown text task {task!r}: the miniature world has {', '.join(TASK_NAMES)}")


def classnames(task: str) -> list[str]:
    _check(task)
    return list(CLASSES[task])


def _polarity(task: str) -> dict[float, list[str]]:
    extra = POLARITY_EXTRA.get(task, {})
    return {level: (words + " " + extra.get(level, "")).split() for level, words in POLARITY.items()}


def _pick(words: list[str], rng: np.random.Generator) -> str:
    return words[int(rng.integers(len(words)))]


def _cues(task: str, label: int, k: int, rng: np.random.Generator) -> list[str]:
    """k cue words of class `label`: polarity words drawn around its star, or topic words, some
    strayed from a random class."""
    if task in POLARITY_EXTRA:
        levels = _polarity(task)
        stars = np.clip(np.round((label + 1 + rng.normal(0, SPREAD, k)) * 2) / 2, 1.0, 5.0)
        return [_pick(levels[float(s)], rng) for s in stars]
    stray = rng.random(k) < MIX[task][2]
    classes = np.where(stray, rng.integers(len(CUES[task]), size=k), label)
    return [_pick(CUES[task][c], rng) for c in classes]


def _world() -> list[str]:
    words = set(GENERAL) | set(WEB)
    for task in TASK_NAMES:
        words |= set(DOMAINS[task][1]) | {w for cues in CUES[task] for w in cues}
        if task in POLARITY_EXTRA:
            words |= {w for ws in _polarity(task).values() for w in ws}
    return sorted(words)


WORLD = _world()


def vocabulary(tasks: list[str]) -> list[str]:
    """Every word the generator can emit for `tasks` (sorted). Noise draws from the whole world's
    words, so this is the world's vocabulary whichever tasks are named."""
    for task in tasks:
        _check(task)
    return list(WORLD)


def _compose(task: str, label: int, rng: np.random.Generator, length: int, noise: float,
             register: list[str], web: float) -> str:
    n = max(3, length + int(rng.integers(-(length // 4), length // 4 + 1)))
    cue, domain, _ = MIX[task]
    kinds = rng.choice(3, size=n, p=[cue, domain, 1 - cue - domain])
    cues = iter(_cues(task, label, int((kinds == 0).sum()), rng))
    words = []
    for kind, noisy in zip(kinds, rng.random(n) < noise):
        if noisy:
            words.append(_pick(WORLD, rng))
        elif kind == 0:
            words.append(next(cues))
        elif kind == 1:
            words.append(_pick(WEB if rng.random() < web else register, rng))
        else:
            words.append(_pick(GENERAL, rng))
    return " ".join(words)


def text(task: str, label: int, rng: np.random.Generator, *, length: int, noise: float) -> str:
    """One benchmark example of class `label`: about `length` words in the task's register, each
    replaced by a random world word with probability `noise`."""
    _check(task)
    if not 0 <= label < len(CLASSES[task]):
        raise PipelineError(f"label {label} out of range for text task {task!r} ({len(CLASSES[task])} classes)")
    return _compose(task, label, rng, length, noise, DOMAINS[task][1], web=0.0)


def corpus(tasks: list[str], n: int, *, seed: int = 0, length: int = 16, noise: float = 0.1) -> list[str]:
    """`n` unlabeled pretraining sentences about the classes of `tasks`, in the web's register
    with a small share (`WEB_DOMAIN_SHARE`) of each task's own."""
    for task in tasks:
        _check(task)
    if not tasks:
        raise PipelineError("corpus needs at least one text task")
    rng = np.random.default_rng([seed, len(TASK_NAMES)])
    out = []
    for _ in range(n):
        task = tasks[int(rng.integers(len(tasks)))]
        label = int(rng.integers(len(CLASSES[task])))
        out.append(_compose(task, label, rng, length, noise, DOMAINS[task][1], web=1 - WEB_DOMAIN_SHARE))
    return out


def _write_split(path: Path, task: str, split: str, n: int, seed: int, length: int, noise: float) -> None:
    rng = np.random.default_rng([seed, TASK_NAMES.index(task), 0 if split == "train" else 1])
    labels = rng.permutation(np.arange(n) % len(CLASSES[task]))
    texts = [text(task, int(y), rng, length=length, noise=noise) for y in labels]
    table = pa.table({"text": pa.array(texts, type=pa.string()), "label": pa.array(labels, type=pa.int64())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_task(root: Path, task: str, *, n_train: int, n_test: int, seed: int = 0, length: int = 16,
               noise: float = 0.1) -> Path:
    """Write one task's train and test shards and its task.json under root/task."""
    _check(task)
    out = Path(root) / task
    for split, n in (("train", n_train), ("test", n_test)):
        _write_split(out / "data" / f"{split}-00000-of-00001.parquet", task, split, n, seed, length, noise)
    meta = {"name": task, "classnames": classnames(task), "templates": [], "n_train": n_train, "n_test": n_test,
            "seed": seed, "length": length, "noise": noise, "domain": f"{TASKS[task]}; register: {DOMAINS[task][0]}"}
    (out / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out
