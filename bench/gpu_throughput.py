"""Training throughput of the covidxray model against a raw PyTorch ResNet50, in one run.

    KERAS_BACKEND=jax python bench/gpu_throughput.py [--size 224] [--batch 128] [--steps 30]

Both train a ResNet50 with one sigmoid output on random 1-channel images (the data does not
change the speed), after warm-up steps that are not counted:

- covidxray: ``model.build_model`` as training builds it, compiled as training compiles it,
  inside ``accelerator.precision_for_hardware`` (bfloat16 on a GPU; XLA on jax), ``fit``;
- raw PyTorch: the same architecture written here in plain ``torch.nn`` (bottleneck blocks
  3-4-6-3), channels-last, bfloat16 autocast on a GPU, AdamW, a plain loop.

Prints images/s of each and the ratio, and names the device. On a CPU it runs too (use a small
``--size`` and ``--batch``), which is how it is tested before a GPU session.
"""

from __future__ import annotations

import argparse
import time


def raw_torch_resnet50(device):
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inp, width, stride):
            super().__init__()
            out = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(inp, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(True), nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
            self.skip = (nn.Identity() if stride == 1 and inp == out else nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
              nn.MaxPool2d(3, 2, 1)]
    inp = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inp, width, stride if i == 0 else 1))
            inp = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inp, 1)]
    return nn.Sequential(*layers).to(device).to(memory_format=torch.channels_last)


def raw_torch_images_per_second(size: int, batch: int, steps: int, warmup: int) -> tuple:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = raw_torch_resnet50(device)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 1), device=device).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    return batch * steps / (time.perf_counter() - start), name


def covidxray_images_per_second(size: int, batch: int, steps: int, warmup: int) -> tuple:
    import keras
    import numpy as np

    import covidxray  # noqa: F401  picks the backend
    from covidxray.model.accelerator import gpu_name, precision_for_hardware
    from covidxray.model.network import build_model, unfreeze_top_stages
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * (steps + warmup), size, size, 1), dtype=np.uint8)
    y = rng.integers(0, 2, len(x)).astype("float32")
    with precision_for_hardware("auto") as policy:
        model = build_model(size, "resnet50", "none", augment=None)
        unfreeze_top_stages(model, "resnet50", "all", freeze_batchnorm=False)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.fit(x[:batch * warmup], y[:batch * warmup], batch_size=batch, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(x[batch * warmup:], y[batch * warmup:], batch_size=batch, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
    return batch * steps / seconds, f"{keras.backend.backend()}, {policy}", gpu_name() or "CPU"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    ours, setting, device = covidxray_images_per_second(args.size, args.batch, args.steps,
                                                        args.warmup)
    print(f"covidxray ResNet50 ({setting}) on {device}: {ours:.1f} images/s", flush=True)
    raw, raw_device = raw_torch_images_per_second(args.size, args.batch, args.steps,
                                                  args.warmup)
    print(f"raw PyTorch ResNet50 (channels-last, bf16 on GPU) on {raw_device}: "
          f"{raw:.1f} images/s", flush=True)
    print(f"\n| model | device | size | batch | images/s | vs raw PyTorch |\n|---|---|---|---|---|---|\n"
          f"| covidxray ({setting}) | {device} | {args.size} | {args.batch} | {ours:.1f} | "
          f"{ours / raw:.2f}x |\n| raw PyTorch | {raw_device} | {args.size} | {args.batch} | "
          f"{raw:.1f} | 1.00x |")


if __name__ == "__main__":
    main()
