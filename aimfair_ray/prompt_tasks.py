"""Prompt tasks: what the CSDG prompts describe; each dataset's entry (``data/datasets.py``) names its own.

A task (:class:`aimfair_ray.config.TaskConfig`) names each class and group with the phrases a
prompt must use (the phrase check), the wording templates and the LLM say, context axes, the
templates and the LLM instruction. ``generate.task``'s null fields are filled from the data's
registered task when the config loads, so ``config show`` prints the task a run will use:
- ``colored_mnist``: handwritten digits (< 5 vs >= 5) in red or green;
- ``celeba``: faces, any pair of the attributes in ``CELEBA`` (Smiling/Male by default);
- ``utkface``: faces, gender with race or race_white (``UTKFACE``).
Another dataset (a manifest) sets ``generate.task`` itself.

Face prompts put the two attributes around one noun: gender as the noun (man / woman), the other
attribute before it (``pre``: "a White woman") or after it (``post``: "a man with a neutral
expression"); with no gender attribute, "a {pre} person {post}". Context axes that would name an
attribute (age beside Young, hair beside hair colours, ...) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aimfair_ray import AimfairError
from aimfair_ray.config import DIGITS, Phrasing, TaskConfig

DIGIT_TASK = TaskConfig(
    subject="a handwritten digit",
    classes=[Phrasing(name="digit<5", phrases=DIGITS[:5] + [str(i) for i in range(5)]),
             Phrasing(name="digit>=5", phrases=DIGITS[5:] + [str(i) for i in range(5, 10)])],
    groups=[Phrasing(name="red", phrases=["red"]), Phrasing(name="green", phrases=["green"])],
    context={"stroke": ["a pen stroke", "a marker stroke", "a brush stroke", "a pencil line"],
             "slant": ["slanted right", "slanted left", "upright"],
             "thickness": ["thin", "medium", "thick"],
             "background": ["on a black background", "on a dark background"]},
    templates=["{subject} {cls} in {grp}, {ctx}", "a {grp} {cls}, {ctx}", "{ctx}: the number {cls} written in {grp}",
               "an image of {subject} {cls}, drawn in {grp}, {ctx}", "{cls} in {grp} ink, {ctx}"],
    instruction="Write one short caption, under 20 words, for a picture of {subject} {cls} written in {grp} ink, "
                "{ctx}. Use the words '{cls}' and '{grp}'. Reply with the caption only.",
)

GENERIC = dict(subject="a photo", context={}, templates=["{subject} of {cls}, {grp}, {ctx}"],
               instruction="Write one short caption, under 25 words, for {subject} of {cls}, {grp}, {ctx}. "
                           "Use the words '{cls}' and '{grp}'. Reply with the caption only.")


@dataclass
class Side:
    """One value of a face attribute: nouns (gender only), words before the noun, phrases after it,
    and other words that also name it (checked, never used to write)."""

    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    nouns: list[str] = field(default_factory=list)
    also: list[str] = field(default_factory=list)

    @property
    def phrases(self) -> list[str]:
        return list(dict.fromkeys(self.nouns + self.pre + self.post + self.also))


@dataclass
class Attribute:
    off: Side                 # value 0 (e.g. not Smiling; UTKFace gender 0 = male)
    on: Side                  # value 1
    axes: tuple = ()          # context axes it overlaps (left out of its prompts)

    @property
    def gender(self) -> bool:
        return bool(self.on.nouns or self.off.nouns)


_MAN = Side(nouns=["man", "gentleman", "male"], also=["men", "guy"])
_WOMAN = Side(nouns=["woman", "lady", "female"], also=["women"])


def _hair(colour: str, others: list[str]) -> Attribute:
    return Attribute(Side(pre=[f"{c}-haired" for c in others], post=[f"with {c} hair" for c in others]),
                     Side(pre=[f"{colour}-haired"], post=[f"with {colour} hair"], also=[colour]), axes=("hair",))


CELEBA = {
    "Male": Attribute(_WOMAN, _MAN),
    "Smiling": Attribute(
        Side(pre=["serious", "unsmiling", "straight-faced"],
             post=["with a neutral expression", "with a serious expression", "not smiling", "with a calm, neutral face"],
             also=["neutral expression", "without a smile", "expressionless", "no smile"]),
        Side(pre=["smiling", "grinning", "laughing", "beaming"],
             post=["smiling", "with a big smile", "grinning broadly", "with a warm smile", "laughing"],
             also=["smile", "smiles"])),
    "Young": Attribute(
        Side(pre=["elderly", "older", "middle-aged", "senior"], post=["in old age", "with an aged face"],
             also=["old", "aged"]),
        Side(pre=["young", "youthful"], post=["in early adulthood", "with a youthful face"], also=["young adult"]),
        axes=("age",)),
    "Blond_Hair": _hair("blond", ["dark", "brown", "black", "red"]),
    "Black_Hair": _hair("black", ["blond", "brown", "red", "grey"]),
    "Brown_Hair": _hair("brown", ["blond", "black", "red", "grey"]),
    "Gray_Hair": _hair("grey", ["blond", "black", "brown", "red"]),
    "Eyeglasses": Attribute(Side(pre=["glasses-free"], post=["without glasses", "with no eyeglasses"]),
                            Side(pre=["bespectacled"], post=["wearing glasses", "with eyeglasses"],
                                 also=["glasses", "eyeglasses", "spectacles"]), axes=("accessories",)),
    "Wearing_Hat": Attribute(Side(pre=["bareheaded"], post=["without a hat", "with no hat"]),
                             Side(pre=["hat-wearing"], post=["wearing a hat", "in a hat"], also=["hat", "cap"]),
                             axes=("accessories",)),
    "Bald": Attribute(Side(pre=["full-haired"], post=["with a full head of hair"]),
                      Side(pre=["bald"], post=["with a bald head", "with a shaved head"], also=["balding"]),
                      axes=("hair",)),
    "Heavy_Makeup": Attribute(Side(pre=["makeup-free"], post=["without makeup", "with a bare face"], also=["no makeup"]),
                              Side(pre=["heavily made-up"], post=["with heavy makeup", "wearing heavy makeup"],
                                   also=["makeup"])),
    "Wearing_Lipstick": Attribute(Side(pre=["lipstick-free"], post=["without lipstick", "with bare lips"]),
                                  Side(pre=["lipstick-wearing"], post=["wearing lipstick", "with red lipstick"],
                                       also=["lipstick"])),
    "Mouth_Slightly_Open": Attribute(Side(pre=["closed-mouthed"], post=["with a closed mouth", "with lips closed"]),
                                     Side(pre=["open-mouthed"], post=["with the mouth slightly open", "with parted lips"],
                                          also=["mouth open", "open mouth"])),
    "No_Beard": Attribute(Side(pre=["bearded"], post=["with a beard", "with a full beard"], also=["beard"]),
                          Side(pre=["clean-shaven", "beardless"], post=["with no beard", "without a beard"])),
    "Pale_Skin": Attribute(Side(pre=["tanned"], post=["with tanned skin", "with darker skin"]),
                           Side(pre=["pale-skinned", "fair-skinned"], post=["with pale skin", "with very fair skin"],
                                also=["pale"])),
}

# UTKFace's value names, as the reader labels the data (race_white as the official AIM-Fair code: White = 1)
UTK_NAMES = {"gender": ["male", "female"], "race": ["White", "Black", "Asian", "Indian", "Others"],
             "race_white": ["non-White", "White"]}
_NON_WHITE = ["Black", "East Asian", "South Asian", "Indian", "Latino", "Middle Eastern", "Asian", "Hispanic"]
UTKFACE = {
    "gender": Attribute(_MAN, _WOMAN),  # UTKFace gender: 0 = male, 1 = female
    "race_white": Attribute(Side(pre=_NON_WHITE[:6], also=_NON_WHITE[6:] + ["non-White"]),
                            Side(pre=["White", "Caucasian"], also=["European"])),
}
UTK_RACES = [Side(pre=["White", "Caucasian"]), Side(pre=["Black", "African"]),
             Side(pre=["East Asian", "Asian"], also=["Chinese", "Japanese", "Korean"]),
             Side(pre=["Indian", "South Asian"]), Side(pre=["Latino", "Middle Eastern", "Hispanic"])]

FACE_CONTEXT = {
    "pose": ["head turned slightly left", "head turned slightly right", "facing the camera", "head tilted slightly",
             "three-quarter view", "looking slightly up", "looking slightly down"],
    "age": ["in their twenties", "in their thirties", "in their forties", "in their fifties", "in their sixties"],
    "hair": ["short dark hair", "long brown hair", "curly hair", "wavy hair", "straight black hair", "short grey hair",
             "shoulder-length blond hair", "hair tied back"],
    "accessories": ["wearing glasses", "wearing earrings", "no accessories", "wearing a scarf", "wearing a necklace",
                    "wearing a cap"],
    "lighting": ["soft studio lighting", "natural daylight", "warm indoor light", "overcast light", "golden hour light"],
    "background": ["plain grey background", "outdoor park background", "city street background", "office background",
                   "blurred background", "white background", "bookshelf background"],
}
FACE_TEMPLATES = ["{subject} of a {pair}, {ctx}", "a close-up face photo of a {pair}, {ctx}",
                  "{ctx}, a realistic headshot of a {pair}", "portrait face photo of a {pair}, {ctx}"]
FACE_INSTRUCTION = ("Write one short caption, under 25 words, for a realistic portrait photo of a {pair}, {ctx}. "
                    "Use the words '{grp}' and '{cls}'. Reply with the caption only.")


def phrase_spans(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Where ``text`` holds one of ``phrases`` as whole words (case-insensitive; "male" is not in "female")."""
    return [m.span() for p in phrases for m in re.finditer(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text, re.IGNORECASE)]


