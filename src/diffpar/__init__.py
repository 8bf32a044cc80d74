"""diffpar: spread a whole diffusers pipeline over several processes with one config."""
from diffpar.api import disable_cache, enable_cache, parallelize
from diffpar.planning import plan
from diffpar.loading import empty_pipeline
from diffpar.plan_types import ComponentPlan, ParallelPlan
from diffpar.cache_config import DBCacheConfig
from diffpar.config import ParallelismConfig
from diffpar.errors import DiffparError, RankMismatchError, UnsupportedError
from diffpar.handle import ParallelHandle

__all__ = [
    "ParallelismConfig",
    "DBCacheConfig",
    "parallelize",
    "enable_cache",
    "disable_cache",
    "plan",
    "empty_pipeline",
    "ParallelPlan",
    "ComponentPlan",
    "ParallelHandle",
    "DiffparError",
    "RankMismatchError",
    "UnsupportedError",
]
__version__ = "0.1.0"
