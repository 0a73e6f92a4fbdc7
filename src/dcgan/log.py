"""Training logs: a JSONL file of averaged metrics and a tqdm progress bar.

Per-step statistics arrive as device tensors and are summed on the device; they are read back
(one GPU sync) only every `log_every` steps, so logging never stalls the loop.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm


class MetricsLog:
    def __init__(self, path: Path, start_step: int, total_steps: int, images_per_step: int, show_progress: bool):
        self.path = path
        self.images_per_step = images_per_step
        self._sums: Dict[str, torch.Tensor] = {}
        self._count = 0
        self._clock = time.perf_counter()
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not show_progress, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint, so the file reads as one continuous run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        temporary.replace(self.path)

    def add(self, stats: Dict[str, torch.Tensor]) -> None:
        """Accumulate one step's statistics (detached scalars; no sync)."""
        for key, value in stats.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._count += 1
        self.bar.update(1)

    def write(self, step: int, epoch: int, extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Average what was accumulated since the last write, append it as a JSON line, show it."""
        if self._count == 0:
            return {}
        now = time.perf_counter()
        names = list(self._sums)
        # This is the loop's only CPU-GPU sync point.
        values = torch.stack([self._sums[k] for k in names]).div(self._count).tolist()
        row: Dict[str, float] = {"step": step, "epoch": epoch}
        row.update({k: round(v, 6) for k, v in zip(names, values)})
        row["images_per_s"] = round(self._count * self.images_per_step / max(now - self._clock, 1e-9), 1)
        row.update(extra or {})
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")
        self.bar.set_postfix(
            {k: f"{row[k]:.3g}" for k in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s") if k in row},
            refresh=False,
        )
        self._sums, self._count, self._clock = {}, 0, now
        return row

    def close(self) -> None:
        self.bar.close()


def all_finite(row: Dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def read_metrics(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
