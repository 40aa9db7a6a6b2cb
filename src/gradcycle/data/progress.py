"""prepare's progress: tqdm on a terminal (MB/s of text, tokens/s), a summary line either way."""

from __future__ import annotations

import resource
import sys
import time


class Progress:
    """tqdm on a terminal (MB/s of text, tokens/s); a summary line at the end either way, with
    the CPU seconds spent and the share of them inside the encoder call."""

    def __init__(self, total: int | None, enabled: bool, skipped: int):
        self.t0, self.bytes, self.tokens, self.bar = time.perf_counter(), 0, 0, None
        self.cpu0, self.encode_s = _cpu_s(), 0.0
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare",
                            file=sys.stderr, mininterval=1.0)  # fmt: skip
        if enabled and skipped:
            print(f"gradcycle.prepare: resuming after {skipped} documents", file=sys.stderr)

    def update(self, n_bytes: int, n_tokens: int, encode_s: float = 0.0) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        self.encode_s += encode_s
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(tok_s=f"{rate:.3g}", refresh=False)
            self.bar.update(n_bytes)

    def close(self, skipped: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        cpu = max(_cpu_s() - self.cpu0, 1e-9)  # the pool has exited: its processes are counted
        share = f", {self.encode_s / cpu:.0%} of it in the encoder" if self.encode_s else ""
        if self.enabled:
            print(f"gradcycle.prepare: {self.bytes / 1e6:.1f} MB of text, {self.tokens} tokens in "
                  f"{dt:.1f}s ({self.bytes / 1e6 / dt:.2f} MB/s, {self.tokens / dt:.3g} tokens/s; "
                  f"{cpu:.1f} CPU s, {self.bytes / 1e6 / cpu:.2f} MB per CPU s{share})"
                  + (f"; skipped {sum(skipped.values())} examples whose prompt alone fills "
                     "data.seq_len (data.on_overlong=skip)" if skipped else ""),
                  file=sys.stderr)  # fmt: skip


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the tokenising processes): a
    throughput per process that other jobs on a shared machine do not distort."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
