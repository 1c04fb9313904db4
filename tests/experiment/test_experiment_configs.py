"""Every config composes, validates and builds its learner and optimizer."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from hydra.errors import ConfigCompositionException

from metalearn import experiment, metalearners
from metalearn.types import Episode

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
LEARNERS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet")
OMNIGLOT_TASKS = ("5w1s", "5w5s", "20w1s", "20w5s")
IMAGE_SHAPES = {
    "omniglot": (28, 28, 1),
    "mini_imagenet": (84, 84, 3),
    "sinusoid": (1,),
}


def _options(group):
  return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _example_episode(task) -> Episode:
  """Zeros shaped like one meta-test episode of a task config."""
  shape = IMAGE_SHAPES[task["dataset"]]
  if task["dataset"] == "sinusoid":
    support, query = task["num_shots"], task["num_queries"]
    return Episode(jnp.zeros((support, 1)), jnp.zeros((support, 1)),
                   jnp.zeros((query, 1)), jnp.zeros((query, 1)))
  ways = task["num_ways"]
  support, query = ways * task["num_shots"], ways * task["num_queries"]
  return Episode(
      jnp.zeros((support, *shape)), jnp.zeros((support,), jnp.int32),
      jnp.zeros((query, *shape)), jnp.zeros((query,), jnp.int32),
  )


def test_every_benchmark_row_has_an_experiment():
  expected = {
      f"omniglot_{task}_{learner}"
      for task in OMNIGLOT_TASKS for learner in LEARNERS
  }
  expected |= {
      f"mini_imagenet_{task}_{learner}"
      for task in ("5w1s", "5w5s") for learner in LEARNERS
  }
  expected |= {"sinusoid_maml", "sinusoid_metasgd"}
  assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_header_gives_command_runtime_and_paper(name):
  lines = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
  assert lines[0] == "# @package _global_"
  header = "\n".join(line for line in lines if line.startswith("#"))
  assert f"# Command:  metalearn-train experiment={name}\n" in header
  assert "# Runtime:  " in header
  assert "# Paper:    " in header


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(compose_train, name):
  cfg = experiment.validate_config(compose_train(f"experiment={name}"))
  assert cfg["name"] == name
  task_name = name.rsplit("_", 1)[0]
  assert cfg["task"]["name"] == task_name
  learner = experiment.build_learner(cfg)
  experiment.build_optimizer(cfg)
  # Shapes only: the model must accept the task's inputs, and a head must
  # have one output per way.
  params = jax.eval_shape(
      learner.init, jax.random.key(0), _example_episode(cfg["task"])
  )
  net = cfg["learner"].get("model") or {}
  if net.get("num_outputs") and cfg["task"]["num_ways"]:
    # Meta-SGD and the learned-optimiser learners wrap the model's params.
    head = getattr(params, "model", params)["head"]
    assert head["kernel"].shape[-1] == cfg["task"]["num_ways"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_debug_shrinks_every_experiment(compose_train, name):
  cfg = experiment.validate_config(
      compose_train(f"experiment={name}", "debug=smoke")
  )
  trainer = cfg["trainer"]
  assert (trainer["num_steps"], trainer["meta_batch_size"]) == (2, 2)
  assert trainer["test_episodes"] <= 4
  assert cfg["logger"]["kind"] == "none"
  for field in ("num_inner_steps", "eval_num_inner_steps"):
    assert cfg["learner"].get(field, 1) == 1


@pytest.mark.parametrize("learner", _options("learner"))
def test_every_learner_option_builds(compose_train, learner):
  embedding = learner in ("protonet", "r2d2", "incontext", "baseline",
                          "baseline_pp", "rfs", "meta_baseline",
                          "metaoptnet")
  model = "conv4_protonet" if embedding else "conv4_omniglot"
  cfg = experiment.validate_config(
      compose_train(f"learner={learner}", f"model={model}")
  )
  built = experiment.build_learner(cfg)
  assert isinstance(built, metalearners.MetaLearner)


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_option_builds(compose_train, model):
  # ProtoNet takes any network as its embedding.
  task = "task=sinusoid" if model == "mlp" else "task=omniglot_5w1s"
  overrides = ["learner=protonet", f"model={model}", task]
  if model == "mlp":
    overrides[0] = "learner=maml"
  cfg = experiment.validate_config(compose_train(*overrides))
  learner = experiment.build_learner(cfg)
  if model != "resnet12":  # Tracing ResNet-12 is slow; it is built above.
    jax.eval_shape(learner.init, jax.random.key(0),
                   _example_episode(cfg["task"]))


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_option_validates(compose_train, task):
  model = {"sinusoid": "mlp"}.get(
      task, "conv4_mini_imagenet" if task.startswith("mini") else
      "conv4_omniglot"
  )
  cfg = experiment.validate_config(
      compose_train(f"task={task}", f"model={model}")
  )
  assert cfg["task"]["name"] == task


@pytest.mark.parametrize("optimizer", _options("optimizer"))
def test_every_optimizer_option_builds(compose_train, optimizer):
  cfg = experiment.validate_config(compose_train(f"optimizer={optimizer}"))
  tx = experiment.build_optimizer(cfg)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update(params, tx.init(params), params)
  assert jnp.all(updates["w"] < 0)


def test_defaults(compose_train, data_dir):
  cfg = experiment.validate_config(compose_train())
  assert cfg["task"]["name"] == "omniglot_5w1s"
  assert cfg["learner"]["_target_"] == "metalearn.metalearners.maml"
  assert cfg["model"]["num_outputs"] == cfg["task"]["num_ways"] == 5
  assert cfg["logger"]["kind"] == "wandb"
  assert cfg["task"]["data_dir"] == cfg["data_dir"] == str(data_dir)
  assert experiment.run_name(cfg) == "omniglot_5w1s_maml"


@pytest.mark.parametrize(
    "overrides,name",
    [
        (("learner=fomaml",), "fomaml"),
        (("learner=anil", "learner.first_order=true"), "foanil"),
        (("learner=mlti_maml",), "mlti"),
        (("learner=protonet", "model=conv4_protonet"), "protonet"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_run_name_is_the_factory_fo_for_first_order(
    compose_train, overrides, name
):
  cfg = experiment.validate_config(compose_train(*overrides))
  assert experiment.run_name(cfg) == f"omniglot_5w1s_{name}"


@pytest.mark.parametrize("group", ["learner", "task", "model", "optimizer"])
def test_unknown_group_option_names_the_group_and_its_options(
    compose_train, group
):
  with pytest.raises(ConfigCompositionException) as info:
    compose_train(f"{group}=no_such_option")
  message = str(info.value)
  assert f"Could not find '{group}/no_such_option'" in message
  assert f"Available options in '{group}'" in message
  for option in _options(group):
    assert option in message


@pytest.mark.parametrize(
    "launcher,target",
    [
        ("joblib", "JoblibLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(compose_train, launcher, target):
  cfg = compose_train(f"hydra/launcher={launcher}", hydra=True)
  assert cfg.hydra.launcher._target_.endswith(target)
