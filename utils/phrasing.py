"""Captions of the shapes data in people's own words, and the attributes read back from any caption.

The shapes data (dataset.ShapesDataset) has five attributes: colour, shape, size, and position (images) or direction
of motion (videos).  The strict grammar says them one way ("a small red circle left", "a red circle moving up");
people say them many ways ("a tiny crimson ball on the left", "top: big blue square", "there is a green triangle
heading to the left").  `phrase` draws one wording of the attributes: a sentence template and a synonym per
attribute, from the training phrasings or from the held-out ones, which never occur in training (their templates
and a few of their words are their own), so that a model's accuracy on them measures understanding, not recall.
`parse_caption` reads the attributes back from a caption in any of these wordings (and others built from the same
words), for the evaluator (scripts/eval_shapes.py).
"""
import re

import numpy as np

COLOR_WORDS = {"red": ["red", "crimson", "ruby", "cherry red", "bright red", "tomato red", "maroon", "blood red"],
               "green": ["green", "emerald", "grass green", "jade", "lime green", "forest green",
                         "olive green", "mint green", "bottle green", "sage green", "moss green"],
               "blue": ["blue", "azure", "cobalt", "sapphire", "royal blue", "sky blue", "dark blue",
                        "cerulean", "baby blue", "ocean blue", "midnight blue", "denim blue"],
               "yellow": ["yellow", "golden", "lemon", "canary yellow", "sunny yellow", "mustard",
                          "gold", "banana yellow", "pale yellow", "saffron", "butter yellow"],
               "purple": ["purple", "magenta", "plum", "lilac", "amethyst", "mauve", "lavender",
                          "orchid", "fuchsia", "dark purple", "eggplant purple"],
               "orange": ["orange", "amber", "tangerine", "pumpkin orange", "apricot", "bright orange",
                          "carrot orange", "burnt orange"]}
SHAPE_WORDS = {"circle": ["circle", "ball", "dot", "round blob", "sphere", "orb", "round shape", "coin",
                          "bubble", "circular shape", "ring", "oval", "wheel", "plate", "button",
                          "saucer", "puck", "pancake", "pearl", "token", "medallion"],
               "square": ["square", "box", "block", "tile", "square shape", "boxy shape", "crate",
                          "dice", "cuboid", "square block", "rectangle", "brick", "slab", "parcel",
                          "package", "chunk", "quadrilateral", "four-sided shape"],
               "triangle": ["triangle", "wedge", "pyramid", "triangular shape", "arrowhead", "cone",
                            "triangular block", "tent", "slice", "spike", "delta", "peak",
                            "three-sided shape", "shark fin", "spear"]}
SIZE_WORDS = {"small": ["small", "little", "mini", "petite", "smallish"],
              "large": ["large", "big", "giant", "massive", "oversized"]}
POSITION_WORDS = {"left": ["left", "on the left", "to the left", "at the left side", "on the left-hand side",
                           "at the far left", "on the left edge", "in the left part of the image",
                           "over on the left", "on the left side"],
                  "right": ["right", "on the right", "to the right", "at the right side", "on the right-hand side",
                            "at the far right", "on the right edge", "in the right part of the image",
                            "over on the right", "on the right side"],
                  "top": ["top", "at the top", "near the top", "in the upper part", "along the top edge",
                          "at the top of the picture", "in the upper half", "high at the top", "right at the top"],
                  "bottom": ["bottom", "at the bottom", "near the bottom", "in the lower part",
                             "along the bottom edge", "at the bottom of the picture", "in the lower half",
                             "low at the bottom", "right at the bottom"],
                  "center": ["center", "in the center", "in the middle", "at the centre", "in the very middle",
                             "in the middle of the picture", "at the center of the image", "in the central area",
                             "right in the middle", "right at the center", "dead center"]}
DIRECTION_WORDS = {"left": ["moving left", "going left", "heading to the left", "moving leftwards", "sliding left",
                            "travelling left", "gliding to the left", "moving to the left",
                            "moving from right to left", "travelling from the right to the left"],
                   "right": ["moving right", "going right", "heading to the right", "moving rightwards",
                             "sliding right", "travelling right", "gliding to the right", "moving to the right",
                             "moving from left to right", "going from the left to the right"],
                   "up": ["moving up", "going up", "rising", "moving upwards", "heading up", "floating up",
                          "travelling upward", "ascending", "moving from bottom to top",
                          "going from the bottom to the top"],
                   "down": ["moving down", "going down", "falling", "moving downwards", "heading down",
                            "dropping", "travelling downward", "descending", "moving from top to bottom",
                            "falling from the top to the bottom"]}
# Words only the held-out phrasings use.
HELD_OUT_WORDS = {"color": {"red": ["scarlet"], "purple": ["violet"], "blue": ["navy blue"]},
                  "shape": {"circle": ["disc"], "square": ["cube"]},
                  "size": {"small": ["tiny"], "large": ["huge"]},
                  "position": {"top": ["up top"], "center": ["centered"], "left": ["on its left side"]},
                  "direction": {"down": ["sinking"], "up": ["climbing"], "left": ["drifting left"]}}

