"""guardspace_pl: fine-tune LLMs without losing their safety alignment (GuardSpace, arXiv 2510.14301)."""

from guardspace_pl.model import GuardSpaceLM

__version__ = "0.1.0"
__all__ = ["GuardSpaceLM", "__version__"]
