"""The self-configuring planner: nnU-Net v2's default ExperimentPlanner rules, reimplemented.

From the fingerprint alone it chooses, per configuration, the target spacing, the patch size that
fits a memory budget, the U-Net topology (pooling per axis, kernel sizes, features per stage), the
batch size, the normalisation and the resampling orders. Every value comes with an explanation
(`ConfigurationPlan.explanations[field]`) holding the rule and the numbers that produced it;
`explain_plans` renders them (what `segpipe plan --explain` prints).

Frames: the fingerprint is in RAS (x, y, z). nnU-Net plans in the axis order SimpleITK reads a file
in, (z, y, x) of the voxel array, so for a file stored near RAS its axis 0 is S. The store order
here is RAS permuted by `transpose_forward`: the lowest-resolution axis first and, as nnU-Net sees a
RAS file, ties and the remaining axes taken from the end of RAS (S, A, R). On RAS-stored data
(hippocampus, TotalSegmentator) our store order is therefore exactly nnU-Net's.

Configurations:
* `3d_fullres`, `2d`: nnU-Net's defaults (preset "nnunet").
* `3d_lowres`: only where nnU-Net creates it (fullres patch < 25 % of the median image).
* `3d_cascade_fullres`: wherever `3d_lowres` exists, as nnU-Net: `3d_fullres` (inherited, same
  data) with `previous_stage` = `3d_lowres`, whose cross-validated segmentations become extra
  one-hot input channels (`pipeline.training.cascade`).
* `3d_lean`: a compute-budget preset inheriting `3d_fullres` (same data, same patch) with a
  16..128-feature U-Net and batch 4, for CPUs and short budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.data.dataset import Dataset
from pipeline.errors import BadInputError
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.plans import ChannelNormalization, ConfigurationPlan, Plans

# nnU-Net v2 (2.x) ExperimentPlanner constants. The VRAM reference values are "feature-map voxels"
# that fit in 8 GB at the reference batch size; they were tuned by nnU-Net's authors.
ANISO_THRESHOLD = 3.0
FEATUREMAP_MIN_EDGE = 4
REFERENCE_VOXELS_3D = 560_000_000
REFERENCE_VOXELS_2D = 85_000_000
REFERENCE_GB = 8.0
REFERENCE_BATCH_3D = 2
REFERENCE_BATCH_2D = 12
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
MAX_FEATURES_2D = 512
CONVS_PER_STAGE = 2
INITIAL_PATCH_VOXELS_3D = 256 ** 3
INITIAL_PATCH_VOXELS_2D = 2048 ** 2
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0
MASK_FOR_NORM_BELOW = 0.75
IMAGE_ORDER, LABEL_ORDER, ORDER_Z = 3, 1, 0

# The lean preset (measured on hippocampus, 2 CPU cores: nnU-Net's 32..320 recipe reached Dice 0.16
# after 30 minutes while a 16..128 net reached 0.84 in 15).
LEAN_BASE_FEATURES = 16
LEAN_MAX_FEATURES = 128
LEAN_BATCH = 4

RAS_NAMES = ("x (R)", "y (A)", "z (S)")


def _fmt(values, digits: int = 4) -> str:
    """Compact list formatting for explanations: [1.0, 0.5] not [np.float64(1.0), ...]."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple, np.ndarray)):
            out.append(_fmt(v, digits))
        elif isinstance(v, (str, bool, np.bool_)):
            out.append(str(v))
        elif float(v).is_integer():
            out.append(str(int(v)))
        else:
            out.append(f"{float(v):.{digits}g}")
    return "[" + ", ".join(out) + "]"


