#!/usr/bin/env python
"""Train a ResT classifier: a short, complete example of the model zoo in a training loop.

    # synthetic data (no download), 20 steps of rest_lite on 64x64 images
    python examples/train.py --steps 20 --image-size 64 --batch-size 8

    # any torchvision ImageFolder (class-per-directory images), mixed precision, clipping
    python examples/train.py --data /path/to/train --model rest_small --amp --clip-grad 1.0 \
        --steps 1000 --output runs/small

    # resume from the last training state, then export the weights for pretrained=
    python examples/train.py --resume runs/small/last.pth --steps 2000 --output runs/small

    # less activation memory: every block recomputed in the backward (same results, ~1/3 more compute)
    python examples/train.py --model rest_base --grad-checkpointing

Every --save-every steps (and at the end) it writes OUTPUT/last.pth (the training state: model,
optimizer, scheduler, AMP scaler, step, arguments; resume with --resume) and OUTPUT/model.safetensors
(the weights alone, loadable with rest_lite(pretrained="model.safetensors")).

The model comes from timm.create_model (timm is needed: `pip install timm`), as in any timm training
script: `import rest` registers the ResT variants there. --grad-checkpointing calls the model's
set_grad_checkpointing(), as timm's train.py does.

AMP (--amp): torch.autocast in float16 with a GradScaler on CUDA, bfloat16 on the CPU (no scaler
needed: bfloat16 has float32's exponent range). Gradient clipping (--clip-grad N): the global norm of
all gradients is clipped to N, after unscaling under AMP.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import rest  # noqa: E402  (registers the ResT variants in timm)

try:
    import timm
    from timm.optim import param_groups_weight_decay
except ImportError:
    sys.exit("examples/train.py builds its model with timm.create_model: pip install timm")

# --model: a timm model name and the configuration overrides create_model gets
MODELS = {name: (name, {}) for name in ("rest_lite", "rest_small", "rest_base", "rest_large", "restv2_tiny",
                                        "restv2_small", "restv2_base", "restv2_large")}
# a few-hundred-thousand-parameter ResT for quick experiments and smoke tests: rest_lite, narrower and shallower
MODELS["rest_tiny"] = ("rest_lite", dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the official ImageNet normalisation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="rest_lite", choices=sorted(MODELS))
    p.add_argument("--data", default=None, help="an ImageFolder directory (needs torchvision); default: synthetic")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps (a resumed run continues up to it)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this")
    p.add_argument("--output", default="runs/rest", help="directory for last.pth and model.safetensors")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", default=None, help="a last.pth written by this script")
    p.add_argument("--pretrained", default=None, help="initial weights (.pth or .safetensors); the head is "
                                                       "re-initialised when its class count differs")
    p.add_argument("--backend", default=None, help="rest_kernels backend (default: auto)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward instead of storing them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
class SyntheticImages(torch.utils.data.Dataset):
    """Random normalised images whose label is encoded in their mean colour, so the loss can fall."""

    def __init__(self, size, num_classes, length=10_000, seed=0):
        self.size, self.num_classes, self.length, self.seed = size, num_classes, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        image = torch.randn(3, self.size, self.size, generator=g)
        image[label % 3] += 1.0 + label // 3
        return image, label


def make_dataset(args):
    if args.data is None:
        return SyntheticImages(args.image_size, args.num_classes, seed=args.seed), args.num_classes
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit("--data needs torchvision (pip install torchvision)")
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(args.data, transform=tf)
    return ds, len(ds.classes)


def batches(loader):
    while True:  # step-based training: cycle through the data
        yield from loader


# ---------------------------------------------------------------------------- training state
def lr_lambda(args):
    def f(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def save_state(path, model, opt, sched, scaler, step, args):
    state = {"model": rest.checkpoint.unwrap_model(model).state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "args": {k: v for k, v in vars(args).items()}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dataset, num_classes = make_dataset(args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))

    name, overrides = MODELS[args.model]
    model = timm.create_model(name, num_classes=num_classes, drop_path_rate=args.drop_path, backend=args.backend,
                              **overrides)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.pretrained:
        pretrained = rest.checkpoint.extract_state_dict(rest.checkpoint.read_checkpoint(args.pretrained))
        if pretrained["head.weight"].shape[0] != num_classes:  # fine-tuning on other classes
            pretrained = {k: v for k, v in pretrained.items() if not k.startswith("head.")}
            model.load_state_dict(pretrained, strict=False)
        else:
            rest.load_checkpoint(model, pretrained, source=args.pretrained)
    model.to(device)

    # no weight decay on norms, biases and the 1x1 head-mix conv's bias (the official recipe: 1-d params;
    # the model's no_weight_decay() adds none)
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    opt = torch.optim.AdamW(groups, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    # a loss scaler only for float16 (its narrow exponent range underflows small gradients)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        rest.load_checkpoint(model, state["model"], source=args.resume)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        # the schedule follows this run's --steps (a resumed run may train longer than the first)
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * lr_lambda(args)(step)
        print(f"resumed from {args.resume} at step {step}")

    os.makedirs(args.output, exist_ok=True)
    model.train()
    data = batches(loader)
    t0, seen = time.perf_counter(), 0
    while step < args.steps:
        images, labels = next(data)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            loss = F.cross_entropy(model(images), labels)
        if not torch.isfinite(loss):
            sys.exit(f"step {step}: loss is {loss.item()}, stopping")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if args.clip_grad is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        seen += images.shape[0]
        if step % args.log_every == 0 or step == args.steps:
            rate = seen / (time.perf_counter() - t0)
            extra = f" grad_norm {grad_norm.item():.3f}" if grad_norm is not None else ""
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}{extra} "
                  f"{rate:.1f} img/s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_state(os.path.join(args.output, "last.pth"), model, opt, sched, scaler, step, args)
            rest.save_checkpoint(model, os.path.join(args.output, "model.safetensors"))
    print(f"done: {step} steps; training state {os.path.join(args.output, 'last.pth')}, "
          f"weights {os.path.join(args.output, 'model.safetensors')}")
    return model


if __name__ == "__main__":
    main()
