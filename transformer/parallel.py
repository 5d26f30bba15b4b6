"""The device mesh, logical-axis sharding rules, and the jit / pmap step runners.

`jit`: one SPMD program over a ('data', 'fsdp', 'tensor') mesh. The batch is split over data x fsdp;
parameters and their optimizer state are sharded by `LOGICAL_RULES`, and so are the activations the model
names (`activation_*`). `pmap`: classic data parallelism, the state replicated on every local device.
Both compute the same numbers as a single device, with or without dropout and gradient accumulation:
the step normalises by the global token count, and each example draws its dropout from a key of its
index in the global batch (`train.make_train_step`).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import models, platform, train
from transformer.config import MESH_AXES, ConfigError, MeshConfig, TrainConfig

BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both; FSDP is data parallel too
PMAP_AXIS = 'batch'

# Logical axis name (the models' `nn.with_logical_partitioning` names) -> mesh axis; names not listed are replicated.
# Parameters: FSDP splits their `embed` dimension. Activations have names of their own: their d_model
# stays whole (giving it the parameters' `embed` rule would re-shard every activation between layers).
LOGICAL_RULES = (
  ('batch', BATCH_AXES),
  ('embed', 'fsdp'),
  ('vocab', 'tensor'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('kv', None),
  ('layers', None),
  ('activation_batch', BATCH_AXES),
  ('activation_length', None),
  ('activation_embed', None),
  ('activation_heads', 'tensor'),
  ('activation_kv_heads', 'tensor'),
  ('activation_mlp', 'tensor'),
  ('activation_vocab', 'tensor'),
)


def make_mesh(mesh_config: MeshConfig, devices=None, slices: int = 1) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all of this run's); one axis may be -1 (all
  remaining devices). `MeshConfig` checked the sizes themselves; here they are checked against the device
  count. With several `slices` (TPU multislice: devices of several slices joined by the data-center
  network), 'data' spans the slices and everything else stays within one, where the links are fast."""
  sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
  count = len(devices) if devices is not None else jax.device_count()
  given = ', '.join(f'config.train.mesh.{axis}={size}' for axis, size in sizes.items())
  fill = [axis for axis, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill and count % known == 0:
    sizes[fill[0]] = count // known
  if math.prod(sizes.values()) != count:
    problem = (
      f"the device count {count} is not a multiple of the other axes' product {known}"
      if fill
      else f'the mesh has {known} devices, but the device count is {count}'
    )
    raise ConfigError(
      f'{given}: {problem}. Make data x fsdp x tensor equal {count}, or set one axis to -1 (all remaining devices).'
    )
  # Auto axes: the model code has no sharding annotations, so XLA propagates shardings itself.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=auto, devices=devices)
  if sizes['data'] % slices:
    raise ConfigError(
      f'{given}: with {slices} slices the data axis spans them, so config.train.mesh.data must be a multiple of '
      f'{slices}: set it to {slices} x the data-parallel devices within a slice.'
    )
  from jax.experimental import mesh_utils

  within = (sizes['data'] // slices, sizes['fsdp'], sizes['tensor'])
  # GPU nodes are told apart by their process (one per node), TPU slices by their slice index.
  by_process = devices[0].platform != 'tpu'
  grid = mesh_utils.create_hybrid_device_mesh(within, (slices, 1, 1), devices, process_is_granule=by_process)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def _axis_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def logical_to_sharding(logical_spec, shape, mesh: Mesh) -> NamedSharding:
  """`LOGICAL_RULES` applied to one array; a dimension its mesh axes do not divide is replicated
  (e.g. kv_heads=1 with tensor=2) instead of failing."""
  mesh_axes = nn.logical_to_mesh_axes(logical_spec, LOGICAL_RULES)
  dims = [axes if axes is None or size % _axis_size(mesh, axes) == 0 else None for axes, size in zip(mesh_axes, shape)]
  return NamedSharding(mesh, P(*dims))


def activation_rules(model_config, mesh: Mesh):
  """`LOGICAL_RULES` for the activations of this model on `mesh`: a dimension the mesh axis does not
  divide (e.g. vocabulary 37 on tensor=2) stays whole rather than padded."""
  sizes = {
    'activation_heads': model_config.num_heads,
    'activation_kv_heads': model_config.kv_heads,
    'activation_mlp': model_config.d_ff,
    'activation_vocab': model_config.vocab_size,
  }
  return tuple(
    (name, None if axes is not None and sizes.get(name, 0) % _axis_size(mesh, axes) else axes)
    for name, axes in LOGICAL_RULES
  )


def _gathered(sharding: NamedSharding) -> NamedSharding:
  """A parameter's sharding as the model uses it: FSDP's shards all-gathered (ZeRO-3), tensor splits kept."""
  drop = lambda axes: (
    (tuple(a for a in axes if a != 'fsdp') or None) if isinstance(axes, tuple) else (None if axes == 'fsdp' else axes)
  )
  return NamedSharding(sharding.mesh, P(*(drop(axes) for axes in sharding.spec)))


def state_shardings(model, optimizer, abstract_state, mesh: Mesh):
  """NamedShardings of a `TrainState`: params by their logical axes, optimizer state like its params
  (optax keeps flax's boxes when initialised from boxed params), anything else replicated."""
  boxed_params = jax.eval_shape(lambda: model.init(jax.random.key(0), *models.dummy_inputs(model.config))['params'])
  boxed_opt_state = jax.eval_shape(optimizer.init, boxed_params)
  specs = jax.tree.map(lambda _: P(), abstract_state).replace(
    params=nn.get_partition_spec(boxed_params), opt_state=nn.get_partition_spec(boxed_opt_state)
  )
  return jax.tree.map(
    lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh),
    specs,
    abstract_state,
    is_leaf=lambda x: isinstance(x, P),
  )


def _with_shardings(abstract, shardings):
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings
  )


