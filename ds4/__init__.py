"""ds4: a DeepSeek V4 Flash inference engine for ds4 GGUF files, built on MLX."""

from ds4.errors import Ds4Error, GGUFError

__version__ = "0.1.0"
__all__ = ["Ds4Error", "GGUFError", "__version__"]
