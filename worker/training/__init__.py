"""The QLoRA training engine: an importable recipe that needs nothing of the service.

Importing this package (and `spec`, `data`) never imports torch, so the API can share the
job spec and the dataset validator. Torch is imported by `recipe`, `model`, `merge`, `tiny`.
"""
