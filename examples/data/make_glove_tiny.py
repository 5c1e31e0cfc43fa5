"""Regenerates ``glove_tiny.txt``: 56 made-up words x 16 dims, GloVe text.

Not trained on any text. Each word is a sum of a few *concept* vectors
(person, male, female, royal, young, country, capital, one direction per
nationality, plural, past tense, ...; the word's kind, like person or
animal, weighs 1.5) plus Gaussian noise of scale 0.05,
so that vector arithmetic works as in real word vectors:
king - man + woman ~ queen, paris - france + germany ~ berlin,
dogs - dog + cat ~ cats, swam - swim + walk ~ walked. The concept vectors
are random unit vectors from a fixed seed; the script checks that every
listed analogy ranks its answer first and then writes the file.

Usage: python examples/data/make_glove_tiny.py
"""

from __future__ import annotations

import pathlib

import numpy as np

DIMS = 16
SEED = 0
NOISE = 0.05
KINDS = {
  "person",
  "country",
  "city",
  "animal",
  "vehicle",
  "verb",
  "fruit",
  "tech",
}
KIND_WEIGHT = 1.5  # words of one kind stay near each other

FAMILY = {  # word: concepts, on top of "person"
  "man": "male adult",
  "woman": "female adult",
  "boy": "male young",
  "girl": "female young",
  "king": "male adult royal",
  "queen": "female adult royal",
  "prince": "male young royal",
  "princess": "female young royal",
  "emperor": "male adult royal imperial",
  "empress": "female adult royal imperial",
  "father": "male adult parent",
  "mother": "female adult parent",
  "son": "male young offspring",
  "daughter": "female young offspring",
  "brother": "male sibling",
  "sister": "female sibling",
  "uncle": "male adult elder",
  "aunt": "female adult elder",
  "husband": "male adult spouse",
  "wife": "female adult spouse",
}
PLACES = {
  "france": "paris",
  "germany": "berlin",
  "italy": "rome",
  "spain": "madrid",
  "japan": "tokyo",
  "china": "beijing",
  "russia": "moscow",
  "egypt": "cairo",
}
NOUNS = {"cat": "animal", "dog": "animal", "horse": "animal", "car": "vehicle"}
VERBS = {"walk": "walked", "run": "ran", "swim": "swam", "go": "went"}
OTHERS = {
  "apple": "fruit",
  "banana": "fruit",
  "computer": "tech",
  "phone": "tech",
}
ANALOGIES = [  # (a, b, c, answer): a - b + c = answer
  ("king", "man", "woman", "queen"),
  ("prince", "boy", "girl", "princess"),
  ("father", "man", "woman", "mother"),
  ("emperor", "king", "queen", "empress"),
  ("paris", "france", "germany", "berlin"),
  ("tokyo", "japan", "italy", "rome"),
  ("dogs", "dog", "cat", "cats"),
  ("swam", "swim", "walk", "walked"),
]


def concepts() -> dict[str, str]:
  """Every word and the names of the concepts it is made of."""
  words = {word: "person " + parts for word, parts in FAMILY.items()}
  for country, capital in PLACES.items():
    words[country] = f"country {country}_nation"
    words[capital] = f"city capital {country}_nation"
  for noun, kind in NOUNS.items():
    words[noun] = f"{kind} {noun}_thing"
    words[noun + "s"] = f"{kind} {noun}_thing plural"
  for verb, past in VERBS.items():
    words[verb] = f"verb {verb}_action"
    words[past] = f"verb {verb}_action past"
  for word, kind in OTHERS.items():
    words[word] = f"{kind} {word}_thing"
  return words


def make_vectors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(SEED)
  words = concepts()
  names = sorted({name for parts in words.values() for name in parts.split()})
  basis = rng.normal(size=(len(names), DIMS))
  basis /= np.linalg.norm(basis, axis=1, keepdims=True)
  index = {name: i for i, name in enumerate(names)}
  weights = np.array([KIND_WEIGHT if n in KINDS else 1.0 for n in names])
  basis *= weights[:, None]
  return {
    word: basis[[index[n] for n in parts.split()]].sum(0)
    + rng.normal(scale=NOISE, size=DIMS)
    for word, parts in words.items()
  }


def check(vectors: dict[str, np.ndarray]) -> None:
  words = list(vectors)
  rows = np.stack([vectors[w] for w in words])
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  for a, b, c, answer in ANALOGIES:
    query = unit[words.index(a)] - unit[words.index(b)] + unit[words.index(c)]
    scores = unit @ query
    for word in (a, b, c):
      scores[words.index(word)] = -np.inf
    best = words[int(np.argmax(scores))]
    assert best == answer, f"{a} - {b} + {c} gave {best}, not {answer}"


def main() -> None:
  vectors = make_vectors()
  check(vectors)
  path = pathlib.Path(__file__).with_name("glove_tiny.txt")
  with open(path, "w", encoding="utf-8") as f:
    for word, vector in vectors.items():
      f.write(word + " " + " ".join(f"{x:.5f}" for x in vector) + "\n")
  print(f"wrote {len(vectors)} words x {DIMS} dims to {path}")


if __name__ == "__main__":
  main()