# {size} {color} {shape} {where}: a bare position ("left") or a phrase ("on the left"); {Where}: capitalised.
IMAGE_TEMPLATES = {
    "train": ["a {size} {color} {shape} {position}", "a {size} {color} {shape} {where}",
              "{Where}: a {size} {color} {shape}", "there is a {size} {color} {shape} {where}",
              "{position}: {size} {color} {shape}", "a {color} {shape}, {size}, {where}",
              "a {size} {shape} in {color} {where}", "{size} {color} {shape} {where}",
              "the {shape} is {color} and {size}, {where}", "a picture of a {size} {color} {shape} {where}",
              "{Where} is a {size} {color} {shape}", "one {size} {color} {shape}, {where}",
              "a photo of a {size} {color} {shape} {where}", "you can see a {size} {color} {shape} {where}",
              "a {size} {shape} colored {color}, {where}", "{size}, {color} {shape} {where}",
              "a {color} {shape} of {size} size {where}", "{Where}, a {size} {color} {shape}"],
    "heldout": ["draw a {size} {color} {shape} {where}", "I see a {size} {color} {shape} {where}",
                "{Where}, there's a {size} {color} {shape}", "a {color} {shape} that is {size}, placed {where}",
                "an image showing a {size} {color} {shape} {where}", "{size} {shape}, {color}, {where}"],
}
VIDEO_TEMPLATES = {
    "train": ["a {color} {shape} {moving}", "there is a {color} {shape} {moving}", "{color} {shape}, {moving}",
              "a {color} {shape} that is {moving}", "the {color} {shape} is {moving}",
              "a {size} {color} {shape} {moving}", "a {shape} in {color} {moving}",
              "a clip of a {color} {shape} {moving}", "you can see a {color} {shape} {moving}",
              "a {size} {shape} colored {color}, {moving}", "one {color} {shape} {moving}"],
    "heldout": ["watch a {color} {shape} {moving}", "a {size} {shape}, {color}, {moving}",
                "video of a {color} {shape} {moving}", "here a {color} {shape} keeps {moving}"],
}
SPLITS = ("grammar", "train", "heldout")


def phrase(attrs: dict, rng: np.random.Generator, split: str = "train", from_to: float | None = None) -> str:
    """One wording of `attrs` (color, shape, size, and position or direction): "grammar" is the strict grammar
    (dataset.shape_caption), "train" a training phrasing, "heldout" an evaluation-only one.  `from_to` (training
    phrasings of videos): the share of captions whose direction names where the motion starts and ends ("from the
    bottom to the top", whose words alone, without their order, say nothing); None draws every wording of a
    direction alike (2 in 10 of them), the same stream as before the option."""
    video = attrs.get("direction") is not None
    if split == "grammar":
        return f"a {attrs['color']} {attrs['shape']} moving {attrs['direction']}" if video else \
            f"a {attrs['size']} {attrs['color']} {attrs['shape']} {attrs['position']}"
    if split not in SPLITS:
        raise ValueError(f"phrasing {split!r}: one of {', '.join(SPLITS)}")
    pick = lambda kind, table, value: _pick(rng, table[value] + (HELD_OUT_WORDS[kind].get(value, [])
                                                                 if split == "heldout" else []))
    words = dict(color=pick("color", COLOR_WORDS, attrs["color"]), shape=pick("shape", SHAPE_WORDS, attrs["shape"]),
                 size=pick("size", SIZE_WORDS, attrs["size"]))
    if video:
        if from_to is None:
            words["moving"] = pick("direction", DIRECTION_WORDS, attrs["direction"])
        else:
            ends = rng.random() < from_to
            words["moving"] = _pick(rng, [w for w in DIRECTION_WORDS[attrs["direction"]] if (" from " in w) == ends])
        template = _pick(rng, VIDEO_TEMPLATES[split])
    else:
        words["position"] = attrs["position"]
        words["where"] = pick("position", POSITION_WORDS, attrs["position"])
        words["Where"] = words["where"][0].upper() + words["where"][1:]
        template = _pick(rng, IMAGE_TEMPLATES[split])
    text = template.format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange ...", "an amber ..."


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(*tables) -> dict[str, str]:
    """word or phrase -> attribute value, over the tables given (training and held-out words)."""
    found = {}
    for table in tables:
        for value, words in table.items():
            for word in words:
                found[word] = value
    return found


_EXTRA = {"color": {"violet": "purple", "scarlet": "red"},
          "position": {"centre": "center", "middle": "center", "central": "center", "upper": "top", "lower": "bottom", "above": "top",
                       "below": "bottom"},
          "direction": {"upward": "up", "upwards": "up", "downward": "down", "downwards": "down",
                        "leftward": "left", "rightward": "right", "dropping": "down", "ascending": "up",
                        "descending": "down"}}
