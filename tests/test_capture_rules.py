"""What a CUDA graph forbids, checked on the CPU: the captured step reads nothing on the host, makes no tensor from
a Python value and no shape that depends on data; a failed or empty capture ends the run with one clear line.

`CaptureRules` is a TorchDispatchMode that sees every ATen op the step calls. On the CPU a host read costs nothing,
so the step would pass any test that only trains; on a GPU the same read fails the capture. The step runs here as
speed.CapturedStep runs it (its warm-up, the device counter, gradients zeroed in place, the guard's flags), with
torch.cuda's stream and graph calls stood in for by `FakeCuda`: its capture runs the step under CaptureRules and
then puts every tensor back, as a real capture records kernels without running them; its replay runs the recorded
step. Capturable optimizers are allowed on the CPU here (torch.optim checks the device only).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Dict, List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcgan import runcard, speed, train
from dcgan.config import compose
from dcgan.errors import UserError
from dcgan.guard import tensors_in

pytestmark = pytest.mark.usefixtures("one_torch_thread")
aten = torch.ops.aten
# Ops that read a device value on the host, or whose output shape depends on the data.
HOST_READS = {
    aten._local_scalar_dense,  # .item(), float(t), bool(t), `if t:`
    aten.is_nonzero,
    aten.nonzero,
    aten.equal,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.repeat_interleave,
    aten.bincount,
}
# A tensor made from a Python value: torch.tensor(x) and friends (a host-to-device copy, frozen into the graph).
FROM_PYTHON = {aten.lift_fresh, aten.lift_fresh_copy, aten.scalar_tensor}


class CaptureRules(TorchDispatchMode):
    """Records each op a CUDA graph's capture forbids, by name."""

    def __init__(self):
        super().__init__()
        self.broken: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_READS or func.overloadpacket in FROM_PYTHON:
            self.broken.append(str(func))
        if func.overloadpacket is aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.broken.append(f"{func} with a boolean mask")  # its output's size depends on the data
        return func(*args, **kwargs)


class FakeGraph:
    """torch.cuda.CUDAGraph for the CPU: `replay` runs the recorded step (`recorded`) again."""

    def __init__(self):
        self.recorded = None

    def register_generator_state(self, generator):
        pass

    def replay(self):
        FakeCuda.replays += 1
        if self.recorded is not None:
            self.recorded()


class FakeCuda:
    """Stands in for the torch.cuda calls of speed.CapturedStep; `mode` picks what the capture does."""

    replays = 0

    def __init__(self, monkeypatch, mode: str = "works"):
        self.mode, self.rules, self.captured = mode, CaptureRules(), None
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        monkeypatch.setattr(torch.cuda, "Stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(speed.CapturedStep, "WARMUP_STEPS", 1)
        for module in ("adam", "rmsprop", "optimizer"):
            module = importlib.import_module(f"torch.optim.{module}")
            monkeypatch.setattr(module, "_get_capturable_supported_devices", lambda *a, **k: ["cpu"])
        FakeCuda.replays = 0

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph):
        step: speed.CapturedStep = self.captured
        saved = [(t, t.detach().clone()) for t in self.state_tensors(step)]
        noise, dropout = step.state.noise.get_state(), torch.get_rng_state()  # (CUDA registers its default one)
        if self.mode == "fails":
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            finally:  # what capture_end then says
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        with self.rules:
            yield
        for tensor, value in saved:  # a capture records kernels without running them
            tensor.copy_(value)
        step.state.noise.set_state(noise)
        torch.set_rng_state(dropout)
        if self.mode == "works":
            graph.recorded = lambda: [s.copy_(new) for s, new in zip(step.stats.values(), replay(step), strict=True)]

    @staticmethod
    def state_tensors(step: speed.CapturedStep) -> List[torch.Tensor]:
        s = step.state
        ema = list(s.G_ema.model.state_dict().values()) if s.G_ema is not None else []
        tensors = [*s.G.state_dict().values(), *s.D.state_dict().values(), *ema, step.counter]
        tensors += [*tensors_in(s.opt_g.state), *tensors_in(s.opt_d.state), *s.guard._finite.values()]
        return tensors + [p.grad for p in (*s.G.parameters(), *s.D.parameters()) if p.grad is not None]


def replay(step: speed.CapturedStep) -> List[torch.Tensor]:
    return list(step.captured_update().values())


