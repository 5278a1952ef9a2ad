"""Rewards: ``build(name, **options)`` returns any registered reward.

Importing this package registers the built-in rewards (one module per family). Rewards of plugins (the
shapes world's ``verifier``, registered by :mod:`genreward.world.plugin`) are found on a miss: an unknown name makes
the registry import :data:`genreward.registry.PLUGINS` by name once, then look again. This package never
imports a plugin itself, so ``genreward.rewards`` does not depend on ``genreward.world``.
"""

from genreward.registry import load_plugins
from genreward.rewards import base as _base
from genreward.rewards.base import (
    Reward,
    RewardOutput,
    RewardSpec,
    WeightedSum,
    available,
    build_from_spec,
    register,
)

_registry_build = _base.build


def build(name: str, /, **options):
    """Build a registered reward by name (plugins are imported once on an unknown name); see :func:`genreward.rewards.base.build`."""
    if name not in available():
        load_plugins()
    return _registry_build(name, **options)


# Interim hook until genreward/rewards/base.py loads plugins on a miss itself: base.build_from_spec and
# base.reward_from_specs (configs, trainers, the CLI) call the module-global ``base.build``, so it is pointed
# at the plugin-aware one here, before any other module can bind it.
if not getattr(_base.build, "loads_plugins", False):
    build.loads_plugins = True  # type: ignore[attr-defined]
    _base.build = build

# Built-in reward families register themselves on import.
from genreward.rewards import clip_score as _clip_score  # noqa: F401,E402
from genreward.rewards import imagenet as _imagenet  # noqa: F401,E402
from genreward.rewards import imagereward as _imagereward  # noqa: F401,E402
from genreward.rewards import jpeg as _jpeg  # noqa: F401,E402
from genreward.rewards import lambda_harmonic as _lambda_harmonic  # noqa: F401,E402
from genreward.rewards import preference as _preference  # noqa: F401,E402
from genreward.rewards import remote as _remote  # noqa: F401,E402
from genreward.rewards import shaping as _shaping  # noqa: F401,E402
from genreward.rewards import vlm_judge as _vlm_judge  # noqa: F401,E402

__all__ = ["Reward", "RewardOutput", "RewardSpec", "WeightedSum", "available", "build", "build_from_spec", "register"]
