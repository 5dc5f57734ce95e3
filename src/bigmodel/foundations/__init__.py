"""Foundations: the shared vocabulary every layer may use, and nothing else of bigmodel.

One parser per concept (sizes, dtypes, devices and memory budgets), the whole exception tree,
the result and option types of the public verbs, the package logger, progress bars, strict
JSON and process-memory readings. Imports nothing from the layers above.
"""
