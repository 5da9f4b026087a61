"""Generated demo data, so the default pipeline runs offline from the repository alone, on CPU, in minutes.

Real Alpaca and ScienceQA need downloads and a real LLaMA. Instead we invent a small closed world that a
tiny LLaMA pretrained for CPU minutes can memorise (creatures and their traits, fictional capitals,
antonyms, plurals, sums and comparisons of 0-20), state its facts in `corpus.jsonl`, and ask about them in
the original Alpaca and ScienceQA layouts, so every later stage runs unchanged on demo or real data.
ScienceQA questions come in its three context kinds, each testing something different: the answer is in
the hint (random per question, so it must be read, not recalled), only in a drawn image, or a corpus fact.
Each question kind has a fixed list of options (see FACT_QUESTIONS for why), and the right answer cycles
through them, so every letter is equally often right and a letter prior scores no better than chance.
Everything derives from one seeded RNG: the same seed gives byte-identical files.

The corpus is JSONL, one {"text": document} per line (documents span several lines). Besides the facts it holds
worksheets in the ScienceQA QCM layout and a few answered instructions in the Alpaca template, drawn
independently of the fine-tuning data: a real LLaMA has seen quizzes and instructions in pre-training, and a
tiny base that has never seen ":", "(A)" or a newline cannot be steered to write them by 1-2% extra parameters.
The worksheets answer in their own words, "Answer: (B)", never in the paper's "Answer: The answer is (B).", which
the benchmark parses: the base knows the world and the quiz layout but not the answer format, so zero-shot it
answers in the wrong words, and what fine-tuning must teach, and the report can show, is the format (the report's
`accuracy_any_format` reads the letter in any wording, which separates the two).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from ..config import DEMO_CORPUS, DemoConfig
from ..errors import InputError
from ..io import atomic_dir, read_jsonl_lines
from . import SCIENCEQA_SPLITS, scienceqa

CREATURES = ("zorb blick wug fep glim tove grop plon vesk mib krell torp quib zib flarn drub skeep brell jom "
             "yant gorp wimble pim sploon fuzzle narp klib zeem dorf vop grint tulp morv snib frim gleb chab "
             "norb plim kesh").split()
COLOURS = "red blue green yellow purple orange white black brown pink".split()
SIZES = "tiny small big huge".split()  # ordered: which creature is bigger follows this order
HABITATS = "forest river desert cave sea".split()  # at most 5: every habitat is an option
SOUNDS = "hums squeaks roars whistles chirps growls hisses clicks".split()
LEGS = "2 4 6 8".split()
TRAITS = dict(zip(("colour", "size", "habitat", "sound", "legs"), (COLOURS, SIZES, HABITATS, SOUNDS, LEGS)))
COUNTRIES = "Varnia Tolmar Quenland Drovia Pellam Zantor Grelland Ombria Kestia Lurovia Fennick Sabrel".split()
CITIES = "Kell Amberton Rivo Dunmore Stenby Calvo Mirrow Tesk Hollin Brask Norwick Feltham".split()
PEOPLE = "Tom Mia Ben Lily Sam Ana Max Zoe Leo Ivy Raj Eva".split()
OBJECTS = "ball hat kite cup box car bag boat sock book".split()
OPPOSITES = [tuple(p.split("/")) for p in (
    "hot/cold fast/slow tall/short happy/sad light/dark wet/dry old/young hard/soft loud/quiet full/empty "
    "open/closed early/late rich/poor strong/weak thick/thin clean/dirty near/far high/low sweet/sour good/bad"
).split()]
ADJECTIVES = [w for pair in OPPOSITES for w in pair]
PLURALS = [tuple(p.split("/")) for p in (
    "cat/cats dog/dogs cup/cups hat/hats book/books tree/trees bird/birds box/boxes bus/buses fox/foxes "
    "dish/dishes watch/watches baby/babies city/cities story/stories leaf/leaves knife/knives wolf/wolves "
    "shelf/shelves mouse/mice child/children foot/feet tooth/teeth man/men woman/women goose/geese "
    "sheep/sheep fish/fish deer/deer ox/oxen person/people key/keys toy/toys day/days potato/potatoes "
    "hero/heroes glass/glasses church/churches lady/ladies life/lives"
).split()]
# Drawn without antialiasing, so every shape pixel is exactly one of these colours.
IMAGE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                 "yellow": (240, 210, 40), "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32

# Corpus wordings per fact kind. The first is canonical and stated once for every fact, so each answer's
# sentence is in the corpus word for word; later passes vary the wording.
TEMPLATES = {
    "colour": ("A {e} is {v}.", "The colour of a {e} is {v}.", "{E}s are {v}."),
    "size": ("A {e} is {v}.", "A {e} is a {v} animal.", "{E}s are {v} animals."),
    "habitat": ("A {e} lives in the {v}.", "You can find a {e} in the {v}.", "{E}s live in the {v}."),
    "sound": ("A {e} {v}.", "When a {e} is happy, it {v}.", "You can hear a {e} when it {v}."),
    "legs": ("A {e} has {v} legs.", "Every {e} walks on {v} legs.", "{E}s have {v} legs."),
    "bigger": ("A {a} is bigger than a {b}.", "A {a} is larger than a {b}.", "A {b} is smaller than a {a}."),
    "capital": ("The capital of {a} is {b}.", "{b} is the capital of {a}.", "{b} is the main city of {a}."),
    "opposite": ("The opposite of {a} is {b}.", "{A} is the opposite of {b}."),
    "plural": ("The plural of {a} is {b}.", "One {a}, two {b}."),
    "add": ("{a} plus {b} is {c}.", "{a} + {b} = {c}.", "If you add {a} and {b}, you get {c}."),
    "subtract": ("{a} minus {b} is {c}.", "{a} - {b} = {c}.", "If you take {b} from {a}, you get {c}."),
    "more": ("{a} is more than {b}.", "{a} is bigger than {b}.", "{b} is less than {a}."),
}
SHAPE_FACTS = "A square has four sides. A triangle has three sides. A circle is round. A circle has no corners."
CORPUS_PASSES = 3
WORKSHEETS = 3000  # QCM-layout documents in the corpus (text context or facts: a worksheet shows no image)
INSTRUCTION_DOCS = 150  # Alpaca-template documents in the corpus
# Alpaca without input: questions per fact kind, answered by the fact's canonical sentence.
QUESTIONS = {
    "colour": ("What colour is a {e}?", "Tell me the colour of a {e}.", "Which colour is a {e}?"),
    "size": ("How big is a {e}?", "Describe the size of a {e}."),
    "habitat": ("Where does a {e} live?", "Name the place where a {e} lives."),
    "sound": ("What sound does a {e} make?", "How does a {e} sound?"),
    "legs": ("How many legs does a {e} have?", "Count the legs of a {e}."),
    "bigger": ("Which is bigger, a {a} or a {b}?", "Which is bigger, a {b} or a {a}?"),
    "capital": ("What is the capital of {a}?", "Name the capital city of {a}.",
                "Which country has {b} as its capital?", "{b} is the capital of which country?"),
    "opposite": ("What is the opposite of {a}?", "Which word means the opposite of {a}?"),
    "plural": ("What is the plural of {a}?", "How do you say more than one {a}?"),
    "add": ("What is {a} plus {b}?",), "subtract": ("What is {a} minus {b}?",),
    "more": ("Which is more, {a} or {b}?", "Which is more, {b} or {a}?"),
}
# Alpaca with input: task -> (fact kind, instructions, input wordings, short answer).
INPUT_TASKS = {
    "colour_of": ("colour", ("Name the colour of this animal.", "What colour is this animal?"), ("{e}",), "{v}"),
    "habitat_of": ("habitat", ("Where does this animal live?", "Name the home of this animal."), ("{e}",), "{v}"),
    "legs_of": ("legs", ("How many legs does this animal have?", "Count the legs of this animal."), ("{e}",), "{v}"),
    "capital_of": ("capital", ("Give the capital of this country.", "Name the capital city of this country."),
                   ("{a}",), "{b}"),
    "opposite": ("opposite", ("Give the opposite of the word.", "Write the antonym of this word."), ("{a}",), "{b}"),
    "plural": ("plural", ("Write the plural of the word.", "Give the plural form of this noun."), ("{a}",), "{b}"),
    "add": ("add", ("Add the two numbers.", "What is the sum of these numbers?"), ("{a} and {b}",), "{c}"),
    "subtract": ("subtract", ("Subtract the second number from the first.",), ("{a} and {b}",), "{c}"),
    "larger": ("more", ("Which number is larger?",), ("{a} and {b}", "{b} and {a}"), "{a}"),
    "bigger_animal": ("bigger", ("Which of these animals is bigger?",), ("{a} and {b}", "{b} and {a}"), "{a}"),
}
# ScienceQA without context: (subject, fact kind, question, options, answer, topic, category). The options
# are a fixed list per kind, as in many real ScienceQA kinds ("(A) solid (B) liquid (C) gas"): the answer is
# one fact away. With options drawn and shuffled per question, a model must also bind each letter to its
# option, a multi-step skill a 4-layer base pre-trained for a CPU minute does not acquire (measured: chance
# accuracy, even with 6,000 worksheets in its corpus).
FACT_QUESTIONS = [
    ("NAT", "more", "Which number is more, {x} or {y}?", ("{x}", "{y}"), None, "mathematics", "Comparing numbers"),
    ("NAT", "size", "How big is a {e}?", SIZES, "{v}", "biology", "Animal traits"),
    ("SOC", "capital", "Is {b} the capital of {a}?", ("yes", "no"), None, "geography", "Capitals"),
    ("LAN", "opposite", "Is {b} the opposite of {a}?", ("yes", "no"), None, "vocabulary", "Antonyms"),
    ("LAN", "plural", "How do you make the plural of {a}?", ("add s", "add es", "another way"), None, "grammar",
     "Plural nouns"),
]
LECTURES = {  # category -> (skill, lecture), as ScienceQA attaches to every problem
    "Colours and shapes": ("Identify colours and shapes",
                           "Things have a colour, such as red or blue, and a shape, such as a circle or a square."),
    "Observations": ("Read an observation", "An observation tells what someone saw. Read it to answer questions."),
    "Comparing amounts": ("Compare amounts", "To compare amounts, find the largest or the smallest number."),
    "Comparing numbers": ("Compare numbers", "A number is more than every number that comes before it."),
    "Reading a sentence": ("Find a detail in a sentence", "A sentence tells who did what. Read it to find details."),
    "Animal traits": ("Identify animal traits", "Each kind of animal has traits: a colour, a size, a home, legs."),
    "Capitals": ("Identify capitals", "Each country has a capital city."),
    "Plural nouns": ("Form plural nouns", "A plural noun names more than one. Most add s or es; some change."),
    "Antonyms": ("Find antonyms", "Antonyms are words with opposite meanings, such as hot and cold."),
}
SUBJECTS = {column: name for name, column in scienceqa.SUBJECTS.items()}  # NAT: natural science, ...
# Per 12 questions of one subject and grade band: 3 image, 4 text, 5 no context (~25% images).
CONTEXT_PATTERN = ["IMG"] * 3 + ["TXT"] * 4 + ["NO"] * 5
CELLS = [(s, band, c) for c in CONTEXT_PATTERN for s in SUBJECTS for band in (1, 7)]  # band: its lowest grade

Fact = tuple[str, dict[str, Any]]  # (kind, fields to fill its templates)


def _say(template: str, **kw: Any) -> str:
    kw = {k: str(v) for k, v in kw.items()}
    return template.format(**kw, E=kw.get("e", "").capitalize(), A=kw.get("a", "").capitalize())


def canonical(kind: str, **kw: Any) -> str:
    """The sentence that states a fact in the corpus word for word."""
    return _say(TEMPLATES[kind][0], **kw)


def _facts(rng: random.Random) -> list[list[Fact]]:
    """The seed's world as facts, grouped into paragraphs of related facts (one per creature, then by six)."""
    traits = {e: {t: rng.choice(values) for t, values in TRAITS.items()} for e in CREATURES}
    size = {e: SIZES.index(traits[e]["size"]) for e in CREATURES}
    sums = [(a, b) for a in range(21) for b in range(21 - a)]
    flat = ([("bigger", {"a": a, "b": b}) for a in CREATURES for b in CREATURES if size[a] > size[b]]
            + [("capital", {"a": c, "b": city}) for c, city in zip(COUNTRIES, rng.sample(CITIES, len(CITIES)))]
            + [("opposite", {"a": a, "b": b}) for x, y in OPPOSITES for a, b in ((x, y), (y, x))]
            + [("plural", {"a": a, "b": b}) for a, b in PLURALS]
            + [("add", {"a": a, "b": b, "c": a + b}) for a, b in sums]
            + [("subtract", {"a": a + b, "b": b, "c": a}) for a, b in sums]
            + [("more", {"a": a, "b": b}) for a in range(21) for b in range(a)])
    groups = [[(t, {"e": e, "v": v}) for t, v in traits[e].items()] for e in CREATURES]
    return groups + [flat[i:i + 6] for i in range(0, len(flat), 6)]


