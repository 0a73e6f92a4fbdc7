"""Speed options of the trainer: `trainer.amp`, `channels_last`, `compile`, `cuda_graphs`, `cudnn_benchmark`.

Only amp changes the arithmetic (matmul and conv inputs rounded to bf16 or fp16; `auto` picks by
hardware, `resolve_precision`); channels_last and cudnn_benchmark pick memory layouts and kernels,
and compile fuses the same operations.
(`trainer.fused_optimizer` lives with the optimizers, in optim.build_optimizer.)

`prepare_networks` runs once, right after G and D are built and before anything copies or wraps
them (the EMA copy, DDP, the optimizers), so every later user sees the final layout and calls the
compiled forward. What each option gave, with the commands that measured it: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from dcgan import distributed
from dcgan.errors import UserError
from dcgan.losses import build_loss

log = logging.getLogger(__name__)

# torch.compile's backend. Tests swap in a cheap or failing one; users always get inductor.
COMPILE_BACKEND = "inductor"


AMP_MODES = ("auto", "bf16", "fp16", "off")
# trainer.amp before it took a mode: true meant bf16 autocast, false meant none. Both still read as before.
LEGACY_AMP = {"true": "bf16", "false": "off"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What trainer.amp resolved to on this device: `mode` is bf16, fp16 or off; `reason` says why (run card)."""

    setting: str  # as given: auto | bf16 | fp16 | off (or a legacy true/false)
    mode: str  # bf16 | fp16 | off
    reason: str

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.mode)

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without a loss scale (torch.amp.GradScaler); bf16 has fp32's exponent range."""
        return self.mode == "fp16"


def amp_mode(setting: Any) -> str:
    """trainer.amp as one of AMP_MODES; a bool (a config written before the modes) maps through LEGACY_AMP."""
    text = str(setting).strip().lower()
    mode = LEGACY_AMP.get(text, text)
    if mode not in AMP_MODES:
        raise UserError(f"trainer.amp must be one of {', '.join(AMP_MODES)}, got {setting!r}")
    return mode


def resolve_precision(setting: Any, device: torch.device, cuda_graphs: bool = False) -> Precision:
    """trainer.amp on `device`: `auto` picks bf16 where the hardware computes it natively, fp16 with loss
    scaling on GPUs without bf16 (T4, V100), and off elsewhere. fp16's loss scaling is not captured in a
    CUDA graph here, so `auto` skips it under trainer.cuda_graphs and an explicit fp16 is refused."""
    mode = amp_mode(setting)
    if mode == "fp16" and cuda_graphs:
        raise UserError(
            "trainer.amp=fp16 needs loss scaling, which the captured step does not run: "
            "set trainer.cuda_graphs=false, or trainer.amp=bf16 on a GPU that has it"
        )
    if mode != "auto":
        return Precision(str(setting), mode, "set in the config")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("auto", "bf16", f"{name} computes bf16 natively")
        if torch.cuda.get_device_capability(device) >= (7, 0) and not cuda_graphs:
            return Precision("auto", "fp16", f"{name} has fp16 tensor cores but no native bf16")
        return Precision("auto", "off", f"{name}: no native bf16" + (" (fp16 is not captured)" if cuda_graphs else ""))
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision("auto", "bf16", "this CPU computes bf16 natively (AVX512-BF16 or AMX)")
    return Precision("auto", "off", f"no native bf16 on {device.type} (emulated bf16 runs slower than fp32)")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles, as PyTorch's CPU dispatcher sees them (oneDNN's bf16 kernels use these)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(precision: Precision, device: torch.device, cache: bool = True) -> AbstractContextManager:
    """Autocast in the resolved precision (matmuls and convs in bf16 or fp16, reductions in fp32); a no-op for off.

    `cache=False` under a CUDA graph: autocast's cache of low-precision weight copies would outlive the capture.
    """
    if precision.dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype, cache_enabled=cache)


