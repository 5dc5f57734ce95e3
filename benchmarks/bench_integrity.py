"""Integrity benchmark: the cost of verify=True, and how hostile files are rejected.

    python benchmarks/bench_integrity.py                # ~3 GB checkpoint (shared with bench_load)
    python benchmarks/bench_integrity.py --size small

1. A bigmodel-saved copy of the bench_load reference checkpoint (digests included) is loaded
   to ready (every parameter summed) with and without ``verify=True``, fp32 and bf16, warm
   page cache, each run in a fresh process; medians of ``--repeats``.
2. A generated corpus of hostile files (headers, indexes, pickles) is opened one by one in a
   fresh process: each must be refused with a typed ``BigModelError``; the slowest rejection
   and the largest RssAnon increase are reported.

Writes docs/benchmarks/integrity.md.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import (
    SIZES,
    child_env,
    common_parser,
    ensure_checkpoint,
    publish_table,
    warm_page_cache,
)


def ensure_bigmodel_copy(cache: Path, size: str) -> Path:
    import bigmodel

    target = cache / f"llama-{size}-bigmodel"
    if (target / "model.safetensors.index.json").exists():
        return target
    source = ensure_checkpoint(cache, size)
    print(f"writing a bigmodel copy of {source} (once)...", file=sys.stderr)
    with bigmodel.open_checkpoint(source) as ckpt:
        state = {k: ckpt.get_tensor(k) for k in ckpt.keys()}
        bigmodel.save_checkpoint(state, target, max_shard_size=SIZES[size]["shard"], progress=False)
    for extra in ("config.json", "generation_config.json"):
        if (source / extra).exists():
            (target / extra).write_bytes((source / extra).read_bytes())
    return target


def child_load(folder: Path, dtype_name: str, verify: bool) -> None:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    import bigmodel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    config = AutoConfig.from_pretrained(folder)
    with bigmodel.init_empty_weights():
        LlamaForCausalLM(config)  # warm up lazy imports
    start = time.perf_counter()
    model = bigmodel.from_pretrained(
        lambda: LlamaForCausalLM(config), folder, dtype=dtype, verify=verify, progress=False
    )
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    print(json.dumps({"ready_s": time.perf_counter() - start}))


# -- the hostile corpus -------------------------------------------------------------------------
def _st(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _f32(shape: list[int], begin: int) -> dict[str, object]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/bigmodel-bench-pwned",))


def build_corpus(root: Path) -> list[Path]:
    """At least 40 hostile checkpoints, one per folder or file."""
    import torch

    cases: dict[str, bytes] = {
        "too-short": b"\x01\x02",
        "length-past-eof": _st(b"{}", length=10_000),
        "huge-length": _st(b"{}", length=2**63),
        "not-utf8": _st(b'{"a":\xff}'),
        "not-json": _st(b"{not json"),
        "array": _st([1, 2, 3]),
        "string": _st("x"),
        "deep-nesting": _st(b"[" * 100_000 + b"]" * 100_000),
        "entry-not-object": _st({"a": 3}),
        "no-dtype": _st({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "no-shape": _st({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
        "no-offsets": _st({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        "bool-shape": _st(
            {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "negative-shape": _st(
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "float-offsets": _st(
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4
        ),
        "unknown-dtype": _st(
            {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16
        ),
        "sub-byte-dtype": _st({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
        "duplicate-name": _st(
            b'{"a":'
            + json.dumps(_f32([1], 0)).encode()
            + b',"a":'
            + json.dumps(_f32([1], 0)).encode()
            + b"}",
            b"\0" * 4,
        ),
        "gap": _st({"a": _f32([1], 0), "b": _f32([1], 8)}, b"\0" * 12),
        "overlap": _st({"a": _f32([2], 0), "b": _f32([2], 4)}, b"\0" * 12),
        "end-before-begin": _st(
            {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8
        ),
        "size-mismatch": _st(
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "overflowing-shape": _st(
            {"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "trailing-bytes": _st({"a": _f32([1], 0)}, b"\0" * 8),
        "truncated-data": _st({"a": _f32([1000], 0)}, b"\0" * 40),
        "bad-metadata": _st({"__metadata__": {"format": 1}, "a": _f32([1], 0)}, b"\0" * 4),
        "many-entries": _st(
            {f"t{i}": _f32([1], 4 * i) for i in range(200_000)}, b"\0" * (4 * 200_000)
        ),
        "junk-header-90MB": _st(b"{" + b" " * 90_000_000 + b"x"),
    }
    paths = []
    for name, data in cases.items():
        path = root / f"{name}.safetensors"
        path.write_bytes(data)
        paths.append(path)

    good = _st({"__metadata__": {"format": "pt"}, "a": _f32([1], 0)}, b"\0" * 4)
    indexes: dict[str, object] = {
        "index-not-json": b"{",
        "index-no-weight-map": {"metadata": {}},
        "index-bad-value": {"weight_map": {"a": 3}},
        "index-dotdot": {"weight_map": {"a": "../outside.safetensors"}},
        "index-absolute": {"weight_map": {"a": "/etc/passwd"}},
        "index-backslash": {"weight_map": {"a": "..\\\\x.safetensors"}},
        "index-names-bin": {"weight_map": {"a": "pytorch_model.bin"}},
        "index-missing-shard": {"weight_map": {"a": "model-00009-of-00009.safetensors"}},
        "index-key-in-two-shards": {"weight_map": {"a": "s1.safetensors"}},
        "index-key-not-in-shard": {"weight_map": {"a": "s1.safetensors", "zzz": "s1.safetensors"}},
        "index-bad-metadata": {"metadata": [], "weight_map": {"a": "s1.safetensors"}},
    }
    for name, index in indexes.items():
        folder = root / name
        folder.mkdir()
        (folder / "s1.safetensors").write_bytes(good)
        (folder / "s2.safetensors").write_bytes(good)
        (folder / "pytorch_model.bin").write_bytes(b"")
        raw = index if isinstance(index, bytes) else json.dumps(index).encode()
        (folder / "model.safetensors.index.json").write_bytes(raw)
        paths.append(folder / "model.safetensors.index.json")
    (root / "index-key-in-two-shards" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )

    bins = {
        "pickle-payload.bin": lambda p: torch.save({"a": _Payload()}, p),
        "pickle-whole-payload.bin": lambda p: torch.save(_Payload(), p),
        "legacy-format.bin": lambda p: torch.save(
            {"a": torch.zeros(2)}, p, _use_new_zipfile_serialization=False
        ),
        "bare-pickle.bin": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
        "truncated.bin": lambda p: (
            torch.save({"a": torch.zeros(1000)}, p),
            p.write_bytes(p.read_bytes()[:300]),
        ),
        "not-a-dict.bin": lambda p: torch.save([torch.zeros(1)], p),
        "empty.bin": lambda p: p.write_bytes(b""),
    }
    for name, make in bins.items():
        make(root / name)
        paths.append(root / name)
    return paths


def child_hostile(paths: list[str]) -> None:
    import bigmodel
    from bigmodel.foundations.memory import MemorySampler

    out = []
    for path in paths:
        with MemorySampler() as sampler:
            start = time.perf_counter()
            try:
                bigmodel.open_checkpoint(path)
                outcome = "accepted"
            except bigmodel.BigModelError as exc:
                outcome = getattr(exc, "code", type(exc).__name__)
            except Exception as exc:
                outcome = f"UNTYPED {type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
        out.append(
            {
                "case": Path(path).parent.name if path.endswith(".json") else Path(path).name,
                "outcome": outcome,
                "seconds": seconds,
                "anon": sampler.increase("anon"),
            }
        )
    print(json.dumps(out))


def _run(args: list[str]) -> str:
    env = child_env()
    return (
        subprocess.run(
            [sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env
        )
        .stdout.strip()
        .splitlines()[-1]
    )


def main() -> None:
    parser = common_parser(__doc__, "integrity.md")
    parser.add_argument("--child-load", nargs=3, metavar=("FOLDER", "DTYPE", "VERIFY"))
    parser.add_argument("--child-hostile", nargs="+")
    args = parser.parse_args()
    if args.child_load:
        child_load(Path(args.child_load[0]), args.child_load[1], args.child_load[2] == "1")
        return
    if args.child_hostile:
        child_hostile(args.child_hostile)
        return

    folder = ensure_bigmodel_copy(args.cache, args.size)
    warm_page_cache(folder)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for dtype in ("fp32", "bf16"):
            for verify in (False, True):
                r = json.loads(_run(["--child-load", str(folder), dtype, "1" if verify else "0"]))
                times.setdefault((dtype, verify), []).append(r["ready_s"])

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_corpus(Path(tmp))
        marker = Path("/tmp/bigmodel-bench-pwned")
        marker.unlink(missing_ok=True)
        results = json.loads(_run(["--child-hostile", *map(str, paths)]))
    escaped = [
        r for r in results if r["outcome"] == "accepted" or r["outcome"].startswith("UNTYPED")
    ]

    def med(dtype: str, verify: bool) -> float:
        return statistics.median(times[(dtype, verify)])

    ckpt_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    lines = [
        f"# Integrity — {args.size} checkpoint ({ckpt_gb:.2f} GB, saved by bigmodel with xxh3-128 digests)",
        "",
        f"Warm page cache, medians of {args.repeats} runs in fresh processes; ready = every parameter summed. "
        f"Command: `python benchmarks/bench_integrity.py --size {args.size}`.",
        "",
        "| dtype | plain load s | verify=True s | ratio (target ≤ 1.3x) |",
        "|---|---|---|---|",
    ]
    for dtype in ("fp32", "bf16"):
        lines.append(
            f"| {dtype} | {med(dtype, False):.2f} | {med(dtype, True):.2f} | {med(dtype, True) / med(dtype, False):.2f}x |"
        )
    slowest = max(results, key=lambda r: r["seconds"])
    hungriest = max(results, key=lambda r: r["anon"])
    lines += [
        "",
        f"Hostile corpus: {len(results)} generated files, {len(results) - len(escaped)} refused with a typed error, "
        f"{len(escaped)} escaped{': ' + ', '.join(r['case'] + ' -> ' + r['outcome'] for r in escaped) if escaped else ''}; "
        f"code-execution payload ran: {'YES' if marker.exists() else 'no'}.",
        f"Slowest rejection: {slowest['case']} in {slowest['seconds'] * 1e3:.0f} ms (target < 2 s). "
        f"Largest RssAnon increase: {hungriest['case']}, {hungriest['anon'] / 1e6:.0f} MB (target < 64 MB).",
        "",
        "| case | outcome | ms | RssAnon MB |",
        "|---|---|---|---|",
        *[
            f"| {r['case']} | {r['outcome']} | {r['seconds'] * 1e3:.1f} | {r['anon'] / 1e6:.1f} |"
            for r in results
        ],
    ]
    publish_table(lines, args.out)


if __name__ == "__main__":
    main()