def _corpus(rng: random.Random, groups: list[list[Fact]], primers: list[str]) -> list[str]:
    """Documents: every fact in varied wordings, stories like the ScienceQA hints, and the format primers
    (worksheets and answered instructions)."""
    documents = [SHAPE_FACTS] + primers
    for p in range(CORPUS_PASSES):
        for group in groups:
            sentences = [canonical(k, **kw) if p == 0 else _say(rng.choice(TEMPLATES[k]), **kw) for k, kw in group]
            rng.shuffle(sentences)
            documents.append(" ".join(sentences))
    for _ in range(400):  # stories teach reading a context; they state nothing about the world
        a, b = rng.sample(PEOPLE, 2)
        documents.append(f"{a} has a {rng.choice(COLOURS)} {rng.choice(OBJECTS)}. {b} saw {rng.randint(2, 12)} "
                         f"{rng.choice(CREATURES)}s. {a} has {rng.randint(1, 20)} coins. "
                         f"{b} said: The {rng.choice(OBJECTS)} is {rng.choice(ADJECTIVES)}.")
    rng.shuffle(documents)
    return documents


def _primers(seed: int, facts: list[Fact]) -> list[str]:
    """Worksheets (QCM prompt + "Answer: (X)", not the benchmark's format) and answered instructions (Alpaca
    template), from an RNG of their own so that they do not shift what the fine-tuning data draws."""
    from llama_adapter.prompts import alpaca_prompt

    rng = random.Random(f"{seed}-primers")
    problems, _ = _problems(rng, facts, 2 * WORKSHEETS)
    sheets = [scienceqa.qcm_prompt(p) + f"Answer: ({scienceqa.LETTERS[p['answer']]})" for p in problems.values()
              if p["image"] is None][:WORKSHEETS]
    answered = [alpaca_prompt(r["instruction"], r["input"]) + r["output"]  # joined as fine-tuning joins them
                for _, r in _alpaca(rng, facts, INSTRUCTION_DOCS)]
    return sheets + answered


