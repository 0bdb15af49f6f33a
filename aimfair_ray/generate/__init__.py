"""Synthetic data generation (CSDG): LLM-written prompts streamed by Ray Data into
text-to-image actor pools, written in the shared Parquet schema (``data.io.SCHEMA``,
``source="synthetic"``, with ``prompt`` and ``generator`` set).

Empty until the CSDG issue lands; the data layer's schema and writers are ready for it.
"""
