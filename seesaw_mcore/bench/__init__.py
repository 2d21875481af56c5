"""Benchmarks, outside the engine's core: the plan suite (``python -m seesaw_mcore.bench``,
``suite``), per-plan and per-mechanism benches (``plans``, ``switch``, ``tiers``, ``step``) and
the side-by-side peers (``hf``, ``vllm``); ``common`` holds their shared setup and output."""
