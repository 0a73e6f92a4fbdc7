"""The training loop (`gan-train`): alternate D and G updates, keep an EMA of G, log, draw grids, checkpoint.

`train(cfg, run_dir)` is the loop: `build` makes the training state (state.py) and the step that
updates it (`TrainStep`: D, G, EMA), then the loop steps, logs, draws grids and saves checkpoints.
Everything comes in as arguments, checked by config.validate_train (the command line: cli.py).
To resume, run the same command again with `trainer.resume=auto` (and the same `hydra.run.dir`).
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn

from dcgan import augment, checkpoint, data, distributed, models, report, runcard, speed
from dcgan.errors import (
    SAME_SIGNAL_S,
    STOP_SIGNALS,
    Interrupted,
    UserError,
    at_least,
    at_most,
    check_seeds,
    exit_with,
    finite,
    unused,
)
from dcgan.guard import Guard, HealthConfig
from dcgan.images import generate, latents, save_grid
from dcgan.labels import Labels, listing
from dcgan.layout import RunFolder
from dcgan.log import MetricsLog, last_training_row, log_summary
from dcgan.losses import build_loss
from dcgan.metrics import TrainingEvaluator
from dcgan.optim import EMA, build_optimizer
from dcgan.schedule import Schedule
from dcgan.state import REPLICA_CHECKSUMS, TrainingState

log = logging.getLogger(__name__)

# Signals that stop a run once its current step is done and checkpointed (gan-train then exits 128 + N, cli.py).


@dataclass
class TrainerConfig:
    batch_size: int = 128  # real images per D update (and fakes per G update)
    max_steps: int = 0  # generator updates to run; 0 = run `epochs` epochs
    # Or a budget in real images seen (steps x batch_size x d_steps), equal for runs of any batch size; 0 = off.
    max_images: int = 0
    epochs: int = 5  # passes over the data set (counted in D's real batches), when max_steps = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    d_steps: int = 1  # discriminator updates per generator update
    sample_every: int = 500  # steps between fixed-noise grids in samples/ (a fresh run also draws one at step 0)
    ckpt_every: int = 1000  # steps between step_NNNNNN.pt checkpoints (last.pt is written with them)
    log_every: int = 50  # steps between metrics.jsonl rows (the only GPU syncs of the loop)
    resume: Optional[str] = None  # a checkpoint path, or "auto" for checkpoints/last.pt of the run dir
    overwrite: bool = False  # start over in a run dir that holds a run: its files move to RUN_DIR/replaced/<time>/
    # Mixed precision: auto | bf16 | fp16 | off. auto: bf16 where the hardware computes it natively, fp16 with loss
    # scaling on GPUs without bf16, else off (speed.resolve_precision; the run card says what it chose and why).
    # true and false, from configs written before the modes, mean bf16 and off.
    amp: str = "auto"
    # Speed options (speed.py; measured in docs/PERFORMANCE.md): the same maths on other layouts and kernels.
    channels_last: bool = True  # NHWC layout for G and D
    compile: bool = False  # torch.compile G and D; a failure in the trial step before training falls back to eager
    cuda_graphs: bool = False  # CUDA only: the whole step captured once as a CUDA graph and replayed (speed.py)
    fused_optimizer: bool = True  # fused kernels for Adam/AdamW/SGD/Adagrad (CUDA and CPU); other optimizers ignore it
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest conv algorithm for our fixed shapes
    ema: float = 0.999  # decay of the generator's moving average; 0 turns it off
    ema_start: int = 0  # steps before the average starts (until then it copies G): the first, fast steps stay out
    lr_decay: float = 0.0  # the last fraction of the run over which both learning rates fall linearly to 0; 0 = off
    max_minutes: float = 0.0  # end (checkpointed, exit 0) after this much training in this invocation; 0 = no limit
    ckpt_every_minutes: float = 0.0  # also checkpoint every N minutes of training; 0 = by ckpt_every only
    keep_last: int = 3  # step checkpoints kept (0 = keep all); last.pt and the newest healthy one are always kept
    on_divergence: str = "stop"  # stop | rollback: what NaN/Inf or a collapse does (supervise.py; `health`: guard.py)
    health: HealthConfig = field(default_factory=HealthConfig)
    deterministic: bool = False  # PyTorch's deterministic algorithms (a warning where an op has none)
    grid_size: int = 64  # images in each progress grid
    progress: bool = True  # a bar with its ETA in a terminal; elsewhere (a file, a pipe) a log line per metrics row
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout_s: float = 1800.0  # under torchrun: a collective waiting longer than this ends the job
    eval_every: int = 0  # steps between FID/KID evaluations of the sampling generator (see `eval`); 0 = never
    # Also evaluate every N minutes of training (their cost is not counted); with either, the last step is evaluated.
    eval_every_minutes: float = 0.0


def validate_trainer(t: TrainerConfig) -> None:
    at_least("trainer.batch_size", t.batch_size, 1)
    at_least("trainer.max_steps", t.max_steps, 0)
    at_least("trainer.max_images", t.max_images, 0)
    at_least("trainer.epochs", t.epochs, 0)
    if t.max_steps == 0 and t.max_images == 0 and t.epochs == 0:
        raise UserError("nothing to train: set trainer.max_steps, trainer.max_images or trainer.epochs above 0")
    if t.max_steps and t.max_images:
        raise UserError(
            f"trainer.max_steps={t.max_steps} and trainer.max_images={t.max_images} both set the run's length: "
            "set one of them to 0"
        )
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
    at_least("trainer.ema_start", t.ema_start, 0)
    if not 0.0 <= t.lr_decay <= 1.0:
        raise UserError(f"trainer.lr_decay is a fraction of the run in [0, 1] (0 turns it off), got {t.lr_decay}")
    for key in ("max_minutes", "ckpt_every_minutes", "eval_every_minutes", "dist_timeout_s"):
        finite(f"trainer.{key}", t[key])  # inf: 0 is how "no limit" is spelt
    for key in ("max_minutes", "ckpt_every_minutes", "eval_every_minutes"):
        if not t[key] >= 0:
            raise UserError(f"trainer.{key} must be >= 0 minutes (0 turns it off), got {t[key]}")
    distributed.validate_device("trainer.device", t.device)
    speed.amp_mode(t.amp)
    if t.cuda_graphs and (t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())):
        raise UserError(
            "trainer.cuda_graphs=true needs a CUDA device (CUDA graphs replay GPU kernels); set it false on CPU"
        )
    if t.cuda_graphs and t.lr_decay > 0:  # a captured step replays the learning rate it was captured with
        raise UserError(
            "trainer.lr_decay changes the learning rates every step, which a CUDA graph can't follow: "
            "set trainer.cuda_graphs=false or trainer.lr_decay=0"
        )
    check_trainer_sizes(t)
    check_trainer_settings_used(t)


# Bounds on the counts a typo can make huge (an extra 0 or two): far beyond any real run, yet short of a hang.
MAX_STEPS = 10**9
MAX_EPOCHS = 100_000
MAX_D_STEPS = 100
MAX_GRID_SIZE = 1024


def check_trainer_sizes(t: TrainerConfig) -> None:
    """Sizes whose cost grows with the value: refused before any work, with what they would cost.
    (batch_size is bounded by models.check_memory, in GiB, with the image size and widths.)"""
    days = t.max_steps / 1000 / 86400
    at_most("trainer.max_steps", t.max_steps, MAX_STEPS, f"even at 1,000 steps/s that is {days:,.0f} days of training")
    at_most(
        "trainer.epochs",
        t.epochs,
        MAX_EPOCHS,
        "each epoch is a full pass over the data set; for a long run count generator updates in trainer.max_steps",
    )
    at_most(
        "trainer.d_steps",
        t.d_steps,
        MAX_D_STEPS,
        f"each step would take about {t.d_steps + 1:,} times as long as one D and one G update (WGAN uses 5)",
    )
    at_most(
        "trainer.grid_size",
        t.grid_size,
        MAX_GRID_SIZE,
        f"every progress grid would be one PNG of {t.grid_size:,} images, drawn every trainer.sample_every steps",
    )


def check_trainer_settings_used(t: TrainerConfig) -> None:
    """Settings that another one switches off are refused when changed, rather than silently ignored."""
    # (trainer.epochs beside max_steps is not refused: presets set epochs, and max_steps documentedly wins.)
    if t.ema == 0 and t.ema_start != TrainerConfig().ema_start:
        unused("trainer.ema_start", t.ema_start, "the EMA is off (trainer.ema=0)", "set trainer.ema, e.g. 0.999, too")


def train(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Train from `cfg` (a composed TrainConfig) writing into `run_dir`; returns the last metrics row.

    Ends early by raising Stopped (SIGINT/SIGTERM; the checkpoint is saved) or guard.Diverged (a fault,
    which supervise.py stops or rolls back).
    """
    t = cfg.trainer
    device, world = distributed.setup(t.device, t.dist_timeout_s), distributed.world()
    state, train_step, images = build(cfg, device)
    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    images_per_step = t.batch_size * t.d_steps
    evaluator, total_steps = start_run(cfg, state, images, device, run)  # resume, run card; FID/KID on rank 0
    grid = grid_inputs(cfg, state.classes, device)  # the fixed latents (and classes) of every progress grid
    optimizers = {"g": state.opt_g, "d": state.opt_d}  # their learning rates go into every row
    metrics = MetricsLog(run.metrics, state.step, total_steps, images_per_step, t.progress, cfg.logger, optimizers)
    stop = StopRequest(check_every=t.log_every if world.enabled else 1, device=device)
    clock = Schedule(
        total_steps, t.max_minutes, t.ckpt_every_minutes, t.lr_decay, optimizers.values(), device, t.eval_every_minutes
    )
    row: Dict[str, Any] = {}
    stopping = False
    draw_first_grid(state, grid, run, metrics)  # a fresh run's step-0 grid: the progress movie starts there
    while state.step < total_steps and not stopping and state.guard.fault is None:
        clock.set_learning_rates(state.step)  # trainer.lr_decay
        metrics.add(train_step())  # d_steps D updates, one G update, the EMA; the losses stay on the device
        step = state.step

        # Evaluation, logging, grids and checkpoints; the metrics write is the only GPU sync.
        reading = step % t.log_every == 0 or step == total_steps  # the last row's minutes are current
        out_of_time, timed_checkpoint, timed_eval = clock.read_clock() if reading else NOT_DUE
        stopping = stop.agreed(step) or out_of_time
        last = step == total_steps or stopping
        # FID/KID (rank 0) go into this step's metrics row, and a checkpoint beside its stamp; best.pt follows the
        # best FID. The same on every rank: the step, and rank 0's clock.
        evaluating = evaluation_due(t, step, total_steps, timed_eval, out_of_time)
        scores = evaluate_untimed(evaluator, step, state, clock, metrics) if evaluator and evaluating else {}
        if step % t.log_every == 0 or last or evaluating:
            row = metrics.write(step, state.batches.epoch, {**scores, "minutes": clock.minutes})
            state.guard.check_row(step, row)
        if last and world.is_main:  # else seconds of silence: the EMA's BatchNorm measured, the figures drawn
            log.info("step %d: writing the last grid, checkpoint and report", step)
        if world.is_main and (step % t.sample_every == 0 or last):
            draw_grid(state, grid, run, metrics)
        checkpointing = step % t.ckpt_every == 0 or last or timed_checkpoint or evaluating
        if checkpointing and state.guard.healthy(step, state):  # a sync: no checkpoint of NaN
            save_checkpoint(state, run.checkpoints, t.keep_last)
    metrics.close()
    row = row or last_training_row(run.metrics)  # nothing left to train: the run's last row stands
    written = report.write_report(run_dir) if world.is_main else []  # loss_curves.png and progress.gif
    stop.restore()
    end_run(run_dir, state, stop, clock, written, t.max_minutes)
    return row


