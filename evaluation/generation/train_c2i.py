"""Train the class-to-image GPT on tokenized images (torchrun; CPU or GPU, one or many processes).

    torchrun --standalone --nproc_per_node=4 -m evaluation.generation.train_c2i \
        --code-dir codes/metadata.jsonl --exp-name my_run --gpt-model GPT-B --num-classes 6

Reads the code metadata written by batch_infer.py (train rows for training, val/test rows for the
validation loss). The vocabulary, codebook count and grid come from the tokenization manifest beside the
codes (tokenizer.json; a flag that contradicts it, or a --vq-ckpt with other weights, is an error), else
from the data and --vq-ckpt. Writes self-describing checkpoints to RESULTS_DIR/EXP_NAME/checkpoints/:
NNNNNNN.pt every --ckpt-every steps (the newest --keep-last kept) and latest.pt at the end. A checkpoint
holds the model config, weights, EMA, optimizer, scheduler, step, data position and every rank's RNG
state, so `--gpt-ckpt` (or `--auto-resume`, which skips a truncated newest file) continues a run exactly,
mid-epoch included. Without torchrun (`python -m evaluation.generation.train_c2i ...`) it runs in one process.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.code_dataset import CodeDataset, collate_batch, find_code_metadata
from datasets.manifest import check_tokenizer, read_manifest
from datasets.metadata import read_metadata
from models.checkpoint import CheckpointError, atomic_save, extract_state_dict, load_checkpoint
from models.distributed import barrier, create_logger, is_dist, setup_distributed
from models.export import export as export_safetensors
from models.gpt import COND_ROTATIONS, GPT_models, TransformerBlock, load_vq_embedding
from models.parallel import (DATA_PARALLEL, device_mesh, full_state_dict, gradient_sync, load_full_optimizer_state,
                             load_full_state_dict, load_sharded, prune_sharded, save_sharded, sharded_checkpoints,
                             wrap_model)
from models.tracking import Tracker, add_tracking_args
from models.training import (SCHEDULES, LRSchedule, StepBatchSampler, autocast_context, data_position, gather_rng_states,
                             load_newest_checkpoint, numbered_checkpoints, prune_checkpoints, restore_rng_states,
                             seed_process, set_lr, update_ema)
from scripts.cli import ArgumentParser


RELEASED_VOCAB_SIZE = 32768  # the released MedITok: 8 codebooks x 4096 codes


# ----------------------------------------------------------------------------------------------
# Model and optimizer (schedule, EMA, RNG state and data order: models/training.py)
# ----------------------------------------------------------------------------------------------
def build_model(args, num_codebooks: int, grid_size: int, **condition):
    # Stochastic depth replaces dropout when it is on (as in the released trainer). `condition`: more
    # ModelArgs fields from the data (t2i: caption_dim, text_vocab_size; see train_t2i.py).
    dropout_p = 0.0 if args.drop_path_rate > 0 else args.dropout_p
    tokenizer_part = None
    if getattr(args, "vq_embed_path", None):  # token embeddings from the tokenizer (frozen), see VQTokenEmbedder
        tokenizer_part, dims = load_vq_embedding(args.vq_embed_path)
        condition = {**condition, **dims, "vq_embed_path": str(args.vq_embed_path)}
    model = GPT_models[args.gpt_model](
        vocab_size=args.vocab_size,
        num_codebooks=num_codebooks,
        block_size=grid_size ** 2,
        num_classes=args.num_classes,
        cls_token_num=args.cls_token_num,
        cond_rotation=getattr(args, "cond_rotation", None),
        model_type=args.gpt_type,
        n_output_layer=args.num_output_layer,
        resid_dropout_p=dropout_p,
        ffn_dropout_p=dropout_p,
        attn_dropout_p=args.attn_dropout_p,
        token_dropout_p=args.token_dropout_p,
        class_dropout_prob=args.class_dropout_prob,
        drop_path_rate=args.drop_path_rate,
        **condition,
    )
    if tokenizer_part is not None:
        model.tok_embeddings.load_tokenizer(tokenizer_part, context=str(args.vq_embed_path))
    return model


def create_optimizer(model, args):
    # Matrices and embeddings get weight decay; norms and biases do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel exists on CPU and GPU and is cheaper than the default foreach one (docs/BENCHMARKS.md).
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def code_settings(args, meta_path: Path, logger, device) -> tuple[dict | None, dict]:
    """Fill `args.vocab_size` and `args.num_codebooks` from what made the codes; returns the manifest (or
    None) and the CodeDataset cache (holding the tokenizer when one was built). Sources, first found wins:
      1. the tokenization manifest batch_infer writes beside the codes (tokenizer.json): a flag that
         contradicts it is an error naming both, and a --vq-ckpt whose weights differ from the ones that
         made the codes is refused (naming both files) unless --allow-tokenizer-mismatch;
      2. the tokenizer --vq-ckpt (codes from a batch_infer without manifests);
      3. --vocab-size, else the released tokenizer's vocabulary."""
    manifest, cache = read_manifest(meta_path), {}
    if manifest is not None:
        where = manifest["_path"]
        for flag, value in (("vocab_size", manifest["vocab_size"]), ("num_codebooks", manifest["num_codebooks"]),
                            ("image_size", manifest["image_size"])):
            given = getattr(args, flag)
            if given is not None and given != value:
                raise ValueError(f"--{flag.replace('_', '-')} {given} contradicts {where}: the codes were made with "
                                 f"{flag} {value} (leave the flag out to take it from there)")
        args.vocab_size, args.num_codebooks = int(manifest["vocab_size"]), int(manifest["num_codebooks"])
        made_by = manifest["tokenizer"]["path"]
        if args.vq_ckpt is not None:
            check_tokenizer(manifest, args.vq_ckpt, allow_mismatch=args.allow_tokenizer_mismatch)
        if getattr(args, "vq_embed_path", None):  # the tokenizer that embeds the codes must be the one that made them
            check_tokenizer(manifest, args.vq_embed_path, allow_mismatch=args.allow_tokenizer_mismatch)
        elif manifest.get("infer_type") == "latent" and Path(made_by).is_file():
            check_tokenizer(manifest, made_by)  # latents need the tokenizer: the one recorded, if unchanged
            args.vq_ckpt = made_by
        logger.info(f"{where}: vocabulary {args.vocab_size} = {args.num_codebooks} codebooks x "
                    f"{manifest['codebook_size']}, grid {manifest['grid']}, made by {made_by}")
    elif args.vocab_size is None and args.vq_ckpt is not None:
        from models.meditok import build_meditok

        cache["tokenizer"] = tokenizer = build_meditok(args.vq_ckpt, device=device).eval()
        args.vocab_size = tokenizer.vocab_size
        logger.info(f"vocabulary {args.vocab_size} from the tokenizer {args.vq_ckpt} (no manifest beside the codes)")
    elif args.vocab_size is None:
        args.vocab_size = RELEASED_VOCAB_SIZE
        logger.info(f"vocabulary {args.vocab_size} (the released tokenizer's; no manifest beside the codes, no --vq-ckpt)")
    return manifest, cache


