"""Synthetic source, COCO loading, transforms and the grain pipeline (batch format, box-slot
buckets, resume)."""

import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from dfrdet_jax import data
from dfrdet_jax.data import box_slots, transforms
from dfrdet_jax.data.fixtures import write_coco_fixture
from dfrdet_jax.data.sources import coco

CATS = [{"id": 3, "name": "car"}, {"id": 7, "name": "ship"}, {"id": 5, "name": "person"}]


def _aitod_like(tmp_path, sizes=((64, 96), (80, 80), (128, 64)), per_image=3):
    """AI-TOD-layout fixture; returns (config, {image_id: (xyxy boxes, class index)})."""
    rng = np.random.default_rng(1)
    images, anns, truth = [], [], {}
    for i, (h, w) in enumerate(sizes, start=10):
        images.append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
        boxes, labels = [], []
        for _ in range(per_image):
            bw, bh = rng.uniform(1, 12, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = CATS[rng.integers(3)]["id"]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            boxes.append([x, y, x + bw, y + bh])
            labels.append([3, 5, 7].index(cat))
        truth[i] = (np.array(boxes, np.float32), np.array(labels))
    root = tmp_path / "aitod"
    write_coco_fixture(
        str(root),
        images,
        CATS,
        anns,
        ann_name="annotations/aitod_train_v1.json",
        image_dir="images/train",
    )
    write_coco_fixture(
        str(root),
        images,
        CATS,
        anns,
        ann_name="annotations/aitod_val_v1.json",
        image_dir="images/val",
    )
    config = data.default_data_config("aitod")
    config.root = str(root)
    config.image_size = 128
    config.max_boxes = 8
    return config, truth


def test_synthetic_deterministic_keyed_and_coco(tmp_path):
    kw = {"num_train": 6, "num_val": 3, "image_size": 64, "seed": 3}
    a = data.ensure_synthetic(str(tmp_path / "a"), **kw)
    b = data.ensure_synthetic(str(tmp_path / "b"), **kw)
    with open(a["train"][0]) as fa, open(b["train"][0]) as fb:
        assert json.load(fa) == json.load(fb)
    c = data.ensure_synthetic(str(tmp_path / "a"), **{**kw, "seed": 4})
    assert c["train"][0] != a["train"][0]  # new parameters: new cache folder
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".tmp")]
    records, cat_ids, names, _ = coco.coco_records(*a["train"])
    assert len(records) == 6 and len(names) == 8 and cat_ids == list(range(1, 9))
    sizes = np.concatenate([r["boxes"][:, 2] - r["boxes"][:, 0] for r in records])
    assert sizes.min() >= 2 and sizes.max() <= 64


def test_synthetic_test_split_is_held_out_and_independent(tmp_path):
    kw = {"num_train": 4, "num_val": 3, "image_size": 64, "seed": 3}
    a = data.ensure_synthetic(str(tmp_path / "a"), num_test=5, **kw)
    b = data.ensure_synthetic(str(tmp_path / "b"), num_test=2, **kw)
    assert sorted(a) == ["test", "train", "val"]
    for split in ("train", "val"):  # the same images whatever the test split's size
        with open(a[split][0]) as fa, open(b[split][0]) as fb:
            assert json.load(fa)["annotations"] == json.load(fb)["annotations"]
    test = coco.coco_records(*a["test"])[0]
    assert len(test) == 5
    pixels = lambda path: np.asarray(Image.open(path)).tobytes()  # noqa: E731
    others = {pixels(r["path"]) for s in ("train", "val") for r in coco.coco_records(*a[s])[0]}
    assert not {pixels(r["path"]) for r in test} & others  # no image shared with train or val


def test_coco_loader_round_trips_every_box(tmp_path):
    config, truth = _aitod_like(tmp_path)
    records, info, _, report = data.load_records(config, "train")
    assert info.category_ids == [3, 5, 7] and not report.counts
    assert [r["image_id"] for r in records] == sorted(truth)
    for r in records:
        np.testing.assert_allclose(r["boxes"], truth[r["image_id"]][0], rtol=1e-6)
        np.testing.assert_array_equal(r["labels"], truth[r["image_id"]][1])