def _round_robin(rng: random.Random, pools: dict[str, list], n: int) -> list[tuple[str, tuple]]:
    """n distinct records, taking kinds in turn so that big pools (arithmetic) cannot crowd out small ones."""
    queues = {k: rng.sample(v, len(v)) for k, v in sorted(pools.items())}
    out: list[tuple[str, tuple]] = []
    while len(out) < n:
        live = [k for k in queues if queues[k]]
        if not live:
            raise ValueError(f"only {len(out)} distinct records available, {n} requested")
        out += [(k, queues[k].pop()) for k in live[:n - len(out)]]
    return out


def _alpaca(rng: random.Random, facts: list[Fact], n: int) -> list[tuple[str, dict[str, str]]]:
    """(task kind, record) pairs; about 60% have no input, as in Alpaca itself."""
    plain: dict[str, list] = {}
    inputs: dict[str, list] = {}
    for kind, kw in facts:
        plain.setdefault(kind, []).extend((_say(q, **kw), "", canonical(kind, **kw)) for q in QUESTIONS[kind])
        for task, (k, instructions, wordings, answer) in INPUT_TASKS.items():
            if k == kind:
                inputs.setdefault(task, []).extend(
                    (i, _say(w, **kw), _say(answer, **kw)) for i in instructions for w in wordings)
    n_plain = round(0.6 * n)
    chosen = _round_robin(rng, plain, n_plain) + _round_robin(rng, inputs, n - n_plain)
    rng.shuffle(chosen)
    return [(k, {"instruction": i, "input": x, "output": o}) for k, (i, x, o) in chosen]