def end_run(
    run_dir: Path, state: TrainingState, stop: StopRequest, clock: Schedule, written: List[Path], max_minutes: float
) -> None:
    """The run card's last word and the closing block; then Stopped on a signal, or the divergence if one came."""
    runcard.finish(run_dir, state.step, stop.signal, state.guard, out_of_time=clock.out_of_time)
    if distributed.world().is_main and stop.signal is None and state.guard.fault is None:
        log_summary(run_dir, state.step, clock.minutes, written, state.classes)  # where everything is, what next
    resume = continue_hint(run_dir)
    if clock.out_of_time and stop.signal is None:
        log.info("trainer.max_minutes=%g reached at step %d; %s", max_minutes, state.step, resume)
    if stop.signal is not None:
        log.warning("stopped by signal %d at step %d; checkpoint saved; %s", stop.signal, state.step, resume)
        raise Stopped(stop.signal)
    state.guard.raise_if_diverged()  # supervise.py stops or rolls back (trainer.on_divergence)


def continue_hint(run_dir: Path) -> str:
    """How to continue this run. The folder is named because the default one (outputs/DATE/TIME) is new on every
    run: `resume=auto` alone would start afresh elsewhere. The last setting of a key on a command line wins, so
    appending it is always right; a sweep's job is continued by the sweep, in its folder."""
    key, folder = "hydra.run.dir", run_dir
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        key, folder = "hydra.sweep.dir", Path(HydraConfig.get().sweep.dir)
    return f"continue with the same command plus trainer.resume=auto {key}={shlex.quote(os.path.abspath(folder))}"


