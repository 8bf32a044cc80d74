"""Tiny seeded models for the families added through the coverage harness: one module per family (or a few
close relatives). Each module registers its builders with `tiny_transformers.builder` and lists its
`coverage.ModelCase` entries in `CASES`; `coverage.all_cases()` and `tiny_transformers.build()` find every module
here by itself, so adding a family touches no shared file."""
