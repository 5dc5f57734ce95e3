"""The user verbs and their policy: load, save, from_pretrained, estimate, dispatch, convert.

Each verb validates its options, decides (strictness, defaults, single process or
collective) and composes the layers below. The public names are re-exported by
:mod:`bigmodel`.
"""
