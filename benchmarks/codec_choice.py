"""Which Zarr codec and image dtype for the store? Measured on real preprocessed cases.

For each dataset (Task04_Hippocampus, SCT_spinalcord, TotalSegmentator_CT from ../shared/data) the
cases are fingerprinted, planned (pipeline.planning) and preprocessed in memory (3d_fullres), then
written with every candidate codec chain (each followed by crc32c, as the store does) and image
dtype, in the store's chunking (chunk = patch). Measured:

* compression ratio (raw float32 bytes / bytes on disk) and write throughput (MB/s of float32 data),
* random-patch reads: patches/s reading a patch at a random position of a random case, which is
  what the training sampler does (so a patch touches up to 8 chunks). Files sit in the page cache
  after writing, so this measures decode cost, the part a codec decides,
* float16 rounding error against float32, relative to each image's own noise level (robust sigma of
  neighbour differences: 1.4826 * MAD / sqrt(2)).

    .venv/bin/python benchmarks/codec_choice.py [--hippocampus-cases 60] [--reads 300]

Writes benchmarks/results/codec_choice.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.dataset import load_dataset, read_case  # noqa: E402
from pipeline.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.planning import plan_experiment  # noqa: E402
from pipeline.preprocessing import preprocess_case  # noqa: E402

SHARED = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"

CODECS = {
    "none": lambda: [],
    "zstd-1": lambda: [ZstdCodec(level=1)],
    "zstd-3": lambda: [ZstdCodec(level=3)],
    "zstd-5": lambda: [ZstdCodec(level=5)],
    "zstd-9": lambda: [ZstdCodec(level=9)],
    "blosc-lz4-shuffle-5": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)],
    "blosc-lz4-bitshuffle-5": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)],
    "blosc-zstd-shuffle-1": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)],
    "blosc-zstd-shuffle-3": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)],
    "blosc-zstd-shuffle-5": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)],
    "blosc-zstd-bitshuffle-3": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)],
}
LABEL_CODECS = ["none", "zstd-1", "zstd-3", "zstd-9", "blosc-lz4-shuffle-5", "blosc-zstd-shuffle-3",
                "blosc-zstd-bitshuffle-3"]


def preprocessed(name: str, max_cases: int | None):
    dataset = load_dataset(SHARED / name)
    if max_cases:
        dataset = replace(dataset, cases=dataset.cases[:max_cases])
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    conf = plans.configuration("3d_fullres")
    cases = [preprocess_case(read_case(dataset, c), plans, "3d_fullres", dataset.label_map) for c in dataset.cases]
    return cases, list(conf.patch_size)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def noise_sigma(image: np.ndarray) -> float:
    """Robust noise level of a normalised image: MAD of neighbour differences over the nonzero region."""
    d = np.diff(image, axis=-1)
    d = d[(image[..., 1:] != 0) & (image[..., :-1] != 0)]
    if d.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def float16_error(cases) -> dict:
    rms, worst, ratio_rms, ratio_max = [], [], [], []
    for case in cases:
        x = case.image
        err = np.abs(x.astype(np.float16).astype(np.float32) - x)
        sigma = noise_sigma(x)
        rms.append(float(np.sqrt(np.mean(err ** 2))))
        worst.append(float(err.max()))
        ratio_rms.append(rms[-1] / sigma)
        ratio_max.append(worst[-1] / sigma)
    return {"rms_error": float(np.mean(rms)), "max_error": float(np.max(worst)),
            "noise_sigma_median": float(np.median([noise_sigma(c.image) for c in cases])),
            "rms_error_over_noise": float(np.mean(ratio_rms)), "max_error_over_noise": float(np.max(ratio_max)),
            "value_range": [float(min(c.image.min() for c in cases)), float(max(c.image.max() for c in cases))]}


def write_arrays(root: Path, cases, key: str, dtype: str, chunks, compressors) -> float:
    group = zarr.open_group(root, mode="w")
    start = time.perf_counter()
    for i, case in enumerate(cases):
        data = case.image if key == "image" else case.label
        arr = group.create_array(f"c{i}", shape=data.shape, dtype=dtype, chunks=chunks, fill_value=0,
                                 compressors=[*compressors, Crc32cCodec()], config={"write_empty_chunks": True})
        arr[...] = data.astype(dtype)
    return time.perf_counter() - start


def random_reads(root: Path, cases, key: str, patch, reads: int, seed: int = 0) -> float:
    group = zarr.open_group(root, mode="r")
    arrays = [group[f"c{i}"] for i in range(len(cases))]
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(reads):
        arr = arrays[rng.integers(len(arrays))]
        spatial = arr.shape[-len(patch):]
        lo = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(spatial, patch)]
        region = tuple(slice(a, a + p) for a, p in zip(lo, patch))
        arr[(slice(None),) * (arr.ndim - len(patch)) + region]
    return reads / (time.perf_counter() - start)


def measure(name: str, cases, patch, reads: int, tmp: Path) -> list[dict]:
    rows = []
    raw_image = sum(c.image.size * 4 for c in cases)
    raw_label = sum(c.label.size for c in cases)
    for dtype in ("float32", "float16"):
        for codec, make in CODECS.items():
            root = tmp / f"{name}-image-{dtype}-{codec}.zarr"
            seconds = write_arrays(root, cases, "image", dtype, (1, *patch), make())
            rate = random_reads(root, cases, "image", patch, reads)
            rows.append({"dataset": name, "array": "image", "dtype": dtype, "codec": codec,
                         "ratio_vs_float32": raw_image / du(root), "write_MBps": raw_image / seconds / 1e6,
                         "patches_per_s": rate, "stored_MB": du(root) / 1e6})
            shutil.rmtree(root)
    for codec in LABEL_CODECS:
        root = tmp / f"{name}-label-{codec}.zarr"
        seconds = write_arrays(root, cases, "label", "uint8", tuple(patch), CODECS[codec]())
        rate = random_reads(root, cases, "label", patch, reads)
        rows.append({"dataset": name, "array": "label", "dtype": "uint8", "codec": codec,
                     "ratio_vs_float32": raw_label / du(root), "write_MBps": raw_label / seconds / 1e6,
                     "patches_per_s": rate, "stored_MB": du(root) / 1e6})
        shutil.rmtree(root)
    return rows


def markdown(results: dict) -> str:
    lines = ["# Store codec and image dtype (benchmarks/codec_choice.py)", "",
             f"Machine: {os.cpu_count()} CPU(s); page cache warm (decode cost). Every chain ends with crc32c.", ""]
    for name, info in results["datasets"].items():
        lines += [f"## {name}: {info['cases']} case(s), patch {info['patch']}, "
                  f"{info['raw_image_MB']:.1f} MB float32 images", "",
                  "| array | dtype | codec | ratio (vs raw) | write MB/s | random patches/s |",
                  "|---|---|---|---:|---:|---:|"]
        for r in results["rows"]:
            if r["dataset"] == name:
                lines.append(f"| {r['array']} | {r['dtype']} | {r['codec']} | {r['ratio_vs_float32']:.2f} | "
                             f"{r['write_MBps']:.0f} | {r['patches_per_s']:.0f} |")
        e = info["float16"]
        lines += ["", f"float16 rounding: RMS error {e['rms_error']:.2e}, max {e['max_error']:.2e} "
                      f"(values in [{e['value_range'][0]:.1f}, {e['value_range'][1]:.1f}]); image noise sigma "
                      f"(median) {e['noise_sigma_median']:.3f}; RMS error / noise {e['rms_error_over_noise']:.1e}, "
                      f"max error / noise {e['max_error_over_noise']:.1e}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus-cases", type=int, default=60)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    results: dict = {"datasets": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="codec_choice_") as tmp:
        for name, limit in (("Task04_Hippocampus", args.hippocampus_cases), ("SCT_spinalcord", None),
                            ("TotalSegmentator_CT", None)):
            if not (SHARED / name / "dataset.json").is_file():
                print(f"skipping {name}: not found under {SHARED}")
                continue
            cases, patch = preprocessed(name, limit)
            results["datasets"][name] = {"cases": len(cases), "patch": patch, "float16": float16_error(cases),
                                         "raw_image_MB": sum(c.image.size * 4 for c in cases) / 1e6}
            rows = measure(name, cases, patch, args.reads, Path(tmp))
            results["rows"] += rows
            for r in rows:
                print(f"{name:20s} {r['array']:5s} {r['dtype']:7s} {r['codec']:24s} ratio {r['ratio_vs_float32']:6.2f} "
                      f"write {r['write_MBps']:7.0f} MB/s  {r['patches_per_s']:7.0f} patches/s")
            print(name, "float16:", results["datasets"][name]["float16"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_choice.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "codec_choice.md").write_text(markdown(results))
    print(f"-> {out / 'codec_choice.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
