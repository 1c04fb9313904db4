"""Config errors, plain configs and the typed checks of single fields.

The bottom of :mod:`metalearn.experiment`: every other module that reads a
config raises :class:`ConfigError` through these checks, so a bad field is
reported in one line that names it (``trainer.num_steps must be an int >=
1, got 0``). Each check takes the whole plain config and a dotted path.
"""

import copy
import numbers
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names it."""


def to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
  """Resolves a composed config into plain dicts, lists and scalars.

  Args:
    cfg: a hydra/OmegaConf config, or a mapping (copied).

  Returns:
    The config without its ``hydra`` node.

  Raises:
    ConfigError: if an interpolation cannot be resolved or a value is
      missing (``???``).
  """
  if isinstance(cfg, DictConfig):
    try:
      plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
      raise ConfigError(first_line(e)) from e
  else:
    plain = copy.deepcopy(dict(cfg))
  plain.pop("hydra", None)
  return plain


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (its type if it has none)."""
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def get(cfg: Mapping[str, Any], path: str) -> Any:
  """The value at a dotted ``path``; a ConfigError if it is missing."""
  node = cfg
  for part in path.split("."):
    if not isinstance(node, Mapping) or part not in node:
      raise ConfigError(f"{path} is missing from the config")
    node = node[part]
  return node


def is_int(value: Any) -> bool:
  """Whether ``value`` is an int (a bool is not)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(cfg: Mapping[str, Any], path: str, low: int) -> int:
  """The int at ``path``, checked to be at least ``low``."""
  value = get(cfg, path)
  if not is_int(value) or value < low:
    raise ConfigError(f"{path} must be an int >= {low}, got {value!r}")
  return value


def positive_number(path: str, value: Any) -> None:
  """Checks that ``value`` (the field at ``path``) is a number > 0."""
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not value > 0
  ):
    raise ConfigError(f"{path} must be a number > 0, got {value!r}")


def one_of(cfg: Mapping[str, Any], path: str, choices: tuple[str, ...]) -> str:
  """The value at ``path``, checked to be one of ``choices``."""
  value = get(cfg, path)
  if value not in choices:
    raise ConfigError(
        f"{path}={value!r} is not one of {', '.join(choices)}"
    )
  return value


def boolean(cfg: Mapping[str, Any], path: str) -> bool:
  """The value at ``path``, checked to be true or false."""
  value = get(cfg, path)
  if not isinstance(value, bool):
    raise ConfigError(f"{path} must be true or false, got {value!r}")
  return value


def multiple_of(cfg: Mapping[str, Any], path: str, base_path: str) -> None:
  """Checks that the int at ``path`` is a multiple of that at ``base_path``."""
  value, base = get(cfg, path), get(cfg, base_path)
  if value % base:
    raise ConfigError(
        f"{path}={value} must be a multiple of {base_path}={base}"
    )


def target(cfg: Mapping[str, Any], group: str) -> str:
  """``<group>._target_``, checked to name a factory."""
  name = get(cfg, f"{group}._target_")
  if not isinstance(name, str) or not name:
    raise ConfigError(f"{group}._target_ must name a factory, got {name!r}")
  return name