def test_resize_and_flip_move_boxes_exactly():
    image = np.zeros((50, 100, 3), np.uint8)
    boxes = np.array([[10, 5, 30, 25], [0, 0, 100, 50]], np.float32)
    resized, out, scale = transforms.resize_keep_aspect(image, boxes, 128)
    assert resized.shape == (64, 128, 3) and scale == np.float32(1.28)
    np.testing.assert_allclose(out, boxes * 1.28, rtol=1e-6)
    _flipped_image, flipped = transforms.hflip(resized, out)
    np.testing.assert_allclose(flipped[0], [128 - 38.4, 6.4, 128 - 12.8, 32.0], rtol=1e-6)
    np.testing.assert_allclose(flipped[1], [0, 0, 128, 64], rtol=1e-6)
    # The pixel under a box's left edge moves to just inside its right edge.
    marked = np.zeros((4, 8, 3), np.uint8)
    marked[1, 2] = 255
    f_img, f_box = transforms.hflip(marked, np.array([[2, 1, 3, 2]], np.float32))
    assert f_img[1, int(f_box[0, 0])].max() == 255


def test_eval_batches_cover_each_image_once_with_padding(tmp_path):
    config, truth = _aitod_like(tmp_path)
    config.min_box_slots = 2  # evaluation batches keep max_boxes slots all the same
    ds = data.build_dataset(config, "val", train=False, batch_size=2, seed=0)
    batches = list(ds.loader)
    assert len(batches) == 2
    ids = np.concatenate([b["image_id"] for b in batches])
    np.testing.assert_array_equal(ids, [10, 11, 12, -1])
    b = batches[0]
    assert b["image"].shape == (2, 128, 128, 3) and b["image"].dtype == np.uint8
    assert b["boxes"].shape == (2, 8, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].dtype == np.int32 and b["image_hw"].dtype == np.int32
    # Image 10 is 64x96: scale 128/96, valid region 85x128.
    np.testing.assert_array_equal(b["image_hw"][0], [85, 128])
    np.testing.assert_allclose(b["scale"][0], 128 / 96, rtol=1e-6)
    np.testing.assert_allclose(b["boxes"][0, :3], truth[10][0] * np.float32(128 / 96), rtol=1e-5)
    np.testing.assert_array_equal(b["labels"][0], list(truth[10][1]) + [-1] * 5)
    np.testing.assert_array_equal(b["box_valid"][0], [True] * 3 + [False] * 5)
    pad = batches[1]
    assert not pad["box_valid"][1].any() and pad["image"][1].max() == 0
    # Two shards split the padded list: together they cover every image once.
    shard_ids = [
        np.concatenate(
            [
                b["image_id"]
                for b in data.build_dataset(
                    config, "val", train=False, batch_size=1, seed=0, shard_index=k, shard_count=2
                ).loader
            ]
        )
        for k in range(2)
    ]
    assert sorted(i for s in shard_ids for i in s if i >= 0) == [10, 11, 12]
    assert len(shard_ids[0]) == len(shard_ids[1])


def test_training_shards_leave_no_image_out(tmp_path):
    # 3 images over 2 processes: one shard holds two. drop_remainder would never show image 12.
    config, _ = _aitod_like(tmp_path)
    config.min_box_slots = 2  # shards of one global batch keep max_boxes slots: one shape
    seen = []
    for k in range(2):
        ds = data.build_dataset(
            config, "train", train=True, batch_size=1, seed=0, shard_index=k, shard_count=2
        )
        it = iter(ds.loader)
        batches = [next(it) for _ in range(4)]  # two epochs of a shard
        assert {b["boxes"].shape for b in batches} == {(1, 8, 4)}
        seen.append({int(b["image_id"][0]) for b in batches})
    assert seen[0] | seen[1] == {10, 11, 12}
    assert not seen[0] & seen[1]


