"""Checkpoint model: what a checkpoint *is*, independent of where its tensors go.

Hugging Face layout and naming, every rule of an index (reading and writing), discovery in a
folder, the validated lazy :class:`~bigmodel.Checkpoint`, and shard planning for saves.
"""
