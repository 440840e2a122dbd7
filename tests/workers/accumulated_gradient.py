"""Run under torchrun by tests/test_accumulation.py: the gradient of the global-batch loss taken in N micro-batches
per process (GradientCache, DDP, the runtime's gather with gradient) against one process's gradient over the whole
global batch at once, in float64. Prints one JSON line: the relative error and loss of each N."""

import json
from contextlib import nullcontext

import torch
import torch.distributed as dist
from global_batch_gradient import (
    GLOBAL_BATCH,
    TwoTowers,
    gradient,
)  # a sibling: Python puts this folder first on the path

from brain_trainer.accumulation import GradientCache
from brain_trainer.brain_model import ContrastiveLoss
from brain_trainer.runtime import Runtime


def main() -> None:
    torch.set_default_dtype(torch.float64)
    runtime = Runtime.start("cpu")
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 7, generator=generator)
    torch.manual_seed(1)
    reference = TwoTowers()
    reference_loss = ContrastiveLoss()(*reference(images, texts))
    reference_loss.backward()

    per_process = GLOBAL_BATCH // runtime.world_size
    local = slice(runtime.rank * per_process, (runtime.rank + 1) * per_process)
    results = {"reference_loss": reference_loss.item()}
    for steps in (1, 2, 4):
        torch.manual_seed(1)
        model = torch.nn.parallel.DistributedDataParallel(TwoTowers())
        cache = GradientCache(
            forward=model,
            plain=model.module,
            loss=ContrastiveLoss(gather=runtime.all_gather, rank=runtime.rank),
            autocast=nullcontext,
            no_sync=runtime.no_sync(model),
            device=runtime.device,
        )
        loss = cache.backward((images[local], texts[local]), steps, lambda value: value.backward())
        error = (gradient(model) - gradient(reference)).abs().max() / gradient(reference).abs().max()
        results[f"error_{steps}"] = error.item()
        results[f"loss_{steps}"] = runtime.mean(loss.item())
    if runtime.is_main:
        print(json.dumps(results), flush=True)
    dist.barrier()
    runtime.close()


if __name__ == "__main__":
    main()
