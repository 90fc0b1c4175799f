"""Train or fine-tune a MedITok tokenizer (stage 1: reconstruction), on CPU or GPU, in one or many processes.

    torchrun --standalone --nproc_per_node=1 -m scripts.train_tokenizer \
        --train-data data/demo/metadata.csv --out-dir runs/tok --config MedITok-Tiny --image-size 64 --max-steps 1000
    bash scripts/train_tokenizer.sh            # the same through the launcher (variables from the environment)

Loss = l1 * |rec - x| + l2 * (rec - x)^2 + vq_weight * VQ loss + entropy_weight * entropy loss
       (+ perceptual_weight * VGG16 perceptual loss when --perceptual-weights is given)
       (+ adaptive or fixed weight * hinge PatchGAN loss after --disc-start steps when --disc-weight > 0).
Images come through datasets.metadata + datasets.image_dataset (the same reading as batch_infer.py);
train rows from --train-data (split --train-split), validation rows from --val-data (split --val-split).

How much is learned is a fixed amount of work: --max-steps (or --epochs), a seeded data order and seeded
augmentation, so the same command gives the same tokenizer on any machine. --max-minutes is only a safety
stop (off by default): it saves and stops without changing the schedule, and a rerun continues.

OUT_DIR receives
    tokenizer.pt                the final self-describing checkpoint (save_meditok: config, img_size, weights,
                                EMA weights under "ema"); `batch_infer.py --pretrained_path OUT_DIR/tokenizer.pt`
    model.safetensors           the same model's weights only (EMA when trained with it) + config, no pickle
    checkpoints/step_NNNNNNN.pt full training state (weights, EMA, optimizers, schedule, step, data order, every
                                rank's RNG), written atomically every --ckpt-every steps; a rerun with the same
                                OUT_DIR resumes from the newest readable one exactly where it stopped
    checkpoints/step_NNNNNNN/   the same with --data-parallel fsdp/hsdp: a sharded folder (models/parallel.py)
                                that resumes on any number of processes
    log.txt, tb/                log and tensorboard (losses, val PSNR/SSIM, codebook usage/perplexity, grids)
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

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
from models.export import export as export_safetensors
from models.meditok import MEDITOK_CONFIGS, MedITok, MedITokConfig, build_meditok, save_meditok
from models.meditok_blocks import InvMbConvBlock
from models.parallel import (DATA_PARALLEL, TRAIN_STATE, device_mesh, full_state_dict, gathered, is_sharded,
                             load_full_optimizer_state, load_full_state_dict, load_sharded, prune_sharded, save_sharded,
                             sharded_checkpoints, wrap_model)
from models.tracking import Tracker, add_tracking_args
from models.training import (LRSchedule, StepBatchSampler, autocast_context, data_position, ema_decay_at,
                             gather_rng_states, load_newest_checkpoint, numbered_checkpoints, prune_checkpoints,
                             restore_rng_states, seed_process, set_lr, update_ema)
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


def train_batches(train_set: ImageDataset, cache: Optional[torch.Tensor], sampler: StepBatchSampler, epoch: int,
                  first: int, num_workers: int, jitter: Optional[CTWindowJitter], pin_memory: bool) -> Iterator[torch.Tensor]:
    """This rank's training batches [b, C, S, S] from step `first` of `epoch` on, epoch after epoch. The order
    is the sampler's (seeded per epoch), so a resumed run sees what an uninterrupted one would have."""
    while True:
        sampler.set_epoch(epoch, first)
        if cache is not None:
            for ids in sampler:
                yield cache[ids]
        else:
            if jitter is not None:
                jitter.epoch = epoch  # set before the workers start: they receive a copy
            loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
            for batch in loader:
                yield batch["image"]
        epoch, first = epoch + 1, 0


