"""Tokenize every image listed in a metadata file: codes / latents / vectors / reconstructions.

    python batch_infer.py --output_dir out/ --pretrained_path weights/meditok_simple_v1.pth \
        --meta_path data/metadata.jsonl --infer_type latent
    torchrun --nproc_per_node 4 batch_infer.py ...          # outputs split over processes

Outputs (one file per distinct input, under --output_dir):
    code    [K, h, w] int64 indices (K codebooks, h = w = image_size / downsampling)
    latent  [vocab_width, h, w] float32 quantized latents (the normalised code vectors)
    vector  [embed_dim] float32 image embedding (encode_image, not normalised)
    image   PNG reconstruction
`<output_dir>/<file name of --meta_path>` receives every successful row with `code_identifier` (relative
to --output_dir) filled in; failed rows go to `<output_dir>/failures.jsonl` (written first) and the exit
status is 1. `<output_dir>/tokenizer.json` (datasets/manifest.py) records the tokenizer and the
preprocessing; `<output_dir>/.batch_infer/` holds the run's own bookkeeping (lock, journals).

Output names. A row's input is its resolved file plus slice_index, slice_axis, its own window and
series. The released name (the identifier's relative path without its extension, plus `_z0042` for
a slice) is used whenever no other input wants it. Otherwise each input takes the first of these
names that is free, the same on every rerun:
    1. the file name with its extension:            ct_slice.dcm.pt, ct_slice.npy.pt
    2. plus the row's own window / series:          scan.nii.gz_z0010_wbone.pt
    3. under the row's root_dir (when it resolved the file):   A/img.png.pt, B/img.png.pt
    4. plus 10 hex digits of a hash of the input:   img.png_3fa94c01d2.pt
A name is free when no other input of this run or of an earlier run into the folder claimed it, it is
not an input file or the metadata, and no file that batch_infer did not write exists there. So no
input is ever overwritten and two inputs never share a file; rows with the same input share one.

Reruns. A rerun skips an output only when the journal records it as made from the same input (same
path, options, size and modification time) and it loads with the expected shape; everything else is
redone. A rerun whose settings (tokenizer weights, config, image size, infer type, preprocessing)
differ from the folder's tokenizer.json stops with an error naming what changed, or, with
--overwrite_changed, deletes the folder's earlier outputs and starts over: never a mix.
A run holds a lock on the folder (a second run stops, or waits with --wait_for_lock). A reader that
kills its process (a decoder segfault, an OOM kill) fails that row only: the run goes on, the row is
listed in failures.jsonl, and reruns skip it (--retry_crashed tries again). A row whose image holds
more than --max_pixels pixels fails before it is decoded (where the format's header tells the size).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.files import FolderLock, FolderLockedError, atomic_save, atomic_write_bytes, atomic_write_text, png_bytes
from datasets.image_dataset import ImageDataset, row_image_path
from datasets.manifest import MANIFEST_NAME, build_manifest, manifest_differences, read_manifest, write_manifest
from datasets.metadata import MetadataError, parse_label, read_metadata, write_metadata
from datasets.readers import (
    CT_WINDOWS, DEFAULT_MAX_PIXELS, FIT_MODES, FORMATS, INTENSITY_MODES, ReadError, parse_axis, parse_index,
)
from models.checkpoint import load_checkpoint
from models.distributed import barrier, setup_distributed
from models.meditok import build_meditok
from scripts.cli import ArgumentParser

INFER_TYPES = ("code", "latent", "vector", "image")
STATE_DIR = ".batch_infer"  # lock, claims, journals: the run's own files
FAILURES = "failures.jsonl"
RESERVED = (FAILURES, MANIFEST_NAME, STATE_DIR)
METADATA_KEY = "<metadata written by batch_infer>"
# Ranks wait at barriers for the slowest share (e.g. one rank got the large volumes): days, not minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=48)


# ----------------------------------------------------------------------------------------------
# Output names
# ----------------------------------------------------------------------------------------------
def strip_image_extension(name: str) -> str:
    """'a.nii.gz' -> 'a'; names without a known image extension (DICOM UIDs like 1.2.840.5) stay whole."""
    lower = name.lower()
    matches = [ext for ext in FORMATS if lower.endswith(ext)]
    return name[: -len(max(matches, key=len))] if matches and len(name) > len(max(matches, key=len)) else name


def mirrored_parts(path_text: str, what: str = "identifier") -> list[str]:
    """Path components to mirror under the output folder: absolute paths go under `_abs/`, '..' is refused."""
    text = str(path_text).replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what} {path_text!r} contains '..'; outputs must stay inside --output_dir")
    if not parts:
        raise ValueError(f"{what} {path_text!r} names no file")
    if text.startswith("/") or (len(parts[0]) == 2 and parts[0][1] == ":"):  # POSIX root or a drive 'C:'
        parts = ["_abs"] + [p.replace(":", "") for p in parts]
    return parts


def slice_suffix(slice_index=None, slice_axis=None) -> str:
    index = parse_index(slice_index)
    return "" if index is None else f"_{'zyx'[parse_axis(slice_axis)]}{index:04d}"


def output_relpath(identifier: str, slice_index=None, slice_axis=None, ext: str = ".pt") -> PurePosixPath:
    """The released output name of a row: the identifier's path without its extension (+ slice suffix)."""
    parts = mirrored_parts(identifier)
    return PurePosixPath(*parts[:-1], strip_image_extension(parts[-1]) + slice_suffix(slice_index, slice_axis) + ext)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,+=-]", "_", str(text))


