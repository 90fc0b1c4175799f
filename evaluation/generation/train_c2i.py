"""Train the class-to-image GPT on tokenized images (torchrun; CPU or GPU, one or many processes).

    torchrun --standalone --nproc_per_node=4 -m evaluation.generation.train_c2i \
        --code-dir codes/metadata.jsonl --exp-name my_run --gpt-model GPT-B --num-classes 6

Reads the code metadata written by batch_infer.py (train rows for training, val/test rows for the
validation loss), derives the grid and codebook count from the data, and writes self-describing
checkpoints to RESULTS_DIR/EXP_NAME/checkpoints/: NNNNNNN.pt every --ckpt-every steps and latest.pt
at the end. A checkpoint holds the model config, weights, EMA, optimizer, scheduler, step, data
position and every rank's RNG state, so `--gpt-ckpt` (or `--auto-resume`) continues a run exactly,
mid-epoch included. Without torchrun (`python -m evaluation.generation.train_c2i ...`) it runs in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.code_dataset import CodeDataset, StepBatchSampler, collate_batch, find_code_metadata
from datasets.metadata import read_metadata
from models.checkpoint import atomic_save, extract_state_dict, load_checkpoint, load_state_dict_strict, state_dict_to_cpu
from models.distributed import barrier, create_logger, is_dist, setup_distributed
from models.gpt import GPT_models
from scripts.cli import ArgumentParser

SCHEDULES = ("constant", "cosine", "linear")


# ----------------------------------------------------------------------------------------------
# RNG states (saved per rank, so dropout continues exactly after a resume)
# ----------------------------------------------------------------------------------------------
def get_rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device, world_size: int) -> list:
    state = get_rng_state(device)
    if world_size == 1:
        return [state]
    out = [None] * world_size
    dist.all_gather_object(out, state)
    return out


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule, EMA
# ----------------------------------------------------------------------------------------------
def build_model(args, num_codebooks: int, grid_size: int):
    # Stochastic depth replaces dropout when it is on (as in the released trainer).
    dropout_p = 0.0 if args.drop_path_rate > 0 else args.dropout_p
    return GPT_models[args.gpt_model](
        vocab_size=args.vocab_size,
        num_codebooks=num_codebooks,
        block_size=grid_size ** 2,
        num_classes=args.num_classes,
        cls_token_num=args.cls_token_num,
        model_type=args.gpt_type,
        n_output_layer=args.num_output_layer,
        resid_dropout_p=dropout_p,
        ffn_dropout_p=dropout_p,
        attn_dropout_p=args.attn_dropout_p,
        token_dropout_p=args.token_dropout_p,
        class_dropout_prob=args.class_dropout_prob,
        drop_path_rate=args.drop_path_rate,
    )


def create_optimizer(model, args):
    # Matrices and embeddings get weight decay; norms and biases do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel exists on CPU and GPU; on a CPU it is ~4x faster than the default foreach one.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)


def lr_at(step: int, args, total_steps: int, warmup_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant/cosine/linear decay."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    ratio = 0.5 * (1.0 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1.0 - progress
    return args.end_lr + (args.lr - args.end_lr) * ratio


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    # ema <- decay * ema + (1 - decay) * model, one fused pass over all tensors
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def autocast_context(args, device):
    # bf16/fp16 autocast on GPU only: on a CPU it is slower and changes the numbers for nothing.
    if device.type != "cuda" or args.mixed_precision == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision])


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_data(args, logger, device):
    """(train CodeDataset, validation CodeDataset or None, metadata path). Every row is checked upfront."""
    meta_path = find_code_metadata(args.code_dir)
    if args.dataset != "c2i_code":
        raise ValueError(f"--dataset {args.dataset!r}: only 'c2i_code' (pre-tokenized codes) is supported")
    rows = read_metadata(meta_path, required=("code_identifier",))
    common = dict(num_classes=args.num_classes, num_codebooks=args.num_codebooks, vocab_size=args.vocab_size,
                  vq_ckpt=args.vq_ckpt, device=device, progress=logger.isEnabledFor(logging.INFO), rows=rows,
                  cache={})  # a tokenizer built for latent files serves both splits, then goes
    train = CodeDataset(meta_path, splits="train", **common)
    if len(train) == 0:
        raise ValueError(f"{meta_path}: no training rows (split 'train' or no split column) among {len(rows)} rows")
    val = CodeDataset(meta_path, splits=("val", "test"), **common)
    if len(val) and val.codes.shape[1:] != train.codes.shape[1:]:
        raise ValueError(f"{meta_path}: val/test codes {tuple(val.codes.shape[1:])} differ from train codes {tuple(train.codes.shape[1:])}")
    others = len(rows) - len(train) - len(val)
    logger.info(
        f"{meta_path}: {len(train)} train rows, {len(val)} val/test rows"
        f"{f', {others} rows of other splits not used' if others else ''}; codes [K={train.num_codebooks}, "
        f"{train.grid_size}x{train.grid_size}]"
    )
    if args.image_size is not None and args.image_size // args.downsample_size != train.grid_size:
        raise ValueError(
            f"--image-size {args.image_size} / --downsample-size {args.downsample_size} gives a "
            f"{args.image_size // args.downsample_size}-grid, but the code files hold a {train.grid_size}-grid"
        )
    return train, (val if len(val) else None), meta_path


@torch.no_grad()
def validation_loss(model, dataset, args, device, rank, world_size) -> float:
    """Mean cross-entropy (per code) over all val/test rows, in eval mode, shared across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of row losses, rows)
    idx = list(range(rank, len(dataset), world_size))
    bs = max(1, args.global_batch_size // (world_size * args.gradient_accumulation_steps))
    for i in range(0, len(idx), bs):
        x, y = dataset.__getitems__(idx[i:i + bs])
        x, y = x.to(device), y.to(device)
        with autocast_context(args, device):
            _, loss = model(x[:, :, :-1], y, targets=x)
        total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint with the most steps in checkpoint_dir, or None. Numbered files carry their step
    in the name; latest.pt is read (a run extended after it finished writes numbered files past it)."""
    numbered = [(int(p.stem), p) for p in checkpoint_dir.glob("[0-9]*.pt") if p.stem.isdigit()]
    best = max(numbered, default=(-1, None))
    latest = checkpoint_dir / "latest.pt"
    if latest.is_file():
        step = int(load_checkpoint(latest).get("steps", -1))
        if step >= best[0]:
            best = (step, latest)
    return best[1]


def make_checkpoint(raw_model, ema, optimizer, scaler, args, step, epoch, step_in_epoch, total_steps,
                    warmup_steps, sampler, rng_states, label_names, world_size):
    if step_in_epoch == sampler.steps_per_epoch:  # a finished epoch: resume at the next one's start
        epoch, step_in_epoch = epoch + 1, 0
    ckpt = {
        "model": state_dict_to_cpu(raw_model),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"schedule": args.schedule, "last_step": step, "total_steps": total_steps,
                      "warmup_steps": warmup_steps, "lr": args.lr, "end_lr": args.end_lr},
        "steps": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "data": {"num_samples": sampler.num_samples, "global_batch_size": sampler.global_batch, "seed": sampler.seed},
        "rng": rng_states,
        "world_size": world_size,
        "config": asdict(raw_model.config),
        "gpt_model": args.gpt_model,
        "label_names": {int(k): v for k, v in label_names.items()},
        "args": vars(args),
    }
    if ema is not None:
        ckpt["ema"] = state_dict_to_cpu(ema)
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    return ckpt


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args):
    rank, world_size, device = setup_distributed()
    accum = args.gradient_accumulation_steps
    if args.global_batch_size % (world_size * accum):
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the number of processes "
            f"({world_size}) x --gradient-accumulation-steps ({accum})"
        )
    experiment_dir = Path(args.results_dir) / args.exp_name
    checkpoint_dir = experiment_dir / "checkpoints"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    logger = create_logger("train_c2i", experiment_dir if rank == 0 else None, rank)
    logger.info(f"args: {vars(args)}")
    logger.info(f"world_size={world_size}, device={device}, backend={dist.get_backend() if is_dist() else 'none'}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # Data first: the grid and codebook count come from the code files.
    train_set, val_set, meta_path = load_data(args, logger, device)
    sampler = StepBatchSampler(len(train_set), args.global_batch_size, world_size, rank, accum, seed=args.global_seed)
    # The loader gets its own generator: iter(loader) would otherwise draw from the global RNG, so a
    # run resumed mid-epoch (one extra iter) would see different dropout than an uninterrupted one.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.global_seed))
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (
        0 if args.schedule == "constant" else int(0.03 * total_steps))

    # Model: the same initial weights on every rank (seeded identically), then per-rank RNG for dropout.
    torch.manual_seed(args.global_seed)
    raw_model = build_model(args, train_set.num_codebooks, train_set.grid_size).to(device)
    logger.info(f"{args.gpt_model}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, config {asdict(raw_model.config)}")
    ema = None
    if args.ema:
        ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    optimizer = create_optimizer(raw_model, args)
    use_scaler = device.type == "cuda" and args.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if device.type == "cuda" else None
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

    # Resume (or start from weights only, e.g. the released GPT-B).
    step, epoch, step_in_epoch = 0, 0, 0
    resume_path = args.gpt_ckpt
    if resume_path is None and args.auto_resume:
        found = find_resume_checkpoint(checkpoint_dir)
        resume_path = str(found) if found else None
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        if "optimizer" in ckpt and "steps" in ckpt:
            load_state_dict_strict(raw_model, ckpt["model"], context=resume_path)
            if ema is not None:
                load_state_dict_strict(ema, ckpt.get("ema", ckpt["model"]), context=f"{resume_path} [ema]")
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            step = int(ckpt["steps"])
            data = ckpt.get("data", {})
            if data.get("num_samples") == len(train_set) and data.get("global_batch_size") == args.global_batch_size:
                epoch, step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
            else:
                epoch, step_in_epoch = step // steps_per_epoch, 0
                logger.warning(f"{resume_path}: dataset size or global batch changed ({data}); starting epoch {epoch} from its beginning")
            rng = ckpt.get("rng") or []
            if len(rng) == world_size:
                set_rng_state(rng[rank], device)
            else:
                logger.warning(f"{resume_path}: saved by {len(rng)} processes, resumed by {world_size}: RNG streams restart")
            if ckpt.get("scheduler", {}).get("total_steps") not in (None, total_steps):
                logger.warning(f"schedule length changed from {ckpt['scheduler']['total_steps']} to {total_steps} steps")
            logger.info(f"resumed from {resume_path}: step {step}, epoch {epoch}, step {step_in_epoch} of {steps_per_epoch} in the epoch")
        else:  # weights only: fine-tune from step 0
            sd, where = extract_state_dict(ckpt, prefer=("model", "ema", "state_dict", "module"))
            load_state_dict_strict(raw_model, sd, context=f"{resume_path} [{where or 'plain'}]")
            if ema is not None:
                ema.load_state_dict(raw_model.state_dict())
            logger.info(f"initialised weights from {resume_path} [{where or 'plain'}]; training starts at step 0")
        del ckpt

    # Wrap for training: compile (GPU only) and DDP. Checkpoints are always saved from raw_model.
    model = raw_model
    if not args.no_compile and device.type == "cuda":
        logger.info("compiling the model (the first steps take longer)")
        model = torch.compile(model)
    elif not args.no_compile:
        logger.info("torch.compile skipped on CPU (compile time would dominate); pass --no-compile to silence this")
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    writer = None
    if rank == 0 and not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(experiment_dir / "tensorboard"))

    def save(name: str):
        rng_states = gather_rng_states(device, world_size)
        if rank == 0 and not args.no_local_save:
            ckpt = make_checkpoint(raw_model, ema, optimizer, scaler, args, step, epoch, step_in_epoch, total_steps,
                                   warmup_steps, sampler, rng_states, train_set.label_names, world_size)
            path = checkpoint_dir / name
            atomic_save(ckpt, path)
            logger.info(f"saved {path}")
        barrier()

    def evaluate():
        if val_set is None:
            return None
        val = validation_loss(raw_model, val_set, args, device, rank, world_size)
        logger.info(f"(step={step:07d}) val loss {val:.4f} on {len(val_set)} val/test rows")
        if writer:
            writer.add_scalar("val/loss", val, step)
        return val

    logger.info(f"training {total_steps} steps ({steps_per_epoch} per epoch, {args.epochs} epochs, global batch "
                f"{args.global_batch_size} = {world_size} processes x {accum} accumulation x {sampler.micro})")
    positions = args.global_batch_size * train_set.seq_len
    pbar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    running_loss = torch.zeros((), device=device)
    log_steps, t0 = 0, time.perf_counter()
    first_step, timing_start = step, None  # throughput excludes the first (warm-up/compile) steps
    while step < total_steps:
        sampler.set_epoch(epoch, step_in_epoch)
        batches = iter(loader)
        while step < total_steps and step_in_epoch < steps_per_epoch:
            lr = lr_at(step, args, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # [b, K, L], [b]
                sync = micro == accum - 1 or world_size == 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast_context(args, device):
                    _, loss = model(x[:, :, :-1], y, targets=x)
                    loss = loss / accum
                (scaler.scale(loss) if use_scaler else loss).backward()
                running_loss += loss.detach()
            if use_scaler:
                scaler.unscale_(optimizer)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
            if use_scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, raw_model, args.ema_decay)
            step += 1
            step_in_epoch += 1
            log_steps += 1
            pbar.update(1)
            if timing_start is None and step - first_step == args.timing_warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timing_start = (step, time.perf_counter())

            if step % args.log_every == 0 or step == total_steps:
                avg = running_loss / log_steps
                if world_size > 1:
                    dist.all_reduce(avg)
                    avg = avg / world_size
                elapsed = time.perf_counter() - t0
                logger.info(f"(step={step:07d}) train loss {avg.item():.4f}, lr {lr:.3g}, "
                            f"{log_steps / elapsed:.2f} steps/s, {log_steps * positions / elapsed:.0f} positions/s")
                pbar.set_postfix(loss=f"{avg.item():.4f}", lr=f"{lr:.2g}")
                if writer:
                    writer.add_scalar("train/loss", avg.item(), step)
                    writer.add_scalar("train/lr", lr, step)
                running_loss.zero_()
                log_steps, t0 = 0, time.perf_counter()
            if args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
                evaluate()
            if step % args.ckpt_every == 0 and step < total_steps:
                save(f"{step:07d}.pt")
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed_steps, timed_seconds = (step - timing_start[0], time.perf_counter() - timing_start[1]) if timing_start else (0, 0.0)
    pbar.close()
    val_loss = evaluate()
    save("latest.pt")
    if writer:
        writer.close()
    stats = {
        "steps": step,
        "val_loss": val_loss,
        "positions_per_sec": timed_steps * positions / timed_seconds if timed_steps > 0 else None,
        "experiment_dir": str(experiment_dir),
    }
    logger.info(f"done: {stats}")
    if is_dist():
        dist.destroy_process_group()
    return stats


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--code-dir", type=str, required=True,
                   help="code metadata file (csv/jsonl/json with code_identifier, label, split) written by batch_infer.py, "
                        "or the folder holding exactly one such file")
    g.add_argument("--dataset", type=str, default="c2i_code", choices=["c2i_code"], help="dataset type (pre-tokenized codes)")
    g.add_argument("--vq-ckpt", type=str, default=None,
                   help="tokenizer checkpoint, needed when code files are latents (batch_infer.py --infer_type latent)")
    g.add_argument("--tokenizer-name", type=str, default="meditok", help="tokenizer name, recorded in the log and checkpoints")
    g.add_argument("--num-classes", type=int, default=6, help="number of classes; every label must lie in [0, num_classes)")
    g.add_argument("--image-size", type=int, default=None,
                   help="if given, checked against the data: image_size / downsample_size must equal the code grid side")
    g.add_argument("--downsample-size", type=int, default=16, help="tokenizer downsampling factor (used with --image-size)")
    g.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers (the codes are held in memory, so 0 is usually fastest)")

    g = parser.add_argument_group("model")
    g.add_argument("--gpt-model", type=str, choices=list(GPT_models), default="GPT-B", help="GPT size")
    g.add_argument("--gpt-type", type=str, choices=["c2i"], default="c2i", help="conditioning type (class-to-image)")
    g.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary over all codebooks (codebook_size x K)")
    g.add_argument("--num-codebooks", type=int, default=None, help="codebooks K; checked against the code files (default: from the data)")
    g.add_argument("--num-output-layer", type=int, default=1, help="blocks in the multi-codebook head")
    g.add_argument("--cls-token-num", type=int, default=1, help="condition positions before the image tokens")
    g.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout (0 when --drop-path-rate > 0)")
    g.add_argument("--attn-dropout-p", type=float, default=0.0, help="attention dropout")
    g.add_argument("--token-dropout-p", type=float, default=0.1, help="dropout on the input embeddings")
    g.add_argument("--class-dropout-prob", type=float, default=0.1,
                   help="probability of replacing the label by the null class (needed for guidance at sampling)")
    g.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth rate")

    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=300, help="epochs over the train rows")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (also shortens the schedule)")
    g.add_argument("--global-batch-size", type=int, default=256, help="images per optimizer step over all processes")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step and process")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--end-lr", type=float, default=0.0, help="final learning rate of the cosine/linear schedules")
    g.add_argument("--schedule", type=str, default="constant", choices=SCHEDULES, help="learning-rate schedule after warm-up")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 3%% of the steps for cosine/linear, 0 for constant)")
    g.add_argument("--weight-decay", type=float, default=5e-2, help="AdamW weight decay (matrices and embeddings)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    g.add_argument("--mixed-precision", type=str, default="bf16", choices=["none", "fp16", "bf16"],
                   help="autocast dtype on GPU (CPU runs in float32)")
    g.add_argument("--no-compile", action="store_true", help="do not torch.compile the model (compile is used on GPU only)")
    g.add_argument("--global-seed", type=int, default=0, help="seed of the initial weights, the data order and dropout")

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--results-dir", type=str, default="results", help="experiments go to RESULTS_DIR/EXP_NAME")
    g.add_argument("--exp-name", type=str, required=True, help="experiment name")
    g.add_argument("--gpt-ckpt", type=str, default=None,
                   help="resume from this training checkpoint (exactly), or start from these weights (e.g. the released GPT-B)")
    g.add_argument("--auto-resume", action="store_true",
                   help="without --gpt-ckpt, resume from the newest checkpoint in RESULTS_DIR/EXP_NAME/checkpoints if any")
    g.add_argument("--ckpt-every", type=int, default=5000, help="save checkpoints/NNNNNNN.pt every this many steps")
    g.add_argument("--no-local-save", action="store_true", help="write no checkpoints (e.g. benchmarks)")
    g.add_argument("--log-every", type=int, default=100, help="log the training loss every this many steps")
    g.add_argument("--eval-every", type=int, default=0, help="validation loss every this many steps (0: only at the end)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write tensorboard logs")
    g.add_argument("--timing-warmup-steps", type=int, default=2, help="steps left out of the reported throughput")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
