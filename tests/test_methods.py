import pytest

import gem


def test_method_names():
    assert gem.list_methods() == ["gem", "clip", "maskclip", "clip_surgery", "gem_kmeans"]


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
