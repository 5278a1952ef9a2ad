"""Trainers: one module per optimisation algorithm, chosen by the config's ``trainer:`` key.

Each module defines a config dataclass and ``train(config) -> dict``; the registry maps names to
``(module, config class name)`` and imports lazily, so ``genreward eval`` never pays for trainers.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from genreward.errors import GenrewardError

TRAINERS: dict[str, tuple[str, str]] = {
    "prdp": ("trainers.prdp", "PRDPConfig"),
    "ddpo": ("trainers.ddpo", "DDPOConfig"),
    "reward_model": ("trainers.reward_model", "RewardModelConfig"),
    "rpo": ("trainers.rpo", "RPOConfig"),
    "sds3d": ("trainers.sds3d", "SDS3DConfig"),
    "nft": ("trainers.nft", "NFTConfig"),
    "grpo": ("trainers.grpo", "GRPOConfig"),
}


def get_trainer(name: Any) -> tuple[type, Callable[[Any], dict]]:
    """(config class, train function) for a registered trainer name; one-line error otherwise."""
    if name not in TRAINERS:
        raise GenrewardError(f"unknown trainer {name!r}; available trainers: {', '.join(sorted(TRAINERS))}")
    module_name, config_name = TRAINERS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), module.train