def row_series(row: dict):
    return row.get("series_uid") or row.get("SeriesInstanceUID")


def input_key(row: dict, meta_path, dataset_dir) -> str:
    """What makes an input distinct: resolved file, slice, axis, the row's own window and series."""
    path = os.path.abspath(row_image_path(row, meta_path, dataset_dir))
    index = parse_index(row.get("slice_index"))
    axis = parse_axis(row.get("slice_axis")) if index is not None else None
    return json.dumps([path, index, axis, row.get("window"), row_series(row)])


def name_candidates(row: dict, key: str, ext: str, dataset_dir) -> list[str]:
    """The names a row may take, in order of preference (see the module docstring)."""
    parts = mirrored_parts(row["identifier"])
    folder, name = parts[:-1], parts[-1]
    suffix = slice_suffix(row.get("slice_index"), row.get("slice_axis"))
    options = "".join(f"_{tag}{_safe(v)}" for tag, v in (("w", row.get("window")), ("s", row_series(row))) if v)
    names = [
        PurePosixPath(*folder, strip_image_extension(name) + suffix + ext),
        PurePosixPath(*folder, name + suffix + ext),
        PurePosixPath(*folder, name + suffix + options + ext),
    ]
    rooted = not dataset_dir and row.get("root_dir") and not Path(str(row["identifier"])).is_absolute()
    if rooted:
        names.append(PurePosixPath(*mirrored_parts(row["root_dir"], "root_dir"), *folder, name + suffix + options + ext))
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    names.append(names[-1].with_name(names[-1].name[: -len(ext)] + f"_{digest}" + ext))
    out: list[str] = []
    for n in names:
        if n.as_posix() not in out:
            out.append(n.as_posix())
    return out


def assign_names(keys: list[str], candidates: list[list[str]], claims: dict[str, str], taken) -> list[str | None]:
    """One name per row: the first candidate that is claimed by the row's own input, or free and wanted by
    no other input at that level. `claims` (name -> key) grows with the assignments; `taken(name, claimed)`
    says a name is unavailable (an input file; a file batch_infer did not write, when unclaimed)."""
    names: list[str | None] = [None] * len(keys)
    pending = list(range(len(keys)))
    depth = max((len(c) for c in candidates), default=0)
    for level in range(depth):
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(candidates[i][min(level, len(candidates[i]) - 1)], []).append(i)
        for name, members in groups.items():
            owner = claims.get(name)
            if taken(name, owner is not None):
                continue
            if owner is None:
                if len({keys[i] for i in members}) > 1:
                    continue
                owner = claims[name] = keys[members[0]]
            for i in members:
                if keys[i] == owner:
                    names[i] = name
        pending = [i for i in pending if names[i] is None]
    return names


def symlinked_parent(output_dir: Path, rel: str, cache: dict) -> Path | None:
    """The first folder of `rel` under output_dir that is a symbolic link (or not a folder), if any."""
    folder = PurePosixPath(rel).parent
    if folder not in cache:
        cache[folder] = None
        p = output_dir
        for part in folder.parts:
            p = p / part
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                cache[folder] = p
                break
    return cache[folder]


