"""Model and run configuration: dataclass presets (``vit``, ``text``, ``llm``, ``vlm``), the run
config (``train``), YAML loading with overrides (``loader``) and user errors (``errors``).

Nothing is imported here, so ``config.errors`` and ``config.loader`` stay free of torch for the
tools that only report user errors."""