def augment(x: torch.Tensor, args, seed: int, step: int, rank: int) -> torch.Tensor:
    """Train-time augmentation on a batch [B, C, S, S]. Only left-right flips, and only on request:
    laterality matters in medical images (a flipped chest X-ray shows dextrocardia)."""
    if args.hflip <= 0:
        return x
    g = torch.Generator().manual_seed((seed * 1000003 + step) * 1009 + rank)
    flip = (torch.rand(x.shape[0], generator=g) < args.hflip).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# Model pieces: gradient checkpointing, adaptive GAN weight, dead codes
# ----------------------------------------------------------------------------------------------
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


def shard_units(model: MedITok) -> tuple[type, ...]:
    """What fsdp/hsdp shard one at a time: timm's ViT blocks (encoder and decoder) and the decoder's
    conv blocks; the stems, projections, quantizer and output conv stay in the root group."""
    return tuple({type(b) for b in model.encoder.blocks} | {InvMbConvBlock})


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
# Validation: PSNR / SSIM (torchmetrics), code usage and perplexity, a reconstruction grid
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MedITok, images: torch.Tensor, args, device) -> tuple[dict, torch.Tensor]:
    """Metrics over `images` [N, C, S, S] in [-1, 1] and the reconstructions of the first few."""
    was_training = model.training
    model.eval()
    K, V = model.num_codebooks, model.codebook_size
    counts = torch.zeros(K, V, device=device)
    psnrs, ssims, first = [], [], None
    for i in range(0, len(images), args.batch_size):
        x = images[i:i + args.batch_size].to(device)
        with autocast_context(device, args.precision):
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
# Build or resume: tokenizer, EMA, discriminator, perceptual loss, optimizers, RNG
# ----------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a training step updates. `model` and `disc` are what the step calls (DDP-wrapped with several
    processes); `raw` and `raw_disc` are the plain modules that checkpoints are written from."""
    raw: MedITok
    model: nn.Module
    ema: Optional[MedITok]
    raw_disc: Optional[PatchDiscriminator]
    disc: Optional[nn.Module]
    opt: torch.optim.Optimizer
    disc_opt: Optional[torch.optim.Optimizer]
    perceptual: Optional[nn.Module]


def is_training_state(ckpt) -> bool:
    return isinstance(ckpt, dict) and "optimizer" in ckpt and "step" in ckpt


def build_tokenizer(args, device: torch.device, resume: Optional[Path], logger) -> MedITok:
    """The tokenizer to train: resumed (OUT_DIR's checkpoint) > fine-tuned (--init-ckpt) > new (--config)."""
    overrides = {"use_entropy_loss": args.entropy_weight > 0}
    if resume is not None and resume.is_dir():  # a sharded training state: its config now, its weights once sharded
        state = load_checkpoint(resume / TRAIN_STATE)
        with torch.device(device):
            model = MedITok(replace(MedITokConfig(**state["config"]), **overrides), int(state["img_size"]))
    elif resume is not None:
        model = build_meditok(resume, prefer_ema=False, device=device, **overrides)
    elif args.init_ckpt:
        model = build_meditok(args.init_ckpt, img_size=args.image_size, device=device, **overrides)
        logger.info(f"fine-tuning from {args.init_ckpt} (config {model.config})")
    else:
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
    logger.info(f"MedITok: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, grid "
                f"{model.grid_size}x{model.grid_size}, {model.num_codebooks} codebooks x {model.codebook_size} codes")
    return model


def build_optimizers(args, model: MedITok, disc: Optional[nn.Module]):
    # Matrices get weight decay; norms, biases and codebooks do not. The fused AdamW kernel: one pass
    # over all tensors instead of one per tensor (several times faster on a CPU).
    def decays(name, p):
        return p.dim() >= 2 and "codebook" not in name

    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in trained if decays(n, p)], "weight_decay": args.weight_decay},
                             {"params": [p for n, p in trained if not decays(n, p)], "weight_decay": 0.0}],
                            lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=True)
    disc_opt = None
    if disc is not None:
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), weight_decay=args.weight_decay,
                                     fused=True)
    return opt, disc_opt