def test_train_flip_keeps_boxes_consistent_and_resume_is_exact(tmp_path):
    config, truth = _aitod_like(tmp_path)
    config.flip_prob = 0.5
    config.min_box_slots = 2  # buckets (2, 4, 8): 3 boxes per image -> 4 slots
    ds = data.build_dataset(config, "train", train=True, batch_size=2, seed=7)
    it = iter(ds.loader)
    seen = [next(it) for _ in range(3)]  # more than one epoch: train repeats
    state = json.loads(json.dumps(ds.get_iterator_state(it)))
    expected = [next(it) for _ in range(3)]
    fresh = data.build_dataset(config, "train", train=True, batch_size=2, seed=7)
    it2 = iter(fresh.loader)
    fresh.set_iterator_state(it2, state)
    for want in expected:
        got = next(it2)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    flips = 0
    for b in seen + expected:
        assert b["boxes"].shape == (2, 4, 4) and b["ignore"].shape == (2, 4)
        assert b["box_valid"].sum() == 6  # every box kept
        for k, image_id in enumerate(b["image_id"]):
            scaled = truth[int(image_id)][0] * b["scale"][k]
            w = b["image_hw"][k, 1]
            mirrored = np.stack([w - scaled[:, 2], scaled[:, 1], w - scaled[:, 0], scaled[:, 3]], 1)
            got = b["boxes"][k, :3]
            if np.allclose(got, mirrored, rtol=1e-5):
                flips += 1
            else:
                np.testing.assert_allclose(got, scaled, rtol=1e-5)
    assert 0 < flips < 12


def test_box_slot_buckets_and_the_cut_keeps_every_box():
    assert box_slots.slot_buckets(1500, 16) == (16, 32, 64, 128, 256, 512, 1024, 1500)
    assert box_slots.slot_buckets(64, 16) == (16, 32, 64)
    assert box_slots.slot_buckets(64, 64) == box_slots.slot_buckets(64, 100) == (64,)  # fixed
    assert box_slots.slot_buckets(10, 16) == (10,)
    with pytest.raises(ValueError, match="min_box_slots >= 1"):
        box_slots.slot_buckets(64, 0)
    buckets = box_slots.slot_buckets(64, 16)
    valid = np.zeros((2, 64), bool)
    valid[0, :3] = True
    batch = {
        "boxes": np.arange(2 * 64 * 4, dtype=np.float32).reshape(2, 64, 4),
        "labels": np.where(valid, 1, -1).astype(np.int32),
        "box_valid": valid,
        "ignore": np.zeros((2, 64), bool),
        "image_id": np.array([5, 6]),
    }
    for last, slots in ((3, 16), (16, 16), (17, 32), (40, 64), (64, 64)):
        batch["box_valid"][1, last - 1] = True  # a valid row after padding ones is kept too
        cut = box_slots.trim_box_slots(batch, buckets)
        assert cut["boxes"].shape == (2, slots, 4), last
        assert all(cut[k].shape == (2, slots) for k in ("labels", "box_valid", "ignore"))
        assert cut["box_valid"].sum() == batch["box_valid"].sum()
        np.testing.assert_array_equal(cut["boxes"], batch["boxes"][:, :slots])
        assert cut["image_id"] is batch["image_id"]
        batch["box_valid"][1] = False
    none = box_slots.trim_box_slots({**batch, "box_valid": np.zeros((2, 64), bool)}, buckets)
    assert none["boxes"].shape == (2, 16, 4)
    assert box_slots.trim_box_slots(batch, (64,)) is batch


def test_too_many_boxes_names_image_count_and_setting(tmp_path):
    config, _ = _aitod_like(tmp_path, per_image=5)
    config.max_boxes = 4
    ds = data.build_dataset(config, "val", train=False, batch_size=1, seed=0)
    with pytest.raises(Exception, match=r"im10\.png: 5 boxes .*raise data.max_boxes"):
        next(iter(ds.loader))
    assert data.max_boxes_per_image(config, "val") == 5


