"""The QLoRA training engine: an importable recipe that needs nothing of the service.

Importing this package (and `spec`, `data`) never imports torch, so the API can share the
job spec and the dataset validator. Torch is imported by `recipe`, `model`, `merge`, `tiny`.
"""

import logging

# On CPUs with AVX512-BF16, bitsandbytes tries to fetch a kernel from the model hub as it is imported (by
# peft, transformers or us), and warns on every run when it cannot; the engine never fetches code at run
# time, so the warning says nothing. Set here, before any module of the engine can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
