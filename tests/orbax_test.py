"""Whole-model checkpoints with orbax-checkpoint (`named_embed.orbax`), on
one device: every kind of table saved and restored bit for bit, ties kept,
`ocp.CheckpointManager` steps with an optimizer's state, templates that
are never computed, and the errors.

The reference of every round trip is a numpy copy of the model's arrays
taken before the save.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from penzai import pz

import named_embed as ne
from named_embed import nnx as ne_nnx
from named_embed import orbax as ne_orbax
from named_embed._src.tools import model_arrays

V, D = 10, 4  # tokens; the tables have 12 rows (alignment rows to 4)
RNG = np.random.default_rng(7)
W = RNG.standard_normal((V, D)).astype(np.float32)
VOCAB = ne.Vocabulary([f"w{i}" for i in range(V)], pad="w0")


def filled(table, seed=3):
  """``table`` with every parameter holding distinct random values (LoRA's
  ``A`` starts at zero otherwise)."""
  rng = np.random.default_rng(seed)
  for param in pz.unbind_params(table)[1]:
    value = param.value
    data = rng.standard_normal(tuple(value.named_shape.values()))
    param.value = pz.nx.wrap(data.astype(value.dtype), *value.named_shape)
  return table


def make_table(kind: str):
  frozen = (
    ne.EmbeddingTable.from_pretrained(W)
    .with_vocabulary(VOCAB)
    .padded_to_multiple(4)
  )
  key = jax.random.key(1)
  if kind == "trainable":
    return ne.EmbeddingTable.from_config(
      name="embed", init_base_rng=jax.random.key(0), vocab_size=V,
      embedding_axes={"embedding": D}, padding_index=0, pad_to_multiple=4,
    )  # fmt: skip
  if kind == "frozen":
    return frozen
  if kind == "bf16":
    rows = W.astype(ml_dtypes.bfloat16)
    return ne.EmbeddingTable.from_pretrained(rows, freeze=False, name="bf")
  if kind == "int8":
    return frozen.quantized("int8")
  if kind == "int4":
    return frozen.quantized("int4", group_size=2)
  if kind == "lora":
    base = frozen.quantized("int8")
    return filled(base.with_lora(2, 3.0, name="l", init_base_rng=key))
  assert kind == "rows"
  return filled(frozen.with_trainable_rows(["w2", "w7"], name="r"))


KINDS = ["trainable", "frozen", "bf16", "int8", "int4", "lora", "rows"]


def tied_model(table):
  return pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
  )


def arrays_of(model) -> list[np.ndarray]:
  """Host copies of every array of ``model`` (parameters' values too)."""
  return [np.array(leaf) for leaf in jax.tree.leaves(pz.freeze_params(model))]


def assert_bit_exact(model, want: list[np.ndarray]):
  got = arrays_of(model)
  assert len(got) == len(want)
  for x, y in zip(got, want):
    assert (x.dtype, x.shape) == (y.dtype, y.shape)
    assert x.tobytes() == y.tobytes()


def assert_tied(model):
  """The lookup's and the decode's table hold the same objects: one
  `pz.Parameter`, or one array for a frozen table."""
  lookup, decode = model.sublayers
  a, b = jax.tree.leaves(lookup.table), jax.tree.leaves(decode.table)
  assert len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_bit_exact_and_tied(tmp_path, kind):
  model = tied_model(make_table(kind))
  want = arrays_of(model)
  path = tmp_path / "checkpoint"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, ne_orbax.checkpoint_state(model))
  template = tied_model(make_table(kind))
  if kind not in ("frozen", "int8", "int4"):  # something to overwrite
    filled(template.sublayers[0].table, seed=11)
  abstract = ne_orbax.abstract_model(template)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path, ne_orbax.checkpoint_state(abstract))
  restored = ne_orbax.with_checkpoint_state(abstract, state)
  assert_bit_exact(restored, want)
  assert_tied(restored)
  table, original = restored.sublayers[0].table, model.sublayers[0].table
  assert type(table) is type(original)
  assert (table.vocab_size, table.num_rows, table.padding_index) == (
    original.vocab_size,
    original.num_rows,
    original.padding_index,
  )
  assert table.vocabulary == original.vocabulary
  labels = [p.label for p in pz.unbind_params(restored)[1]]
  assert labels == [p.label for p in pz.unbind_params(model)[1]]