def test_tinyperson_ignore_flags_survive(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 5, 5],
            "iscrowd": 0,
            "ignore": True,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "bbox": [20, 20, 5, 5],
            "iscrowd": 0,
            "uncertain": True,
        },
    ]
    root = tmp_path / "tiny"
    write_coco_fixture(
        str(root),
        images,
        [{"id": 1, "name": "person"}],
        anns,
        ann_name="annotations/tiny_set_test.json",
        image_dir="test",
    )
    config = data.default_data_config("tinyperson")
    config.root, config.image_size, config.max_boxes = str(root), 64, 4
    batch = next(iter(data.build_dataset(config, "test", train=False, batch_size=1, seed=0).loader))
    np.testing.assert_array_equal(batch["ignore"][0], [False, True, True, False])
    np.testing.assert_array_equal(batch["box_valid"][0], [True, True, True, False])


def test_degenerate_boxes_expand_and_are_counted(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 0, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [63.8, 5, 0, 0], "iscrowd": 0},
    ]
    ann_file, image_dir = write_coco_fixture(str(tmp_path), images, CATS, anns)
    records, *_, report = coco.coco_records(ann_file, image_dir)
    np.testing.assert_allclose(records[0]["boxes"], [[9.5, 20, 10.5, 24], [63, 4.5, 64, 5.5]])
    assert report.counts["degenerate box expanded to 1 px"] == 2
    with pytest.raises(data.DataError, match="annotation id 1"):
        coco.coco_records(ann_file, image_dir, degenerate="error")


@pytest.fixture
def absl_flags_parsed():
    """absl flags parsed, as in an absl app; unparsed again afterwards if they were."""
    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()
    yield
    if not was_parsed:
        flags.FLAGS.unparse_flags()


@pytest.fixture
def absl_flags_unparsed():
    """absl flags unparsed, as in a program that is no absl app; parsed afterwards if they were
    (with their default values)."""
    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.unparse_flags()
    yield
    if was_parsed:
        flags.FLAGS.mark_as_parsed()


@pytest.mark.usefixtures("absl_flags_unparsed")
def test_worker_processes_need_parsed_absl_flags_and_the_error_says_so(tmp_path):
    # grain reads its --grain_* flags when it starts workers; the data layer never sets them.
    config, _ = _aitod_like(tmp_path)
    with pytest.raises(RuntimeError, match=r"num_workers=2: .*absl\.flags\.FLAGS\(sys\.argv"):
        data.build_dataset(config, "val", train=False, batch_size=1, seed=0, num_workers=2)
    assert not flags.FLAGS.is_parsed()
    data.build_dataset(config, "val", train=False, batch_size=1, seed=0)  # no workers: fine


@pytest.mark.usefixtures("absl_flags_parsed")
def test_worker_processes_give_the_same_batches(tmp_path):
    config = data.default_data_config("synthetic")
    config.root, config.image_size = str(tmp_path), 64
    config.synthetic.num_train, config.synthetic.num_val = 4, 5
    kw = {"train": False, "batch_size": 2, "seed": 0}
    inline = list(data.build_dataset(config, "val", **kw).loader)
    workers = list(data.build_dataset(config, "val", num_workers=2, **kw).loader)
    assert len(inline) == 3 and len(workers) == 4  # padded to whole batches per worker

    def by_id(batches):
        out = {}
        for b in batches:
            for k, image_id in enumerate(b["image_id"]):
                if image_id >= 0:
                    out[int(image_id)] = {key: v[k] for key, v in b.items()}
        return out

    a, b = by_id(inline), by_id(workers)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for image_id, example in a.items():
        for key in example:
            np.testing.assert_array_equal(example[key], b[image_id][key])


def test_list_images_names_what_it_leaves_out(tmp_path):
    images = [{"id": 1, "file_name": n, "height": 40, "width": 80} for n in ("b.png", "a.png")]
    _, folder = write_coco_fixture(str(tmp_path), images, CATS, [])
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(folder, "sub.png.d"))  # a folder: neither an image nor a file
    files, skipped = data.list_images(folder)
    assert [os.path.basename(f) for f in files] == ["a.png", "b.png"]
    assert [os.path.basename(f) for f in skipped] == ["notes.txt"]
    assert data.list_images(files[0]) == ([files[0]], [])
    os.remove(files[0]), os.remove(files[1])
    with pytest.raises(data.DataError, match=r"no images .*; 1 other files there"):
        data.list_images(folder)
