"""The shapes world: a generator with exact scene graphs and a verifier that reads them back from pixels.

The world is a plugin of the core: :mod:`genreward.world.plugin` (listed in
:data:`genreward.registry.PLUGINS`) registers its model specs and its ``verifier`` reward. This package
imports nothing itself, so ``python -m genreward.world.shapes`` and friends run cleanly.
"""
