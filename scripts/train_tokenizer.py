"""Train or fine-tune a MedITok tokenizer (stage 1: reconstruction), on CPU or GPU, in one or many processes.

    torchrun --standalone --nproc_per_node=1 -m scripts.train_tokenizer \
        --train-data data/demo/metadata.csv --out-dir runs/tok --config MedITok-Tiny --image-size 64
    bash scripts/train_tokenizer.sh            # the same through the launcher (variables from the environment)

Loss = l1 * |rec - x| + l2 * (rec - x)^2 + vq_weight * VQ loss + entropy_weight * entropy loss
       (+ perceptual_weight * VGG16 perceptual loss when --perceptual-weights is given)
       (+ adaptive or fixed weight * hinge PatchGAN loss after --disc-start steps when --disc-weight > 0).
Images come through datasets.metadata + datasets.image_dataset (the same reading as batch_infer.py);
train rows from --train-data (split --train-split), validation rows from --val-data (split --val-split).

OUT_DIR receives
    tokenizer.pt                the final self-describing checkpoint (save_meditok: config, img_size, weights,
                                EMA weights under "ema"); `batch_infer.py --pretrained_path OUT_DIR/tokenizer.pt`
    checkpoints/step_NNNNNNN.pt full training state (weights, EMA, optimizers, schedule, step, RNG), written
                                atomically every --ckpt-every steps; a rerun with the same OUT_DIR resumes
                                from the newest one exactly where it stopped
    log.txt, tb/                log and tensorboard (losses, val PSNR/SSIM, codebook usage/perplexity, grids)
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.image_dataset import ImageDataset
from datasets.metadata import filter_split, read_metadata
from evaluation.metrics import psnr, ssim
from models.checkpoint import load_checkpoint, load_state_dict_strict, state_dict_to_cpu
from models.distributed import barrier, create_logger, is_dist, setup_distributed
from models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from models.meditok import MEDITOK_CONFIGS, MedITok, build_meditok, save_meditok
from scripts.cli import ArgumentParser

CKPT_PREFIX = "step_"


# ----------------------------------------------------------------------------------------------
# Data: metadata rows -> ImageDataset; augmentation suited to medical images
# ----------------------------------------------------------------------------------------------
def random_ct_window(seed: int, epoch: int, index: int) -> tuple[float, float]:
    """A (level, width) drawn from the item's own generator, so it does not depend on worker or resume."""
    g = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    level = -600.0 + 1200.0 * torch.rand((), generator=g).item()  # from lung to bone levels, HU
    width = math.exp(math.log(80.0) + (math.log(2000.0) - math.log(80.0)) * torch.rand((), generator=g).item())
    return level, width


class CTWindowJitter:
    """read_options hook: a random CT window per item (readers apply it to CT data only, not to 8-bit files)."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def __call__(self, row: dict, index: int) -> dict:
        return {"window": random_ct_window(self.seed, self.epoch, index)}


def make_dataset(meta_path: str, split: str, args, channels: int, read_options=None) -> ImageDataset:
    rows = filter_split(read_metadata(meta_path), split.split(","))
    return ImageDataset(rows, meta_path=meta_path, dataset_dir=args.dataset_dir, image_size=args.image_size,
                        channels=channels, window=args.window, fit=args.fit, read_options=read_options)


def load_all(dataset: ImageDataset, batch_size: int, num_workers: int, progress: bool, desc: str) -> torch.Tensor:
    """Every image of `dataset` as one tensor [N, C, S, S] (for caching and validation)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    return torch.cat([b["image"] for b in tqdm(loader, desc=desc, disable=not progress, leave=False)])


def epoch_batches(n: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's index batches for `epoch`: a seeded permutation, cut into global batches (the last,
    incomplete one dropped), each strided over ranks. Depends only on (seed, epoch): resume needs no state."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
    return [perm[i:i + batch_size][rank::world_size] for i in range(0, n - batch_size + 1, batch_size)]


