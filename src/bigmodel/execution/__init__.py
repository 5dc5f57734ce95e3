"""Execution: the machinery that moves tensors, in one process or many.

Reading a load's plan into a module, the one shard-writing core of every save, offload hooks
that bring weights in for a forward pass, and the ``torch.distributed`` collectives of
distributed loads and saves. Policy (what to load, strictness, defaults) lives above, in
:mod:`bigmodel.api`.
"""
