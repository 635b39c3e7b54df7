"""The data-source catalog: names, lookups, defaults, and a registered source reaching every user
(config parsing, evaluation settings, the pipeline)."""

import pytest
from test_evaluation_aitod import make_gt

from dfrdet_jax import base_config, data, evaluation
from dfrdet_jax.data import catalog
from dfrdet_jax.data.fixtures import write_coco_fixture
from dfrdet_jax.data.sources import coco

BUILT_IN = ("synthetic", "aitod", "tinyperson", "dota2")


def test_built_in_sources_and_unknown_names():
    assert data.source_names() == BUILT_IN
    for lookup in (data.get_source, data.default_data_config):
        with pytest.raises(
            ValueError, match=r"Unknown data set 'coco'; valid choices: \['synthetic'"
        ):
            lookup("coco")
    with pytest.raises(
        ValueError, match=r"Unknown data set 'coco'; valid choices: \['synthetic', 'aitod', "
    ):
        base_config.parse_arg("coco,dfr", "configs/fcos_r18.py")


@pytest.mark.parametrize("name", BUILT_IN)
def test_evaluation_settings_come_from_the_source(name):
    source = data.get_source(name)
    assert source.protocol in evaluation.PROTOCOLS
    # The best metric is a headline number of the protocol's output.
    metrics = evaluation.evaluate(make_gt({1: [(1, [0, 0, 10, 10])]}), [], source.protocol)
    assert isinstance(metrics[source.best_metric], float)
    config = base_config.base_config("fcos", name, "dfr")
    assert (config.eval.protocol, config.eval.best_metric) == (source.protocol, source.best_metric)
    assert config.data == data.default_data_config(name)


def test_default_configs_are_fresh_copies():
    config = data.default_data_config("synthetic")
    config.synthetic.seed = 5
    assert data.default_data_config("synthetic").synthetic.seed == 0
    with pytest.raises(TypeError):
        data.get_source("synthetic").config["root"] = "elsewhere"
    with pytest.raises(ValueError, match=r"'cars': its config lacks \['image_size', 'max_boxes'\]"):
        data.DataSource("cars", {"root": "."}, None, None, "aitod", "AP")


def test_a_registered_source_reaches_configs_evaluation_and_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "_SOURCES", dict(catalog._SOURCES))  # isolate the registry
    images = [{"id": i, "file_name": f"{i}.png", "height": 24, "width": 32} for i in (1, 2, 3)]
    anns = [{"id": 1, "image_id": 2, "category_id": 4, "bbox": [1, 2, 3, 4], "iscrowd": 0}]
    ann_file, image_dir = write_coco_fixture(
        str(tmp_path), images, [{"id": 4, "name": "car"}], anns
    )

    def load_records(config, split):
        records, category_ids, names, report = coco.coco_records(ann_file, image_dir)
        info = data.DatasetInfo(len(names), names, category_ids)
        return data.SplitRecords(records, info, ann_file, report)

    source = data.DataSource(
        name="cars",
        config={"root": str(tmp_path), "image_size": 32, "max_boxes": 2},
        load_records=load_records,
        class_table=lambda config: data.DatasetInfo(1, ["car"], [4]),
        protocol="aitod",
        best_metric="AP50",
    )
    data.register_source(source)
    with pytest.raises(ValueError, match="'cars' is already registered"):
        data.register_source(source)
    assert data.source_names() == (*BUILT_IN, "cars")
    assert base_config.parse_arg("cars,bnn", "configs/fcos_r18.py") == ("cars", "bnn", False, False)
    config = base_config.base_config("fcos", "cars", "bnn")
    assert (config.eval.protocol, config.eval.best_metric) == ("aitod", "AP50")
    assert (config.data.image_size, config.data.flip_prob) == (32, 0.5)
    ds = data.build_dataset(config.data, "val", train=False, batch_size=2, seed=0)
    assert (ds.num_images, ds.category_ids, ds.annotation_file) == (3, [4], ann_file)
    batches = list(ds.loader)
    assert [b["image_id"].tolist() for b in batches] == [[1, 2], [3, -1]]
    assert batches[0]["labels"][1].tolist() == [0, -1]
    assert data.dataset_info(config.data).class_names == ["car"]
    config.data.source = "tfds"
    with pytest.raises(ValueError, match="no tfds builder for 'cars'"):
        data.load_records(config.data, "val")