def test_a_tied_table_is_one_entry_and_restores_as_one_parameter(tmp_path):
  trainable, frozen = make_table("trainable"), make_table("int8")
  model = pz.nn.Sequential(
    [
      ne.EmbeddingLookup(trainable),
      ne.EmbeddingLookup(frozen),
      ne.EmbeddingDecode(frozen),
      ne.EmbeddingDecode(trainable),
    ]
  )
  state = ne_orbax.checkpoint_state(model)
  assert list(state["variables"]) == ["embed.embeddings"]
  assert sorted(state["arrays"]) == [
    "sublayers/1/table/codes",
    "sublayers/1/table/scales",
  ]
  ne_orbax.save(tmp_path / "c", model)
  restored = ne_orbax.restore(tmp_path / "c", model)
  first, second, third, fourth = (layer.table for layer in restored.sublayers)
  assert first.embeddings is fourth.embeddings
  assert isinstance(first.embeddings, pz.Parameter)
  assert first.embeddings is not trainable.embeddings  # the template's kept
  assert second.codes.data_array is third.codes.data_array
  assert len(pz.unbind_params(restored)[1]) == 1


def test_the_template_is_left_alone(tmp_path):
  model = tied_model(make_table("lora"))
  ne_orbax.save(tmp_path / "c", model)
  template = tied_model(make_table("lora"))
  filled(template.sublayers[0].table, seed=5)
  before = arrays_of(template)
  restored = ne_orbax.restore(tmp_path / "c", template)
  assert_bit_exact(template, before)
  assert_bit_exact(restored, arrays_of(model))


def test_state_variables_are_saved_by_label(tmp_path):
  counter = pz.StateVariable(np.array([3, 4], np.int32), label="counter")
  model = {"table": make_table("frozen"), "counter": counter}
  state = ne_orbax.checkpoint_state(model)
  assert sorted(state["variables"]) == ["counter"]
  ne_orbax.save(tmp_path / "c", model)
  template = {
    "table": make_table("frozen"),
    "counter": pz.StateVariable(np.zeros(2, np.int32), label="counter"),
  }
  restored = ne_orbax.restore(tmp_path / "c", template)
  assert isinstance(restored["counter"], pz.StateVariable)
  assert restored["counter"].value.tolist() == [3, 4]
  unlabelled = {"state": pz.StateVariable(np.zeros(2))}
  with pytest.raises(ValueError, match="automatic label"):
    ne_orbax.checkpoint_state(unlabelled)


def keyed_model(seed):
  stream = {"key": jax.random.key(seed), "offset": np.int32(seed)}
  return {
    "table": make_table("frozen"),
    "rng": pz.StateVariable(stream, label="rng"),
    "rbg": jax.random.key(seed + 1, impl="rbg"),
  }


def test_prng_keys_are_saved_as_their_key_data(tmp_path):
  model = keyed_model(3)
  state = ne_orbax.checkpoint_state(model)
  assert sorted(state["variables"]) == ["rng/key", "rng/offset"]
  assert state["arrays"]["rbg"].dtype == np.uint32
  assert state["arrays"]["rbg"].shape == (4,)  # rbg keys are 4 words
  ne_orbax.save(tmp_path / "c", model)
  for template in (keyed_model(8), ne_orbax.eval_shape_model(keyed_model, 8)):
    restored = ne_orbax.restore(tmp_path / "c", template)
    for got, want in ((restored["rng"].value["key"], model["rng"].value["key"]),
                      (restored["rbg"], model["rbg"])):  # fmt: skip
      assert jax.random.key_impl(got) == jax.random.key_impl(want)
      np.testing.assert_array_equal(
        jax.random.key_data(got), jax.random.key_data(want)
      )
    assert int(restored["rng"].value["offset"]) == 3


def build_model():
  """Every kind of table in one model, tied where a kind trains."""
  tables = [make_table(kind) for kind in KINDS]
  layers = [ne.EmbeddingLookup(t) for t in tables]
  return pz.nn.Sequential(layers + [ne.EmbeddingDecode(tables[0])])


def test_a_template_from_eval_shape_model_is_never_computed(tmp_path):
  model = build_model()
  ne_orbax.save(tmp_path / "c", model)
  template = ne_orbax.eval_shape_model(build_model)
  leaves = jax.tree.leaves(ne_orbax.checkpoint_state(template))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  params = pz.unbind_params(template)[1]
  assert isinstance(params[0], model_arrays.ShapeParameter)
  restored = ne_orbax.restore(tmp_path / "c", template)
  assert_bit_exact(restored, arrays_of(model))
  first, last = restored.sublayers[0].table, restored.sublayers[-1].table
  assert first.embeddings is last.embeddings
  assert all(type(p) is pz.Parameter for p in pz.unbind_params(restored)[1])


def test_restoring_without_a_target_gives_the_same_model(tmp_path):
  model = build_model()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "c", ne_orbax.checkpoint_state(model))
    state = checkpointer.restore(tmp_path / "c")  # nested dicts of arrays
  restored = ne_orbax.with_checkpoint_state(build_model(), state)
  assert_bit_exact(restored, arrays_of(model))


