"""Built-in models (pure PyTorch, no bigmodel imports): what ``bigmodel demo`` and the
benchmarks run on."""
