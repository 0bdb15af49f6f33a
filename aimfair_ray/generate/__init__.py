"""Synthetic data generation (CSDG): LLM-written prompts streamed by Ray Data into
text-to-image actor pools, written in the shared Parquet schema (``data.io.SCHEMA``,
``source="synthetic"``, with ``prompt`` and ``generator`` set).

Modules: ``prompts`` (the prompt stage and its backends), ``t2i`` (the embedded text-to-image
pipeline, diffusers-style) and ``t2i_train`` (its training recipe), ``images`` (the Ray Data
image stage), ``checker`` (the independent digit/colour checker) and ``stage`` (the sets, the
faithfulness filter and the quality bar).
"""