# ------------------------------------------------- training with a manager


def loss_fn(values, model_def, tokens):
  model = pz.bind_variables(model_def, values)
  lookup, decode = model.sublayers
  hidden = lookup(tokens)
  targets = tokens  # the model learns to repeat its input
  return ne.decode_cross_entropy(decode.table, hidden, targets)


OPTIMIZER = optax.adam(0.1)
TOKENS = pz.nx.wrap(np.array([[1, 2, 3, 5, 8]], np.int32)).tag("batch", "seq")


@jax.jit
def train_step(values, opt_state, model_def):
  loss, grads = jax.value_and_grad(loss_fn)(values, model_def, TOKENS)
  with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
    updates, opt_state = OPTIMIZER.update(grads, opt_state, values)
  return optax.apply_updates(values, updates), opt_state, loss


def steps(model, opt_state, n):
  """``n`` Adam steps of a LoRA model; the model, state and losses."""
  model_def, values = pz.unbind_params(model, freeze=True)
  losses = []
  for _ in range(n):
    values, opt_state, loss = train_step(values, opt_state, model_def)
    losses.append(float(loss))
  return pz.bind_variables(model_def, values, unfreeze_as_copy=True), (
    opt_state,
    losses,
  )


def test_checkpoint_manager_keeps_steps_and_training_resumes_exactly(
  tmp_path,
):
  model = tied_model(make_table("lora"))
  with jax.numpy_dtype_promotion("standard"):
    opt_state = OPTIMIZER.init(pz.unbind_params(model, freeze=True)[1])
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  saved = {}
  with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
    for step in range(3):
      model, (opt_state, _) = steps(model, opt_state, 1)
      manager.save(
        step,
        args=ocp.args.Composite(
          model=ocp.args.StandardSave(ne_orbax.checkpoint_state(model)),
          opt=ocp.args.StandardSave(opt_state),
        ),
      )
      saved[step] = (arrays_of(model), model, opt_state)
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
    assert manager.latest_step() == 2
    # a fresh process: a template that is never computed, an optimizer
    # state of its shapes
    template = ne_orbax.eval_shape_model(tied_model, make_table("lora"))
    abstract = ne_orbax.abstract_model(template)
    opt_shapes = jax.eval_shape(
      OPTIMIZER.init, pz.unbind_params(abstract, freeze=True)[1]
    )
    got = manager.restore(
      1,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(ne_orbax.checkpoint_state(abstract)),
        opt=ocp.args.StandardRestore(ne_orbax.abstract_model(opt_shapes)),
      ),
    )
  resumed = ne_orbax.with_checkpoint_state(abstract, got.model)
  want_arrays, want_model, want_opt = saved[1]
  assert_bit_exact(resumed, want_arrays)
  assert_tied(resumed)
  # one more step from the restored step equals one from the saved step
  _, (_, again) = steps(resumed, got.opt, 2)
  _, (_, reference) = steps(want_model, want_opt, 2)
  assert again == reference
  assert again[1] < again[0]


# ------------------------------------------------------------ flax nnx


class NnxModel(nnx.Module):
  """A LoRA table used for lookups and decodes (one `ne_nnx.Embedding`:
  tied) and a frozen int4 table."""

  def __init__(self, seed):
    self.tied = ne_nnx.Embedding(filled(make_table("lora"), seed))
    self.frozen = ne_nnx.Embedding(make_table("int4"))

  def __call__(self, tokens):
    return self.tied.attend(self.tied(tokens)), self.frozen(tokens)


def test_flax_nnx_models_round_trip_with_flax_s_own_recipe(tmp_path):
  """`nnx.state` holds an `Embedding`'s parameters and frozen arrays: the
  standard nnx orbax recipe needs nothing of named_embed.orbax."""
  model = NnxModel(seed=3)
  want = [np.array(x) for x in jax.tree.leaves(nnx.state(model))]
  assert len(want) == 2 + 2 + 2  # A, B; the base's codes, scales; int4's
  _, state = nnx.split(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "nnx", state)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxModel(seed=4)))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "nnx", abstract)
  again = nnx.merge(graphdef, restored)
  got = [np.array(x) for x in jax.tree.leaves(nnx.state(again))]
  for x, y in zip(got, want):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
  assert type(again.tied.table) is ne.LoraTable
  assert [p.label for p in again.tied.params] == ["l.lora_a", "l.lora_b"]
  assert again.frozen.table.vocabulary == VOCAB


