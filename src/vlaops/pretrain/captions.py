"""Captions of the pretraining corpus, in Kosmos-2's grounding format, and the vocabulary they are read with.

Kosmos-2 (Peng et al. 2023) learned grounding from GRIT: image-text pairs whose noun phrases carry the
box of what they name as two location tokens (the top-left and bottom-right cells of a 32x32 grid),
``<grounding><phrase> a red block</phrase><object><patch_index_0101><patch_index_0167></object>``. Here
the phrases name the objects of a rendered scene and the boxes are their projected 3D boxes; the
transformers ``Kosmos2Processor`` turns (text with ``<phrase>`` tags, boxes) into that text, as it does
for Kosmos-2 itself. Four kinds per image: a grounded list of what is there, a referring expression
alone (what the grounding measurement prompts with), a spatial relation between two objects (left /
right of each other as the robot sees it, nearer to / farther from the robot), and a plain caption
without location tokens.

"Left" is the robot's left (+y in its base frame), as the instructions say it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from vlaops.pretrain.scenes import SceneObject, View

GROUNDING = "<grounding>"
RELATION_MARGIN = 0.05  # m: two objects closer than this along an axis are neither left/right nor nearer/farther
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Words a robot's instructions are made of, so that the tokenizer has them whole without reading any
# robot's data: verbs, directions, places, colours, objects and the small words between them. Any other
# ASCII word is spelled from characters (every printable ASCII character is in the vocabulary).
MANIPULATION_WORDS = """
a an the this that these those it its them of to from into onto on in out off at by with without for and or
then now next after before until while up down left right forward forwards backward backwards back front
behind above below under over top bottom side middle center centre near nearer nearest far farther farthest
close closer closest away toward towards around between beside next inside outside along across through
clockwise counterclockwise anticlockwise upward downward upwards downwards sideways straight slightly
pick place put push pull lift lower raise drop release grasp grab grip hold take move slide rotate turn
twist flip open close shut press stack unstack insert remove stop go reach touch tap wipe pour fill empty
bring carry set leave get make keep let hand give store sort align line arrange position return reset
red green blue yellow orange purple pink white black gray grey brown cyan magenta violet dark light
block blocks cube cubes box boxes ball balls sphere cylinder cylinders can cup mug bowl plate bottle lid
drawer drawers door doors cabinet shelf table desk tray basket bin container slider switch button lever
handle knob led lamp light lightbulb bulb tower stack pile object objects item items thing things toy
gripper robot arm hand finger fingers camera view image scene picture photo
small large big little tall short long wide narrow round square flat first second third last other same
one two three four five six seven eight nine ten all both each every some any no not is are be there here
please can you do does
""".split()


@dataclass(frozen=True)
class Caption:
    """One caption of one image: its kind, the text with ``<phrase>`` tags, and one box per phrase (or None)."""

    kind: str
    text: str
    boxes: list[tuple[float, float, float, float]] | None


def vocabulary_corpus(captions: list[str]) -> list[str]:
    """What the tokenizer is trained on: the captions (tags removed), the manipulation words, and every
    printable ASCII character as a word of its own (so any ASCII word tokenizes without <unk>)."""
    tags = (GROUNDING, "<phrase>", "</phrase>")
    plain = []
    for text in captions:
        for tag in tags:
            text = text.replace(tag, " ")
        plain.append(" ".join(text.split()))
    chars = " ".join(c for c in string.printable if not c.isspace())
    return [*plain, " ".join(MANIPULATION_WORDS), chars]


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    """What can be said of ``a`` against ``b``, or None when they are too close to tell (both ways)."""
    options = []
    if abs(a.y - b.y) >= RELATION_MARGIN:
        options.append("to the left of" if a.y > b.y else "to the right of")
    da, db = np.hypot(a.x, a.y), np.hypot(b.x, b.y)
    if abs(da - db) >= RELATION_MARGIN:
        options.append("nearer to the robot than" if da < db else "farther from the robot than")
    return options[0] if len(options) == 1 else (None if not options else "|".join(options))


def _place(obj: SceneObject) -> str:
    """Where ``obj`` is on the table, in the robot's terms."""
    side = "on the left side of" if obj.y > 0.1 else "on the right side of" if obj.y < -0.1 else "in the middle of"
    depth = "near the robot" if np.hypot(obj.x, obj.y) < 0.48 else "far from the robot"
    return f"{side} the table, {depth}"


def captions_for_view(
    objects: tuple[SceneObject, ...], view: View, kinds: list[str], min_visible: int, rng: np.random.Generator
) -> list[Caption]:
    """One caption of each of ``kinds`` for one camera's image; the objects it names are those with a box
    and at least ``min_visible`` visible pixels. A view with none gets one plain caption."""
    seen = [i for i, (box, n) in enumerate(zip(view.boxes, view.visible, strict=True)) if box and n >= min_visible]
    if not seen:
        return [Caption("plain", "a view of the table with no objects on it", None)]
    order = [seen[i] for i in rng.permutation(len(seen))]
    out = []
    for kind in kinds:
        if kind == "grounded":
            phrases = "".join(
                f"{',' if k else ''}{' and' if k and k == len(order) - 1 else ''}<phrase> a {objects[i].name}</phrase>"
                for k, i in enumerate(order)
            )
            text = f"{GROUNDING} a table with{phrases}"
            out.append(Caption(kind, text, [view.boxes[i] for i in order]))
        elif kind == "refer":  # every object in view, alone: the referring expressions of the corpus
            out.extend(
                Caption(kind, f"{GROUNDING}<phrase> the {objects[i].name}</phrase>", [view.boxes[i]]) for i in order
            )
        elif kind == "relation":
            pairs = [(i, j) for i in order for j in order if i != j and _relation(objects[i], objects[j])]
            if pairs:
                i, j = pairs[int(rng.integers(len(pairs)))]
                options = _relation(objects[i], objects[j]).split("|")
                rel = options[int(rng.integers(len(options)))]
                first, second = objects[i].name, objects[j].name
                text = f"{GROUNDING}<phrase> the {first}</phrase> is {rel}<phrase> the {second}</phrase>"
                out.append(Caption(kind, text, [view.boxes[i], view.boxes[j]]))
            else:
                i = order[0]
                text = f"{GROUNDING}<phrase> the {objects[i].name}</phrase> is {_place(objects[i])}"
                out.append(Caption(kind, text, [view.boxes[i]]))
        else:  # plain: no location tokens
            names = [f"a {objects[i].name}" for i in order]
            count = NUMBERS[len(order)] if len(order) < len(NUMBERS) else str(len(order))
            if len(order) >= 2 and rng.random() < 0.5:
                i, j = order[0], order[1]
                rel = _relation(objects[i], objects[j])
                text = (
                    f"the {objects[i].name} is {rel.split('|')[0]} the {objects[j].name}"
                    if rel
                    else f"the {objects[i].name} is {_place(objects[i])}"
                )
            else:
                text = f"{count} object{'s' if len(order) > 1 else ''} on the table: {_listing(names)}"
            out.append(Caption(kind, text, None))
    return out
