"""Multi-process test harness: a reusable pool of gloo CPU rank processes. See `pool.RankPool`."""
from diffpar.testing.pool import RankFailure, RankPool, RankTimeout, get_pool, shutdown_pools

__all__ = ["RankPool", "RankFailure", "RankTimeout", "get_pool", "shutdown_pools"]
