"""Class names: the seven FER2013 emotions and the aliases other datasets use for them."""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# Other spellings seen in public FER datasets (RAF-DB, AffectNet, CK+, KDEF, folder dumps).
ALIASES: dict[str, str] = {
    "anger": "angry",
    "angered": "angry",
    "disgusted": "disgust",
    "disgusting": "disgust",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "fearfull": "fear",
    "happiness": "happy",
    "happy_face": "happy",
    "joy": "happy",
    "smile": "happy",
    "neutrality": "neutral",
    "calm": "neutral",
    "sadness": "sad",
    "unhappy": "sad",
    "surprised": "surprise",
    "surprize": "surprise",
    "contemptuous": "contempt",
}

# Codes of the Kaggle FER2013 CSV's `emotion` column; not the alphabetical folder order.
FER2013_CSV_CODES: dict[int, str] = {
    0: "angry",
    1: "disgust",
    2: "fear",
    3: "happy",
    4: "sad",
    5: "surprise",
    6: "neutral",
}


def canonical_label(name: str) -> str:
    """Lower-case `name` and map a known alias to its canonical class name ("Happiness" -> "happy")."""
    key = _key(name)
    return ALIASES.get(key, key)


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def canonical_labels(names) -> list[str]:
    """canonical_label of each of a class list's names, except an alias given beside the class it stands for:
    "calm" beside "neutral" (RAVDESS tells them apart) is a class of its own."""
    keys = [_key(name) for name in names]
    return [key if ALIASES.get(key, key) in keys else ALIASES.get(key, key) for key in keys]


def aliases_taken(names) -> list[tuple[str, str]]:
    """(name, class) for each of a class list's names that canonical_labels takes as another class's."""
    return [(name, label) for name, label in zip(names, canonical_labels(names)) if _key(name) != label]


def class_of(folder: str, classes) -> str:
    """The class of `classes` a folder's name stands for: the name itself where it is one of them (a class
    list may keep "calm" apart from "neutral"), else its canonical_label."""
    key = _key(folder)
    return key if key in classes else canonical_label(folder)


def repeated(names) -> list[str]:
    """The names that occur more than once in `names`, sorted."""
    names = list(names)
    return sorted({name for name in names if names.count(name) > 1})
