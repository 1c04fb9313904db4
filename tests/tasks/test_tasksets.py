"""``tasks.get_tasksets``: the train/validation/test samplers of a dataset.

On the real Omniglot (``$METALEARN_DATA_DIR``), on a small generated
Mini-ImageNet in its pickle layout, and on the sinusoid family. The
samplers must draw, key for key, the episodes the hydra layer's
``build_samplers`` path draws, so that switching it to ``get_tasksets``
changes no result.
"""

import ast
import pathlib
import pickle

import jax
import numpy as np
import pytest

import metalearn
from metalearn import data, tasks
from metalearn.tasks import _registry
from metalearn.types import ClassPool

# Mini-ImageNet classes per split (train, val, test) and images per class.
MINI_CLASSES = {"train": 6, "val": 3, "test": 4}
MINI_PER_CLASS = 6
ARGS = dict(num_ways=2, num_shots=1, num_queries=2)


def _episodes(sampler, num=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), num)
  return [sampler.sample(k, sampler.data) for k in keys]


def _assert_same_episodes(a, b):
  for ea, eb in zip(_episodes(a), _episodes(b), strict=True):
    for x, y in zip(ea, eb, strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _ids(sampler) -> set[int]:
  return set(np.asarray(sampler.data.class_ids).tolist())


@pytest.fixture(scope="module")
def omniglot_tasksets(data_dir):
  return tasks.get_tasksets(
      "omniglot", num_ways=5, num_shots=1, num_queries=3,
      train_num_ways=10, train_num_shots=2, train_num_queries=4,
      data_dir=data_dir, image_size=28, split_scheme="vinyals",
      rotations=True,
  )


def test_omniglot_shapes_and_splits(omniglot_tasksets):
  ts = omniglot_tasksets
  assert isinstance(ts, tasks.Tasksets)
  sizes = [s.data.num_classes for s in ts]
  assert sizes == [4 * 1028, 4 * 172, 4 * 423]
  train, test = _episodes(ts.train, 1)[0], _episodes(ts.test, 1)[0]
  assert train.support_x.shape == (20, 28, 28, 1)
  assert train.query_x.shape == (40, 28, 28, 1)
  assert test.support_x.shape == (5, 28, 28, 1)
  assert test.query_y.shape == (15,)
  val = _episodes(ts.validation, 1)[0]
  assert val.support_x.shape == (5, 28, 28, 1)
  train_ids, val_ids, test_ids = (_ids(s) for s in ts)
  assert not train_ids & test_ids
  assert not train_ids & val_ids
  assert not val_ids & test_ids


# omniglot50_5w1s, with the fields the hydra layer passes.
HYDRA_TASK = {
    "name": "omniglot50_5w1s", "dataset": "omniglot", "image_size": 28,
    "split_scheme": "vinyals", "rotations": True, "num_ways": 5,
    "num_shots": 1, "num_queries": 15, "train_num_ways": 5,
    "train_num_shots": 1, "train_num_queries": 15, "train_classes": 50,
    "train_class_group": 4, "train_class_seed": 0,
}


def _hydra_samplers(task):
  experiment = pytest.importorskip("metalearn.experiment")
  return experiment.build_samplers(task)


def test_omniglot_same_episodes_as_the_hydra_layer(data_dir):
  # A task config reaches get_tasksets with its fields as arguments.
  task = {**HYDRA_TASK, "data_dir": str(data_dir)}
  hydra = _hydra_samplers(task)
  fields = {k: v for k, v in task.items() if k not in ("name", "dataset")}
  new = tasks.get_tasksets(task["dataset"], **fields)
  assert new.train.data.num_classes == 200
  for a, b in zip(new, hydra, strict=True):
    _assert_same_episodes(a, b)


def test_sinusoid_same_episodes_as_the_hydra_layer():
  task = {
      "dataset": "sinusoid", "num_ways": None, "num_shots": 5,
      "num_queries": 7, "train_num_ways": None, "train_num_shots": 3,
      "train_num_queries": 4, "amplitude": [0.1, 5.0],
      "phase": [0.0, 3.141592653589793], "x_range": [-5.0, 5.0],
  }
  hydra = _hydra_samplers(task)
  new = tasks.get_tasksets(
      "sinusoid", **{k: v for k, v in task.items() if k != "dataset"}
  )
  for a, b in zip(new, hydra, strict=True):
    _assert_same_episodes(a, b)


def test_sinusoid_shapes_and_defaults():
  ts = tasks.get_tasksets(
      "sinusoid", num_ways=None, num_shots=5, num_queries=10,
      train_num_shots=20, amplitude=(1.0, 2.0),
  )
  assert ts.validation is ts.test  # The same family, drawn with other keys.
  train, test = _episodes(ts.train, 1)[0], _episodes(ts.test, 1)[0]
  assert train.support_x.shape == (20, 1)
  assert train.query_x.shape == (10, 1)
  assert test.support_x.shape == (5, 1)
  plain = tasks.sinusoid_sampler(num_shots=5, num_queries=10,
                                 amplitude=(1.0, 2.0))
  _assert_same_episodes(ts.test, plain)


def _write_mini_imagenet(root, size=16):
  """The pickle layout, classes of the three splits disjoint."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  first = 0
  for split, count in MINI_CLASSES.items():
    images = rng.integers(0, 256, (count * MINI_PER_CLASS, size, size, 3),
                          np.uint8)
    class_dict = {
        f"n{first + c:08d}": list(range(c * MINI_PER_CLASS,
                                        (c + 1) * MINI_PER_CLASS))
        for c in range(count)
    }
    first += count
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": images, "class_dict": class_dict}, f)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("mini_data")
  _write_mini_imagenet(root / "mini-imagenet")
  return root


def _mini(mini_dir, **kwargs):
  return tasks.get_tasksets(
      "mini_imagenet", **{**ARGS, "data_dir": mini_dir, "image_size": 8,
                          **kwargs})


def test_mini_imagenet_shapes_and_splits(mini_dir):
  ts = _mini(mini_dir, train_num_ways=3)
  assert [s.data.num_classes for s in ts] == [6, 3, 4]
  train = _episodes(ts.train, 1)[0]
  assert train.support_x.shape == (3, 8, 8, 3)
  assert _episodes(ts.test, 1)[0].query_x.shape == (4, 8, 8, 3)
  train_ids, val_ids, test_ids = (_ids(s) for s in ts)
  assert not (train_ids & val_ids or train_ids & test_ids
              or val_ids & test_ids)


def test_train_splits_and_few_task_classes(mini_dir):
  merged = _mini(mini_dir, train_splits=["train", "val"])
  assert merged.train.data.num_classes == 9
  assert _ids(merged.validation) <= _ids(merged.train)
  few = _mini(mini_dir, train_classes=2, train_class_seed=3)
  assert few.train.data.num_classes == 2
  # The draw is restrict_classes's, on the training split.
  drawn = data.restrict_classes(_mini(mini_dir).train.data, 2, seed=3)
  assert _ids(few.train) == set(np.asarray(drawn.class_ids).tolist())
  grouped = _mini(mini_dir, train_classes=1, train_class_group=3)
  assert grouped.train.data.num_classes == 3


@pytest.mark.parametrize(
    "kwargs,argument,words",
    [
        pytest.param({"num_ways": 4}, "num_ways",
                     "num_ways=4 exceeds the 3 classes in the mini_imagenet "
                     "validation split", id="ways"),
        pytest.param({"train_num_ways": 7}, "train_num_ways",
                     "train_num_ways=7 exceeds the 6 classes in the "
                     "mini_imagenet train split", id="train-ways"),
        pytest.param({"num_shots": 3, "num_queries": 4}, "num_shots",
                     "num_shots + num_queries = 3 + 4 exceeds the 6 examples "
                     "per class in the mini_imagenet test split", id="shots"),
        pytest.param({"train_num_queries": 6}, "train_num_shots",
                     "train_num_shots + train_num_queries = 1 + 6 exceeds",
                     id="train-queries"),
        pytest.param({"train_classes": 7}, "train_classes",
                     "train_classes=7 exceeds the 6 groups", id="classes"),
        pytest.param({"train_classes": 1, "train_class_group": 4},
                     "train_class_group",
                     "train_class_group=4 does not divide the 6 classes",
                     id="group"),
    ],
)
def test_episode_size_errors_name_argument_and_split(
    mini_dir, kwargs, argument, words
):
  with pytest.raises(ValueError, match="^" + argument) as info:
    _mini(mini_dir, **kwargs)
  assert info.value.argument == argument
  assert words in str(info.value)


@pytest.mark.parametrize(
    "dataset,kwargs,argument",
    [
        ("omniglot", {"num_ways": 0}, "num_ways"),
        ("omniglot", {"num_ways": None}, "num_ways"),
        ("omniglot", {"num_shots": 0}, "num_shots"),
        ("omniglot", {"num_queries": 1.5}, "num_queries"),
        ("omniglot", {"train_num_ways": True}, "train_num_ways"),
        ("omniglot", {"train_num_shots": 0}, "train_num_shots"),
        ("omniglot", {"train_num_queries": -1}, "train_num_queries"),
        ("omniglot", {"data_dir": 3}, "data_dir"),
        ("omniglot", {"image_size": 3}, "image_size"),
        ("omniglot", {"split_scheme": "nope"}, "split_scheme"),
        ("omniglot", {"rotations": "yes"}, "rotations"),
        ("omniglot", {"train_splits": ["train", "test"]}, "train_splits"),
        ("omniglot", {"train_splits": "train"}, "train_splits"),
        ("omniglot", {"train_splits": ["train", "train"]}, "train_splits"),
        ("omniglot", {"train_classes": 0}, "train_classes"),
        ("omniglot", {"train_class_group": 0}, "train_class_group"),
        ("omniglot", {"train_class_seed": -1}, "train_class_seed"),
        ("omniglot", {"no_such_option": 1}, "no_such_option"),
        ("mini_imagenet", {"image_size": "84"}, "image_size"),
        ("mini_imagenet", {"rotations": True}, "rotations"),
        ("sinusoid", {"num_ways": 5}, "num_ways"),
        ("sinusoid", {"train_num_ways": 5}, "train_num_ways"),
        ("sinusoid", {"amplitude": (5.0, 1.0)}, "amplitude"),
        ("sinusoid", {"phase": (0.0,)}, "phase"),
        ("sinusoid", {"x_range": "ab"}, "x_range"),
        ("sinusoid", {"image_size": 28}, "image_size"),
    ],
)
def test_check_errors_name_the_argument(tmp_path, dataset, kwargs, argument):
  base = {**ARGS, "num_ways": None} if dataset == "sinusoid" else ARGS
  # A data directory without data: the check never loads anything.
  args = {**base, "data_dir": tmp_path, **kwargs}
  with pytest.raises(ValueError, match="^" + argument) as info:
    tasks.check_taskset_args(dataset, **args)
  assert info.value.argument == argument
  with pytest.raises(ValueError, match="^" + argument):
    tasks.get_tasksets(dataset, **args)


def test_check_accepts_every_task_config(tmp_path):
  tasks.check_taskset_args(
      "omniglot", **ARGS, data_dir=tmp_path / "nothing", image_size=28,
      split_scheme="finn", rotations=False, train_splits=["train", "val"],
      train_classes=50, train_class_group=4, train_class_seed=1,
  )
  tasks.check_taskset_args("mini_imagenet", **ARGS, image_size=84,
                           train_classes=12)
  tasks.check_taskset_args(
      "sinusoid", num_ways=None, num_shots=10, num_queries=10,
      train_num_ways=None, amplitude=[0.1, 5.0], phase=[0, 3],
      x_range=[-5.0, 5.0],
  )


def test_unknown_dataset_lists_the_registered_ones():
  with pytest.raises(ValueError, match="^dataset='cifar'") as info:
    tasks.get_tasksets("cifar", **ARGS)
  for name in ("mini_imagenet", "omniglot", "sinusoid"):
    assert name in str(info.value)
  assert {"mini_imagenet", "omniglot", "sinusoid"} <= set(
      tasks.list_datasets())


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_missing_data_message_shows_the_absolute_path(
    tmp_path, monkeypatch, via
):
  monkeypatch.chdir(tmp_path)
  kwargs = {}
  if via == "argument":
    kwargs["data_dir"] = "relative/data"
  else:
    monkeypatch.setenv(data.DATA_DIR_ENV, "relative/data")
  for dataset in ("omniglot", "mini_imagenet"):
    with pytest.raises(data.DatasetNotFoundError) as info:
      tasks.get_tasksets(dataset, **ARGS, **kwargs)
    folder = "omniglot" if dataset == "omniglot" else "mini-imagenet"
    assert str(tmp_path / "relative" / "data" / folder) in str(info.value)


@pytest.fixture
def registry(monkeypatch):
  """A copy of the registry, restored after the test."""
  monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))


def test_register_a_class_pool_dataset(registry, tmp_path):
  calls = []

  def load(data_dir, *, size):
    calls.append((data_dir, size))
    pools = [
        ClassPool(np.full((n, 4, size, size, 1), i, np.uint8),
                  np.arange(10 * i, 10 * i + n, dtype=np.int32))
        for i, n in enumerate((6, 3, 3))
    ]
    return data.DatasetSplits(*pools)

  def check(*, size):
    if size < 2:
      raise tasks.TasksetArgumentError("size", f"size too small: {size}")

  tasks.register_dataset("blocks", options={"size": 5}, check=check,
                         load_splits=load)
  assert "blocks" in tasks.list_datasets()
  assert tasks.dataset_options("blocks")["size"] == 5
  ts = tasks.get_tasksets("blocks", **ARGS, data_dir=tmp_path,
                          train_classes=4)
  assert calls == [(tmp_path, 5)]
  assert ts.train.data.num_classes == 4
  assert _episodes(ts.test, 1)[0].support_x.shape == (2, 5, 5, 1)
  with pytest.raises(ValueError, match="^size") as info:
    tasks.check_taskset_args("blocks", **ARGS, size=1)
  assert info.value.argument == "size"
  with pytest.raises(ValueError, match="already registered"):
    tasks.register_dataset("blocks", load_splits=load)
  tasks.register_dataset("blocks", load_splits=load, options={"size": 3},
                         replace=True)
  assert tasks.dataset_options("blocks")["size"] == 3


def test_register_a_procedural_family(registry):
  def make(train, test, *, scale):
    del train
    return tasks.Tasksets(*(
        tasks.sinusoid_sampler(num_shots=test.num_shots,
                               num_queries=test.num_queries,
                               amplitude=(scale, scale))
        for _ in range(3)
    ))

  tasks.register_dataset("waves", options={"scale": 1.0},
                         make_tasksets=make)
  ts = tasks.get_tasksets("waves", num_ways=None, num_shots=3,
                          num_queries=2)
  assert _episodes(ts.train, 1)[0].support_x.shape == (3, 1)
  with pytest.raises(ValueError, match="^num_ways"):
    tasks.get_tasksets("waves", num_ways=5, num_shots=3, num_queries=2)


def test_register_rejects_bad_registrations(registry):
  with pytest.raises(ValueError, match="exactly one"):
    tasks.register_dataset("none")
  with pytest.raises(ValueError, match="names of arguments"):
    tasks.register_dataset("clash", options={"train_classes": 3},
                           load_splits=lambda d: None)


# Each package may import only the packages listed for it (and itself):
# metalearn.tasks sits above metalearn.data, which never imports tasks.
LAYERS = {
    "types": (),
    "data": ("types",),
    "tasks": ("types", "data"),
}


def _metalearn_imports(path: pathlib.Path):
  """The ``metalearn`` subpackages a module imports."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "metalearn" and len(parts) > 1:
        yield parts[1]


def test_tasks_sit_above_data():
  root = pathlib.Path(metalearn.__file__).parent
  for package, allowed in LAYERS.items():
    module = root / f"{package}.py"
    paths = [module] if module.exists() else (root / package).glob("*.py")
    for path in paths:
      imported = set(_metalearn_imports(path)) - {package, *allowed}
      assert not imported, f"{path.relative_to(root)} imports {imported}"