# ------------------------------------------------------------------ dataset-level rules


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, str]:
    """Median spacing per axis, except for an anisotropic low-resolution axis (nnU-Net's rule).

    When the worst axis is both > 3x coarser than the others and has < 1/3 of their voxels, the
    median would resample the finest cases of that axis with heavy interpolation; its 10th
    percentile is used instead (never finer than the other axes).
    """
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacing = max(target[i] for i in others)
    other_size = min(median_shape[i] for i in others)
    aniso_spacing = target[worst] > ANISO_THRESHOLD * other_spacing
    aniso_voxels = median_shape[worst] * ANISO_THRESHOLD < other_size
    text = (f"median spacing of {len(spacings)} cases per RAS axis = {_fmt(target)} mm "
            f"(median shape after crop {_fmt(median_shape)}); ")
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        chosen = p10 if p10 >= other_spacing else max(other_spacing, p10) + 1e-5
        text += (f"axis {RAS_NAMES[worst]} is anisotropic ({target[worst]:.4g} > {ANISO_THRESHOLD:g} x {other_spacing:.4g} mm "
                 f"and {median_shape[worst]:.4g} x {ANISO_THRESHOLD:g} < {other_size:.4g} voxels): its 10th percentile "
                 f"{p10:.4g} mm is used instead of the median, floored at the other axes -> {chosen:.4g} mm")
        target[worst] = chosen
    else:
        reasons = []
        if not aniso_spacing:
            reasons.append(f"{target[worst]:.4g} <= {ANISO_THRESHOLD:g} x {other_spacing:.4g} mm")
        if not aniso_voxels:
            reasons.append(f"{median_shape[worst]:.4g} x {ANISO_THRESHOLD:g} >= {other_size:.4g} voxels")
        text += f"no anisotropic axis ({'; '.join(reasons)}), so the median is kept"
    return target, text


def transpose_order(spacing_ras: np.ndarray) -> tuple[list[int], str]:
    """Store axis order: the coarsest RAS axis first (2D slices along it), then the others.

    nnU-Net takes the first coarsest axis of (z, y, x); seen from RAS that is the last one, and the
    remaining axes follow in S, A, R order, so on RAS files both frames coincide.
    """
    order = [2, 1, 0]
    coarsest = max(order, key=lambda a: (spacing_ras[a], a))
    forward = [coarsest] + [a for a in order if a != coarsest]
    names = [RAS_NAMES[a] for a in forward]
    text = (f"target spacing per RAS axis {_fmt(spacing_ras)} mm: the coarsest axis {RAS_NAMES[coarsest]} goes first "
            f"(ties go to S, then A, as nnU-Net orders a RAS file z, y, x), store axes = {', '.join(names)}")
    return forward, text


def normalization_for(dataset: Dataset, fingerprint: Fingerprint) -> tuple[list[ChannelNormalization], list[str]]:
    """nnU-Net's channel-name rule: 'CT' -> clip + global z-score, 'noNorm' -> none, else per-image z-score.

    The nonzero mask is used for z-score normalisation only when cropping to the nonzero region
    shrank the median case below 3/4 of its size (e.g. skull-stripped brains).
    """
    relative = fingerprint.median_relative_size_after_crop
    use_mask = relative < MASK_FOR_NORM_BELOW
    out, texts = [], []
    for c, name in enumerate(dataset.channels):
        key = name.strip().casefold()
        props = fingerprint.foreground_intensity_properties[c]
        if key == "ct":
            if props.count == 0 or props.mean is None:
                raise BadInputError(f"channel {c} ({name}) is CT but no case has foreground voxels to derive "
                                    "the clipping range and z-score statistics from")
            out.append(ChannelNormalization("ct", False, props.mean, props.std, props.percentile_00_5,
                                            props.percentile_99_5))
            texts.append(f"channel {c} '{name}': CT -> clip to the foreground 0.5/99.5 percentiles "
                         f"[{props.percentile_00_5:.6g}, {props.percentile_99_5:.6g}] and z-score with the foreground "
                         f"mean {props.mean:.6g} and std {props.std:.6g} ({props.count} sampled voxels, "
                         f"{fingerprint.samples_per_case} per case); no nonzero mask (CT keeps air)")
        elif key == "nonorm":
            out.append(ChannelNormalization("none", False))
            texts.append(f"channel {c} '{name}': 'noNorm' -> intensities kept as they are")
        else:
            out.append(ChannelNormalization("zscore", bool(use_mask)))
            note = "" if key == "zscore" else f" (channel name '{name}' is not CT/noNorm, so the default)"
            mask = (f"inside the nonzero mask (cropping kept a median {relative:.3g} < {MASK_FOR_NORM_BELOW} of the image)"
                    if use_mask else
                    f"over the whole image (cropping kept a median {relative:.3g} >= {MASK_FOR_NORM_BELOW} of the image, "
                    "so no nonzero mask)")
            texts.append(f"channel {c} '{name}': per-image z-score{note} {mask}")
    return out, texts


# ------------------------------------------------------------------ topology (nnU-Net's get_pool_and_conv_props)


