"""Every tolerance the tests use, with its reason. fp32 unless named otherwise."""

# Context parallelism reorders no reduction inside attention rows for Ulysses (each head sees the whole sequence)
# but the ring merges per-chunk softmaxes through log-sum-exp, and fused CPU SDPA kernels block differently on
# shorter inputs: differences of a few ulp accumulate over layers. Measured 1e-7..5e-7 on tiny models.
CP_FP32 = 1e-5

# Whole pipelines run several denoising steps and a VAE decode on top of CP; the scheduler amplifies nothing
# but steps add up. Same bound the issues require.
PIPELINE_FP32 = 1e-5

# Tensor-parallel linears split the inner sum of row-parallel layers across ranks and add partial sums with an
# all-reduce: a different summation order than one matmul. Measured ~1e-6 on tiny encoders.
TP_FP32 = 1e-5

# Split VAE decode with halo exchange and whole-image GroupNorm statistics: the same convolutions on the same
# rows, statistics reduced in a different order. Measured 1.5e-6..2e-6.
VAE_FP32 = 1e-5

# Exactness that needs no tolerance: the same operations on the same inputs in the same order.
BITWISE = 0.0
