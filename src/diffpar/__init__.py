"""diffpar: spread a whole diffusers pipeline over several processes with one config."""
from .api import disable_cache, enable_cache
from .cache import DBCacheConfig
from .config import ParallelismConfig
from .errors import DiffparError, RankMismatchError, UnsupportedError
from .hooks.handle import ParallelHandle

__all__ = [
    "ParallelismConfig",
    "DBCacheConfig",
    "enable_cache",
    "disable_cache",
    "ParallelHandle",
    "DiffparError",
    "RankMismatchError",
    "UnsupportedError",
]
__version__ = "0.1.0"