class Runner:
  """Runs `train.make_train_step` / `make_eval_step` under one parallelism: the interface of `JitRunner`
  and `PmapRunner`, which `make_runner` picks by `train_config.parallelism`.

  Batches are numpy dicts holding this process's rows (`local_batch_size()`). Checkpoints use one layout
  for both modes, the global un-replicated state (`abstract_state`), so they restore across meshes.
  A subclass sets `_init`, `_train`, `_eval` and `_abstract`, and places a checked batch (`_place`).
  """

  parallelism: str
  mesh: Mesh | None = None

  def __init__(self, train_config: TrainConfig, shards: int, shards_text: str, local_shards: int):
    """`shards`: the batch's splits over all devices (`shards_text` names them for the error);
    `local_shards`: the distinct row blocks this process feeds."""
    # Dropout masks must not depend on how the batch is sharded (the default since JAX 0.5).
    if not jax.config.jax_threefry_partitionable:
      jax.config.update('jax_threefry_partitionable', True)
    self.batch_size = train_config.batch_size
    self.shards, self._local_shards = shards, local_shards
    accum = train_config.grad_accum_steps
    if self.batch_size % (shards * accum):
      raise ConfigError(
        f'config.train.batch_size={self.batch_size} must be divisible by {shards_text} x '
        f'config.train.grad_accum_steps={accum} = {shards * accum}: change one of them.'
      )

  def local_batch_size(self) -> int:
    """This process's rows of the global `batch_size`."""
    return self.batch_size // self.shards * self._local_shards

  def local_rows(self) -> tuple[int, int]:
    """(start, stop): the rows of each global batch that this process feeds (its devices' rows)."""
    raise NotImplementedError

  def init_state(self, seed: int) -> train.TrainState:
    return self._init(seed)

  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of the checkpoint layout: the orbax restore target."""
    return self._abstract

  def to_checkpoint(self, state):
    """The running state in the checkpoint layout (`abstract_state`)."""
    raise NotImplementedError

  def from_checkpoint(self, state):
    """A state restored in the checkpoint layout, back in the running layout."""
    raise NotImplementedError

  def lower_train_step(self, batch):
    """The jitted train step lowered for abstract inputs (jit only): `batch` holds global-shape arrays
    or ShapeDtypeStructs; nothing is allocated. `.compile().as_text()` is what `hlo_audit` reads."""
    raise ValueError('lower_train_step needs parallelism=jit (a pmap step has no global program).')

  def train_step(self, state, batch):
    """(state, metrics); `state` is donated. Metrics stay on device (no host sync here)."""
    state, metrics = self._train(state, self._global_batch(batch, self.local_batch_size()))
    return state, self._unreplicate(metrics)

  def eval_step(self, state, batch) -> dict:
    """Summed loss / tokens / correct over the global batch (any size the batch shards divide)."""
    return self._unreplicate(self._eval(state, self._global_batch(batch)))

  def _global_batch(self, batch, rows=None):
    """The step's input from this process's rows (`rows` of them, else a multiple of its shards)."""
    shapes = {k: np.shape(x) for k, x in batch.items()}
    local = {shape[0] for shape in shapes.values()}
    shards = self._local_shards
    if len(local) != 1 or (rows is not None and local != {rows}) or min(local) % shards:
      expected = (
        f"{rows} rows (this process's share of config.train.batch_size)" if rows else (f'a multiple of {shards} rows')
      )
      raise ValueError(f'Each batch field must have {expected}; got shapes {shapes}.')
    return self._place(batch)

  def _place(self, batch):
    raise NotImplementedError

  def _unreplicate(self, tree):
    """A step's outputs (metrics, eval sums) as one value each."""
    return tree


