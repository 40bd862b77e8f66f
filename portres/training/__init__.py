"""Training: gradients on every backend, optimisers and schedules written once, the loop
and its checkpoints. The architecture is still only in :mod:`portres.plan`: training runs
the same walker with batch norm in train mode.
"""
