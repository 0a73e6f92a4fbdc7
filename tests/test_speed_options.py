"""The speed options (trainer.channels_last, compile, cuda_graphs, fused_optimizer, cudnn_benchmark) on CPU.

Each runs short trainings through train() and compares them with a plain run: options that change
no arithmetic must give the same weights. torch.compile runs here with a backend that replays the
captured graphs eagerly (compiling with inductor takes a minute on a cold CPU); it exercises the
same capture, forward/backward split and fallback as inductor, whose speed scripts/bench.py measures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from dcgan import checkpoint, cli, speed
from dcgan import train as train_module
from dcgan.config import compose
from dcgan.log import read_metrics

from conftest import FAST

# Dropout in D draws random numbers in every pass: the compile trial step must leave that stream as it was.
# fp32 (amp=off): the options are compared as the same arithmetic, which bf16's rounding (auto, on a CPU with
# AVX512-BF16) would blur; test_all_speed_options_together_with_amp adds bf16.
RUN = [*FAST, "trainer.max_steps=6", "discriminator.dropout=0.2", "trainer.amp=off"]


@pytest.fixture(autouse=True)
def one_thread_and_fresh_compiler(one_torch_thread):
    yield
    torch.compiler.reset()


def train_run(tmp_path: Path, name: str, *overrides: str) -> Tuple[Dict, List[Dict]]:
    run_dir = tmp_path / name
    train_module.train(compose("train", [*RUN, *overrides]), run_dir)
    return checkpoint.load(run_dir / "checkpoints" / "last.pt"), read_metrics(run_dir / "metrics.jsonl")


def largest_difference(a: Dict, b: Dict) -> float:
    assert a["generator"].keys() == b["generator"].keys() and a["discriminator"].keys() == b["discriminator"].keys()
    return max(
        (a[part][key].double() - b[part][key].double()).abs().max().item()
        for part in ("generator", "discriminator", "generator_ema")
        for key in a[part]
    )


def assert_finite(rows: List[Dict]) -> None:
    assert rows and all(math.isfinite(row[key]) for row in rows for key in ("loss_d", "loss_g"))


class EagerGraphs:
    """A torch.compile backend that captures like inductor (dynamo + AOTAutograd's forward/backward split)
    but runs the captured graphs with the eager kernels, counting them; optionally failing on the backward."""

    def __init__(self, fail_backward: bool = False):
        self.forward_graphs = self.backward_graphs = 0
        self.fail_backward = fail_backward

    def forward(self, graph, example_inputs):
        self.forward_graphs += 1
        return make_boxed_func(graph.forward)

    def backward(self, graph, example_inputs):
        if self.fail_backward:
            raise RuntimeError("convolution_backward: stride assertion (simulated)")
        self.backward_graphs += 1
        return make_boxed_func(graph.forward)

    def install(self, monkeypatch) -> "EagerGraphs":
        monkeypatch.setattr(speed, "COMPILE_BACKEND", aot_autograd(fw_compiler=self.forward, bw_compiler=self.backward))
        return self


def test_fused_optimizer_matches_the_foreach_one(tmp_path: Path):
    fused, rows = train_run(tmp_path, "fused", "trainer.fused_optimizer=true")
    foreach, _ = train_run(tmp_path, "foreach", "trainer.fused_optimizer=false")
    assert fused["optimizer_g"]["param_groups"][0]["fused"] is True
    assert not foreach["optimizer_g"]["param_groups"][0]["fused"]
    assert largest_difference(fused, foreach) < 1e-5
    assert_finite(rows)


def test_channels_last_matches_the_plain_layout(tmp_path: Path):
    # SGD: an update proportional to the gradient, so rounding differences between the layouts' kernels
    # stay rounding-sized (Adam's first steps are sign-like and would amplify them to +-lr). No dropout:
    # it draws its mask in memory order, so the two layouts drop different (equally random) pixels.
    same_arithmetic = [
        "optimizer.generator.name=SGD",
        "optimizer.discriminator.name=SGD",
        "optimizer.generator.lr=0.01",
        "optimizer.discriminator.lr=0.01",
        "discriminator.dropout=0",
        "trainer.max_steps=4",
    ]
    nhwc, rows = train_run(tmp_path, "nhwc", *same_arithmetic, "trainer.channels_last=true")
    nchw, _ = train_run(tmp_path, "nchw", *same_arithmetic, "trainer.channels_last=false")
    conv_weights = [w for w in nhwc["generator"].values() if w.dim() == 4 and w.shape[1] > 1 and w.shape[-1] > 1]
    assert conv_weights and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights
    )
    assert largest_difference(nhwc, nchw) < 1e-5
    assert_finite(rows)


def test_compile_captures_every_graph_before_training_and_trains_identically(tmp_path: Path, monkeypatch):
    backend = EagerGraphs().install(monkeypatch)
    graphs_after_trial: List[int] = []
    trial_step = speed.trial_step

    def counting_trial_step(*args, **kwargs):
        trial_step(*args, **kwargs)
        graphs_after_trial.append(backend.forward_graphs + backend.backward_graphs)

    monkeypatch.setattr(speed, "trial_step", counting_trial_step)
    compiled, rows = train_run(tmp_path, "compiled", "trainer.compile=true")
    eager, _ = train_run(tmp_path, "eager", "trainer.compile=false")
    # G and D, each forward and backward, were compiled in the trial step, and the loop needed no other graph.
    assert backend.forward_graphs >= 2 and backend.backward_graphs >= 2
    assert graphs_after_trial == [backend.forward_graphs + backend.backward_graphs]
    # The trial step left no trace (weights, BatchNorm statistics, random streams): same training, same checkpoint keys.
    assert largest_difference(compiled, eager) == 0.0
    assert_finite(rows)


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path: Path, monkeypatch, caplog):
    EagerGraphs(fail_backward=True).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dcgan.speed"):
        fallback, rows = train_run(tmp_path, "fallback", "trainer.compile=true", "trainer.channels_last=true")
    warnings = [r.getMessage() for r in caplog.records if r.name == "dcgan.speed"]
    assert (
        len(warnings) == 1 and "torch.compile failed" in warnings[0] and "stride assertion (simulated)" in warnings[0]
    )
    eager, _ = train_run(tmp_path, "eager", "trainer.compile=false", "trainer.channels_last=true")
    assert largest_difference(fallback, eager) == 0.0
    assert_finite(rows)


def test_compile_keeps_d_eager_when_the_loss_differentiates_a_gradient(tmp_path: Path, monkeypatch, caplog):
    backend = EagerGraphs().install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dcgan.speed"):
        _, rows = train_run(tmp_path, "wgan", "loss=wgan_gp", "discriminator.norm=none", "trainer.compile=true")
    warnings = [r.getMessage() for r in caplog.records if r.name == "dcgan.speed"]
    assert len(warnings) == 1 and "D stays eager" in warnings[0] and "wgan_gp" in warnings[0]
    assert backend.forward_graphs >= 1  # G was compiled
    assert_finite(rows)


def test_all_speed_options_together_with_amp(tmp_path: Path, monkeypatch):
    backend = EagerGraphs().install(monkeypatch)
    _, rows = train_run(
        tmp_path,
        "all",
        "trainer.amp=bf16",
        "trainer.channels_last=true",
        "trainer.compile=true",
        "trainer.fused_optimizer=true",
        "trainer.cudnn_benchmark=false",
    )
    assert backend.forward_graphs >= 2
    assert_finite(rows)


def test_cuda_graphs_on_cpu_is_a_config_error(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        cli.train_main(["trainer.cuda_graphs=true", "trainer.device=cpu", f"hydra.run.dir={run_dir}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("gan-train: error:")
        and "trainer.cuda_graphs=true needs a CUDA device" in err
        and err.count("\n") == 1
    )
    assert not run_dir.exists()