NOT_DUE = (False, False, False)  # Schedule.read_clock between log rows, where the clock is not read


def evaluation_due(t: TrainerConfig, step: int, total_steps: int, timed: bool, out_of_time: bool) -> bool:
    """trainer.eval_every (steps) or eval_every_minutes (`timed`), and the run's last step, whichever ends it."""
    if not (t.eval_every or t.eval_every_minutes):
        return False
    return timed or step == total_steps or out_of_time or bool(t.eval_every and step % t.eval_every == 0)


def evaluate_untimed(
    evaluator: TrainingEvaluator, step: int, state: TrainingState, clock: Schedule, metrics: MetricsLog
) -> Dict[str, float]:
    """FID/KID of the sampling generator; its time is left out of the training clock and of the speed figures."""
    started = time.perf_counter()
    scores = evaluator(step, state.sampling_generator(), state.state_dict)
    spent = time.perf_counter() - started
    clock.leave_out(spent)
    metrics.leave_out(spent)
    return scores


def start_run(
    cfg: DictConfig, state: TrainingState, images: torch.Tensor, device: torch.device, run: RunFolder
) -> Tuple[Optional[TrainingEvaluator], int]:
    """Resume into `state` if asked, write the run card and say what will run. Returns the evaluator
    (rank 0 only, with trainer.eval_every or eval_every_minutes), which keeps best.pt, and the step the run
    ends at."""
    t = cfg.trainer
    changes = resume(state, t.resume, run.checkpoints, cfg)
    total_steps = planned_steps(t, state)
    warn_if_nothing_to_train(t, state.step, total_steps)
    runcard.start(run.root, cfg, images, device, state.step, changes)  # run_card.json: command, versions, data, seed
    p = state.precision
    runcard.update(run.root, precision={"trainer.amp": p.setting, "chosen": p.mode, "why": p.reason})
    log.info("precision: %s (trainer.amp=%s: %s)", p.mode, p.setting, p.reason)
    shape = tuple(images.shape[1:])
    message = "data: %d images %s; %d steps of batch %d on %s -> %s"
    log.info(message, len(images), shape, total_steps, t.batch_size, device, run.root)
    if state.labels is not None:  # conditional=true
        report_classes(state.labels, cfg.dataset, run)
    if (t.eval_every or t.eval_every_minutes) and distributed.world().is_main:
        return TrainingEvaluator(cfg, images, device, run, resumed=state.step > 0), total_steps
    return None, total_steps