Turn = Callable[[str], int]  # the how-many-th question of a kind this is, to cycle its answer through the options


def _context_question(rng: random.Random, subject: str, turn: Turn) -> dict[str, Any]:
    """A question answered by its hint, whose details are drawn afresh, so it must be read, not recalled."""
    name, obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    if subject == "NAT":  # options in the hint's order: the first is right when it was seen more often
        t = turn("seen")
        seen, counts = rng.sample(CREATURES, 2), sorted(rng.sample(range(1, 13), 2), reverse=t % 2 == 0)
        return dict(hint=" ".join(f"{name} saw {n} {x}s." for x, n in zip(seen, counts)),
                    question=f"Did {name} see more {seen[0]}s or {seen[1]}s?", options=[f"{x}s" for x in seen],
                    answer=f"{seen[t % 2]}s", topic="science-and-engineering-practices", category="Observations")
    if subject == "SOC":  # options in the hint's order: the first is right when its amount is the larger
        who, candidates, unit = rng.choice([("Who", PEOPLE, "coins"), ("Which town", CITIES, "shops")])
        t = turn(unit)
        names, amounts = rng.sample(candidates, 2), sorted(rng.sample(range(1, 21), 2), reverse=t % 2 == 0)
        return dict(hint=" ".join(f"{x} has {a} {unit}." for x, a in zip(names, amounts)), options=names,
                    question=f"{who} has more {unit}?", answer=names[t % 2], topic="economics",
                    category="Comparing amounts")
    pair, t = rng.choice(OPPOSITES), turn("said")  # options in the pair's fixed order
    return dict(hint=f"{name} said: The {obj} is {pair[t % 2]}.", question=f"Is the {obj} {pair[0]} or {pair[1]}?",
                options=pair, answer=pair[t % 2], topic="reading-comprehension", category="Reading a sentence")