def output_ok(path: Path, shape, dtype) -> bool:
    """True if `path` exists and holds a complete output of the expected shape (so a rerun may skip it)."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                return im.size == (shape[1], shape[0])
        t = load_checkpoint(path)
        return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype == dtype
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# The folder's bookkeeping (.batch_infer/): claims, journals, crashed readers
# ----------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Records of an append-only journal; a torn last line (a killed writer) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_jsonl(path: Path, records: list[dict], sync: bool = False) -> None:
    """Append records, one JSON line each; a torn last line left by a killed writer is ended first, so that
    it does not swallow the first new record."""
    if not records:
        return
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)  # to read the last byte; "a" mode writes at the end wherever we are
        torn = end > 0 and f.read(1) != b"\n"
        f.write((("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in records)).encode("utf-8"))
        f.flush()
        if sync:
            os.fsync(f.fileno())


def input_stat(key: str) -> list[int] | None:
    try:
        st = os.stat(json.loads(key)[0])
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def remove_stale_temporaries(output_dir: Path, ours: set[str]) -> int:
    """Delete temporaries left by a killed run, only those of files batch_infer writes (atomic writes
    name them .<name>.<random>.tmp). Called under the folder lock, so no live run owns them."""
    removed = 0
    for root, _, files in os.walk(output_dir):
        rel_root = Path(root).relative_to(output_dir)
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            target = (rel_root / name[1:-len(".tmp")].rsplit(".", 1)[0]).as_posix()
            if target in ours or target.startswith(STATE_DIR + "/"):
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed


class ReadTracker(Dataset):
    """Wraps a dataset: while row i is read, `<state>/reading.<pid>` holds its output name, so a reader
    that kills its process (segfault, OOM kill) leaves the row it died on behind."""

    def __init__(self, dataset: Dataset, names: list[str], state_dir: Path):
        self.dataset, self.names, self.state_dir = dataset, names, state_dir
        self._pid, self._fd = None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if self._pid != os.getpid():  # first item in this (worker) process
            self._pid = os.getpid()
            self._fd = os.open(self.state_dir / f"reading.{self._pid}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        mark = self.names[i].encode()
        os.pwrite(self._fd, mark, 0)
        os.ftruncate(self._fd, len(mark))
        item = self.dataset[i]
        os.ftruncate(self._fd, 0)
        return item


def rows_being_read(state_dir: Path, pids=None) -> dict[int, str]:
    """{pid: output name} of readers that stopped in the middle of a row (all, or those of `pids`)."""
    found = {}
    for p in state_dir.glob("reading.*"):
        pid = p.name.split(".", 1)[1]
        if not pid.isdigit() or (pids is not None and int(pid) not in pids):
            continue
        name = p.read_text(encoding="utf-8", errors="replace")
        if name:
            found[int(pid)] = name
        p.unlink()
    return found


def worker_death(error: BaseException) -> set[int] | None:
    """The pids of DataLoader workers that died, if `error` reports that; else None. torch words it
    'DataLoader worker (pid 123) ...' or, when it notices on a failed queue read, '(pid(s) 12, 34)'."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "DataLoader worker" not in text:
        return None
    pids = re.search(r"\(pid(?:\(s\))? ([\d, ]+)\)", text)
    return {int(n) for n in re.findall(r"\d+", pids.group(1))} if pids else set()


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def infer_batch(model, x: torch.Tensor, infer_type: str, input_range: tuple[float, float]) -> torch.Tensor:
    """x [B, C, S, S] in input_range -> per-row outputs on the CPU (see the module docstring)."""
    g = model.config.grid_size(x.shape[-1])
    B = x.shape[0]
    if infer_type == "code":
        return model.img_to_idx(x).reshape(B, model.num_codebooks, g, g).cpu()  # [B, K, h, w]
    if infer_type == "latent":
        q = model.encode_image_vq(x)  # [B, L, vocab_width]
        return q.transpose(1, 2).reshape(B, model.vocab_width, g, g).float().cpu()
    if infer_type == "vector":
        return model.encode_image(x).float().cpu()  # [B, embed_dim]
    rec = model.img_to_reconstructed_img(x).float()  # [B, 3, S, S] in [-1, 1]
    lo, hi = input_range
    rec = ((rec - lo) / (hi - lo)).clamp(0, 1)
    return (rec * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # [B, S, S, 3]


def save_output(out: torch.Tensor, path: Path) -> None:
    if path.suffix == ".png":
        atomic_write_bytes(png_bytes(out.numpy()), path)
    else:
        atomic_save(out.clone(), path)  # clone: a view would save the whole batch's storage


def failure_record(row: dict, reason: str) -> dict:
    rec = {"identifier": row.get("identifier"), "line": row.get("_line"), "reason": reason}
    if row.get("slice_index") is not None:
        rec["slice_index"] = row.get("slice_index")
    return rec


def dataset_options(args, image_size: int, channels: int) -> dict:
    """The ImageDataset preprocessing of this run (the same values go into the manifest)."""
    return dict(image_size=image_size, channels=channels, value_range=(args.model_input_min, args.model_input_max),
                window=args.window, intensity=args.intensity, percentiles=tuple(args.percentiles), fit=args.fit,
                max_pixels=args.max_pixels or None)


def close_inherited(fd: int | None, worker_id: int) -> None:
    """DataLoader worker start: drop the forked copy of the folder lock, so that a worker outliving a
    killed run does not keep the folder locked."""
    if fd is not None:
        os.close(fd)


def infer_items(model, items: list[dict], output_dir: Path, state_dir: Path, args, device: torch.device,
                options: dict, rank: int, lock_fd: int | None = None, desc: str = "") -> tuple[set[str], dict[str, str], float]:
    """Read, tokenize and save each item {"name", "key", "row"}; returns (names done, {name: reason}, seconds).

    DataLoader workers read and preprocess while the model runs; a small thread pool writes the outputs
    (atomic writes end in fsync, which would otherwise stall the model). Each finished output is
    appended to the rank's journal. When a worker process dies, the row it was reading is failed and
    recorded in crashed.jsonl, and the loader restarts on the rows not yet done.
    """
    input_range = options["value_range"]
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    journal = state_dir / f"done.rank{rank}.jsonl"
    done: set[str] = set()
    failures: dict[str, str] = {}
    handled: set[str] = set()  # read (written, being written or failed) in this run
    pending: deque[tuple[dict, Future]] = deque()

    def finish_oldest():
        item, future = pending.popleft()
        try:
            future.result()
            done.add(item["name"])
            append_jsonl(journal, [{"name": item["name"], "key": item["key"], "stat": item["stat"]}])
        except OSError as e:  # disk full, permissions: that row failed, the run goes on
            failures[item["name"]] = f"could not write {output_dir / item['name']}: {e}"

    bar = tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True, disable=args.no_progress)
    start = time.time()
    remaining = list(items)
    with ThreadPoolExecutor(max_workers=4) as writers:
        while remaining:
            dataset = ReadTracker(
                ImageDataset([it["row"] for it in remaining], meta_path=args.meta_path, dataset_dir=args.dataset_dir,
                             num_classes=args.num_classes, on_error="report", **options),
                [it["name"] for it in remaining], state_dir)
            loader = DataLoader(
                dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                pin_memory=device.type == "cuda", prefetch_factor=4 if args.num_workers > 0 else None,
                worker_init_fn=functools.partial(close_inherited, lock_fd),
            )
            batches = iter(loader)
            death = None
            try:
                for batch in batches:
                    ok = batch["ok"]
                    for j in torch.nonzero(~ok).flatten().tolist():
                        item = remaining[int(batch["index"][j])]
                        failures[item["name"]] = batch["error"][j]
                        handled.add(item["name"])
                    if ok.any():
                        x = batch["image"][ok].to(device, non_blocking=True)
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                            out = infer_batch(model, x, args.infer_type, input_range)
                        for j, k in enumerate(torch.nonzero(ok).flatten().tolist()):
                            item = remaining[int(batch["index"][k])]
                            handled.add(item["name"])
                            pending.append((item, writers.submit(save_output, out[j], output_dir / item["name"])))
                    while len(pending) > 4 * args.batch_size:  # bound the outputs held in memory
                        finish_oldest()
                    bar.update(len(ok))
            except RuntimeError as e:
                if worker_death(e) is None:
                    raise
                death = (worker_death(e), str(e))
            del batches  # shuts the workers down (outside the except block, whose traceback holds them)
            if death is None:
                break
            dead, message = death
            culprits = rows_being_read(state_dir, dead or None)
            rows_being_read(state_dir)  # the other workers were stopped in the middle of rows that did nothing wrong
            if not culprits:
                raise SystemExit(f"a DataLoader worker died outside any row ({message}); rerun to continue")
            by_name = {it["name"]: it for it in remaining}
            records = []
            for name in culprits.values():
                reason = f"the reader process died while reading this row ({message})"
                failures[name] = reason
                handled.add(name)
                records.append({"name": name, "key": by_name[name]["key"] if name in by_name else None,
                                "reason": reason})
            append_jsonl(state_dir / "crashed.jsonl", records, sync=True)
            print(f"rank {rank}: a reader died on {', '.join(sorted(culprits.values()))}; listed as failed, "
                  "continuing with the other rows", file=sys.stderr)
            remaining = [it for it in remaining if it["name"] not in handled]
        while pending:
            finish_oldest()
    bar.close()
    return done, failures, time.time() - start


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def on_rank0(world: int, rank: int, fn):
    """Run fn() on rank 0 and give its result to every rank; an error there stops every rank with its message."""
    result = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except (SystemExit, ValueError, OSError, FolderLockedError) as e:
            result = ("error", str(e.code if isinstance(e, SystemExit) else e))
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result[0] == "error":
        raise SystemExit(result[1])
    return result[1]


