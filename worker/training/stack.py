"""Loading the training stack (torch, transformers, peft, trl, bitsandbytes) in a process that trains:
the same modules, in less time. Every job's training process pays this before its first step.

Imports nothing heavy itself: the API imports worker.training.spec, and with it this package.

Two costs that buy nothing here (measured in docs/performance.md, "Start of a training process"):
- bitsandbytes wraps its generic fallback kernels (`backends/default/ops.py`: dequantize, the 32-bit
  optimizer) in `torch.compile` as it is imported; wrapping them imports torch's whole compiler
  (torch._inductor), ~1 s of CPU. On CUDA and on the CPU the device's own kernels serve every call
  those fallbacks would (bitsandbytes registers `cuda` and `cpu` kernels for the same ops), and the
  CPU kernel falls back to the generic one only for a matrix with an odd last dimension (or a
  quantization block of 2048 or more on AVX-512). (On Apple's MPS, whose kernels bitsandbytes also
  wraps, they run eagerly too.) With
  TORCHDYNAMO_DISABLE=1 while bitsandbytes is imported, torch.compile hands the functions back
  unwrapped (torch._dynamo.eval_frame._optimize reads it at each call), so those rare calls run the
  same operations eagerly. The variable is restored at once: later torch.compile calls are untouched.
- Python's cyclic garbage collector runs every few hundred allocations, and the imports allocate
  millions of objects that live as long as the process: each full collection walks all of them
  again (~1.5 s of CPU over the imports). It is off while they run; then they are frozen
  (`gc.freeze`), so the collections during training skip them too. The ~10,000 objects of reference
  cycles the imports leave as garbage are frozen with them (at most a few MB, for the process's
  life): collecting them first would cost a full collection, ~0.5 s.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def import_bitsandbytes() -> None:
    """Import bitsandbytes without torch.compile-wrapping its generic kernels (see above). Call before
    anything imports transformers or peft, which import it; no effect once it is imported."""
    if "bitsandbytes" in sys.modules:
        return
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module("bitsandbytes")
    finally:
        if previous is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


# Warnings the libraries print in every CPU run that say nothing a user could act on, each matched by its text and
# the module that raises it, so any other warning of those libraries, or this one from elsewhere, still shows:
# - bitsandbytes: "Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior." On the
#   CPU the optimizer's state is in host memory already, which is where paging would move it; the spec's default
#   (paged_adamw_32bit) is right for the GPU, and the engine says itself what it does on the CPU (the
#   optimizer_unpaged event).
# - transformers: "`is_gradient_checkpointing` is deprecated and will be removed in v6": peft and trl read the old
#   property name (peft_model.py, trl/models/utils.py); the engine's own code uses the new one.
EXPECTED_WARNINGS = (
    (UserWarning, r"Paged optimizers are not supported on CPU", r"bitsandbytes\.optim\.optimizer"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


def filter_expected_warnings() -> None:
    """Leave out EXPECTED_WARNINGS in this process (a training process: `qlora train`, a worker's job)."""
    for category, message, module in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextmanager
def loading() -> Iterator[None]:
    """Around a training process's imports: no garbage collection while they run, and what they loaded
    frozen out of every later collection; the libraries' expected warnings left out (EXPECTED_WARNINGS). For a
    process's entry point, not a library: it freezes everything the process holds."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        filter_expected_warnings()
        import_bitsandbytes()
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