def _image_question(rng: random.Random, subject: str, turn: Turn) -> dict[str, Any]:
    """A question answered only by its picture: the colour or the shape drawn."""
    asks_colour = rng.random() < 0.5
    options = list(IMAGE_COLOURS) if asks_colour else SHAPES
    shape, colour = rng.choice(SHAPES), rng.choice(list(IMAGE_COLOURS))
    if asks_colour:
        colour = options[turn("colour") % len(options)]
    else:
        shape = options[turn("shape") % len(options)]
    text = {"NAT": ("Which colour is the shape in the image?", "Which shape is shown in the image?"),
            "SOC": ("The image shows a flag. What colour is the flag?",
                    "The image shows a road sign. What shape is the sign?"),
            "LAN": ("Which word names the colour in the image?", "Which word names the shape in the image?")}
    return dict(question=text[subject][0 if asks_colour else 1], hint="", answer=colour if asks_colour else shape,
                options=options, category="Colours and shapes",
                topic={"NAT": "physics", "SOC": "civics", "LAN": "vocabulary"}[subject],
                solution=f"The image shows a {colour} {shape}.",
                image=(shape, colour, rng.randint(8, 12), rng.randint(-3, 3), rng.randint(-3, 3)))


def plural_rule(singular: str, plural: str) -> str:
    return "add s" if plural == singular + "s" else "add es" if plural == singular + "es" else "another way"


