import pytest

from hkd_core.config import ConfigError, RunConfig, stage_hashes
from hkd_core.config_checks import from_dict
from hkd_core.validation import validate


def _cfg(d):
    return validate(from_dict(RunConfig, d))


@pytest.mark.parametrize(
    "d, msg",
    [
        ({"trainn": {}}, "unknown key trainn"),
        ({"train": {"lrr": 1}}, r"unknown key train.lrr; allowed under train"),
        ({"train": {"lr": "fast"}}, "train.lr='fast' must be of type float"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size=1.5 must be of type int"),
        ({"model": {"subspace_dims": [8, 15, 16]}}, r"subspace_dims\[1\] \(level 2\) is 15"),
        ({"model": {"levels": 2, "subspace_dims": [8, 16, 16]}}, "has 3 entries .* but model.levels is 2"),
        ({"model": {"levels": 2}}, "give model.subspace_dims too"),
        ({"model": {"levels": 7, "subspace_dims": [2] * 7}}, "resolution 32 allows at most 6 levels"),
        ({"data": {"name": "imagenet"}}, "data.name='imagenet' is not allowed"),
        ({"data": {"resolution": 31}}, "data.resolution=31 is not reachable"),
        (
            {"data": {"resolution": 30}},
            "model.levels=3 needs resolution divisible by 2\\^2; resolution 30 allows at most 2",
        ),
        ({"model": {"variant": "dmd"}}, "model.variant='dmd'"),
        ({"train": {"states_per_traj": 20}}, "states_per_traj=20 needs 19 intermediate states"),
        ({"train": {"total_kimg": 0}}, "train.total_kimg=0.0 must be > 0"),
        ({"eval": {"teacher_nfe": [35, 0]}}, r"eval.teacher_nfe\[1\]=0"),
        ({"model": {"subspace_dims": "8,16,16"}}, "model.subspace_dims='8,16,16' has the wrong type"),
        ({"train": {"adversarial_weight": -0.01}}, "train.adversarial_weight=-0.01 must be >= 0"),
        ({"model": {"observables": "noise"}}, "model.observables is 'noise'; allowed"),
        (
            {"model": {"observables": "state"}, "train": {"gauge_weight": 0.1}},
            "meet the gauge condition by construction",
        ),
        ({"model": {"variant": "kd", "alpha_offset": 0.5}}, "model.alpha_offset=0.5 acts on Koopman latents"),
        (
            {"model": {"variant": "no_koopman"}, "train": {"gauge_weight": 0.1}},
            "train.gauge_weight=0.1 acts on Koopman",
        ),
        ({"model": {"alpha_offset_spread": -1.0}}, "model.alpha_offset_spread=-1.0 must be >= 0"),
        (
            {
                "train": {"adversarial_weight": 0.01},
                "data": {"resolution": 28},
                "model": {"levels": 2, "subspace_dims": [8, 16]},
            },
            "halves the resolution 3 times; data.resolution=28",
        ),
    ],
)
def test_bad_configs_name_the_key(d, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(d)


def test_good_config_and_stage_hashes():
    a = _cfg({"model": {"levels": 2, "subspace_dims": [8, 16]}})
    assert a.hkd_config().levels == 2 and a.train.lr == 1e-3
    b = _cfg({"model": {"levels": 2, "subspace_dims": [8, 16]}, "train": {"lr": 5e-4}})
    ha, hb = stage_hashes(a), stage_hashes(b)
    # changing a training key changes distill and evaluate, not the teacher or the trajectories
    assert ha["teacher"] == hb["teacher"] and ha["trajectories"] == hb["trajectories"]
    assert ha["distill"] != hb["distill"] and ha["evaluate"] != hb["evaluate"]
    c = _cfg({"model": {"levels": 2, "subspace_dims": [8, 16]}, "trajectories": {"num": 100}})
    assert (
        stage_hashes(c)["trajectories"] != ha["trajectories"] and stage_hashes(c)["teacher"] == ha["teacher"]
    )


def test_a_key_marked_identity_when_set_changes_the_hash_only_when_set():
    """train.skip_nonfinite came after many stages were cached: at its default it leaves every stage's hash as it
    was (the cache still hits); set, it is part of the distill stage's identity."""
    import dataclasses

    from hkd_core.config import RunConfig, stage_hashes

    base = RunConfig()
    same = stage_hashes(
        dataclasses.replace(base, train=dataclasses.replace(base.train, skip_nonfinite=False))
    )
    other = stage_hashes(
        dataclasses.replace(base, train=dataclasses.replace(base.train, skip_nonfinite=True))
    )
    assert same == stage_hashes(base)
    assert other["distill"] != same["distill"] and other["trajectories"] == same["trajectories"]
    lr = stage_hashes(dataclasses.replace(base, train=dataclasses.replace(base.train, lr=5e-4)))
    assert lr["distill"] != same["distill"]  # an ordinary key still counts at any value


def test_the_model_config_is_the_architectures_fields_plus_the_pipelines_keys():
    """One list of architecture keys: every HKDConfig field (but what the data set gives) is a model.* key of
    the same type, None meaning the preset's value; a set key reaches the built architecture."""
    import dataclasses
    import typing

    from hkd_core.architecture import HKDConfig
    from hkd_core.config import FROM_DATA, ModelConfig

    arch = {f.name for f in dataclasses.fields(HKDConfig)} - set(FROM_DATA)
    model = {f.name for f in dataclasses.fields(ModelConfig)}
    assert arch <= model and model - arch == {
        "variant",
        "preset",
        "init",
        "alpha_offset",
        "alpha_offset_spread",
    }
    hints, mhints = typing.get_type_hints(HKDConfig), typing.get_type_hints(ModelConfig)
    for name in arch:
        assert mhints[name] == (hints[name] | None), name
        assert getattr(ModelConfig(), name) is None
    cfg = _cfg({"model": {"latent_levels": [2], "channels": 16}})
    built = cfg.hkd_config()
    assert (
        built.latent_levels == [2]
        and built.channels == 16
        and cfg.model.architecture() == {"latent_levels": [2], "channels": 16}
    )


def test_an_architecture_key_new_to_the_model_config_joins_the_identity_only_when_set():
    """latent_levels became a model.* key after stages had been cached: unset, every hash is as before; set, the
    distill stage is another. A key hashed since the start (channels) counts even at None."""
    import dataclasses

    from hkd_core.config import IDENTITY_WHEN_NONE, _identity

    base = RunConfig()
    assert "latent_levels" not in _identity(base.model) and "channels" in _identity(base.model)
    assert "latent_levels" not in IDENTITY_WHEN_NONE
    over = stage_hashes(dataclasses.replace(base, model=dataclasses.replace(base.model, latent_levels=[3])))
    assert over["distill"] != stage_hashes(base)["distill"]
    assert over["trajectories"] == stage_hashes(base)["trajectories"]
