"""Properties of the on-device augmentation transforms and sampler wrapper.

Each transform is checked under jit on small images: shape, dtype and value
range; the same key gives the same image and other keys other images;
strength zero is the identity; known warps move a pixel where expected. The
wrapper is checked on a synthetic pool: labels and episode unchanged, only
the images it is asked to augment change, the same key the same episode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import tasks
from metalearn.types import ClassPool

TRANSFORMS = {
    "affine": lambda: tasks.random_affine(
        max_shift=0.1, max_rotation=10.0, max_scale=0.2, max_shear=0.3),
    "crop": lambda: tasks.random_crop(padding=4),
    "flip": lambda: tasks.random_flip(prob=0.5),
    "color": lambda: tasks.color_jitter(
        brightness=0.4, contrast=0.4, saturation=0.4),
    "chain": lambda: tasks.augmentation(
        affine={"max_rotation": 10.0}, crop={"padding": 2},
        flip={"prob": 0.5}, color={"brightness": 0.4}),
}
IDENTITIES = {
    "affine": lambda: tasks.random_affine(),
    "crop": lambda: tasks.random_crop(padding=0),
    "flip": lambda: tasks.random_flip(prob=0.0),
    "color": lambda: tasks.color_jitter(),
    "chain": lambda: tasks.chain(),
}


@functools.cache
def _jitted(name: str, table: str = "random"):
  fn = (TRANSFORMS if table == "random" else IDENTITIES)[name]()
  return jax.jit(fn)


def _image(channels: int, seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (16, 16, channels))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_shape_dtype_range_and_determinism(name, channels):
  fn, image = _jitted(name), _image(channels)
  out = fn(jax.random.key(0), image)
  assert out.shape == image.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out, fn(jax.random.key(0), image))
  # Eight images, eight keys: at least one differs from its original
  # (a flip of probability 1/2 may leave one image alone).
  outs = [fn(jax.random.key(k), image) for k in range(8)]
  assert any(not np.array_equal(o, image) for o in outs)
  assert any(not np.array_equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("name", sorted(IDENTITIES))
def test_identity_at_zero_strength(name):
  image = _image(3)
  for k in range(3):
    np.testing.assert_allclose(
        _jitted(name, "identity")(jax.random.key(k), image), image,
        atol=1e-6)


def test_pure_shift_moves_a_pixel_where_expected():
  image = jnp.zeros((28, 28, 1)).at[10, 12, 0].set(1.0)
  moved = jax.jit(tasks.affine_warp)(image, jnp.eye(2), jnp.array([3., -5.]))
  np.testing.assert_array_equal(
      np.argwhere(np.asarray(moved[..., 0]) > 0), [[13, 7]])
  assert float(moved[13, 7, 0]) == 1.0


def test_rotation_by_90_degrees_turns_about_the_centre():
  image = jnp.zeros((5, 5, 1)).at[0, 2, 0].set(1.0)  # Top middle.
  quarter = jnp.array([[0.0, -1.0], [1.0, 0.0]])  # (row, col) -> (-col, row)
  turned = jax.jit(tasks.affine_warp)(image, quarter, jnp.zeros(2))
  np.testing.assert_allclose(turned[..., 0], jnp.rot90(image[..., 0]),
                             atol=1e-6)


def test_warp_fills_with_the_background():
  ink = jnp.ones((8, 8, 1))
  moved = jax.jit(tasks.affine_warp)(ink, jnp.eye(2), jnp.array([0., 3.]))
  np.testing.assert_array_equal(moved[:, :3], 0.0)
  np.testing.assert_array_equal(moved[:, 3:], 1.0)


def test_flip_twice_is_the_identity():
  flip, image = tasks.random_flip(prob=1.0), _image(3)
  once = flip(jax.random.key(0), image)
  np.testing.assert_array_equal(once, image[:, ::-1])
  np.testing.assert_array_equal(flip(jax.random.key(1), once), image)


def test_crop_translates_by_at_most_the_padding():
  image = jnp.zeros((12, 12, 1)).at[5, 6, 0].set(1.0)
  crop = jax.jit(tasks.random_crop(padding=3))
  moves = set()
  for k in range(20):
    (row, col), = np.argwhere(np.asarray(crop(jax.random.key(k), image))[
        ..., 0] == 1.0)
    moves.add((int(row) - 5, int(col) - 6))
  assert all(abs(r) <= 3 and abs(c) <= 3 for r, c in moves)
  assert len(moves) > 5


def test_augment_images_uses_one_key_per_image():
  images = jnp.broadcast_to(_image(1), (4, 16, 16, 1))
  fn = jax.jit(functools.partial(tasks.augment_images, _jitted("crop")))
  out = fn(jax.random.key(0), images)
  assert out.shape == images.shape
  np.testing.assert_array_equal(out, fn(jax.random.key(0), images))
  assert len({np.asarray(o).tobytes() for o in out}) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"affine": {"max_rotation": -1}}, "affine.max_rotation"),
        ({"affine": {"max_scale": 1.0}}, "affine.max_scale"),
        ({"affine": {"max_rot": 1}}, "affine.max_rot is not an argument"),
        ({"crop": {}}, "crop.padding is required"),
        ({"crop": {"padding": 1.5}}, "crop.padding"),
        ({"flip": {"prob": 2}}, "flip.prob"),
        ({"color": {"contrast": "high"}}, "color.contrast"),
        ({"color": 0.4}, "color must be null or a mapping"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=f"^{match}"):
    tasks.augmentation(**kwargs)


# A pool whose pixel values encode (class, example), to see what changed.
_POOL = ClassPool(
    np.broadcast_to(
        (np.arange(12)[:, None] * 20 + np.arange(20)[None, :]).astype(
            np.uint8)[..., None, None, None], (12, 20, 8, 8, 1)).copy(),
    np.arange(12, dtype=np.int32),
)


@functools.cache
def _sampler(apply_to: str | None):
  base = tasks.episode_sampler(_POOL, num_ways=3, num_shots=2, num_queries=4)
  if apply_to is None:
    return base
  return tasks.augmented(base, tasks.random_crop(padding=3, fill=0.0),
                         apply_to=apply_to)


@functools.cache
def _draw(apply_to: str | None):
  sampler = _sampler(apply_to)
  return jax.jit(lambda key: sampler.sample(key, sampler.data))


@pytest.mark.parametrize("apply_to", tasks.APPLY_TO)
def test_augmented_sampler_changes_only_what_it_is_asked_to(apply_to):
  key = jax.random.key(3)
  plain, aug = _draw(None)(key), _draw(apply_to)(key)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), plain) == jax.tree.map(
      lambda x: (x.shape, x.dtype), aug)
  # The same episode (labels and classes), other pixels.
  np.testing.assert_array_equal(plain.support_y, aug.support_y)
  np.testing.assert_array_equal(plain.query_y, aug.query_y)
  assert not np.array_equal(plain.support_x, aug.support_x)
  # Cropping with zero padding only keeps or blanks each image's pixels.
  assert np.all((aug.support_x == plain.support_x) | (aug.support_x == 0))
  if apply_to == "support":
    np.testing.assert_array_equal(plain.query_x, aug.query_x)
  else:
    assert not np.array_equal(plain.query_x, aug.query_x)
  # Deterministic given the key; another key, other augmentations.
  again = _draw(apply_to)(key)
  assert all(np.array_equal(a, b) for a, b in zip(aug, again, strict=True))
  other = _draw(apply_to)(jax.random.key(4))
  assert not np.array_equal(other.support_x, aug.support_x)


def test_augmented_refuses_non_image_episodes_and_unknown_apply_to():
  flip = tasks.random_flip()
  with pytest.raises(ValueError, match="episodes of images"):
    tasks.augmented(
        tasks.sinusoid_sampler(num_shots=5, num_queries=5), flip)
  with pytest.raises(ValueError, match="apply_to='query'"):
    tasks.augmented(_sampler(None), flip, apply_to="query")