def restore(ckpt: dict, path: Path, raw: MedITok, ema, raw_disc, opt, disc_opt, rank: int, world_size: int,
            device: torch.device, logger) -> int:
    """Load the training state of `ckpt` into the (wrapped or sharded) parts; returns its step. A file's
    weights are already in `raw`; a sharded folder's weights, EMA and optimizer state are read here."""
    if path.is_dir():
        load_sharded(path, raw, opt, ema)
    else:
        if ema is not None and "ema" in ckpt:
            load_full_state_dict(ema, ckpt["ema"], context=f"{path} [ema]")
        load_full_optimizer_state(raw, opt, ckpt["optimizer"])
    if raw_disc is not None:
        if "disc" not in ckpt:
            raise ValueError(f"{path} has no discriminator state but --disc-weight > 0")
        load_state_dict_strict(raw_disc, ckpt["disc"], context=f"{path} [disc]")
        disc_opt.load_state_dict(ckpt["disc_optimizer"])
    for cb, n in zip(raw.quantizer.codebooks, ckpt["usage_updates"]):
        cb.usage_updates = n
    restore_rng_states(ckpt.get("rng"), rank, world_size, device, logger, str(path))
    logger.info(f"resuming from {path} (step {ckpt['step']})")
    return int(ckpt["step"])


def build_or_resume(args, device: torch.device, ckpt_dir: Path, world_size: int, rank: int,
                    logger) -> tuple[Parts, int, Optional[dict]]:
    """(parts, step to start at, the checkpoint resumed from or None). A rerun with the same OUT_DIR resumes
    from its newest readable checkpoint (a truncated newer one is skipped and named in the log)."""
    resume, ckpt = load_newest_checkpoint(numbered_checkpoints(ckpt_dir, CKPT_PREFIX), logger, is_training_state)
    sharded = sharded_checkpoints(ckpt_dir, CKPT_PREFIX)  # written by --data-parallel fsdp/hsdp runs
    if sharded and (ckpt is None or sharded[-1][0] >= int(ckpt["step"])):
        resume = sharded[-1][1]
        ckpt = load_checkpoint(resume / TRAIN_STATE)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = build_tokenizer(args, device, resume, logger)
    ema = copy.deepcopy(raw).eval().requires_grad_(False) if args.ema_decay > 0 else None
    raw_disc = None
    if args.disc_weight > 0:
        raw_disc = PatchDiscriminator(raw.in_chans, args.disc_width, args.disc_layers).to(device)
    perceptual = None
    if args.perceptual_weights:
        from models.losses import PerceptualLoss

        perceptual = PerceptualLoss(args.perceptual_weights).to(device)
    # ddp: DDP(raw); fsdp/hsdp: raw and the EMA sharded in place per ViT block and decoder conv block
    # (models/parallel.py). The optimizer is built on what training updates (shards), then restored.
    model = wrap_model(raw, args.data_parallel, device, shard_units(raw), mesh=device_mesh(args.data_parallel, device),
                       precision=args.precision, ema=ema)
    opt, disc_opt = build_optimizers(args, raw, raw_disc)
    seed_process(args.seed, world_size, rank)  # each rank its own stream from here on
    step = 0
    if ckpt is not None:
        step = restore(ckpt, resume, raw, ema, raw_disc, opt, disc_opt, rank, world_size, device, logger)
    disc = raw_disc
    if world_size > 1 and raw_disc is not None:  # small: plain DDP in every mode
        disc = DDP(raw_disc, device_ids=[device.index] if device.type == "cuda" else None)
    parts = Parts(raw, model, ema, raw_disc, disc, opt, disc_opt, perceptual)
    return parts, step, ckpt