def warn_if_nothing_to_train(t: TrainerConfig, step: int, total_steps: int) -> None:
    """A resume whose checkpoint already reached this run's end trains nothing: say so, rather than only 'done'
    (a branch from a longer run with the default trainer.epochs=5, say)."""
    if step == 0 or step < total_steps:
        return
    if t.max_steps or t.max_images:
        length = f"trainer.max_steps={t.max_steps}" if t.max_steps else f"trainer.max_images={t.max_images}"
    else:
        length = f"trainer.epochs={t.epochs}, already passed"
    message = "nothing to train: the checkpoint is at step %d, where this run ends (%s); set trainer.max_steps above %d"
    log.warning(message + " to train on", step, length, step)


def report_classes(labels: Labels, dataset: DictConfig, run: RunFolder) -> None:
    """The classes and how many images each has, in the log and the run card. A class without images is still
    drawn (a row of every grid, gan-sample's class=) though G never learns it: a warning says which, and what
    may have cut them (mnist_tiny is stored digit by digit, so its first images are all zeros)."""
    log.info("classes: %s", labels.describe())
    counts = dict(zip(labels.names, labels.counts(), strict=True))
    runcard.update(run.root, classes={"names": list(labels.names), "images": counts})
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        cut = f" in the first {dataset.max_images} images (dataset.max_images)" if dataset.max_images else ""
        log.warning(
            "%d of the %d classes have no training images%s: %s. The grids and gan-sample still draw them, but G "
            "never learns them: give them images, or choose classes that have some (CelebA: fewer dataset.attributes)",
            len(empty), len(counts), cut, listing(empty),
        )  # fmt: skip


