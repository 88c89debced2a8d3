"""Device meshes and the mapping from logical axis names to mesh axes.

The model names every parameter dimension with a logical axis (`embed`,
`vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) and constrains
activations at block boundaries (`batch`, `seq`, `embed`). A *rule set* maps
each logical name to zero or more mesh axes (`data`, `fsdp`, `sequence`,
`tensor`); the presets live in `RULES` and a config picks one by name or gives
its own list. Every preset maps `seq` to the `sequence` axis: with it larger
than 1, activations are split along the sequence (context parallelism) and
attention gathers the keys and values of the whole sequence
(lmstack/model/transformer.py). A mesh shape of 3 entries is (data, fsdp,
tensor), `sequence` 1.

A dimension that the mapped mesh axes do not divide evenly stays replicated,
so a tiny test model runs on any mesh without special cases.
"""

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmstack.errors import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")  # the last axes get the torus's nearest links

RULES = {
    # ZeRO-3 style: every weight sharded on its `embed` dimension over fsdp
    # (and sequence: its devices hold the same weights), the batch over data
    # and fsdp; XLA all-gathers weights per layer.
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("seq", "sequence"),
        ("embed", ("fsdp", "sequence")),  # weights: ZeRO-3 over the sequence axis too
    ),
    # FSDP plus Megatron-style tensor parallelism: heads, MLP and vocabulary
    # split over the tensor axis.
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("seq", "sequence"),
        ("embed", ("fsdp", "sequence")),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
    ),
    # Pure data parallelism: every weight replicated.
    "dp": (("batch", ("data", "fsdp")), ("seq", "sequence")),
}


def full_shape(shape, what="mesh.shape"):
  """A mesh shape as 4 entries (data, fsdp, sequence, tensor); 3 entries are (data, fsdp, tensor)."""
  shape = list(shape)
  if len(shape) == 3:
    shape.insert(2, 1)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"{what}={tuple(shape)} must have 3 entries (data, fsdp, tensor) or 4 {MESH_AXES}")
  return shape