def save_training_state(path: Path, parts: Parts, schedule: LRSchedule, sampler: StepBatchSampler, step: int,
                        args, device: torch.device, rank: int) -> None:
    """Every rank's RNG state is gathered (all ranks call this), rank 0 writes the file atomically.
    Sharded (fsdp/hsdp): every rank writes its shards into the folder `path` without its suffix."""
    rng = gather_rng_states(device)
    sharded = is_sharded(parts.raw)
    if rank != 0 and not sharded:
        return
    extra = {
        "scheduler": schedule.state_dict(),
        "step": step,
        "data": sampler.state_dict(),
        # Not in the state dict: how many usage updates each codebook has seen (sets their momentum).
        "usage_updates": [cb.usage_updates for cb in parts.raw.quantizer.codebooks],
        "rng": rng,
        "args": vars(args),
    }
    if parts.raw_disc is not None:  # the discriminator is never sharded
        extra["disc"] = state_dict_to_cpu(parts.raw_disc)
        extra["disc_optimizer"] = parts.disc_opt.state_dict()
    if sharded:
        extra.update(kind="meditok", config=asdict(parts.raw.config), img_size=int(parts.raw.img_size))
        save_sharded(path.with_suffix(""), parts.raw, parts.opt, parts.ema, extra)
        if rank == 0:
            prune_sharded(path.parent, args.keep_last, CKPT_PREFIX)
        return
    extra["optimizer"] = parts.opt.state_dict()
    if parts.ema is not None:
        extra["ema"] = state_dict_to_cpu(parts.ema)
    save_meditok(parts.raw, path, extra)
    prune_checkpoints(path.parent, args.keep_last, CKPT_PREFIX)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class Data:
    train_set: ImageDataset
    sampler: StepBatchSampler  # this rank's share of each global batch, seeded per epoch
    cache: Optional[torch.Tensor]  # [N, C, S, S] the decoded train set, when it fits in --cache-gb
    jitter: Optional[CTWindowJitter]
    val_images: Optional[torch.Tensor]  # [M, C, S, S]


def load_data(args, channels: int, world_size: int, rank: int, logger, progress: bool) -> Data:
    jitter = CTWindowJitter(args.seed) if args.random_ct_window else None
    train_set = make_dataset(args.train_data, args.train_split, args, channels, jitter)
    if len(train_set) < args.batch_size:
        raise ValueError(f"{args.train_data}: {len(train_set)} rows of split '{args.train_split}', "
                         f"fewer than one batch of {args.batch_size}")
    sampler = StepBatchSampler(len(train_set), args.batch_size, world_size, rank, seed=args.seed)
    val_set = make_dataset(args.val_data or args.train_data, args.val_split, args, channels)
    if len(val_set) > args.val_max_images:
        val_set.rows = val_set.rows[:: math.ceil(len(val_set) / args.val_max_images)]
    val_images = load_all(val_set, args.batch_size, args.num_workers, progress, "val images") if len(val_set) else None
    logger.info(f"{len(train_set)} train images ({args.train_split}), {len(val_set)} val images ({args.val_split})")
    if val_images is None:
        logger.warning("no validation rows: PSNR/SSIM are not measured")
    cache = None
    if jitter is None and len(train_set) * channels * args.image_size ** 2 * 4 <= args.cache_gb * 2 ** 30:
        # Small sets (the quickstart's): decode once; every epoch then costs no reading at all.
        cache = load_all(train_set, args.batch_size, args.num_workers, progress, "caching train images")
    return Data(train_set, sampler, cache, jitter, val_images)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def train_step(parts: Parts, x: torch.Tensor, step: int, lr: float, disc_lr: float, args) -> dict[str, torch.Tensor]:
    """One optimizer step of the tokenizer on x [b, C, S, S] (then its EMA update), and one of the
    discriminator once the GAN is on. Returns the losses as tensors (not synchronised)."""
    zero = torch.zeros((), device=x.device)
    gan_on = parts.disc is not None and step >= args.disc_start
    set_lr(parts.opt, lr)
    with autocast_context(x.device, args.precision):
        out = parts.model(x)
        rec = out["rec"].float()
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        rec_loss = args.l1 * l1 + args.l2 * l2
        if parts.perceptual is not None:
            rec_loss = rec_loss + args.perceptual_weight * parts.perceptual(rec, x)
        loss = rec_loss + args.vq_weight * out["vq_loss"] + args.entropy_weight * out["entropy_loss"]
        g_loss, gan_w = zero, zero
        if gan_on:
            # The unwrapped discriminator, frozen: its DDP wrapper runs once per step, in the D step.
            parts.raw_disc.requires_grad_(False)
            g_loss = hinge_g_loss(parts.raw_disc(rec))
            parts.raw_disc.requires_grad_(True)
            # The last layer is looked up after the forward: sharded, only then is it the gathered weight.
            gan_w = args.disc_weight * (adaptive_gan_weight(rec_loss, g_loss, last_decoder_layer(parts.raw))
                                        if args.disc_adaptive else 1.0)
            loss = loss + gan_w * g_loss
    parts.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.raw.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
    parts.opt.step()
    if parts.ema is not None:
        update_ema(parts.ema, parts.raw, ema_decay_at(args.ema_decay, step, warmup=True))

    d_loss = zero
    if gan_on:  # on the detached reconstructions; one forward for the real and fake halves
        set_lr(parts.disc_opt, disc_lr)
        with autocast_context(x.device, args.precision):
            logits = parts.disc(torch.cat([x, rec.detach()]))
            d_loss = hinge_d_loss(logits[: len(x)], logits[len(x):])
        parts.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        parts.disc_opt.step()
    return {"loss": loss, "l1": l1, "l2": l2, "vq": out["vq_loss"], "entropy": out["entropy_loss"], "g": g_loss,
            "d": d_loss, "gan_weight": torch.as_tensor(gan_w), "grad_norm": grad_norm, "usage": out["usage"]}


