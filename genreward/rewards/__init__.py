"""Rewards: ``build(name, **options)`` returns any registered reward.

Importing this package registers the built-in rewards (one module per family). Rewards of plugins (the
shapes world's ``verifier``, registered by :mod:`genreward.world.plugin`) are found on a miss: an unknown name makes
the registry import :data:`genreward.registry.PLUGINS` by name once, then look again. This package never
imports a plugin itself, so ``genreward.rewards`` does not depend on ``genreward.world``.
"""

from genreward.rewards.base import (
    Reward,
    RewardOutput,
    RewardSpec,
    WeightedSum,
    available,
    build,
    build_from_spec,
    register,
)

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
