"""Packed datasets: .npy shards read memory-mapped, identical to the data they were packed from."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ferkit.cli import cli
from ferkit.config import TrainConfig
from ferkit.data import load_dataset
from ferkit.data.packed import ShardWriter
from ferkit.errors import FerkitError
from ferkit.runs import read_history
from ferkit.training import train


def _pack(source, out, shard_size):
    result = CliRunner().invoke(cli, ["pack", str(source), str(out), "--shard-size", str(shard_size)])
    assert result.exit_code == 0, result.output
    return out


def test_a_packed_dataset_reads_back_as_the_faces_it_was_packed_from(pattern_data, tmp_path):
    original = load_dataset(pattern_data / "train")
    packed = load_dataset(_pack(pattern_data / "train", tmp_path / "packed", 25))
    assert len(json.loads((tmp_path / "packed" / "ferkit-faces.json").read_text())["shards"]) == -(-len(original) // 25)
    assert not isinstance(packed.images, np.ndarray) or isinstance(packed.images, np.memmap)  # left on disk
    assert packed.classes == original.classes and np.array_equal(packed.labels, original.labels)
    assert np.array_equal(np.asarray(packed.images), original.images)
    rows = np.random.default_rng(0).permutation(len(original))[:40]
    assert np.array_equal(packed.images[rows], original.images[rows])
    # indexed as numpy indexes: from the end, by a mask, out of range refused
    for index in (-1, [-3, 0, -len(original)], original.labels == 2, slice(-5, None)):
        assert np.array_equal(packed.images[index], original.images[index])
    with pytest.raises(IndexError):
        packed.images[[len(original)]]
    # asked for in another class order, the labels follow the names
    reordered = load_dataset(tmp_path / "packed", classes=list(reversed(original.classes)))
    names = [reordered.classes[i] for i in reordered.labels]
    assert names == [original.classes[i] for i in original.labels]


def test_a_class_beyond_the_seven_is_packed_when_named(tmp_path):
    from conftest import write_pattern_dataset

    write_pattern_dataset(tmp_path / "faces", 3, folder_names=["happy", "sad", "smirk"])
    refused = CliRunner().invoke(cli, ["pack", str(tmp_path / "faces"), str(tmp_path / "p")])
    assert refused.exit_code == 2 and "smirk" in refused.output and "--classes keeps others" in refused.output
    twice = CliRunner().invoke(cli, ["pack", str(tmp_path / "faces"), str(tmp_path / "p"), "--classes", "happy,sad,smirk,sad"])
    assert twice.exit_code == 2 and "name sad more than once" in twice.output and not (tmp_path / "p").exists()
    classes = "angry,disgust,fear,happy,neutral,sad,surprise,smirk"
    packed = CliRunner().invoke(cli, ["pack", str(tmp_path / "faces"), str(tmp_path / "p"), "--classes", classes])
    assert packed.exit_code == 0, packed.output
    dataset = load_dataset(tmp_path / "p")
    assert dataset.classes[-1] == "smirk" and dataset.class_counts()["smirk"] == 3 and len(dataset) == 9


def test_packed_faces_give_the_batches_their_folder_gives(pattern_data, tmp_path):
    from ferkit.data.batches import face_batches
    from ferkit.images import faces_to_batch

    original = load_dataset(pattern_data / "train")
    packed = load_dataset(_pack(pattern_data / "train", tmp_path / "packed", 30))
    options = dict(batch_size=16, to_input=lambda f: faces_to_batch(f, 1), seed=5, first_epoch=2)
    a, b = face_batches(original.images, original.labels, **options), face_batches(packed.images, packed.labels, **options)
    assert len(a) == len(b) == -(-len(original) // 16)
    for index in range(len(a)):
        for x, y in zip(a[index], b[index]):
            assert np.array_equal(x, y)


def test_training_reads_packed_shards_as_one_dataset(pattern_data, tmp_path):
    common = dict(val=str(pattern_data / "val"), epochs=2, batch_size=16, augment=["flip"], seed=3)
    runs = []
    for shard_size in (1000, 30):  # one shard (a memory map), several (read across their borders)
        packed = _pack(pattern_data / "train", tmp_path / f"packed-{shard_size}", shard_size)
        runs.append(read_history(train(TrainConfig(data=str(packed), out=str(tmp_path / f"run-{shard_size}"), **common),
                                       verbose=0) / "history.csv"))
    assert runs[0]["val_accuracy"] == runs[1]["val_accuracy"] and runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-6)
    assert runs[0]["val_accuracy"][-1] > 2 / 7  # it learns (chance is 1/7)


def test_damaged_or_mismatched_packed_datasets_are_one_line_errors(pattern_data, tmp_path):
    packed = _pack(pattern_data / "train", tmp_path / "packed", 1000)
    with pytest.raises(FerkitError, match="holds 48x48 faces"):
        load_dataset(packed, image_size=(64, 64))
    np.save(packed / "labels-00000.npy", np.zeros(3, np.int64))
    with pytest.raises(FerkitError, match="do not match"):
        load_dataset(packed)
    (packed / "ferkit-faces.json").write_text("{not json")
    with pytest.raises(FerkitError, match="not a readable packed dataset"):
        load_dataset(packed)
    with pytest.raises(FerkitError, match="not empty"):
        ShardWriter(packed, ["a"], (48, 48))
    with pytest.raises(FerkitError, match="at least 1 face"):
        ShardWriter(tmp_path / "none", ["a"], (48, 48), shard_size=0)  # would write empty shards for ever
    assert not (tmp_path / "none").exists()
    result = CliRunner().invoke(cli, ["pack", str(pattern_data / "train"), str(packed)])
    assert result.exit_code == 2 and "not empty" in result.output
    for size in ("0", "-3", "5000"):  # no face of no pixels, nor gigabytes of a blown-up one
        result = CliRunner().invoke(cli, ["pack", str(pattern_data / "train"), str(tmp_path / "sized"), "--image-size", size])
        assert result.exit_code == 2 and "--image-size" in result.output and not (tmp_path / "sized").exists()


def test_a_packed_dataset_is_replaced_only_with_overwrite_and_other_folders_never(pattern_data, tmp_path):
    from ferkit.data.packed import pack_dataset

    packed = _pack(pattern_data / "train", tmp_path / "packed", 7)
    (packed / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["pack", str(pattern_data / "val"), str(packed), "--shard-size", "1000", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in packed.iterdir()) == ["faces-00000.npy", "ferkit-faces.json", "labels-00000.npy", "notes.txt"]
    assert np.array_equal(np.asarray(load_dataset(packed).images), load_dataset(pattern_data / "val").images)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"x")
    result = CliRunner().invoke(cli, ["pack", str(pattern_data / "val"), str(mine), "--overwrite"])
    assert result.exit_code == 2 and "not a packed dataset" in result.output
    assert [p.name for p in mine.iterdir()] == ["photo.jpg"]
    with pytest.raises(FerkitError, match="being read"):
        pack_dataset(packed, packed, overwrite=True)
    data = shutil.copytree(pattern_data / "val", tmp_path / "data")
    result = CliRunner().invoke(cli, ["pack", str(data), str(data / "packed")])
    assert result.exit_code == 2 and f"{data / 'packed'} lies inside the data folder {data}" in result.output
    assert not (data / "packed").exists()
    # a pack stopped before its index was written: named as such, and replaced with --overwrite
    stopped = _pack(pattern_data / "train", tmp_path / "stopped", 30)
    (stopped / "ferkit-faces.json").unlink()
    result = CliRunner().invoke(cli, ["pack", str(pattern_data / "val"), str(stopped)])
    assert result.exit_code == 2 and "stopped before its end" in result.output
    for command in (["pack", str(stopped), str(tmp_path / "elsewhere")], ["evaluate", "--data", str(stopped)]):
        result = CliRunner().invoke(cli, command)  # given as the data: said to be unfinished, not "no class folders"
        assert result.exit_code == 2 and f"{stopped} holds a packed dataset stopped before its end" in result.output
    result = CliRunner().invoke(cli, ["pack", str(pattern_data / "val"), str(stopped), "--shard-size", "1000", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in stopped.iterdir()) == ["faces-00000.npy", "ferkit-faces.json", "labels-00000.npy"]
    # the Python API takes a path as readily as a dataset
    again = pack_dataset(pattern_data / "val", tmp_path / "again")
    assert np.array_equal(np.asarray(load_dataset(again).images), load_dataset(pattern_data / "val").images)


def test_in_a_data_parallel_job_each_process_reads_only_its_own_shards(pattern_data, tmp_path):
    from ferkit.data.batches import face_batches, faces_per_epoch

    packed_path = _pack(pattern_data / "train", tmp_path / "packed", 30)  # 140 faces: shards of 30, 30, 30, 30, 20
    packed = load_dataset(packed_path)
    shards = packed.images.num_shards
    owner = np.repeat(np.arange(shards) % 2, np.diff(packed.images.offsets))  # shard s belongs to process s mod 2
    rows = np.arange(len(packed))  # as targets, each batch's targets name its rows

    def epoch_rows(images, process):
        batches = face_batches(images, rows, batch_size=16, to_input=lambda f: f, seed=4, num_processes=2,
                               process_id=process, drop_remainder=True, own_shards=True)
        seen = []
        for index in range(len(batches)):
            faces, targets, weights = batches[index]
            assert len(targets) == 8 and np.array_equal(faces, np.asarray(packed.images[targets]))
            seen.append(targets)
        return np.concatenate(seen), len(batches)

    first, count_first = epoch_rows(packed.images, 0)
    second, count_second = epoch_rows(packed.images, 1)
    assert count_first == count_second == faces_per_epoch(packed.images, 16, 2) // 16  # the smallest group sets the pace
    assert set(owner[first]) == {0} and set(owner[second]) == {1}  # each reads its own shards
    assert len(set(first)) == len(first) and len(set(second)) == len(second)  # no face twice in an epoch
    # a machine holding only process 0's shard files trains process 0 all the same
    for shard in range(1, shards, 2):
        (packed_path / f"faces-{shard:05d}.npy").unlink()
    alone, _ = epoch_rows(load_dataset(packed_path).images, 0)
    assert np.array_equal(alone, first)
    with pytest.raises(FerkitError, match="cannot read the shard"):
        epoch_rows(load_dataset(packed_path).images, 1)


def test_a_pack_needed_at_another_size_names_what_to_pack_again(pattern_data, tmp_path):
    packed = _pack(pattern_data / "val", tmp_path / "packed", 1000)
    result = CliRunner().invoke(cli, ["pack", str(packed), str(tmp_path / "larger"), "--image-size", "64"])
    assert result.exit_code == 2, result.output
    assert f"holds 48x48 faces; this needs 64x64 (ferkit pack {pattern_data / 'val'} NEW_FOLDER --image-size 64)" in result.output
    pixels = " ".join(["128"] * 2304)
    (tmp_path / "private.csv").write_text("emotion,pixels,Usage\n" + "".join(f"{c},{pixels},PrivateTest\n" for c in range(7)))
    CliRunner().invoke(cli, ["pack", str(tmp_path / "private.csv"), str(tmp_path / "rows"), "--usage", "all"])
    advice = CliRunner().invoke(cli, ["pack", str(tmp_path / "rows"), str(tmp_path / "rows64"), "--image-size", "64"])
    command = advice.output.split("(", 1)[1].rsplit(")", 1)[0]
    assert command.endswith("--image-size 64 --usage all")  # the rows it was packed from, as packed
    followed = CliRunner().invoke(cli, command.replace("NEW_FOLDER", str(tmp_path / "rows64")).split()[1:])
    assert followed.exit_code == 0 and "packed 7 faces" in followed.output, followed.output


def test_a_teacher_scores_a_packed_dataset_of_several_shards_as_its_folder(pattern_data, trained_run, tmp_path):
    from ferkit.teacher import load_teacher_probabilities, teacher_probabilities

    packed = _pack(pattern_data / "train", tmp_path / "packed", 30)
    assert len(list(packed.glob("faces-*.npy"))) > 1
    result = CliRunner().invoke(cli, ["teacher", str(trained_run), "--data", str(packed), "--tta", "flip",
                                      "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    faces = load_dataset(packed)
    from_folder = teacher_probabilities(str(trained_run), load_dataset(pattern_data / "train"))
    assert np.allclose(load_teacher_probabilities(tmp_path / "t.npz", faces), from_folder, atol=1e-6)
    assert np.allclose(teacher_probabilities(str(trained_run), faces), from_folder, atol=1e-6)


def test_a_data_parallel_job_warns_when_its_processes_shards_lack_classes_or_leave_faces_out(pattern_data, tmp_path, caplog):
    from ferkit.distributed import Topology
    from ferkit.training_data import train_size

    import logging

    packed = load_dataset(_pack(pattern_data / "train", tmp_path / "packed", 30))  # class by class: 30, 30, 30, 30, 20
    one_shard = load_dataset(_pack(pattern_data / "train", tmp_path / "one", 1000))
    logging.getLogger("ferkit").propagate = True  # as in Python; the CLI, which packed them, stops it (conftest restores it)
    config = TrainConfig(data=str(packed.source), batch_size=16)
    with caplog.at_level("WARNING", logger="ferkit"):
        size = train_size(config, packed, Topology("127.0.0.1:1234", 2, 0))
    assert size == 112  # the smaller group, 60 faces, sets the pace: 7 global batches
    assert "process 0 of the job reads no faces of fear, sad in its shards" in caplog.text
    assert "process 1 of the job reads no faces of angry, happy, surprise in its shards" in caplog.text
    assert "each epoch trains on 112 of the 140 faces" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ferkit"):
        train_size(config, one_shard, Topology("127.0.0.1:1234", 2, 0))
    assert caplog.text == ""  # one shard: every process reads every face


def test_a_shuffled_pack_holds_the_same_faces_in_a_seeded_order_that_gives_every_process_every_class(pattern_data, tmp_path, caplog):
    from ferkit.distributed import Topology
    from ferkit.training_data import train_size

    import logging

    def pack(out, *options):
        result = CliRunner().invoke(cli, ["pack", str(pattern_data / "train"), str(out), "--shard-size", "30", *options])
        assert result.exit_code == 0, result.output
        return result.output, load_dataset(out)

    original = load_dataset(pattern_data / "train")
    said, shuffled = pack(tmp_path / "shuffled", "--shuffle")
    assert "shuffled with seed 0" in said
    assert json.loads((tmp_path / "shuffled" / "ferkit-faces.json").read_text())["shuffled"] == {"seed": 0}
    faces = np.asarray(shuffled.images)
    assert not np.array_equal(shuffled.labels, original.labels)  # another order...
    key = lambda images, labels: sorted(zip((face.tobytes() for face in images), labels.tolist()))
    assert key(faces, shuffled.labels) == key(original.images, original.labels)  # ...of the same faces and labels
    _, again = pack(tmp_path / "again", "--shuffle")
    assert np.array_equal(np.asarray(again.images), faces) and np.array_equal(again.labels, shuffled.labels)
    _, other = pack(tmp_path / "other", "--shuffle", "--seed", "7")
    assert not np.array_equal(other.labels, shuffled.labels)
    logging.getLogger("ferkit").propagate = True  # the CLI stops it (conftest restores it)
    with caplog.at_level("WARNING", logger="ferkit"):
        train_size(TrainConfig(data=str(shuffled.source), batch_size=16), shuffled, Topology("127.0.0.1:1234", 2, 0))
    assert "reads no faces of" not in caplog.text  # class by class, process 1 had no angry, happy or surprise faces
