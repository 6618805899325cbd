"""The preprocessed-data store: Zarr v3, one chunk per training patch.

Layout (ARCHITECTURE.md): ``<data_identifier>/cases/<case_id>/{image,label,locations}``; the
configuration group records the plans hash, the case group ``complete: true`` once every array is
written. Chunks equal the patch size - images (1, *patch), labels patch; 2d configurations
(1, 1, *patch) and (1, *patch) - so a randomly placed patch touches at most 2^3 chunks and a
sampler reading one patch decompresses about 8 patches' worth of data, never the whole case.

Codecs (chosen by measurement, benchmarks/codec_choice.py -> benchmarks/results/codec_choice.md):
images float16 + zstd level 3, labels uint8 + zstd level 3, each followed by crc32c.

* float16, not float32: half the bytes to store, cache and decode. Its rounding error on the
  normalised images is RMS 1.5e-4..3.6e-4 (max 1e-3..3.9e-3) against an image noise level (robust
  sigma of neighbour differences) of 0.06..0.25: RMS error below 0.7% of the noise, max below 2%.
  nnU-Net's augmentation itself adds Gaussian noise of variance up to 0.1 and scales brightness by
  0.75..1.25, so the rounding is unlikely to move Dice; that was argued, not measured (it would
  take paired trainings). Values are clipped to +-65504 before the cast.
* zstd-3 compressed float16 images to 4.69 / 4.40 / 3.46 x of float32 raw on hippocampus / SCT /
  TotalSegmentator CT, within 2-9% of the best chain tried (zstd-9, blosc-zstd-5 + shuffle: 3-4x
  slower to encode), encoding at 100-130 MB/s and decoding at 0.6-1.0 GB/s per core. Shuffling
  did not help float16 (blosc-zstd-3 + byte shuffle: 3.47 / 4.38 / 3.53). blosc-lz4 decodes 3-4x
  faster (2.7-4 GB/s) but stores 20-45% more (2.58 / 3.61 / 2.92). A random patch decodes up to 8
  chunks - 32 MB for a 128^3 float16 patch, ~40 ms of one core with zstd-3, ~10 ms with lz4 - a
  cost loader workers absorb, while a 20-45% smaller store stays in the page cache for larger
  datasets and moves faster over a network filesystem: ratio wins. Labels: zstd-3, 90 / 372 / 20 x,
  decoding at 1.3-5.5 GB/s.

Integrity: every chunk ends with a CRC32C (zarr's ``crc32c`` codec), so a flipped bit raises on
read instead of silently feeding garbage to training; `verify_store` reads every chunk of every
complete case. Chunks are written even when empty (``write_empty_chunks``), so a missing chunk file
is damage, never "empty": zarr would fill it with the fill value without a word, so every array a
`ConfigStore` hands out reads through `_ChunksMustExist`, a store wrapper that turns the absent
answer to a chunk read into `StoreDamageError` naming the case and the array. It costs nothing per
read (the absence is seen in the same GET that would have returned the chunk). `check_cases` is the
cheap structural check (one listing and the array metadata per case, no chunk read) that
preprocessing runs on resume and samplers run before their first batch; `repair_store` deletes the
cases `verify_store` finds damaged so the next preprocessing redoes them.

Paths may be local folders or any fsspec URL zarr accepts (``memory://``, ``s3://``...);
``file://`` URLs are treated as local paths. The run lock (`StoreLock`) needs a local path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath, WrapperStore

from pipeline.errors import BadInputError, Problem, SegPipeError
from pipeline.planning.plans import Plans
from pipeline.storage import STORAGE_OPTIONS, as_path, url_of

log = logging.getLogger("segpipe.store")

STORE_VERSION = 1
IMAGE_DTYPE = "float16"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def image_compressors() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


def label_compressors() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


def locations_compressors() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


ARRAY_CONFIG = {"write_empty_chunks": True}
# Chunk files named `c.0.1.0.0` in the array's folder rather than `c/0/1/0/0`: a case's arrays then
# take 4 folders instead of about 14. On a local disk each folder is an inode to allocate, and ext4's
# allocator was a quarter of all CPU samples of `segpipe preprocess` on the 208 hippocampus cases
# (perf: ext4_mkdir/ext4_create in recently_deleted); "." cut the run's system time from 4.0-4.4 s to
# 2.0-3.1 s. On object storage there are no folders, so nothing changes there. Stores written with
# "/" are read as they are: each array's zarr.json names its encoding.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
ARRAYS = ("image", "label", "locations")


class StoreDamageError(SegPipeError):
    """A complete case of the store is damaged: a chunk or an array missing, unreadable or inconsistent
    with the case's record. The user's to fix (exit 2): `segpipe verify --repair` deletes the damaged
    cases, the next `segpipe preprocess` redoes them."""

    exit_code = 2


def damage_message(url: str, case_id: str, array: str | None, detail: str) -> str:
    """One line naming the case, the array and what is wrong, with the fix."""
    what = f"its {array} array" if array else "its stored data"
    return (f"case {case_id}: {what} in {url}/cases/{case_id} is damaged ({detail}); "
            f"`segpipe verify --repair {_store_root(url)}` deletes the damaged case(s), then "
            "`segpipe preprocess` redoes them")


def _store_root(url: str) -> str:
    """The store of `<store>/<data_identifier>`."""
    return url.rsplit("/", 1)[0] if "/" in url else url


def _chunk_key(key: str) -> tuple[str, str, str] | None:
    """(case id, array, chunk) of a chunk key `<config>/cases/<case>/<array>/c.<i>.<j>...`, or
    `.../<array>/c/<i>/<j>...` in a store written before CHUNK_KEY_ENCODING; None for any other key
    (metadata)."""
    parts = key.split("/")
    last = parts[-1].split(".")
    if len(parts) >= 2 and len(last) > 1 and last[0] == "c" and all(p.isdigit() for p in last[1:]):
        i = len(parts) - 1
        case = parts[i - 2] if i >= 3 and parts[i - 3] == "cases" else "?"
        return case, parts[i - 1], parts[-1]
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "c" and all(p.isdigit() for p in parts[i + 1:]):
            case = parts[i - 2] if i >= 3 and parts[i - 3] == "cases" else "?"
            return case, parts[i - 1], "/".join(parts[i:])
        if not parts[i].isdigit():
            break
    return None


class _ChunksMustExist(WrapperStore):
    """Reads as the wrapped store, except that a chunk key the store does not hold raises
    `StoreDamageError` (zarr would fill the chunk with the fill value: a stored case writes every
    chunk, so an absent one is damage). Metadata keys keep zarr's "absent" answer."""

    def __init__(self, store, url: str = ""):
        super().__init__(store)
        self._url = url

    def _with_store(self, store):
        return type(self)(store, self._url)

    def _missing(self, key: str) -> StoreDamageError:
        case, array, chunk = _chunk_key(key)
        config = key.split("/cases/")[0] if "/cases/" in key else ""
        url = f"{self._url}/{config}" if config else self._url
        return StoreDamageError(damage_message(url, case, array, f"chunk {chunk} is missing"))

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and _chunk_key(key) is not None:
            raise self._missing(key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and _chunk_key(key) is not None:
                raise self._missing(key)
        return values


def _local_path(path_or_url: str | os.PathLike) -> Path | None:
    text = os.fspath(path_or_url)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        return None
    return Path(text)


def config_attrs(plans: Plans, config_name: str, image_dtype: str = IMAGE_DTYPE) -> dict[str, Any]:
    """The configuration group's attributes (besides plans_hash), from the plans."""
    conf = plans.configuration(config_name)
    return {
        "configuration": config_name,
        "patch_size": [int(p) for p in conf.patch_size],
        "spacing": [float(s) for s in conf.spacing],
        "transpose_forward": list(plans.transpose_forward),
        "label_values": list(plans.label_values),
        "num_classes": len(plans.label_values),
        "num_channels": len(plans.channels),
        "image_dtype": image_dtype,
    }


class Store:
    """The store root; `config()` opens one preprocessed configuration."""

    def __init__(self, path_or_url: str | os.PathLike, group: zarr.Group):
        self.url = os.fspath(path_or_url)
        self.local_path = _local_path(path_or_url)
        self.group = group

    def config_names(self) -> list[str]:
        return sorted(_child_names(self.group, ""))

    def config(self, data_identifier: str, plans_hash: str | None = None, create: bool = False,
               **attrs: Any) -> ConfigStore:
        """The configuration group; a different plans hash is refused, a missing group created only on request."""
        if data_identifier in _child_names(self.group, ""):
            group = self.group[data_identifier]
            stored = group.attrs.get("plans_hash")
            if plans_hash is not None and stored != plans_hash:
                raise SegPipeError(
                    f"{self.url}/{data_identifier} was preprocessed with other plans (hash {stored}, current "
                    f"{plans_hash}): use a fresh workdir, or delete {self.url} (or its {data_identifier}/ "
                    f"folder) and preprocess again")
            return ConfigStore(self, data_identifier, group)
        if not create:
            raise SegPipeError(f"{self.url} has no preprocessed data for {data_identifier!r}: run `segpipe preprocess`")
        if self.group.read_only:
            raise SegPipeError(f"{self.url} is open read-only")
        if plans_hash is None:
            raise ValueError("creating a configuration group needs the plans hash")
        group = self.group.create_group(data_identifier, attributes={"plans_hash": plans_hash, **attrs})
        group.create_group("cases")
        return ConfigStore(self, data_identifier, group)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's run lock `<store>.lock`: a file created exclusively, or on object storage
        an object created with a conditional PUT (S3's If-None-Match), so two preprocessing runs never
        write (or delete the other's half-written cases) at once."""
        if self.local_path is not None:
            with StoreLock(self.local_path.with_name(self.local_path.name + ".lock")):
                yield
            return
        if self.url.startswith("memory://"):  # one process: nothing else can hold it
            yield
            return
        with ObjectStoreLock(as_path(self.url.rstrip("/") + ".lock")):
            yield


def open_store(path_or_url: str | os.PathLike, mode: str = "a", dataset_name: str | None = None) -> Store:
    """Open (mode 'r') or open-or-create (mode 'a') a store at a local path or fsspec URL."""
    if mode not in ("r", "a"):
        raise ValueError("mode must be 'r' or 'a'")
    if not isinstance(path_or_url, str):
        path_or_url = url_of(path_or_url)
    local = _local_path(path_or_url)
    target = str(local) if local is not None else os.fspath(path_or_url)
    options = {"storage_options": STORAGE_OPTIONS} if local is None else {}
    try:
        group = zarr.open_group(target, mode="r", **options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        group = None
    except Exception as exc:  # an array, junk JSON, a v2 store...
        raise SegPipeError(f"{path_or_url} is not a readable seg-pipeline store ({type(exc).__name__}: {exc})") from None
    if group is None:
        held = _some_entries(target, options)
        if held:
            # a folder of the user's (or a store whose root metadata is gone): never adopted, never written to
            raise BadInputError(f"{path_or_url} is a folder that is not a seg-pipeline store (it holds "
                                f"{', '.join(held)}); move it away or choose another workdir")
        if mode == "r":
            raise SegPipeError(f"no store at {path_or_url}: run `segpipe preprocess` first")
        group = zarr.open_group(target, mode="a", zarr_format=3, **options,
                                attributes={"segpipe_store": STORE_VERSION, "dataset_name": dataset_name})
    else:
        if group.attrs.get("segpipe_store") is None:
            raise SegPipeError(f"{path_or_url} is a Zarr group but not a seg-pipeline store (no 'segpipe_store' attribute)")
        if group.attrs.get("segpipe_store") != STORE_VERSION:
            raise SegPipeError(f"{path_or_url} has store version {group.attrs.get('segpipe_store')}; "
                               f"this seg-pipeline reads {STORE_VERSION}: preprocess into a fresh workdir")
        if mode == "a":
            group = zarr.open_group(target, mode="r+", **options)
    return Store(path_or_url, group)


def _some_entries(target: str, options: dict, most: int = 3) -> list[str]:
    """Up to `most` names directly inside `target` (a local folder or a URL prefix); [] when there is
    nothing there."""
    local = _local_path(target)
    if local is not None:
        if not local.is_dir():
            return []
        return sorted(p.name for p in local.iterdir())[:most]
    store = zarr.storage.FsspecStore.from_url(target, read_only=True, **options)

    async def listing() -> list[str]:
        names = []
        async for name in store.list_dir(""):
            names.append(name.rstrip("/"))
            if len(names) >= most:
                break
        return names

    return sorted(n for n in sync(listing()) if n)


def _child_names(group: zarr.Group, prefix: str) -> list[str]:
    """Names of the sub-folders of `prefix` under the group, straight from the store (no metadata reads)."""
    base = "/".join(p for p in (group.path, prefix) if p)

    async def listing() -> list[str]:
        return [name async for name in group.store.list_dir(base + "/" if base else "")]

    names = sync(listing())
    return [n.rstrip("/") for n in names if n.rstrip("/") and n.rstrip("/") != "zarr.json"]


class ConfigStore:
    """One preprocessed configuration: its complete cases, readable lazily."""

    def __init__(self, store: Store, data_identifier: str, group: zarr.Group):
        self.store = store
        self.data_identifier = data_identifier
        self.group = group
        self.attrs = dict(group.attrs)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        # what readers open cases through: a chunk the store lacks raises instead of reading as zeros
        self._reader = _ChunksMustExist(group.store, store.url)

    @property
    def url(self) -> str:
        return f"{self.store.url}/{self.data_identifier}"

    @property
    def patch_size(self) -> list[int]:
        return list(self.attrs["patch_size"])

    @property
    def image_dtype(self) -> str:
        return self.attrs.get("image_dtype", IMAGE_DTYPE)

    def _case_group(self, case_id: str) -> zarr.Group | None:
        """The case's group; None when its metadata is missing or unreadable as metadata (an
        interrupted write: never complete). Any other failure to read it - a permission, a network
        hiccup of object storage - stops here naming the case, so finished work is never mistaken
        for a leftover and deleted."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(StorePath(self._reader, f"{self.group.path}/cases/{case_id}"), mode="r")
        except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, TypeError, KeyError):  # absent, torn, not a group
            return None
        except Exception as exc:  # noqa: BLE001 - said with the case it concerns
            raise SegPipeError(f"case {case_id}: cannot read its metadata in {self.store.url}/{self.data_identifier} "
                               f"({type(exc).__name__}: {exc}); nothing was deleted - fix access and re-run") from exc
        return group

    def _complete_attrs(self) -> dict[str, dict | None]:
        """Every case group's attributes when the case is complete, None when it is not (one read each)."""
        out: dict[str, dict | None] = {}
        for name in _child_names(self.group, "cases"):
            group = self._case_group(name)
            attrs = dict(group.attrs) if group is not None else {}
            out[name] = attrs if attrs.get("complete") is True else None
        return out

    def _status(self) -> dict[str, bool]:
        return {name: attrs is not None for name, attrs in self._complete_attrs().items()}

    def case_ids(self) -> list[str]:
        """Complete cases only: a case interrupted mid-write is invisible to readers."""
        return sorted(name for name, complete in self._status().items() if complete)

    def incomplete_case_ids(self) -> list[str]:
        return sorted(name for name, complete in self._status().items() if not complete)

    def delete_incomplete(self) -> list[str]:
        """Remove leftovers of interrupted writes; returns their case ids."""
        gone = self.incomplete_case_ids()
        for case_id in gone:
            self._delete(case_id)
        return gone

    def _delete(self, case_id: str) -> None:
        sync(self.group.store.delete_dir(f"{self.group.path}/cases/{case_id}"))

    def complete_group(self, case_id: str) -> zarr.Group:
        group = self._case_group(case_id)
        if group is None or group.attrs.get("complete") is not True:
            raise KeyError(f"case {case_id!r} is not complete in {self.store.url}/{self.data_identifier}")
        return group

    def _array(self, case_id: str, key: str) -> zarr.Array:
        # A complete case never changes, so its handles are cached: a sampler reading one patch
        # at a time then pays no metadata reads after the first. Its reads raise StoreDamageError
        # on a missing chunk (the group is opened through `_ChunksMustExist`).
        arr = self._arrays.get((case_id, key))
        if arr is None:
            group = self.complete_group(case_id)
            try:
                arr = group[key]
            except KeyError:
                raise StoreDamageError(damage_message(self.url, case_id, key, f"no {key}/zarr.json")) from None
            except (zarr.errors.BaseZarrError, ValueError, TypeError) as exc:  # torn metadata
                raise StoreDamageError(damage_message(self.url, case_id, key, f"unreadable metadata: "
                                                      f"{type(exc).__name__}: {exc}")) from None
            if not isinstance(arr, zarr.Array):
                raise StoreDamageError(damage_message(self.url, case_id, key, "a group where the array should be"))
            self._arrays[(case_id, key)] = arr
        return arr

    def image(self, case_id: str) -> zarr.Array:
        """(C, *spatial) lazily read; slicing reads only the chunks it touches."""
        return self._array(case_id, "image")

    def label(self, case_id: str) -> zarr.Array:
        return self._array(case_id, "label")

    def locations(self, case_id: str) -> np.ndarray:
        return np.asarray(self._array(case_id, "locations")[...])

    def meta(self, case_id: str):
        from pipeline.preprocessing.case_meta import CaseMeta

        return CaseMeta.from_json(self.complete_group(case_id).attrs["meta"])

    def check_cases(self, case_ids: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
        """The cheap structural check (no chunk is read): case id -> what is wrong, for each complete
        case of `case_ids` (default: every case) whose arrays' metadata are missing or unreadable, whose
        shapes, dtypes or chunks disagree with the case's record, or whose chunk files are not all
        there. One listing and four small metadata reads per case, concurrent. A case that is not
        complete is not checked (preprocessing redoes it anyway). An error that is not the store's
        content - a permission, a network failure - raises naming the case: nothing is judged damaged
        on it."""
        names = _child_names(self.group, "cases") if case_ids is None else list(case_ids)
        limit = int(zarr.config.get("async.concurrency") or 10)

        async def run() -> list[tuple[str, str | None]]:
            gate = asyncio.Semaphore(limit)

            async def one(case_id: str) -> tuple[str, str | None]:
                async with gate:
                    return case_id, await self._case_damage(case_id)

            return await asyncio.gather(*(one(c) for c in names))

        return {case_id: damage_message(self.url, case_id, *damage) for case_id, damage in sync(run())
                if damage is not None}

    async def _case_damage(self, case_id: str) -> tuple[str | None, str] | None:
        """(array or None, what is wrong) for a damaged complete case; None for a sound or incomplete one."""
        from pipeline.preprocessing.case_meta import CaseMeta

        base = f"{self.group.path}/cases/{case_id}"
        try:
            group = await zarr_async.open_group(StorePath(self.group.store, base), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, TypeError, KeyError):
            return None  # absent or torn: not complete, not this check's business
        except Exception as exc:  # noqa: BLE001 - said with the case it concerns
            raise SegPipeError(f"case {case_id}: cannot read its metadata in {self.url} ({type(exc).__name__}: "
                               f"{exc}); nothing was changed - fix access and re-run") from exc
        attrs = dict(group.attrs)
        if attrs.get("complete") is not True:
            return None
        try:
            meta = CaseMeta.from_json(attrs["meta"])
            spatial = [int(n) for n in meta.shape_padded]
        except Exception as exc:  # noqa: BLE001 - a record that cannot be read is damage
            return None, f"its record ('meta') is unreadable: {type(exc).__name__}: {exc}"
        try:
            keys = {k[len(base) + 1:] async for k in self.group.store.list_prefix(base + "/")}
        except Exception as exc:  # noqa: BLE001
            raise SegPipeError(f"case {case_id}: cannot list its files in {self.url} ({type(exc).__name__}: "
                               f"{exc}); nothing was changed - fix access and re-run") from exc
        image_chunks, label_chunks = self.chunks()
        num_classes = int(self.attrs.get("num_classes", 0))
        want = {
            "image": ([int(self.attrs.get("num_channels", 1)), *spatial], str(np.dtype(self.image_dtype)), list(image_chunks)),
            "label": (spatial, "uint8" if num_classes <= 255 else "int16", list(label_chunks)),
        }
        for key in ARRAYS:
            if f"{key}/zarr.json" not in keys:
                return key, f"no {key}/zarr.json"
            try:
                arr = await zarr_async.open_array(store=StorePath(self.group.store, f"{base}/{key}"), mode="r", zarr_format=3)
            except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, TypeError, KeyError) as exc:
                return key, f"unreadable metadata: {type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001
                raise SegPipeError(f"case {case_id}: cannot read its {key} metadata in {self.url} "
                                   f"({type(exc).__name__}: {exc}); nothing was changed - fix access and re-run") from exc
            shape, dtype, chunks = list(arr.shape), str(arr.dtype), list(arr.chunks)
            if key in want:
                expected = want[key]
                if (shape, dtype, chunks) != expected:
                    return key, (f"shape {shape} {dtype} chunks {chunks}; the case's record and the configuration "
                                 f"say {expected[0]} {expected[1]} chunks {expected[2]}")
            elif len(shape) != 2 or shape[1] != 1 + len(spatial) or dtype != "int32":
                return key, f"shape {shape} {dtype}, expected (N, {1 + len(spatial)}) int32"
            grid = [-(-n // c) for n, c in zip(shape, chunks)]
            absent = [idx for idx in np.ndindex(*grid) if f"{key}/{arr.metadata.encode_chunk_key(idx)}" not in keys]
            if absent:
                return key, f"{len(absent)} of {int(np.prod(grid))} chunk(s) missing, e.g. chunk {list(absent[0])}"
        return None

    def delete_cases(self, case_ids: list[str]) -> None:
        """Delete whole case folders (damaged ones: the next preprocessing redoes them)."""
        if self.group.read_only:
            raise SegPipeError(f"{self.store.url} is open read-only")
        for case_id in case_ids:
            self._delete(case_id)
            self._arrays = {k: v for k, v in self._arrays.items() if k[0] != case_id}

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(image chunks, label chunks) for this configuration's patch size."""
        patch = [int(p) for p in self.patch_size]
        if len(patch) == 2:
            return (1, 1, *patch), (1, *patch)
        return (1, *patch), tuple(patch)

    def sources(self) -> dict[str, dict]:
        """The raw-file stamps of each complete case (its keys are `case_ids()`): what it was made from
        (`write_case(source=...)`; {} for a case stored without them)."""
        return {name: dict(attrs.get("source") or {}) for name, attrs in sorted(self._complete_attrs().items())
                if attrs is not None}

    def write_case(self, case_id: str, pre, source: dict | None = None, clock=None) -> None:
        """Write one case (`preprocessing.PreprocessedCase`); `complete` is set last, after every array.

        `source` (file -> stamp, `preprocessing.source_stamps`) lets a later run see that the raw
        files changed since and redo the case. `clock` (`preprocessing.StageTimes`) times the
        metadata writes apart from encoding and writing the chunks."""
        clock = clock or (lambda stage: contextlib.nullcontext())
        if "/" in case_id or case_id in ("", ".", ".."):
            raise SegPipeError(f"case id {case_id!r} cannot name a store group")
        if self.group.read_only:
            raise SegPipeError(f"{self.store.url} is open read-only")
        if pre.label is None:
            raise SegPipeError(f"case {case_id} has no label: only training cases go into the store")
        image_chunks, label_chunks = self.chunks()
        num_classes = int(self.attrs["num_classes"])
        label_dtype = "uint8" if num_classes <= 255 else "int16"
        image = pre.image
        if self.image_dtype == "float16":
            image = np.clip(image, -FLOAT16_MAX, FLOAT16_MAX)
        locs = np.asarray(pre.locations, dtype=np.int32).reshape(-1, 1 + pre.label.ndim)
        arrays = [("image", image.astype(self.image_dtype), image_chunks, image_compressors()),
                  ("label", pre.label.astype(label_dtype), label_chunks, label_compressors()),
                  ("locations", locs, (max(1, len(locs)), locs.shape[1]), locations_compressors())]
        base = f"{self.group.path}/cases/{case_id}"
        store = self.group.store
        self._arrays = {k: v for k, v in self._arrays.items() if k[0] != case_id}
        # Encoded by zarr into memory first, then written one file each: zarr's own writes to a
        # local store cost a thread hand-off per existence check and file (~38 per case), twice the
        # CPU of a small case's encoding. The order readers rely on stays: the group (not complete),
        # then every array, then `complete`.
        encoded: dict = {}

        async def write_array(group, name: str, data: np.ndarray, chunks, compressors) -> None:
            arr = await group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                           compressors=compressors, fill_value=0, config=ARRAY_CONFIG,
                                           chunk_key_encoding=CHUNK_KEY_ENCODING)
            await arr.setitem(Ellipsis, data)

        async def put(keys) -> None:
            await asyncio.gather(*(store.set(f"{base}/{key}", encoded[key]) for key in keys))

        async def encode_and_start():
            group = await zarr_async.group(store=StorePath(MemoryStore(store_dict=encoded)), zarr_format=3, attributes={
                "case_id": case_id, "complete": False, "meta": pre.meta.to_json(), "source": source or {}})
            await asyncio.gather(*(write_array(group, *spec) for spec in arrays))
            await store.delete_dir(base)  # a leftover of an earlier write goes first
            await put(["zarr.json"])
            return group

        async def finish(group) -> None:
            await group.update_attributes({"complete": True})
            await put(["zarr.json"])

        with clock("Zarr encode and write"):
            group = sync(encode_and_start())
            sync(put([key for key in encoded if key != "zarr.json"]))
        with clock("metadata"):
            sync(finish(group))  # last: readers see the case from here on


# ---------------------------------------------------------------- integrity


def verify_store(path_or_url: str | os.PathLike) -> list[Problem]:
    """Read every chunk of every complete case; one Problem per corrupt, missing or inconsistent piece."""
    return [problem for _, problem in _verify(open_store(path_or_url, "r"))]


def repair_store(path_or_url: str | os.PathLike) -> tuple[list[Problem], list[str]]:
    """`verify_store`, then delete every case it found damaged (under the store's run lock), so that
    the next preprocessing redoes them; returns (problems, deleted '<config>/cases/<case>').

    Deleting rather than rewriting: redoing a case needs the raw dataset, the plans and the Dask
    settings, which are preprocessing's - and preprocessing redoes a missing case by itself."""
    store = open_store(path_or_url, "a")
    with store.lock():
        found = _verify(store)
        damaged: dict[str, list[str]] = {}
        for config, problem in found:
            if config is not None and problem.case is not None and problem.case not in damaged.setdefault(config, []):
                damaged[config].append(problem.case)
        deleted = []
        for config, cases in damaged.items():
            store.config(config).delete_cases(cases)
            deleted.extend(f"{config}/cases/{c}" for c in cases)
    return [p for _, p in found], deleted


def _verify(store: Store) -> list[tuple[str | None, Problem]]:
    """(configuration, problem) for everything wrong with the store's complete cases."""
    problems: list[tuple[str | None, Problem]] = []
    for name in store.config_names():
        try:
            cs = store.config(name)
        except SegPipeError as exc:
            problems.append((None, Problem(None, f"{name}: {exc}")))
            continue
        num_classes = int(cs.attrs.get("num_classes", 0))
        for case_id in cs.case_ids():
            problems.extend((name, p) for p in _verify_case(cs, case_id, num_classes))
    return problems


def _verify_case(cs: ConfigStore, case_id: str, num_classes: int) -> list[Problem]:
    where = f"{cs.data_identifier}/cases/{case_id}"
    problems = []
    try:
        group = cs.complete_group(case_id)
        meta = cs.meta(case_id)
    except Exception as exc:
        return [Problem(case_id, f"{where}: unreadable metadata ({type(exc).__name__}: {exc})")]
    base = f"{cs.group.path}/cases/{case_id}/"

    async def listing() -> set[str]:
        return {k[len(base):] async for k in cs.group.store.list_prefix(base)}

    keys = sync(listing())
    shapes = {}
    for key in ARRAYS:
        try:
            arr = group[key]
        except Exception as exc:
            problems.append(Problem(case_id, f"{where}/{key}: missing ({type(exc).__name__})"))
            continue
        shapes[key] = arr.shape
        absent = {idx for idx in np.ndindex(*arr.cdata_shape) if f"{key}/{arr.metadata.encode_chunk_key(idx)}" not in keys}
        if absent:
            first = ", ".join(str(list(idx)) for idx in sorted(absent)[:3])
            problems.append(Problem(case_id, f"{where}/{key}: {len(absent)} of {arr.nchunks} chunk(s) missing "
                                             f"({first}{', ...' if len(absent) > 3 else ''})"))
        for idx in np.ndindex(*arr.cdata_shape):
            if idx in absent:
                continue  # said above; reading it would raise StoreDamageError
            region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, arr.chunks, arr.shape))
            try:
                block = arr[region]
            except Exception as exc:
                problems.append(Problem(case_id, f"{where}/{key} chunk {list(idx)}: unreadable ({type(exc).__name__}: {exc})"))
                continue
            if key == "label" and block.size and (block.min() < 0 or block.max() >= num_classes):
                problems.append(Problem(case_id, f"{where}/label chunk {list(idx)}: values outside 0..{num_classes - 1}"))
            if key == "image" and not np.isfinite(block).all():
                problems.append(Problem(case_id, f"{where}/image chunk {list(idx)}: NaN or infinite values"))
    if "image" in shapes and "label" in shapes and tuple(shapes["image"][1:]) != tuple(shapes["label"]):
        problems.append(Problem(case_id, f"{where}: image {shapes['image']} and label {shapes['label']} shapes differ"))
    if "label" in shapes and list(shapes["label"]) != meta.shape_padded:
        problems.append(Problem(case_id, f"{where}: label shape {shapes['label']} does not match meta {meta.shape_padded}"))
    if not problems:
        damage = sync(cs._case_damage(case_id))
        if damage is not None:  # a dtype or chunking that disagrees with the configuration
            array, detail = damage
            problems.append(Problem(case_id, f"{where}{'/' + array if array else ''}: {detail}"))
    return problems


# ---------------------------------------------------------------- one run at a time


class StoreLock:
    """An O_CREAT|O_EXCL lock file holding pid and host; stale when that pid is dead on this host."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _attempt in range(3):
            try:
                created = self._create(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            except FileExistsError:
                holder = self._holder()
                if holder is None or not self._stale(holder):
                    who = f"pid {holder['pid']} on {holder['host']}" if holder else "another process"
                    raise SegPipeError(
                        f"another preprocessing run ({who}) is using this store (lock {self.path}); wait for it "
                        f"to finish, or delete the lock if that run is gone") from None
                with contextlib.suppress(FileNotFoundError):
                    self._remove()
                continue
            self.held = created
            return
        raise SegPipeError(f"could not take the store lock {self.path}")

    def _create(self, text: str) -> bool:
        """Create the lock holding `text` unless it exists (FileExistsError); True when a lock is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _remove(self) -> None:
        os.unlink(self.path)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"])}
        except FileNotFoundError:
            return {"pid": -1, "host": socket.gethostname()}  # released meanwhile: stale, retry
        except (ValueError, KeyError, TypeError, OSError):
            # written by a run that died between creating and filling the file: stale after a minute
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                age = float("inf")
            return {"pid": -1, "host": socket.gethostname()} if age > 60 else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder["host"] != socket.gethostname():
            return False  # cannot tell whether a process on another host lives
        if holder["pid"] <= 0:
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self._remove()
            self.held = False


class ObjectStoreLock(StoreLock):
    """The run lock of a store in a bucket: an object created only if absent (`fs.open(..., "xb")`,
    a conditional PUT on S3), holding pid and host. Stale when that pid is dead on this host; a
    holder on another host is never taken over (delete the object if that run is gone)."""

    def __init__(self, path):
        self.path = path
        self.held = False

    def _create(self, text: str) -> bool:
        try:
            with self.path.fs.open(self.path.path, "xb") as f:
                f.write(text.encode())
        except (NotImplementedError, ValueError) as exc:  # a filesystem without exclusive create
            log.warning("%s cannot be locked (%s): never run two preprocessing runs on it at once", self.path, exc)
            return False
        return True

    def _remove(self) -> None:
        self.path.fs.rm(self.path.path)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"])}
        except FileNotFoundError:
            return {"pid": -1, "host": socket.gethostname()}  # released meanwhile: retry
        except (ValueError, KeyError, TypeError):
            return None