class JitRunner(Runner):
  """One SPMD program over the ('data', 'fsdp', 'tensor') mesh: the batch split over data x fsdp, the
  state sharded by `LOGICAL_RULES` (`state_shardings`), created sharded and donated each step."""

  parallelism = 'jit'

  def __init__(self, train_config: TrainConfig, model, optimizer, schedule, devices=None, slices: int = 1):
    """`devices`: the mesh's (default: all of this run's); deviceless ones build a step to compile only."""
    self.mesh = make_mesh(train_config.mesh, devices, slices)
    shards = _axis_size(self.mesh, BATCH_AXES)
    self._batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    # Distinct row blocks on this process (devices along 'tensor' hold the same rows).
    local_shards = len(
      {index[0].indices(shards) for index in self._batch_sharding.addressable_devices_indices_map((shards,)).values()}
    )
    super().__init__(train_config, shards, f'the batch shards (mesh data x fsdp = {shards})', local_shards)
    with platform.building_for(self.mesh):  # its kernels are the mesh's (an explicit splash, cudnn or flash)
      abstract = jax.eval_shape(lambda: train.init_state(model, optimizer, 0))
      self.state_shardings = state_shardings(model, optimizer, abstract, self.mesh)
    layout = train.MeshLayout(
      self.mesh,
      BATCH_AXES,
      activation_rules(model.config, self.mesh),
      jax.tree.map(_gathered, self.state_shardings.params),
    )
    train_step = train.make_train_step(model, optimizer, schedule, train_config, layout=layout)
    eval_step = train.make_eval_step(model, layout=layout)
    replicated = NamedSharding(self.mesh, P())
    # Created already sharded: the full state never has to fit on one device.
    self._init = jax.jit(functools.partial(train.init_state, model, optimizer), out_shardings=self.state_shardings)
    self._train = jax.jit(
      train_step,
      in_shardings=(self.state_shardings, self._batch_sharding),
      out_shardings=(self.state_shardings, replicated),
      donate_argnums=0,
    )
    self._eval = jax.jit(
      lambda state, batch: eval_step(state.params, batch),
      in_shardings=(self.state_shardings, self._batch_sharding),
      out_shardings=replicated,
    )
    self._abstract = _with_shardings(abstract, self.state_shardings)  # the checkpoint is the running state

  def local_rows(self) -> tuple[int, int]:
    local = self.local_batch_size()
    blocks = {
      index[0].indices(self.batch_size)[:2]
      for index in self._batch_sharding.addressable_devices_indices_map((self.batch_size,)).values()
    }
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    if stop - start != local:
      raise ConfigError(
        f"This process's devices hold rows that are not one block of the batch ({sorted(blocks)}): "
        "order config.train.mesh so that each process's devices are neighbours on data x fsdp."
      )
    return start, stop

  def to_checkpoint(self, state):
    return state

  def from_checkpoint(self, state):
    return jax.device_put(state, self.state_shardings)

  def lower_train_step(self, batch):
    return self._train.lower(self._abstract, self._abstract_batch(batch))

  def lower_eval_step(self, batch):
    """The jitted eval step lowered for abstract inputs, as `lower_train_step`."""
    return self._eval.lower(self._abstract, self._abstract_batch(batch))

  def _abstract_batch(self, batch):
    return {k: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._batch_sharding) for k, x in batch.items()}

  def _place(self, batch):
    """One global array per field, assembled from every process's rows."""
    scale = self.shards // self._local_shards  # global rows per local row
    return {
      k: jax.make_array_from_process_local_data(
        self._batch_sharding, np.asarray(x), (scale * np.shape(x)[0],) + np.shape(x)[1:]
      )
      for k, x in batch.items()
    }


