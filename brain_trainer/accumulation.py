"""Gradient accumulation for a contrastive loss (the GradCache method, open_clip's `--accum-freq`): the global
batch's InfoNCE over micro-batches, so a big batch's negatives fit in a small GPU's memory.

Each accumulation step: (1) every micro-batch's embeddings without gradient (activations freed at once), the RNG
state saved before each; (2) the loss over all of them, on leaf copies, and its backward, which gives the gradient
of the global-batch loss with respect to every embedding (through the runtime's gather, every process's too);
(3) each micro-batch's forward again, with gradient and its saved RNG state (the same dropout masks), and a
backward that feeds it those embedding gradients. The parameter gradient is the sum of the micro-batches' shares
of the one-big-batch gradient: the same update, to float rounding, for a model whose rows do not depend on each
other. BatchNorm in training mode does depend on its batch: each micro-batch is normalised by its own statistics,
as in any accumulation, and its running statistics are updated once per micro-batch (by the re-run; the first
pass's updates are undone).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global RNG state a forward draws from: the CPU generator's and, on CUDA, the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def batchnorm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        buffer
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for buffer in module.buffers()
    ]


def accumulation_note(model: torch.nn.Module, steps: int) -> str | None:
    """The ⚠ line when accumulation is not exact for this model (BatchNorm in training mode), else None."""
    if steps == 1 or not batchnorm_buffers(model):
        return None
    return (
        f"⚠ --accum_steps {steps}: BatchNorm normalises each micro-batch by its own statistics, so the update "
        f"is close to, not the same as, the one-big-batch update"
    )


class GradientCache:
    """`backward(inputs, steps, backward)`: the gradient of the loss over all of `inputs` (split into `steps`
    micro-batches along the first dimension) accumulated into the model's parameters; returns the loss.

    `forward` is the module the step calls (DDP and/or compiled), `plain` the module it wraps (for its BatchNorm
    buffers), `no_sync` DDP's context that keeps a backward's gradient local (a no-op with one process), so the
    processes all-reduce once, after the last micro-batch.
    """

    def __init__(
        self,
        *,
        forward: Forward,
        plain: torch.nn.Module,
        loss: Loss,
        autocast: Callable,
        no_sync: Callable[[], AbstractContextManager],
        device: torch.device,
    ):
        self.forward, self.plain, self.loss, self.autocast = forward, plain, loss, autocast
        self.no_sync, self.device = no_sync, device

    def backward(
        self, inputs: tuple[torch.Tensor, ...], steps: int, backward: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """`backward(loss)` runs the loss's own backward (the GradScaler's scaling goes there)."""
        micro_batches = list(zip(*(tensor.chunk(steps) for tensor in inputs)))
        states, (image, text, scale) = self._embed(micro_batches)
        with self.autocast():
            loss = self.loss(image, text, scale)
        backward(loss)  # the gradient of the global-batch loss with respect to every embedding (and the temperature)
        rows = 0
        for index, (micro_batch, state) in enumerate(zip(micro_batches, states)):
            last = index == len(micro_batches) - 1
            set_rng_state(state, self.device)  # the dropout masks of its first forward
            with self.no_sync() if not last else nullcontext():
                with self.autocast():
                    image_part, text_part, scale_part = self.forward(*micro_batch)
                size = len(image_part)
                surrogate = (image_part * image.grad[rows : rows + size]).sum() + (
                    text_part * text.grad[rows : rows + size]
                ).sum()
                if last:  # the temperature's gradient, once, in the backward that all-reduces
                    surrogate = surrogate + scale_part * scale.grad
                surrogate.backward()
            rows += size
        return loss.detach()

    def _embed(self, micro_batches: list[tuple[torch.Tensor, ...]]):
        """Every micro-batch's embeddings without gradient, as leaves of the loss; the RNG state before each."""
        saved_buffers = [buffer.clone() for buffer in batchnorm_buffers(self.plain)]
        states, images, texts = [], [], []
        with torch.no_grad():
            for micro_batch in micro_batches:
                states.append(rng_state(self.device))
                with self.autocast():
                    image, text, scale = self.forward(*micro_batch)
                images.append(image)
                texts.append(text)
            for buffer, saved in zip(batchnorm_buffers(self.plain), saved_buffers):  # the re-runs update them
                buffer.copy_(saved)
        leaves = [torch.cat(images), torch.cat(texts), scale.detach().clone()]
        return states, [leaf.requires_grad_() for leaf in leaves]
