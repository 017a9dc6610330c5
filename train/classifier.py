"""The small classifier of `cxr-train utility`: torchvision's ResNet-18 with a one-channel first
convolution, randomly initialised (no weight download), trained from arrays in memory.

    model = train_classifier(images, labels, num_classes=2, steps=300, seed=0, device="cpu")
    probs = predict(model, test_images)             # (N, num_classes) softmax

Every regime trains with the same recipe: `steps` minibatches of `batch` images drawn uniformly
with replacement from the pool, the same augmentation, AdamW with a cosine-decayed learning rate.
Draws, augmentation and initialisation come from generators seeded by `seed`, so a run on CPU
is repeatable bit for bit (same torch build and thread count). No horizontal flip: a radiograph's
left and right are not interchangeable (the heart is on the left).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm


def resnet18_1ch(num_classes: int) -> torch.nn.Module:
    """ResNet-18 (He et al. 2016) as torchvision builds it, the stem taking one channel. The
    standard stem (7x7 stride 2, max-pool) is kept at small sizes too: at 32 px the last stage
    sees 1 x 1, which is coarse but 16x cheaper than a CIFAR-style stem on CPU."""
    from torchvision.models import resnet18
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
    return model


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts up to 1/16 of the side (reflected borders) and a mild brightness/contrast
    change, per image; x: (B, 1, S, S) in [0, 1] on the CPU (the generator's device)."""
    b, _, s, _ = x.shape
    pad = max(1, s // 16)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    out = torch.stack([padded[i, :, int(dy[i]):int(dy[i]) + s, int(dx[i]):int(dx[i]) + s] for i in range(b)])
    contrast = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bright = 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    mean = out.mean(dim=(2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(0.0, 1.0)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0                          # [0, 1] -> [-1, 1], as the generator's space


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int, batch: int,
                     lr: float, seed: int, device: str, desc: str = "train") -> torch.nn.Module:
    """A ResNet-18 trained on (N, S, S) float images in [0, 1] with integer labels."""
    torch.manual_seed(seed)                       # the initial weights
    model = resnet18_1ch(num_classes).to(device)
    gen = torch.Generator().manual_seed(seed)     # draws and augmentation: CPU, so CUDA runs draw the same
    pool = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = _normalise(augment(pool[idx], gen)).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Softmax class probabilities (N, C) float64 of (N, S, S) images, no augmentation."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    out = [torch.softmax(model(_normalise(x[a:a + batch]).to(device)).float(), dim=1).cpu()
           for a in range(0, len(x), batch)]
    return torch.cat(out).double().numpy()
