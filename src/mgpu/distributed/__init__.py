"""Process groups and the few collectives the model uses (see :mod:`.parallel_state`)."""
