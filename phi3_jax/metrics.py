"""Training metrics: JSONL file, TensorBoard, a progress bar, throughput and MFU.

`WORKDIR/metrics.jsonl` gets one JSON object per logged step ({"step", "loss", "lr", "grad_norm",
"tokens_per_sec", "mfu" (only where the chip's peak is known), ...}), one per evaluation
({"step", "eval_loss", ...}) and one where each data phase begins ({"step", "phase", "phase_index"}, with
several phases); step and eval rows carry "tokens" and "flops", what the run has trained on by that step.
Only process 0 writes. A resumed run appends; entries for steps past the restored step (written after the
last checkpoint by a run that was then killed) are dropped on resume so the file reads as one run.

MFU = achieved model FLOP/s / (peak bf16 FLOP/s per chip x chips), with the model FLOPs from
`ModelConfig.flops_per_token(seq_len)` (6 N per token plus attention, forward + backward).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

# Peak dense bf16 FLOP/s per chip (datasheet figures, no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "v5e": 197e12,
    "v5 lite": 197e12,
    "v5litepod": 197e12,
    "v5p": 459e12,
    "v5": 459e12,
    "v4": 275e12,
    "v6e": 918e12,
    "v6 lite": 918e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of one chip, or None where unknown (CPU, unlisted cards)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    # Longest key first so "v5 lite" wins over "v5".
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_chips: int, peak: float | None) -> float | None:
    if peak is None or tokens_per_sec <= 0:
        return None
    return tokens_per_sec * flops_per_token / (peak * num_chips)


def _clean(v: Any):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": JSON has no literal for them
    return v


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drops entries with step > after_step (a resumed run rewrites those steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class MetricsWriter:
    """JSONL + TensorBoard + tqdm; a no-op on processes other than 0."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not self.active:
            return
        # A resumed run rewrites the steps after its checkpoint; a fresh one (start 0) every row, step 0's too.
        keep_through = start_step if start_step > 0 else -1
        truncate_jsonl(self.path, keep_through)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=keep_through + 1)
            except ImportError:
                self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1, mininterval=1.0)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in values.items() if v is not None}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def progress(self, step: int, **postfix) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


class StepProfiler:
    """A jax.profiler trace of the train steps first..last (1-based, as logged) into `directory`
    (WORKDIR/tensorboard: TensorBoard's profile tab and xprof read its plugins/profile/RUN/*.xplane.pb).

    `before(s)` is called before step s is dispatched; `after(s, out)` once it is, with its outputs: the
    trace stops when step `last` has finished on the device. A run that ends or fails inside the range
    stops the trace in `close()`."""

    def __init__(self, directory: str | os.PathLike, first: int, last: int):
        self.directory, self.first, self.last = Path(directory), int(first), int(last)
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> bool:
        """True when this call wrote the trace."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