def load_data(args, logger, device):
    """(train CodeDataset, validation CodeDataset or None, metadata path). Every row is checked upfront."""
    meta_path = find_code_metadata(args.code_dir)
    if args.dataset != "c2i_code":
        raise ValueError(f"--dataset {args.dataset!r}: only 'c2i_code' (pre-tokenized codes) is supported")
    manifest, cache = code_settings(args, meta_path, logger, device)  # one tokenizer serves both splits
    rows = read_metadata(meta_path)  # code_identifier, or a .pt identifier (released metadata): see load_codes
    common = dict(num_classes=args.num_classes, num_codebooks=args.num_codebooks, vocab_size=args.vocab_size,
                  vq_ckpt=args.vq_ckpt, device=device, progress=logger.isEnabledFor(logging.INFO), rows=rows,
                  cache=cache)
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
    if manifest is not None and list(manifest["grid"]) != [train.grid_size] * 2:
        raise ValueError(f"{meta_path}: the code files hold a {train.grid_size}-grid, but {manifest['_path']} "
                         f"records a {manifest['grid']} grid")
    if manifest is None and args.image_size is not None and args.image_size // args.downsample_size != train.grid_size:
        raise ValueError(
            f"--image-size {args.image_size} / --downsample-size {args.downsample_size} gives a "
            f"{args.image_size // args.downsample_size}-grid, but the code files hold a {train.grid_size}-grid"
        )
    return train, (val if len(val) else None), meta_path


