"""Reconstruction metrics of a MedITok tokenizer over a metadata file (see evaluate.py)."""
