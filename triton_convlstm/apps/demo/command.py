"""``python -m triton_convlstm demo``: train a moving-digit nowcaster in minutes.

Trains :class:`~.nowcast_model.NowcastModel` (10 frames in, 10 predicted) on
:class:`~.moving_digits.MovingDigits`, then reports train/validation MSE against the
copy-last-frame baseline and writes predictions.png, loss.png and checkpoint.pt to --out.

    python -m triton_convlstm demo                        # CPU: ~1.5 minutes; GPU: a larger preset
    python -m triton_convlstm demo --steps 200 --resume   # 200 more steps from --out/checkpoint.pt
    torchrun --nproc_per_node=2 -m triton_convlstm demo --ddp

Batch k is a pure function of (seed, k) (see moving_digits), so a resumed run sees exactly the
batches a straight run would, and under --ddp every rank builds the same global batch and trains
on its own contiguous shard; DDP's gradient averaging then equals the single-process gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import ArgumentParser, UsageError, import_failure, one_line, unwritable
from .moving_digits import MovingDigits, copy_last_frame_mse

T_IN = T_OUT = 10
# Defaults per device type. CPU: ~80 s on 2 idle cores (startup included), so it stays inside
# 3 minutes even when the cores are shared; validation MSE ~0.45x copy-last-frame. CUDA: the
# Shi et al. layout (64x64 frames, 4x4 patches), bf16 autocast.
PRESETS = {
    "cpu": dict(frame_size=32, patch=2, hidden=16, layers=2, batch_size=16, steps=400, lr=3e-3,
                val_size=128),
    "cuda": dict(frame_size=64, patch=4, hidden=64, layers=2, batch_size=32, steps=1500, lr=1e-3,
                 val_size=512),
}
# Settings that define the run; on --resume they come from the checkpoint and may not change.
RUN_KEYS = ("frame_size", "patch", "hidden", "layers", "batch_size", "lr", "val_size", "seed")
# Settings that do not change what is trained: on --resume they come from the checkpoint unless
# given again (checkpoints written before a key was carried fall back to its default).
CARRIED_DEFAULTS = {"eval_every": 0}
# What checkpoint() writes; --resume refuses a file without all of it.
CKPT_KEYS = ("args", "model", "optimizer", "step", "history", "rng")
SMOOTH = 20  # the "final train MSE" is the mean over this many last steps
# moving_digits mixes seed + 10_000 (validation) with the batch index into a 64-bit generator
# seed; below 2**32 that stays far inside the range for any reachable step count.
SEED_LIMIT = 2**32
# Adam's first step size is lr / (1 - beta1) = 10 * lr, applied as a float32 scalar.
LR_MAX = torch.finfo(torch.float32).max / 10
# The [demo] extra in pyproject.toml: (module imported, package to install).
DEMO_DEPS = (("tqdm", "tqdm"), ("matplotlib.figure", "matplotlib"),
             ("sklearn.datasets", "scikit-learn"))


def _per_device(key: str) -> str:
    """'default: <cpu> on CPU, <cuda> on CUDA', from PRESETS (for --help)."""
    return f"default: {PRESETS['cpu'][key]:g} on CPU, {PRESETS['cuda'][key]:g} on CUDA"


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line; unset options stay None until the run fills them.

    Returns:
        A :class:`~..cli.ArgumentParser` (a bad argument raises UsageError). Options whose
        default depends on the device (PRESETS) or on the checkpoint parse to None.
    """
    run_flags = ", ".join(f"--{key.replace('_', '-')}" for key in RUN_KEYS)
    p = ArgumentParser(prog="python -m triton_convlstm demo",
                description="Train a moving-digit nowcaster in minutes: 10 frames in, 10 "
                            "predicted; reports MSE against the copy-last-frame baseline and "
                            "writes predictions.png, loss.png and checkpoint.pt to --out.",
                epilog=f"On --resume, {run_flags} come from the checkpoint and may not change.")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, help="optimizer steps to run now, after the checkpoint's "
                   f"on --resume ({_per_device('steps')})")
    p.add_argument("--batch-size", type=int, help="global batch, split across --ddp ranks "
                   f"({_per_device('batch_size')})")
    p.add_argument("--hidden", type=int, help=f"ConvLSTM hidden channels ({_per_device('hidden')})")
    p.add_argument("--layers", type=int, help="ConvLSTM layers in encoder and forecaster "
                   f"({_per_device('layers')})")
    p.add_argument("--frame-size", type=int, help="frame height = width "
                   f"({_per_device('frame_size')})")
    p.add_argument("--patch", type=int, help="space-to-depth factor before the ConvLSTM "
                   f"({_per_device('patch')})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({_per_device('lr')})")
    p.add_argument("--val-size", type=int, help=f"validation sequences ({_per_device('val_size')})")
    p.add_argument("--seed", type=int, help="seed of weights and data, 0 <= SEED < 2**32 "
                   "(default 0)")
    p.add_argument("--eval-every", type=int, help="steps between validations and checkpoints "
                   "(default: 4 per run; on --resume, the checkpoint's)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from CKPT (default: OUT/checkpoint.pt)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; run by torchrun")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device: unknown device {name!r} (expected cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {name!r} is not supported (expected cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


def _resolve(args: argparse.Namespace, device: torch.device, ckpt: dict | None) -> None:
    """Fill unset options from the checkpoint (on --resume) or the device preset; validate."""
    preset = dict(PRESETS[device.type], seed=0)
    for key in RUN_KEYS:
        given = getattr(args, key)
        if ckpt is not None:
            saved = ckpt["args"][key]
            if given is not None and given != saved:
                raise UsageError(f"--{key.replace('_', '-')} {given} differs from the checkpoint's "
                               f"{saved}; leave it out to resume")
            setattr(args, key, saved)
        elif given is None:
            setattr(args, key, preset[key])
    for key, default in CARRIED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default if ckpt is None else ckpt["args"].get(key, default))
    if args.steps is None:
        args.steps = preset["steps"]
    for key in ("steps", "eval_every"):
        if getattr(args, key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    for key in ("batch_size", "hidden", "layers", "patch", "val_size"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not 0 < args.lr <= LR_MAX:  # also refuses inf and nan
        raise UsageError(f"--lr must be > 0 and <= {LR_MAX:.3g}, got {args.lr}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in 0..{SEED_LIMIT - 1} (below 2**32), got {args.seed}")
    if args.frame_size < 8 or args.frame_size % args.patch:
        raise UsageError(f"--frame-size must be >= 8 and divisible by --patch {args.patch}, "
                       f"got {args.frame_size}")


def _dist_env(ddp: bool) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without --ddp."""
    if not ddp:
        return 0, 1, 0
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise UsageError(f"--ddp needs torchrun's environment ({', '.join(missing)} not set); "
                       "launch with: torchrun --nproc_per_node=N -m triton_convlstm demo --ddp")
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def _not_a_checkpoint(path: Path, reason: str) -> UsageError:
    return UsageError(f"--resume {path}: not a demo checkpoint ({reason})")


def _load_checkpoint(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) for --resume, (None, None) without it. The checkpoint is checked to
    hold everything _resolve and _run read from it; anything else is an UsageError."""
    if args.resume is None:
        return None, None
    path = Path(args.resume or Path(args.out) / "checkpoint.pt")
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        # weights_only=False: the checkpoint holds our own args dict and RNG states (trusted).
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any file at all: unpickling, zip and I/O errors of every kind
        raise _not_a_checkpoint(path, one_line(exc)) from None
    if not isinstance(ckpt, dict):
        raise _not_a_checkpoint(path, f"holds a {type(ckpt).__name__}, not a dict")
    missing = [key for key in CKPT_KEYS if key not in ckpt]
    if missing:
        raise _not_a_checkpoint(path, f"no {', '.join(missing)}")
    saved = ckpt["args"]
    if not isinstance(saved, dict):
        raise _not_a_checkpoint(path, f"its args are a {type(saved).__name__}, not a dict")
    missing = [key for key in RUN_KEYS if key not in saved]
    if missing:
        raise _not_a_checkpoint(path, f"its args lack {', '.join(missing)}")
    for key in (*RUN_KEYS, *CARRIED_DEFAULTS):
        value = saved.get(key, 0)
        kinds = (int, float) if key == "lr" else int
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise _not_a_checkpoint(path, f"its {key} is {value!r}")
    history = ckpt["history"]
    if (not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(history, dict)
            or not all(isinstance(history.get(k), list) for k in ("train", "train_copy", "val"))
            or not isinstance(ckpt["rng"], dict) or "torch" not in ckpt["rng"]):
        raise _not_a_checkpoint(path, "bad step, history or rng entry")
    return path, ckpt


def _check_out(out: Path) -> None:
    """An unusable --out reported before training rather than at the first checkpoint."""
    reason = unwritable(out)
    if reason is not None:
        raise UsageError(f"--out {out}: cannot create or write to this folder ({reason})")


def _check_dependencies() -> None:
    """Import the [demo] extra up front: a missing package is one line, not a traceback (and
    not, for matplotlib, a traceback after the whole training run)."""
    for module, package in DEMO_DEPS:
        failure = import_failure(module)
        if failure is not None:
            raise UsageError(f'needs {package} (the demo extra): pip install -e ".[demo]"'
                           + (f" ({failure})" if failure else ""))


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, device: torch.device, chunk: int = 64) -> float:
    """Mean squared error of ``model`` on ``val``, ``chunk`` sequences at a time.

    The model runs in eval mode (under bf16 autocast on CUDA) and is put back in train mode.

    Args:
        model: maps (n, T_IN, C, H, W) observed frames to (n, T_OUT, C, H, W) predictions.
        val: (N, T_IN + T_OUT, C, H, W) sequences on ``device``: inputs, then targets.
        device: where ``model`` and ``val`` are; picks the autocast.
        chunk: sequences per forward call.

    Returns:
        The MSE over all predicted pixels of all N sequences.
    """
    model.eval()
    total = 0.0
    for start in range(0, len(val), chunk):
        seq = val[start:start + chunk]
        with _autocast(device):
            pred = model(seq[:, :T_IN])
        total += F.mse_loss(pred.float(), seq[:, T_IN:], reduction="sum").item()
    model.train()
    return total / val[:, T_IN:].numel()


def _autocast(device: torch.device):
    # bf16 on the GPU (the Triton path); the CPU stays in fp32, where bf16 is slower, not faster.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``python -m triton_convlstm demo``.

    Args:
        argv: the arguments after ``demo``; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success (and after --help), 2 for bad arguments (with a one-line
        message on stderr), 130 when interrupted (KeyboardInterrupt).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        _check_dependencies()
        return _run(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ...backend import resolve_backend
    from .nowcast_model import NowcastModel

    rank, world, local_rank = _dist_env(args.ddp)
    device = _device(args.device, local_rank)
    ckpt_path, ckpt = _load_checkpoint(args)
    _resolve(args, device, ckpt)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    try:
        backend = resolve_backend(args.backend, device)
    except RuntimeError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None
    lead = rank == 0
    out = Path(args.out)
    if lead:  # only rank 0 writes
        _check_out(out)

    if args.ddp:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # Same seed on every rank -> same initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(args.seed)
    model = NowcastModel(hidden=args.hidden, num_layers=args.layers, patch=args.patch,
                         out_frames=T_OUT, backend=args.backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, history = 0, {"train": [], "train_copy": [], "val": []}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise _not_a_checkpoint(ckpt_path, one_line(exc)) from None
        step, history = ckpt["step"], ckpt["history"]
    train_model = model
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    train = MovingDigits(T_IN + T_OUT, args.frame_size, split="train", seed=args.seed)
    # Validation: other digit images (split) and another seed, so no trajectory is shared either.
    val = None
    if lead:
        val = MovingDigits(T_IN + T_OUT, args.frame_size, split="val", seed=args.seed + 10_000)
        val = val.fixed_set(args.val_size).to(device)
    shard = args.batch_size // world
    eval_every = args.eval_every or max(1, args.steps // 4)

    def checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        _save(out / "checkpoint.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                           step=step, args=vars(args), rng=rng, history=history))

    def diverged(at: int, what: str, value: float) -> UsageError:
        bar.close()
        return UsageError(f"training diverged at step {at} ({what} {value}); lower --lr")

    def validate() -> None:
        """Validation MSE into the history, then a checkpoint (never one of a NaN model)."""
        mse = evaluate(model, val, device)
        if not math.isfinite(mse):
            raise diverged(step, "validation MSE", mse)
        history["val"].append((step, mse))
        checkpoint()

    from tqdm import tqdm

    bar = tqdm(total=args.steps, disable=args.quiet or not lead, dynamic_ncols=True,
               desc=f"demo [{backend} on {device.type}]", unit="step")
    pending: list[torch.Tensor] = []  # per-step (loss, copy-last) pairs not yet moved to the host
    train_time, seen, end = 0.0, 0, step + args.steps
    while step < end:
        tick = time.perf_counter()
        batch = train.batch(step, args.batch_size, device)[rank * shard:(rank + 1) * shard]
        inputs, targets = batch[:, :T_IN], batch[:, T_IN:]
        with _autocast(device):
            pred = train_model(inputs)
        loss = F.mse_loss(pred.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = torch.stack([loss.detach(), copy_last_frame_mse(inputs, targets)])
        if args.ddp:  # log the global-batch numbers, not this rank's shard
            torch.distributed.all_reduce(stats)
            stats /= world
        pending.append(stats)
        step += 1
        # Host syncs only every 10 steps (and at validation) keep the GPU queue full.
        if len(pending) == 10 or step % eval_every == 0 or step == end:
            for loss_v, copy_v in torch.stack(pending).tolist():
                history["train"].append(loss_v)
                history["train_copy"].append(copy_v)
                # Under --ddp the loss is all-reduced, so every rank stops at the same step.
                if not math.isfinite(loss_v):
                    raise diverged(len(history["train"]), "loss", loss_v)
            pending.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        train_time += time.perf_counter() - tick
        seen += args.batch_size
        if not pending:
            bar.set_postfix(loss=f"{history['train'][-1]:.4f}", seq_s=f"{seen / train_time:.0f}")
        bar.update(1)
        if lead and (step % eval_every == 0 or step == end):
            validate()
    bar.close()

    if lead:
        if not history["val"] or history["val"][-1][0] != step:  # e.g. --steps 0
            validate()
        _report(args, history, val, model, device, backend, world, seen, train_time, step, out)
    if args.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _report(args, history, val, model, device, backend, world, seen, train_time, step, out):
    inputs, targets = val[:, :T_IN], val[:, T_IN:]
    val_copy = copy_last_frame_mse(inputs, targets).item()
    val_zero = targets.float().pow(2).mean().item()
    with torch.no_grad(), _autocast(device):
        model.eval()
        pred = model(inputs[:2]).float()
    plot_predictions(out / "predictions.png", inputs[:2], targets[:2], pred)
    plot_loss(out / "loss.png", history, val_copy, val_zero)
    rate = (f"{seen / train_time:.1f} sequences/s ({seen} sequences in {train_time:.1f} s)"
            if seen else "n/a (no steps run)")
    print(f"\nbackend     {backend} on {device} ({world} process{'es' * (world > 1)})")
    print(f"trained     {step} steps, batch {args.batch_size}, {args.frame_size}x"
          f"{args.frame_size} frames, {T_IN} in -> {T_OUT} predicted")
    print(f"throughput  {rate}")
    print(f"{'MSE':<22}{'model':>9}{'copy-last':>11}{'ratio':>8}{'all-black':>11}")
    if history["train"]:
        n = min(SMOOTH, len(history["train"]))
        tr = sum(history["train"][-n:]) / n
        tc = sum(history["train_copy"][-n:]) / n
        print(f"{f'train (last {n} steps)':<22}{tr:>9.5f}{tc:>11.5f}{tr / tc:>8.2f}{'':>11}")
    va = history["val"][-1][1]
    print(f"{f'validation ({len(val)} seq)':<22}{va:>9.5f}{val_copy:>11.5f}"
          f"{va / val_copy:>8.2f}{val_zero:>11.5f}")
    # "Clearly": well under copy-last AND under all-black frames, which alone beat copy-last
    # (a blank guess is penalised once per digit, a wrong copy twice).
    clearly = va < 0.75 * min(val_copy, val_zero)
    verdict = "clearly beats" if clearly else "does NOT clearly beat"
    print(f"the model {verdict} the copy-last-frame baseline (and all-black frames) on validation")
    print(f"wrote       {out / 'predictions.png'}, {out / 'loss.png'}, {out / 'checkpoint.pt'}")


def plot_predictions(path: Path, inputs: torch.Tensor, targets: torch.Tensor,
                     pred: torch.Tensor) -> None:
    """predictions.png: per example three rows (input, truth, predicted), one column per frame.

    Args:
        path: the PNG file to write.
        inputs: (N, T_IN, 1, H, W) observed frames in [0, 1].
        targets: (N, T_OUT, 1, H, W) true future frames in [0, 1].
        pred: (N, T_OUT, 1, H, W) predicted future frames in [0, 1].
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg by default

    # One mosaic image instead of a grid of axes: drawing 60 axes takes seconds, this does not.
    rows = [seq[i] for i in range(len(inputs)) for seq in (inputs, targets, pred)]
    names = [name for _ in range(len(inputs)) for name in ("input", "truth", "predicted")]
    cols, (h, w), gap = max(T_IN, T_OUT), inputs.shape[-2:], 2
    mosaic = torch.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap), 0.35)
    for r, seq in enumerate(rows):
        for t in range(len(seq)):
            mosaic[r * (h + gap):r * (h + gap) + h, t * (w + gap):t * (w + gap) + w] = seq[t, 0]
    fig = Figure(figsize=(cols * 0.8 + 1, len(rows) * 0.8 + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic.float().cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(len(rows))], names, fontsize=8)
    ax.set_xticks([t * (w + gap) + w / 2 for t in range(cols)], range(1, cols + 1), fontsize=7)
    ax.set_title(f"{T_IN} input frames, then the {T_OUT} true and predicted future frames",
                 fontsize=9)
    fig.savefig(path, dpi=100)


def plot_loss(path: Path, history: dict[str, list], val_copy: float, val_zero: float) -> None:
    """loss.png: train MSE per step (raw and smoothed), validation MSE, and the baselines.

    Args:
        path: the PNG file to write.
        history: the run's history: "train", a train MSE per step (smoothed over the last
            SMOOTH steps), and "val", (step, validation MSE) pairs.
        val_copy: validation MSE of the copy-last-frame baseline (a horizontal line).
        val_zero: validation MSE of all-black frames (a horizontal line).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train = history["train"]
    if train:
        steps = range(1, len(train) + 1)
        ax.plot(steps, train, color="tab:blue", alpha=0.3, lw=0.8)
        k = min(SMOOTH, len(train))
        smooth = [sum(train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1])
                  for i in range(len(train))]
        ax.plot(steps, smooth, color="tab:blue", label="train MSE")
    vs, vm = zip(*history["val"]) if history["val"] else ((), ())
    ax.plot(vs, vm, "o-", color="tab:orange", label="validation MSE")
    ax.axhline(val_copy, color="tab:red", ls="--", label="copy-last-frame (validation)")
    ax.axhline(val_zero, color="gray", ls=":", label="all-black frames (validation)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
