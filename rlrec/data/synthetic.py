"""Seeded synthetic interaction logs for the embedded default: learnable on any machine in minutes.

Generative process (all draws from `numpy.random.default_rng(seed)`):
- items fall into categories; a title is "<adjective> <category noun>", so items of one category share words (and
  semantic IDs built from titles share prefixes);
- popularity is long-tailed: p(i) proportional to 1 / rank(i)^s (Zipf, exponent `zipf_exponent`);
- every item i has `successors` likely next items, mostly from its own category (80%), drawn uniformly;
- the next item depends on the last two items: with probability `follow_prob` it is a successor of the last item,
  and which successor is chosen depends on the item before it (its preferred successor slot with probability 0.7,
  else a uniform slot); otherwise it is a popularity draw (noise that most-popular can exploit, nothing more).
A model that reads the history can beat most-popular by a wide margin; one that reads only the last item cannot
reach the ceiling; that gap is what the demo measures.
"""

from __future__ import annotations

import numpy as np

from rlrec.data.types import Catalog, Interactions, Item, RawData
from rlrec.schema import SyntheticConfig

CATEGORIES = {
    "Kitchen": ["Pan", "Knife", "Kettle", "Bowl", "Whisk", "Grater", "Skillet", "Ladle"],
    "Garden": ["Hose", "Rake", "Shovel", "Planter", "Trowel", "Sprinkler", "Pruner", "Seeds"],
    "Audio": ["Speaker", "Headphones", "Amplifier", "Microphone", "Turntable", "Earbuds", "Mixer", "Cable"],
    "Camping": ["Tent", "Lantern", "Sleeping Bag", "Stove", "Backpack", "Compass", "Hammock", "Canteen"],
    "Office": ["Stapler", "Notebook", "Pen", "Folder", "Desk Lamp", "Binder", "Marker", "Organizer"],
    "Fitness": ["Dumbbell", "Yoga Mat", "Kettlebell", "Jump Rope", "Foam Roller", "Resistance Band", "Bench", "Gloves"],
    "Baking": ["Mixer Bowl", "Rolling Pin", "Baking Sheet", "Muffin Tin", "Spatula", "Sifter", "Cake Pan", "Oven Mitt"],
    "Cycling": ["Helmet", "Bike Light", "Pump", "Saddle", "Lock", "Tire", "Bottle Cage", "Jersey"],
    "Painting": ["Brush", "Canvas", "Easel", "Palette", "Acrylic Set", "Watercolor Set", "Sketchbook", "Varnish"],
    "Gaming": ["Controller", "Headset", "Keyboard", "Mouse", "Mouse Pad", "Chair", "Monitor", "Webcam"],
    "Travel": ["Suitcase", "Neck Pillow", "Adapter", "Duffel", "Passport Cover", "Packing Cubes", "Scale", "Umbrella"],
    "Photo": ["Tripod", "Lens", "Camera Bag", "Flash", "Memory Card", "Filter", "Light Stand", "Reflector"],
}
ADJECTIVES = [
    "Classic", "Compact", "Deluxe", "Premium", "Basic", "Pro", "Mini", "Large", "Smart", "Eco", "Heavy Duty",
    "Portable", "Vintage", "Modern", "Ultra", "Silent", "Rugged", "Light", "Folding", "Essential",
]  # fmt: skip


def category_names(num_categories: int) -> list[str]:
    names = list(CATEGORIES)[:num_categories]
    return names + [f"Category{c}" for c in range(len(names), num_categories)]


def _titles(config: SyntheticConfig, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Unique titles and the category index of each item, items spread evenly over categories."""
    names = category_names(config.num_categories)
    titles, categories = [], []
    per_category = np.array_split(np.arange(config.num_items), config.num_categories)
    for c, members in enumerate(per_category):
        nouns = CATEGORIES.get(names[c], [f"{names[c]} Item"])
        combos = [(a, n) for n in nouns for a in ADJECTIVES]
        order = rng.permutation(len(combos))
        for j in range(len(members)):
            adjective, noun = combos[order[j % len(combos)]]
            version = f" {j // len(combos) + 1}" if j >= len(combos) else ""
            titles.append(f"{adjective} {noun}{version}")
            categories.append(c)
    return titles, np.array(categories)


def generate(config: SyntheticConfig) -> RawData:
    rng = np.random.default_rng(config.seed)
    n, s = config.num_items, config.successors
    titles, category = _titles(config, rng)
    rank = rng.permutation(n) + 1
    popularity = 1.0 / rank**config.zipf_exponent
    popularity /= popularity.sum()

    # Successor table: mostly same-category items, drawn uniformly (popularity lives in the noise draws, so the
    # head does not swallow every sequence), never the item itself.
    successors = np.empty((n, s), dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero((category == category[i]) & (np.arange(n) != i))
        if rng.random() < 0.2 or len(pool) < s:
            pool = np.flatnonzero(np.arange(n) != i)
        successors[i] = rng.choice(pool, size=s, replace=False)
    preferred_slot = rng.integers(0, s, size=n)

    sequences: dict[str, list[str]] = {}
    timestamps: dict[str, list[int]] = {}
    for u in range(config.num_users):
        extra = int(rng.exponential(4.0))
        length = min(config.min_length + extra, config.max_length)
        items = [int(rng.choice(n, p=popularity))]
        while len(items) < length:
            last, prev = items[-1], items[-2] if len(items) > 1 else items[-1]
            if rng.random() < config.follow_prob:
                slot = preferred_slot[prev] if rng.random() < 0.7 else int(rng.integers(0, s))
                items.append(int(successors[last, slot]))
            else:
                items.append(int(rng.choice(n, p=popularity)))
        start = int(rng.integers(0, 1_000_000))
        gaps = rng.integers(1, 1_000, size=length).cumsum()
        sequences[f"u{u}"] = [str(i) for i in items]
        timestamps[f"u{u}"] = [start + int(g) for g in gaps]

    names = category_names(config.num_categories)
    catalog = Catalog({str(i): Item(str(i), titles[i], {"category": names[category[i]]}) for i in range(n)})
    return RawData(catalog=catalog, interactions=Interactions(sequences, timestamps))
