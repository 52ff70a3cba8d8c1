"""Every trainer lives in one package, ``fastpref.trainers``; the former import paths re-export the same objects."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import fastpref  # noqa: E402
import fastpref.trainers as trainers  # noqa: E402

TRAINERS = ("FastPrefDPOTrainer", "FastPrefCPOTrainer", "FastPrefORPOTrainer", "FastPrefKTOTrainer",
            "BinaryFeedbackTrainer", "ScalarFeedbackTrainer", "TYPOTrainer", "OracleRewardTrainer",
            "DRDOOracleTrainer", "AuxDPOTrainer")


def test_every_trainer_is_in_fastpref_trainers():
    from transformers import Trainer

    for name in TRAINERS:
        cls = getattr(trainers, name)
        assert issubclass(cls, Trainer) and cls.__module__.startswith("fastpref.trainers."), name
    # and no Trainer subclass is defined anywhere else in the package
    elsewhere = []
    for info in pkgutil.walk_packages(fastpref.__path__, "fastpref."):
        if info.name.startswith(("fastpref.trainers", "fastpref.kernels", "fastpref.demo", "fastpref.reproduce")):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Trainer) and obj.__module__ == info.name:
                elsewhere.append(f"{info.name}.{obj.__name__}")
    assert not elsewhere, elsewhere


def test_former_paths_re_export_the_same_objects():
    import fastpref.collators as old_collators
    import fastpref.integrations.trl as old_trl
    import fastpref.trainer as old_trainer
    from fastpref.trainers import collators, dpo, feedback

    assert old_trl.FastPrefDPOTrainer is trainers.FastPrefDPOTrainer is dpo.FastPrefDPOTrainer
    assert old_trl.METHODS is dpo.METHODS
    for name in feedback.__all__:
        assert getattr(old_trainer, name) is getattr(feedback, name), name
    for name in collators.__all__:
        assert getattr(old_collators, name) is getattr(collators, name), name
    assert set(old_trainer.__all__) == set(feedback.__all__)
    with pytest.raises(AttributeError):
        trainers.NoSuchTrainer  # noqa: B018


def test_feedback_trainers_do_not_import_trl():
    code = ("import sys; from fastpref.trainers import BinaryFeedbackTrainer, PackingCollator, tokenize_dataset; "
            "import fastpref.trainer, fastpref.collators; print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
