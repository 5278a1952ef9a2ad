"""genreward: reward fine-tuning of visual generators."""

from genreward.errors import ConfigError, GenrewardError, OfflineModelError

__version__ = "0.1.0"

__all__ = ["ConfigError", "GenrewardError", "OfflineModelError", "__version__"]
