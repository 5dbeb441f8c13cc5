import pytest

from hisa import HisaConfig


def test_keyword_construction_and_fields():
    cfg = HisaConfig(block_size=32, top_blocks=16, top_k=256, dense_layers=[1, 0], min_context=0)
    assert (cfg.block_size, cfg.top_blocks, cfg.top_k, cfg.min_context) == (32, 16, 256, 0)
    assert cfg.dense_layers == (0, 1)
    assert cfg.replace(top_k=128).top_k == 128
    assert cfg.to_dict()["dense_layers"] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"top_blocks": 4, "block_size": 64, "top_k": 512}, "must be >= top_k"),
        ({"block_size": 0}, "block_size"),
        ({"top_k": -3}, "top_k"),
        ({"top_blocks": 1, "block_size": 4096, "top_k": 64}, "top_blocks"),
        ({"min_context": -1}, "min_context"),
        ({"dense_layers": [-1]}, "dense_layers"),
        ({"dense_layers": 3}, "dense_layers"),
        ({"selection": "vote"}, "selection"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        HisaConfig(**kwargs)


def test_defaults_are_consistent():
    cfg = HisaConfig()
    assert cfg.top_blocks * cfg.block_size >= cfg.top_k