def _fact_question(rng: random.Random, subject: str, facts: dict[str, list[dict]], turn: Turn) -> dict[str, Any]:
    """A question whose answer is a corpus fact. The question kind is drawn first so that many-fact kinds do
    not crowd out the others; then the answer cycles through the options and a fact with it is drawn."""
    _, kind, question, options, answer, topic, category = rng.choice([f for f in FACT_QUESTIONS if f[0] == subject])
    t = turn(kind)
    want = options[t % len(options)]
    if kind == "more":  # the larger number first or second, in turn
        kw = rng.choice(facts[kind])
        x, y = (kw["a"], kw["b"]) if t % 2 == 0 else (kw["b"], kw["a"])
        return dict(question=_say(question, x=x, y=y), hint="", answer=str(kw["a"]), options=(str(x), str(y)),
                    topic=topic, category=category, solution=canonical(kind, **kw))
    if kind in ("capital", "opposite"):  # yes: a true pair; no: a true pair's left with another's right
        kw, other = rng.sample(facts[kind], 2)
        shown = kw if want == "yes" else {"a": kw["a"], "b": other["b"]}  # each b belongs to one fact only
        return dict(question=_say(question, **shown), hint="", answer=want, options=options, topic=topic,
                    category=category, solution=canonical(kind, **kw))
    if kind == "plural":
        kw = rng.choice([f for f in facts[kind] if plural_rule(f["a"], f["b"]) == want])
    else:
        kw = rng.choice([f for f in facts[kind] if f["v"] == want] or facts[kind])
    return dict(question=_say(question, **kw), hint="", answer=_say(answer, **kw) if answer else want,
                options=options, topic=topic, category=category, solution=canonical(kind, **kw))


def context_kind(problem: dict[str, Any]) -> str:
    """ScienceQA's context column: IMG if the problem has an image, else TXT if it has a hint, else NO."""
    return "IMG" if problem["image"] else "TXT" if problem["hint"] else "NO"


def _problems(rng: random.Random, facts: list[Fact], n: int) -> tuple[dict[str, dict], dict[str, tuple]]:
    """`problems.json` with splits set, and the image to draw per pid. Subjects, grade bands and context
    kinds cycle, then split ~60/20/20 within each combination, so every split has every table row."""
    by_kind: dict[str, list[dict]] = {}
    for kind, kw in facts:
        by_kind.setdefault(kind, []).append(kw)
    turns: Counter = Counter()

    def turn(kind: str) -> int:
        turns[kind] += 1
        return turns[kind] - 1

    drafts = []
    for i in range(n):
        subject, band, context = CELLS[i % len(CELLS)]
        q = (_image_question(rng, subject, turn) if context == "IMG" else _context_question(rng, subject, turn)
             if context == "TXT" else _fact_question(rng, subject, by_kind, turn))
        choices = list(q["options"])
        answer = choices.index(q["answer"])
        skill, lecture = LECTURES[q["category"]]
        drafts.append(({"question": q["question"], "choices": choices, "answer": answer, "hint": q["hint"],
                        "image": "image.png" if "image" in q else None, "task": "closed choice",
                        "grade": f"grade{rng.randint(band, band + 5)}", "subject": SUBJECTS[subject],
                        "topic": q["topic"], "category": q["category"], "skill": skill, "lecture": lecture,
                        "solution": q.get("solution", q["hint"])}, q.get("image")))
    rng.shuffle(drafts)  # so that pids are not ordered by cell
    problems = {str(i + 1): p for i, (p, _) in enumerate(drafts)}
    cells: dict[tuple, list[str]] = {}
    for pid, p in problems.items():
        cells.setdefault((p["subject"], _band(p), context_kind(p)), []).append(pid)
    for pids in cells.values():
        rng.shuffle(pids)
        held = max(1, round(0.2 * len(pids)))
        for j, pid in enumerate(pids):
            problems[pid]["split"] = "test" if j < held else "val" if j < 2 * held else "train"
    return problems, {str(i + 1): image for i, (_, image) in enumerate(drafts) if image}


