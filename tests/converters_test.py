"""Tests for `named_embed._src.files.converters`: flax, torch and brainstate.

flax is real (a test dependency); torch and brainstate are not installed,
so small stand-in classes mimic the attributes the converters read:
torch tensors (``detach().cpu().numpy()``, ``dtype``), ``nn.Embedding``
(``weight``, ``padding_idx``) and brainstate's ``Embedding`` (``weight``
a ``ParamState`` with ``.value``, ``padding_idx``, ``embedding_size``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import data, raw
from flax import linen, nnx
from penzai import pz

import named_embed as ne
from named_embed import formats

IDS = np.array([[3, 0], [4, 1]], np.int32)
WEIGHT = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)


def looked_up(table, ids=IDS) -> np.ndarray:
  return raw(ne.lookup(table, jnp.asarray(ids)), "embedding")


# --------------------------------------------------------------------- flax


def test_from_linen_variables_matches_embed_apply():
  module = linen.Embed(num_embeddings=5, features=3)
  variables = module.init(jax.random.key(0), jnp.asarray(IDS))
  table = formats.from_flax(variables)
  assert table.vocab_size == 5 and table.embedding_axes == {"embedding": 3}
  np.testing.assert_array_equal(
    looked_up(table), np.asarray(module.apply(variables, jnp.asarray(IDS)))
  )
  inner = formats.from_flax(variables["params"])  # the params dict works too
  np.testing.assert_array_equal(looked_up(inner), looked_up(table))


def test_to_flax_feeds_linen_embed():
  table = ne.EmbeddingTable.from_pretrained(WEIGHT, padding_index=0)
  variables = formats.to_flax(table)
  assert set(variables) == {"params"} and set(variables["params"]) == {
    "embedding"
  }
  out = linen.Embed(5, 3).apply(variables, jnp.asarray(IDS))
  np.testing.assert_array_equal(np.asarray(out), WEIGHT[IDS])


def test_from_nnx_embed_matches_its_call_and_round_trips():
  module = nnx.Embed(num_embeddings=5, features=3, rngs=nnx.Rngs(0))
  table = formats.from_flax(module, vocabulary=ne.Vocabulary(list("abcde")))
  np.testing.assert_array_equal(
    looked_up(table), np.asarray(module(jnp.asarray(IDS)))
  )
  assert table.vocabulary.token(4) == "e"
  other = nnx.Embed(num_embeddings=5, features=3, rngs=nnx.Rngs(1))
  other.embedding[...] = formats.to_flax(table)["params"]["embedding"]
  np.testing.assert_array_equal(
    np.asarray(other(jnp.asarray(IDS))), np.asarray(module(jnp.asarray(IDS)))
  )


def test_from_flax_options():
  variables = {"params": {"embedding": WEIGHT}}
  table = formats.from_flax(
    variables,
    vocabulary_axis="token",
    embedding_axis="features",
    padding_index=-1,
    freeze=False,
    name="embed",
  )
  assert list(table.value.named_axes) == ["token", "features"]
  assert table.padding_index == 4
  assert table.embeddings.label == "embed.embeddings"


def test_from_flax_names_what_it_found():
  with pytest.raises(
    ValueError,
    match=r"no 'embedding' entry, only \['Dense_0', 'Embed_0'\].*"
    r"variables\['params'\]\['Embed_0'\]",
  ):
    formats.from_flax({"params": {"Embed_0": {}, "Dense_0": {}}})
  with pytest.raises(TypeError, match="got ndarray"):
    formats.from_flax(WEIGHT)


def test_exports_refuse_multi_axis_tables():
  table = ne.EmbeddingTable.from_pretrained(
    np.ones((4, 2, 3), np.float32), embedding_axes=("heads", "dim")
  )
  with pytest.raises(ValueError, match="flax's Embed holds one vector"):
    formats.to_flax(table)
  with pytest.raises(ValueError, match="torch's nn.Embedding holds one"):
    formats.to_torch_weight(table)
  assert formats.to_brainstate_weight(table).shape == (4, 2, 3)


# -------------------------------------------------------------------- torch


class FakeTensor:
  """Mimics the torch.Tensor methods `from_torch_weight` uses."""

  def __init__(self, array: np.ndarray, dtype: str | None = None):
    self.array = array
    self.dtype = dtype or f"torch.{array.dtype}"
    self.calls: list[str] = []

  def detach(self):
    self.calls.append("detach")
    return self

  def cpu(self):
    self.calls.append("cpu")
    return self

  def float(self):
    return FakeTensor(self.array.astype(np.float32))

  def numpy(self):
    if self.dtype == "torch.bfloat16":
      raise TypeError("Got unsupported ScalarType BFloat16")
    return self.array


class FakeTorchEmbedding:
  def __init__(self, weight, padding_idx=None):
    self.weight = weight
    self.padding_idx = padding_idx


@pytest.mark.parametrize("padding_idx, row", [(None, None), (2, 2), (-1, 4)])
def test_from_torch_weight_with_padding_idx(padding_idx, row):
  table = formats.from_torch_weight(WEIGHT, padding_idx=padding_idx)
  assert table.padding_index == row
  np.testing.assert_array_equal(looked_up(table), WEIGHT[IDS])
  np.testing.assert_array_equal(formats.to_torch_weight(table), WEIGHT)
  assert isinstance(formats.to_torch_weight(table), np.ndarray)


def test_padding_row_gets_no_gradient_as_in_torch():
  table = formats.from_torch_weight(WEIGHT, padding_idx=-5, freeze=False)
  assert table.padding_index == 0

  def loss(rows):
    bound = ne.EmbeddingTable.from_pretrained(
      rows, padding_index=table.padding_index, freeze=False
    )
    return data(ne.lookup(bound, jnp.asarray(IDS)), "embedding").sum()

  grad = np.asarray(jax.grad(loss)(table.rows_array()))
  assert (grad[0] == 0).all() and (grad[[1, 3, 4]] == 1).all()


def test_torch_like_tensors_and_modules():
  tensor = FakeTensor(WEIGHT)
  table = formats.from_torch_weight(tensor, -2)
  assert tensor.calls == ["detach", "cpu"] and table.padding_index == 3
  np.testing.assert_array_equal(looked_up(table), WEIGHT[IDS])
  module = FakeTorchEmbedding(FakeTensor(WEIGHT), padding_idx=1)
  table = formats.from_torch(module, vocabulary=ne.Vocabulary(list("abcde")))
  assert table.padding_index == 1 and table.vocabulary.token(0) == "a"
  with pytest.raises(TypeError, match="use from_torch_weight"):
    formats.from_torch(WEIGHT)


def test_torch_bfloat16_tensor_is_converted_exactly():
  bf16 = WEIGHT.astype(ml_dtypes.bfloat16)
  table = formats.from_torch_weight(FakeTensor(bf16, "torch.bfloat16"))
  assert table.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
    formats.to_torch_weight(table).view(np.uint16), bf16.view(np.uint16)
  )


def test_torch_weight_errors_name_the_converter():
  with pytest.raises(ValueError, match="from_torch_weight: `padding_index` 5"):
    formats.from_torch_weight(WEIGHT, padding_idx=5)
  with pytest.raises(TypeError, match="from_torch_weight: .*floating"):
    formats.from_torch_weight(np.ones((3, 2), np.int64))


# --------------------------------------------------------------- brainstate


class ParamState:
  """Stand-in for brainstate.ParamState: the array is in `.value`."""

  def __init__(self, value):
    self.value = value


class BrainstateEmbedding:
  """Stand-in for brainstate.nn.Embedding (the attributes we read)."""

  def __init__(self, weight, padding_idx=None):
    self.weight = ParamState(jnp.asarray(weight))
    self.num_embeddings = weight.shape[0]
    self.embedding_size = tuple(weight.shape[1:])
    self.padding_idx = padding_idx


def test_from_brainstate_single_and_multi_axis():
  table = formats.from_brainstate(BrainstateEmbedding(WEIGHT, padding_idx=2))
  assert table.padding_index == 2
  np.testing.assert_array_equal(looked_up(table), WEIGHT[IDS])
  np.testing.assert_array_equal(
    np.asarray(formats.to_brainstate_weight(table)), WEIGHT
  )
  multi = np.arange(30, dtype=np.float32).reshape(5, 2, 3)
  table = formats.from_brainstate(
    BrainstateEmbedding(multi), embedding_axes=("heads", "head_dim")
  )
  assert table.embedding_axes == {"heads": 2, "head_dim": 3}
  np.testing.assert_array_equal(
    np.asarray(formats.to_brainstate_weight(table)), multi
  )


def test_from_brainstate_errors():
  multi = BrainstateEmbedding(np.ones((5, 2, 3), np.float32))
  with pytest.raises(ValueError, match="name its 2 embedding axes"):
    formats.from_brainstate(multi)
  multi.embedding_size = (6,)
  with pytest.raises(ValueError, match=r"embedding_size is \(6,\)"):
    formats.from_brainstate(multi, embedding_axes=("a", "b"))
  with pytest.raises(TypeError, match="`weight.value`"):
    formats.from_brainstate(WEIGHT)


# ------------------------------------------------- compressed and adapted


def test_every_kind_exports_its_token_rows_as_read():
  table = ne.EmbeddingTable.from_pretrained(
    np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  ).padded_to_multiple(8)
  lora = table.quantized("int4").with_lora(
    1, name="e", init_base_rng=jax.random.key(0)
  )
  a = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  q = table.quantized("int8")
  rows = table.with_trainable_rows([2], name="r")
  rows.rows.value = pz.nx.wrap(np.ones((1, 4), np.float32)).tag(
    "rows", "embedding"
  )
  for adapted, ref in [
    (q, q.dequantized()),
    (lora, lora.merged()),
    (rows, rows.merged()),
  ]:
    want = np.asarray(ref.token_rows())
    assert want.shape == (5, 4)
    flax = formats.to_flax(adapted)["params"]["embedding"]
    assert isinstance(flax, jax.Array)
    np.testing.assert_array_equal(np.asarray(flax), want)
    module = linen.Embed(num_embeddings=5, features=4)
    np.testing.assert_array_equal(
      np.asarray(module.apply(formats.to_flax(adapted), jnp.asarray(IDS))),
      want[IDS],
    )
    torch = formats.to_torch_weight(adapted)
    assert isinstance(torch, np.ndarray)
    np.testing.assert_array_equal(torch, want)
    np.testing.assert_array_equal(
      np.asarray(formats.to_brainstate_weight(adapted)), want
    )


def test_exports_refuse_what_is_not_a_table():
  embed = pz.nn.EmbeddingTable(
    embeddings=pz.nx.wrap(WEIGHT).tag("vocabulary", "embedding"),
    vocabulary_axis="vocabulary",
  )
  for export in (
    formats.to_flax,
    formats.to_torch_weight,
    formats.to_brainstate_weight,
  ):
    with pytest.raises(TypeError, match="penzai's own pz.nn.EmbeddingTable"):
      export(embed)
    with pytest.raises(TypeError, match=r"got an array \(ndarray"):
      export(WEIGHT)
