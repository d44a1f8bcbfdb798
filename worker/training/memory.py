"""Trading transfers and compute for device memory at long context: activation offload and tiled MLPs.

At 32k tokens the two largest parts of a QLoRA step's peak are what gradient checkpointing keeps
(every layer's input, layers x tokens x hidden) and the one layer recomputed in backward, whose
MLP intermediates span the whole sequence (worker/training/estimate.py counts both). Each has its
switch in the spec:

- `training.activation_offload`: `ActivationOffload.checkpoint` is the checkpoint function the
  model's layers call. The layer inputs that torch's (non-reentrant) checkpoint saves go through
  saved-tensor hooks into pinned CPU memory, copied on a side stream while the next layer computes,
  and come back in backward, the previous layer's input prefetched while this one recomputes. The
  values are copies, bit for bit: the run is the same run.
- `training.tiled_mlp`: `tile_mlps` makes each decoder layer's MLP a `TiledMLP` autograd function:
  its forward runs chunk by chunk without saving intermediates, and its backward recomputes and
  backpropagates one chunk at a time, so a layer's backward holds one chunk's intermediates. The
  MLP is per token, so the function is the same; only the matmuls' shapes change (and with
  lora.dropout > 0 the dropout masks are drawn per chunk).

Both are what Unsloth's offloaded checkpointing and tiled MLP and Arctic Long Sequence Training
do; here they are small enough to read, and tests/training/test_memory.py holds them to equal
curves and to the estimate's parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class _Offloaded:
    host: torch.Tensor  # the copy in (pinned) CPU memory
    device: torch.device
    copied: torch.cuda.Event | None = None  # the device-to-host copy is done (CUDA)
    prefetched: torch.Tensor | None = None  # brought back early, on the side stream
    arrived: torch.cuda.Event | None = None


@dataclass
class ActivationOffload:
    """Pinned CPU memory for what gradient checkpointing keeps. One per model; `held_bytes` and
    `peak_held_bytes` say how much host memory it holds (the estimate's host_bytes)."""

    cuda: bool = field(default_factory=torch.cuda.is_available)
    held_bytes: int = 0
    peak_held_bytes: int = 0

    def __post_init__(self):
        self.stream = torch.cuda.Stream() if self.cuda else None
        self._order: list[_Offloaded] = []  # packed in forward order: backward walks it in reverse

    def checkpoint(self, function: Callable, *args, **kwargs):
        """torch's checkpoint, with the inputs it saves for the recompute offloaded."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def _pack(self, tensor: torch.Tensor):
        # Only the checkpoint's own inputs come here (inside the layer its hooks take over), so every
        # tensor is a layer input worth moving.
        if self.cuda and tensor.is_cuda:
            # The copy waits for the layer that made the tensor, then runs beside the next one;
            # record_stream keeps the allocator from reusing its memory until the copy has read it.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                copied = self.stream.record_event()
            tensor.record_stream(self.stream)
            item = _Offloaded(host, tensor.device, copied)
        else:  # the CPU: a copy, so the path (and what it holds) is the one a GPU takes
            item = _Offloaded(tensor.detach().clone(), tensor.device)
        self.held_bytes += item.host.nbytes
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        self._order.append(item)
        return item

    def _unpack(self, item: _Offloaded) -> torch.Tensor:
        tensor = self._bring_back(item)
        # Backward recomputes layers last to first: start bringing back the one before while this
        # one recomputes.
        index = next((i for i, other in enumerate(self._order) if other is item), None)
        if index is not None:
            del self._order[index]
            if self.cuda and index > 0 and self._order[index - 1].prefetched is None:
                self._prefetch(self._order[index - 1])
        self.held_bytes -= item.host.nbytes
        return tensor

    def _prefetch(self, item: _Offloaded) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(item.copied)
            item.prefetched = item.host.to(item.device, non_blocking=True)
            item.arrived = self.stream.record_event()

    def _bring_back(self, item: _Offloaded) -> torch.Tensor:
        if not self.cuda or item.device.type != "cuda":
            return item.host
        current = torch.cuda.current_stream()
        if item.prefetched is None:
            current.wait_event(item.copied)
            return item.host.to(item.device, non_blocking=True)
        current.wait_event(item.arrived)
        item.prefetched.record_stream(current)  # made on the side stream, used (and freed) on this one
        return item.prefetched


class TiledMLP(torch.autograd.Function):
    """An MLP over chunks of tokens: no intermediates saved in forward, one chunk's at a time in backward.

    forward(mlp, tile, x, *params): `params` are the MLP's trainable parameters, passed so autograd
    knows this node leads to them; backward accumulates their gradients itself (the way reentrant
    checkpointing does) and returns the input's.
    """

    @staticmethod
    def forward(ctx, mlp: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.tile = mlp, tile
        ctx.rng = _RngState.capture(x.device)
        ctx.autocast = _AutocastState.capture(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp(chunk) for chunk in _chunks(x, tile)]).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: its chunks are views
        grad_chunks = _chunks(grad_out.contiguous(), ctx.tile)
        with ctx.rng.restored(), ctx.autocast.entered(), torch.enable_grad():
            for chunk, grad_chunk, into in zip(_chunks(x, ctx.tile), grad_chunks, _chunks(grad_x, ctx.tile),
                                               strict=True):
                chunk = chunk.detach().requires_grad_(True)
                torch.autograd.backward(ctx.mlp(chunk), grad_chunk)
                into.copy_(chunk.grad)
        return (None, None, grad_x, *[None] * len(ctx.needs_input_grad[3:]))


def _chunks(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, ...]:
    """Tokens of every row, flattened, in chunks of `tile` (views: copying into one writes x)."""
    return x.reshape(-1, x.shape[-1]).split(tile)


@dataclass
class _RngState:
    """The RNG state where a forward began, so a recompute draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    @contextlib.contextmanager
    def restored(self):
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


@dataclass
class _AutocastState:
    """Autocast as the forward ran it: backward runs outside the trainer's autocast context."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> _AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def entered(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation that failed: torch's OutOfMemoryError, or cuBLAS failing to allocate its workspace
    (a RuntimeError with the same cause)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def tile_mlps(model, tile: int) -> int:
    """Make every decoder layer's MLP tiled, in chunks of `tile` tokens (estimate.mlp_tile_tokens);
    returns how many. Works on the model with its adapter in place: the MLP's LoRA layers run inside."""
    tiled = 0
    for name, module in model.named_modules():
        # Every family transformers has names its decoder layers' MLP "mlp", gated (Llama's gate, up and
        # down) or not (GPT-NeoX's, Phi-2's, StarCoder 2's two matrices): a per-token function either way.
        if name.endswith(".mlp"):
            _tile(module, tile)
            tiled += 1
    if not tiled:
        raise ValueError("training.tiled_mlp: this model has no decoder-layer MLPs (modules named *.mlp) to tile")
    return tiled


def _tile(mlp: torch.nn.Module, tile: int) -> None:
    forward = mlp.forward
    params = tuple(p for p in mlp.parameters() if p.requires_grad)

    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.shape[:-1].numel() <= tile:
            return forward(x)  # eval, generation, or a sequence that is one chunk anyway
        return TiledMLP.apply(forward, tile, x, *params)

    mlp.forward = tiled_forward
