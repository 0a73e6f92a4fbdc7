"""The training loop (`gan-train`): alternate D and G updates, keep an EMA of G, log, draw grids, checkpoint.

`train(cfg, run_dir)` holds the whole loop; everything it needs comes in as arguments. `main()`
validates the command line before Hydra creates a run folder, so a typo costs no empty output dir.
To resume, run the same command again with `trainer.resume=auto` (and the same `hydra.run.dir`).
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dcgan import checkpoint, data, models
from dcgan.config import UserError, compose, config_dir, exit_with, resolve_device, to_yaml, validate_train
from dcgan.log import MetricsLog
from dcgan.losses import build_loss
from dcgan.optim import EMA, build_optimizer
from dcgan.sample import generate, latents, save_grid

log = logging.getLogger(__name__)

# Exit codes of a run stopped by a signal after saving its checkpoint (128 + signal number, as shells do).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def train(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Train from `cfg` (a composed TrainConfig) writing into `run_dir`; returns the last metrics row."""
    validate_train(cfg)
    t = cfg.trainer
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    images = data.load_images(cfg.dataset)
    batches = data.ImageBatches(images, t.batch_size, device, seed=t.seed)
    G, D = models.build_generator(cfg, device), models.build_discriminator(cfg, device)
    G_ema = EMA(G, t.ema) if t.ema > 0 else None
    opt_g = build_optimizer(G.parameters(), cfg.optimizer.generator, "optimizer.generator")
    opt_d = build_optimizer(D.parameters(), cfg.optimizer.discriminator, "optimizer.discriminator")
    loss = build_loss(cfg.loss)
    noise = torch.Generator(device).manual_seed(t.seed + 1)  # training latents; its state is checkpointed
    grid_z = latents(list(range(t.grid_size)), cfg.generator.z_dim, cfg.generator.z_distribution, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.amp else nullcontext()
    total_steps = t.max_steps or max(1, t.epochs * batches.batches_per_epoch // t.d_steps)
    checkpoints, samples = run_dir / "checkpoints", run_dir / "samples"
    parts = dict(G=G, D=D, G_ema=G_ema, opt_g=opt_g, opt_d=opt_d, batches=batches, noise=noise)

    step = resume(t.resume, checkpoints, cfg, parts)
    log.info("data: %d images %s; %d steps of batch %d on %s -> %s", len(images), tuple(images.shape[1:]), total_steps, t.batch_size, device, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step, total_steps, t.batch_size * t.d_steps, t.progress)
    stop = StopRequest()
    row: Dict[str, Any] = {}
    while step < total_steps and not stop.signal:
        # D update(s): fakes come from a no-grad G forward, since D's step needs no gradient through G.
        for _ in range(t.d_steps):
            real = batches.next()
            with torch.no_grad(), autocast:
                fake = G(sample_z(t.batch_size, cfg, noise, device))
            with autocast:
                loss_d, stats = loss.discriminator(D, real, fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        # G update on fresh latents.
        with autocast:
            loss_g = loss.generator(D, G(sample_z(t.batch_size, cfg, noise, device)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if G_ema is not None:
            G_ema.update(G, step)
        step += 1

        # Logging, grids and checkpoints; the metrics write is the only GPU sync.
        metrics.add({"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **stats})
        last = step == total_steps or stop.signal is not None
        if step % t.log_every == 0 or last:
            row = metrics.write(step, batches.epoch)
        if step % t.sample_every == 0 or last:
            save_grid(generate(sampling_generator(G, G_ema), grid_z), samples / f"step_{step:06d}.png", nrow=8)
        if step % t.ckpt_every == 0 or last:
            checkpoint.save(training_state(cfg, step, parts), checkpoints, step, t.keep_last)
    metrics.close()
    stop.restore()
    if stop.signal is not None:
        log.warning("stopped by signal %d at step %d; checkpoint saved, resume with trainer.resume=auto", stop.signal, step)
        sys.exit(128 + stop.signal)
    return row


def sample_z(n: int, cfg: DictConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if cfg.generator.z_distribution == "uniform":
        return torch.rand(n, cfg.generator.z_dim, generator=generator, device=device).mul_(2).sub_(1)
    return torch.randn(n, cfg.generator.z_dim, generator=generator, device=device)


def sampling_generator(G: torch.nn.Module, G_ema: Optional[EMA]) -> torch.nn.Module:
    return G_ema.model if G_ema is not None else G


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag, so the current step finishes and a checkpoint is written."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- checkpoint state

# Config sections that define the networks' shapes: a resumed run must agree on them.
MODEL_KEYS = ("dataset.image_size", "dataset.channels", "generator", "discriminator")


def training_state(cfg: DictConfig, step: int, parts: Dict[str, Any]) -> Dict[str, Any]:
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "generator": parts["G"].state_dict(),
        "discriminator": parts["D"].state_dict(),
        "generator_ema": parts["G_ema"].model.state_dict() if parts["G_ema"] is not None else None,
        "optimizer_g": parts["opt_g"].state_dict(),
        "optimizer_d": parts["opt_d"].state_dict(),
        "step": step,
        "epoch": parts["batches"].epoch,
        "data": parts["batches"].state_dict(),
        "rng": {"noise": parts["noise"].get_state(), "torch": torch.get_rng_state(), "cuda": cuda_rng},
        "config_yaml": to_yaml(cfg),
    }


def resume(source: Optional[str], checkpoints: Path, cfg: DictConfig, parts: Dict[str, Any]) -> int:
    """Load the state named by trainer.resume into `parts`; returns the step to continue from."""
    if not source:
        return 0
    if source == "auto":
        path = checkpoint.latest(checkpoints)
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", checkpoints)
            return 0
    else:
        path = Path(source)
    state = checkpoint.load(path)
    check_same_models(OmegaConf.create(state["config_yaml"]), cfg, path)
    parts["G"].load_state_dict(state["generator"])
    parts["D"].load_state_dict(state["discriminator"])
    if parts["G_ema"] is not None:
        parts["G_ema"].model.load_state_dict(state["generator_ema"] or state["generator"])
    parts["opt_g"].load_state_dict(state["optimizer_g"])
    parts["opt_d"].load_state_dict(state["optimizer_d"])
    parts["batches"].load_state_dict(state["data"])
    rng = state["rng"]
    parts["noise"].set_state(rng["noise"].to(parts["noise"].get_state().device))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def check_same_models(saved: DictConfig, current: DictConfig, path: Path) -> None:
    for key in MODEL_KEYS:
        before, now = OmegaConf.select(saved, key), OmegaConf.select(current, key)
        if isinstance(before, DictConfig):
            before, now = OmegaConf.to_container(before), OmegaConf.to_container(now)
        if before != now:
            raise UserError(
                f"can't resume from {path}: it was trained with {key}={before}, this run has {key}={now}; "
                "use the checkpoint's settings or a new hydra.run.dir"
            )


# ---------------------------------------------------------------- command line


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as error:
        exit_with(error, "gan-train")


def main(argv: Optional[List[str]] = None) -> None:
    """`gan-train [overrides]`: check the config, then let Hydra make the run folder and call train()."""
    args = sys.argv[1:] if argv is None else argv
    # Flags (--help, --cfg job, --multirun) are Hydra's business; plain overrides are checked here first.
    if not any(arg.startswith("-") for arg in args):
        try:
            validate_train(compose("train", args))
        except UserError as error:
            exit_with(error, "gan-train")
    sys.argv = [sys.argv[0], *args]
    try:
        _hydra_main()
    except SystemExit as exit:
        # Hydra reports its own config errors with exit code 1; they are usage errors like ours.
        raise SystemExit(2 if exit.code == 1 else exit.code)


if __name__ == "__main__":
    main()
