"""Tests for `named_embed.sharding`.

The multi-device tests live in tests/multidevice and need 8 CPU devices
configured before JAX starts, so they run in a subprocess here.
"""

from __future__ import annotations

import collections
import pathlib

import conftest
import jax
import numpy as np
import pytest
from penzai import pz

import named_embed as ne

HERE = pathlib.Path(__file__).resolve().parent


MULTIDEVICE = sorted(
  p.name
  for p in (HERE / "multidevice").glob("*.py")
  if p.name.endswith("_test.py") or p.name == "scaled_table.py"
)


@pytest.mark.parametrize("module", MULTIDEVICE)
def test_multidevice_suite_passes_on_eight_cpu_devices(module):
  """One subprocess a module, started in the background at the start of
  the session (`conftest.multidevice_result`)."""
  result = conftest.multidevice_result(module)
  output = result["stdout"][-6000:] + result["stderr"][-3000:]
  assert result["returncode"] == 0, output
  assert " passed" in result["stdout"]


def test_partition_spec_maps_names_and_keeps_positional_axes_unsharded():
  mesh = jax.make_mesh((1,), ("model",))
  x = pz.nx.NamedArray(  # one positional axis in front of two named ones
    named_axes=collections.OrderedDict(vocabulary=4, embedding=3),
    data_array=np.zeros((2, 4, 3)),
  )
  spec = ne.sharding.partition_spec(x, mesh, {"vocabulary": "model"})
  assert spec == jax.sharding.PartitionSpec(None, "model", None)
  view = x.as_namedarrayview()
  assert ne.sharding.partition_spec(view, mesh, {"embedding": "model"}) == (
    jax.sharding.PartitionSpec(None, None, "model")
  )


def test_bad_rules_are_named_in_errors():
  mesh = jax.make_mesh((1,), ("model",))
  table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  with pytest.raises(ValueError, match=r"mesh axis 'tensor', which is not"):
    ne.shard(table, mesh, {"vocabulary": "tensor"})
  with pytest.raises(TypeError, match=r"`rules` must map axis names"):
    ne.shard(table, mesh, [("vocabulary", "model")])
  both = {"vocabulary": "model", "embedding": "model"}
  with pytest.raises(ValueError, match=r"'model' is mapped to both"):
    ne.shard(table, mesh, both)


@pytest.mark.parametrize(
  "typo, alike",
  [
    ("vocab", "vocabulary"),
    ("Vocabulary", "vocabulary"),
    ("embed", "embedding"),
  ],
)
def test_a_misspelt_rule_is_a_value_error_naming_rules_and_axes(typo, alike):
  mesh = jax.make_mesh((1,), ("model",))
  table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  with pytest.raises(ValueError) as info:
    ne.shard(table, mesh, {typo: "model"})
  message = str(info.value)
  assert f"`rules` name [{typo!r}]" in message
  assert "axis names are ['embedding', 'vocabulary']" in message
  assert f"{typo!r} looks like {alike!r}" in message
  # Also next to rules that apply, and for a table in a model tree.
  model = pz.nn.Sequential([ne.EmbeddingLookup(table)])
  tokens = pz.nx.wrap(np.zeros((2, 3), np.int32)).tag("batch", "seq")
  with pytest.raises(ValueError, match=f"{typo!r} looks like {alike!r}"):
    ne.shard((model, tokens), mesh, {"batch": "model", typo: "model"})


def test_rules_may_name_axes_of_other_arrays():
  """One mapping for a whole program: a table sharded by rules that also
  name the tokens' axes, tokens by rules that name the table's, and a
  table kept replicated by rules for the batch only."""
  mesh = jax.make_mesh((1,), ("model",))
  rules = {"vocabulary": "model", "batch": "model"}
  table = ne.shard(
    ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)), mesh, rules
  )
  assert table.rows_array().sharding.spec == jax.sharding.PartitionSpec(
    "model", None
  )
  tokens = pz.nx.wrap(np.zeros((2, 3), np.int32)).tag("batch", "seq")
  placed = ne.shard(tokens, mesh, rules)
  assert placed.data_array.sharding.spec == jax.sharding.PartitionSpec(
    "model", None
  )
  replicated = ne.shard(table, mesh, {"batch": "model", "seq": None})
  assert replicated.rows_array().sharding.spec == jax.sharding.PartitionSpec(
    None, None
  )


