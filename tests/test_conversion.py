"""Getting data in: Decathlon tarballs are unpacked safely and the two raw layouts convert both ways."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.dataset import LAYOUT_MSD, LAYOUT_NNUNET, load_dataset, read_case


@pytest.fixture
def small_msd(hippocampus, tmp_path):
    """Three real hippocampus cases as a Decathlon task folder."""
    src = load_dataset(hippocampus)
    task = tmp_path / "Task04_Hippocampus"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    meta = dict(src.raw_json, training=[], numTraining=3)
    for case in src.cases[:3]:
        name = f"{case.case_id}.nii.gz"
        shutil.copyfile(case.images[0], task / "imagesTr" / name)
        shutil.copyfile(case.label, task / "labelsTr" / name)
        meta["training"].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_msd_and_nnunet_layouts_convert_both_ways_without_changing_voxels(small_msd, tmp_path):
    assert main(["convert", str(small_msd), str(tmp_path / "v2"), "--to", "nnunetv2"]) == 0
    v2 = load_dataset(tmp_path / "v2")
    assert v2.layout == LAYOUT_NNUNET and v2.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert main(["convert", str(tmp_path / "v2"), str(tmp_path / "back"), "--to", "msd"]) == 0
    back = load_dataset(tmp_path / "back")
    assert back.layout == LAYOUT_MSD and back.case_ids == load_dataset(small_msd).case_ids
    for cid in back.case_ids:
        a, b = read_case(load_dataset(small_msd), cid), read_case(back, cid)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_import_msd_unpacks_a_tarball_skipping_macos_forks(small_msd, tmp_path):
    archive = tmp_path / "Task04_Hippocampus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(small_msd, arcname="Task04_Hippocampus")
        fork = tarfile.TarInfo("Task04_Hippocampus/imagesTr/._hippocampus_003.nii.gz")
        fork.size = 4
        tar.addfile(fork, io.BytesIO(b"junk"))
    dest = tmp_path / "data"
    assert main(["import-msd", str(archive), "--dest", str(dest)]) == 0
    imported = load_dataset(dest / "Task04_Hippocampus")
    assert len(imported.cases) == 3
    assert not list((dest / "Task04_Hippocampus" / "imagesTr").glob("._*"))


def test_import_msd_refuses_members_escaping_the_destination(tmp_path, capsys):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        evil = tarfile.TarInfo("../../escaped.txt")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    assert main(["import-msd", str(archive), "--dest", str(tmp_path / "data")]) == 2
    assert not (tmp_path / "escaped.txt").exists()
    assert "evil.tar" in capsys.readouterr().err