def planned_steps(t: TrainerConfig, state: TrainingState) -> int:
    """The step the run ends at: trainer.max_steps; else enough for trainer.max_images (rounded up); else the
    step at which the data has been seen trainer.epochs times, counted from where the data stands (a resume
    with another batch size or d_steps still trains the epochs asked for)."""
    if t.max_steps:
        return t.max_steps
    if t.max_images:
        return -(-t.max_images // (t.batch_size * t.d_steps))
    batches = state.batches
    remaining = (t.epochs - batches.epoch) * batches.batches_per_epoch - batches.position
    return max(1, state.step + -(-max(0, remaining) // t.d_steps))  # rounded up: every batch of the epochs is read


def build(
    cfg: DictConfig, device: torch.device, graphs: Optional[bool] = None
) -> Tuple[TrainingState, Callable[[], Dict[str, torch.Tensor]], torch.Tensor]:
    """A fresh run's training state (a resume loads into it), the step that updates it, and the uint8 training images.

    The order of the seeds and random draws here is part of every result: keep it. `graphs` overrides
    trainer.cuda_graphs (the CPU tests build the captured step's state with it).
    """
    t, world = cfg.trainer, distributed.world()
    graphs = speed.use_cuda_graphs(t.cuda_graphs, device) if graphs is None else graphs
    precision = speed.resolve_precision(t.amp, device, graphs)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    images = data.load_images(cfg.dataset)
    labels = data.load_labels(cfg.dataset) if cfg.conditional else None  # one class per image, row for row
    classes = len(labels.names) if labels is not None else 0
    local_batch = distributed.per_rank_batch(t.batch_size)  # batch_size is global: split over ranks
    label_rows = labels.indices if labels is not None else None
    batches = data.ImageBatches(images, local_batch, device, t.seed, world.rank, world.size, label_rows)
    G, D = models.build_generator(cfg, device, classes), models.build_discriminator(cfg, device, classes)
    speed.prepare_networks(cfg, G, D, local_batch, device, precision)  # layout, compile: before EMA and DDP copy them
    runcard.use_deterministic_algorithms(t.deterministic)  # after prepare_networks: it turns cuDNN's autotuner off
    # The EMA's BatchNorm statistics come from ~2,048 fixed latents in global-size batches: N ranks agree with one.
    calibration_latents = functools.partial(latent_batch, cfg=cfg, device=device)
    G_ema = EMA(G, t.ema, calibration_latents, device, -(-2048 // t.batch_size), t.ema_start) if t.ema > 0 else None
    G_train, D_train = distributed.wrap(G, device, t.sync_bn), distributed.wrap(D, device, t.sync_bn)  # DDP
    torch.manual_seed(t.seed + world.rank)  # dropout differs between ranks
    state = TrainingState(
        G=G,
        D=D,
        G_ema=G_ema,
        opt_g=build_optimizer(
            G.parameters(), cfg.optimizer.generator, "optimizer.generator", t.fused_optimizer, capturable=graphs
        ),
        opt_d=build_optimizer(
            D.parameters(), cfg.optimizer.discriminator, "optimizer.discriminator", t.fused_optimizer, capturable=graphs
        ),
        batches=batches,
        noise=torch.Generator(device).manual_seed(t.seed + 1),  # training latents; its state is checkpointed
        guard=Guard(t.health, images, device),  # NaN/Inf and collapse; trainer.on_divergence acts on what it finds
        config_yaml=checkpoint.config_yaml(cfg),
        precision=precision,
        scaler=torch.amp.GradScaler(device.type) if precision.loss_scaling else None,  # fp16's loss scale
        labels=labels,
    )
    step = TrainStep(state, cfg, device, G_train, D_train, graphs)
    return state, speed.CapturedStep(step) if graphs else step, images


class TrainStep:
    """One training step: `d_steps` D updates, one G update, the EMA update, on `state` in place.

    Calling it returns the step's losses and D's statistics, still on the device (reading them is a
    sync: the metrics do it at log rows). The whole step is this one unit over named state, the shape
    a whole-step CUDA graph needs.
    """

    def __init__(
        self,
        state: TrainingState,
        cfg: DictConfig,
        device: torch.device,
        G_train: nn.Module,
        D_train: nn.Module,
        graphs: bool = False,
    ):
        self.state, self.cfg, self.device, self.world = state, cfg, device, distributed.world()
        self.loss = build_loss(cfg.loss)
        self.autocast = speed.autocast(state.precision, device, cache=not graphs)
        # G_train and D_train are G and D wrapped for DDP under torchrun. G's update judges its fakes with the
        # plain D (frozen: no weight gradient to all-reduce). Both see every image through DiffAugment
        # (augment.policy); with no policy these are the networks themselves.
        self.G_train = G_train
        self.D_train = augment.wrap(D_train, cfg.augment.policy)
        self.D_judge = augment.wrap(state.D, cfg.augment.policy)

    def __call__(self) -> Dict[str, torch.Tensor]:
        reals = [self.state.batches.next() for _ in range(self.cfg.trainer.d_steps)]  # no random numbers drawn
        stats = self.update(reals, self.state.step)
        self.state.step += 1
        return stats

    def update(self, reals: List[Batch], ema_step: Any, set_to_none: bool = True) -> Dict[str, torch.Tensor]:
        """The updates themselves, on given real batches (images and labels, one per D update); `ema_step` sets the
        EMA's decay ramp.

        The step counter is the caller's: replaying a captured step (speed.py) advances it outside.
        With conditional=true every network call also takes the labels: D judges each real image by its own
        class and each fake by the class it was drawn for. The fakes take the classes of a real batch, so they
        follow the data's class frequencies with no random number drawn (and the labels are the captured step's
        static buffers).
        """
        s = self.state
        # D update(s): fakes come from a no-grad G forward, since D's step needs no gradient through G.
        for i, (real, labels) in enumerate(reals):
            with torch.no_grad(), self.autocast:
                fake = self.G_train(self.latents(), *given(labels))
            with self.autocast:
                D = judging(self.D_train, labels)
                loss_d, stats = self.loss.discriminator(D, real, fake, s.step * len(reals) + i)
            s.opt_d.zero_grad(set_to_none=set_to_none)
            self.backward_and_step("D", loss_d, s.D, s.opt_d)

        # G update on fresh latents; D's weights need no gradient here, so the plain D (no DDP) is frozen.
        labels = reals[-1][1]
        with self.autocast, frozen(s.D):
            loss_g = self.loss.generator(judging(self.D_judge, labels), self.G_train(self.latents(), *given(labels)))
        s.opt_g.zero_grad(set_to_none=set_to_none)
        self.backward_and_step("G", loss_g, s.G, s.opt_g)
        if s.G_ema is not None:
            s.G_ema.update(s.G, ema_step)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **stats}

    def backward_and_step(self, name: str, loss: torch.Tensor, model: nn.Module, optimizer) -> None:
        """Gradients of `loss`, the guard's NaN/Inf flags (on the device: no sync), the optimizer's update.

        With fp16 the loss is scaled so small gradients survive; a step whose scaled gradients overflow
        is skipped and the scale lowered (torch.amp.GradScaler), so the guard watches the loss only.
        Fused optimizers take the scale and the overflow flag as tensors: no sync.
        """
        scaler = self.state.scaler
        if scaler is None:
            loss.backward()
            self.state.guard.watch(name, loss, model)
            optimizer.step()
            return
        scaler.scale(loss).backward()
        self.state.guard.watch(name, loss, None)
        scaler.step(optimizer)
        scaler.update()

    def latents(self) -> torch.Tensor:
        return latent_batch(self.state.noise, self.cfg, self.device, self.world)


def latent_batch(
    generator: torch.Generator, cfg: DictConfig, device: torch.device, world: Optional[distributed.World] = None
) -> torch.Tensor:
    """A global batch (trainer.batch_size) of latents from `generator`; with `world`, this rank's slice of it.

    Every rank draws the same global batch, so N processes train on the latents one process would
    (drawing is cheap next to the networks).
    """
    g = cfg.generator
    z = models.random_latents((cfg.trainer.batch_size, g.z_dim), g.z_distribution, generator, device)
    return z if world is None else z.chunk(world.size)[world.rank]


Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]  # real images and their labels (None: unconditional)


def given(labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """G's extra arguments: the labels of a conditional run, nothing otherwise."""
    return () if labels is None else (labels,)


def judging(D: nn.Module, labels: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """D as the losses call it, D(images): with conditional=true, D(images, labels) for these labels."""
    return D if labels is None else functools.partial(D, labels=labels)


GRID_COLUMNS = 8  # images per row of a progress grid
GRID_ROWS = 32  # at most this many classes get a row of a conditional run's grid


def grid_inputs(cfg: DictConfig, classes: Tuple[str, ...], device: torch.device) -> Batch:
    """The fixed inputs of every progress grid: latents of seeds 0, 1, ...; with conditional=true, one row per
    class (the first GRID_ROWS), the same GRID_COLUMNS latents in every row, so a column keeps its style and
    the row changes the class."""
    g = cfg.generator
    if not classes:
        return latents(list(range(cfg.trainer.grid_size)), g.z_dim, g.z_distribution, device), None
    rows = min(len(classes), GRID_ROWS)
    z = latents(list(range(GRID_COLUMNS)), g.z_dim, g.z_distribution, device).repeat(rows, 1)
    return z, torch.arange(rows, device=device).repeat_interleave(GRID_COLUMNS)


@contextmanager
def frozen(model: torch.nn.Module):
    """No weight gradients for `model` inside the block (gradients still flow through it)."""
    model.requires_grad_(False)
    try:
        yield
    finally:
        model.requires_grad_(True)


def draw_grid(state: TrainingState, inputs: Batch, run: RunFolder, metrics: MetricsLog) -> None:
    """The fixed-noise progress grid, samples/step_NNNNNN.png; the guard checks it for lost diversity."""
    grid = generate(state.sampling_generator(), *inputs)
    state.guard.check_grid(state.step, grid)
    metrics.add_grid(save_grid(grid, run.grid(state.step), nrow=GRID_COLUMNS), state.step)


def draw_first_grid(state: TrainingState, inputs: Batch, run: RunFolder, metrics: MetricsLog) -> None:
    """samples/step_000000.png from the untrained G, on rank 0 of a run at step 0. Not shown to the guard (a fresh
    G may well draw near-uniform images), and drawn under a forked RNG: the run's random stream stays as it was.

    Drawn by the EMA's copy of G as it stands (G's weights and statistics at step 0), not calibrated: measuring
    its BatchNorm statistics (~2,048 latents) would cost a fresh run, and each restart of one, far more than this
    one batch of 64. Not by G itself, which trainer.compile may have compiled for training: a grid in eval mode
    would compile it once more."""
    if state.step != 0 or not distributed.world().is_main:
        return
    untrained = state.G_ema.model if state.G_ema is not None else state.G
    with torch.random.fork_rng(devices=[state.noise.device] if state.noise.device.type == "cuda" else []):
        grid = generate(untrained, *inputs)
    metrics.add_grid(save_grid(grid, run.grid(0), nrow=GRID_COLUMNS), 0)


def save_checkpoint(state: TrainingState, checkpoints: Path, keep_last: int) -> None:
    """step_NNNNNN.pt and last.pt, written by rank 0; every rank calls it (the replica check is a collective)."""
    # Each rank's BatchNorm statistics follow its own batches (DDP hands out rank 0's at every forward); save rank 0's.
    distributed.broadcast_buffers(state.G, state.D)
    networks = [state.G, state.D] + ([state.G_ema.calibrated()] if state.G_ema is not None else [])
    replicas = distributed.replica_checksums(*networks)
    if distributed.world().is_main:
        saved = {**state.state_dict(), REPLICA_CHECKSUMS: replicas}
        checkpoint.save(saved, checkpoints, state.step, keep_last, state.guard.trusted_step)


def resume(state: TrainingState, source: Optional[str], checkpoints: Path, cfg: DictConfig) -> Dict[str, List[Any]]:
    """Load the checkpoint trainer.resume names into `state`; returns the settings changed since it was written."""
    if not source:
        return {}
    if source == "auto":
        path = checkpoint.latest(checkpoints)
        if path is None:  # runfolder.prepare has refused a folder of unreadable checkpoints before this
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", checkpoints)
            return {}
    else:
        path = Path(source)
    saved = checkpoint.load(path)
    changes = checkpoint.changes_since(saved, cfg, path)
    if changes:
        listed = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
        log.warning("resuming from %s with changed settings: %s", path, listed)
    state.load_state_dict(saved)  # the learning rates changed since replace the saved ones
    log.info("resumed from %s at step %d", path, state.step)
    return changes


class Stopped(Exception):
    """train() ended early on a stop signal (SIGINT, SIGTERM, SIGHUP), its checkpoint saved; gan-train exits
    128 + the signal (cli.py)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signal = signum


class StopRequest:
    """Turns a stop signal into a flag, so the current step finishes and a checkpoint is written."""

    def __init__(self, check_every: int, device: torch.device):
        self.signal: Optional[int] = None
        self.check_every, self.device = check_every, device
        self._first_s = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal, self._first_s = signum, time.monotonic()
        elif time.monotonic() - self._first_s >= SAME_SIGNAL_S:  # a second Ctrl-C means "now"
            raise Interrupted(signum)

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


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    exit_with(UserError("`python -m dcgan.train` is now `python -m dcgan` (the same as gan-train)"), "dcgan.train")