def check_paths(args, output_dir: Path) -> Path:
    """The output metadata path; refuses names that would overwrite the input metadata or our own files."""
    meta_name = Path(args.meta_path).name
    if meta_name in RESERVED:
        raise SystemExit(f"--meta_path {args.meta_path}: the name {meta_name} is one of batch_infer's own files "
                         f"in --output_dir ({', '.join(RESERVED)}); rename the metadata file")
    out_meta = output_dir / meta_name
    if out_meta.resolve() == Path(args.meta_path).resolve():
        raise SystemExit(f"--meta_path {args.meta_path} would be overwritten by the output metadata; "
                         "choose another --output_dir")
    return out_meta


def take_over_folder(args, output_dir: Path, state_dir: Path, manifest: dict) -> None:
    """Compare the folder's manifest with this run's; stop on a difference unless --overwrite_changed,
    which deletes the earlier outputs (only files batch_infer claimed) first. Then write the manifest."""
    old = read_manifest(output_dir)
    claims = {c["name"]: c["key"] for c in read_jsonl(state_dir / "claims.jsonl")}
    if old is not None:
        changed = manifest_differences(old, manifest)
    else:
        changed = ["no tokenizer.json, but outputs of an earlier run are recorded"] if claims else []
    if not changed:
        write_manifest(output_dir, manifest)
        return
    if not args.overwrite_changed:
        raise SystemExit(f"{output_dir} holds outputs made with other settings ({MANIFEST_NAME}):\n  "
                         + "\n  ".join(changed)
                         + "\nuse another --output_dir, or pass --overwrite_changed to delete those outputs and redo them")
    removed = 0
    for name in claims:
        path = output_dir / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    for name in (FAILURES,):
        (output_dir / name).unlink(missing_ok=True)
    for p in state_dir.glob("*.jsonl"):
        p.unlink()
    print(f"--overwrite_changed: settings changed ({'; '.join(changed)}); removed {removed} earlier outputs")
    write_manifest(output_dir, manifest)


