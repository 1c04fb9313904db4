"""Gradient-based adaptation warns about running batch-norm statistics.

Adapting at meta-test on the stored statistics after meta-training on
batch statistics makes MAML fail (benchmarks/README.md, Omniglot table),
so building an adaptation learner on such a model warns; ProtoNet, which
does not adapt weights, and models without running statistics do not.
"""

import warnings

import pytest

from metalearn import metalearners, models
from metalearn.learned_optimizers import meta_lstm
from metalearn.metalearners import RUNNING_NORM_WARNING

ADAPTERS = {
    "maml": lambda m: metalearners.maml(m, 0.4),
    "anil": lambda m: metalearners.anil(m, 0.4),
    "metasgd": lambda m: metalearners.metasgd(m, 0.4),
    "meta_lstm": lambda m: meta_lstm(m, 1),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adaptation_learner_warns_on_running_norm(name):
  model = models.conv4(5, features=4, norm="running")
  with pytest.warns(UserWarning, match="running batch-norm") as record:
    ADAPTERS[name](model)
  assert str(record[0].message) == RUNNING_NORM_WARNING


@pytest.mark.parametrize("norm", ["transductive", "none"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_no_warning_without_running_statistics(name, norm):
  model = models.conv4(5, features=4, norm=norm)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ADAPTERS[name](model)


def test_protonet_with_running_norm_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    metalearners.protonet(models.conv4(None, features=4, norm="running"))
