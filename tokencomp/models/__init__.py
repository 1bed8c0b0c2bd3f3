"""Built-in model adapter plugins, one module per model family group."""
