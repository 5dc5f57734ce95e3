"""Run in a fresh subprocess by test_memory.py: measures anonymous memory around one operation.

Usage: python _memory_probe.py {save,save-strided,load-built,load-meta,load-meta-bf16,assign-built} FOLDER
Prints one JSON line: {"extra_peak": bytes, "extra_after": bytes, "tensor": bytes, "total": bytes}.
"""

import json
import sys
import threading
import time

import torch
from torch import nn

import bigmodel

ROWS, COLS, COUNT = 2048, 4096, 8  # 32 MiB fp32 tensors, 256 MiB in all


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class Sampler:
    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.0005)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ParameterList(nn.Parameter(torch.empty(ROWS, COLS)) for _ in range(COUNT))


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    if mode.startswith("save"):
        state = {f"layers.{i}": torch.randn(ROWS, COLS) for i in range(COUNT)}
        if mode == "save-strided":
            state = {k: v.t() for k, v in state.items()}
        before = rss_anon()
        with Sampler() as s:
            bigmodel.save_checkpoint(state, folder, max_shard_size="10GB", progress=False)
    else:
        if mode in ("load-built", "assign-built"):
            model = Stack()
            for param in model.parameters():
                param.data.normal_()  # a built model's pages are resident (torch.empty alone is lazy)
            del param
        else:
            with bigmodel.init_empty_weights():
                model = Stack()
        before = rss_anon()
        with Sampler() as s:
            if mode == "load-built":
                bigmodel.load_sharded_checkpoint(model, folder, progress=False)
            elif mode == "load-meta-bf16":
                bigmodel.load_checkpoint(model, folder, dtype=torch.bfloat16, progress=False)
            else:
                bigmodel.load_checkpoint(model, folder, progress=False)
    tensor = ROWS * COLS * 4
    print(
        json.dumps(
            {
                "extra_peak": s.peak - before,
                "extra_after": rss_anon() - before,
                "tensor": tensor,
                "total": tensor * COUNT,
            }
        )
    )


if __name__ == "__main__":
    main()
