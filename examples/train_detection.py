#!/usr/bin/env python
"""Train a ResT detector (RetinaNet, Faster R-CNN or Mask R-CNN from rest.detection) on COCO-format data.

    # a synthetic COCO-format dataset of shapes with boxes and masks (written to OUTPUT/synthetic), tiny model
    python examples/train_detection.py --detector maskrcnn --model rest_tiny --epochs 3 --image-size 128

    # a COCO folder (pycocotools format), ImageNet-pretrained rest_small, mixed precision
    python examples/train_detection.py --detector maskrcnn --model rest_small --backbone-weights rest_small.pth \
        --train-images coco/train2017 --train-ann coco/annotations/instances_train2017.json \
        --val-images coco/val2017 --val-ann coco/annotations/instances_val2017.json --amp --output runs/mrcnn

    # resume from the last training state
    python examples/train_detection.py ... --resume runs/mrcnn/last.pth --epochs 12

    # sanity check: overfit one fixed batch, then evaluate on it
    python examples/train_detection.py --detector retinanet --model rest_tiny --overfit 100 --lr 1e-3

After every epoch it writes OUTPUT/last.pth (model, optimizer, scheduler, AMP scaler, epoch,
arguments; --resume continues from it) and evaluates COCO mAP on the validation set (torchmetrics'
MeanAveragePrecision on pycocotools: box mAP, and mask mAP for Mask R-CNN).

Needs the [detection] extra: torchvision, pycocotools, torchmetrics (tqdm for the progress bar).
AMP (--amp): torch.autocast in float16 with a GradScaler on CUDA, bfloat16 on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import rest  # noqa: E402
from rest.models import ResT, variant_config  # noqa: E402

try:
    import pycocotools.mask as mask_utils
    from pycocotools.coco import COCO
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision.io import ImageReadMode, read_image, write_png
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from rest import detection
except ImportError as e:
    sys.exit(f"examples/train_detection.py needs the [detection] extra (torchvision, pycocotools, torchmetrics): {e}")

try:
    from tqdm import tqdm
except ImportError:  # a plain line per logged step instead of a bar
    tqdm = None

DETECTORS = {"retinanet": detection.retinanet_rest, "fasterrcnn": detection.fasterrcnn_rest,
             "maskrcnn": detection.maskrcnn_rest}
CATEGORIES = ("square", "circle", "triangle")  # the synthetic dataset's classes


def _rest_tiny(pretrained=None, **kwargs):
    """A few-hundred-thousand-parameter ResT (rest_lite, narrower and shallower) for quick runs and tests."""
    model = ResT(**{**variant_config("rest_lite"), "embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)}, **kwargs)
    if pretrained is not None:
        rest.load_checkpoint(model, pretrained)
    return model


# another variant name for rest.detection, as any family would add one
detection.register_backbone("rest_tiny", replace(detection.backbone_spec("rest_lite"), build=_rest_tiny))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", default="retinanet", choices=sorted(DETECTORS))
    p.add_argument("--model", default="rest_tiny", help=f"backbone variant: {', '.join(sorted(detection.BACKBONES))}")
    p.add_argument("--layout", default="ours", choices=detection.LAYOUTS, help="stage maps: ours or the official "
                                                                               "detectron2 layout (per-stage norms)")
    p.add_argument("--backbone-weights", default=None, help="classification or detectron2 checkpoint of the backbone")
    p.add_argument("--trainable-backbone-layers", type=int, default=None)
    p.add_argument("--train-images", default=None, help="COCO image folder (default: synthetic data)")
    p.add_argument("--train-ann", default=None, help="COCO instances JSON for --train-images")
    p.add_argument("--val-images", default=None)
    p.add_argument("--val-ann", default=None)
    p.add_argument("--synthetic-train", type=int, default=64, help="images in the synthetic training set")
    p.add_argument("--synthetic-val", type=int, default=16, help="images in the synthetic validation set")
    p.add_argument("--image-size", type=int, default=128, help="synthetic image side; also min/max size when "
                                                               "the data is synthetic")
    p.add_argument("--min-size", type=int, default=None, help="detector's resize (default: 800, or --image-size)")
    p.add_argument("--max-size", type=int, default=None, help="detector's resize (default: 1333, or --image-size)")
    p.add_argument("--fpn-channels", type=int, default=None, help="FPN width (default 256; 64 for rest_tiny)")
    p.add_argument("--head-width", type=int, default=None,
                   help="R-CNN heads of this width (default: torchvision's; 64 for rest_tiny)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW, as the official detection recipe")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--overfit", type=int, default=0, metavar="STEPS",
                   help="train STEPS steps on the first training batch only, then evaluate on that batch")
    p.add_argument("--output", default="runs/detection")
    p.add_argument("--resume", default=None, help="a last.pth written by this script")
    p.add_argument("--backend", default=None, help="rest_kernels backend (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[float]:
    """The outline of a synthetic shape as a COCO polygon [x0, y0, x1, y1, ...]."""
    if kind == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif kind == "circle":
        pts = [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32)) for k in range(32)]
    else:
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [round(v, 2) for p in pts for v in p]


def make_synthetic_coco(root: str, n: int, size: int, seed: int) -> tuple[str, str]:
    """Write n images of size x size with 1-3 coloured shapes on noise, and their COCO instances JSON
    (polygons, boxes, areas); returns (image folder, annotation file). Kept if already there."""
    images_dir, ann_file = os.path.join(root, "images"), os.path.join(root, "instances.json")
    if os.path.exists(ann_file):
        return images_dir, ann_file
    os.makedirs(images_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    images, anns = [], []
    for i in range(n):
        img = (torch.rand(3, size, size, generator=g) * 0.3 + 0.1)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cat = int(torch.randint(len(CATEGORIES), (1,), generator=g))
            r = float(torch.empty(1).uniform_(size / 10, size / 4, generator=g))
            cx, cy = (float(torch.empty(1).uniform_(r, size - r, generator=g)) for _ in range(2))
            poly = _shape_polygon(CATEGORIES[cat], cx, cy, r)
            rle = mask_utils.frPyObjects([poly], size, size)
            mask = torch.from_numpy(mask_utils.decode(rle)[..., 0]).bool()
            colour = torch.rand(3, 1, generator=g) * 0.5 + 0.5
            img[:, mask] = colour  # later shapes cover earlier ones: their masks are what stays visible
            x0, y0, w, h = mask_utils.toBbox(rle)[0].tolist()
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat + 1, segmentation=[poly],
                             area=float(mask_utils.area(rle)[0]), bbox=[x0, y0, w, h], iscrowd=0))
        name = f"{i:06d}.png"
        write_png((img.clamp(0, 1) * 255).to(torch.uint8), os.path.join(images_dir, name))
        images.append(dict(id=i + 1, file_name=name, height=size, width=size))
    coco = dict(images=images, annotations=anns, categories=[dict(id=k + 1, name=c) for k, c in enumerate(CATEGORIES)])
    with open(ann_file + ".tmp", "w") as f:
        json.dump(coco, f)
    os.replace(ann_file + ".tmp", ann_file)
    return images_dir, ann_file


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instances dataset as torchvision's detection models read it: (image (3, H, W) in [0, 1],
    target with boxes (N, 4) x0 y0 x1 y1, labels (N,) in 1..K (the categories in id order), masks
    (N, H, W) uint8, image_id). Crowd and degenerate annotations are left out."""

    def __init__(self, images_dir: str, ann_file: str, masks: bool):
        self.images_dir, self.masks = images_dir, masks
        self.coco = COCO(ann_file)
        self.ids = sorted(self.coco.imgs)
        self.label_of = {cat: k + 1 for k, cat in enumerate(sorted(self.coco.cats))}

    @property
    def num_classes(self) -> int:  # with the background, as torchvision counts
        return len(self.label_of) + 1

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        info = self.coco.imgs[self.ids[i]]
        image = read_image(os.path.join(self.images_dir, info["file_name"]), ImageReadMode.RGB).float() / 255
        anns = [a for a in self.coco.imgToAnns[self.ids[i]] if not a.get("iscrowd", 0) and a["bbox"][2] > 1
                and a["bbox"][3] > 1]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = dict(boxes=boxes, labels=torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                       dtype=torch.int64), image_id=self.ids[i])
        if self.masks:
            h, w = image.shape[-2:]
            target["masks"] = torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in anns]) if anns else \
                torch.zeros(0, h, w, dtype=torch.uint8)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