# Every choice a user can make that changes what the step runs, a few to a run (one build each: CI time).
VARIANTS = {
    "ns, bf16, DiffAugment, ema_start": [
        "trainer.amp=bf16",
        "augment.policy=[color,translation,cutout]",
        "trainer.ema_start=3",
    ],
    "hinge, spectral norm, no EMA, RMSprop": [
        "loss=hinge",
        "discriminator.spectral_norm=true",
        "discriminator.norm=none",
        "trainer.ema=0",
        "optimizer=rmsprop",
    ],
    "wgan-gp": ["loss=wgan_gp", "discriminator.norm=none"],
    "conditional: batchnorm G, projection D, DiffAugment, R1": [
        "conditional=true",
        "generator.condition=batchnorm",
        "augment.policy=[translation]",
        "loss.r1_weight=1.0",
    ],
    "conditional: hinge, spectral norm, EMA start": [
        "conditional=true",
        "loss=hinge",
        "discriminator.spectral_norm=true",
        "trainer.ema_start=2",
    ],
    "conditional: lsgan, batchnorm G, no EMA": [
        "conditional=true",
        "loss=lsgan",
        "generator.condition=batchnorm",
        "trainer.ema=0",
    ],
    "conditional: embedded labels in G and D, wgan-gp, d_steps=2": [
        "conditional=true",
        "discriminator.condition=embed",
        "loss=wgan_gp",
        "discriminator.norm=none",
        "trainer.d_steps=2",
    ],
    "lsgan, R1 every step, d_steps=2, fp32": [
        "loss=lsgan",
        "loss.r1_weight=1.0",
        "trainer.d_steps=2",
        "trainer.amp=off",
    ],
    **{
        f"preset {name}": [f"preset={name}"]
        for name in ("dcgan64", "keras_celeba64", "keras_fashion", "keras_mnist", "tf_celeba28", "tf_dcgan28")
    },
}
TINY = [
    "dataset=mnist_tiny",
    "dataset.max_images=64",
    "trainer.device=cpu",
    "trainer.batch_size=4",
    "generator.width=0.0625",
    "discriminator.width=0.0625",
]


def captured_step(monkeypatch, overrides: List[str], mode: str = "works"):
    """The training state and speed.CapturedStep for `overrides`, on the CPU, with FakeCuda."""
    fake = FakeCuda(monkeypatch, mode)
    cfg = compose("train", [*overrides, *TINY])
    state, step, _ = train.build(cfg, torch.device("cpu"), graphs=True)
    fake.captured = step
    return fake, state, step