def condition_inputs(y, device) -> dict:
    """The model's condition arguments for a batch's y: labels [b] (c2i), or (caption [b, T, ...],
    mask [b, T]) from a caption dataset (t2i, train_t2i.py)."""
    if isinstance(y, (tuple, list)):
        return {"cond_idx": y[0].to(device, non_blocking=True), "cond_mask": y[1].to(device, non_blocking=True)}
    return {"cond_idx": y.to(device, non_blocking=True)}


@torch.no_grad()
def validation_loss(model, dataset, args, device, rank, world_size) -> float:
    """Mean cross-entropy (per code) over all val/test rows, in eval mode, shared across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of row losses, rows)
    idx = list(range(rank, len(dataset), world_size))
    bs = max(1, args.global_batch_size // (world_size * args.gradient_accumulation_steps))
    # As many batches on every rank as on rank 0 (the most rows): a sharded model's forward is a
    # collective. A rank out of rows runs row 0 and counts nothing.
    for i in range(0, len(range(0, len(dataset), world_size)), bs):
        rows = idx[i:i + bs]
        x, y = dataset.__getitems__(rows or [0])
        x = x.to(device)
        with autocast_context(device, args.mixed_precision):
            _, loss = model(x[:, :, :-1], targets=x, **condition_inputs(y, device))
        total += torch.tensor([loss.item() * len(rows), len(rows)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def is_training_state(ckpt) -> bool:
    return isinstance(ckpt, dict) and "optimizer" in ckpt and "steps" in ckpt


def find_resume_checkpoint(checkpoint_dir: Path, logger) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) with the most steps in checkpoint_dir that still loads, or (None, None).
    Numbered files carry their step in the name; latest.pt is read (a run extended after it finished
    writes numbered files past it). A truncated newest file is skipped: the log names it and the fallback."""
    candidates, preloaded = [], {}
    latest = checkpoint_dir / "latest.pt"
    if latest.is_file():
        try:
            preloaded[latest] = load_checkpoint(latest)
            candidates.append((int(preloaded[latest].get("steps", -1)), latest))
        except CheckpointError:
            candidates.append((-1, latest))  # tried last, reported when skipped
    candidates += numbered_checkpoints(checkpoint_dir)  # after latest.pt: it wins a tie
    # Sharded runs (fsdp/hsdp) keep their training state in DCP folders NNNNNNN/ (returned with checkpoint
    # None: models.parallel.load_sharded reads them) and write a latest.pt without optimizer.
    sharded = sharded_checkpoints(checkpoint_dir)
    try:
        path, ckpt = load_newest_checkpoint(candidates, logger, is_training_state, preloaded)
    except CheckpointError:
        if not sharded:
            raise
        path, ckpt = None, None
    if sharded and (path is None or sharded[-1][0] >= int(ckpt["steps"])):
        return sharded[-1][1], None
    return path, ckpt


