"""Which of the 80 MSCOCO objects a caption mentions, the way the CHAIR metric reads captions.

CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning") maps every word of a caption to
one of the 80 COCO categories through a synonym table, after lower-casing, tokenising and singularising
the words and after joining a fixed list of two-word phrases ("hot dog" is not a dog, "teddy bear" is not a
bear, "baby elephant" is an elephant and no person). This module is that reading, written for this package
so that it needs neither ``nltk`` nor ``pattern``. It reproduces the object mentions of the reference script
(``utils/chair.py`` in github.com/LisaAnne/Hallucination, and its Python 3 standalone port that OPERA and
later decoding papers copied), quirks included, because a CHAIR number is only comparable to published ones
when it is computed the same way. (OPERA's copy singularises with nltk's WordNet lemmatiser instead of
``pattern``; that reads "bus" and "ties" as objects where this, like the original, does not.)

The reference behaviour kept on purpose, although it looks like a slip:

* its synonym file writes "motor bike" and "cheesecake" with a leading space and "iPhone" with a capital,
  so those three never match a (lower-cased, tokenised) caption word; they are left out here. "motor bike"
  is still joined as a phrase, so its "bike" is not read as a bicycle either.
* its singulariser (``pattern.en.singularize``) turns "bus" into "bu" and "minibus" into "minibu", so only
  the plurals "buses"/"minibuses" count as a bus; it leaves "collies"/"doggies" unchanged and turns "ties"
  into "ty", "tennis" into "tenni" and "sports" into "sport" (so "tennis racket" and "sports ball" are never
  joined, their "racket"/"ball" still count). :func:`singularize` gives the same answers on every word that
  can matter (see its docstring).
* "stove top oven" is in its phrase list but, being three words, never matches; "oven"/"stove" still count.

Public names: :data:`COCO_SYNONYMS`, :data:`OBJECT_OF_WORD`, :data:`PHRASES`, :class:`CaptionObjects`,
:func:`tokenize`, :func:`singularize`, :func:`caption_words`, :func:`caption_objects`, :func:`node_of_category`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

__all__ = [
    "COCO_SYNONYMS",
    "CaptionObjects",
    "OBJECT_OF_WORD",
    "PHRASES",
    "caption_objects",
    "caption_words",
    "node_of_category",
    "singularize",
    "tokenize",
]

# -- the synonym table ---------------------------------------------------------------------------------
#: COCO category name -> the words (singular, lower case) that name it in a caption. The category name
#: itself always names it too. Same word sets as the reference ``synonyms.txt`` (Rohrbach et al.).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    # people
    "person": tuple(
        (
            "girl boy man woman kid child chef baker people adult rider children baby worker passenger sister "
            "biker policeman cop officer lady cowboy bride groom male female guy traveler mother father gentleman "
            "pitcher player skier snowboarder skater skateboarder foreigner caller offender coworker trespasser "
            "patient politician soldier grandchild serviceman walker drinker doctor bicyclist thief buyer teenager "
            "student camper driver solider hunter shopper villager"
        ).split()
    ),
    # vehicles
    "bicycle": ("bike", "unicycle", "minibike", "trike"),
    "car": tuple("automobile van minivan sedan suv hatchback cab jeep coupe taxicab limo taxi".split()),
    "motorcycle": ("scooter", "motor cycle", "motorbike", "moped"),
    "airplane": ("jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane", "seaplane"),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tramway", "caboose"),
    "truck": ("pickup", "lorry", "hauler", "firetruck"),
    "boat": tuple(
        (
            "ship liner sailboat motorboat dinghy powerboat speedboat canoe skiff yacht kayak catamaran pontoon "
            "houseboat vessel rowboat trawler ferryboat watercraft tugboat schooner barge ferry sailboard "
            "paddleboat lifeboat freighter steamboat riverboat battleship steamship"
        ).split()
    ),
    # outdoor
    "traffic light": ("street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    # animals
    "bird": tuple(
        (
            "ostrich owl seagull goose duck parakeet falcon robin pelican waterfowl heron hummingbird mallard "
            "finch pigeon sparrow seabird osprey blackbird fowl shorebird woodpecker egret chickadee quail "
            "bluebird kingfisher buzzard willet gull swan bluejay flamingo cormorant parrot loon gosling "
            "waterbird pheasant rooster sandpiper crow raven turkey oriole cowbird warbler magpie peacock "
            "cockatiel lorikeet puffin vulture condor macaw peafowl cockatoo songbird"
        ).split()
    ),
    "cat": ("kitten", "feline", "tabby"),
    "dog": tuple(
        (
            "puppy beagle pup chihuahua schnauzer dachshund rottweiler canine pitbull collie pug terrier poodle "
            "labrador doggie doberman mutt doggy spaniel bulldog sheepdog weimaraner corgi cocker greyhound "
            "retriever brindle hound whippet husky"
        ).split()
    ),
    "horse": tuple("colt pony racehorse stallion equine mare foal palomino mustang clydesdale bronc bronco".split()),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": tuple("cattle oxen ox calf holstein heifer buffalo bull zebu bison".split()),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    # accessories
    "backpack": ("knapsack",),
    "umbrella": (),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("bow", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    # sports
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball",),
    "kite": (),
    "baseball bat": (),
    "baseball glove": (),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket",),
    # kitchen
    "bottle": (),
    "wine glass": (),
    "cup": (),
    "fork": (),
    "knife": ("pocketknife", "knive"),
    "spoon": (),
    "bowl": ("container",),
    # food
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": (),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cupcake", "shortcake", "coffeecake", "pancake"),
    # furniture
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty"),
    # electronics
    "tv": ("monitor", "televison", "television"),
    "laptop": ("computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": ("mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone"),
    # appliances
    "microwave": (),
    "oven": ("stovetop", "stove", "stove top oven"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    # indoor
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hairdryer",),
    "toothbrush": (),
}

#: caption word (or joined phrase) -> the COCO category it names
OBJECT_OF_WORD: dict[str, str] = {word: node for node, words in COCO_SYNONYMS.items() for word in (node, *words)}

#: the animals a leading "baby"/"adult" belongs to (so "baby giraffe" is a giraffe, not a person)
_YOUNG_OR_ADULT = tuple("bird cat dog horse sheep cow elephant bear zebra giraffe animal cub".split())

#: two consecutive singularised words -> the single word they are read as (left to right, no overlaps)
PHRASES: dict[str, str] = {
    **{
        phrase: phrase
        for phrase in (
            "motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, "
            "fire hydrant, stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, "
            "tennis racket, wine glass, hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, "
            "laptop computer, home plate, train track"
        ).split(", ")
    },
    **{f"{age} {animal}": animal for animal in _YOUNG_OR_ADULT for age in ("baby", "adult")},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    # the reference singulariser turns "glass" into "glas"
    "wine glas": "wine glass",
}


def node_of_category(name: str) -> str | None:
    """The CHAIR object a COCO category name (``instances_*.json``) stands for; ``None`` if it is none of the 80."""
    return OBJECT_OF_WORD.get(name)


# -- singularisation -----------------------------------------------------------------------------------
# The reference script singularises every token with ``pattern.en.singularize``. Only a word whose singular
# is a table word or part of a phrase can change a CHAIR number, so the rules below are the part of that
# singulariser's behaviour that can reach those words. Checked against pattern 3.6 on ~270k English words plus
# the inflected forms of every table word (the cases that matter are kept in tests/test_bench_chair.py).

#: whole words the reference leaves as they are ("scissors" has no plural; "collies" and "doggies" it keeps)
_KEEP = frozenset({"scissors", "collies", "doggies"})

#: irregular plural endings -> singular endings (an ending, so "policemen" -> "policeman")
_IRREGULAR_ENDINGS = (
    ("people", "person"),
    ("children", "child"),
    ("men", "man"),
    ("geese", "goose"),
    ("feet", "foot"),
    ("teeth", "tooth"),
    ("oxen", "ox"),
    ("oxens", "oxs"),  # sic: the reference's "oxen" rule is not tied to the word's end
    ("kine", "cow"),
    ("mice", "mouse"),
    ("lice", "louse"),
)

#: (end of a word, replacement), the first that matches wins; the last one strips a plural "s"
_SUFFIX_RULES = tuple(
    (re.compile(ending + "$"), repl)
    for ending, repl in (
        (r"(.)ae", r"\1a"),  # zebrae -> zebra
        (r"(shoe)s", r"\1"),
        (r"(o)es", r"\1"),  # buffaloes -> buffalo, canoes -> cano
        (r"(bus)es", r"\1"),  # buses -> bus
        (r"(x|ch|ss|sh)es", r"\1"),  # benches -> bench, glasses -> glass
        (r"([^aeiouy]|qu)ies", r"\1y"),  # ponies -> pony, ties -> ty
        (r"([aeo]l)ves", r"\1f"),  # calves -> calf
        (r"([^d]ea)ves", r"\1f"),
        (r"([nlw]i)ves", r"\1fe"),  # knives -> knife
        (r"([aeo])ves", r"\1ve"),  # gloves -> glove, stoves -> stove
        (r"s", ""),  # dogs -> dog, and (as the reference does) bus -> bu, glass -> glas
    )
)

_LETTERS = re.compile(r"[a-z]+")


@lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """The singular of a lower-case ``word`` as CHAIR's reference singulariser gives it, where that can matter.

    Exact on every word whose reference singular is a COCO table word or phrase part, and never yields one
    where the reference does not; other words may come out differently, which changes no CHAIR number. A
    word with anything but the letters a-z is returned as it is (it cannot name a COCO object either way).
    """
    if word in _KEEP or not _LETTERS.fullmatch(word):
        return word
    for ending, singular in _IRREGULAR_ENDINGS:
        if word.endswith(ending):
            return word[: len(word) - len(ending)] + singular
    for rule, repl in _SUFFIX_RULES:
        new, n = rule.subn(repl, word, count=1)
        if n:
            return new
    return word


# -- tokenisation --------------------------------------------------------------------------------------
# The reference script tokenises with nltk's ``word_tokenize`` (Punkt sentence splitting, then the Penn
# Treebank rules). This is a dependency-free reading of the same rules: punctuation and brackets become
# tokens of their own, "," and ":" unless a digit follows ("3,000"), a word's final period where it ends a
# sentence, and clitics ("dog's" -> "dog", "'s"; "don't" -> "do", "n't"); hyphens, slashes and inner
# periods stay inside a word ("hot-dog", "3.5"). As in Punkt on lower-cased text, a number or a single
# letter keeps its period when a lower-case word follows ("at 10:21. the"). Known differences, none of which
# changes which objects a caption names (only, rarely, the token count): Punkt keeps the period of the
# abbreviations its English model knows ("mr.", "etc.") where this splits it, and this keeps the period of
# any dotted abbreviation ("e.g.", "u.s.") inside a text; odd runs such as ",," come apart sign by sign here.

_SEPARATE = re.compile(r"(\.{2,}|--|`+|''|[;@#$%&*?!()\[\]{}<>\"«»“”‘’„\u2012-\u2015]|[,:](?!\d))")
_AFTER_SENTENCE = frozenset("?!)\";}]*:@'({[")  # signs Punkt lets follow a sentence's last period directly
_FINAL_PERIOD = re.compile(r"[^.](\.)[\])}>\"']*$")
_DOTTED_ABBREVIATION = re.compile(r"(?<![a-z.])(?:[a-z]\.)+[a-z]$")
_CLOSING_ONLY = re.compile(r"[\"')\]}]+")  # Punkt moves these into the sentence, past its final period
# Punkt's last word of a text: from its last break sign on (a break sign that cannot start a word stays apart)
_PUNKT_LAST_WORD = re.compile(r"['!?]?[^)\";}\]*:@'({\[!?]*$")
_NUMBER_OR_INITIAL = re.compile(r"-?[.,]?\d[\d,.-]*|[^\W\d]")
_OPENING_QUOTE = re.compile(r"'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_CLITIC = re.compile(r"(.*[^'])(n't|'ll|'re|'ve|'s|'m|'d)")
_CONTRACTIONS = {
    "cannot": ("can", "not"),
    "d'ye": ("d", "'ye"),
    "gimme": ("gim", "me"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "lemme": ("lem", "me"),
    "more'n": ("more", "'n"),
    "wanna": ("wan", "na"),
}


def _sentence_periods(chunk: str, last: bool) -> list[int]:
    """Indices of the periods in ``chunk`` (no spaces) that may end a sentence; ``last``: it ends the text.

    Punkt ends a sentence after the last of ".?!" in a chunk that a space (and a next chunk) or one of
    :data:`_AFTER_SENTENCE` follows; the Treebank rules then split a period there, and at the text's end.
    """
    found = []
    for i in range(len(chunk) - 1, 0, -1):
        if chunk[i] in ".?!" and (chunk[i + 1 : i + 2] in _AFTER_SENTENCE if i + 1 < len(chunk) else not last):
            if chunk[i] == "." and chunk[i - 1] != ".":
                found.append(i)
            break
    final = _FINAL_PERIOD.search(chunk) if last else None
    if final and final.start(1) not in found:
        found.append(final.start(1))
    return sorted(found)


def _keeps_period(body: str, after: str, next_chunk: bool) -> bool:
    """Whether the period that ends ``body`` stays on it.

    ``after`` is what follows the period: the rest of its chunk, else the next chunk (``next_chunk``), else ''.
    """
    if not after:
        return False
    if _DOTTED_ABBREVIATION.search(body) or (next_chunk and _CLOSING_ONLY.fullmatch(after)):
        return True
    if _NUMBER_OR_INITIAL.fullmatch(_PUNKT_LAST_WORD.search(body).group()):
        return after[0].islower() or after[0] in ";:,.!?"
    return False


def _word_tokens(piece: str) -> list[str]:
    """A word with an opening quote, a closing quote and a clitic split off ("'dog's'" -> ', dog, 's, ')."""
    head, tail = [], []
    if _OPENING_QUOTE.match(piece):
        head, piece = ["'"], piece[1:]
    if len(piece) > 1 and piece[-1] == "'" and piece[-2] != "'":
        piece, tail = piece[:-1], ["'"]
    clitic = _CLITIC.fullmatch(piece)
    if clitic:
        piece, tail = clitic.group(1), [clitic.group(2), *tail]
    return [*head, *_CONTRACTIONS.get(piece, (piece,)), *tail]


def tokenize(text: str) -> list[str]:
    """Word tokens of ``text`` as nltk's ``word_tokenize`` makes them (see the notes above); quotes stay ``"``."""
    tokens: list[str] = []
    chunks = text.split()
    for i, chunk in enumerate(chunks):
        last = i + 1 == len(chunks)
        for period in reversed(_sentence_periods(chunk, last)):
            body, tail = chunk[:period], chunk[period + 1 :]
            if not _keeps_period(body, tail or ("" if last else chunks[i + 1]), next_chunk=not tail):
                chunk = f"{body} . {tail}"
        for part in chunk.split(" "):
            for piece in _SEPARATE.split(part):
                if not piece:
                    continue
                if _SEPARATE.fullmatch(piece):
                    tokens.append(piece)
                else:
                    tokens.extend(_word_tokens(piece))
    return tokens


# -- a caption's objects -------------------------------------------------------------------------------
class CaptionObjects(NamedTuple):
    """The COCO objects a caption mentions, one entry per mention, in caption order."""

    words: list[str]  #: the caption word (singularised, or joined phrase) of each mention
    objects: list[str]  #: the COCO category of each mention
    length: int  #: the caption's word count: tokens (punctuation included) after joining phrases


def caption_words(caption: str) -> list[str]:
    """The caption's words as CHAIR reads them: lower-cased, tokenised, singularised, phrases joined."""
    words = [singularize(token) for token in tokenize(caption.lower())]
    joined: list[str] = []
    i = 0
    while i < len(words):
        phrase = PHRASES.get(f"{words[i]} {words[i + 1]}") if i + 1 < len(words) else None
        if phrase is not None:
            joined.append(phrase)
            i += 2
        else:
            joined.append(words[i])
            i += 1
    return joined


def caption_objects(caption: str) -> CaptionObjects:
    """Every mention of a COCO object in ``caption`` (in a caption naming a toilet, a "seat" is no chair)."""
    words = caption_words(caption)
    length = len(words)
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    mentioned = [w for w in words if w in OBJECT_OF_WORD]
    return CaptionObjects(mentioned, [OBJECT_OF_WORD[w] for w in mentioned], length)