def _attribute(dataset: str, attr: str) -> tuple[list[Side], bool, tuple]:
    """The sides of a face attribute (one per value), whether it is gender, and the context axes it overlaps."""
    table = CELEBA if dataset == "celeba" else UTKFACE
    if dataset == "utkface" and attr == "race":
        return UTK_RACES, False, ()
    if attr not in table:
        known = ", ".join(sorted(table) + (["race"] if dataset == "utkface" else []))
        raise AimfairError(f"no face phrasing for {dataset} attribute {attr!r} (phrased: {known}): set generate.task "
                           "(classes and groups with their phrases) yourself, or bring your own synthetic sets")
    a = table[attr]
    return [a.off, a.on], a.gender, a.axes


def face_task(dataset: str, target: str, sensitive: str) -> TaskConfig:
    """The face prompt task for a (target, sensitive) attribute pair of CelebA or UTKFace."""
    (cls_sides, cls_gender, cls_axes), (grp_sides, grp_gender, grp_axes) = (_attribute(dataset, target),
                                                                            _attribute(dataset, sensitive))
    if grp_gender:        # "a man with a neutral expression": the group's noun, the class after it
        cls_words, grp_words, pair = [s.post or s.pre for s in cls_sides], [s.nouns for s in grp_sides], "{grp} {cls}"
    elif cls_gender:      # "a White woman": the group before the class's noun
        cls_words, grp_words, pair = [s.nouns for s in cls_sides], [s.pre or s.post for s in grp_sides], "{grp} {cls}"
    else:                 # "a young person smiling"
        cls_words, grp_words, pair = [s.post or s.pre for s in cls_sides], [s.pre for s in grp_sides], "{grp} person {cls}"
    if not all(grp_words):
        raise AimfairError(f"{dataset}: {sensitive!r} has no words to put before 'person': set generate.task yourself")
    if dataset == "celeba":  # the reader's names
        cls_names, grp_names = [f"not {target}", target], [f"not {sensitive}", sensitive]
    else:
        cls_names, grp_names = UTK_NAMES[target], UTK_NAMES[sensitive]
    classes = [Phrasing(name=n, phrases=s.phrases, wording=w) for n, s, w in zip(cls_names, cls_sides, cls_words)]
    groups = [Phrasing(name=n, phrases=s.phrases, wording=w) for n, s, w in zip(grp_names, grp_sides, grp_words)]
    every = [p for k in classes + groups for p in k.phrases]
    context = {ax: [v for v in vals if not phrase_spans(v, every)] for ax, vals in FACE_CONTEXT.items()
               if ax not in cls_axes + grp_axes}
    return TaskConfig(subject="a portrait photo", classes=classes, groups=groups,
                      context={ax: v for ax, v in context.items() if v},
                      templates=[t.replace("{pair}", pair) for t in FACE_TEMPLATES],
                      instruction=FACE_INSTRUCTION.replace("{pair}", pair))


def resolve(task: TaskConfig, reg: TaskConfig | None) -> TaskConfig:
    """``task`` with its null fields filled: from ``reg``, the dataset's own task (its registry entry's), when
    the classes and groups are its own (or not given), else generic wording. With no dataset task (a manifest,
    or a pair with no face phrasing) it stays without classes and groups (the generate stage then says what
    to set): other stages never need them."""
    given = (task.classes, task.groups)
    if given != (None, None) and reg is not None and (reg.classes, reg.groups) != given:
        reg = None  # the user's own classes or groups: the registered wording would not fit them
    base = reg.model_dump() if reg is not None else dict(GENERIC, classes=None, groups=None)
    return TaskConfig.model_validate(base | {k: v for k, v in task.model_dump().items() if v is not None})
