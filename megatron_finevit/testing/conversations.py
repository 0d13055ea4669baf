"""Small SFT conversation sets for tests: every kind the SFT loader meets (one image, several
images, text only, a ``<think>`` answer, multi-turn), written as LLaVA JSONL with PNG images and
imported + indexed with the project's own tools, deterministic by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}
SIDES = (56, 84, 112)


def _image(path: Path, colour: str, size: tuple[int, int], rng: np.random.Generator) -> None:
    """A flat colour with a little noise (JPEG/PNG decoders see real content)."""
    base = np.array(COLOURS[colour], dtype=np.int16)
    pixels = base + rng.integers(-20, 21, (size[1], size[0], 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def conversation_records(num: int, images: Path, seed: int = 0, text_only: int = 0
                         ) -> list[dict]:
    """``num`` LLaVA-form records cycling through the kinds (one in five text-only), then
    ``text_only`` more text-only ones; images written into ``images``."""
    rng = np.random.default_rng(seed)
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(num + text_only):
        colours = [names[c] for c in rng.integers(0, len(names), 2)]
        files = []
        for j, colour in enumerate(colours):
            name = f"{seed}_{i}_{j}.png"
            _image(images / name, colour, (int(rng.choice(SIDES)), int(rng.choice(SIDES))), rng)
            files.append(name)
        kind = i % 5 if i < num else 2
        if kind == 0:
            turns = [("<image>\nWhat colour is this image?", f"{colours[0].capitalize()}.")]
            image = files[0]
        elif kind == 1:
            turns = [("Compare <image> and <image>. Which colours are they?",
                      f"The first is {colours[0]}, the second {colours[1]}.")]
            image = files
        elif kind == 2:
            a, b = (int(x) for x in rng.integers(1, 9, 2))
            turns = [(f"What is {a} + {b}?", str(a + b)), ("And doubled?", str(2 * (a + b)))]
            image = None
        elif kind == 3:
            turns = [("<image>\nIs the image warm or cool?",
                      f"<think>\nIt is {colours[0]}.\n</think>\n\n"
                      f"{'Warm' if colours[0] in ('red', 'yellow') else 'Cool'}.")]
            image = files[0]
        else:
            turns = [("<image>\nName the colour.", colours[0]),
                     ("Say it in capitals.", colours[0].upper())]
            image = files[0]
        conversation = []
        for question, answer in turns:
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record = {"id": f"conv{seed}_{i}", "conversations": conversation}
        if image is not None:
            record["image"] = image
        records.append(record)
    return records


def make_conversation_shards(out: str | Path, num: int, seed: int = 0, text_only: int = 0,
                             samples_per_shard: int = 32) -> str:
    """Import the conversations of ``conversation_records`` into indexed shards at ``out``."""
    from megatron_finevit.data.conversation_import import import_conversations
    from megatron_finevit.data.index import build_index

    out = Path(out)
    source = out.parent / f"{out.name}_source"
    records = conversation_records(num, source / "images", seed, text_only)
    (source / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    import_conversations(source / "data.jsonl", source / "images", out,
                         samples_per_shard=samples_per_shard, progress=False)
    build_index(out, progress=False)
    return str(out)
