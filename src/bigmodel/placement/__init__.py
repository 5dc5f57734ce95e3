"""Placement: where each tensor of a model lives and as what.

Empty (meta) construction, matching checkpoint keys to module names, the dtype/device policy
of a load, initialising what a checkpoint lacks, device maps and the one device planner.
Works on modules and checkpoint descriptions; reads no tensor data.
"""
