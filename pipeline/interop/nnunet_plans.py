"""nnU-Net v2's `plans.json` + `dataset.json` <-> our `Plans`, for the configurations that map one to one.

What maps: nnU-Net's default trainer family (`nnUNetTrainer` and its `_Nepochs` variants: they change
training length only) with `PlainConvUNet` (conv with bias -> InstanceNorm(eps 1e-5, affine) -> LeakyReLU
0.01, no dropout, the same number of convolutions in every stage), `DefaultPreprocessor`, Z-score / CT / no
normalisation, `resample_data_or_seg_to_shape` with nnU-Net's automatic separate-z rule. Everything
else is refused naming the field, never approximated: a model that predicts differently here than
in nnU-Net is worse than no model. ResEnc (`ResidualEncoderUNet`) is refused: its encoder has a stem
and residual blocks with projection shortcuts, which our PlainConvUNet does not have.

Axis order: nnU-Net plans are in the SimpleITK array order of the files, (z, y, x) = the NIfTI voxel
axes reversed; ours are in the RAS frame. For files stored in R/L, A/P, S/I voxel order (the usual
NIfTI layout; flips allowed) both frames are the same axes, so nnU-Net axis a is our RAS axis 2 - a and
nnU-Net's `transpose_forward` t becomes ours [2 - t_i], giving the same store axis order as nnU-Net's.
"""

from __future__ import annotations

import re

from pipeline.data.labels import LabelDeclaration, parse_nnunet_labels
from pipeline.errors import BadInputError, Problem
from pipeline.planning.plans import ChannelNormalization, ConfigurationPlan, Plans

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: its automatic separate-z rule (force_separate_z null)
TRAINER = re.compile(r"^nnUNetTrainer(_\d+epochs?)?$")  # the default trainer and its training-length variants
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
RESAMPLING = "resample_data_or_seg_to_shape"
SCHEMES = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "NoNormalization": "none"}
_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
_NORM = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}
_LEAKY_RELU = ("torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU")


def check_trainer(name: str, where: str) -> None:
    if not TRAINER.match(str(name)):
        raise BadInputError(f"{where}: trainer {name!r} is not supported: only nnU-Net's default nnUNetTrainer "
                            "(and its nnUNetTrainer_<N>epochs variants) map one to one onto seg-pipeline; other "
                            "trainers may change the network, its inputs or test-time mirroring")


