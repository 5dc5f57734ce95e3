"""``bigmodel demo``: the main job on a built-in GPT-style model, against the naive workflow.

Builds the model, saves it sharded into a temporary folder, then in two fresh processes
instantiates it from the checkpoint with bigmodel (``from_pretrained``: empty construction,
weights mapped straight from the files) and with the naive PyTorch workflow (construct with
random init, ``load_state_dict`` shard by shard), runs the same forward pass with both, checks
the outputs are identical, and prints time and memory side by side. The headline compares
like with like: the time until each model has produced its first output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigmodel.cli._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Subparsers,
    add_command,
    emit_json,
    print_table,
    progress_flag,
    size_arg,
)
from bigmodel.foundations.units import format_size

if TYPE_CHECKING:
    import torch

    from bigmodel.models.gpt import DemoConfig

HELP = (
    "save a built-in GPT-style model sharded and load it back with bigmodel and with plain PyTorch"
)
EXAMPLE = """\
examples:
  bigmodel demo                  # ~1 GB model, about half a minute on 2 cores
  bigmodel demo --size 200MB --json
  bigmodel demo --keep ./demo-ckpt   # keep the checkpoint to try 'bigmodel inspect' on it
"""
DESCRIPTION = """\
Save a built-in GPT-style model as a sharded checkpoint, then load it back in two fresh
processes: with bigmodel (from_pretrained: the model is built empty and its weights are
mapped straight from the files) and with the naive PyTorch workflow (build with random
init, then load_state_dict shard by shard). Both run the same forward pass; the outputs
must be identical. Prints time to a first output and memory side by side.
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "demo", help=HELP, example=EXAMPLE, description=DESCRIPTION)
    p.add_argument(
        "--size", type=size_arg, default="1GB", help="float32 size of the model (default 1GB)"
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="save the checkpoint here and keep it (default: a temporary folder); the demo's own files stay out of it",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--child", choices=["bigmodel", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _inputs(cfg: DemoConfig) -> torch.Tensor:
    import torch

    return torch.randint(0, cfg.vocab, (2, 32), generator=torch.Generator().manual_seed(1))


def _child(method: str, folder: Path, work: Path) -> None:
    """One method's run, in a fresh process: the checkpoint is in ``folder``, the demo's own
    files (config, logits) in ``work``."""
    import torch
    from safetensors.torch import load_file

    import bigmodel
    from bigmodel.foundations.memory import MemorySampler
    from bigmodel.models.gpt import DemoConfig, DemoGPT

    cfg = DemoConfig(**json.loads((work / "demo_config.json").read_text()))
    ids = _inputs(cfg)
    # Warm up the forward pass's kernels once per process, so that both methods are measured
    # on loading and on their first output, not on torch's own first-call costs.
    DemoGPT(DemoConfig(vocab=8, hidden=8, layers=1, heads=1, context=4))(
        torch.zeros(1, 2, dtype=torch.long)
    )
    with MemorySampler() as mem:
        start = time.perf_counter()
        if method == "bigmodel":
            model = bigmodel.from_pretrained(lambda: DemoGPT(cfg), folder, progress=False)
        else:
            model = DemoGPT(cfg)
            for shard in sorted(folder.glob("model*.safetensors")):
                model.load_state_dict(load_file(shard), strict=False)
            model.eval()
        loaded = time.perf_counter() - start
        with torch.no_grad():
            logits = model(ids)
        total = time.perf_counter() - start
    torch.save(logits, work / f"logits-{method}.pt")
    print(
        json.dumps(
            {
                "load_s": loaded,
                "total_s": total,
                "anon": mem.increase("anon"),
                "rss": mem.increase("rss"),
            }
        )
    )


def run(args: argparse.Namespace) -> int:
    from bigmodel.models.gpt import DemoConfig

    if args.child:
        _child(args.child, Path(args.folder), Path(args.work))
        return EXIT_OK
    cfg = DemoConfig.for_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bigmodel-demo-") as tmp:
        work = Path(tmp)
        folder = Path(args.keep) if args.keep else work / "checkpoint"
        reference, model_info, checkpoint_info = _build_and_save(cfg, folder, work, args)
        results = _load_in_children(folder, work, reference)
        if results is None:
            return EXIT_PROBLEM
        ok = all(r["match"] for r in results.values())
        summary = {
            "model": model_info,
            "checkpoint": checkpoint_info,
            "results": results,
            "outputs_match": ok,
        }
    if args.json:
        emit_json(summary)
        return EXIT_OK if ok else EXIT_PROBLEM
    _print_report(model_info, checkpoint_info, results)
    if not ok:
        print("bigmodel demo: outputs differ — this is a bug, please report it.", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def _build_and_save(
    cfg: DemoConfig, folder: Path, work: Path, args: argparse.Namespace
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """Build the model, compute its reference output and save it sharded into ``folder`` (its
    config goes into ``work``: ``folder`` holds the checkpoint only).

    Returns the reference output and the "model" and "checkpoint" parts of the summary. The
    model itself is dropped on return, before the child processes load it.
    """
    import torch

    import bigmodel
    from bigmodel.models.gpt import DemoGPT

    torch.manual_seed(0)
    start = time.perf_counter()
    model = DemoGPT(cfg).eval()
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        reference = model(_inputs(cfg))
    start = time.perf_counter()
    saved = bigmodel.save_checkpoint(
        model, folder, max_shard_size=max(args.size // 5, 1), progress=progress_flag(args)
    )
    save_s = time.perf_counter() - start
    (work / "demo_config.json").write_text(json.dumps(asdict(cfg)))
    model_info = {"parameters": params, "bytes": saved.total_size, **asdict(cfg)}
    checkpoint_info = {
        "folder": str(folder) if args.keep else None,
        "shards": len(saved.files),
        "save_s": save_s,
        "build_s": built,
    }
    return reference, model_info, checkpoint_info


def _load_in_children(
    folder: Path, work: Path, reference: torch.Tensor
) -> dict[str, dict[str, Any]] | None:
    """Each method's measurements from a fresh process, with whether its output matches
    ``reference``; None (after printing why) if a child process fails."""
    import torch

    results = {}
    env = dict(os.environ, BIGMODEL_DISABLE_PROGRESS_BARS="1")
    for method in ("bigmodel", "naive"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bigmodel",
                "demo",
                "--child",
                method,
                "--folder",
                str(folder),
                "--work",
                str(work),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            print(
                f"bigmodel demo: the {method} run failed (exit {out.returncode}).",
                file=sys.stderr,
            )
            return None
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        results[method]["match"] = torch.equal(torch.load(work / f"logits-{method}.pt"), reference)
    return results


def _print_report(
    model: dict[str, Any], checkpoint: dict[str, Any], results: dict[str, dict[str, Any]]
) -> None:
    """The summary as text: the model, the checkpoint, a table of both methods, the verdict."""
    print(
        f"DemoGPT: {model['parameters'] / 1e6:.0f}M parameters, {format_size(model['bytes'])} float32 (tied head stored once), "
        f"{model['layers']} block(s) of width {model['hidden']}"
    )
    print(
        f"saved as {checkpoint['shards']} shard(s) in {checkpoint['save_s']:.2f}s"
        + (f" into {checkpoint['folder']}" if checkpoint["folder"] is not None else "")
    )
    print()
    print_table(
        ["method", "load s", "load+forward s", "peak anon mem", "peak RSS", "same output"],
        _result_rows(results),
    )
    b, n = results["bigmodel"], results["naive"]
    print()
    print(
        f"Time to a first output (load + forward): bigmodel {b['total_s']:.2f}s, naive {n['total_s']:.2f}s "
        f"({_ratio(n['total_s'], b['total_s'])}), with {format_size(max(n['anon'] - b['anon'], 0))} less private memory."
    )
    print(
        "Why the load itself is cheap: bigmodel builds the model empty and maps the weights from "
        "the files; their pages are read when the forward pass first touches them, into the page "
        "cache (shared between processes, reclaimable), not copied into private memory."
    )


def _ratio(naive: float, ours: float) -> str:
    """How the naive time compares with bigmodel's, in words."""
    if naive >= ours:
        return f"{naive / max(ours, 1e-9):.1f}x faster"
    return f"{ours / max(naive, 1e-9):.1f}x slower"


def _result_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for method, label in (
        ("bigmodel", "bigmodel.from_pretrained"),
        ("naive", "construct + load_state_dict"),
    ):
        r = results[method]
        rows.append(
            [
                label,
                f"{r['load_s']:.2f}",
                f"{r['total_s']:.2f}",
                format_size(r["anon"]),
                format_size(r["rss"]),
                "yes" if r["match"] else "NO",
            ]
        )
    return rows