def batch_stream(train_set: ImageDataset, cache, args, world_size: int, rank: int, step: int,
                 steps_per_epoch: int, jitter, pin_memory: bool):
    """Yield this rank's training batches [b, C, S, S] from global step `step` on, epoch after epoch."""
    while True:
        epoch, first = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_set), args.batch_size, world_size, rank, args.seed, epoch)[first:]
        if cache is not None:
            for ids in batches:
                yield cache[ids]
        else:
            if jitter is not None:
                jitter.epoch = epoch  # set before the workers start: they receive a copy
            loader = DataLoader(train_set, batch_sampler=batches, num_workers=args.num_workers, pin_memory=pin_memory)
            for batch in loader:
                yield batch["image"]
        step += len(batches)


def augment(x: torch.Tensor, args, seed: int, step: int, rank: int) -> torch.Tensor:
    """Train-time augmentation on a batch [B, C, S, S]. Only left-right flips, and only on request:
    laterality matters in medical images (a flipped chest X-ray shows dextrocardia)."""
    if args.hflip <= 0:
        return x
    g = torch.Generator().manual_seed((seed * 1000003 + step) * 1009 + rank)
    flip = (torch.rand(x.shape[0], generator=g) < args.hflip).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# Model pieces: schedule, EMA, gradient checkpointing, adaptive GAN weight, dead codes