def resolved_configuration(plans: dict, name: str, where: str) -> dict:
    """nnU-Net's configuration `name` with its `inherits_from` chain merged (child keys win)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        have = ", ".join(configs) if isinstance(configs, dict) else "none"
        raise BadInputError(f"{where}: plans.json has no configuration {name!r} (has {have})")
    chain, current = [], name
    while current is not None:
        if current in (c for c, _ in chain) or current not in configs:
            raise BadInputError(f"{where}: configuration {name!r} inherits from {current!r}, which is missing or loops")
        chain.append((current, configs[current]))
        current = configs[current].get("inherits_from")
    merged: dict = {}
    for _, conf in reversed(chain):
        merged.update(conf)
    return merged


def _architecture(conf: dict, dims: int, where: str) -> tuple[list[int], list[list[int]], list[list[int]], int]:
    """(features, kernel sizes, strides, convolutions per stage) of a PlainConvUNet, or BadInputError saying why not."""
    arch = conf.get("architecture") or {}
    cls = arch.get("network_class_name")
    kw = arch.get("arch_kwargs") or {}
    if cls == RESENC_UNET:
        raise BadInputError(f"{where}: architecture ResidualEncoderUNet (nnU-Net's ResEnc presets) is not supported: its "
                            "encoder has a stem and residual blocks with 1x1 projection shortcuts, which seg-pipeline's "
                            "PlainConvUNet does not have; only PlainConvUNet models (nnUNetPlans) can be imported")
    if cls != PLAIN_UNET:
        raise BadInputError(f"{where}: architecture {cls!r} is not supported (only {PLAIN_UNET})")
    problems = []
    expect = {"conv_op": _CONV[dims], "norm_op": _NORM[dims], "dropout_op": None, "conv_bias": True}
    problems += [f"{k} is {kw.get(k)!r}, expected {v!r}" for k, v in expect.items() if kw.get(k) != v]
    norm_kwargs = kw.get("norm_op_kwargs") or {}
    if float(norm_kwargs.get("eps", 1e-5)) != 1e-5 or norm_kwargs.get("affine") is not True:
        problems.append(f"norm_op_kwargs is {norm_kwargs!r}, expected eps 1e-05 and affine true")
    nonlin_kwargs = dict(kw.get("nonlin_kwargs") or {})
    nonlin_kwargs.pop("inplace", None)
    if kw.get("nonlin") not in _LEAKY_RELU or set(nonlin_kwargs) - {"negative_slope"} \
            or float(nonlin_kwargs.get("negative_slope", 0.01)) != 0.01:
        problems.append(f"nonlinearity {kw.get('nonlin')!r} {kw.get('nonlin_kwargs')!r}, expected LeakyReLU(0.01)")
    features, kernels, strides = kw.get("features_per_stage"), kw.get("kernel_sizes"), kw.get("strides")
    n_stages = kw.get("n_stages")
    if not (isinstance(features, list) and isinstance(kernels, list) and isinstance(strides, list)
            and len(features) == len(kernels) == len(strides) == n_stages):
        problems.append("features_per_stage, kernel_sizes and strides need n_stages entries each")
    n_conv, n_dec = kw.get("n_conv_per_stage"), kw.get("n_conv_per_stage_decoder")
    n_conv = [n_conv] * (n_stages or 0) if isinstance(n_conv, int) else n_conv
    n_dec = [n_dec] * max((n_stages or 1) - 1, 0) if isinstance(n_dec, int) else n_dec
    if not (isinstance(n_conv, list) and isinstance(n_dec, list) and len(set(n_conv) | set(n_dec)) == 1):
        problems.append(f"n_conv_per_stage {kw.get('n_conv_per_stage')} / n_conv_per_stage_decoder "
                        f"{kw.get('n_conv_per_stage_decoder')} differ between stages; seg-pipeline's U-Net uses one count")
    extra = set(kw) - {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                       "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                       "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision"}
    if extra:
        problems.append(f"unknown architecture arguments {sorted(extra)}")
    if problems:
        raise BadInputError([f"{where}: PlainConvUNet does not map one to one: {p}" for p in problems]
                            if len(problems) > 1 else f"{where}: PlainConvUNet does not map one to one: {problems[0]}")
    return list(features), [list(k) for k in kernels], [list(s) for s in strides], int(n_conv[0])


def _resampling(conf: dict, where: str) -> tuple[int, int, int]:
    """(image order, label order, order along a separate z axis) of nnU-Net's default resampling."""
    data, seg = conf.get("resampling_fn_data_kwargs") or {}, conf.get("resampling_fn_seg_kwargs") or {}
    problems = [f"{k} is {conf.get(k)!r}" for k in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")
                if conf.get(k, RESAMPLING) != RESAMPLING]
    problems += [f"{name}.force_separate_z is {kw.get('force_separate_z')!r}" for name, kw in (("data", data), ("seg", seg))
                 if kw.get("force_separate_z") is not None]
    if data.get("order_z", 0) != seg.get("order_z", 0):
        problems.append(f"order_z differs between images ({data.get('order_z')}) and labels ({seg.get('order_z')})")
    prob = conf.get("resampling_fn_probabilities_kwargs") or {}
    if prob.get("order", 1) != 1 or prob.get("order_z", 0) != data.get("order_z", 0):
        problems.append(f"probabilities are resampled with {prob!r}; seg-pipeline uses order 1")
    if conf.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        problems.append(f"preprocessor {conf.get('preprocessor_name')!r}")
    if problems:
        raise BadInputError(f"{where}: preprocessing does not map one to one onto seg-pipeline's: {'; '.join(problems)}")
    return int(data.get("order", 3)), int(seg.get("order", 1)), int(data.get("order_z", 0))