def test_axis_names_are_found_in_variables_adapters_and_unbound_tables():
  mesh = jax.make_mesh((1,), ("model",))
  base = ne.EmbeddingTable.from_pretrained(
    np.ones((4, 2), np.float32), freeze=False, name="e"
  )
  lora = base.with_lora(1, name="e", init_base_rng=jax.random.key(0))
  assert ne.sharding.axis_names(lora) == {"vocabulary", "embedding", "rank"}
  with pytest.raises(ValueError, match=r"'ranks' looks like 'rank'"):
    ne.shard(lora, mesh, {"vocabulary": "model", "ranks": None})
  quantized = base.quantized("int8")
  with pytest.raises(ValueError, match=r"'vocab' looks like 'vocabulary'"):
    ne.shard(quantized, mesh, {"vocab": "model"})
  unbound, _ = pz.unbind_params(pz.nn.Sequential([ne.EmbeddingLookup(base)]))
  assert ne.sharding.axis_names(unbound) == {"vocabulary"}
  with pytest.raises(ValueError, match=r"'vocab' looks like 'vocabulary'"):
    ne.shard(unbound, mesh, {"vocab": "model"})


def test_sharded_init_checks_rule_names_before_initialising():
  mesh = jax.make_mesh((1,), ("model",))
  with pytest.raises(ValueError, match=r"ne.sharded_init: `rules` name"):
    ne.sharded_init(
      ne.EmbeddingTable.from_config,
      mesh,
      {"vocab": "model"},
      name="e",
      init_base_rng=jax.random.key(0),
      vocab_size=8,
      embedding_axes={"embedding": 4},
    )


def test_padded_table_semantics_on_one_device():
  rows = np.arange(10.0, dtype=np.float32).reshape(5, 2)
  table = ne.EmbeddingTable.from_pretrained(rows).padded_to_multiple(4)
  assert (table.vocab_size, table.num_rows) == (5, 8)
  out = ne.lookup(table, np.array([4, 5, 7]), out_of_range="clip")
  np.testing.assert_array_equal(out.data_array, rows[[4, 4, 4]])
  with pytest.raises(IndexError, match="outside the vocabulary \\[0, 5\\)"):
    ne.lookup(table, np.array([6]), out_of_range="error")
  hidden = pz.nx.wrap(np.ones((1, 2), np.float32)).tag("seq", "embedding")
  logits = np.asarray(ne.decode(table, hidden).unwrap("seq", "vocabulary"))
  np.testing.assert_array_equal(logits[0, :5], rows.sum(1))
  assert np.isneginf(logits[0, 5:]).all()
  targets = pz.nx.wrap(np.array([3])).tag("seq")
  loss = ne.decode_cross_entropy(table, hidden, targets)
  unpadded = ne.EmbeddingTable.from_pretrained(rows)
  np.testing.assert_allclose(
    loss, ne.decode_cross_entropy(unpadded, hidden, targets), rtol=1e-6
  )


def test_padded_tables_keep_padding_out_of_files_queries_and_summaries(
  tmp_path,
):
  rows = np.array([[1, 0], [0.9, 0.1], [-1, 0]], np.float32)
  vocab = ne.Vocabulary(["a", "b", "c"])
  table = ne.EmbeddingTable.from_pretrained(rows).with_vocabulary(vocab)
  table = table.padded_to_multiple(4)
  ids, _ = table.nearest("a", k=2)
  assert 3 not in np.asarray(ids.data_array).tolist()
  ne.save(table, tmp_path / "t.safetensors")
  loaded = ne.load(tmp_path / "t.safetensors")
  assert (loaded.vocab_size, loaded.num_rows) == (3, 4)
  assert loaded.vocabulary == vocab
  np.testing.assert_array_equal(loaded.rows_array(), table.rows_array())
  ne.save_word2vec(table, tmp_path / "w.txt")
  assert ne.load_word2vec(tmp_path / "w.txt").vocab_size == 3
  assert ne.to_torch_weight(table).shape == (3, 2)
  assert ne.to_flax(table)["params"]["embedding"].shape == (3, 2)
  assert "3 tokens + 1 alignment row" in ne.summarize(table)


def test_true_vocab_size_is_checked_against_bound_rows():
  slot = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=None,
    vocab_size=5,
    embedding_axes={"embedding": 2},
    pad_to_multiple=4,
  )
  value = pz.ParameterValue(
    value=pz.nx.wrap(np.ones((3, 2), np.float32), "vocabulary", "embedding"),
    label="e.embeddings",
  )
  bound = pz.bind_variables(slot, [value])
  with pytest.raises(ValueError, match=r"true_vocab_size 5 exceeds the 3"):
    ne.lookup(bound, np.array([4]))
  with pytest.raises(ValueError, match=r"`pad_to_multiple` must be a positive"):
    ne.EmbeddingTable.from_config(
      name="e",
      init_base_rng=None,
      vocab_size=5,
      embedding_axes={"embedding": 2},
      pad_to_multiple=0,
    )
