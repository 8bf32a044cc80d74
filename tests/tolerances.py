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
# rows, statistics reduced in a different order. Measured 0 (Wan/QwenImage, bitwise) .. 7.6e-6 (tiny
# HunyuanVideo, whose own fp32 decode is 7.8e-6 from fp64); 7.8e-6 on the 1024 px benchmark VAE.
VAE_FP32 = 1e-5

# The deep tiny video VAEs (issue 13) on an AVX2-only CPU (2026-11-29), where VAE_FP32's 1e-5 held on the machines
# of earlier sessions. Their outputs are larger than the other tiny VAEs' (~1), and each decode is deep, so one fp32
# decode is itself ~1e-5 from fp64, and the split and the whole decode, in different orders, sit up to twice that
# apart. KVAE video: 16-frame segments handing conv caches on, 25 frames; outputs up to 6.5; its one-process fp32
# decode is 1.14e-5 from fp64, the split 1.19e-5 from it (2 and 3 ranks, diffusers 0.42.1). Allegro: 44-row tiles;
# outputs up to 4.3; one-process fp32 5.9e-6 from fp64, the split 1.08e-5 from it (2 ranks, diffusers 0.36.0).
# The fp64 test of the same splits holds VAE_FP64: the split is exact, the rest is rounding.
VAE_FP32_DEEP_VIDEO = 2.5e-5

# Exactness that needs no tolerance: the same operations on the same inputs in the same order.
BITWISE = 0.0

# Cache (issue 6): a cached parallel run vs the same cache in one process. The skip decisions are identical (the
# skip measure is all-reduced, so it is the one-process value up to summation order, far from any threshold the
# tests use), so the outputs differ only by what context parallelism itself adds on the computed steps, carried
# into skipped steps through the cached residual (added, never amplified). Measured 2.4e-7..4.8e-7 on tiny Flux
# over 6 steps (2 and 4 ranks, Ulysses / Ring / TP / hybrid), 6.3e-7 on the image of a 6-step tiny FluxPipeline.
CACHE_FP32 = 1e-5

# ControlNet (issue 5): the ControlNet and the transformer it feeds both context parallel on one split; the
# residuals are added shard by shard, the same additions as in one process. What differs is only what context
# parallelism itself changes inside attention, in two models instead of one. Measured 1.8e-7..5.1e-7 on tiny
# ControlNet -> transformer steps; whole 2-step pipelines (PIPELINE_FP32) 3.6e-7..2.4e-6 on latents of scale ~4.
CONTROLNET_FP32 = 1e-5

# Transformer tensor parallelism (issue 5): row-parallel linears sum partial products over ranks (all-reduce), a
# different summation order than one matmul; RMSNorms over all heads sum squares across ranks. Measured
# 1.8e-7..5.4e-7 on tiny Flux / Flux2 / QwenImage / Wan / Z-Image, tp 2 and 4, alone and with Ulysses or Ring.
TRANSFORMER_TP_FP32 = 1e-5

# VAE split decode/encode (issue 4), fp64: the split runs the same function as the whole decode, so in fp64 only
# summation order differs (GroupNorm statistics merged across bands). Measured 0..7e-15 on tiny VAEs, 4 ranks.
VAE_FP64 = 1e-12

# VAE split decode in bf16 vs the fp32 one-process decode, relative to bf16 one-process vs the same reference:
# both round every layer to bf16, and which rows round which way differs (GroupNorm statistics are fp32/fp64 in
# the split, fp32 inside PyTorch's bf16 kernel), so the split error is the one-process error give or take noise.
# Measured ratios 1.00..1.02 on tiny AutoencoderKL / Wan / HunyuanVideo.
VAE_BF16_MARGIN = 1.5

# The same fp64 check for LTX-Video: diffusers' RMSNorm computes its variance in fp32 even for fp64 inputs, so an
# fp64-rounding difference upstream can round to a different fp32 variance there (per pixel, not at band edges).
# Measured 2e-7..4e-7; a wrong halo or a local statistic shows up at 0.3 and more (checked by breaking each).
VAE_FP64_LTX = 1e-6

# Sana's DC-AE (ReLU linear attention over the whole image): its processor computes the image-wide sum of V·Kᵀ in
# fp32 whatever the input dtype, so adding the bands' sums in another order rounds differently in the fp32 and in
# the fp64 checks alike. Measured 1.1e-5 (fp32, 2 ranks) and 4.3e-6 (fp64 input, 4 ranks); in one process the
# same block summed over two bands differs from the one-matmul sum by 9.5e-7 (of 10.9), as much as an fp64 sum
# does, while a band-local sum (the logic error this guards against) is 1.7 off.
VAE_LINEAR_ATTENTION = 5e-5
# torch.compile over a parallel model (issue 14) vs the same parallel model eager. aot_eager runs the very ATen ops
# eager runs (measured 0, asserted bitwise). Inductor generates its own CPU kernels: it fuses pointwise ops and
# may block reductions (norms, softmax, matmul epilogues) differently, a few ulp per layer as with CP itself.
COMPILE_INDUCTOR_FP32 = 1e-5