def make_checkpoint(raw_model, weights, ema_weights, optimizer_state, scaler, args, step, epoch, step_in_epoch,
                    schedule, sampler, rng_states, label_names, world_size):
    """The checkpoint dict. weights / ema_weights / optimizer_state: full state dicts, or None to leave them
    out (a sharded run's training state keeps them in its DCP folder; its latest.pt has no optimizer)."""
    if step_in_epoch == sampler.steps_per_epoch:  # a finished epoch: resume at the next one's start
        epoch, step_in_epoch = epoch + 1, 0
    ckpt = {
        "scheduler": schedule.state_dict(),
        "steps": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "data": sampler.state_dict(),
        "rng": rng_states,
        "world_size": world_size,
        "config": asdict(raw_model.config),
        "gpt_model": args.gpt_model,
        "label_names": {int(k): v for k, v in label_names.items()},
        "args": vars(args),
    }
    for key, value in (("model", weights), ("ema", ema_weights), ("optimizer", optimizer_state)):
        if value is not None:
            ckpt[key] = value
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    return ckpt


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args, load=load_data):
    """Train. `load(args, logger, device)` -> (train set, val set or None, metadata path): codes and labels
    here; codes and captions for train_t2i.py, whose train set also carries `model_kwargs` for build_model."""
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
    train_set, val_set, meta_path = load(args, logger, device)
    sampler = StepBatchSampler(len(train_set), args.global_batch_size, world_size, rank, accum, seed=args.global_seed)
    # The loader gets its own generator: iter(loader) would otherwise draw from the global RNG, so a
    # run resumed mid-epoch (one extra iter) would see different dropout than an uninterrupted one.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.global_seed))
    steps_per_epoch = sampler.steps_per_epoch
    # The amount of work (and the schedule's length): --max-steps when given, else --epochs.
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (
        0 if args.schedule == "constant" else int(0.03 * total_steps))
    schedule = LRSchedule(args.lr, total_steps, warmup_steps, args.schedule, args.end_lr)

    # Model: the same initial weights on every rank (seeded identically), then per-rank RNG for dropout.
    torch.manual_seed(args.global_seed)
    raw_model = build_model(args, train_set.num_codebooks, train_set.grid_size, **getattr(train_set, "model_kwargs", {}))
    logger.info(f"{args.gpt_model}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, config {asdict(raw_model.config)}")
    ema = None
    if args.ema:
        ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    # Wrap for training (models/parallel.py): ddp keeps raw_model plain (checkpoints are saved from it);
    # fsdp/hsdp shard raw_model and the EMA in place, per transformer block. Compile on GPU only.
    # The optimizer is created afterwards, on the parameters training updates (shards for fsdp/hsdp).
    compile_model = not args.no_compile and device.type == "cuda"
    if compile_model:
        logger.info("compiling the model (the first steps take longer)")
    elif not args.no_compile:
        logger.info("torch.compile skipped on CPU (compile time would dominate); pass --no-compile to silence this")
    model = wrap_model(raw_model, args.data_parallel, device, (TransformerBlock,),
                       mesh=device_mesh(args.data_parallel, device), precision=args.mixed_precision,
                       grad_checkpointing=args.grad_checkpointing, compile=compile_model, ema=ema)
    model.train()
    optimizer = create_optimizer(raw_model, args)
    use_scaler = device.type == "cuda" and args.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if device.type == "cuda" else None
    seed_process(args.global_seed, world_size, rank)

    # Resume (or start from weights only, e.g. the released GPT-B).
    step, epoch, step_in_epoch = 0, 0, 0
    resume_path, ckpt = args.gpt_ckpt, None
    if resume_path is not None:
        ckpt = None if Path(resume_path).is_dir() else load_checkpoint(resume_path)  # a folder: sharded
    elif args.auto_resume:
        resume_path, ckpt = find_resume_checkpoint(checkpoint_dir, logger)
    if resume_path:
        sharded = ckpt is None
        if sharded:  # DCP folder (any number of processes saved it): straight into the plain or sharded model
            ckpt = load_sharded(resume_path, raw_model, optimizer, ema)
        if sharded or is_training_state(ckpt):
            if not sharded:
                load_full_state_dict(raw_model, ckpt["model"], context=str(resume_path))
                if ema is not None:
                    load_full_state_dict(ema, ckpt.get("ema", ckpt["model"]), context=f"{resume_path} [ema]")
                load_full_optimizer_state(raw_model, optimizer, ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            step = int(ckpt["steps"])
            epoch, step_in_epoch = data_position(ckpt.get("data"), sampler, step, int(ckpt["epoch"]),
                                                 int(ckpt["step_in_epoch"]), logger, str(resume_path))
            restore_rng_states(ckpt.get("rng"), rank, world_size, device, logger, str(resume_path))
            schedule.log_change(ckpt.get("scheduler"), logger)
            logger.info(f"resumed from {resume_path}: step {step}, epoch {epoch}, step {step_in_epoch} of {steps_per_epoch} in the epoch")
        else:  # weights only: fine-tune from step 0
            sd, where = extract_state_dict(ckpt, prefer=("model", "ema", "state_dict", "module"))
            load_full_state_dict(raw_model, sd, context=f"{resume_path} [{where or 'plain'}]")
            if ema is not None:
                load_full_state_dict(ema, sd)
            logger.info(f"initialised weights from {resume_path} [{where or 'plain'}]; training starts at step 0")
        del ckpt

    writer = None
    if rank == 0 and (not args.no_tensorboard or args.wandb):  # tensorboard and/or wandb (models/tracking.py)
        writer = Tracker(experiment_dir / "tensorboard", args, tensorboard=not args.no_tensorboard)

    def save(name: str):
        """ddp: one file `name` with everything. fsdp/hsdp: the training state as the DCP folder NNNNNNN/
        (every rank writes its shards); for latest.pt also the consolidated weights + EMA (no optimizer)."""
        rng_states = gather_rng_states(device)
        if args.no_local_save:
            return
        sharded = args.data_parallel != "ddp"
        state = (scaler, args, step, epoch, step_in_epoch, schedule, sampler, rng_states, train_set.label_names, world_size)
        if sharded:
            path = save_sharded(checkpoint_dir / f"{step:07d}", raw_model, optimizer, ema,
                                make_checkpoint(raw_model, None, None, None, *state))
            logger.info(f"saved {path}")
            for old in prune_sharded(checkpoint_dir, args.keep_last):
                logger.info(f"removed {old} (--keep-last {args.keep_last})")
            if name != "latest.pt":
                return
        gather = sharded or rank == 0  # a collective for a sharded model; rank 0 gets the tensors
        weights = full_state_dict(raw_model) if gather else None
        ema_weights = full_state_dict(ema) if gather and ema is not None else None
        if rank == 0:
            ckpt = make_checkpoint(raw_model, weights, ema_weights, None if sharded else optimizer.state_dict(), *state)
            path = checkpoint_dir / name
            atomic_save(ckpt, path)
            logger.info(f"saved {path}")
            for old in prune_checkpoints(checkpoint_dir, args.keep_last):
                logger.info(f"removed {old} (--keep-last {args.keep_last})")
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
            lr = schedule(step)
            set_lr(optimizer, lr)
            for micro in range(accum):
                x, y = next(batches)
                x, cond = x.to(device, non_blocking=True), condition_inputs(y, device)  # [b, K, L]; labels [b] or caption
                sync = micro == accum - 1 or world_size == 1
                with gradient_sync(model, sync), autocast_context(device, args.mixed_precision):
                    _, loss = model(x[:, :, :-1], targets=x, **cond)
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
    if rank == 0 and not args.no_local_save:  # weights only, EMA when trained with it: python -m models.export
        export_safetensors(checkpoint_dir / "latest.pt", checkpoint_dir / "model.safetensors", ema=ema is not None)
        logger.info(f"wrote {checkpoint_dir / 'model.safetensors'}")
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
                   help="tokenizer checkpoint: needed when code files are latents (batch_infer.py --infer_type latent); "
                        "checked against the weights recorded in the codes' manifest")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="accept a --vq-ckpt whose weights differ from the ones that made the codes (a warning instead of an error)")
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
    g.add_argument("--vocab-size", type=int, default=None,
                   help="total vocabulary over all codebooks (codebook_size x K); default: from the tokenization "
                        "manifest beside the codes, else from --vq-ckpt, else the released 32768")
    g.add_argument("--num-codebooks", type=int, default=None, help="codebooks K; checked against the code files (default: from the data)")
    g.add_argument("--num-output-layer", type=int, default=1, help="blocks in the multi-codebook head")
    g.add_argument("--vq-embed-path", type=str, default=None,
                   help="tokenizer checkpoint whose quantizer + post_quant_proj (frozen) embed the input codes, "
                        "followed by a trained projector (the released variant); default: one table per codebook")
    g.add_argument("--cls-token-num", type=int, default=1, help="condition positions before the image tokens")
    g.add_argument("--cond-rotation", choices=COND_ROTATIONS, default=None,
                   help="rotary rows of the condition positions (models/gpt.py ModelArgs): 'zero' as LlamaGen and the "
                        "released weights, 'identity' lets attention read a caption by content; default: zero for c2i, "
                        "identity for t2i")
    g.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout (0 when --drop-path-rate > 0)")
    g.add_argument("--attn-dropout-p", type=float, default=0.0, help="attention dropout")
    g.add_argument("--token-dropout-p", type=float, default=0.1, help="dropout on the input embeddings")
    g.add_argument("--class-dropout-prob", type=float, default=0.1,
                   help="probability of replacing the label by the null class (needed for guidance at sampling)")
    g.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth rate")

    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=300, help="epochs over the train rows (unless --max-steps)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps of the run and length of its schedule (default: from --epochs)")
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
    g.add_argument("--data-parallel", type=str, default="ddp", choices=DATA_PARALLEL,
                   help="ddp: full weights, gradients and optimizer state on every process; fsdp: all three split over "
                        "the processes (FSDP2, per transformer block; bf16 compute with fp32 master weights on GPU); "
                        "hsdp: split within a node, replicated across nodes. fsdp/hsdp save the training state as "
                        "sharded folders checkpoints/NNNNNNN/ that resume on any number of processes")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward pass (less memory, ~30%% more compute)")
    g.add_argument("--global-seed", type=int, default=0, help="seed of the initial weights, the data order and dropout")

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--results-dir", type=str, default="results", help="experiments go to RESULTS_DIR/EXP_NAME")
    g.add_argument("--exp-name", type=str, required=True, help="experiment name")
    g.add_argument("--gpt-ckpt", type=str, default=None,
                   help="resume from this training checkpoint (exactly), or start from these weights (e.g. the released GPT-B)")
    g.add_argument("--auto-resume", action="store_true",
                   help="without --gpt-ckpt, resume from the newest checkpoint in RESULTS_DIR/EXP_NAME/checkpoints if any")
    g.add_argument("--ckpt-every", type=int, default=5000, help="save checkpoints/NNNNNNN.pt every this many steps")
    g.add_argument("--keep-last", type=int, default=0,
                   help="keep only the newest N numbered checkpoints (0: all); latest.pt is never deleted")
    g.add_argument("--no-local-save", action="store_true", help="write no checkpoints (e.g. benchmarks)")
    g.add_argument("--log-every", type=int, default=100, help="log the training loss every this many steps")
    g.add_argument("--eval-every", type=int, default=0, help="validation loss every this many steps (0: only at the end)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write tensorboard logs")
    add_tracking_args(g)
    g.add_argument("--timing-warmup-steps", type=int, default=2, help="steps left out of the reported throughput")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