# ----------------------------------------------------------------------------------------------
# Budget: the amount of work is fixed; --max-minutes is only a safety stop
# ----------------------------------------------------------------------------------------------
class Budget:
    """Off unless --max-minutes > 0. When spent, training saves and stops at a step boundary; the schedule is
    never changed, so what a step learns does not depend on the machine and a rerun continues the run.
    Rank 0's clock decides for every rank (they must stop at the same step)."""

    def __init__(self, minutes: float, device: torch.device):
        self.minutes, self.device = minutes, device
        self.deadline = time.time() + 60 * minutes if minutes > 0 else None

    def spent(self) -> bool:
        if self.deadline is None:
            return False
        flag = torch.tensor(float(time.time() >= self.deadline), device=self.device)
        if is_dist():
            dist.broadcast(flag, 0)
        return bool(flag)


# ----------------------------------------------------------------------------------------------
# Logging: text log, progress bar, tensorboard (rank 0)
# ----------------------------------------------------------------------------------------------
class TrainLog:
    def __init__(self, args, out_dir: Path, rank: int, logger, step: int, stop_at: int):
        self.args, self.logger = args, logger
        self.writer = None
        if rank == 0 and (not args.no_tensorboard or args.wandb):  # tensorboard and/or wandb (models/tracking.py)
            self.writer = Tracker(out_dir / "tb", args, tensorboard=not args.no_tensorboard)
        self.bar = tqdm(total=stop_at, initial=step, disable=rank != 0 or args.no_progress, desc="train")
        self.t0, self.step0 = time.time(), step  # the speed of this process

    def train(self, step: int, total_steps: int, lr: float, losses: dict, restarted: int, gan_on: bool) -> None:
        self.bar.update(1)
        if step % self.args.log_every and step != self.bar.total:
            return
        speed = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        v = {k: t.item() for k, t in losses.items() if k != "usage"}  # the only host syncs of a step
        usage = losses["usage"].tolist()  # [K] fraction of each codebook used by the batch
        msg = (f"step {step}/{total_steps} loss {v['loss']:.4f} l1 {v['l1']:.4f} l2 {v['l2']:.4f} vq {v['vq']:.4f} "
               f"usage {sum(usage) / len(usage):.3f} lr {lr:.2e} grad {v['grad_norm']:.2f} {speed:.2f} steps/s")
        if gan_on:
            msg += f" g {v['g']:.4f} d {v['d']:.4f} w {v['gan_weight']:.3f}"
        if restarted:
            msg += f" restarted {restarted} codes"
        self.logger.info(msg)
        self.bar.set_postfix(loss=f"{v['loss']:.4f}")
        if self.writer is not None:
            for name, value in v.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/steps_per_s", speed, step)
            for k, u in enumerate(usage):
                self.writer.add_scalar(f"train/batch_usage_{k}", u, step)

    def val(self, step: int, name: str, metrics: dict, originals: torch.Tensor, grid: torch.Tensor) -> None:
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_scalar(f"val/psnr_{name}", metrics["psnr"], step)
            self.writer.add_scalar(f"val/ssim_{name}", metrics["ssim"], step)
            for k in range(len(metrics["usage"])):
                self.writer.add_scalar(f"codebook_usage/{name}_{k}", metrics["usage"][k], step)
                self.writer.add_scalar(f"codebook_perplexity/{name}_{k}", metrics["perplexity"][k], step)
            pair = torch.cat([originals[: len(grid)], grid])  # originals above reconstructions
            self.writer.add_image(f"val/reconstructions_{name}", make_grid((pair + 1) / 2, nrow=len(grid)), step)
        self.logger.info(f"step {step}: val[{name}] PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                         f"usage {metrics['usage'].mean():.3f}, perplexity {metrics['perplexity'].mean():.1f}")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def validate(parts: Parts, data: Data, args, device: torch.device, step: int, log: TrainLog) -> Optional[dict]:
    """Validation metrics of the trained weights and of their EMA ({"model": ..., "ema": ...})."""
    if data.val_images is None:
        return None
    results = {}
    for name, m in [("model", parts.raw)] + ([("ema", parts.ema)] if parts.ema is not None else []):
        with gathered(m):  # evaluate calls img_to_idx/idx_to_img, not forward
            results[name], grid = evaluate(m, data.val_images, args, device)
        log.val(step, name, results[name], data.val_images, grid)
    return results


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args):
    rank, world_size, device = setup_distributed()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {world_size} processes")
    if args.dead_code_every and args.data_parallel != "ddp" and world_size > 1:
        raise ValueError("--dead-code-every rewrites codebook rows in place, which sharded codebooks do not allow: "
                         "use --data-parallel ddp or --dead-code-every 0")
    out_dir, ckpt_dir = Path(args.out_dir), Path(args.out_dir) / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    logger = create_logger("train_tokenizer", out_dir, rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logger.info(f"args: {vars(args)}")
    logger.info(f"world_size={world_size}, device={device}, precision={args.precision if device.type == 'cuda' else 'fp32'}")

    parts, step, ckpt = build_or_resume(args, device, ckpt_dir, world_size, rank, logger)
    data = load_data(args, parts.raw.in_chans, world_size, rank, logger, progress=rank == 0 and not args.no_progress)

    # The amount of work: --max-steps, else --epochs; the schedule follows the command line.
    steps_per_epoch = data.sampler.steps_per_epoch
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    schedule = LRSchedule(args.lr, total_steps, args.warmup_steps, "cosine", args.end_lr_ratio * args.lr)
    disc_schedule = LRSchedule(args.disc_lr, total_steps, args.warmup_steps, "cosine", args.end_lr_ratio * args.disc_lr)
    epoch, first = divmod(step, steps_per_epoch)
    if ckpt is not None:
        schedule.log_change(ckpt.get("scheduler"), logger)
        epoch, first = data_position(ckpt.get("data"), data.sampler, step, epoch, first, logger)
    stop_at = min(total_steps, args.stop_at_step or total_steps)
    budget = Budget(args.max_minutes, device)
    log = TrainLog(args, out_dir, rank, logger, step, stop_at)
    logger.info(f"training steps {step} -> {stop_at} (schedule {total_steps} steps, {steps_per_epoch} per epoch)"
                + (f"; safety stop after {args.max_minutes} min" if budget.deadline else ""))

    batches = train_batches(data.train_set, data.cache, data.sampler, epoch, first, args.num_workers, data.jitter,
                            pin_memory=device.type == "cuda")
    while step < stop_at:
        x = augment(next(batches).to(device, non_blocking=True), args, args.seed, step, rank)
        lr, gan_on = schedule(step), parts.disc is not None and step >= args.disc_start
        losses = train_step(parts, x, step, lr, disc_schedule(step), args)
        step += 1
        restarted = 0
        if args.dead_code_every and step % args.dead_code_every == 0:
            restarted = restart_dead_codes(parts.raw, x, args.dead_code_threshold, args.seed, step)
        log.train(step, total_steps, lr, losses, restarted, gan_on)
        if args.eval_every and step % args.eval_every == 0 and step < stop_at:
            validate(parts, data, args, device, step, log)
        if args.ckpt_every and step % args.ckpt_every == 0 and step < stop_at:
            save_training_state(ckpt_dir / f"{CKPT_PREFIX}{step:07d}.pt", parts, schedule, data.sampler, step, args,
                                device, rank)
        if step < stop_at and budget.spent():
            logger.warning(f"--max-minutes {args.max_minutes} reached at step {step} of {total_steps}: saving and "
                           f"stopping; rerun the same command to continue")
            break

    # The end: full training state, final evaluation, tokenizer.pt.
    results = validate(parts, data, args, device, step, log)
    save_training_state(ckpt_dir / f"{CKPT_PREFIX}{step:07d}.pt", parts, schedule, data.sampler, step, args, device, rank)
    # Consolidated weights for tokenizer.pt (a collective when sharded; rank 0 receives them).
    weights = full_state_dict(parts.raw) if is_sharded(parts.raw) else None
    ema_weights = full_state_dict(parts.ema) if parts.ema is not None else None
    if rank == 0:
        summary = {name: {"psnr": r["psnr"], "ssim": r["ssim"], "usage": r["usage"].tolist(),
                          "perplexity": r["perplexity"].tolist()} for name, r in (results or {}).items()}
        extra = {"step": step, "args": vars(args), "val": summary}
        if weights is not None:
            extra["model"] = weights  # replaces save_meditok's own copy of the (sharded) module's
        if ema_weights is not None:
            extra["ema"] = ema_weights  # build_meditok prefers these weights
        save_meditok(parts.raw, out_dir / "tokenizer.pt", extra)
        # weights only (the EMA when there is one) + config: python -m models.export
        export_safetensors(out_dir / "tokenizer.pt", out_dir / "model.safetensors", ema=ema_weights is not None)
        logger.info(f"wrote {out_dir / 'tokenizer.pt'} and model.safetensors after {step} steps")
    log.close()
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
    model.add_argument("--data-parallel", default="ddp", choices=DATA_PARALLEL,
                       help="ddp: full weights, gradients and AdamW state on every process; fsdp: split over the "
                            "processes (FSDP2 per ViT block and decoder conv block; bf16 compute with fp32 master "
                            "weights on GPU); hsdp: split within a node, replicated across nodes. fsdp/hsdp write "
                            "sharded checkpoints/step_NNNNNNN/ folders (--dead-code-every needs ddp)")
    model.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPU (CPU runs fp32)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    optim.add_argument("--epochs", type=int, default=10, help="epochs (sets the schedule length unless --max-steps)")
    optim.add_argument("--max-steps", type=int, default=0,
                       help="optimizer steps of the run and length of its schedule (0: from --epochs)")
    optim.add_argument("--max-minutes", type=float, default=0.0,
                       help="safety stop (0: off): after this many minutes save and stop; the schedule is unchanged "
                            "and a rerun continues. Bound the work with --max-steps/--epochs instead")
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
    logs.add_argument("--keep-last", type=int, default=2,
                      help="keep only the newest N training checkpoints in OUT_DIR/checkpoints (0: all)")
    logs.add_argument("--no-tensorboard", action="store_true", help="do not write tensorboard logs")
    add_tracking_args(logs)
    logs.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