def plan_run(args, rows: list[dict], output_dir: Path, state_dir: Path, ext: str) -> dict:
    """Rank 0: every row's output name (or failure), claims recorded before any output is written, plus
    what earlier runs finished or crashed on. Returns the plan all ranks follow."""
    claims = {c["name"]: c["key"] for c in read_jsonl(state_dir / "claims.jsonl")}
    errors: list[str | None] = [None] * len(rows)
    keys: list[str | None] = [None] * len(rows)
    cands: list[list[str]] = [[] for _ in rows]
    protected: set[str] = {os.path.realpath(args.meta_path)}
    for i, row in enumerate(rows):
        try:
            if row.get("label") is not None:
                parse_label(row, args.num_classes, args.meta_path)
            keys[i] = input_key(row, args.meta_path, args.dataset_dir)
            cands[i] = name_candidates(row, keys[i], ext, args.dataset_dir)
            protected.add(os.path.realpath(json.loads(keys[i])[0]))
        except (ValueError, ReadError) as e:
            errors[i] = f"{type(e).__name__}: {e}"
    out_real = os.path.realpath(output_dir)

    def taken(name: str, claimed: bool) -> bool:
        if name.split("/", 1)[0] in RESERVED:  # an identifier like '.batch_infer/x.png'
            return True
        path = os.path.join(out_real, name)
        return os.path.realpath(path) in protected or (not claimed and os.path.lexists(path))

    valid = [i for i in range(len(rows)) if errors[i] is None]
    old = set(claims)
    assigned = assign_names([keys[i] for i in valid], [cands[i] for i in valid], claims, taken)
    names: list[str | None] = [None] * len(rows)
    links: dict = {}
    for i, name in zip(valid, assigned):
        if name is None:
            errors[i] = f"no free output name among {cands[i]}"
            continue
        link = symlinked_parent(output_dir, name, links)
        if link is not None:
            errors[i] = f"output folder {link} is a symbolic link (or not a folder); refusing to write outside --output_dir"
            continue
        names[i] = name
    append_jsonl(state_dir / "claims.jsonl", [{"name": n, "key": claims[n]} for n in dict.fromkeys(names)
                                              if n is not None and n not in old], sync=True)

    # What earlier runs left: finished outputs (the latest record wins), rows a reader died on.
    done: dict[str, dict] = {}
    for journal in sorted(state_dir.glob("done.rank*.jsonl")):
        for rec in read_jsonl(journal):
            done[rec.get("name")] = rec
    crashed = {c.get("name"): c for c in read_jsonl(state_dir / "crashed.jsonl")}
    # A row being read when the whole run died (no worker processes, or a kill) is retried once; if the
    # run dies on it again it is treated like a crashed reader.
    suspects_path = state_dir / "suspects.json"
    suspects = json.loads(suspects_path.read_text()) if suspects_path.is_file() else {}
    for name in rows_being_read(state_dir).values():
        suspects[name] = suspects.get(name, 0) + 1
        if suspects[name] >= 2:
            crashed[name] = {"name": name, "reason": "the run died twice while reading this row"}
            append_jsonl(state_dir / "crashed.jsonl", [crashed[name]], sync=True)
    atomic_write_text(json.dumps(suspects), suspects_path)
    if args.retry_crashed:
        crashed = {}
    return {"names": names, "errors": errors, "keys": keys, "done": done, "crashed": crashed,
            "ours": sorted(set(claims) | set(RESERVED))}


