"""Run under torchrun by tests/test_distributed.py: the gradient of the global-batch loss on N processes (DDP +
the runtime's gather with gradient) against one process's gradient over the same global batch, in float64; and
the same with a gather that drops the gradient (open_clip's default), which must be off. Prints one JSON line."""

import json

import torch
import torch.distributed as dist

from brain_trainer.brain_model import ContrastiveLoss
from brain_trainer.runtime import Runtime

GLOBAL_BATCH, WIDTH = 8, 6


class TwoTowers(torch.nn.Module):
    """The brain's interface in miniature: forward returns image and text embeddings and the temperature."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(5, WIDTH), torch.nn.Linear(7, WIDTH)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        normalize = torch.nn.functional.normalize
        return normalize(self.image(images), dim=-1), normalize(self.text(texts), dim=-1), self.logit_scale


def gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    torch.set_default_dtype(torch.float64)
    runtime = Runtime.start("cpu")
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 7, generator=generator)
    torch.manual_seed(1)
    reference = TwoTowers()
    ContrastiveLoss()(*reference(images, texts)).backward()

    local = slice(
        runtime.rank * GLOBAL_BATCH // runtime.world_size, (runtime.rank + 1) * GLOBAL_BATCH // runtime.world_size
    )
    results = {}
    without_gradient = lambda tensor: torch.cat(runtime.gather_objects(tensor.detach()))
    for name, gather in (("with_gradient", runtime.all_gather), ("without_gradient", without_gradient)):
        torch.manual_seed(1)
        model = torch.nn.parallel.DistributedDataParallel(TwoTowers())
        loss = ContrastiveLoss(gather=gather, rank=runtime.rank)(*model(images[local], texts[local]))
        loss.backward()
        error = (gradient(model) - gradient(reference)).abs().max() / gradient(reference).abs().max()
        results[name] = error.item()
        results[f"{name}_loss"] = runtime.mean(loss.item())
    results["reference_loss"] = ContrastiveLoss()(*reference(images, texts)).item()
    if runtime.is_main:
        print(json.dumps(results), flush=True)
    dist.barrier()
    runtime.close()


if __name__ == "__main__":
    main()
