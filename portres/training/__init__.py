"""Training: gradients on every backend, optimisers and schedules written once, the loop
and its checkpoints. The architecture is still only in :mod:`portres.plan`: training runs
the same walker with batch norm in train mode.

``config`` holds a run's settings, ``state`` its training state (parameters, buffers and
optimiser slots apart), ``step`` the train step, ``loop`` the run, ``checkpoint`` its files;
data parallel is ``replicas`` (the group a run takes part in) and ``launch`` (local ranks);
``transfer`` the fine-tuning settings (the parts ``--freeze`` holds, the rates ``--lr-backbone`` scales).
"""
