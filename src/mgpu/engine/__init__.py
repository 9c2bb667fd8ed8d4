"""The control plane: sequences, block manager, scheduler (pure Python), and the process plumbing."""
