# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of named_embed
#
# Build a table, train a tiny tied-embedding model with the fused loss,
# inspect what it learnt, compress it, and add tokens to it: the whole life
# of an embedding table, on a vocabulary of twelve words, in a few seconds
# on a laptop CPU.
#
# This notebook is `examples/tour.ipynb`, paired with `examples/tour.py`
# (jupytext's percent format: edit either and keep the code cells the same;
# `tests/notebook_test.py` runs the notebook and checks both).

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz

import named_embed as ne

# %% [markdown]
# ## Build
#
# A vocabulary of three kinds of word, and a table with one 8-dimensional
# row per word. `from_config` gives a trainable table (its rows are a
# `pz.Parameter`); `with_vocabulary` names the rows, and its `pad` token
# becomes the padding row.

# %%
KINDS = {
  "number": ["one", "two", "three"],
  "colour": ["red", "green", "blue", "grey"],
  "animal": ["cat", "dog", "cow", "owl"],
}
WORDS = [word for words in KINDS.values() for word in words]
vocabulary = ne.Vocabulary(["<pad>", *WORDS], pad="<pad>")
table = ne.EmbeddingTable.from_config(
  name="embed",
  init_base_rng=jax.random.key(0),
  vocab_size=len(vocabulary),
  embedding_axes={"embedding": 8},
).with_vocabulary(vocabulary)
print(ne.summarize(table))

# %% [markdown]
# A lookup turns token ids into rows, by axis name: the ids' axes stay, the
# table's embedding axis is added.

# %%
ids = pz.nx.wrap(jnp.array([vocabulary.encode(["one", "red", "cat"])]))
ids = ids.tag("batch", "seq")
print(ne.lookup(table, ids).named_shape)

# %% [markdown]
# ## Train
#
# The sentences follow a grammar: a number, then a colour, then an animal,
# then a number again, each word drawn at random within its kind.

# %%
ORDER = ["number", "colour", "animal"]  # the kind of the next word cycles
CHOICES = [np.array(vocabulary.encode(KINDS[kind])) for kind in ORDER]


def sentences(rng, batch=16, length=9):
  """Token ids ``{"batch", "seq"}`` that follow the grammar."""
  start = rng.integers(len(ORDER), size=(batch, 1))
  kinds = (start + np.arange(length)) % len(ORDER)
  ids = np.zeros((batch, length), np.int32)
  for kind, choices in enumerate(CHOICES):
    ids[kinds == kind] = rng.choice(choices, size=int((kinds == kind).sum()))
  return pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")


for row in sentences(np.random.default_rng(0), batch=2).unwrap("batch", "seq"):
  print(" ".join(vocabulary.decode(row.tolist())))

# %% [markdown]
# The model is a penzai `Sequential`: a lookup, a residual MLP, and a
# decode of the *same* table, so the weights are tied and the model has one
# embedding parameter.

# %%
mlp = pz.nn.Sequential(
  [
    pz.nn.Linear.from_config(
      name="mlp_in",
      init_base_rng=jax.random.key(1),
      input_axes={"embedding": 8},
      output_axes={"hidden": 32},
    ),
    pz.nn.Elementwise(jax.nn.gelu),
    pz.nn.Linear.from_config(
      name="mlp_out",
      init_base_rng=jax.random.key(2),
      input_axes={"hidden": 32},
      output_axes={"embedding": 8},
    ),
  ]
)
model = pz.nn.Sequential(
  [ne.EmbeddingLookup(table), pz.nn.Residual(mlp), ne.EmbeddingDecode(table)]
)
model_def, values = pz.unbind_params(model, freeze=True)
print([value.label for value in values])

# %% [markdown]
# The loss runs every layer but the decode, then hands the decode layer to
# `ne.decode_cross_entropy`, which computes the next-word loss without
# building the `[tokens, vocabulary]` logits. Training is penzai's way with
# optax: differentiate with respect to the parameter values, update them,
# bind them back.


# %%
def model_loss(model, tokens):
  """The mean next-word loss of ``model`` on ``tokens``."""
  *body, decode = model.sublayers
  hidden = pz.nn.Sequential(body)(tokens[{"seq": pz.slice[:-1]}])
  targets = tokens[{"seq": pz.slice[1:]}]
  return ne.decode_cross_entropy(decode, hidden, targets)


def loss_fn(values, tokens):
  return model_loss(pz.bind_variables(model_def, values), tokens)


optimizer = optax.adam(0.05)
state = optimizer.init(values)


@jax.jit
def train_step(values, state, tokens):
  loss, grads = jax.value_and_grad(loss_fn)(values, tokens)
  updates, state = optimizer.update(grads, state, values)
  return optax.apply_updates(values, updates), state, loss


rng = np.random.default_rng(0)
losses = []
for step in range(150):
  values, state, loss = train_step(values, state, sentences(rng))
  losses.append(float(loss))
  if step % 30 == 0 or step == 149:
    print(f"step {step:3d}  loss {losses[-1]:.3f}")
model = pz.bind_variables(model_def, values)
table = model.sublayers[0].table

# %% [markdown]
# Within a kind the next word is drawn uniformly, so no model can do better
# than the log of the next kind's size, on average over the positions.

# %%
best = np.mean([np.log(len(KINDS[kind])) for kind in ORDER])
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (best possible {best:.3f})")

# %% [markdown]
# ## Inspect
#
# Words of one kind play the same part in every sentence, so training
# brings their rows together: each word's nearest rows (by cosine
# similarity) are the other words of its kind. `ne.show(table, path)`
# writes an HTML page of the rows, labelled by word.

# %%
for word in ["two", "blue", "owl"]:
  neighbours, scores = ne.nearest(table, word, k=2)
  found = vocabulary.decode(neighbours.unwrap("neighbor").tolist())
  similar = ", ".join(f"{s:.2f}" for s in scores.unwrap("neighbor").tolist())
  print(f"{word} -> {found} (cosine {similar})")
print(ne.summarize(table))

# %% [markdown]
# ## Compress
#
# `quantized("int8")` stores one byte a value and one float32 scale a row.
# Every operation takes the quantised table, so it drops into the model in
# place of the float one: `ne.replace_table` swaps it wherever the model
# holds the table, in both tied layers at once.

# %%
int8 = table.quantized("int8")
print(f"{table.token_rows().nbytes} bytes as float32, {int8.nbytes} as int8")
quantized_model = ne.replace_table(model, table, int8)
test = sentences(np.random.default_rng(1))
float_loss = model_loss(model, test)
int8_loss = model_loss(quantized_model, test)
print(
  f"test loss: float32 {float(float_loss):.4f}, int8 {float(int8_loss):.4f}"
)

# %% [markdown]
# ## Resize
#
# `with_added_tokens` appends rows for new words (at the mean of the old
# rows by default) and keeps the old rows bit for bit; `ne.replace_table`
# puts the bigger table in both tied layers, and the model decodes over the
# new vocabulary.

# %%
bigger = table.with_added_tokens(["fox", "four"])
resized_model = ne.replace_table(model, table, bigger)
logits = resized_model(ids)
print(bigger.vocab_size, logits.named_shape)
print(bigger.vocabulary.encode(["fox", "four"]))
