"""pHash de-duplication: near-copies caught, different photos kept; index vs brute force."""

import io
import random

import pytest
from curation_photos import NAMES, photo
from PIL import Image

from megatron_finevit.curation.phash import PHashDeduplicator, phash_bits

MAX_DISTANCE = 8  # the CurationConfig default


def recompressed(image, scale, quality):
    small = image.resize((int(image.width * scale), int(image.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_resized_recompressed_copies_are_duplicates_and_other_photos_are_not():
    dedup = PHashDeduplicator(MAX_DISTANCE)
    for name in NAMES:
        assert not dedup.check_and_add(phash_bits(photo(name))), f"{name} flagged as duplicate"
    assert len(dedup) == len(NAMES)
    # photos of scenes; a stationary texture (skimage's brick) has near-zero low frequencies whose
    # signs flip easily, so its 1/3-scale copy lands 12 bits away (documented in phash.py)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "grace_hopper", "moon", "gravel"):
        for scale, quality in ((0.5, 30), (1 / 3, 20)):
            copy_hash = phash_bits(recompressed(photo(name), scale, quality))
            assert dedup.check_and_add(copy_hash), f"{name} x{scale:.2f} q{quality} not caught"
    assert len(dedup) == len(NAMES)  # duplicates are not stored


def test_hash_width_follows_hash_size():
    assert phash_bits(photo("astronaut"), hash_size=16) >= 2 ** 200  # 256-bit hash
    assert phash_bits(photo("astronaut")) < 2 ** 64


@pytest.mark.parametrize("bits,max_distance", [(64, 0), (64, 6), (256, 20)])
def test_dedup_matches_brute_force(bits, max_distance):
    rng = random.Random(bits + max_distance)
    dedup = PHashDeduplicator(max_distance, hash_bits=bits)
    stored = []
    for _ in range(600):
        if stored and rng.random() < 0.5:  # a perturbed copy of an earlier hash
            h = rng.choice(stored)
            for _ in range(rng.randint(0, max_distance + 3)):
                h ^= 1 << rng.randrange(bits)
        else:
            h = rng.getrandbits(bits)
        want = any(bin(h ^ s).count("1") <= max_distance for s in stored)
        assert dedup.check_and_add(h) == want
        if not want:
            stored.append(h)
    assert len(dedup) == len(stored)
