"""Nearest neighbours and analogies in GloVe-format word vectors.

Loads a GloVe text file (by default ``examples/data/glove_tiny.txt``, 56
made-up words of 16 dimensions built by ``examples/data/make_glove_tiny.py``
so that analogies work), prints each probe word's neighbours, a few
similarities and analogies (``a - b + c``, as gensim's ``most_similar``),
and writes the table as a standalone HTML page: hover a row of the array to
see its word.

Usage::

  python examples/word_vectors.py [--vectors PATH] [--output PAGE.html]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

import named_embed as ne
from named_embed import formats

DATA = pathlib.Path(__file__).resolve().parent / "data" / "glove_tiny.txt"
PROBES = ("king", "paris", "dog", "swim")
PAIRS = (("king", "queen"), ("king", "apple"), ("paris", "berlin"))
ANALOGIES = (  # a - b + c
  ("king", "man", "woman"),
  ("paris", "france", "germany"),
  ("dogs", "dog", "cat"),
  ("swam", "swim", "walk"),
)


def words_and_scores(table, ids, scores) -> str:
  """``"queen 0.93, prince 0.81"`` for one row of results."""
  tokens = table.vocabulary.decode(ids.unwrap("neighbor"))
  values = np.asarray(scores.unwrap("neighbor"))
  return ", ".join(f"{t} {v:.2f}" for t, v in zip(tokens, values))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vectors", default=str(DATA), help="GloVe text file")
  parser.add_argument(
    "--output", default="word_vectors.html", help="HTML page to write"
  )
  parser.add_argument("-k", type=int, default=4, help="neighbours to show")
  args = parser.parse_args(argv)

  table = formats.load_word2vec(args.vectors)
  print(f"{args.vectors}: {ne.summarize(table)}")

  print(f"\nNearest neighbours (cosine, k={args.k}):")
  ids, scores = table.nearest(list(PROBES), k=args.k)  # one batched query
  for i, word in enumerate(PROBES):
    row = {"query": i}
    print(f"  {word}: {words_and_scores(table, ids[row], scores[row])}")

  print("\nSimilarities:")
  for a, b in PAIRS:
    print(f"  {a} ~ {b}: cosine {float(table.similarity(a, b)):.2f}")

  print("\nAnalogies (a - b + c):")
  for a, b, c in ANALOGIES:
    ids, scores = table.analogy(positive=[a, c], negative=[b], k=3)
    print(f"  {a} - {b} + {c} = {words_and_scores(table, ids, scores)}")

  page = ne.show(table, args.output, title="Word vectors")
  print(f"\nWrote {page}")


if __name__ == "__main__":
  main()