def rank_share(names: list[str | None], rank: int, world: int) -> dict[str, int]:
    """This rank's share of the outputs, {name: the first row that wants it}: each distinct name once (rows
    with the same input share it; refused rows, None, are nobody's), in order of first appearance, dealt
    round-robin over the `world` ranks, so shares differ by at most one name."""
    first_row: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is not None:
            first_row.setdefault(name, i)
    return {name: first_row[name] for name in list(first_row)[rank::world]}


def check_share(share: dict[str, int], plan: dict, rows: list[dict], output_dir: Path, shape, dtype,
                progress: bool = False) -> tuple[list[dict], set[str], dict[str, str]]:
    """Split a rank's share (rank_share) into (items to do, names an earlier run finished, {name: reason}
    for rows a reader died on in an earlier run). Finished means: the journal records the output as made
    from the same input (key and size/mtime) and the file loads with the expected shape and dtype."""
    todo: list[dict] = []
    reused: set[str] = set()
    failed: dict[str, str] = {}
    for name, i in tqdm(share.items(), desc="checking existing outputs", disable=not progress, leave=False):
        key = plan["keys"][i]
        stat = input_stat(key)
        if name in plan["crashed"]:
            failed[name] = (f"skipped: {plan['crashed'][name].get('reason')} in an earlier run "
                            "(--retry_crashed reads it again)")
            continue
        rec = plan["done"].get(name)
        if rec and rec.get("key") == key and rec.get("stat") == stat and output_ok(output_dir / name, shape, dtype):
            reused.add(name)
        else:
            todo.append({"name": name, "key": key, "stat": stat, "row": rows[i]})
    return todo, reused, failed


