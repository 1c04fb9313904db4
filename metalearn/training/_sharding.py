"""Data parallelism over tasks: a device mesh, sharded task batches.

The task axis of a meta-batch is split over the devices of a one-axis
:class:`jax.sharding.Mesh` named ``"tasks"``; meta-parameters, optimizer
state and the class pool are replicated on every device. Each device runs
ordinary single-device code on its share of the tasks (``jax.shard_map``
with no collective inside); the mean of the per-device results, taken
outside, is an all-reduce that XLA inserts. No collective is written by
hand, and the same program runs on one CPU, on simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a GPU/TPU
host, or, after :func:`initialize_distributed`, on the devices of several
hosts.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
TASK_AXIS = "tasks"

# Environment variables that announce a multi-process launch.
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
# Read here: jax.distributed.initialize reads only the coordinator address
# from the environment, not the process count and id.
_NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
_PROCESS_ID_ENV = "JAX_PROCESS_ID"
_SLURM_ENV = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OMPI_SIZE_ENV = "OMPI_COMM_WORLD_SIZE"


def task_mesh(
    devices: int | Sequence[jax.Device] | None = None,
) -> Mesh:
  """A one-axis device mesh, axis ``"tasks"``, for data parallelism over tasks.

  Args:
    devices: ``None`` for every device (``jax.devices()``, which after
      :func:`initialize_distributed` spans all hosts), an int ``n`` for the
      first ``n`` of them, or an explicit list of devices.

  Returns:
    A :class:`jax.sharding.Mesh` with the single axis ``"tasks"``.

  Raises:
    ValueError: if more devices are asked for than exist, or none.

  Examples:
    >>> import jax
    >>> mesh = task_mesh(1)
    >>> mesh.axis_names, mesh.size
    (('tasks',), 1)
  """
  available = jax.devices()
  if devices is None:
    devices = available
  elif isinstance(devices, int) and not isinstance(devices, bool):
    if not 1 <= devices <= len(available):
      raise ValueError(
          f"devices={devices} must be between 1 and the "
          f"{len(available)} available {jax.default_backend()} device(s); "
          "simulate more CPU devices with XLA_FLAGS="
          "--xla_force_host_platform_device_count=N (set before importing "
          "jax)"
      )
    devices = available[:devices]
  else:
    devices = list(devices)
    if not devices:
      raise ValueError("devices must not be an empty list")
  return Mesh(np.asarray(devices), (TASK_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a full copy of every leaf on every device of ``mesh``.

  Meta-parameters, optimizer state and the class pool are replicated; call
  this once, outside the loop (a leaf that already has this sharding is
  not copied again).

  Args:
    tree: a pytree of arrays (``None`` leaves are kept).
    mesh: the device mesh.

  Returns:
    The same tree, each leaf a replicated :class:`jax.Array`.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = replicate({"w": jnp.ones(3)}, task_mesh(1))["w"]
    >>> x.sharding.is_fully_replicated
    True
  """
  return jax.device_put(tree, replicated(mesh))