# ------------------------------------------------------------ errors


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
  ne_orbax.save(tmp_path / "c", tied_model(make_table("int8")))
  other = tied_model(make_table("int4"))
  with pytest.raises(ValueError) as info:
    ne_orbax.restore(tmp_path / "c", other)
  lines = str(info.value).splitlines()
  assert "does not hold this model's arrays" in lines[0]
  assert str(tmp_path / "c") in lines[0]
  assert lines[1:] == [
    "  different: arrays/sublayers/0/table/codes is int8[12, 4] in the"
    " checkpoint, uint8[12, 2] in the model, arrays/sublayers/0/table/scales"
    " is float32[12] in the checkpoint, float32[12, 2] in the model"
  ]
  with pytest.raises(ValueError) as info:
    ne_orbax.restore(tmp_path / "c", tied_model(make_table("lora")))
  assert str(info.value).splitlines()[1:] == [
    "  only in the checkpoint: arrays/sublayers/0/table/codes,"
    " arrays/sublayers/0/table/scales",
    "  only in the model: variables/l.lora_a, variables/l.lora_b,"
    " arrays/sublayers/0/table/base/codes,"
    " arrays/sublayers/0/table/base/scales",
  ]
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    ne_orbax.restore(tmp_path / "missing", other)


def test_a_state_that_does_not_fit_is_refused_by_name():
  model = tied_model(make_table("lora"))
  state = ne_orbax.checkpoint_state(model)
  missing = {"variables": dict(state["variables"]), "arrays": {}}
  with pytest.raises(ValueError) as info:
    ne_orbax.with_checkpoint_state(model, missing)
  assert str(info.value).splitlines()[1:] == [
    "  only in the model: arrays/sublayers/0/table/base/codes,"
    " arrays/sublayers/0/table/base/scales"
  ]
  wrong = {
    "variables": {**state["variables"], "l.lora_b": np.zeros((2, 5))},
    "arrays": state["arrays"],
  }
  with pytest.raises(ValueError) as info:
    ne_orbax.with_checkpoint_state(model, wrong)
  assert str(info.value).splitlines()[1:] == [
    "  different: variables/l.lora_b is float64[2, 5] in the state,"
    " float32[2, 4] in the model"
  ]
  with pytest.raises(TypeError, match=r"groups \['variables', 'arrays'\]"):
    ne_orbax.with_checkpoint_state(model, {"params": {}})
  with pytest.raises(TypeError, match=r"state\['arrays'\]` must map"):
    ne_orbax.with_checkpoint_state(model, {"arrays": [1]})


def test_mesh_and_rules_go_together_and_rules_are_checked():
  model = tied_model(make_table("frozen"))
  mesh = jax.make_mesh((1,), ("model",))
  with pytest.raises(ValueError, match="pass `mesh` and `rules` together"):
    ne_orbax.abstract_model(model, mesh)
  with pytest.raises(ValueError, match="pass `mesh` and `rules` together"):
    ne_orbax.checkpoint_target(model, rules={"vocabulary": "model"})
  with pytest.raises(ValueError, match="'vocab' looks like 'vocabulary'"):
    ne_orbax.abstract_model(model, mesh, {"vocab": "model"})
  with pytest.raises(ValueError, match="mesh axis 'tensor', which is not"):
    ne_orbax.abstract_model(model, mesh, {"vocabulary": "tensor"})


def test_restoring_onto_a_mesh_records_the_rows_sharding(tmp_path):
  model = build_model()
  ne_orbax.save(tmp_path / "c", model)
  mesh = jax.make_mesh((1,), ("model",))
  restored = ne_orbax.restore(
    tmp_path / "c", build_model(), mesh=mesh, rules={"vocabulary": "model"}
  )
  assert_bit_exact(restored, arrays_of(model))
  for layer in restored.sublayers:
    assert layer.table.rows_sharding.spec == jax.sharding.PartitionSpec(
      "model", None
    )
  placed = ne.shard(build_model(), mesh, {"vocabulary": "model"})
  want = [x.sharding for x in jax.tree.leaves(pz.freeze_params(placed))]
  got = [x.sharding for x in jax.tree.leaves(pz.freeze_params(restored))]
  assert got == want


def test_orbax_is_imported_only_by_save_and_restore(monkeypatch):
  for name in ("orbax", "orbax.checkpoint"):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
  table = make_table("frozen")
  assert ne_orbax.checkpoint_target(table)["arrays"]  # needs no orbax
  for call in (
    lambda: ne_orbax.save("/nonexistent/c", table),
    lambda: ne_orbax.restore("/nonexistent/c", table),
  ):
    with pytest.raises(ImportError, match=r"pip install named_embed\[orbax\]"):
      call()


def test_no_module_of_the_package_imports_orbax_at_module_level():
  """So ``import named_embed`` never imports it (read from the source)."""
  package = pathlib.Path(ne.__file__).parent
  found = []
  for path in sorted(package.rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:  # module level only; functions may
      names = []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      found += [f"{path.name}:{node.lineno}" for n in names if "orbax" in n]
  assert found == []