# ----------------------------------------------------------------------------------------------
def lr_at(step: int, lr: float, total_steps: int, warmup_steps: int, end_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `end_ratio * lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    # Warm-up of the decay ((1 + t) / (10 + t)): short CPU runs average recent weights, not the random init.
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class CheckpointedSequential(nn.Sequential):
    """nn.Sequential that recomputes each block's activations in backward (same child names, same keys)."""

    def forward(self, x):
        for block in self:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.training else block(x)
        return x


def enable_grad_checkpointing(model: MedITok) -> None:
    model.encoder.set_grad_checkpointing(True)  # timm's own switch for the encoder's ViT blocks
    model.decoder.blocks = CheckpointedSequential(*model.decoder.blocks)


def last_decoder_layer(model: MedITok) -> torch.Tensor:
    # The output convolution (to image channels) is the last Conv2d the decoder registers.
    return [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)][-1].weight


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||d rec / d last layer|| / ||d gan / d last layer||, so neither term dominates."""
    rec_grad = torch.autograd.grad(rec_loss, layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def restart_dead_codes(model: MedITok, x: torch.Tensor, threshold: float, seed: int, step: int) -> int:
    """Re-seed codes whose running frequency (`vocab_usage`) is below `threshold` times the uniform share
    with encoder features of the batch `x`; returns how many codes were restarted (over all codebooks).
    Rank 0 decides and broadcasts, so every process keeps identical codebooks."""
    was_training = model.training
    model.eval()
    latent = model._latent(x).flatten(0, 1)  # [B*L, vocab_width]
    model.train(was_training)
    g = torch.Generator().manual_seed(seed * 7919 + step)
    restarted = 0
    for cb, chunk in zip(model.quantizer.codebooks, latent.split(model.quantizer.chunk, dim=-1)):
        dead = cb.vocab_usage < threshold / cb.size  # [size]
        n = int(dead.sum())
        if n:
            pick = torch.randint(chunk.shape[0], (n,), generator=g).to(chunk.device)
            feats = F.normalize(chunk[pick].float(), dim=-1)
            noise = 0.01 * torch.randn(feats.shape, generator=g).to(feats.device)
            cb.codebook.weight[dead] = (feats + noise).to(cb.codebook.weight.dtype)
            cb.vocab_usage[dead] = 1.0 / cb.size  # give them time to be picked before the next check
            restarted += n
        if is_dist():
            dist.broadcast(cb.codebook.weight.data, 0)
            dist.broadcast(cb.vocab_usage, 0)
    if is_dist():
        t = torch.tensor(restarted, device=latent.device)
        dist.broadcast(t, 0)
        restarted = int(t)
    return restarted


# ----------------------------------------------------------------------------------------------
# Validation: PSNR / SSIM (evaluation.metrics), code usage and perplexity, a reconstruction grid
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MedITok, images: torch.Tensor, args, device, autocast) -> tuple[dict, torch.Tensor]:
    """Metrics over `images` [N, C, S, S] in [-1, 1] and the reconstructions of the first few."""
    was_training = model.training
    model.eval()
    K, V = model.num_codebooks, model.codebook_size
    counts = torch.zeros(K, V, device=device)
    psnrs, ssims, first = [], [], None
    for i in range(0, len(images), args.batch_size):
        x = images[i:i + args.batch_size].to(device)
        with autocast():
            idx = model.img_to_idx(x)  # [b, K, L]
            rec = model.idx_to_img(idx).float()  # [b, C, S, S] in [-1, 1]
        psnrs.append(psnr(rec, x, (-1, 1)))  # [b]
        ssims.append(ssim(rec, x, (-1, 1)))  # [b]
        for k in range(K):
            counts[k] += idx[:, k].flatten().bincount(minlength=V).float()
        first = rec[: args.grid_images].cpu() if first is None else first
    model.train(was_training)
    prob = counts / counts.sum(1, keepdim=True)
    entropy = -(prob * prob.clamp_min(1e-12).log()).sum(1)  # [K]
    metrics = {
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "usage": (counts > 0).float().mean(1).cpu(),  # [K] fraction of each codebook used on val
        "perplexity": entropy.exp().cpu(),  # [K]
    }
    return metrics, first


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Training checkpoints in `ckpt_dir`, oldest first (the step is in the name)."""
    return sorted(ckpt_dir.glob(f"{CKPT_PREFIX}*.pt"))


def save_training_state(path: Path, raw: MedITok, ema, disc, opt, disc_opt, state: dict, args) -> None:
    extra = {
        "optimizer": opt.state_dict(),
        "scheduler": {"total_steps": state["total_steps"], "warmup_steps": args.warmup_steps,
                      "lr": args.lr, "end_ratio": args.end_lr_ratio},
        "step": state["step"],
        "elapsed_s": state["elapsed_s"],
        # Not in the state dict: how many usage updates each codebook has seen (sets their momentum).
        "usage_updates": [cb.usage_updates for cb in raw.quantizer.codebooks],
        "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
        "args": vars(args),
    }
    if ema is not None:
        extra["ema"] = state_dict_to_cpu(ema)
    if disc is not None:
        extra["disc"] = state_dict_to_cpu(disc)
        extra["disc_optimizer"] = disc_opt.state_dict()
    save_meditok(raw, path, extra)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for p in checkpoint_files(ckpt_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args):
    t_start = time.time()
    rank, world_size, device = setup_distributed()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {world_size} processes")
    out_dir, ckpt_dir = Path(args.out_dir), Path(args.out_dir) / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    logger = create_logger("train_tokenizer", out_dir, rank)
    progress = rank == 0 and not args.no_progress
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    logger.info(f"args: {vars(args)}")
    logger.info(f"world_size={world_size}, device={device}, bf16={use_bf16}")

    # ---- model: resume (OUT_DIR) > fine-tune (--init-ckpt) > from scratch (--config) ----
    resume = checkpoint_files(ckpt_dir)[-1] if checkpoint_files(ckpt_dir) else None
    overrides = {"use_entropy_loss": args.entropy_weight > 0}
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model = build_meditok(resume, prefer_ema=False, device=device, **overrides)
        logger.info(f"resuming from {resume} (step {ckpt['step']})")
    elif args.init_ckpt:
        ckpt = None
        model = build_meditok(args.init_ckpt, img_size=args.image_size, device=device, **overrides)
        logger.info(f"fine-tuning from {args.init_ckpt} (config {model.config})")
    else:
        ckpt = None
        model = build_meditok(model_name=args.config, img_size=args.image_size, device=device, **overrides)
    if model.img_size != args.image_size:
        raise ValueError(f"the model in {resume or args.init_ckpt} is built for {model.img_size} px, "
                         f"but --image-size is {args.image_size}")
    model.train()
    # Stage 1 trains reconstruction only: the alignment head (used by encode_image) keeps its weights,
    # and DDP must not wait for gradients that never come.
    for frozen in (model.fc_norm, model.projection):
        frozen.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"MedITok: {n_params / 1e6:.2f}M parameters, grid {model.grid_size}x{model.grid_size}, "
                f"{model.num_codebooks} codebooks x {model.codebook_size} codes")
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema_decay > 0 else None
    disc = PatchDiscriminator(model.in_chans, args.disc_width, args.disc_layers).to(device) if args.disc_weight > 0 else None
    perceptual = None
    if args.perceptual_weights:
        from models.losses import PerceptualLoss

        perceptual = PerceptualLoss(args.perceptual_weights).to(device)

    # Matrices get weight decay; norms, biases and codebooks do not.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "codebook" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "codebook" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                            betas=(args.beta1, args.beta2), eps=1e-8)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9),
                                 weight_decay=args.weight_decay) if disc is not None else None

    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        if ema is not None and "ema" in ckpt:
            load_state_dict_strict(ema, ckpt["ema"], context=f"{resume} [ema]")
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None:
            if "disc" not in ckpt:
                raise ValueError(f"{resume} has no discriminator state but --disc-weight > 0")
            load_state_dict_strict(disc, ckpt["disc"], context=f"{resume} [disc]")
            disc_opt.load_state_dict(ckpt["disc_optimizer"])
        for cb, n in zip(model.quantizer.codebooks, ckpt["usage_updates"]):
            cb.usage_updates = n
        step, elapsed_before = int(ckpt["step"]), float(ckpt["elapsed_s"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    raw = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if disc is not None else None
    raw_disc = disc.module if isinstance(disc, DDP) else disc

    # ---- data ----
    jitter = CTWindowJitter(args.seed) if args.random_ct_window else None
    model_channels = raw.in_chans
    train_set = make_dataset(args.train_data, args.train_split, args, model_channels, jitter)
    if len(train_set) < args.batch_size:
        raise ValueError(f"{args.train_data}: {len(train_set)} rows of split '{args.train_split}', "
                         f"fewer than one batch of {args.batch_size}")
    val_set = make_dataset(args.val_data or args.train_data, args.val_split, args, model_channels)
    if len(val_set) > args.val_max_images:
        val_set.rows = val_set.rows[:: math.ceil(len(val_set) / args.val_max_images)]
    val_images = load_all(val_set, args.batch_size, args.num_workers, progress, "val images") if len(val_set) else None
    logger.info(f"{len(train_set)} train images ({args.train_split}), {len(val_set)} val images ({args.val_split})")
    if val_images is None:
        logger.warning("no validation rows: PSNR/SSIM are not measured")
    item_bytes = model_channels * args.image_size ** 2 * 4
    cache = None
    if jitter is None and len(train_set) * item_bytes <= args.cache_gb * 2 ** 30:
        # Small sets (the quickstart's): decode once; every epoch then costs no reading at all.
        cache = load_all(train_set, args.batch_size, args.num_workers, progress, "caching train images")
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    if ckpt is not None:
        total_steps = int(ckpt["scheduler"]["total_steps"])  # the schedule the run was started with

    writer = None
    if rank == 0 and not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    last_layer = last_decoder_layer(raw)
    budget_s = args.max_minutes * 60 if args.max_minutes else None
    t_run, step_run = time.time(), step  # for the speed estimate of this process
    stop_at = min(total_steps, args.stop_at_step or total_steps)

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    def log_eval(step: int):
        if val_images is None:
            return None
        results = {}
        for name, m in [("model", raw)] + ([("ema", ema)] if ema is not None else []):
            metrics, grid = evaluate(m, val_images, args, device, autocast)
            results[name] = metrics
            if writer is not None:
                writer.add_scalar(f"val/psnr_{name}", metrics["psnr"], step)
                writer.add_scalar(f"val/ssim_{name}", metrics["ssim"], step)
                for k in range(len(metrics["usage"])):
                    writer.add_scalar(f"codebook_usage/{name}_{k}", metrics["usage"][k], step)
                    writer.add_scalar(f"codebook_perplexity/{name}_{k}", metrics["perplexity"][k], step)
                from torchvision.utils import make_grid

                pair = torch.cat([val_images[: len(grid)], grid])  # originals above reconstructions
                writer.add_image(f"val/reconstructions_{name}", make_grid((pair + 1) / 2, nrow=len(grid)), step)
            logger.info(f"step {step}: val[{name}] PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                        f"usage {metrics['usage'].mean():.3f}, perplexity {metrics['perplexity'].mean():.1f}")
        return results

    # ---- loop ----
    logger.info(f"training steps {step} -> {stop_at} (schedule {total_steps} steps, {steps_per_epoch} per epoch)"
                + (f", at most {args.max_minutes} min" if budget_s else ""))
    bar = tqdm(total=stop_at, initial=step, disable=not progress, desc="train")
    stream = batch_stream(train_set, cache, args, world_size, rank, step, steps_per_epoch, jitter,
                          pin_memory=device.type == "cuda")
    while step < stop_at:
        if budget_s is not None and elapsed() >= budget_s - args.reserve_s:
            logger.info(f"--max-minutes {args.max_minutes} reached at step {step}")
            break
        x = augment(next(stream).to(device, non_blocking=True), args, args.seed, step, rank)
        lr = lr_at(step, args.lr, total_steps, args.warmup_steps, args.end_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr

        # Tokenizer step.
        gan_on = disc is not None and step >= args.disc_start
        with autocast():
            out = model(x)
            rec = out["rec"].float()
            l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
            rec_loss = args.l1 * l1 + args.l2 * l2
            if perceptual is not None:
                rec_loss = rec_loss + args.perceptual_weight * perceptual(rec, x)
            loss = rec_loss + args.vq_weight * out["vq_loss"] + args.entropy_weight * out["entropy_loss"]
            g_loss, gan_w = torch.zeros((), device=device), torch.zeros((), device=device)
            if gan_on:
                # The unwrapped discriminator, frozen: its DDP wrapper runs once per step, in the D step.
                raw_disc.requires_grad_(False)
                g_loss = hinge_g_loss(raw_disc(rec))
                raw_disc.requires_grad_(True)
                gan_w = args.disc_weight * (adaptive_gan_weight(rec_loss, g_loss, last_layer)
                                            if args.disc_adaptive else 1.0)
                loss = loss + gan_w * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        if ema is not None:
            update_ema(ema, raw, args.ema_decay, step)

        # Discriminator step (on the detached reconstructions).
        d_loss = torch.zeros((), device=device)
        if gan_on:
            disc_opt.param_groups[0]["lr"] = lr_at(step, args.disc_lr, total_steps, args.warmup_steps, args.end_lr_ratio)
            with autocast():
                logits = disc(torch.cat([x, rec.detach()]))  # one forward: real and fake halves
                d_loss = hinge_d_loss(logits[: len(x)], logits[len(x):])
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        bar.update(1)

        restarted = 0
        if args.dead_code_every and step % args.dead_code_every == 0:
            restarted = restart_dead_codes(raw, x, args.dead_code_threshold, args.seed, step)
        if step % args.log_every == 0 or step == stop_at:
            speed = (step - step_run) / max(time.time() - t_run, 1e-9)
            msg = (f"step {step}/{total_steps} loss {loss.item():.4f} l1 {l1.item():.4f} l2 {l2.item():.4f} "
                   f"vq {out['vq_loss'].item():.4f} usage {out['usage'].mean().item():.3f} lr {lr:.2e} "
                   f"grad {grad_norm.item():.2f} {speed:.2f} steps/s")
            if gan_on:
                msg += f" g {g_loss.item():.4f} d {d_loss.item():.4f} w {float(gan_w):.3f}"
            if restarted:
                msg += f" restarted {restarted} codes"
            logger.info(msg)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if writer is not None:
                for name, value in [("loss", loss), ("l1", l1), ("l2", l2), ("vq", out["vq_loss"]),
                                    ("entropy", out["entropy_loss"]), ("g", g_loss), ("d", d_loss),
                                    ("gan_weight", gan_w), ("grad_norm", grad_norm)]:
                    writer.add_scalar(f"train/{name}", float(torch.as_tensor(value).detach()), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/steps_per_s", speed, step)
                for k, u in enumerate(out["usage"].tolist()):
                    writer.add_scalar(f"train/batch_usage_{k}", u, step)
        if args.eval_every and step % args.eval_every == 0 and step < stop_at:
            log_eval(step)
        if budget_s is not None and step - step_run >= args.calibration_steps and step % args.calibration_steps == 0:
            # Fit the cosine schedule into the time budget, from the speed measured so far (evaluations
            # included); re-checked every --calibration-steps since a shared machine's speed changes.
            per_step = (time.time() - t_run) / (step - step_run)
            fit = step + int((budget_s - elapsed() - args.reserve_s) / per_step)
            if fit < total_steps:
                total_steps = max(step + 1, fit)
                stop_at = min(stop_at, total_steps)
                bar.total = stop_at
                logger.info(f"--max-minutes: {per_step:.2f} s/step, schedule shortened to {total_steps} steps")
        if args.ckpt_every and step % args.ckpt_every == 0 and step < stop_at and rank == 0:
            save_training_state(ckpt_dir / f"{CKPT_PREFIX}{step:07d}.pt", raw, ema, raw_disc, opt, disc_opt,
                                {"step": step, "total_steps": total_steps, "elapsed_s": elapsed()}, args)
            prune_checkpoints(ckpt_dir, args.keep_checkpoints)
    bar.close()

    # ---- the end: full training state, final evaluation, tokenizer.pt ----
    results = log_eval(step)
    if rank == 0:
        state = {"step": step, "total_steps": total_steps, "elapsed_s": elapsed()}
        save_training_state(ckpt_dir / f"{CKPT_PREFIX}{step:07d}.pt", raw, ema, raw_disc, opt, disc_opt, state, args)
        prune_checkpoints(ckpt_dir, args.keep_checkpoints)
        summary = {name: {"psnr": r["psnr"], "ssim": r["ssim"], "usage": r["usage"].tolist(),
                          "perplexity": r["perplexity"].tolist()} for name, r in (results or {}).items()}
        extra = {"step": step, "args": vars(args), "val": summary}
        if ema is not None:
            extra["ema"] = state_dict_to_cpu(ema)  # build_meditok prefers these weights
        save_meditok(raw, out_dir / "tokenizer.pt", extra)
        logger.info(f"wrote {out_dir / 'tokenizer.pt'} after {step} steps, {elapsed() / 60:.1f} min")
    if writer is not None:
        writer.close()
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
    return results


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train or fine-tune a MedITok tokenizer (stage 1: reconstruction).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--train-data", required=True, help="metadata file (.csv/.jsonl/.json) of training images")
    data.add_argument("--train-split", default="train", help="split(s) of --train-data to train on, comma-separated")
    data.add_argument("--val-data", default=None, help="metadata file of validation images (default: --train-data)")
    data.add_argument("--val-split", default="val", help="split(s) of --val-data to validate on, comma-separated")
    data.add_argument("--val-max-images", type=int, default=512, help="validate on at most this many images (evenly spaced)")
    data.add_argument("--dataset-dir", default=None, help="folder that relative identifiers resolve against")
    data.add_argument("--image-size", type=int, default=256, help="side of the square training images in pixels")
    data.add_argument("--window", default=None, help="CT window for CT sources: preset or 'level,width' (rows may override)")
    data.add_argument("--fit", default="pad", choices=("pad", "crop", "stretch"), help="how non-square images become square")
    data.add_argument("--hflip", type=float, default=0.0,
                      help="probability of a left-right flip; 0 by default because laterality matters")
    data.add_argument("--random-ct-window", action="store_true",
                      help="a random CT window per item (level -600..600 HU, width 80..2000) for 16-bit CT sources")
    data.add_argument("--cache-gb", type=float, default=2.0,
                      help="decode the train set once into memory when it fits in this many GiB (0: never)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes reading images")
    model = p.add_argument_group("model")
    model.add_argument("--config", default="MedITok-Tiny", choices=list(MEDITOK_CONFIGS),
                       help="architecture when training from scratch (ignored with --init-ckpt or when resuming)")
    model.add_argument("--init-ckpt", default=None,
                       help="fine-tune from these weights (ours or the released meditok_simple_v1.pth)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute ViT activations in backward (large configs)")
    model.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPU (CPU runs fp32)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    optim.add_argument("--epochs", type=int, default=10, help="epochs (sets the schedule length unless --max-steps)")
    optim.add_argument("--max-steps", type=int, default=0, help="schedule length in steps (0: from --epochs)")
    optim.add_argument("--max-minutes", type=float, default=0.0,
                       help="wall-time budget: the schedule is shortened to fit it and training stops in time (0: none)")
    optim.add_argument("--calibration-steps", type=int, default=20,
                       help="with --max-minutes: shorten the schedule to fit the budget every N steps, from the measured speed")
    optim.add_argument("--reserve-s", type=float, default=15.0, help="seconds of --max-minutes kept for the final evaluation and saving")
    optim.add_argument("--stop-at-step", type=int, default=0,
                       help="stop (and save) at this step without changing the schedule; rerun to resume (0: off)")
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--end-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (cosine)")
    optim.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    optim.add_argument("--weight-decay", type=float, default=0.02, help="AdamW weight decay on matrices")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    optim.add_argument("--grad-clip", type=float, default=10.0, help="gradient-norm clipping (<= 0: off)")
    optim.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (0: no EMA)")
    optim.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    loss = p.add_argument_group("losses")
    loss.add_argument("--l1", type=float, default=0.2, help="weight of the L1 reconstruction loss")
    loss.add_argument("--l2", type=float, default=1.0, help="weight of the L2 reconstruction loss")
    loss.add_argument("--vq-weight", type=float, default=1.0, help="weight of the VQ codebook/commitment loss")
    loss.add_argument("--entropy-weight", type=float, default=0.0, help="weight of the codebook entropy loss (0: off)")
    loss.add_argument("--perceptual-weights", default=None,
                      help="torchvision VGG16 state dict (optionally with LPIPS lin weights) for the perceptual loss")
    loss.add_argument("--perceptual-weight", type=float, default=1.0, help="weight of the perceptual loss")
    loss.add_argument("--disc-weight", type=float, default=0.0, help="weight of the PatchGAN hinge loss (0: no GAN)")
    loss.add_argument("--disc-start", type=int, default=2000, help="step at which the GAN loss starts")
    loss.add_argument("--disc-adaptive", action=argparse.BooleanOptionalAction, default=True,
                      help="scale the GAN loss by the VQGAN adaptive weight (else the fixed --disc-weight)")
    loss.add_argument("--disc-lr", type=float, default=2e-5, help="discriminator learning rate")
    loss.add_argument("--disc-width", type=int, default=64, help="discriminator width of the first layer")
    loss.add_argument("--disc-layers", type=int, default=3, help="discriminator strided layers")
    loss.add_argument("--dead-code-every", type=int, default=0,
                      help="every N steps re-seed rarely used codes with batch features (0: off)")
    loss.add_argument("--dead-code-threshold", type=float, default=0.03,
                      help="a code is dead below this fraction of its uniform share of the running usage")
    logs = p.add_argument_group("output and logging")
    logs.add_argument("--out-dir", required=True, help="output folder: tokenizer.pt, checkpoints/, log.txt, tb/")
    logs.add_argument("--log-every", type=int, default=20, help="log losses every N steps")
    logs.add_argument("--eval-every", type=int, default=500, help="validate every N steps (0: only at the end)")
    logs.add_argument("--grid-images", type=int, default=8, help="validation images in the tensorboard grid")
    logs.add_argument("--ckpt-every", type=int, default=1000, help="write a training checkpoint every N steps (0: only at the end)")
    logs.add_argument("--keep-checkpoints", type=int, default=2, help="training checkpoints kept in OUT_DIR/checkpoints (0: all)")
    logs.add_argument("--no-tensorboard", action="store_true", help="do not write tensorboard logs")
    logs.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
