"""LoRA fine-tuning with Accelerate and PEFT: ``mgpu train`` and ``mgpu merge``.

``args`` declares the flags, ``data`` reads and masks the JSONL formats, ``checkpoint`` writes and
finds checkpoints, ``trainer`` runs the loop, ``launch`` starts the processes, ``merge`` folds an
adapter into its base model. See docs/training.md.
"""