def make_datasets(args):
    masks = args.detector == "maskrcnn"
    if args.train_images is None:
        root = os.path.join(args.output, "synthetic")
        train = make_synthetic_coco(os.path.join(root, "train"), args.synthetic_train, args.image_size, args.seed)
        val = make_synthetic_coco(os.path.join(root, "val"), args.synthetic_val, args.image_size, args.seed + 1)
    else:
        if not (args.train_ann and args.val_images and args.val_ann):
            sys.exit("--train-images needs --train-ann, --val-images and --val-ann")
        train, val = (args.train_images, args.train_ann), (args.val_images, args.val_ann)
    return CocoDetection(*train, masks), CocoDetection(*val, masks)


# ---------------------------------------------------------------------------- model and training state
def _narrow_heads(detector: str, fpn: int, width: int, num_classes: int) -> dict:
    """R-CNN heads of `width` channels instead of torchvision's (a 1024-wide box MLP, four 256-channel
    mask convolutions): for quick runs, where those heads cost more than the whole tiny backbone."""
    if detector == "retinanet":
        return {}  # its head is as wide as the FPN
    heads = dict(box_head=TwoMLPHead(fpn * 7 * 7, 4 * width), box_predictor=FastRCNNPredictor(4 * width, num_classes))
    if detector == "maskrcnn":
        heads.update(mask_head=MaskRCNNHeads(fpn, [width, width], 1),
                     mask_predictor=MaskRCNNPredictor(width, width, num_classes))
    return heads