@dataclass
class Topology:
    strides: list[list[int]]  # per stage, first all ones
    kernel_sizes: list[list[int]]  # per stage
    patch_size: list[int]  # padded to a multiple of divisible_by
    divisible_by: list[int]  # 2 ** pools per axis

    @property
    def num_stages(self) -> int:
        return len(self.strides)


def pool_and_conv_props(spacing, patch_size, min_edge: int = FEATUREMAP_MIN_EDGE) -> Topology:
    """Pool an axis while its feature map stays >= 2*min_edge voxels and its spacing is within 2x
    of the finest poolable axis; kernels become 3 once an axis is within 2x of the finest spacing
    (1 before: no in-plane mixing across a coarse axis); the bottleneck gets 3s. The patch is
    then padded up to a multiple of 2**pools per axis.
    """
    dim = len(spacing)
    spacing = [float(s) for s in spacing]
    size = [float(s) for s in patch_size]
    strides = [[1] * dim]
    kernels = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(spacing[i] for i in valid)
        valid = [i for i in valid if spacing[i] / finest < 2]
        # one axis alone is pooled only while it stays >= 3*min_edge: a lone pooled axis is
        # a sign of an anisotropic patch, and over-pooling it leaves too little context
        if len(valid) == 1 and size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        overall_finest = min(spacing)
        for d in range(dim):
            if kernel[d] != 3 and spacing[d] / overall_finest < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            spacing[v] *= 2
            size[v] = math.ceil(size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisible = [2 ** p for p in pools]
    padded = [int(_pad_up(s, d)) for s, d in zip(patch_size, divisible)]
    return Topology(strides, kernels, padded, divisible)


def _pad_up(size: float, multiple: int) -> float:
    """The next multiple of `multiple` at or above `size` (nnU-Net's pad_shape, floats allowed)."""
    remainder = size % multiple
    return size if remainder == 0 else size + multiple - remainder


def features_per_stage(num_stages: int, base: int, maximum: int) -> list[int]:
    return [min(maximum, base * 2 ** i) for i in range(num_stages)]


def feature_map_voxels(patch_size, strides, features, num_classes: int,
                       convs_encoder: int = CONVS_PER_STAGE, convs_decoder: int = CONVS_PER_STAGE) -> int:
    """nnU-Net's VRAM proxy for a plain conv U-Net: the voxels of every conv output feature map.

    Encoder stage s: `convs_encoder` maps of features[s] channels at the size after its stride.
    Decoder stage at encoder level s (< bottleneck): a transposed conv plus `convs_decoder` convs
    of features[s] channels; the full-resolution stage adds the segmentation output.
    """
    size = list(patch_size)
    sizes = []
    total = 0
    for stride, feats in zip(strides, features):
        size = [a // b for a, b in zip(size, stride)]
        sizes.append(size)
        total += convs_encoder * feats * math.prod(size)
    for s in range(len(strides) - 1):
        voxels = math.prod(sizes[s])
        total += (convs_decoder + 1) * features[s] * voxels
        if s == 0:
            total += num_classes * voxels
    return int(total)


# ------------------------------------------------------------------ one configuration


def _plan_configuration(name: str, spacing, median_shape, n_voxels_dataset: float, num_classes: int,
                        gpu_memory_gb: float, cache: dict) -> ConfigurationPlan:
    """nnU-Net's get_plans_for_configuration: patch, topology and batch size under the budget."""
    dim = len(spacing)
    spacing = np.asarray(spacing, dtype=np.float64)
    median_shape = np.asarray(median_shape, dtype=np.float64)
    max_features = MAX_FEATURES_2D if dim == 2 else MAX_FEATURES_3D
    explain: dict[str, str] = {}

    # 1. An initial patch with the aspect ratio of 1/spacing and the volume of 256^3 (2048^2 in 2D),
    #    clipped to the median shape: no point in a patch larger than the typical image.
    inverse = 1.0 / spacing
    initial_voxels = INITIAL_PATCH_VOXELS_2D if dim == 2 else INITIAL_PATCH_VOXELS_3D
    scaled = [round(v) for v in inverse * (initial_voxels / np.prod(inverse)) ** (1 / dim)]
    initial = [min(a, b) for a, b in zip(scaled, median_shape)]
    topo = pool_and_conv_props(spacing, initial)
    feats = features_per_stage(topo.num_stages, BASE_FEATURES, max_features)

    def estimate(t: Topology) -> int:
        key = (tuple(t.patch_size), tuple(map(tuple, t.strides)))
        if key not in cache:
            cache[key] = feature_map_voxels(t.patch_size, t.strides,
                                            features_per_stage(t.num_stages, BASE_FEATURES, max_features), num_classes)
        return cache[key]

    reference_batch = REFERENCE_BATCH_2D if dim == 2 else REFERENCE_BATCH_3D
    budget = (REFERENCE_VOXELS_2D if dim == 2 else REFERENCE_VOXELS_3D) * (gpu_memory_gb / REFERENCE_GB)
    first_padded, first_estimate = list(topo.patch_size), estimate(topo)
    current = first_estimate
    steps = 0
    # 2. Shrink while the estimate at batch 2 exceeds the budget: always the axis that is largest
    #    relative to the median shape (ties: the last), by one multiple of its pooling factor
    #    (recomputed first, so no valid size is skipped), then re-derive the topology.
    while current / reference_batch * MIN_BATCH > budget:
        patch = list(topo.patch_size)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = int(np.argsort(ratios, kind="stable")[-1])
        trial = list(patch)
        trial[axis] -= topo.divisible_by[axis]
        patch[axis] -= pool_and_conv_props(spacing, trial).divisible_by[axis]
        topo = pool_and_conv_props(spacing, patch)
        current = estimate(topo)
        steps += 1
    feats = features_per_stage(topo.num_stages, BASE_FEATURES, max_features)
    patch = topo.patch_size

    # 3. Batch: spend what the budget leaves, but never see more than 5 % of the dataset per step.
    from_budget = round(budget / current * reference_batch)
    patch_voxels = float(np.prod(patch, dtype=np.float64))
    from_coverage = round(n_voxels_dataset * MAX_DATASET_COVERED / patch_voxels)
    batch = max(min(from_budget, from_coverage), MIN_BATCH)

    explain["spacing"] = "(set by the caller)"
    explain["median_shape"] = (f"median over cases of the shape after cropping, resampled to the target spacing: "
                               f"{_fmt(median_shape)} (store axes)")
    shrink = (f"; at batch {MIN_BATCH} its estimate {first_estimate:,} exceeded the budget, so the axis largest "
              f"relative to the median shape was reduced {steps} time(s) by its pooling multiple"
              if steps else f"; at batch {MIN_BATCH} it fits the budget")
    explain["patch_size"] = (
        f"initial patch with aspect 1/spacing and the volume of {round(initial_voxels ** (1 / dim))}^{dim} voxels = "
        f"{_fmt(scaled)}, clipped to the median shape -> {_fmt(initial)}, padded to a multiple of 2^pools "
        f"{_fmt(first_padded)}{shrink} -> {_fmt(patch)}; memory: {current:,} feature-map voxels "
        f"(conv outputs of the U-Net at this patch, nnU-Net's estimate) x {MIN_BATCH}/{reference_batch} vs budget "
        f"{budget:,.0f} = {REFERENCE_VOXELS_2D if dim == 2 else REFERENCE_VOXELS_3D:,} x {gpu_memory_gb:g} GB / "
        f"{REFERENCE_GB:g} GB (nnU-Net's reference at batch {reference_batch})")
    explain["strides"] = (f"{topo.num_stages - 1} poolings: an axis is pooled while its feature map stays >= "
                          f"{2 * FEATUREMAP_MIN_EDGE} voxels (one axis alone: >= {3 * FEATUREMAP_MIN_EDGE}) and its spacing is "
                          f"within 2x of the finest poolable axis; pools per axis {_fmt([int(math.log2(d)) for d in topo.divisible_by])}, "
                          f"so the patch is a multiple of {_fmt(topo.divisible_by)}")
    explain["kernel_sizes"] = ("3 along an axis once its (pooled) spacing is within 2x of the finest, 1 before "
                               "(no mixing across a much coarser axis); the bottleneck is all 3s: "
                               f"{_fmt(topo.kernel_sizes)}")
    explain["features_per_stage"] = (f"{BASE_FEATURES} doubling per stage, capped at {max_features} "
                                     f"({'2D' if dim == 2 else '3D'}): {_fmt(feats)}")
    explain["n_conv_per_stage"] = f"{CONVS_PER_STAGE} convolutions per stage in encoder and decoder (nnU-Net's plain U-Net)"
    explain["batch_size"] = (f"round(budget {budget:,.0f} / estimate {current:,} x reference batch {reference_batch}) = "
                             f"{from_budget}; 5% of the dataset's {n_voxels_dataset:,.0f} voxels / patch {patch_voxels:,.0f} "
                             f"= {from_coverage}; min of the two, at least {MIN_BATCH} -> {batch}")
    return ConfigurationPlan(
        name=name,
        data_identifier=name,
        spacing=[float(s) for s in spacing],
        patch_size=[int(p) for p in patch],
        batch_size=int(batch),
        median_shape=[int(round(float(m))) for m in median_shape],
        kernel_sizes=topo.kernel_sizes,
        strides=topo.strides,
        features_per_stage=feats,
        n_conv_per_stage=CONVS_PER_STAGE,
        preset="nnunet",
        explanations=explain,
    )


def _add_common(conf: ConfigurationPlan, normalization: list[ChannelNormalization], norm_texts: list[str]) -> None:
    """Normalisation and resampling: the same for every nnU-Net configuration."""
    conf.normalization_schemes = [n.scheme for n in normalization]
    conf.use_mask_for_norm = [n.use_nonzero_mask for n in normalization]
    conf.image_order, conf.label_order, conf.order_z = IMAGE_ORDER, LABEL_ORDER, ORDER_Z
    conf.anisotropy_threshold = ANISO_THRESHOLD
    e = conf.explanations
    e["normalization_schemes"] = "; ".join(norm_texts)
    e["use_mask_for_norm"] = "per channel, see normalization_schemes: " + _fmt([n.use_nonzero_mask for n in normalization])
    e["image_order"] = f"images are resampled with cubic splines (order {IMAGE_ORDER}), as nnU-Net"
    e["label_order"] = (f"labels are resampled one-hot with linear interpolation (order {LABEL_ORDER}) and the argmax "
                        "kept, as nnU-Net")
    e["order_z"] = (f"when the spacing (before or after) is more anisotropic than {ANISO_THRESHOLD:g}:1, the coarse axis "
                    f"is resampled separately with order {ORDER_Z} (nearest) to avoid smearing across thick slices")
    e["anisotropy_threshold"] = f"max/min spacing ratio {ANISO_THRESHOLD:g} (nnU-Net's ANISO_THRESHOLD)"
    if conf.preset == "nnunet":
        e["preset"] = "nnunet: nnU-Net v2's default recipe, unchanged"


# ------------------------------------------------------------------ the experiment


def plan_experiment(fingerprint: Fingerprint, dataset: Dataset, gpu_memory_gb: float = 8.0) -> Plans:
    """Plans for `dataset` from its fingerprint, by nnU-Net v2's default rules (plus `3d_lean`)."""
    if gpu_memory_gb <= 0:
        raise BadInputError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
    _check_matches(fingerprint, dataset)
    num_cases = len(fingerprint.cases)
    num_classes = dataset.label_map.num_outputs  # the network's output channels (regions, no ignore)
    spacings = fingerprint.spacings
    shapes = fingerprint.shapes_after_crop
    if spacings.shape[1] != 3 or (spacings <= 0).any():
        bad = [c.case_id for c in fingerprint.cases if min(c.spacing) <= 0]
        raise BadInputError(f"spacing must be positive in every axis (cases {', '.join(bad[:5])})")

    target, spacing_text = target_spacing(spacings, shapes)
    forward, transpose_text = transpose_order(target)
    # median shape after resampling every case to the target spacing (nnU-Net rounds per case)
    new_shapes = np.array([[int(round(sp / t * sh)) for sp, t, sh in zip(s, target, shape)]
                           for s, shape in zip(spacings, shapes)], dtype=np.float64)
    median_shape = np.median(new_shapes, axis=0)[forward]
    spacing = target[forward]
    n_voxels_dataset = float(np.prod(median_shape, dtype=np.float64) * num_cases)
    normalization, norm_texts = normalization_for(dataset, fingerprint)
    cache: dict = {}
    configurations: dict[str, ConfigurationPlan] = {}
    plans_text: dict[str, str] = {"transpose_forward": transpose_text, "normalization": "; ".join(norm_texts)}
    spacing_store = f"{spacing_text}; in store axes {_fmt(spacing)} mm"

    if median_shape[0] > 1:
        full = _plan_configuration("3d_fullres", spacing, median_shape, n_voxels_dataset, num_classes, gpu_memory_gb, cache)
        full.explanations["spacing"] = spacing_store
        full.explanations["data_identifier"] = "3d_fullres: its own preprocessed data in the store"
        _add_common(full, normalization, norm_texts)
        configurations["3d_fullres"] = full
        lowres, lowres_text = _plan_lowres(full, median_shape, num_cases, num_classes, gpu_memory_gb, cache)
        plans_text["3d_lowres"] = lowres_text
        full.batch_dice = lowres is not None
        full.explanations["batch_dice"] = ("nnU-Net computes the Dice loss over the whole batch only when a 3d_lowres "
                                           f"stage exists: {full.batch_dice}")
        if lowres is not None:
            lowres.batch_dice = False
            lowres.explanations["batch_dice"] = "per-sample Dice, as nnU-Net's 3d_lowres"
            _add_common(lowres, normalization, norm_texts)
            configurations["3d_lowres"] = lowres
            configurations["3d_cascade_fullres"] = _plan_cascade(full, lowres, num_classes)
            plans_text["3d_cascade_fullres"] = configurations["3d_cascade_fullres"].explanations["previous_stage"]
        else:
            plans_text["3d_cascade_fullres"] = ("no 3d_cascade_fullres: it is the second stage of 3d_lowres, which "
                                                "is not planned (see 3d_lowres)")
        configurations["3d_lean"] = _plan_lean(full, n_voxels_dataset, num_classes, gpu_memory_gb)
    else:
        plans_text["3d_fullres"] = (f"no 3D configuration: the median image has a single slice along the first "
                                    f"store axis ({_fmt(median_shape)})")

    two_d = _plan_configuration("2d", spacing[1:], median_shape[1:], n_voxels_dataset, num_classes, gpu_memory_gb, cache)
    two_d.explanations["spacing"] = (f"the in-plane (last two store axes) part of the 3D target spacing {_fmt(spacing)} mm; "
                                     f"slices are taken along store axis 0 ({RAS_NAMES[forward[0]]})")
    two_d.explanations["data_identifier"] = "2d: its own preprocessed data (same spacing in-plane, never resampled along axis 0)"
    two_d.batch_dice = True
    two_d.explanations["batch_dice"] = "Dice over the whole batch of slices, as nnU-Net's 2d"
    _add_common(two_d, normalization, norm_texts)
    configurations["2d"] = two_d

    labels_text = _labels_explanation(dataset)
    if labels_text:
        plans_text = {**plans_text, "labels": labels_text}
    return Plans(
        dataset_name=dataset.name,
        channels=list(dataset.channels),
        labels={str(v): name for v, name in sorted(dataset.labels.items())},
        regions=[{"name": r.name, "values": list(r.values)} for r in dataset.regions],
        regions_class_order=list(dataset.regions_class_order),
        ignore_label=dataset.ignore_value,
        transpose_forward=[int(a) for a in forward],
        normalization=normalization,
        configurations=configurations,
        gpu_memory_gb=float(gpu_memory_gb),
        fingerprint_hash=fingerprint.hash(),
        explanations=plans_text,
    )


def _labels_explanation(dataset: Dataset) -> str:
    """Why the network has the outputs it has, when the labels are more than plain classes."""
    lm = dataset.label_map
    parts = []
    if lm.has_regions:
        parts.append(f"region-based (nnU-Net v2): {lm.num_outputs} sigmoid outputs "
                     + ", ".join(f"{r.name}={list(r.values)}" for r in lm.regions)
                     + f"; Dice + BCE; export paints {list(lm.regions_class_order)} in that order where p > 0.5")
    if lm.has_ignore:
        parts.append(f"label {lm.ignore_value} is 'ignore': masked out of loss, pseudo-Dice and evaluation, never a "
                     "sampling centre, no network output")
    return "; ".join(parts)


def _plan_lowres(full: ConfigurationPlan, median_shape: np.ndarray, num_cases: int, num_classes: int,
                 gpu_memory_gb: float, cache: dict) -> tuple[ConfigurationPlan | None, str]:
    """nnU-Net's 3d_lowres: when the fullres patch covers < 25 % of the median image, coarsen the
    spacing in 3 % steps (anisotropic axes first, until within 2x of the others) until a patch
    covers 25 %; drop it if the image did not shrink at least 2x."""
    full_spacing = np.asarray(full.spacing, dtype=np.float64)
    median_voxels = float(np.prod(median_shape, dtype=np.float64))
    patch_voxels = float(np.prod(full.patch_size, dtype=np.float64))
    fraction = patch_voxels / median_voxels
    if fraction >= LOWRES_THRESHOLD:
        return None, (f"no 3d_lowres: the 3d_fullres patch covers {fraction:.1%} >= {LOWRES_THRESHOLD:.0%} of the "
                      f"median image ({patch_voxels:,.0f} of {median_voxels:,.0f} voxels)")
    spacing = full_spacing.copy()
    lowres = None
    steps = 0
    while patch_voxels / median_voxels < LOWRES_THRESHOLD:
        coarsest = spacing.max()
        fine = coarsest / spacing > 2
        if fine.any():
            spacing[fine] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        steps += 1
        scaled_shape = full_spacing / spacing * median_shape
        median_voxels = float(np.prod(scaled_shape, dtype=np.float64))
        lowres = _plan_configuration("3d_lowres", spacing, [round(float(s)) for s in scaled_shape],
                                     median_voxels * num_cases, num_classes, gpu_memory_gb, cache)
        patch_voxels = float(np.prod(lowres.patch_size, dtype=np.float64))
    shrink = float(np.prod(median_shape, dtype=np.float64)) / median_voxels
    if shrink < LOWRES_MIN_SHRINK:
        return None, (f"no 3d_lowres: coarsening the spacing to {_fmt(spacing)} mm shrinks the median image only "
                      f"{shrink:.2f}x (< {LOWRES_MIN_SHRINK:g}x), too little to be worth a second network")
    lowres.explanations["spacing"] = (
        f"the 3d_fullres patch {_fmt(full.patch_size)} covered {fraction:.1%} < {LOWRES_THRESHOLD:.0%} of the median "
        f"image, so the spacing was coarsened {steps} time(s) by {LOWRES_SPACING_STEP:g} (axes finer than half the "
        f"coarsest first) until a patch covers {LOWRES_THRESHOLD:.0%}: {_fmt(spacing)} mm; the image shrank {shrink:.2f}x")
    lowres.explanations["data_identifier"] = "3d_lowres: its own preprocessed data at the coarser spacing"
    return lowres, f"3d_lowres created (first stage of nnU-Net's cascade): {lowres.explanations['spacing']}"


def _plan_cascade(full: ConfigurationPlan, lowres: ConfigurationPlan, num_classes: int) -> ConfigurationPlan:
    """nnU-Net's 3d_cascade_fullres: 3d_fullres unchanged (same data, patch and network) except for
    its input, which gains one channel per foreground class holding 3d_lowres's segmentation."""
    full_voxels = float(np.prod(full.median_shape, dtype=np.float64))
    low_voxels = float(np.prod(lowres.median_shape, dtype=np.float64))
    patch = float(np.prod(full.patch_size, dtype=np.float64))
    why = (f"planned because 3d_lowres exists (nnU-Net plans the cascade exactly then): the 3d_fullres patch "
           f"{_fmt(full.patch_size)} sees only {patch / full_voxels:.1%} of the median image "
           f"{_fmt(full.median_shape)}, so it lacks context; 3d_lowres sees the whole image at "
           f"{_fmt(lowres.spacing)} mm ({full_voxels / low_voxels:.1f}x fewer voxels), and its segmentation, "
           f"resampled to the 3d_fullres grid, is fed as {num_classes - 1} extra one-hot input channel(s) (one per "
           "foreground class). Training uses 3d_lowres's cross-validated predictions (each case predicted by the "
           "fold that did not train on it), so all 5 3d_lowres folds must be trained first; prediction runs "
           "3d_lowres, then this stage")
    return ConfigurationPlan(
        name="3d_cascade_fullres",
        inherits_from="3d_fullres",
        previous_stage="3d_lowres",
        explanations={
            "previous_stage": why,
            "data_identifier": "3d_fullres: same spacing, patch and normalisation, so it trains from the same store",
        },
    )


def _plan_lean(full: ConfigurationPlan, n_voxels_dataset: float, num_classes: int,
               gpu_memory_gb: float) -> ConfigurationPlan:
    """The compute-budget preset: same data and patch as 3d_fullres, a thinner network, batch 4
    (fewer if the memory budget or the 5 % rule says so, never below 2)."""
    feats = features_per_stage(full.num_stages, LEAN_BASE_FEATURES, LEAN_MAX_FEATURES)
    patch_voxels = float(np.prod(full.patch_size, dtype=np.float64))
    from_coverage = round(n_voxels_dataset * MAX_DATASET_COVERED / patch_voxels)
    estimate = feature_map_voxels(full.patch_size, full.strides, feats, num_classes)
    budget = REFERENCE_VOXELS_3D * (gpu_memory_gb / REFERENCE_GB)
    from_budget = round(budget / estimate * REFERENCE_BATCH_3D)
    batch = max(min(LEAN_BATCH, from_budget, from_coverage), MIN_BATCH)
    return ConfigurationPlan(
        name="3d_lean",
        inherits_from="3d_fullres",
        data_identifier="3d_fullres",
        features_per_stage=feats,
        batch_size=batch,
        preset="lean",
        explanations={
            "data_identifier": "3d_fullres: same spacing, patch and normalisation, so it trains from the same store",
            "features_per_stage": (f"{LEAN_BASE_FEATURES} doubling per stage, capped at {LEAN_MAX_FEATURES}: {_fmt(feats)} "
                                   f"(nnU-Net: {_fmt(full.features_per_stage)}), a fraction of the compute per step"),
            "batch_size": (f"lean batch {LEAN_BATCH}, capped by the memory budget (round({budget:,.0f} / {estimate:,} "
                           f"feature-map voxels x {REFERENCE_BATCH_3D}) = {from_budget}) and by 5% of the dataset's "
                           f"{n_voxels_dataset:,.0f} voxels / patch {patch_voxels:,.0f} = {from_coverage}, "
                           f"at least {MIN_BATCH} -> {batch}"),
            "patch_size": f"inherited from 3d_fullres ({_fmt(full.patch_size)}): the same store serves both",
            "preset": ("lean: for CPUs and small time budgets. Measured on hippocampus (2 CPU cores): nnU-Net's default "
                       "32..320 recipe reached Dice 0.16 after 30 CPU-minutes, a 16..128 net reached 0.84 in 15"),
        },
    )


def _check_matches(fingerprint: Fingerprint, dataset: Dataset) -> None:
    problems = []
    if fingerprint.dataset_name != dataset.name:
        problems.append(f"dataset name {fingerprint.dataset_name!r} != {dataset.name!r}")
    if list(fingerprint.channels) != list(dataset.channels):
        problems.append(f"channels {fingerprint.channels} != {list(dataset.channels)}")
    if list(fingerprint.label_values) != sorted(dataset.labels):
        problems.append(f"label values {fingerprint.label_values} != {sorted(dataset.labels)}")
    if sorted(c.case_id for c in fingerprint.cases) != sorted(dataset.case_ids):
        problems.append(f"{len(fingerprint.cases)} fingerprinted cases vs {len(dataset.cases)} in the dataset")
    if problems:
        raise BadInputError("the fingerprint is not of this dataset (" + "; ".join(problems)
                            + "): re-run `segpipe fingerprint`")


# ------------------------------------------------------------------ explanation


FIELD_ORDER = ("previous_stage", "data_identifier", "preset", "spacing", "median_shape", "patch_size", "batch_size", "strides",
               "kernel_sizes", "features_per_stage", "n_conv_per_stage", "normalization_schemes",
               "use_mask_for_norm", "image_order", "label_order", "order_z", "anisotropy_threshold")


def explain_plans(plans: Plans) -> str:
    """Every planned value with the rule and numbers behind it, as `segpipe plan --explain` prints."""
    store = [RAS_NAMES[a] for a in plans.transpose_forward]
    lines = [f"Plans for {plans.dataset_name} (memory budget {plans.gpu_memory_gb:g} GB, "
             f"fingerprint {plans.fingerprint_hash})",
             f"  store axes: {', '.join(store)}  (transpose_forward {plans.transpose_forward})"]
    for key, text in plans.explanations.items():
        lines.append(f"  {key}: {text}")
    for name in plans.configurations:
        conf = plans.configuration(name)
        own = plans.configurations[name]
        header = f"\n{name}"
        if own.inherits_from:
            header += f" (inherits {own.inherits_from}; changes {', '.join(_changed_fields(own))})"
        lines.append(header)
        for fname in FIELD_ORDER:
            value = getattr(conf, fname)
            if value is None:
                continue
            lines.append(f"  {fname} = {_fmt(value) if isinstance(value, list) else value}")
            why = conf.explanations.get(fname)
            if why:
                lines.append(f"      why: {why}")
    return "\n".join(lines)


def _changed_fields(conf: ConfigurationPlan) -> list[str]:
    return [f for f in FIELD_ORDER if getattr(conf, f) is not None and f != "data_identifier"]
