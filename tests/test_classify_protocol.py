"""The evaluation protocol: layer specs, leave-one-session-out folds, dev splits carved from training data."""

import numpy as np
import pytest

from classify_caches import write_session_cache, write_train_test_cache
from daamkit.classify.experiment import open_sources, plan_splits
from daamkit.classify.feature_cache import FeatureCache
from daamkit.classify.protocol import dev_split, parse_layers
from daamkit.infra.errors import DaamkitError


def test_parse_layers_maps_encoder_layer_numbers_to_cache_positions():
    available = list(range(1, 25))
    assert parse_layers(None, available) is None
    assert parse_layers("9", available) == [8]
    assert parse_layers("19-21", available) == [18, 19, 20]
    assert parse_layers("1, 3,5-6", available) == [0, 2, 4, 5]
    assert parse_layers("0-1", [0, 1, 2]) == [0, 1]  # cache that kept the embedding output


@pytest.mark.parametrize(("spec", "message"), [
    ("25", "not in the feature cache"), ("21-19", "backwards"), ("a-b", "expected numbers"), ("3,3", "twice"),
])
def test_parse_layers_rejects_bad_specs(spec, message):
    with pytest.raises(DaamkitError, match=message):
        parse_layers(spec, list(range(1, 25)))


def test_dev_split_is_stratified_seeded_and_keeps_utterances_together():
    labels = np.repeat(np.arange(4), 20)
    units = [f"utt{i // 2}" for i in range(80)]  # two chunks per utterance
    pool = np.arange(80)
    train, dev = dev_split(pool, labels, units, 0.2, np.random.default_rng(3))
    again = dev_split(pool, labels, units, 0.2, np.random.default_rng(3))
    assert np.array_equal(train, again[0]) and np.array_equal(dev, again[1])
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == set(pool)
    assert np.bincount(labels[dev]).tolist() == [4, 4, 4, 4]  # 2 of 10 utterances per class, 2 chunks each
    assert {units[i] for i in train}.isdisjoint({units[i] for i in dev})


def test_dev_split_too_small_or_bad_fraction_is_an_error():
    with pytest.raises(DaamkitError, match="too small"):
        dev_split(np.arange(3), np.arange(3), None, 0.1, np.random.default_rng(0))
    with pytest.raises(DaamkitError, match="between 0 and 1"):
        dev_split(np.arange(10), np.zeros(10, int), None, 1.5, np.random.default_rng(0))


def test_folds_never_mix_sessions_and_dev_comes_from_the_training_sessions(tmp_path):
    cache = FeatureCache.open(write_session_cache(tmp_path / "cache"))
    sources = open_sources(cache)
    plans = plan_splits(cache.manifest.get("grouping"), sources, seed=0, runs=1, dev_fraction=0.1)
    groups = np.asarray(sources["all"].groups)
    utterances = np.asarray([item["utterance"] for item in sources["all"].items])
    assert [plan.name for plan in plans] == [f"Session{s}" for s in range(1, 6)]
    for plan in plans:
        assert set(groups[plan.test]) == {plan.name}
        assert plan.name not in set(groups[plan.train]) | set(groups[plan.dev])
        assert len(plan.train) + len(plan.dev) + len(plan.test) == len(groups)
        assert set(plan.train).isdisjoint(plan.dev)
        assert set(utterances[plan.train]).isdisjoint(utterances[plan.dev])
    with pytest.raises(DaamkitError, match="`runs`"):
        plan_splits(cache.manifest.get("grouping"), sources, seed=0, runs=2, dev_fraction=0.1)


def test_repeated_runs_use_consecutive_seeds_and_the_official_test_split(tmp_path):
    cache = FeatureCache.open(write_train_test_cache(tmp_path / "cache", num_train=60))
    plans = plan_splits(cache.manifest.get("grouping"), open_sources(cache), seed=7, runs=3, dev_fraction=0.1)
    assert [(p.name, p.seed, p.train_source, p.test_source) for p in plans] == [
        ("run1", 7, "train", "test"), ("run2", 8, "train", "test"), ("run3", 9, "train", "test")]
    assert not np.array_equal(plans[0].dev, plans[1].dev)
    for plan in plans:
        assert sorted(np.concatenate([plan.train, plan.dev]).tolist()) == list(range(60))
        assert plan.test.tolist() == list(range(16))