class PmapRunner(Runner):
  """Classic data parallelism: the state replicated on every local device, gradients averaged over
  all devices (of every process) by `pmap`'s collectives."""

  parallelism = 'pmap'

  def __init__(self, train_config: TrainConfig, model, optimizer, schedule):
    devices = jax.local_devices()
    count = jax.device_count()
    super().__init__(train_config, count, f'the device count ({count}, pmap)', len(devices))
    abstract = jax.eval_shape(lambda: train.init_state(model, optimizer, 0))
    train_step = train.make_train_step(model, optimizer, schedule, train_config, axis_name=PMAP_AXIS)
    eval_step = train.make_eval_step(model, axis_name=PMAP_AXIS)
    local_mesh = Mesh(np.array(devices), (PMAP_AXIS,))
    replicas = NamedSharding(local_mesh, P(PMAP_AXIS))  # the layout pmap itself gives its outputs
    # Checkpoints hold global arrays replicated over every process's devices: orbax cannot write the
    # host-local arrays pmap works with once there are several processes.
    self._checkpoint_sharding = NamedSharding(Mesh(np.array(jax.devices()), (PMAP_AXIS,)), P())
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices),) + x.shape), tree)
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    self._replicate = jax.jit(broadcast, out_shardings=replicas)
    self._init = jax.jit(lambda seed: broadcast(train.init_state(model, optimizer, seed)), out_shardings=replicas)
    self._first = jax.jit(first)
    self._first_everywhere = jax.jit(first, out_shardings=NamedSharding(local_mesh, P()))
    self._train = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=0)
    self._eval = jax.pmap(lambda state, batch: eval_step(state.params, batch), axis_name=PMAP_AXIS)
    self._abstract = _with_shardings(abstract, jax.tree.map(lambda _: self._checkpoint_sharding, abstract))

  def local_rows(self) -> tuple[int, int]:
    local = self.local_batch_size()
    start = jax.process_index() * local  # pmap numbers devices process by process
    return start, start + local

  def to_checkpoint(self, state):
    local = self._first_everywhere(state)  # one copy on each local device, assembled into a global array
    return jax.tree.map(
      lambda x: jax.make_array_from_single_device_arrays(
        x.shape, self._checkpoint_sharding, [shard.data for shard in x.addressable_shards]
      ),
      local,
    )

  def from_checkpoint(self, state):
    return self._replicate(jax.tree.map(lambda x: x.addressable_data(0), state))  # this process's copy

  def _place(self, batch):
    """[local devices, rows per device, ...] per field."""
    return {k: np.reshape(x, (self._local_shards, -1) + np.shape(x)[1:]) for k, x in batch.items()}

  def _unreplicate(self, tree):
    return self._first(tree)


def make_runner(train_config: TrainConfig, model, optimizer, schedule) -> Runner:
  """The `Runner` for `train_config.parallelism` ('jit' or 'pmap'); it checks the batch size against its
  shards and `grad_accum_steps`."""
  return (JitRunner if train_config.parallelism == 'jit' else PmapRunner)(train_config, model, optimizer, schedule)
