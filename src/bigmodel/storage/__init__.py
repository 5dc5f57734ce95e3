"""Storage: how bytes move. The only layer that opens weight files or writes into a folder.

File formats (safetensors, ``.bin``), atomic writes and fsync, the commit protocol of a save,
digests, parallel ``pread`` and kernel readahead. Knows nothing of checkpoints as a whole
(indexes, Hugging Face names) or of models.
"""