def check_divisible(size: int, mesh: Mesh, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``size`` splits evenly.

  Args:
    size: a number of tasks (the meta-batch or an evaluation batch).
    mesh: the device mesh the tasks are split over.
    name: the argument to name in the message.
  """
  num_devices = mesh.shape[TASK_AXIS]
  if size % num_devices:
    raise ValueError(
        f"{name}={size} is not divisible by the {num_devices} devices of "
        f"the mesh; use a multiple of {num_devices} (e.g. "
        f"{name}={-(-size // num_devices) * num_devices})"
    )


def shard_tasks(tree: PyTree, mesh: Mesh) -> PyTree:
  """Splits the leading task axis ``[B]`` into ``[devices, B // devices]``.

  Every leaf is reshaped and constrained to ``NamedSharding(mesh,
  P("tasks"))``, so device ``d`` holds tasks ``d * B // D`` up to
  ``(d + 1) * B // D``. Inside ``jit`` this is a sharding constraint that
  XLA propagates (episodes are then sampled on the device that uses them);
  outside ``jit`` it moves the data.

  Args:
    tree: a pytree whose leaves share a leading task axis ``[B]`` (an
      episode batch, a ``[B]`` array of keys).
    mesh: the device mesh.

  Returns:
    The tree with leaves of shape ``[D, B // D, ...]``, sharded over ``D``.

  Raises:
    ValueError: if ``B`` is not divisible by the number of devices.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = shard_tasks(jnp.zeros((4, 3)), task_mesh(1))
    >>> x.shape, tuple(x.sharding.spec)
    ((1, 4, 3), ('tasks',))
  """
  num_devices = mesh.shape[TASK_AXIS]
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"leaves disagree on the task axis size: {sorted(sizes)}")
  check_divisible(sizes.pop(), mesh, "batch size")
  split = jax.tree.map(
      lambda x: x.reshape(num_devices, -1, *x.shape[1:]), tree
  )
  sharding = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
  return jax.lax.with_sharding_constraint(split, sharding)


def map_devices(
    fn: Callable[..., PyTree], tasks: PyTree, mesh: Mesh, *shared: PyTree
) -> PyTree:
  """Runs ``fn`` on each device's share of the tasks; stacks the results.

  ``tasks`` (leading axis ``[B]``) is split with :func:`shard_tasks`, and
  ``fn(tasks_slice, *shared)`` sees only its device's ``[B // D, ...]``
  slice, as ordinary single-device code (``jax.shard_map`` over the
  ``"tasks"`` axis, with no collective inside); ``shared`` (the
  meta-parameters, the class pool) is replicated. Pass such arrays through
  ``shared`` rather than closing over them: JAX's indexing rejects a
  closed-over array inside ``shard_map``.

  Why ``shard_map`` and not a ``vmap`` over the device axis: under
  ``vmap``, per-task weights turn the convolutions of the weight gradient
  into grouped convolutions over the device axis, which XLA's partitioner
  does not split; it all-gathers their operands and every device computes
  every task's weight gradient.

  Args:
    fn: ``fn(tasks_slice, *shared) -> tree``, e.g. the mean of a per-task
      function over the slice (:func:`~metalearn.training.map_tasks`).
    tasks: a pytree with a leading task axis ``[B]``.
    mesh: the device mesh.
    *shared: pytrees every device reads in full.

  Returns:
    ``fn``'s outputs stacked over devices, leading axis ``[D]``, sharded
    over ``"tasks"``. Reducing that axis (``mean(0)``) outside makes XLA
    insert the all-reduce.

  Examples:
    >>> import jax.numpy as jnp
    >>> sums = map_devices(lambda x, w: jnp.sum(x * w), jnp.arange(4.0),
    ...                    task_mesh(1), jnp.float32(2.0))
    >>> sums.tolist()
    [12.0]
  """
  split = shard_tasks(tasks, mesh)

  def local(shard, *shared):
    out = fn(jax.tree.map(lambda x: x[0], shard), *shared)
    return jax.tree.map(lambda x: x[None], out)

  # check_vma=False: a lax.scan carry that starts as (unvarying) zeros and
  # accumulates per-device values is legitimate here.
  tasks_spec, replicated_spec = PartitionSpec(TASK_AXIS), PartitionSpec()
  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(tasks_spec,) + (replicated_spec,) * len(shared),
      out_specs=tasks_spec,
      check_vma=False,
  )(split, *shared)


def needs_throttle(mesh: Mesh) -> bool:
  """Whether a loop over jitted calls on ``mesh`` should bound its queue.

  XLA:CPU runs each simulated device's share of a call on a shared thread
  pool; with dozens of asynchronously dispatched calls that contain
  collectives in flight, the devices' threads can wait on each other's
  all-reduce forever (measured with 8 devices on 2 cores: 32 queued calls
  finish, 64 hang; see jax-ml/jax#25861 for the general CPU
  async-dispatch hang). :func:`~metalearn.training.meta_train` therefore
  keeps at most two calls in flight on a multi-device CPU mesh. GPUs and
  TPUs have no such limit.

  Args:
    mesh: the device mesh.

  Returns:
    ``True`` for a mesh of more than one CPU device.
  """
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def _launched_multi_process() -> bool:
  """Whether the environment describes a launch with several processes."""
  env = os.environ
  if env.get(_COORDINATOR_ENV):
    return True
  if all(name in env for name in _SLURM_ENV):
    return int(env["SLURM_NTASKS"]) > 1
  return int(env.get(_OMPI_SIZE_ENV, "1")) > 1


def initialize_distributed(*, force: bool = False, **kwargs) -> bool:
  """Joins a multi-host run through ``jax.distributed.initialize``, if any.

  A thin wrapper, to call first thing in a program (before any other JAX
  call). It initialises only when asked, so the same entry point works on a
  laptop and on a cluster:

  - ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, which this function reads, as JAX itself does not;
    or on a cluster JAX detects);
  - a SLURM job step with ``SLURM_NTASKS > 1`` (``srun``; JAX reads the
    coordinator, process count and id from the SLURM variables);
  - an Open MPI launch with ``OMPI_COMM_WORLD_SIZE > 1``;
  - or explicitly, with ``force=True`` or any keyword for
    ``jax.distributed.initialize`` (``coordinator_address``,
    ``num_processes``, ``process_id``, ...).

  Afterwards ``jax.devices()`` lists the devices of every host, so
  ``task_mesh()`` spans them all, and each process runs the same program
  on its own devices' tasks. A single-task SLURM job (one hydra/submitit
  sweep point) stays single-process.

  Args:
    force: initialise even if the environment does not ask for it.
    **kwargs: passed to :func:`jax.distributed.initialize`.

  Returns:
    ``True`` if this process is part of a distributed run (now or already),
    ``False`` if it runs alone.

  Examples:
    >>> initialize_distributed()  # Nothing in the environment asks for it.
    False
  """
  if jax.distributed.is_initialized():
    return True
  if not (force or kwargs or _launched_multi_process()):
    return False
  for name, arg in ((_NUM_PROCESSES_ENV, "num_processes"),
                    (_PROCESS_ID_ENV, "process_id")):
    if kwargs.get(arg) is None and os.environ.get(name):
      kwargs[arg] = int(os.environ[name])
  jax.distributed.initialize(**kwargs)
  return True