def _band(problem: dict[str, Any]) -> str:
    return "G1-6" if int(problem["grade"].removeprefix("grade")) <= 6 else "G7-12"


def _draw(shape: str, colour: str, r: int, dx: int, dy: int) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    x, y = IMAGE_SIZE // 2 + dx, IMAGE_SIZE // 2 + dy
    draw, fill = ImageDraw.Draw(image), IMAGE_COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="ascii")


def _counts(items: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))


def check_demo_sizes(n_instructions: int, n_questions: int) -> None:
    """Sizes the demo can be made at (the command line checks them before the command starts: a usage error)."""
    if n_questions < len(CELLS):
        raise ValueError(f"questions {n_questions}: expected at least {len(CELLS)}, so that every split gets every "
                         "kind")
    if n_instructions < 1:  # an empty alpaca.json would only fail at tokenize, two stages on
        raise ValueError(f"instructions {n_instructions}: expected at least 1")


def generate_demo(out_dir: Path, seed: int = DemoConfig.seed, n_instructions: int = DemoConfig.instructions,
                  n_questions: int = DemoConfig.questions) -> dict:
    """Write corpus.jsonl, alpaca.json and scienceqa/ (original layout) under `out_dir`, all or nothing.

    Returns counts: corpus lines and bytes, Alpaca records per task kind, ScienceQA problems per split by
    subject, context kind and grade band."""
    check_demo_sizes(n_instructions, n_questions)
    rng = random.Random(seed)
    groups = _facts(rng)
    facts = [fact for group in groups for fact in group]
    corpus = _corpus(rng, groups, _primers(seed, facts))
    alpaca = _alpaca(rng, facts, n_instructions)
    problems, images = _problems(rng, facts, n_questions)
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / DEMO_CORPUS).write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus), encoding="ascii")
        _write_json(tmp / "alpaca.json", [record for _, record in alpaca])
        for pid, spec in images.items():
            (tmp / "scienceqa" / "images" / pid).mkdir(parents=True)
            _draw(*spec).save(tmp / "scienceqa" / "images" / pid / "image.png", format="PNG")
        _write_json(tmp / "scienceqa" / "problems.json", problems)
        _write_json(tmp / "scienceqa" / "pid_splits.json",
                    {s: sorted((pid for pid, p in problems.items() if p["split"] == s), key=int)
                     for s in SCIENCEQA_SPLITS})
    by_split = {s: [p for p in problems.values() if p["split"] == s] for s in SCIENCEQA_SPLITS}
    return {
        "corpus": {"documents": len(corpus), "bytes": (Path(out_dir) / DEMO_CORPUS).stat().st_size},
        "alpaca": {"records": len(alpaca), "with_input": sum(bool(r["input"]) for _, r in alpaca),
                   "kinds": _counts([k for k, _ in alpaca])},
        "scienceqa": {s: {"problems": len(ps), "images": sum(bool(p["image"]) for p in ps),
                          "subject": _counts([p["subject"] for p in ps]),
                          "context": _counts([context_kind(p) for p in ps]), "grade": _counts([_band(p) for p in ps])}
                      for s, ps in by_split.items()},
    }


def read_corpus(corpus: Path) -> list[str]:
    """Documents of a JSONL corpus, one {"text": ...} per line; a bad line is an InputError naming the file and
    its 1-based line number."""
    expected = 'a JSONL corpus, one {"text": document} object per line'
    docs = []
    for n, doc in read_jsonl_lines(corpus, expected, InputError):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            found = (f"keys {sorted(doc)}" if isinstance(doc, dict) and "text" not in doc else
                     f"'text' of type {type(doc['text']).__name__}" if isinstance(doc, dict) else
                     f"a JSON {type(doc).__name__}")
            raise InputError(f"{corpus}, line {n}: {found}; expected an object with a 'text' string")
        docs.append(doc["text"])
    if not any(d.strip() for d in docs):
        raise InputError(f"{corpus}: holds no text; expected {expected}")
    return docs
