"""Serving PEFT LoRA adapters beside the base model, many adapters in one batch.

``adapter`` reads and validates adapter directories, ``layers`` computes the batched delta of one
parallel linear, ``manager`` holds a rank's adapters and device slots, ``slots`` is the engine's
slot table. docs/serving.md ("Serving LoRA adapters") shows the flags.
"""