def _resolve(shape, n, what):
  """`shape` (3 or 4 entries, see `full_shape`) with its -1 (at most one) set so that the product is n."""
  given, shape = tuple(shape), full_shape(shape, what)
  if shape.count(-1) > 1:
    raise ConfigError(f"{what}={given} may hold at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or n % known:
      raise ConfigError(f"{what}={given} does not divide the {n} devices")
    shape[shape.index(-1)] = n // known
  return shape


def grid_shape(shape, n_devices, dcn_shape=None, n_slices=1):
  """(ici, dcn): the resolved mesh within a slice and the slices' arrangement, for `n_devices` in
  `n_slices` equal slices (see `device_grid`); the mesh's shape is their elementwise product. One-line
  ConfigErrors; no device is needed (tools/aot_compile.py checks documented launches with it)."""
  if dcn_shape is None or n_slices == 1:
    if dcn_shape is not None:
      dcn = _resolve(dcn_shape, 1, "mesh.dcn_shape")
      if math.prod(dcn) != 1:
        raise ConfigError(f"mesh.dcn_shape={tuple(dcn_shape)} needs {math.prod(dcn)} slices, the devices are in 1")
    ici = _resolve(shape, n_devices, "mesh.shape")
    if math.prod(ici) != n_devices:
      raise ConfigError(f"mesh.shape={tuple(shape)} needs {math.prod(ici)} devices, found {n_devices}")
    return tuple(ici), (1,) * len(MESH_AXES)
  dcn = _resolve(dcn_shape, n_slices, "mesh.dcn_shape")
  if math.prod(dcn) != n_slices:
    raise ConfigError(f"mesh.dcn_shape={tuple(dcn_shape)} needs {math.prod(dcn)} slices, the devices are in "
                      f"{n_slices}")
  per_slice = n_devices // n_slices
  ici = _resolve(shape, per_slice, "mesh.shape")
  if math.prod(ici) != per_slice or per_slice * n_slices != n_devices:
    raise ConfigError(f"mesh.shape={tuple(shape)} is the mesh of one slice; it needs {math.prod(ici)} devices in "
                      f"each of the {n_slices} slices")
  return tuple(ici), tuple(dcn)


def device_grid(shape, devices, dcn_shape=None):
  """The devices as an array of the mesh's shape.

  Without `dcn_shape`, `shape` covers all `devices` (in their physical
  order: `physical_grid`). With it,
  `shape` is the mesh within one slice (ICI; -1 takes the rest of a slice) and
  `dcn_shape` the slices' arrangement (DCN; -1 takes the rest of the slices,
  which devices tell by their `slice_index`); axis sizes multiply, so
  `dcn_shape=(-1, 1, 1)` runs data parallelism across slices, the one kind the
  data-centre network is fast enough for.
  """
  devices = list(devices)
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1 and any(sum(getattr(d, "slice_index", 0) == s for d in devices) * len(slices) != len(devices)
                             for s in slices):
    raise ConfigError(f"the {len(devices)} devices are in {len(slices)} slices of different sizes")
  ici, dcn = grid_shape(shape, len(devices), dcn_shape, len(slices))
  if len(slices) == 1 or dcn_shape is None:
    return physical_grid(ici, devices)
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def physical_grid(shape, devices):
  """`devices` as an array of `shape` that follows the hardware: on TPU, mesh_utils lays the mesh's
  last axes (`tensor`, `sequence`, then `fsdp`: the most traffic) along the torus's rings, so neighbours on an axis
  are neighbours on the chip interconnect; GPUs are ordered by id; other devices keep their order.
  A shape the torus cannot be cut into (mesh_utils refuses it even splitting physical axes) keeps the
  given order, as the devices are numbered."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  for split in (False, True):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except (ValueError, AssertionError, NotImplementedError):
      continue
  return np.asarray(devices).reshape(shape)


def make_mesh(shape, devices=None, dcn_shape=None):
  """A mesh over MESH_AXES (a 3-entry shape: sequence 1); one -1 entry takes the rest (see `device_grid`)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(device_grid(shape, devices, dcn_shape), MESH_AXES)


def resolve_rules(rules):
  """A rule preset name, or a sequence of (logical, mesh axes) pairs -> dict."""
  if isinstance(rules, str):
    if rules not in RULES:
      raise ConfigError(f"mesh.rules={rules!r}; expected one of {sorted(RULES)} or a list of pairs")
    rules = RULES[rules]
  out = {}
  for logical, axes in rules:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in MESH_AXES:
        raise ConfigError(f"mesh.rules maps {logical!r} to unknown mesh axis {a!r}")
    out[logical] = axes
  return out


def logical_to_spec(axes, shape, mesh, rules):
  """PartitionSpec for a value of `shape` whose dims are named `axes`."""
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for every leaf of an nnx.State or pytree of Variables.

  Leaves without logical names (optimizer counters, RNG state) replicate.
  """
  def one(leaf):
    axes = getattr(leaf, "out_sharding", None) if isinstance(leaf, nnx.Variable) else None
    shape = np.shape(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
    spec = logical_to_spec(axes, shape, mesh, rules) if axes else P()
    sh = NamedSharding(mesh, spec)
    return leaf.replace(sh) if isinstance(leaf, nnx.Variable) else sh
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The mesh and rules that activation constraints use inside a traced step.
_ACTIVE = None


@contextlib.contextmanager
def use(mesh, rules):
  """Make `constrain` place activations on `mesh` under `rules`."""
  global _ACTIVE
  prev, _ACTIVE = _ACTIVE, (mesh, rules)
  try:
    yield
  finally:
    _ACTIVE = prev


def logical_size(name):
  """How many ways the active mesh (`use`) splits logical axis `name` (1 outside `use`)."""
  if _ACTIVE is None:
    return 1
  mesh, rules = _ACTIVE
  return math.prod(mesh.shape[a] for a in rules.get(name, ()))


def active():
  """(mesh, rules) of the enclosing `use`, or None."""
  return _ACTIVE


def platform():
  """The platform the traced program is for: the active mesh's devices' ("tpu" for AOT topology devices),
  else JAX's default backend."""
  if _ACTIVE is None:
    return jax.default_backend()
  return _ACTIVE[0].devices.flat[0].platform


def constrain(x, axes):
  """Sharding constraint by logical names; a no-op outside `use`."""
  if _ACTIVE is None:
    return x
  mesh, rules = _ACTIVE
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def batch_sharding(mesh, rules, ndim=2):
  """Sharding of a [batch, ...] data array."""
  return NamedSharding(mesh, P(rules.get("batch") or None, *([None] * (ndim - 1))))
