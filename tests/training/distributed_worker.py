"""One process of a 2-process run on localhost; saves its meta-parameters.

Started twice by ``test_distributed.py`` the way README.md's "Many hosts"
tells a user to: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` in the environment, 2 simulated CPU devices per process
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``), CPU collectives
over gloo. :func:`metalearn.training.initialize_distributed` joins the run,
so ``task_mesh()`` spans the 4 devices of both processes.

    python tests/training/distributed_worker.py OUT.npz
"""

import sys

import jax
import numpy as np
import optax

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool

NUM_STEPS = 3
META_BATCH = 8


def setup():
  """The learner, meta-optimizer and sampler (the test builds the same).

  SGD, not Adam: the conv biases before BatchNorm have a zero gradient, up
  to rounding, which Adam would scale up to whole steps.
  """
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 4, 28, 28, 1), dtype=np.uint8)
  pool = ClassPool(images, np.arange(10, dtype=np.int32))
  sampler = tasks.episode_sampler(pool, num_ways=5, num_shots=1,
                                  num_queries=2)
  learner = metalearners.protonet(models.conv4(None, features=4))
  return learner, optax.sgd(0.1), sampler


def train(mesh=None):
  """``NUM_STEPS`` meta-steps of ``setup()``'s learner; state and losses."""
  learner, tx, sampler = setup()
  state, history = training.meta_train(
      learner, tx, sampler, key=jax.random.key(0), num_steps=NUM_STEPS,
      meta_batch_size=META_BATCH, log_every=1, progress=False, mesh=mesh)
  return state, [h["outer/loss"] for h in history]


def main(out):
  # Before any computation: the global device list is fixed at start-up.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not training.initialize_distributed():
    raise SystemExit("set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                     "JAX_PROCESS_ID")
  mesh = training.task_mesh()
  state, loss = train(mesh)
  # The state is replicated: every process reads the whole of it.
  np.savez(
      out,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      mesh_size=mesh.size,
      loss=np.asarray(loss),
      **{f"leaf{i}": np.asarray(x)
         for i, x in enumerate(jax.tree.leaves(state.meta_params))},
  )


if __name__ == "__main__":
  main(sys.argv[1])