def prepare_networks(
    cfg: DictConfig, G: nn.Module, D: nn.Module, batch_size: int, device: torch.device, precision: Precision
) -> None:
    """Apply the trainer's speed options to freshly built G and D, in place.

    `batch_size` is this process's batch and `precision` the resolved trainer.amp: the compile trial step
    runs on the loop's exact shapes and dtypes.
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
        compile_networks(cfg, G, D, batch_size, device, precision)


def compile_networks(
    cfg: DictConfig, G: nn.Module, D: nn.Module, batch_size: int, device: torch.device, precision: Precision
) -> bool:
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
        trial_step(G, D, cfg, batch_size, device, precision)
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


def trial_step(
    G: nn.Module, D: nn.Module, cfg: DictConfig, batch_size: int, device: torch.device, precision: Precision
) -> None:
    """Call G and D the ways the training loop does, on its shapes, forward and backward; leave no trace.

    D step: fakes from a no-grad G, D on real and fake batches with weight gradients.
    G step: D frozen, gradients flow through it into G. The losses' exact formulas don't matter
    to the compiler (they stay outside the compiled networks), so a mean stands in for them.
    """
    state = {"G": _snapshot(G), "D": _snapshot(D)}
    image_shape = (batch_size, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    cast = autocast(precision, device)
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
    What a captured region may not do (read the device from the host, make a tensor from a Python
    value, produce a shape that depends on data) is checked on the CPU: tests/test_capture_rules.py.

    The first WARMUP_STEPS steps run eagerly on a side stream (CUDA graphs need their kernels and
    cuDNN's choices settled first); they are real training steps. The next step is captured and
    replayed. A check that fails before the capture opens sends training on eagerly, with a warning;
    once `torch.cuda.graph` has begun, a failure leaves the allocator, the random generators and the
    stream in capture state, so nothing can safely go on in this process: the run stops with a
    UserError naming the root cause. So does a capture that recorded nothing (the first replay must
    advance the step counters).
    """

    WARMUP_STEPS = 3

    def __init__(self, step):
        self.step, self.state = step, step.state
        self.d_steps = step.cfg.trainer.d_steps
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager = False  # a check before the capture found the step not capturable
        self.warmed = 0
        self.counter: Optional[torch.Tensor] = None  # the EMA's step on the device, from the (resumed) step
        self.reals: list = []
        self.stats: Dict[str, torch.Tensor] = {}

    def __call__(self) -> Dict[str, torch.Tensor]:
        if self.eager:
            return self.step()
        if self.counter is None:
            self.counter = torch.tensor(float(self.state.step), device=self.step.device)
        reals = [self.state.batches.next() for _ in range(self.d_steps)]  # device slices and gathers: no sync
        if self.graph is not None:
            for buffers, real in zip(self.reals, reals, strict=True):  # images, and labels where there are any
                for buffer, tensor in zip(buffers, real, strict=True):
                    if buffer is not None:
                        buffer.copy_(tensor)
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

    def captured_update(self) -> Dict[str, torch.Tensor]:
        """What the graph records: the step on the static batch buffers, the device counter, in-place zeroing."""
        return self.step.update(self.reals, self.counter, set_to_none=False)

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
        reason = not_capturable(self.state)
        if reason:  # the capture has not begun: the eager step trains correctly from here
            log.warning("trainer.cuda_graphs: %s; training without CUDA graphs", reason)
            self.eager = True
            return self.step.update(reals, self.state.step)
        self.reals = [tuple(t.clone() if t is not None else None for t in real) for real in reals]
        counters = self.counters()
        before = [float(counter) for counter, _ in counters]  # host reads, once: outside the capture
        graph = torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(self.state.noise)  # the latents' stream advances at every replay
            with torch.cuda.graph(graph):
                self.stats = self.captured_update()
        except Exception as error:  # the process is left in capture state: stop, naming the first error
            raise capture_failed(error) from None
        self.graph = graph
        graph.replay()
        moved = [float(counter) - old for (counter, _), old in zip(counters, before, strict=True)]
        if moved != [float(by) for _, by in counters]:
            raise UserError(
                f"trainer.cuda_graphs: the captured training step did not train when replayed (its step counters "
                f"moved by {moved}, expected {[by for _, by in counters]}); set trainer.cuda_graphs=false"
            )
        return self.stats

    def counters(self) -> list:
        """(counter, its advance per step): the EMA's device counter and each optimizer's first step count."""
        counters = [(self.counter, 1)] if self.state.G_ema is not None else []
        for optimizer, updates in ((self.state.opt_d, self.d_steps), (self.state.opt_g, 1)):
            steps = [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
            counters += [(steps[0], updates)] if steps else []
        return counters


def not_capturable(state: Any) -> Optional[str]:
    """Why the optimizers' update can't be captured as it stands, or None: each step count must live on its
    parameter's device (a host count is read with .item(), a sync the capture forbids)."""
    for name, optimizer in (("optimizer.generator", state.opt_g), ("optimizer.discriminator", state.opt_d)):
        for parameter, values in optimizer.state.items():
            step = values.get("step")
            if isinstance(step, torch.Tensor) and step.device != parameter.device:
                return f"{name} keeps its step counts on {step.device}, not with the weights on {parameter.device}"
    return None


def capture_failed(error: BaseException) -> UserError:
    """The first error of a failed capture as one line: CUDA reports later ones as "operation failed due to a
    previous error during capture", and Python chains them onto the first."""
    root = error
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    message = (str(root).strip().splitlines() or [""])[0][:300]
    return UserError(
        f"trainer.cuda_graphs: capturing the training step failed ({type(root).__name__}: {message}); "
        "set trainer.cuda_graphs=false to train without CUDA graphs"
    )