_LEXICON = {
    "color": _words(COLOR_WORDS, HELD_OUT_WORDS["color"], {v: [k] for k, v in _EXTRA["color"].items()}),
    "shape": _words(SHAPE_WORDS, HELD_OUT_WORDS["shape"]),
    "size": _words(SIZE_WORDS, HELD_OUT_WORDS["size"]),
    # Single words suffice: the phrases are built from them.
    "position": {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
                 "centered": "center", **_EXTRA["position"]},
    "direction": {"left": "left", "right": "right", "up": "up", "down": "down", "rising": "up", "falling": "down",
                  "sinking": "down", "climbing": "up", "leftwards": "left", "rightwards": "right",
                  "rise": "up", "rises": "up", "climb": "up", "climbs": "up", "ascends": "up",
                  "fall": "down", "falls": "down", "sink": "down", "sinks": "down", "drops": "down",
                  "descends": "down",
                  **_EXTRA["direction"]},
}
_MOTION = re.compile(r"\b(moving|moves|move|going|goes|heading|heads|sliding|slides|slide|drifting|drifts|drift|"
                     r"travel+ing|travels|travel|gliding|glides|glide|floating|floats|float|go|"
                     r"rising|rises|rise|falling|falls|fall|sinking|sinks|sink|climbing|climbs|climb|dropping|"
                     r"drops|drop|ascending|ascends|descending|descends)\b")
# "from left to right", "from the top to the bottom": the motion goes toward the second place
_FROM_TO = re.compile(r"\bfrom (?:the )?(left|right|top|bottom)(?: side| edge)? to (?:the )?(left|right|top|bottom)\b")
_TOWARD = {"left": "left", "right": "right", "top": "up", "bottom": "down"}
_PLACED = re.compile(r" (?:right )?(?:in|on|at) the\b")
# "right in the middle", "right at the top": "right" is "exactly" there, not a place
_JUST_THERE = re.compile(r"\bright (?=(?:in|at) the (?:very )?(?:middle|center|centre|top|bottom)\b)")


def _find(kind: str, text: str, after: int = 0) -> list[tuple[int, str]]:
    """(position in text, value) of every word or phrase of `kind` in `text`, longest phrases first."""
    hits, taken = [], []
    for word in sorted(_LEXICON[kind], key=len, reverse=True):
        for match in re.finditer(rf"\b{re.escape(word)}\b", text):
            span = range(match.start(), match.end())
            if match.start() >= after and not any(set(span) & set(t) for t in taken):
                hits.append((match.start(), _LEXICON[kind][word]))
                taken.append(span)
    return sorted(hits)


def held_out_words(text: str) -> list[str]:
    """The words of HELD_OUT_WORDS in a caption ("a tiny scarlet disc" -> ["disc", "scarlet", "tiny"]): words that
    training never uses, which a model can only read through its text encoder.  A held-out phrasing draws each
    attribute's word from the training words and these alike, so the more training words, the fewer held-out
    captions hold one; the evaluator reports them apart."""
    lowered = text.lower()
    return sorted(w for table in HELD_OUT_WORDS.values() for words in table.values() for w in words
                  if re.search(rf"\b{re.escape(w)}\b", lowered))


def says_start(text: str) -> bool:
    """Whether a caption names where the motion starts and ends ("moving from left to right", "from the top to the
    bottom"), not only the way it goes."""
    path = _FROM_TO.search(text.lower())
    return bool(path) and path[1] != path[2]


def parse_caption(text: str, video: bool | None = None) -> dict:
    """The attributes a caption asks for: {color, shape, size, position} for an image, {color, shape, direction}
    for a video (a caption that names a motion, unless `video` says which).  Reads any wording built from the
    phrasing vocabulary ("a tiny scarlet ball near the top", "top: big blue square", "a green triangle heading
    left", "a red square that travels from left to right", "a blue dot right in the middle").  Raises ValueError naming what is missing or contradictory."""
    lowered = " ".join(text.lower().replace("-hand", "").split())
    # a motion word, unless it places the shape ("it goes in the middle", "goes right at the top")
    motion = next((m for m in _MOTION.finditer(lowered) if not _PLACED.match(lowered, m.end())), None)
    path = _FROM_TO.search(lowered)
    video = bool(motion) if video is None else video
    if video and path and path[1] != path[2]:
        lowered = lowered[:path.start()] + _TOWARD[path[2]] + lowered[path.end():]  # the way it goes
    elif not video:
        lowered = _JUST_THERE.sub("", lowered)
    kinds = ("color", "shape", "direction") if video else ("color", "shape", "size", "position")
    attrs = {}
    for kind in kinds:
        found = _find(kind, lowered, motion.start() if kind == "direction" and motion else 0)
        if kind == "direction" and not found and motion:  # "rising", "falling": the motion word itself
            found = _find(kind, lowered, 0)
        values = {value for _, value in found}
        if not values:
            raise ValueError(f"{text!r}: no {kind} found")
        if len(values) > 1 and kind not in ("direction", "position"):
            raise ValueError(f"{text!r}: more than one {kind} ({', '.join(sorted(values))})")
        attrs[kind] = found[0][1]
    return attrs
