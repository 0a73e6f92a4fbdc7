"""Speed options of the trainer: `trainer.amp`, `channels_last`, `compile`, `cuda_graphs`, `cudnn_benchmark`.

Only amp changes the arithmetic (matmul and conv inputs rounded to bf16); channels_last and
cudnn_benchmark pick memory layouts and kernels, and compile fuses the same operations.
(`trainer.fused_optimizer` lives with the optimizers, in optim.build_optimizer.)

`prepare_networks` runs once, right after G and D are built and before anything copies or wraps
them (the EMA copy, DDP, the optimizers), so every later user sees the final layout and calls the
compiled forward. What each option gave, with the commands that measured it: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from dcgan import distributed
from dcgan.losses import build_loss

log = logging.getLogger(__name__)

# torch.compile's backend. Tests swap in a cheap or failing one; users always get inductor.
COMPILE_BACKEND = "inductor"


def autocast(amp: bool, device: torch.device, cache: bool = True) -> AbstractContextManager:
    """bf16 autocast for trainer.amp (matmuls and convs in bf16, reductions in fp32); a no-op otherwise.

    `cache=False` under a CUDA graph: autocast's cache of bf16 weight copies would outlive the capture.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if amp else nullcontext()


def prepare_networks(cfg: DictConfig, G: nn.Module, D: nn.Module, batch_size: int, device: torch.device) -> None:
    """Apply the trainer's speed options to freshly built G and D, in place.

    `batch_size` is this process's batch: the compile trial step runs on the loop's exact shapes.
    """
    t = cfg.trainer
    if device.type == "cuda":
        # cuDNN times its algorithms on the first call of each shape and keeps the fastest;
        # our shapes never change, so that cost is paid once (pytorch/examples dcgan sets it too).
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
    if t.channels_last:
        # NHWC weights make every conv produce NHWC activations (the layout tensor cores and
        # oneDNN prefer). Real batches arrive NCHW, which for one channel is the same memory;
        # RGB ones are converted by D's first conv.
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    if t.compile:
        compile_networks(cfg, G, D, batch_size, device)


def compile_networks(cfg: DictConfig, G: nn.Module, D: nn.Module, batch_size: int, device: torch.device) -> bool:
    """torch.compile G and D in place, then prove it with one trial step; on any failure, stay eager.

    torch.compile fails late: the forward graph compiles at the first call and the backward graph
    at the first backward, so a bad kernel or a stride assertion (torch 2.11 with channels_last in
    convolution_backward) would only surface inside the loop. The trial step compiles the graphs
    the loop uses, forward and backward, before training starts (tests check the loop then compiles
    nothing more), and leaves no trace: weights, BatchNorm statistics, gradients and random streams
    are as they were. Under torchrun, DDP wraps the compiled networks. Returns True if compiled.
    """
    key = "trainer.compile"
    networks = [G, D]
    loss = build_loss(cfg.loss)
    if loss.needs_double_backward:
        networks = [G]
        log.warning(
            "%s: D stays eager, because loss %s needs the gradient of a gradient, which torch.compile can't take "
            "(AOTAutograd has no double backward); G is compiled",
            key,
            cfg.loss.name if loss.double_backward else f"{cfg.loss.name} with loss.r1_weight > 0",
        )
    for network in networks:
        network.compile(backend=COMPILE_BACKEND)
    try:
        trial_step(G, D, cfg, batch_size, device)
    except Exception as error:  # any compiler or runtime failure: the eager networks still train correctly
        for network in networks:
            network._compiled_call_impl = None  # what nn.Module.compile() set; the plain forward is used again
        torch.compiler.reset()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning(
            "%s: torch.compile failed in the trial step (%s: %s); training without it",
            key,
            type(error).__name__,
            message[:300],
        )
        return False
    return True


def trial_step(G: nn.Module, D: nn.Module, cfg: DictConfig, batch_size: int, device: torch.device) -> None:
    """Call G and D the ways the training loop does, on its shapes, forward and backward; leave no trace.

    D step: fakes from a no-grad G, D on real and fake batches with weight gradients.
    G step: D frozen, gradients flow through it into G. The losses' exact formulas don't matter
    to the compiler (they stay outside the compiled networks), so a mean stands in for them.
    """
    state = {"G": _snapshot(G), "D": _snapshot(D)}
    image_shape = (batch_size, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    cast = autocast(cfg.trainer.amp, device)
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=rng_devices):  # dropout and our inputs draw from the global streams
            z = torch.randn(batch_size, cfg.generator.z_dim, device=device)
            real = torch.zeros(image_shape, device=device)  # as data.ImageBatches serves it: contiguous NCHW float32
            with cast:
                with torch.no_grad():
                    fake = G(z)
                d_objective = D(real).float().mean() + D(fake).float().mean()
            d_objective.backward()
            D.requires_grad_(False)
            try:
                with cast:
                    g_objective = D(G(z)).float().mean()
                g_objective.backward()
            finally:
                D.requires_grad_(True)
    finally:  # also after a failure: the eager fallback must start from the untouched networks
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        for parameter in (*G.parameters(), *D.parameters()):
            parameter.grad = None


