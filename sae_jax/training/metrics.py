"""Training metrics: `metrics.jsonl` and TensorBoard events in the run dir, and a progress
bar.

Only process 0 writes. Throughput is measured between records, so it reflects the
steady-state step time rather than the first step's compilation.
"""

from __future__ import annotations

import json
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from sae_jax import files

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON record per log step and drives the progress bar."""

    def __init__(self, run_dir, cfg, start_step: int, progress: bool = True):
        self.cfg = cfg
        self.writer = jax.process_index() == 0
        self.path = files.join(run_dir, METRICS_FILE)
        kept = self._records_up_to(start_step) if self.writer else ""
        # Object stores cannot append: keep the text and rewrite it (it stays small).
        self.text = kept if files.is_remote(run_dir) else None
        self.file = open(self.path, "a") if self.writer and self.text is None else None
        self.events = SummaryWriter(str(run_dir)) if self.writer else None
        self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (progress and self.writer))
        self.last_step, self.last_time = start_step, time.perf_counter()

    def _records_up_to(self, step: int) -> str:
        """The log's records of steps <= `step`, rewritten in place if it held later ones: a
        resumed run repeats the steps between its checkpoint and the interruption, and they
        must not be logged twice."""
        text = files.read_text(self.path) or ""
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            files.write_text(self.path, "".join(kept))
        return "".join(kept)

    def record(self, step: int, metrics: dict) -> dict:
        """Logs the metrics of `step` (arrays -> floats) and returns them with tokens/s."""
        now = time.perf_counter()
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        record["tokens_per_s"] = (step - self.last_step) * self.cfg.batch_size / max(
            now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        if self.writer:
            if self.file:
                self.file.write(files.strict_json(record) + "\n")
                self.file.flush()
            else:
                self.text += files.strict_json(record) + "\n"
                files.write_text(self.path, self.text)
            for key, value in record.items():
                if key != "step":
                    self.events.add_scalar(f"train/{key}", value, step)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}",
                                 fvu=f"{record['fvu']:.3f}",
                                 tok_s=f"{record['tokens_per_s']:.3g}")
        return record

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.events:
            self.events.close()


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl line; a torn last line (a crash mid-write) counts as
    later than everything, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
