"""Optional `torch.compile` of the denoiser (UNet, SD3 or FLUX transformer) for the sampling phase only.

`CompiledSampling(mode)` holds one compiled copy of a network's forward. Inside `with compiled(network):` a
no-grad call of the network goes through it; a call with gradients, and every call outside the block (the
training forward/backward, the reference call with the LoRA adapters switched off), runs the network as it is.

Why it stays correct while the LoRA trains in the same process:
- the network is called as before, through `nn.Module.__call__`: only its `forward` is swapped for the block,
  so forward hooks (the trainer's row counter) still run, outside the compiled graph;
- torch.compile lifts the module's parameters to graph inputs instead of baking them in as constants, so each
  optimizer step's in-place update of the LoRA weights is read by the next compiled call, with no recompilation
  (tests/test_compile.py changes a LoRA weight and checks the compiled output follows);
- shapes are static (`dynamic=False`; symbolic shapes recompiled anyway and compiled slower): each distinct batch
  size compiles once (the resampler makes two, b·2 and b·K·2 rows with guidance), then is reused every round.
Compiled kernels fuse and reorder floating-point sums, so outputs match the eager ones to float rounding (~1e-5
in fp32), not bit for bit; the resampler's random draws do not depend on them, so the same seed gives the same
pairs up to that rounding (a near-tie of two candidates' scores could in principle flip). Under a bf16/fp16
autocast the compiled kernels round differently from the eager ops at half precision: same distribution, other
numbers, and no less accurate against fp32 (tested).
"""

from __future__ import annotations

import contextlib

import torch

from spo.config import COMPILE_MODES  # "" = off, or one of torch.compile's modes

# On CUDA these modes also capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompiledSampling:
    """A network's forward compiled with torch.compile (once, on first use), switched on per `with` block."""

    def __init__(self, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
        self.mode = mode
        self._network = None
        self._compiled = None

    def _compiled_forward(self, network):
        if self._network is not network:  # (a new network, e.g. a reloaded one: compile its forward)
            # `network.forward` as it stands: accelerate's mixed-precision wrapper included, where prepare() put one.
            self._network, self._compiled = network, torch.compile(
                network.forward, mode=None if self.mode == "default" else self.mode, dynamic=False)
        return self._compiled

    @contextlib.contextmanager
    def __call__(self, network):
        """Within the block, no-grad calls of `network` run its compiled forward (a no-op when mode is "")."""
        if not self.mode:
            yield network
            return
        compiled, eager = self._compiled_forward(network), network.forward
        cuda_graphs = self.mode in CUDA_GRAPH_MODES and next(network.parameters()).is_cuda

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return eager(*args, **kwargs)
            if cuda_graphs:  # outputs live in the CUDA graph's memory pool: the next replay would overwrite them
                torch.compiler.cudagraph_mark_step_begin()
                return owned(compiled(*args, **kwargs))
            return compiled(*args, **kwargs)

        saved = network.__dict__.get("forward")  # an instance-level forward (accelerate's wrapper), or None
        network.__dict__["forward"] = forward
        try:
            yield network
        finally:
            if saved is None:
                del network.__dict__["forward"]
            else:
                network.__dict__["forward"] = saved


def owned(output):
    """`output` (a tensor, a tuple, or a diffusers output class) with every tensor copied out of the memory it was
    returned in: a CUDA graph's pool is reused by its next replay, and a caller may keep an output past it."""
    import torch.utils._pytree as pytree

    return pytree.tree_map_only(torch.Tensor, torch.clone, output)