def preset_overrides(overrides: List[str]) -> List[str]:
    """A preset's own data set swapped for the shipped MNIST subset at the preset's size and channels."""
    if not overrides or not overrides[0].startswith("preset="):
        return overrides
    preset = compose("train", overrides)
    return [
        *overrides,
        f"dataset.image_size={preset.dataset.image_size}",
        f"dataset.channels={preset.dataset.channels}",
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_captured_step_reads_nothing_on_the_host(variant: str, monkeypatch):
    fake, state, step = captured_step(monkeypatch, preset_overrides(VARIANTS[variant]))
    for _ in range(3):  # one warm-up step, the capture with its first replay, one more replay
        stats = step()
    assert fake.rules.broken == [], f"{variant}: the captured step calls {sorted(set(fake.rules.broken))}"
    assert step.graph is not None and FakeCuda.replays == 2 and state.step == 3
    assert all(torch.isfinite(value).all() for value in stats.values())


def test_the_spy_sees_a_host_read():
    """CaptureRules catches what it is there for: the EMA update as it was (lerp with a 0-dim tensor weight)."""
    rules = CaptureRules()
    ema, weights, weight = [torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5)
    with rules:
        torch._foreach_lerp_(ema, weights, weight)
        torch.tensor(1.0)
    assert "aten._local_scalar_dense.default" in rules.broken and "aten.lift_fresh.default" in rules.broken


def test_a_replayed_capture_trains_like_the_eager_step(monkeypatch):
    """Captured step (FakeCuda: the capture runs nothing, each replay runs the recorded step) vs the eager step.

    fp32: autocast's weight cache, off under a graph, changes bf16's rounding (measured: 7e-4 after 5 steps).
    Dropout draws from the global stream both runs share, so they run one after the other (build reseeds it).
    """
    overrides = ["trainer.ema_start=2", "discriminator.dropout=0.2", "trainer.amp=off", *TINY]
    _, graph_state, graph_step = captured_step(monkeypatch, overrides)
    for _ in range(5):
        graph_step()
    eager_state, eager_step, _ = train.build(compose("train", overrides), torch.device("cpu"))
    for _ in range(5):
        eager_step()
    assert FakeCuda.replays == 4 and graph_step.counter.item() == 5
    graph, eager = graph_state.state_dict(), eager_state.state_dict()
    for part in ("generator", "discriminator", "generator_ema"):
        for name, value in eager[part].items():
            assert torch.allclose(value, graph[part][name], atol=1e-6), (part, name)


def test_a_failed_capture_stops_with_its_first_error(monkeypatch):
    _, _, step = captured_step(monkeypatch, [], mode="fails")
    step()
    with pytest.raises(UserError) as error:
        step()
    message = str(error.value)
    assert "operation not permitted when stream is capturing" in message and "previous error" not in message
    assert "trainer.cuda_graphs=false" in message


def test_a_capture_that_recorded_nothing_is_an_error(monkeypatch):
    _, _, step = captured_step(monkeypatch, [], mode="records nothing")
    step()
    with pytest.raises(UserError, match="did not train when replayed.*trainer.cuda_graphs=false"):
        step()


def test_step_counts_off_the_weights_device_send_the_step_back_to_eager(monkeypatch, caplog):
    """A check before the capture opens may fall back: the run goes on eagerly, with one warning."""
    fake, state, step = captured_step(monkeypatch, [])
    step()
    parameter = next(iter(state.opt_d.state))
    state.opt_d.state[parameter]["step"] = torch.empty((), device="meta")  # "not where the weights are"
    monkeypatch.setattr(step.step, "update", lambda reals, ema_step, set_to_none=True: {"loss_d": torch.zeros(())})
    with caplog.at_level(logging.WARNING):
        step()
    assert step.eager and step.graph is None and "keeps its step counts on meta" in caplog.text
    assert fake.rules.broken == [] and FakeCuda.replays == 0


def count_host_reads(monkeypatch, overrides: List[str], steps: int) -> Dict[str, int]:
    """Host reads inside the eager loop's steps (between log rows), over a real train() of `steps` steps."""
    seen: Dict[str, int] = {}
    original = train.TrainStep.__call__

    def spied(self):
        rules = CaptureRules()
        with rules:
            stats = original(self)
        for name in rules.broken:
            seen[name] = seen.get(name, 0) + 1
        return stats

    monkeypatch.setattr(train.TrainStep, "__call__", spied)
    cfg = compose(
        "train",
        [
            *TINY,
            *overrides,
            f"trainer.max_steps={steps}",
            "trainer.progress=false",
            "trainer.log_every=100",
            "trainer.sample_every=100",
            "trainer.ckpt_every=100",
        ],
    )
    return cfg, seen


@pytest.mark.parametrize("overrides", [[], ["trainer.amp=fp16"]], ids=["defaults", "fp16 with loss scaling"])
def test_the_eager_steps_read_nothing_on_the_host(overrides, monkeypatch, tmp_path):
    cfg, seen = count_host_reads(monkeypatch, overrides, steps=4)
    train.train(cfg, tmp_path / "run")
    assert seen == {}, f"host reads inside eager steps: {seen}"
    chosen = runcard.read(tmp_path / "run")["precision"]  # what trainer.amp became, and why
    assert chosen["trainer.amp"] == cfg.trainer.amp and chosen["chosen"] in ("bf16", "fp16", "off") and chosen["why"]


def test_a_failed_capture_in_a_resumed_run_loses_nothing(monkeypatch, tmp_path):
    """train() with the captured step: the capture fails after the resumed run's warm-up; the checkpoints written
    before stay as they were, and the error is the one-line UserError gan-train exits 2 with."""
    run = tmp_path / "run"
    overrides = [*TINY, "trainer.progress=false", "trainer.log_every=2", "trainer.sample_every=100"]
    train.train(compose("train", [*overrides, "trainer.max_steps=2", "trainer.ckpt_every=2"]), run)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    fake = FakeCuda(monkeypatch, mode="fails")
    build = train.build

    def build_captured(cfg, device, graphs=None):
        state, step, images = build(cfg, device, graphs=True)
        fake.captured = step
        return state, step, images

    monkeypatch.setattr(train, "build", build_captured)
    resumed = compose("train", [*overrides, "trainer.max_steps=6", "trainer.ckpt_every=100", "trainer.resume=auto"])
    with pytest.raises(UserError, match="capturing the training step failed"):
        train.train(resumed, run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def test_cuda_n_becomes_the_current_device_before_anything_uses_it(monkeypatch):
    from dcgan import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed.setup("cuda:1", 60) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    chosen.clear()
    distributed.setup("cuda", 60)
    assert chosen == []  # plain cuda: the current device, whichever CUDA_VISIBLE_DEVICES made it


@pytest.mark.parametrize(
    "setting, device, bf16, capability, graphs, mode",
    [
        ("auto", "cpu", True, None, False, "bf16"),
        ("auto", "cpu", False, None, False, "off"),
        ("auto", "cuda", True, (8, 0), True, "bf16"),  # A100, H100
        ("auto", "cuda", False, (7, 5), False, "fp16"),  # T4
        ("auto", "cuda", False, (7, 5), True, "off"),  # T4 with graphs: fp16's loss scaling is not captured
        ("auto", "cuda", False, (6, 0), False, "off"),  # P100
        (True, "cpu", False, None, False, "bf16"),  # configs and checkpoints written when amp was a bool
        (False, "cuda", True, (9, 0), False, "off"),
        ("fp16", "cpu", True, None, False, "fp16"),
    ],
)
def test_amp_auto_follows_the_hardware(setting, device, bf16, capability, graphs, mode, monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    precision = speed.resolve_precision(setting, torch.device(device), graphs)
    assert precision.mode == mode and precision.reason


def test_amp_refuses_what_it_cannot_do():
    with pytest.raises(UserError, match="trainer.amp must be one of auto, bf16, fp16, off, got 'half'"):
        speed.amp_mode("half")
    with pytest.raises(UserError, match="trainer.amp=fp16 needs loss scaling.*trainer.cuda_graphs=false"):
        speed.resolve_precision("fp16", torch.device("cpu"), cuda_graphs=True)
