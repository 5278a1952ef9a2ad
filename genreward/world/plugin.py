"""The shapes world as a plugin of the core: importing this module registers

* the model specs ``world:shapes-t2i`` (pipeline), ``world:shapes-clip`` (CLIP) and ``world:shapes-judge``
  (VLM) with :mod:`genreward.registry` (:mod:`genreward.world.models`);
* the ``verifier`` reward with the rewards' ``@register`` (:mod:`genreward.world.reward`).

The core lists this module by name in :data:`genreward.registry.PLUGINS` and imports it on the first
unknown spec prefix or reward name, so ``load_pipeline("world:shapes-t2i")`` and ``build("verifier")``
work without importing the world first, while the static imports run one way: world → models / rewards.
"""

from genreward.world import models as _models  # noqa: F401  (registers the world: model specs)
from genreward.world import reward as _reward  # noqa: F401  (registers the verifier reward)