def main(args) -> int:
    rank, world, device = setup_distributed(timeout=COLLECTIVE_TIMEOUT)
    output_dir = Path(args.output_dir)
    state_dir = output_dir / STATE_DIR
    out_meta = check_paths(args, output_dir)

    holder: list[FolderLock] = []  # rank 0 holds the folder for the whole run

    def lock():
        if state_dir.is_symlink():
            raise SystemExit(f"{state_dir} is a symbolic link; refusing to use it")
        holder.append(FolderLock(state_dir, "lock", wait=args.wait_for_lock).acquire())

    on_rank0(world, rank, lock)
    held = holder[0] if holder else None
    try:
        return run(args, rank, world, device, output_dir, state_dir, out_meta, held.fileno() if held else None)
    finally:
        if held is not None:
            held.release()
        if world > 1:
            dist.destroy_process_group()


def run(args, rank: int, world: int, device: torch.device, output_dir: Path, state_dir: Path, out_meta: Path,
        lock_fd: int | None) -> int:
    """The run proper, with the folder locked: manifest, plan, this rank's share, gather. Exit status."""
    model = build_meditok(args.pretrained_path, img_size=args.image_size, device=device)
    image_size = args.image_size or model.img_size
    channels = args.model_input_channel or model.in_chans
    if channels != model.in_chans:
        raise SystemExit(f"--model_input_channel {channels} but the tokenizer takes {model.in_chans} channels")
    options = dataset_options(args, image_size, channels)
    manifest = build_manifest(
        model.config, args.pretrained_path, image_size=image_size, infer_type=args.infer_type,
        window=args.window, intensity=args.intensity, percentiles=args.percentiles, fit=args.fit,
        model_input_min=args.model_input_min, model_input_max=args.model_input_max,
        model_input_channel=channels, max_pixels=args.max_pixels)
    shape, dtype = tuple(manifest["output"]["shape"]), getattr(torch, manifest["output"]["dtype"])
    try:
        rows = read_metadata(args.meta_path)
    except MetadataError as e:
        raise SystemExit(str(e)) from None
    ext = ".png" if args.infer_type == "image" else ".pt"

    def prepare():
        take_over_folder(args, output_dir, state_dir, manifest)
        plan = plan_run(args, rows, output_dir, state_dir, ext)
        removed = remove_stale_temporaries(output_dir, set(plan["ours"]))
        if removed:
            print(f"removed {removed} temporary files left by an interrupted run")
        return plan

    plan = on_rank0(world, rank, prepare)
    names, errors = plan["names"], plan["errors"]

    # Each distinct output once, dealt over ranks; each rank checks its own share for finished outputs.
    todo, reused, failed = check_share(rank_share(names, rank, world), plan, rows, output_dir, shape, dtype,
                                       progress=rank == 0 and not args.no_progress)
    if rank == 0:
        print(f"{len(rows)} rows, {len(set(names) - {None})} distinct inputs; this process: {len(todo)} to do, "
              f"{len(reused)} already done; {sum(e is not None for e in errors)} rows refused; "
              f"{args.infer_type} {tuple(shape)} at {image_size}px on {device}" + (f" ({world} processes)" if world > 1 else ""))

    new_done, new_failed, elapsed = infer_items(
        model, todo, output_dir, state_dir, args, device, options, rank, lock_fd,
        desc=f"{args.infer_type} (rank {rank})" if world > 1 else args.infer_type)
    done = reused | new_done
    failed.update(new_failed)
    if todo:
        print(f"rank {rank}: {len(todo)} images in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.1f} images/s)")

    # Gather: every rank writes its part; rank 0 writes the failures, then the metadata.
    parts = state_dir / "parts"
    if world > 1:
        atomic_write_text(json.dumps({"done": sorted(done), "failed": failed}), parts / f"rank{rank}.json")
        barrier()
        if rank == 0:
            for r in range(1, world):
                part = json.loads((parts / f"rank{r}.json").read_text())
                done.update(part["done"])
                failed.update(part["failed"])
            shutil.rmtree(parts)
    status = 0
    if rank == 0:
        failures = []
        for i, row in enumerate(rows):
            reason = errors[i] if errors[i] is not None else failed.get(names[i])
            if reason is None and names[i] not in done:
                reason = "no output was written (see the log)"
            if reason is not None:
                failures.append(failure_record(row, reason))
        failures_path = output_dir / FAILURES
        if failures:  # first: a full disk must not lose the list of what failed
            atomic_write_text("".join(json.dumps(f) + "\n" for f in failures), failures_path)
        out_rows = [{**row, "code_identifier": names[i]} for i, row in enumerate(rows)
                    if errors[i] is None and names[i] in done and names[i] not in failed]
        append_jsonl(state_dir / "claims.jsonl", [{"name": out_meta.name, "key": METADATA_KEY}], sync=True)
        write_metadata(out_rows, out_meta)
        if not failures:
            failures_path.unlink(missing_ok=True)  # a rerun that fixed everything leaves no stale report
        for p in state_dir.glob("reading.*"):  # readers of this run that finished cleanly
            if p.stat().st_size == 0:
                p.unlink()
        (state_dir / "suspects.json").unlink(missing_ok=True)
        print(f"wrote {len(out_rows)} rows to {out_meta}"
              + (f"; {len(failures)} failed rows listed in {failures_path}" if failures else ""))
        status = 1 if failures else 0
    if world > 1:
        box = [status]
        dist.broadcast_object_list(box, src=0)
        status = box[0]
    return status


