"""Multi-process test harness: a reusable pool of gloo CPU rank processes. See `pool.RankPool`."""
from diffpar.testing.pool import LeakedStateError, RankFailure, RankPool, RankTimeout, get_pool, shutdown_pools

__all__ = ["RankPool", "RankFailure", "RankTimeout", "LeakedStateError", "get_pool", "shutdown_pools"]
