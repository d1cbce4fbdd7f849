from orchestrator.services.tracking import flatten


def test_flatten_params_with_slashes():
    assert flatten({"model": {"subspace_dims": [8, 16], "levels": 2}, "name": "x", "eval": {"w": None}}) == {
        "model/subspace_dims": "[8, 16]",
        "model/levels": "2",
        "name": "x",
        "eval/w": "None",
    }