def parse_args(argv=None):
    parser = ArgumentParser(description="Tokenize the images of a metadata file with MedITok.")
    io_ = parser.add_argument_group("input / output")
    io_.add_argument("--output_dir", required=True, help="folder for the outputs, the filled metadata, failures.jsonl "
                     "and tokenizer.json")
    io_.add_argument("--pretrained_path", required=True, help="tokenizer weights: the released state dict or our checkpoint")
    io_.add_argument("--meta_path", required=True, help="metadata file (.csv, .jsonl or .json) with an identifier column")
    io_.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against "
                     "(default: the row's root_dir, else the metadata file's folder)")
    io_.add_argument("--infer_type", default="code", choices=INFER_TYPES,
                     help="code [K,h,w] int64 | latent [vocab_width,h,w] | vector [embed_dim] | image (PNG reconstruction)")
    model = parser.add_argument_group("model input")
    model.add_argument("--image_size", type=int, default=None, help="side of the square model input (default: the checkpoint's)")
    model.add_argument("--model_input_min", type=float, default=-1.0, help="value that black maps to")
    model.add_argument("--model_input_max", type=float, default=1.0, help="value that white maps to")
    model.add_argument("--model_input_channel", type=int, default=None,
                       help="input channels (default: the tokenizer's; grey images are replicated)")
    model.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPU (CPU runs fp32)")
    pre = parser.add_argument_group("preprocessing")
    pre.add_argument("--window", default=None, help=f"CT window for CT data: a preset ({', '.join(CT_WINDOWS)}) "
                     "or 'level,width' in HU; a row's own 'window' column wins")
    pre.add_argument("--intensity", default="auto", choices=INTENSITY_MODES, help="intensity scaling (see datasets/readers.py)")
    pre.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"),
                     default=inspect.signature(ImageDataset).parameters["percentiles"].default,
                     help="percentile range mapped to [0, 1] by percentile scaling")
    pre.add_argument("--fit", default="pad", choices=FIT_MODES, help="make images square by padding, centre-cropping or stretching")
    pre.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="rows whose image (or volume) holds more pixels fail before decoding; 0 = no limit")
    pre.add_argument("--num_classes", type=int, default=None, help="rows whose label is outside [0, num_classes) fail")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    run.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes reading images")
    run.add_argument("--overwrite_changed", action="store_true",
                     help="if --output_dir holds outputs made with other settings (tokenizer, size, preprocessing), "
                     "delete them and redo (default: stop with an error naming what changed)")
    run.add_argument("--wait_for_lock", type=float, default=None, metavar="SECONDS",
                     help="if another run is using --output_dir, wait up to this long (default: stop at once)")
    run.add_argument("--retry_crashed", action="store_true",
                     help="read again the rows on which a reader process died in an earlier run")
    run.add_argument("--no_progress", action="store_true", help="hide the progress bar (logs)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if not args.model_input_max > args.model_input_min:
        parser.error("--model_input_max must be greater than --model_input_min")
    if args.max_pixels < 0:
        parser.error("--max_pixels must be 0 (no limit) or positive")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
