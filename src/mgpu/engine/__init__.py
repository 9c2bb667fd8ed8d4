"""The control plane: sequences, block manager, scheduler (pure Python), process plumbing."""