def _labels(dataset_json: dict, where: str) -> LabelDeclaration:
    """nnU-Net v2's labels by its own rules (`data.labels.parse_nnunet_labels`): classes, regions with
    `regions_class_order` (sigmoid outputs), the ignore label; values 0..K-1 as nnU-Net v2 requires."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise BadInputError(f"{where}: dataset.json has no labels")
    problems: list[Problem] = []
    declared = parse_nnunet_labels(labels, dataset_json.get("regions_class_order"), problems)
    if problems:
        raise BadInputError(f"{where}: dataset.json labels: {'; '.join(p.message for p in problems)}")
    values = sorted(declared.names)
    if values != list(range(len(values))):
        raise BadInputError(f"{where}: label values {values} are not 0..{len(values) - 1}, which nnU-Net v2 requires")
    return declared


def _channels(dataset_json: dict, where: str) -> list[str]:
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(names, dict) or sorted(names, key=int) != [str(i) for i in range(len(names))]:
        raise BadInputError(f"{where}: dataset.json needs channel_names {{'0': ..., '1': ...}}")
    return [str(names[str(i)]) for i in range(len(names))]


def plans_from_nnunet(plans: dict, dataset_json: dict, configuration: str, where: str) -> Plans:
    """Our `Plans` (one configuration, named as nnU-Net's) for nnU-Net's plans + dataset.json."""
    conf = resolved_configuration(plans, configuration, where)
    if conf.get("previous_stage") or configuration.startswith("3d_cascade"):
        raise BadInputError(f"{where}: configuration {configuration!r} is a cascade stage (it takes the previous "
                            "stage's segmentation as input), which is not imported")
    patch = conf.get("patch_size")
    dims = len(patch) if isinstance(patch, list) else 0
    if dims not in (2, 3):
        raise BadInputError(f"{where}: configuration {configuration!r} has patch size {patch!r}")
    features, kernels, strides, n_conv = _architecture(conf, dims, where)
    image_order, label_order, order_z = _resampling(conf, where)
    channels = _channels(dataset_json, where)
    labels = _labels(dataset_json, where)
    schemes_n = conf.get("normalization_schemes") or []
    masks = conf.get("use_mask_for_norm") or []
    if len(schemes_n) != len(channels) or len(masks) != len(channels):
        raise BadInputError(f"{where}: normalization_schemes / use_mask_for_norm need one entry per channel ({len(channels)})")
    unknown = [s for s in schemes_n if s not in SCHEMES]
    if unknown:
        raise BadInputError(f"{where}: normalisation {unknown} is not supported (known: {', '.join(SCHEMES)})")
    intensity = plans.get("foreground_intensity_properties_per_channel") or {}
    normalization = []
    for c, (scheme, mask) in enumerate(zip(schemes_n, masks)):
        ours = SCHEMES[scheme]
        norm = ChannelNormalization(scheme=ours, use_nonzero_mask=bool(mask))
        if ours == "ct":
            props = intensity.get(str(c)) or {}
            try:
                norm = ChannelNormalization("ct", bool(mask), float(props["mean"]), float(props["std"]),
                                            float(props["percentile_00_5"]), float(props["percentile_99_5"]))
            except (KeyError, TypeError, ValueError):
                raise BadInputError(f"{where}: channel {c} uses CT normalisation but plans.json lacks its "
                                    "foreground_intensity_properties_per_channel") from None
        normalization.append(norm)
    transpose = plans.get("transpose_forward")
    if sorted(transpose or []) != [0, 1, 2]:
        raise BadInputError(f"{where}: transpose_forward {transpose!r} is not a permutation of 0, 1, 2")
    median = conf.get("median_image_size_in_voxels") or patch
    note = f"imported from nnU-Net v2 ({plans.get('plans_name', 'plans')}, configuration {configuration})"
    config = ConfigurationPlan(
        name=configuration, data_identifier=str(conf.get("data_identifier") or configuration),
        spacing=[float(s) for s in conf["spacing"]], patch_size=[int(p) for p in patch],
        batch_size=int(conf.get("batch_size", 2)), median_shape=[max(1, round(float(m))) for m in median],
        kernel_sizes=kernels, strides=strides, features_per_stage=features, n_conv_per_stage=n_conv,
        normalization_schemes=[n.scheme for n in normalization], use_mask_for_norm=[bool(m) for m in masks],
        image_order=image_order, label_order=label_order, order_z=order_z, anisotropy_threshold=ANISOTROPY_THRESHOLD,
        preset="nnunet", batch_dice=bool(conf.get("batch_dice", False)), explanations={"preset": note})
    ours = Plans(dataset_name=str(dataset_json.get("name") or plans.get("dataset_name") or "dataset"),
                 channels=channels, labels={str(v): name for v, name in sorted(labels.names.items())},
                 regions=[{"name": r.name, "values": list(r.values)} for r in labels.regions],
                 regions_class_order=list(labels.regions_class_order), ignore_label=labels.ignore_value,
                 transpose_forward=[2 - int(t) for t in transpose],
                 normalization=normalization, configurations={configuration: config},
                 explanations={"transpose_forward": "nnU-Net's transpose_forward over the SimpleITK axes (z, y, x), "
                                                    "as RAS axes: 2 - t", "source": note})
    return Plans.from_json(ours.to_json(), where)  # checked against our schema like any plans.json


def nnunet_from_plans(plans: Plans, configuration: str, dataset_name: str) -> tuple[dict, dict]:
    """nnU-Net's (plans.json, dataset.json) for one of our configurations (BadInputError where it does not map)."""
    where = f"configuration {configuration}"
    conf = plans.configuration(configuration)
    dims = conf.dims
    problems = []
    if (conf.anisotropy_threshold or ANISOTROPY_THRESHOLD) != ANISOTROPY_THRESHOLD:
        problems.append(f"anisotropy_threshold {conf.anisotropy_threshold} (nnU-Net's is fixed at {ANISOTROPY_THRESHOLD})")
    values = list(plans.label_values)
    if values != list(range(len(values))):
        problems.append(f"label values {values} are not 0..{len(values) - 1}, which nnU-Net v2 requires")
    if problems:
        raise BadInputError(f"{where} does not map one to one onto nnU-Net: {'; '.join(problems)}")
    inverse = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "none": "NoNormalization"}
    schemes = conf.normalization_schemes or [n.scheme for n in plans.normalization]
    masks = conf.use_mask_for_norm or [n.use_nonzero_mask for n in plans.normalization]
    tf = [2 - t for t in plans.transpose_forward]
    resampling = {"is_seg": False, "order": conf.image_order if conf.image_order is not None else 3,
                  "order_z": conf.order_z or 0, "force_separate_z": None}
    arch = {"n_stages": conf.num_stages, "features_per_stage": conf.features_per_stage, "conv_op": _CONV[dims],
            "kernel_sizes": conf.kernel_sizes, "strides": conf.strides,
            "n_conv_per_stage": [conf.n_conv_per_stage or 2] * conf.num_stages,
            "n_conv_per_stage_decoder": [conf.n_conv_per_stage or 2] * (conf.num_stages - 1), "conv_bias": True,
            "norm_op": _NORM[dims], "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    nnunet_conf = {
        "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": conf.batch_size, "patch_size": conf.patch_size,
        "median_image_size_in_voxels": conf.median_shape or conf.patch_size, "spacing": conf.spacing,
        "normalization_schemes": [inverse[s] for s in schemes], "use_mask_for_norm": list(masks),
        "resampling_fn_data": RESAMPLING, "resampling_fn_seg": RESAMPLING, "resampling_fn_probabilities": RESAMPLING,
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": conf.label_order if conf.label_order is not None else 1},
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {"network_class_name": PLAIN_UNET, "arch_kwargs": arch,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": bool(conf.batch_dice),
    }
    # nnU-Net's preprocessor looks every channel up here (only CT normalisation reads the values)
    intensity = {str(c): {"mean": n.mean, "std": n.std, "percentile_00_5": n.lower, "percentile_99_5": n.upper}
                 for c, n in enumerate(plans.normalization)}
    full_spacing = conf.spacing if dims == 3 else [1.0, *conf.spacing]
    nnunet_plans = {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": full_spacing,
        "original_median_shape_after_transp": conf.median_shape if dims == 3 else [1, *(conf.median_shape or conf.patch_size)],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": tf,
        "transpose_backward": [tf.index(i) for i in range(3)], "configurations": {configuration: nnunet_conf},
        "experiment_planner_used": "seg-pipeline", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity,
    }
    dataset_json = {"channel_names": {str(i): c for i, c in enumerate(plans.channels)},
                    "labels": nnunet_labels(plans), "numTraining": 0, "file_ending": ".nii.gz",
                    "name": plans.dataset_name}
    if plans.regions:
        dataset_json["regions_class_order"] = list(plans.regions_class_order)
    return nnunet_plans, dataset_json


def nnunet_labels(plans: Plans) -> dict:
    """dataset.json's `labels` for our plans: {name: value} classes, or background, {name: [values]} per region
    (in order) and `ignore`."""
    if not plans.regions:
        return {("background" if int(v) == 0 else ("ignore" if int(v) == plans.ignore_label else name)): int(v)
                for v, name in plans.labels.items()}
    labels: dict = {"background": 0}
    labels.update({r["name"]: [int(v) for v in r["values"]] for r in plans.regions})
    if plans.ignore_label is not None:
        labels["ignore"] = int(plans.ignore_label)
    return labels
