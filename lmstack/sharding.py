"""Device meshes and the mapping from logical axis names to mesh axes.

The model names every parameter dimension with a logical axis (`embed`,
`vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) and constrains
activations at block boundaries (`batch`, `seq`, `embed`). A *rule set* maps
each logical name to zero or more mesh axes (`data`, `fsdp`, `tensor`); the
presets live in `RULES` and a config picks one by name or gives its own list.

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

MESH_AXES = ("data", "fsdp", "tensor")

RULES = {
    # ZeRO-3 style: every weight sharded on its `embed` dimension over fsdp,
    # the batch over data and fsdp; XLA all-gathers weights per layer.
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
    ),
    # FSDP plus Megatron-style tensor parallelism: heads, MLP and vocabulary
    # split over the tensor axis.
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
    ),
    # Pure data parallelism: every weight replicated.
    "dp": (("batch", ("data", "fsdp")),),
}


def _resolve(shape, n, what):
  """`shape` with its -1 (at most one) set so that the product is n."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"{what}={tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ConfigError(f"{what}={tuple(shape)} may hold at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or n % known:
      raise ConfigError(f"{what}={tuple(shape)} does not divide the {n} devices")
    shape[shape.index(-1)] = n // known
  return shape


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
  if dcn_shape is None:
    shape = _resolve(shape, len(devices), "mesh.shape")
    if math.prod(shape) != len(devices):
      raise ConfigError(f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, found {len(devices)}")
    return physical_grid(shape, devices)
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  dcn = _resolve(dcn_shape, len(slices), "mesh.dcn_shape")
  if math.prod(dcn) != len(slices):
    raise ConfigError(f"mesh.dcn_shape={tuple(dcn_shape)} needs {math.prod(dcn)} slices, the devices are in "
                      f"{len(slices)}")
  if len(slices) == 1:
    return device_grid(shape, devices)
  per_slice = len(devices) // len(slices)
  ici = _resolve(shape, per_slice, "mesh.shape")
  if math.prod(ici) != per_slice or any(sum(getattr(d, "slice_index", 0) == s for d in devices) != per_slice
                                        for s in slices):
    raise ConfigError(f"mesh.shape={tuple(shape)} is the mesh of one slice; it needs {math.prod(ici)} devices in "
                      f"each of the {len(slices)} slices")
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def physical_grid(shape, devices):
  """`devices` as an array of `shape` that follows the hardware: on TPU, mesh_utils lays the mesh's
  last axes (`tensor`, then `fsdp`: the most traffic) along the torus's rings, so neighbours on an axis
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
  """A mesh over (data, fsdp, tensor); one -1 entry takes the rest (see `device_grid`)."""
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


def constrain(x, axes):
  """Sharding constraint by logical names; a no-op outside `use`."""
  if _ACTIVE is None:
    return x
  mesh, rules = _ACTIVE
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def batch_sharding(mesh, rules, ndim=2):
  """Sharding of a [batch, ...] data array."""
  return NamedSharding(mesh, P(rules.get("batch") or None, *([None] * (ndim - 1))))