def _snapshot(network: nn.Module) -> Dict[str, torch.Tensor]:
    # load_state_dict copies back into the same tensors, keeping their layout and addresses.
    return {name: tensor.detach().clone() for name, tensor in network.state_dict().items()}


# ---------------------------------------------------------------- trainer.cuda_graphs: the whole step as one graph


def use_cuda_graphs(requested: bool, device: torch.device) -> bool:
    """trainer.cuda_graphs on this device (validate_trainer refuses it without CUDA); under torchrun the step runs
    eagerly, with a warning: DDP's gradient all-reduce is not captured here."""
    if not requested or device.type != "cuda":
        return False
    if distributed.world().enabled:
        log.warning("trainer.cuda_graphs: not under torchrun (DDP's all-reduce is not captured); training eagerly")
        return False
    return True


class CapturedStep:
    """`trainer.cuda_graphs`: the whole training step, captured once as a CUDA graph and replayed.

    A step at DCGAN sizes is a few hundred small kernels whose launches cost more host time than the
    GPU needs to run them; a replay launches them all at once. What the step needs is made static:
    the real batches are copied into fixed buffers before each replay (device to device, no sync),
    latents come from the training generator registered with the graph, the optimizers are fused
    and `capturable`, gradients are zeroed in place, the EMA's decay follows a step counter on the
    device, and the guard's finite flags and the statistics are tensors the graph writes in place.
    Logging, grids, checkpoints, evaluation and signal checks stay outside, between replays.

    The first WARMUP_STEPS steps run eagerly on a side stream (CUDA graphs need their kernels and
    cuDNN's choices settled first); they are real training steps. The next step is captured and
    replayed. If capturing fails, training goes on eagerly, with one warning naming the cause.
    """

    WARMUP_STEPS = 3

    def __init__(self, step):
        self.step, self.state = step, step.state
        self.d_steps = step.cfg.trainer.d_steps
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed = False
        self.warmed = 0
        self.counter: Optional[torch.Tensor] = None  # the EMA's step on the device, from the (resumed) step
        self.reals: list = []
        self.stats: Dict[str, torch.Tensor] = {}

    def __call__(self) -> Dict[str, torch.Tensor]:
        if self.failed:
            return self.step()
        if self.counter is None:
            self.counter = torch.tensor(float(self.state.step), device=self.step.device)
        reals = [self.state.batches.next() for _ in range(self.d_steps)]  # device slices and gathers: no sync
        if self.graph is not None:
            for buffer, real in zip(self.reals, reals, strict=True):
                buffer.copy_(real)
            self.graph.replay()
            stats = self.stats
        elif self.warmed < self.WARMUP_STEPS:
            stats = self._warm_up(reals)
        else:
            stats = self._capture(reals)
        self.state.step += 1
        if self.state.G_ema is not None:
            self.state.G_ema.mark_updated()
        return stats

    def _warm_up(self, reals: list) -> Dict[str, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stats = self.step.update(reals, self.counter, set_to_none=False)
        torch.cuda.current_stream().wait_stream(side)
        self.warmed += 1
        return stats

    def _capture(self, reals: list) -> Dict[str, torch.Tensor]:
        """Record this step's kernels, then replay them once: the capture itself runs nothing."""
        self.reals = [real.clone() for real in reals]
        graph = torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(self.state.noise)  # the latents' stream advances at every replay
            with torch.cuda.graph(graph):
                self.stats = self.step.update(self.reals, self.counter, set_to_none=False)
        except Exception as error:  # any capture failure: the eager step still trains correctly
            message = (str(error).strip().splitlines() or [""])[0]
            log.warning(
                "trainer.cuda_graphs: capturing the training step failed (%s: %s); training without CUDA graphs",
                type(error).__name__,
                message[:300],
            )
            self.failed = True
            torch.cuda.synchronize()
            return self.step.update(reals, self.state.step)
        self.graph = graph
        graph.replay()
        return self.stats
