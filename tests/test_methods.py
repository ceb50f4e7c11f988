import pytest

import gem


def test_method_names():
    assert gem.list_methods() == [
        "gem",
        "clip",
        "maskclip",
        "clip_surgery",
        "gem_kmeans",
        "sclip",
        "clearclip",
        "naclip",
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "nope"}, "unknown method"),
        ({"depth": 0}, "depth"),
        ({"depth": 9}, "depth"),
        ({"iterations": -1}, "iterations"),
        ({"temperature": "cold"}, "temperature"),
        ({"temperature": 0}, "temperature"),
        ({"ensemble": ()}, "ensemble"),
        ({"ensemble": ("q", "x")}, "ensemble"),
        ({"l2_norm": "yes"}, "l2_norm"),
        ({"method": "maskclip", "depth": 3}, "always uses depth"),
        ({"method": "clip", "iterations": 2}, "does not take"),
        ({"feature_surgery": True}, "does not take"),
        ({"method": "gem_kmeans", "clusters": 0}, "clusters"),
        ({"method": "sclip", "depth": 2}, "always uses depth"),
        ({"method": "sclip", "sigma": 5}, "does not take"),
        ({"method": "clearclip", "residual": 1}, "residual"),
        ({"method": "naclip", "ffn": "no"}, "ffn"),
        ({"method": "naclip", "sigma": 0}, "sigma"),
        ({"method": "naclip", "sigma": True}, "sigma"),
    ],
)
def test_bad_options_are_refused(tiny_clip, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gem.GEM(tiny_clip[0], **kwargs)


def test_config_records_resolved_options(tiny_clip):
    model = gem.GEM(tiny_clip[0], ensemble=["v", "q"], iterations=2)
    assert model.config == {
        "method": "gem",
        "depth": 6,
        "feature_surgery": False,
        "ensemble": ["q", "v"],
        "iterations": 2,
        "temperature": "adaptive",
        "l2_norm": True,
    }


def test_config_records_last_block_options(tiny_clip):
    assert gem.GEM(tiny_clip[0], method="naclip", sigma=4).config == {
        "method": "naclip",
        "depth": 1,
        "feature_surgery": False,
        "residual": False,
        "ffn": False,
        "sigma": 4.0,
    }
    assert gem.GEM(tiny_clip[0], method="sclip").config["residual"] is True
