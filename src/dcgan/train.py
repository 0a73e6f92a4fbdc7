"""The training loop (`gan-train`): alternate D and G updates, keep an EMA of G, log, draw grids, checkpoint.

`train(cfg, run_dir)` holds the whole loop; everything it needs comes in as arguments, checked by
config.validate_train (the command line: cli.py). To resume, run the same command again with
`trainer.resume=auto` (and the same `hydra.run.dir`).
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from dcgan import augment, checkpoint, data, distributed, health, models, report, runcard, speed
from dcgan.errors import UserError, at_least, check_seeds, signal_exit
from dcgan.log import MetricsLog
from dcgan.metrics import TrainingEvaluator
from dcgan.losses import build_loss
from dcgan.health import HealthConfig
from dcgan.optim import EMA, build_optimizer
from dcgan.images import generate, latents, save_grid

log = logging.getLogger(__name__)

# Exit codes of a run stopped by a signal after saving its checkpoint (128 + signal number, as shells do:
# 130 for SIGINT, 143 for SIGTERM); 2 is a usage error, health.DIVERGED_EXIT_CODE (3) a divergence.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class TrainerConfig:
    batch_size: int = 128  # real images per D update (and fakes per G update)
    max_steps: int = 0  # generator updates to run; 0 = run `epochs` epochs
    epochs: int = 5  # passes over the data set (counted in D's real batches), when max_steps = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    d_steps: int = 1  # discriminator updates per generator update
    sample_every: int = 500  # steps between fixed-noise grids in samples/
    ckpt_every: int = 1000  # steps between step_NNNNNN.pt checkpoints (last.pt is written with them)
    log_every: int = 50  # steps between metrics.jsonl rows (the only GPU syncs of the loop)
    resume: Optional[str] = None  # a checkpoint path, or "auto" for checkpoints/last.pt of the run dir
    overwrite: bool = False  # start over in a run dir that holds a run: its files move to RUN_DIR/replaced/<time>/
    amp: bool = False  # bf16 autocast (CUDA; also allowed on CPU)
    # Speed options (speed.py; measured in docs/PERFORMANCE.md): the same maths on other layouts and kernels.
    channels_last: bool = True  # NHWC layout for G and D
    compile: bool = False  # torch.compile G and D; a failure in the trial step before training falls back to eager
    cuda_graphs: bool = False  # CUDA only: compile in reduce-overhead mode (CUDA graphs of G's and D's passes); unmeasured
    fused_optimizer: bool = True  # fused kernels for Adam/AdamW/SGD/Adagrad (CUDA and CPU); other optimizers ignore it
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest conv algorithm for our fixed shapes
    ema: float = 0.999  # decay of the generator's moving average; 0 turns it off
    keep_last: int = 3  # step checkpoints kept (0 = keep all); last.pt and the newest healthy one are always kept
    on_divergence: str = "stop"  # stop | rollback: what NaN/Inf or a collapse does (health.py; thresholds in `health`)
    health: HealthConfig = field(default_factory=HealthConfig)
    deterministic: bool = False  # PyTorch's deterministic algorithms (a warning where an op has none)
    grid_size: int = 64  # images in each progress grid
    progress: bool = True  # tqdm progress bar
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout_s: float = 1800.0  # under torchrun: a collective waiting longer than this ends the job
    eval_every: int = 0  # steps between FID/KID evaluations of the sampling generator (see `eval`); 0 = never


def validate_trainer(t: TrainerConfig) -> None:
    at_least("trainer.batch_size", t.batch_size, 1)
    at_least("trainer.max_steps", t.max_steps, 0)
    at_least("trainer.epochs", t.epochs, 0)
    if t.max_steps == 0 and t.epochs == 0:
        raise UserError("nothing to train: set trainer.max_steps or trainer.epochs above 0")
    at_least("trainer.d_steps", t.d_steps, 1)
    for key in ("sample_every", "ckpt_every", "log_every", "grid_size"):
        at_least(f"trainer.{key}", t[key], 1)
    at_least("trainer.keep_last", t.keep_last, 0)
    at_least("trainer.eval_every", t.eval_every, 0)
    # Rank r seeds its dropout with seed + r, and the training latents come from seed + 1.
    check_seeds("trainer.seed", t.seed, t.seed + max(1, distributed.world().size - 1))
    if not t.dist_timeout_s > 0:
        raise UserError(f"trainer.dist_timeout_s must be > 0 seconds, got {t.dist_timeout_s}")
    if not 0.0 <= t.ema < 1.0:
        raise UserError(f"trainer.ema must be in [0, 1) (0 turns it off), got {t.ema}")
    distributed.validate_device("trainer.device", t.device)
    if t.cuda_graphs and (t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())):
        raise UserError("trainer.cuda_graphs=true needs a CUDA device (CUDA graphs replay GPU kernels); set it false on CPU")


def train(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Train from `cfg` (a composed TrainConfig) writing into `run_dir`; returns the last metrics row."""
    t = cfg.trainer
    device, rank = distributed.setup(t.device, t.dist_timeout_s), distributed.world()
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    images = data.load_images(cfg.dataset)
    local_batch = distributed.per_rank_batch(t.batch_size)  # batch_size is global: split over ranks
    batches = data.ImageBatches(images, local_batch, device, t.seed, rank.rank, rank.size)
    G, D = models.build_generator(cfg, device), models.build_discriminator(cfg, device)
    speed.prepare_networks(cfg, G, D, local_batch, device)  # layout, cuDNN, compile: before EMA and DDP copy them
    runcard.use_deterministic_algorithms(t.deterministic)  # after prepare_networks: it turns cuDNN's autotuner off
    # The EMA's BatchNorm statistics are measured on ~2,048 fixed latents in global-size batches: N ranks agree with one process.
    ema_batch = functools.partial(models.random_latents, (t.batch_size, cfg.generator.z_dim), cfg.generator.z_distribution, device=device)
    G_ema = EMA(G, t.ema, ema_batch, device, batches=-(-2048 // t.batch_size)) if t.ema > 0 else None
    G_ddp, D_ddp = distributed.wrap(G, device, t.sync_bn), distributed.wrap(D, device, t.sync_bn)
    # The losses judge every image through DiffAugment (augment.policy); with no policy these are D itself.
    D_for_d_step, D_for_g_step = augment.wrap(D_ddp, cfg.augment.policy), augment.wrap(D, cfg.augment.policy)
    torch.manual_seed(t.seed + rank.rank)  # dropout differs between ranks
    opt_g = build_optimizer(G.parameters(), cfg.optimizer.generator, "optimizer.generator", t.fused_optimizer)
    opt_d = build_optimizer(D.parameters(), cfg.optimizer.discriminator, "optimizer.discriminator", t.fused_optimizer)
    loss = build_loss(cfg.loss)
    noise = torch.Generator(device).manual_seed(t.seed + 1)  # training latents; its state is checkpointed
    grid_z = latents(list(range(t.grid_size)), cfg.generator.z_dim, cfg.generator.z_distribution, device)
    autocast = speed.autocast(t.amp, device)
    total_steps = t.max_steps or max(1, t.epochs * batches.batches_per_epoch // t.d_steps)
    checkpoints, samples = run_dir / "checkpoints", run_dir / "samples"
    run_dir.mkdir(parents=True, exist_ok=True)
    guard = health.Guard(t.health, images, device)  # NaN/Inf and collapse; trainer.on_divergence acts on what it finds
    parts = dict(G=G, D=D, G_ema=G_ema, opt_g=opt_g, opt_d=opt_d, batches=batches, noise=noise, guard=guard)

    step, changes = resume(t.resume, checkpoints, cfg, parts)
    runcard.start(run_dir, cfg, images, device, step, changes)  # run_card.json: command, versions, data fingerprint, seed
    evaluator = TrainingEvaluator(cfg, images, device, checkpoints, resumed=step > 0) if t.eval_every and rank.is_main else None
    log.info("data: %d images %s; %d steps of batch %d on %s -> %s", len(images), tuple(images.shape[1:]), total_steps, t.batch_size, device, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step, total_steps, t.batch_size * t.d_steps, t.progress, cfg.logger, {"g": opt_g, "d": opt_d})
    stop = StopRequest(check_every=t.log_every if rank.enabled else 1, device=device)
    row: Dict[str, Any] = {}
    stopping = False
    while step < total_steps and not stopping and guard.fault is None:
        # D update(s): fakes come from a no-grad G forward, since D's step needs no gradient through G.
        for _ in range(t.d_steps):
            real = batches.next()
            with torch.no_grad(), autocast:
                fake = G_ddp(sample_z(t.batch_size, cfg, noise, device, rank))
            with autocast:
                loss_d, stats = loss.discriminator(D_for_d_step, real, fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            guard.watch("D", loss_d, D)  # NaN/Inf flags stay on the device: no sync
            opt_d.step()

        # G update on fresh latents; D's weights need no gradient here, so the plain D (no DDP) is frozen.
        with autocast, frozen(D):
            loss_g = loss.generator(D_for_g_step, G_ddp(sample_z(t.batch_size, cfg, noise, device, rank)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        guard.watch("G", loss_g, G)
        opt_g.step()
        if G_ema is not None:
            G_ema.update(G, step)
        step += 1

        # Evaluation, logging, grids and checkpoints; the metrics write is the only GPU sync.
        metrics.add({"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **stats})
        stopping = stop.agreed(step)
        last = step == total_steps or stopping
        # FID/KID (rank 0) go into this step's metrics row; best.pt follows the best FID.
        evaluating = t.eval_every > 0 and (step % t.eval_every == 0 or step == total_steps)
        scores = evaluator(step, sampling_generator(G, G_ema), lambda: training_state(cfg, step, parts)) if evaluator and evaluating else {}
        if step % t.log_every == 0 or last or evaluating:
            row = metrics.write(step, batches.epoch, scores)
            guard.check_row(step, row)
        if rank.is_main and (step % t.sample_every == 0 or last):
            grid = generate(sampling_generator(G, G_ema), grid_z)
            guard.check_grid(step, grid)
            metrics.add_grid(save_grid(grid, samples / f"step_{step:06d}.png", nrow=8), step)
        if (step % t.ckpt_every == 0 or last) and guard.healthy(step, parts):  # a sync: never a checkpoint of NaN weights
            # Each rank's BatchNorm statistics follow its own batches (DDP hands out rank 0's at every forward); save rank 0's.
            distributed.broadcast_buffers(G, D)
            replicas = distributed.replica_checksums(G, D, *([G_ema.calibrated()] if G_ema else []))
            if rank.is_main:
                checkpoint.save({**training_state(cfg, step, parts), "replica_checksums": replicas}, checkpoints, step, t.keep_last, guard.trusted_step)
    metrics.close()
    if rank.is_main:
        report.write_report(run_dir)  # loss_curves.png and progress.gif
    stop.restore()
    runcard.finish(run_dir, step, stop.signal, guard)
    if stop.signal is not None:
        log.warning("stopped by signal %d at step %d; checkpoint saved, resume with trainer.resume=auto", stop.signal, step)
        sys.exit(signal_exit(stop.signal))
    guard.raise_if_diverged()  # health.supervise stops or rolls back (trainer.on_divergence)
    return row


def sample_z(batch_size: int, cfg: DictConfig, generator: torch.Generator, device: torch.device, rank: distributed.World) -> torch.Tensor:
    """This rank's slice of the global batch of latents: every rank draws the same global batch, so N
    processes train on the latents one process would (drawing is cheap next to the networks)."""
    z = models.random_latents((batch_size, cfg.generator.z_dim), cfg.generator.z_distribution, generator, device)
    return z.chunk(rank.size)[rank.rank]


@contextmanager
def frozen(model: torch.nn.Module):
    """No weight gradients for `model` inside the block (gradients still flow through it)."""
    model.requires_grad_(False)
    try:
        yield
    finally:
        model.requires_grad_(True)


def sampling_generator(G: torch.nn.Module, G_ema: Optional[EMA]) -> torch.nn.Module:
    return G_ema.calibrated() if G_ema is not None else G


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag, so the current step finishes and a checkpoint is written."""

    def __init__(self, check_every: int, device: torch.device):
        self.signal: Optional[int] = None
        self.check_every, self.device = check_every, device
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, step: int) -> bool:
        """Stop now? Alone: as soon as a signal came. Under torchrun the ranks agree every
        check_every steps, so no rank leaves while another still waits for it in a collective."""
        if self.check_every == 1:
            return self.signal is not None
        if step % self.check_every:
            return False
        stop = distributed.any_rank(self.signal is not None, self.device)
        if stop and self.signal is None:
            self.signal = signal.SIGTERM
        return stop

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- checkpoint state

def training_state(cfg: DictConfig, step: int, parts: Dict[str, Any]) -> Dict[str, Any]:
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "generator": parts["G"].state_dict(),
        "discriminator": parts["D"].state_dict(),
        "generator_ema": parts["G_ema"].calibrated().state_dict() if parts["G_ema"] is not None else None,
        "optimizer_g": parts["opt_g"].state_dict(),
        "optimizer_d": parts["opt_d"].state_dict(),
        "step": step,
        "epoch": parts["batches"].epoch,
        "data": parts["batches"].state_dict(),
        "rng": {"noise": parts["noise"].get_state(), "torch": torch.get_rng_state(), "cuda": cuda_rng},
        "config_yaml": checkpoint.config_yaml(cfg),
        "health": parts["guard"].state_dict(),
    }


def resume(source: Optional[str], checkpoints: Path, cfg: DictConfig, parts: Dict[str, Any]) -> Tuple[int, Dict[str, List[Any]]]:
    """Load the state named by trainer.resume into `parts`; returns the step to continue from and the changed settings."""
    if not source:
        return 0, {}
    if source == "auto":
        path = checkpoint.latest(checkpoints)
        if path is None:  # runfolder.prepare has refused a folder of unreadable checkpoints before this
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", checkpoints)
            return 0, {}
    else:
        path = Path(source)
    state = checkpoint.load(path)
    changes = checkpoint.changes_since(state, cfg, path)
    if changes:
        listed = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
        log.warning("resuming from %s with changed settings: %s", path, listed)
    parts["G"].load_state_dict(state["generator"])
    parts["D"].load_state_dict(state["discriminator"])
    if parts["G_ema"] is not None:
        parts["G_ema"].model.load_state_dict(state["generator_ema"] or state["generator"])
    load_optimizer(parts["opt_g"], state["optimizer_g"])
    load_optimizer(parts["opt_d"], state["optimizer_d"])
    parts["batches"].load_state_dict(state["data"])
    health.on_resume(state, cfg, parts)  # the guard's memory; learning rates changed on the command line since
    rng = state["rng"]
    try:
        parts["noise"].set_state(rng["noise"])
    except RuntimeError:  # a CUDA generator's state means nothing to a CPU one, and vice versa
        log.warning("the checkpoint's latent stream comes from another device type; continuing with a fresh one")
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), changes


def load_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """The saved moments and step counts, with this run's hyperparameters (betas, weight decay, kernel choice).

    `load_state_dict` takes every group setting from the checkpoint; only the learning rate keeps the saved value
    here, since a rollback may have lowered it (health.on_resume applies one changed on the command line).
    """
    fresh = [{key: value for key, value in group.items() if key not in ("params", "lr")} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
