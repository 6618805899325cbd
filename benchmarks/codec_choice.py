"""Which Zarr codec and image dtype for the store? Measured on real preprocessed cases.

For each dataset (Task04_Hippocampus, SCT_spinalcord, TotalSegmentator_CT from ../shared/data) the
cases are fingerprinted, planned (pipeline.planning.planner) and preprocessed in memory (3d_fullres), then
written with every candidate codec chain (each followed by crc32c, as the store does) and image
dtype, in the store's chunking (chunk = patch). Measured:

* compression ratio (raw float32 bytes / compressed bytes), encode and decode MB/s of the codec
  alone, and the zarr write throughput (MB/s of float32 data),
* random-patch reads: patches per CPU-second reading a patch at a random position of a random case, which is
  what the training sampler does (so a patch touches up to 8 chunks). Files sit in the page cache
  after writing, so this measures decode cost, the part a codec decides,
* float16 rounding error against float32, relative to each image's own noise level (robust sigma of
  neighbour differences: 1.4826 * MAD / sqrt(2)).

    .venv/bin/python benchmarks/codec_choice.py [--hippocampus-cases 60] [--reads 300]

Writes benchmarks/results/codec_choice.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from harness import RESULTS, SHARED, machine_info, machine_line, write_results  # noqa: E402

from pipeline.data.dataset import load_dataset, read_case  # noqa: E402
from pipeline.planning.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.planning.planner import plan_experiment  # noqa: E402
from pipeline.preprocessing.preprocess import preprocess_case  # noqa: E402

# name -> (numcodecs codec for the pure codec timing, zarr v3 codecs for the store)
CODECS = {
    "none": (None, lambda: []),
    "zstd-1": (numcodecs.Zstd(level=1), lambda: [ZstdCodec(level=1)]),
    "zstd-3": (numcodecs.Zstd(level=3), lambda: [ZstdCodec(level=3)]),
    "zstd-5": (numcodecs.Zstd(level=5), lambda: [ZstdCodec(level=5)]),
    "zstd-9": (numcodecs.Zstd(level=9), lambda: [ZstdCodec(level=9)]),
    "blosc-lz4-shuffle-5": (numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
                            lambda: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]),
    "blosc-lz4-bitshuffle-5": (numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
                               lambda: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)]),
    "blosc-zstd-shuffle-1": (numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
                             lambda: [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)]),
    "blosc-zstd-shuffle-3": (numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE),
                             lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)]),
    "blosc-zstd-shuffle-5": (numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE),
                             lambda: [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)]),
    "blosc-zstd-bitshuffle-3": (numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
                                lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)]),
}
# end-to-end zarr reads are dominated by per-read overhead; measured for a few representative chains
ZARR_CODECS = ["none", "zstd-1", "zstd-3", "blosc-lz4-shuffle-5", "blosc-zstd-shuffle-3"]


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


def chunks_of(arrays, chunks) -> list[np.ndarray]:
    """Every chunk of every array, as the store cuts them (C-contiguous blocks)."""
    out = []
    for arr in arrays:
        grid = [range(0, n, c) for n, c in zip(arr.shape, chunks)]
        for corner in np.ndindex(*[len(g) for g in grid]):
            lo = [g[i] for g, i in zip(grid, corner)]
            out.append(np.ascontiguousarray(arr[tuple(slice(a, a + c) for a, c in zip(lo, chunks))]))
    return out


def codec_speed(blocks: list[np.ndarray], codec, repeats: int) -> dict:
    """Pure codec cost on one thread, in CPU time (robust on a shared machine): best of `repeats` passes."""
    raw = sum(b.nbytes for b in blocks)
    if codec is None:
        return {"ratio": 1.0, "encode_MBps": float("inf"), "decode_MBps": float("inf")}
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t = time.process_time()
        encoded = [codec.encode(b) for b in blocks]
        enc_t.append(time.process_time() - t)
        t = time.process_time()
        for e in encoded:
            codec.decode(e)
        dec_t.append(time.process_time() - t)
    stored = sum(len(e) for e in encoded)
    return {"ratio": raw / stored, "encode_MBps": raw / min(enc_t) / 1e6, "decode_MBps": raw / min(dec_t) / 1e6}


def write_arrays(root: Path, arrays, dtype: str, chunks, compressors) -> float:
    group = zarr.open_group(root, mode="w")
    start = time.process_time()
    for i, data in enumerate(arrays):
        arr = group.create_array(f"c{i}", shape=data.shape, dtype=dtype, chunks=chunks, fill_value=0,
                                 compressors=[*compressors, Crc32cCodec()], config={"write_empty_chunks": True})
        arr[...] = data.astype(dtype)
    return time.process_time() - start


def random_reads(root: Path, count: int, patch, reads: int, repeats: int) -> float:
    """Best-of-`repeats` patches per CPU-second reading a patch at a random place of a random case (zarr end to end)."""
    group = zarr.open_group(root, mode="r")
    arrays = [group[f"c{i}"] for i in range(count)]
    best = 0.0
    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        start = time.process_time()
        for _ in range(reads):
            arr = arrays[rng.integers(len(arrays))]
            spatial = arr.shape[-len(patch):]
            lo = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(spatial, patch)]
            region = tuple(slice(a, a + p) for a, p in zip(lo, patch))
            arr[(slice(None),) * (arr.ndim - len(patch)) + region]
        best = max(best, reads / (time.process_time() - start))
    return best


def measure(name: str, cases, patch, reads: int, repeats: int, tmp: Path) -> list[dict]:
    rows = []
    for key, dtypes, names in (("image", ("float32", "float16"), list(CODECS)),
                               ("label", ("uint8",), ["none", "zstd-1", "zstd-3", "zstd-9", "blosc-lz4-shuffle-5",
                                                      "blosc-zstd-shuffle-3", "blosc-zstd-bitshuffle-3"])):
        arrays = [c.image if key == "image" else c.label for c in cases]
        chunks = (1, *patch) if key == "image" else tuple(patch)
        raw32 = sum(a.size * (4 if key == "image" else 1) for a in arrays)
        for dtype in dtypes:
            blocks = chunks_of([a.astype(dtype) for a in arrays], chunks)
            for codec in names:
                pure, make = CODECS[codec]
                row = {"dataset": name, "array": key, "dtype": dtype, "codec": codec, **codec_speed(blocks, pure, repeats)}
                row["ratio_vs_float32"] = row["ratio"] * (2 if dtype == "float16" else 1)
                if codec in ZARR_CODECS:
                    root = tmp / f"{name}-{key}-{dtype}-{codec}.zarr"
                    seconds = write_arrays(root, arrays, dtype, chunks, make())
                    row["zarr_write_MBps"] = raw32 / seconds / 1e6
                    row["zarr_patches_per_s"] = random_reads(root, len(arrays), patch, reads, repeats)
                    row["stored_MB"] = du(root) / 1e6
                    shutil.rmtree(root)
                rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = ["# Store codec and image dtype (benchmarks/codec_choice.py)", "",
             f"Machine: {machine_line(results['machine'])}.", "",
             f"{os.cpu_count()} CPU(s), shared with other work, so throughputs are per CPU-second of this "
             "process (time.process_time, blosc on one thread), best of the repeats; page cache warm, so reads "
             "measure decode cost. Every chain ends with crc32c. Ratios are deterministic.", ""]
    for name, info in results["datasets"].items():
        lines += [f"## {name}: {info['cases']} case(s), patch {info['patch']}, "
                  f"{info['raw_image_MB']:.1f} MB float32 images", "",
                  "| array | dtype | codec | ratio vs float32 raw | encode MB/s | decode MB/s | zarr random patches/s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in results["rows"]:
            if r["dataset"] == name:
                zr = f"{r['zarr_patches_per_s']:.0f}" if "zarr_patches_per_s" in r else ""
                lines.append(f"| {r['array']} | {r['dtype']} | {r['codec']} | {r['ratio_vs_float32']:.2f} | "
                             f"{r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} | {zr} |")
        e = info["float16"]
        lines += ["", f"float16 rounding: RMS error {e['rms_error']:.2e}, max {e['max_error']:.2e} "
                      f"(values in [{e['value_range'][0]:.1f}, {e['value_range'][1]:.1f}]); image noise sigma "
                      f"(median) {e['noise_sigma_median']:.3f}; RMS error / noise {e['rms_error_over_noise']:.1e}, "
                      f"max error / noise {e['max_error_over_noise']:.1e}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    numcodecs.blosc.set_nthreads(1)  # a Dask worker / sampler has one thread
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus-cases", type=int, default=40)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="best of N (the machine may be shared)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    results: dict = {"datasets": {}, "rows": [], "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="codec_choice_") as tmp:
        for name, limit in (("Task04_Hippocampus", args.hippocampus_cases), ("SCT_spinalcord", None),
                            ("TotalSegmentator_CT", None)):
            if not (SHARED / name / "dataset.json").is_file():
                print(f"skipping {name}: not found under {SHARED}")
                continue
            cases, patch = preprocessed(name, limit)
            results["datasets"][name] = {"cases": len(cases), "patch": patch, "float16": float16_error(cases),
                                         "raw_image_MB": sum(c.image.size * 4 for c in cases) / 1e6}
            rows = measure(name, cases, patch, args.reads, args.repeats, Path(tmp))
            results["rows"] += rows
            for r in rows:
                print(f"{name:20s} {r['array']:5s} {r['dtype']:7s} {r['codec']:24s} ratio {r['ratio_vs_float32']:6.2f} "
                      f"enc {r['encode_MBps']:7.0f} dec {r['decode_MBps']:7.0f} MB/s  "
                      f"zarr {r.get('zarr_patches_per_s', float('nan')):6.0f} patches/s")
            print(name, "float16:", results["datasets"][name]["float16"])
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    paths = write_results("codec_choice", results, markdown(results), lambda nf: plot(results, nf), args.out)
    print(f"-> {paths['md']}")
    return 0


def plot(results: dict, new_figure):
    """Compression ratio against decode speed of the image codecs, one panel per dataset."""
    names = list(results["datasets"])
    if not names:
        return None
    fig, axes = new_figure(5 * len(names), 4, 1, len(names))
    for ax, name in zip(axes[0], names):
        for dtype, marker in (("float32", "o"), ("float16", "s")):
            rows = [r for r in results["rows"] if r["dataset"] == name and r["array"] == "image"
                    and r["dtype"] == dtype and r["codec"] != "none"]
            ax.scatter([r["decode_MBps"] for r in rows], [r["ratio_vs_float32"] for r in rows], marker=marker, label=dtype)
            for r in rows:
                ax.annotate(r["codec"], (r["decode_MBps"], r["ratio_vs_float32"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("decode MB/s (one thread)")
        ax.set_ylabel("ratio vs float32 raw")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    sys.exit(main())
