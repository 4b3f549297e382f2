"""What a run costs: peak memory while training, the adapter's size on disk, inference latency."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from pathlib import Path

import torch

from peft_ext.evaluation.batching import pad_id_of, pad_right, scoring


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so that a run's RSS increase is not hidden by the previous run's pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure is still a lower bound
        pass


class PeakMemory:
    """Peak memory over a `with` block. On CUDA: torch.cuda.max_memory_allocated (all tensors, the model included).
    On the CPU: the largest increase of the process's resident set size (RSS) over its value at the start, sampled
    every `interval` seconds (so the optimizer state, gradients and activations, not the model loaded before)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_bytes: int | None = None
        self.kind = "cuda max allocated" if torch.cuda.is_available() else "cpu peak RSS increase"

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        _release_freed_memory()
        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_bytes = self._peak - self._start
        return False


def files_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob(pattern))


def weights_bytes(model) -> int:
    """Bytes of the model's weights (tied tensors once): what a full fine-tune stores."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def latency_batch(tokenizer, texts: list[str], size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of `size` inputs (the evaluation texts, repeated if fewer), cut to `max_length` tokens."""
    chosen = [texts[i % len(texts)] for i in range(size)]
    encoded = [tokenizer(t, truncation=True, max_length=max_length).input_ids or [pad_id_of(tokenizer)] for t in chosen]
    return pad_right(encoded, pad_id_of(tokenizer))


def forward_latency_ms(model, batch: tuple[torch.Tensor, torch.Tensor], repeats: int = 5) -> float:
    """Median wall time of one forward pass over `batch` (one warm-up pass first), in milliseconds."""
    ids, mask = batch
    times = []
    with scoring(model) as device:
        ids, mask = ids.to(device), mask.to(device)
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