def build_model(args, num_classes: int, **detector_kwargs):
    synthetic = args.train_images is None
    min_size = args.min_size or (args.image_size if synthetic else 800)
    max_size = args.max_size or (args.image_size if synthetic else 1333)
    fpn = args.fpn_channels or (64 if args.model == "rest_tiny" else 256)
    width = args.head_width or (64 if args.model == "rest_tiny" else None)
    if width is not None:
        detector_kwargs = {**_narrow_heads(args.detector, fpn, width, num_classes), **detector_kwargs}
    return DETECTORS[args.detector](args.model, num_classes=num_classes, backbone_weights=args.backbone_weights,
                                    trainable_backbone_layers=args.trainable_backbone_layers, layout=args.layout,
                                    out_channels=fpn, min_size=min_size, max_size=max_size,
                                    backbone_kwargs=dict(backend=args.backend), **detector_kwargs)


def save_state(path, model, opt, sched, scaler, epoch, args):
    state = {"model": rest.checkpoint.unwrap_model(model).state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "args": vars(args)}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # never leave a half-written checkpoint behind


def _to(device, images, targets):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def train_step(model, opt, scaler, images, targets, args, amp_dtype):
    with torch.autocast(images[0].device.type, dtype=amp_dtype, enabled=args.amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        sys.exit(f"loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} }), stopping")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(opt)
    scaler.update()
    return loss.item()


@torch.no_grad()
def evaluate(model, batches, device, args, amp_dtype) -> dict[str, float]:
    """COCO mAP (torchmetrics on pycocotools) over `batches`: box mAP and mAP@0.5, and mask mAP for
    Mask R-CNN."""
    segm = args.detector == "maskrcnn"
    metric = MeanAveragePrecision(iou_type=["bbox", "segm"] if segm else "bbox", backend="pycocotools")
    model.eval()
    for images, targets in batches:
        images, targets = _to(device, images, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            preds = model(images)
        preds = [{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in preds]
        if segm:
            for p in preds:
                p["masks"] = p["masks"][:, 0] > 0.5
            targets = [{**t, "masks": t["masks"].bool()} for t in targets]
        metric.update(preds, [{k: t[k] for k in ("boxes", "labels", "masks") if k in t} for t in targets])
    result = metric.compute()
    model.train()
    out = {"bbox_mAP": float(result["bbox_map" if segm else "map"]),
           "bbox_mAP50": float(result["bbox_map_50" if segm else "map_50"])}
    if segm:
        out["segm_mAP"] = float(result["segm_map"])
    return out


def overfit(model, images, targets, args, opt, scaler, amp_dtype):
    """args.overfit steps on one fixed batch at a constant learning rate, then its COCO mAP: a check
    that the model, losses and data fit together. Returns (the losses, the metrics)."""
    losses = []
    bar = _progress(args.overfit, "overfit")
    for step in range(args.overfit):
        losses.append(train_step(model, opt, scaler, images, targets, args, amp_dtype))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
        elif (step + 1) % args.log_every == 0:
            print(f"overfit step {step + 1}/{args.overfit} loss {losses[-1]:.4f}", flush=True)
    if bar is not None:
        bar.close()
    precise_batchnorm(model, [(images, targets)], args, amp_dtype)
    return losses, evaluate(model, [(images, targets)], images[0].device, args, amp_dtype)


@torch.no_grad()
def precise_batchnorm(model, batches, args, amp_dtype):
    """Recompute the running statistics of the model's trainable BatchNorm layers as the plain average
    over `batches` (detectron2's PreciseBN). During training they trail the weights by ~1 / momentum
    steps, which on a fast-moving model (a few steps of overfitting) makes evaluation, which reads
    them, see another network than the one trained. Frozen BatchNorm has nothing to update."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the passes below
    for images, targets in batches:
        with torch.autocast(images[0].device.type, dtype=amp_dtype, enabled=args.amp):
            model(images, targets)  # train mode: batch statistics, as in training
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def _progress(total, desc):
    return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr) if tqdm is not None else None


def main(argv=None):
    """Train (or overfit one batch) and evaluate; returns a dict of the run's losses and metrics."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.output, exist_ok=True)
    train_set, val_set = make_datasets(args)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=not args.overfit,
                                         drop_last=True, collate_fn=collate, num_workers=args.workers, generator=g)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate,
                                             num_workers=args.workers)
    model = build_model(args, train_set.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total = len(loader) * args.epochs
    # one cosine decay over the run (torchvision's and detectron2's recipes use steps; either works here)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)
    model.train()

    if args.overfit:  # one fixed batch, trained on repeatedly, then evaluated
        images, targets = _to(device, *next(iter(loader)))
        losses, metrics = overfit(model, images, targets, args, opt, scaler, amp_dtype)
        print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f}; " +
              " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        return dict(losses=losses, metrics=metrics, model=model)

    epoch = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch = state["epoch"]
        print(f"resumed from {args.resume} at epoch {epoch}", flush=True)
    metrics, losses = {}, []
    while epoch < args.epochs:
        bar = _progress(len(loader), f"epoch {epoch + 1}/{args.epochs}")
        t0 = time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            losses.append(train_step(model, opt, scaler, *_to(device, images, targets), args, amp_dtype))
            sched.step()
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                bar.update()
            elif (step + 1) % args.log_every == 0:
                print(f"epoch {epoch + 1} step {step + 1}/{len(loader)} loss {losses[-1]:.4f}", flush=True)
        if bar is not None:
            bar.close()
        epoch += 1
        save_state(os.path.join(args.output, "last.pth"), model, opt, sched, scaler, epoch, args)
        metrics = evaluate(model, val_loader, device, args, amp_dtype)
        print(f"epoch {epoch}/{args.epochs} loss {losses[-1]:.4f} {time.perf_counter() - t0:.0f}s " +
              " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    print(f"done: {epoch} epochs; training state {os.path.join(args.output, 'last.pth')}")
    return dict(losses=losses, metrics=metrics, model=model)


if __name__ == "__main__":
    main()
