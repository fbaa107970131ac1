"""Tests of the part 2 notebook (CycleGAN), through its definitions and smoke runs."""

from __future__ import annotations

import ast
import copy
import errno
import gzip
import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import zlib
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from test_part1 import (
    ALLOCATION_MESSAGES,
    MakeFolderOnLoad,
    allocation_failure,
    first_tensor_record,
    flip_byte_in_record,
    identity,
    names_synced_in,
    opener_denying,
    opener_onto_full_disk,
    publish_recording_syncs,
    record_syncs,
    run_in_thread,
    save_onto_full_disk,
)

from tools.nbdefs import load_definitions, tagged_cells

NOTEBOOK = "part2_cyclegan.ipynb"
SMOKE = {"PROFILE": "smoke", "NUM_THREADS": "1"}


def load(repo_root, **settings):
    env = dict(SMOKE)
    env.update({name: str(value) for name, value in settings.items()})
    return load_definitions(repo_root / NOTEBOOK, env=env)


@pytest.fixture
def nb(repo_root, tmp_path):
    return load(repo_root, CHECKPOINT_DIR=tmp_path / "checkpoints",
                REPORT_DIR=tmp_path / "report")


def write_mnist_idx(folder, prefix, images, labels):
    """Write MNIST idx files (big-endian header, uint8 payload), as the official files are."""
    folder.mkdir(parents=True, exist_ok=True)
    count = len(images)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as handle:
        handle.write(np.array([0x803, count, 28, 28], dtype=">i4").tobytes())
        handle.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as handle:
        handle.write(np.array([0x801, count], dtype=">i4").tobytes())
        handle.write(np.asarray(labels, dtype=np.uint8).tobytes())


def write_svhn_mat(path, images_nhwc, digits):
    """Write an SVHN .mat file: X (32, 32, 3, N) uint8 and y (N, 1) with 10 for the digit 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw_labels = np.where(np.asarray(digits) == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
    scipy.io.savemat(path, {"X": np.ascontiguousarray(images_nhwc.transpose(1, 2, 3, 0)),
                            "y": raw_labels})


def write_tiny_data(root, train=120, test=60, seed=0):
    """Write MNIST and SVHN files in their official formats with random pixels."""
    rng = np.random.default_rng(seed)
    raw = root / "mnist" / "MNIST" / "raw"
    for prefix, count in (("train", train), ("t10k", test)):
        write_mnist_idx(raw, prefix, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
                        np.arange(count) % 10)
    for name, count in (("train_32x32.mat", train), ("test_32x32.mat", test)):
        write_svhn_mat(root / "svhn" / name,
                       rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                       np.arange(count) % 10)
    return root


def small_gan(nb, num_classes=11, learning_rate=1e-3, seed=0):
    return nb.build_cyclegan(4, 4, num_classes, learning_rate, 0.5, "cpu", False, seed)


def parameters_of(network):
    return {name: p.detach().clone() for name, p in network.named_parameters()}


def changed(network, before):
    return any(not torch.equal(p, before[name]) for name, p in network.named_parameters())


def batches(seed=0, size=6):
    generator = torch.Generator().manual_seed(seed)
    m_data = torch.rand(size, 1, 32, 32, generator=generator) * 2 - 1
    s_data = torch.rand(size, 3, 32, 32, generator=generator) * 2 - 1
    labels = torch.arange(size) % 10  # contains digit 0, which must never become class 10
    return (m_data, labels), (s_data, labels.flip(0))


# Definitions and settings


def test_definitions_load(nb):
    for name in ("Residual_Block", "Generator", "Discriminator", "Train_D_ms", "Train_D_sm",
                 "Train_G_msm", "Train_G_sms", "train_iteration", "build_cyclegan"):
        assert callable(getattr(nb, name)), name
    assert nb.PROFILE == "smoke"
    assert nb.GAN_STEPS == nb.PROFILE_SETTINGS["smoke"]["GAN_STEPS"]


def test_setting_names_match_parameters_cell(repo_root, nb):
    tag, source = tagged_cells(repo_root / NOTEBOOK)[0]
    values = {node.targets[0].id: node.value for node in ast.parse(source).body
              if isinstance(node, ast.Assign)}
    assert tag == "parameters"
    assert set(values) - {"PROFILE_SETTINGS"} == set(nb.SETTING_NAMES)
    profile_dependent = {name for name in nb.SETTING_NAMES
                         if ast.literal_eval(values[name]) is None}
    assert "GAN_STEPS" in profile_dependent
    for profile in ("smoke", "cpu", "full"):
        assert set(nb.PROFILE_SETTINGS[profile]) == profile_dependent, profile


def test_environment_overrides_settings(repo_root):
    nb = load(repo_root, CYCLE_WEIGHT="2.5", GAN_STEPS="7", FORCE_RETRAIN="yes",
              TARGET_DOMAIN="synthetic")
    assert nb.CYCLE_WEIGHT == 2.5
    assert nb.GAN_STEPS == 7
    assert nb.FORCE_RETRAIN is True
    assert nb.RUN_NAME == "part2_smoke_synthetic"


def test_path_settings_become_text(nb, tmp_path):
    """Path("...") in the settings cell: the results file (JSON) and torch.load(weights_only=True) take only text."""
    folders = {name: tmp_path / name.lower() for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    defaults = {**{name: nb.SETTINGS[name] for name in nb.SETTING_NAMES}, **folders}
    settings = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)
    assert {name: settings[name] for name in folders} == {name: str(path) for name, path in folders.items()}
    checkpoint = tmp_path / "settings.pt"
    torch.save({"settings": settings}, checkpoint)
    assert torch.load(checkpoint, weights_only=True)["settings"] == json.loads(json.dumps(settings))


def test_invalid_setting_raises(nb):
    defaults = {name: nb.SETTINGS[name] for name in nb.SETTING_NAMES}
    defaults["GAN_STEPS"] = None
    with pytest.raises(ValueError) as error:
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {"GAN_STEPS": "many"}, False)
    assert str(error.value) == "GAN_STEPS='many' is not a whole number: set it like GAN_STEPS=3"
    with pytest.raises(ValueError, match="TARGET_DOMAIN='mnist'"):
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {"TARGET_DOMAIN": "mnist"}, False)


@pytest.mark.parametrize("name, value", [
    ("GAN_STEPS", "0"), ("BATCH_SIZE", "-4"), ("LR_DECAY_START", "nan"), ("LR_DECAY_START", "1.5"),
    ("TRAIN_LIMIT", "-5"), ("CYCLE_WEIGHT", "-10"), ("BETA1", "1.5"), ("LEARNING_RATE", "0"),
    ("LEARNING_RATE", "1e-320"), ("SAMPLE_EVERY", "0"), ("SEED", "-1"), ("NUM_THREADS", "-2"),
    ("NUM_THREADS", "3000000000")])
def test_out_of_range_setting_raises(nb, name, value):
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    with pytest.raises(ValueError) as error:
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {name: value}, False)
    assert f"{name}=" in str(error.value)
    assert "is invalid" in str(error.value)


@pytest.mark.parametrize("name, value", [("FUSED_ADAM", 0), ("CHANNELS_LAST", "False"), ("RUN_ABLATION", 1),
                                         ("FORCE_RETRAIN", "yes")])
def test_non_boolean_cell_value_raises(nb, name, value):
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults[name] = value
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid") as error:
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)
    assert "in the settings cell" in str(error.value)
    assert "environment variable or --set" in str(error.value)


@pytest.mark.parametrize("name, value", [("DATA_DIR", 5), ("REPORT_DIR", "  "), ("CHECKPOINT_DIR", "")])
def test_invalid_folder_cell_value_raises(nb, name, value):
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults[name] = value
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid: it must be a folder path"):
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)


@pytest.mark.parametrize("name", ["DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR"])
def test_unknown_home_folder_setting_raises(nb, name):
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults[name] = "~no-such-user-of-this-test/folder"
    with pytest.raises(ValueError, match=f"{name}='~no-such-user-of-this-test/folder' is invalid: it must be a "
                                         f"folder path whose leading ~ or ~user has a home folder"):
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)


def test_none_outside_profiles_names_fix(nb):
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults["EVAL_BATCH_SIZE"] = None
    with pytest.raises(ValueError, match="EVAL_BATCH_SIZE is None.*Give it a value in the settings cell"):
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)


def test_none_text_keeps_profile_value(nb):
    """--set BATCH_SIZE=none reaches both notebooks, and both read it as the profile's value."""
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults.update(PROFILE="smoke", BATCH_SIZE=None)
    settings = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {"BATCH_SIZE": " None "}, False)
    assert settings["BATCH_SIZE"] == nb.PROFILE_SETTINGS["smoke"]["BATCH_SIZE"]


@pytest.mark.parametrize("text, expected", [("true", True), ("0", False)])
def test_environment_boolean_replaces_cell_value(nb, text, expected):
    """An environment value is parsed as a boolean even where the settings cell contains another type."""
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    defaults["FUSED_ADAM"] = 1
    assert nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {"FUSED_ADAM": text}, False)["FUSED_ADAM"] is expected


def test_hardware_records_bfloat16_support(nb, monkeypatch):
    monkeypatch.setattr(nb, "cpu_has_bfloat16", lambda: True)
    assert nb.hardware_description()["cpu_bfloat16"] is True
    monkeypatch.setattr(nb, "cpu_has_bfloat16", lambda: False)
    assert nb.hardware_description()["cpu_bfloat16"] is False


def test_auto_profile_follows_cuda(nb):
    defaults = {name: nb.SETTINGS[name] for name in nb.SETTING_NAMES}
    defaults.update(PROFILE="auto", GAN_STEPS=None)
    cpu = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, False)
    gpu = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {}, True)
    assert cpu["PROFILE"] == "cpu"
    assert cpu["GAN_STEPS"] == nb.PROFILE_SETTINGS["cpu"]["GAN_STEPS"]
    assert gpu["PROFILE"] == "full"
    assert gpu["GAN_STEPS"] == nb.PROFILE_SETTINGS["full"]["GAN_STEPS"]


def test_profile_and_target_ignore_case(nb):
    defaults = {name: nb.SETTINGS[name] for name in nb.SETTING_NAMES}
    settings = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS,
                                   {"PROFILE": " Smoke ", "TARGET_DOMAIN": "Synthetic"}, False)
    assert settings["PROFILE"] == "smoke"
    assert settings["TARGET_DOMAIN"] == "synthetic"


def test_environment_boolean_ignores_spaces(nb):
    """A boolean setting's environment value is read without its surrounding spaces, as numbers are."""
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    environ = {"FORCE_RETRAIN": " yes ", "RUN_ABLATION": "off\n"}
    settings = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, environ, False)
    assert settings["FORCE_RETRAIN"] is True
    assert settings["RUN_ABLATION"] is False


@pytest.mark.parametrize("name, value, expected", [
    ("NUM_THREADS", "1024", 1024), ("BETA1", "0", 0.0), ("LR_DECAY_START", "0", 0.0), ("LR_DECAY_START", "1", 1.0),
    ("SEED", str(2**32 - 1), 2**32 - 1), ("LEARNING_RATE", "1e-8", 1e-8), ("D_PRETRAIN_STEPS", "0", 0)])
def test_setting_at_range_limit_accepted(nb, name, value, expected):
    """A value at the edge of a setting's valid range is accepted as it is."""
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    settings = nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {name: value}, False)
    assert settings[name] == expected


@pytest.mark.parametrize("name, value, shown", [("BETA1", "1", "1.0"), ("SEED", "4294967296", "4294967296"),
                                                ("NUM_THREADS", "1025", "1025")])
def test_setting_just_past_limit_raises(nb, name, value, shown):
    """A value one step past the edge of a setting's valid range raises ValueError naming the setting."""
    defaults = {setting: nb.SETTINGS[setting] for setting in nb.SETTING_NAMES}
    with pytest.raises(ValueError) as error:
        nb.resolve_settings(defaults, nb.PROFILE_SETTINGS, {name: value}, False)
    assert str(error.value).startswith(f"{name}={shown} is invalid")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident memory from Linux's /proc")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc/self/status")
def test_peak_memory_in_mebibytes(nb):
    """The peak resident memory is in MiB, within a factor of two of the peak that Linux's /proc reports.

    The two counters are read apart and can differ slightly (0.13 MiB in one run), while a wrong unit is 1024 apart.
    """
    peak_mib = nb.peak_memory_mib()
    status = Path("/proc/self/status").read_text()
    reported_mib = int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)[1]) / 1024
    assert peak_mib > reported_mib / 2
    assert peak_mib < reported_mib * 2


# Shapes


@pytest.mark.parametrize("batch", [1, 5])
def test_generator_shapes(nb, batch):
    G = nb.Generator("mnist_to_svhn", conv_dim=8)
    F = nb.Generator("svhn_to_mnist", conv_dim=8)
    fake_s = G(torch.randn(batch, 1, 32, 32))
    assert fake_s.shape == (batch, 3, 32, 32)
    assert F(torch.randn(batch, 3, 32, 32)).shape == (batch, 1, 32, 32)
    assert fake_s.abs().max() <= 1.0  # tanh output


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("domain,channels", [("mnist", 1), ("svhn", 3)])
def test_discriminator_logits_shape(nb, batch, domain, channels):
    for num_classes in (11, 2, 1):
        D = nb.Discriminator(domain, conv_dim=8, num_classes=num_classes)
        assert D(torch.randn(batch, channels, 32, 32)).shape == (batch, num_classes)
        D.eval()
        assert D(torch.randn(batch, channels, 32, 32)).shape == (batch, num_classes)


def test_invalid_direction_and_domain_raise(nb):
    with pytest.raises(ValueError, match="mnist_to_svhn"):
        nb.Generator("mnist_to_mnist")
    with pytest.raises(ValueError, match="Dx"):
        nb.Discriminator("cifar")
    with pytest.raises(ValueError, match="num_classes=10"):
        nb.Discriminator("mnist", num_classes=10)


def test_residual_block_adds_input(nb):
    block = nb.Residual_Block(6, 4, 6)
    x = torch.randn(3, 6, 8, 8)
    assert block(x).shape == x.shape
    # With the second convolution zeroed, the residual branch is BN(0) = 0 and only the
    # skip connection is left: the output must be ReLU(x).
    with torch.no_grad():
        block.conv2.weight.zero_()
    assert torch.allclose(block(x), torch.relu(x))


def test_residual_block_matches_its_equation(nb):
    """The block computes ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + x)."""
    block = nb.Residual_Block(6, 4, 6)
    x = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inner = torch.relu(block.bn1(block.conv1(x)))
        expected = torch.relu(block.bn2(block.conv2(inner)) + x)
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_generator_composes_blocks_then_tanh(nb):
    G = nb.Generator("mnist_to_svhn", conv_dim=4)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = G.decoder(G.residual(G.encoder(x)))
        assert torch.allclose(G(x), expected, atol=1e-6)
        # With the last transposed convolution reduced to a bias of -3, every output is tanh(-3).
        last = [module for module in G.decoder if isinstance(module, torch.nn.ConvTranspose2d)][-1]
        last.weight.zero_()
        last.bias.fill_(-3.0)
        assert torch.allclose(G(x), torch.full((2, 3, 32, 32), math.tanh(-3.0)), atol=1e-6)


# Training functions


def test_training_functions_update_only_their_networks(nb):
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches()
    calls = {
        "Train_D_ms": (lambda: nb.Train_D_ms(gan.Dx, gan.Dy, gan.G, m_data, m_label,
                                             optimizer=gan.d_optimizer), {"Dx", "Dy"}),
        "Train_D_sm": (lambda: nb.Train_D_sm(gan.Dx, gan.Dy, gan.F, s_data, s_label,
                                             optimizer=gan.d_optimizer), {"Dx", "Dy"}),
        "Train_G_msm": (lambda: nb.Train_G_msm(gan.Dy, gan.G, gan.F, m_data, m_label,
                                               optimizer=gan.g_optimizer), {"G", "F"}),
        "Train_G_sms": (lambda: nb.Train_G_sms(gan.Dx, gan.G, gan.F, s_data, s_label,
                                               optimizer=gan.g_optimizer), {"G", "F"}),
    }
    for function, (call, trained) in calls.items():
        before = {name: parameters_of(network) for name, network in gan.networks().items()}
        loss = call()
        assert isinstance(loss, float), function
        assert math.isfinite(loss), function
        for name, network in gan.networks().items():
            assert changed(network, before[name]) == (name in trained), (function, name)


def test_generator_steps_compute_no_discriminator_gradients(nb):
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches()
    nb.Train_G_msm(gan.Dy, gan.G, gan.F, m_data, m_label, optimizer=gan.g_optimizer)
    nb.Train_G_sms(gan.Dx, gan.G, gan.F, s_data, s_label, optimizer=gan.g_optimizer)
    assert all(p.grad is None for p in [*gan.Dx.parameters(), *gan.Dy.parameters()])
    assert all(p.requires_grad for p in [*gan.Dx.parameters(), *gan.Dy.parameters()])


def test_one_logit_loss_treats_real_as_positive(nb):
    """With one logit, class 0 (real) is the positive label of binary cross-entropy and any other class negative."""
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    targets = torch.tensor([0, 1, 0])
    softplus = torch.nn.functional.softplus
    expected = (softplus(torch.tensor(-2.0)) + softplus(torch.tensor(-1.0)) + softplus(torch.tensor(-0.5))) / 3
    assert nb.classification_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_train_iteration_order_and_arguments(nb, monkeypatch):
    """D_ms, D_sm, G_msm, G_sms run in that order, each on its own networks and its domain's batch."""
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches()
    calls = []
    originals = {name: getattr(nb, name) for name in ("Train_D_ms", "Train_D_sm", "Train_G_msm", "Train_G_sms")}
    for name in originals:
        def recording(*args, name=name, **kwargs):
            calls.append((name, args))
            return originals[name](*args, **kwargs)

        monkeypatch.setattr(nb, name, recording)
    nb.train_iteration(gan, (m_data, m_label), (s_data, s_label))
    expected = [
        ("Train_D_ms", (gan.Dx, gan.Dy, gan.G, m_data, m_label)),
        ("Train_D_sm", (gan.Dx, gan.Dy, gan.F, s_data, s_label)),
        ("Train_G_msm", (gan.Dy, gan.G, gan.F, m_data, m_label)),
        ("Train_G_sms", (gan.Dx, gan.G, gan.F, s_data, s_label)),
    ]
    assert [name for name, _ in calls] == [name for name, _ in expected]
    for (name, args), (_, expected_args) in zip(calls, expected):
        assert len(args) == len(expected_args), name
        for position, (given, wanted) in enumerate(zip(args, expected_args)):
            assert given is wanted, (name, position)


def test_pretraining_fits_discriminators_to_their_digits(nb, monkeypatch):
    """Each step fits Dx to an MNIST batch and Dy to an SVHN batch, each with its own digits, and trains only them."""
    gan = small_gan(nb)
    generator = torch.Generator().manual_seed(0)
    m_images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8, generator=generator)
    s_images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    m_labels, s_labels = torch.arange(6), torch.arange(4, 10).flip(0)
    streams = [nb.BatchStream(m_images, m_labels, 3, seed=1, device="cpu"),
               nb.BatchStream(s_images, s_labels, 3, seed=2, device="cpu")]
    twins = [nb.BatchStream(m_images, m_labels, 3, seed=1, device="cpu"),
             nb.BatchStream(s_images, s_labels, 3, seed=2, device="cpu")]
    forwards = {"Dx": [], "Dy": []}
    losses = []
    original = nb.classification_loss

    def recording_loss(logits, targets):
        losses.append((logits, targets))
        return original(logits, targets)

    monkeypatch.setattr(nb, "classification_loss", recording_loss)
    Dx, Dy = gan.Dx, gan.Dy
    gan.Dx, gan.Dy = Recording(Dx, forwards["Dx"]), Recording(Dy, forwards["Dy"])
    before = {name: parameters_of(network) for name, network in (("Dx", Dx), ("Dy", Dy), ("G", gan.G), ("F", gan.F))}
    nb.pretrain_discriminators(gan, *streams, steps=2)
    expected = {"Dx": [], "Dy": []}
    for _ in range(2):
        for name, twin in zip(("Dx", "Dy"), twins):
            images, labels = next(twin)
            expected[name].append((images, labels))
    assert len(losses) == 4
    for name in ("Dx", "Dy"):
        assert len(forwards[name]) == 2, name
        for (inputs, logits), (images, labels) in zip(forwards[name], expected[name]):
            assert torch.equal(inputs, images), name
            targets = next(targets for out, targets in losses if out is logits)
            assert torch.equal(targets, labels), name
    assert changed(Dx, before["Dx"])
    assert changed(Dy, before["Dy"])
    assert not changed(gan.G, before["G"])
    assert not changed(gan.F, before["F"])


def test_discriminator_steps_detach_generated_images(nb):
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches()
    nb.Train_D_ms(gan.Dx, gan.Dy, gan.G, m_data, m_label, optimizer=gan.d_optimizer)
    nb.Train_D_sm(gan.Dx, gan.Dy, gan.F, s_data, s_label, optimizer=gan.d_optimizer)
    assert all(p.grad is None for p in [*gan.G.parameters(), *gan.F.parameters()])


class Recording(torch.nn.Module):
    """A discriminator wrapper that logs each input and the logits it returned."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.log = log

    def forward(self, x):
        logits = self.inner(x)
        self.log.append((x, logits))
        return logits


def test_fake_class_only_for_generated_images(nb, monkeypatch):
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches(size=7)
    forwards, losses = [], []
    original = nb.classification_loss

    def recording_loss(logits, targets):
        losses.append((logits, targets))
        return original(logits, targets)

    monkeypatch.setattr(nb, "classification_loss", recording_loss)
    Dx, Dy = Recording(gan.Dx, forwards), Recording(gan.Dy, forwards)
    steps = {
        "Train_D_ms": lambda: nb.Train_D_ms(Dx, Dy, gan.G, m_data, m_label, gan.d_optimizer),
        "Train_D_sm": lambda: nb.Train_D_sm(Dx, Dy, gan.F, s_data, s_label, gan.d_optimizer),
        "Train_G_msm": lambda: nb.Train_G_msm(Dy, gan.G, gan.F, m_data, m_label, gan.g_optimizer),
        "Train_G_sms": lambda: nb.Train_G_sms(Dx, gan.G, gan.F, s_data, s_label, gan.g_optimizer),
    }
    for function, step in steps.items():
        forwards.clear()
        losses.clear()
        step()
        assert len(losses) == (2 if function.startswith("Train_D") else 1), function
        for logits, targets in losses:
            inputs = next(x for x, out in forwards if out is logits)
            real = torch.equal(inputs, m_data) or torch.equal(inputs, s_data)
            generated_in_d_step = not real and function.startswith("Train_D")
            if generated_in_d_step:
                assert torch.equal(targets, torch.full_like(targets, 10)), function
            else:
                assert (targets != 10).all(), function
                source_label = m_label if function in ("Train_D_ms", "Train_G_msm") else s_label
                assert torch.equal(targets, source_label), function
            assert len(targets) == len(inputs), function


@pytest.mark.parametrize("cycle_weight", [10.0, 2.5])
def test_losses_match_their_equations(nb, monkeypatch, cycle_weight):
    monkeypatch.setattr(nb, "CYCLE_WEIGHT", cycle_weight)
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches()
    frozen_d = torch.optim.SGD([*gan.Dx.parameters(), *gan.Dy.parameters()], lr=0.0)
    frozen_g = torch.optim.SGD([*gan.G.parameters(), *gan.F.parameters()], lr=0.0)
    ce, mse, fake = (torch.nn.functional.cross_entropy, torch.nn.functional.mse_loss,
                     torch.full((6,), 10))
    G, F, Dx, Dy = gan.G, gan.F, gan.Dx, gan.Dy
    with torch.no_grad():
        expected = {
            "D_ms": ce(Dx(m_data), m_label) + ce(Dy(G(m_data)), fake),
            "D_sm": ce(Dy(s_data), s_label) + ce(Dx(F(s_data)), fake),
            "G_msm": ce(Dy(G(m_data)), m_label) + cycle_weight * mse(F(G(m_data)), m_data),
            "G_sms": ce(Dx(F(s_data)), s_label) + cycle_weight * mse(G(F(s_data)), s_data),
        }
    returned = {
        "D_ms": nb.Train_D_ms(Dx, Dy, G, m_data, m_label, optimizer=frozen_d),
        "D_sm": nb.Train_D_sm(Dx, Dy, F, s_data, s_label, optimizer=frozen_d),
        "G_msm": nb.Train_G_msm(Dy, G, F, m_data, m_label, optimizer=frozen_g),
        "G_sms": nb.Train_G_sms(Dx, G, F, s_data, s_label, optimizer=frozen_g),
    }
    for name, value in expected.items():
        assert returned[name] == pytest.approx(value.item(), rel=1e-5), name


def test_default_optimizers_are_the_notebooks(nb):
    (m_data, m_label), _ = batches()
    gan = small_gan(nb)
    with pytest.raises(RuntimeError, match="d_optimizer"):
        nb.Train_D_ms(gan.Dx, gan.Dy, gan.G, m_data, m_label)
    nb.d_optimizer, nb.g_optimizer = gan.d_optimizer, gan.g_optimizer
    before = parameters_of(gan.Dx)
    nb.Train_D_ms(gan.Dx, gan.Dy, gan.G, m_data, m_label)
    assert changed(gan.Dx, before)
    before = parameters_of(gan.G)
    nb.Train_G_msm(gan.Dy, gan.G, gan.F, m_data, m_label)
    assert changed(gan.G, before)


def test_two_class_discriminator_ignores_digits(nb, monkeypatch):
    gan = small_gan(nb, num_classes=2)
    (m_data, m_label), (s_data, s_label) = batches()
    targets_seen = []
    original = nb.classification_loss

    def recording_loss(logits, targets):
        targets_seen.append(targets)
        return original(logits, targets)

    monkeypatch.setattr(nb, "classification_loss", recording_loss)
    losses = nb.train_iteration(gan, (m_data, m_label), (s_data, s_label))
    assert set(losses) == {"D_ms", "D_sm", "G_msm", "G_sms"}
    assert all(math.isfinite(value) for value in losses.values())
    assert set(torch.cat(targets_seen).tolist()) == {0, 1}


def test_partial_batch_trains(nb):
    gan = small_gan(nb)
    (m_data, m_label), (s_data, s_label) = batches(size=3)
    losses = nb.train_iteration(gan, (m_data, m_label), (s_data[:2], s_label[:2]))
    assert all(math.isfinite(value) for value in losses.values())


def test_batch_stream_covers_epoch_with_partial_batch(nb):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2)
    stream = nb.BatchStream(images, torch.arange(10), 4, seed=0, device="cpu")
    sizes, seen = [], []
    for _ in range(3):
        batch, labels = next(stream)
        sizes.append(len(batch))
        seen.extend(labels.tolist())
        # Each image's pixels equal its index, so images and labels must stay paired.
        assert torch.equal(((batch[:, 0, 0, 0] + 1) * 127.5).round().long(), labels)
    assert sizes == [4, 4, 2]
    assert sorted(seen) == list(range(10))
    assert len(next(stream)[0]) == 4  # a new epoch starts with a full batch


def test_batch_stream_reshuffles_each_full_epoch(nb):
    """With a data size that the batch size divides, each epoch yields every image once, in a new order."""
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1)
    stream = nb.BatchStream(images, torch.arange(8), 4, seed=0, device="cpu")
    epochs = [torch.cat([next(stream)[1] for _ in range(2)]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == list(range(8))
    assert sorted(epochs[1]) == list(range(8))
    assert epochs[0] != epochs[1]


# Data


def test_svhn_label_10_becomes_digit_0(nb, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": images.transpose(1, 2, 3, 0),
                            "y": np.array([[10], [1], [9], [10]], dtype=np.uint8)})
    loaded, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0, 1, 9, 0]
    assert loaded.shape == (4, 3, 32, 32)
    assert torch.equal(loaded, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_single_svhn_image_in_three_dimensions(nb, tmp_path):
    """MATLAB saves one image of shape (32, 32, 3, 1) as (32, 32, 3), as it drops trailing dimensions of size 1."""
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": image, "y": np.array([[10]], dtype=np.uint8)})
    loaded, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0]
    assert torch.equal(loaded, torch.from_numpy(image).permute(2, 0, 1)[None])


def test_svhn_labels_from_zero_rejected(nb, tmp_path):
    """Labels already mapped to 0-9 are not SVHN's format, in which 10 stands for the digit 0."""
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 3), dtype=np.uint8),
                            "y": np.array([[0], [1], [2]], dtype=np.uint8)})
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    message = str(error.value)
    assert message.startswith(f"{path}: SVHN labels must be 1-10, with 10 for the digit 0, found [0, 1, 2]")
    assert message.endswith("replace it with the original")


def test_complex_svhn_labels_rejected(nb, tmp_path):
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), dtype=np.uint8), "y": np.array([[1 + 1j], [2 + 0j]])})
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path}: labels y must be whole numbers;")


def test_swapped_mnist_splits_warned(nb, tmp_path, capsys):
    write_tiny_data(tmp_path, train=6, test=12)
    mnist = nb.load_mnist(tmp_path, download=False)
    assert len(mnist.train_labels) == 6
    assert "hold fewer images (6) than the test files (12)" in capsys.readouterr().out


def test_svhn_missing_offline_names_files_and_fallback(nb, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(nb, "download_checked", offline)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_svhn(tmp_path)
    message = str(error.value)
    assert "train_32x32.mat" in message
    assert str(tmp_path / "svhn") in message
    assert "TARGET_DOMAIN='synthetic'" in message
    assert "--set TARGET_DOMAIN=synthetic" in message
    assert message.endswith("with `--set TARGET_DOMAIN=synthetic` on scripts/run_notebooks.sh.")


def test_download_off_names_missing_files(nb, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("DOWNLOAD=False must not download")

    monkeypatch.setattr(nb, "download_checked", no_download)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_svhn(tmp_path, download=False)
    assert f"SVHN file {tmp_path / 'svhn' / 'train_32x32.mat'} is missing and DOWNLOAD is False." in str(error.value)
    assert "TARGET_DOMAIN='synthetic'" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert "are missing in" in str(error.value)
    assert "DOWNLOAD is False" in str(error.value)
    assert not (tmp_path / "svhn").exists()
    assert not (tmp_path / "mnist").exists()


def gzip_mnist_files(raw):
    """Replace each MNIST file in `raw` with its .gz archive, as torchvision downloads them."""
    for path in sorted(raw.iterdir()):
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as archive:
            archive.write(path.read_bytes())
        path.unlink()


def test_mnist_archives_unpack_without_download(nb, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("DOWNLOAD=False must not download")

    monkeypatch.setattr(nb, "download_checked", no_download)
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    expected = nb.load_mnist(tmp_path, download=False)
    gzip_mnist_files(raw)
    mnist = nb.load_mnist(tmp_path, download=False)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert torch.equal(mnist.test_labels, expected.test_labels)
    assert sorted(path.name for path in raw.iterdir() if not path.name.endswith(".gz")) == sorted(nb.MNIST_RAW_FILES)


# Archives damaged in other ways than a cut. A download never leaves these, so each may be a file the user put there.
DAMAGED_ARCHIVES = [
    (lambda archive: b"not gzip at all", "is not a whole gzip file (BadGzipFile"),
    (lambda archive: archive + b"\x1f\x8b", "contains a whole gzip stream of"),
    (lambda archive: archive + b"junk", "contains a whole gzip stream of"),
    (lambda archive: gzip.compress(b"<html>404 Not Found</html>"),
     "does not unpack to a valid MNIST file: it does not start with the idx header 2051"),
]
DAMAGED_IDS = ["not-gzip", "whole-then-cut", "whole-then-junk", "not-mnist"]


@pytest.mark.parametrize("damage, problem", DAMAGED_ARCHIVES, ids=DAMAGED_IDS)
def test_bad_mnist_archive_names_it(nb, tmp_path, damage, problem):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    archive = raw / "t10k-images-idx3-ubyte.gz"
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert str(error.value).startswith(f"{archive} {problem}")
    assert "delete it to download it again" in str(error.value)
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    assert not (raw / "t10k-images-idx3-ubyte.partial").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
def test_full_disk_keeps_earlier_figure(nb, tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "FIGURE_DIR", tmp_path)
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    nb.save_figure(fig, "confusion")
    earlier = {path.name: path.read_bytes() for path in nb.pending_figures().iterdir()}
    monkeypatch.setattr(nb, "open_new_file", opener_onto_full_disk(".pdf.partial", nb.open_new_file))
    with pytest.raises(OSError) as error:
        nb.save_figure(fig, "confusion")
    nb.plt.close(fig)
    pdf = nb.pending_figures() / f"{nb.RUN_NAME}_confusion.pdf"
    assert str(error.value).startswith(f"writing {pdf} failed (No space left on device); ")
    assert str(error.value).endswith(f"The earlier {pdf.name} is unchanged, and the checkpoints are kept, so a "
                                     f"rerun reuses the trained models.")
    assert {path.name: path.read_bytes() for path in nb.pending_figures().iterdir()} == earlier


def test_file_in_way_of_report_folder_named(nb, tmp_path):
    """A file where the results folder belongs is named as in the way, not taken for a full disk."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    path = blocker / "run.json"
    with pytest.raises(OSError) as error:
        nb.write_report_file(path, lambda file: file.write(b"{}"))
    assert str(error.value).startswith(f"writing {path} failed (File exists): {blocker} is in the way. Remove or "
                                       f"rename it, or set REPORT_DIR to another folder.")
    assert blocker.read_text() == "not a folder"


def test_figures_published_with_results(nb, tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "FIGURE_DIR", tmp_path)
    (tmp_path / f"{nb.RUN_NAME}_confusion.png").write_bytes(b"the last finished run's")
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    pngs = {name: nb.save_figure(fig, name) for name in nb.FIGURE_NAMES}
    nb.plt.close(fig)
    png = pngs["confusion"]
    assert png == tmp_path / f".pending_{nb.RUN_NAME}_{nb.pending_token}" / f"{nb.RUN_NAME}_confusion.png"
    assert (tmp_path / f"{nb.RUN_NAME}_confusion.png").read_bytes() == b"the last finished run's"
    published = nb.publish_figures()
    assert published[-2:] == [tmp_path / f"{nb.RUN_NAME}_class_preservation.pdf",
                              tmp_path / f"{nb.RUN_NAME}_class_preservation.png"]
    assert len(published) == 2 * len(nb.FIGURE_NAMES)
    assert (tmp_path / f"{nb.RUN_NAME}_confusion.png").read_bytes().startswith(b"\x89PNG")
    assert not png.parent.exists()


def test_published_figure_names_synced(nb, tmp_path, monkeypatch):
    """FIGURE_DIR is synced once the published figures have their names there."""
    published, synced_names = publish_recording_syncs(nb, tmp_path, monkeypatch)
    assert {path.name for path in published} <= synced_names


def test_stray_bytes_after_archive_counted(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    expected = nb.load_mnist(tmp_path, download=False)
    gzip_mnist_files(raw)
    archive = raw / "t10k-labels-idx1-ubyte.gz"
    whole = archive.read_bytes()
    archive.write_bytes(whole + b"junk")
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert f"stream of {len(whole):,d} bytes, followed by 4 stray bytes" in str(error.value)
    assert f"cut it to its first {len(whole):,d} bytes" in str(error.value)
    with open(archive, "r+b") as file:     # the fix that the message gives
        file.truncate(len(whole))
    assert torch.equal(nb.load_mnist(tmp_path, download=False).test_labels, expected.test_labels)


def test_cut_mnist_archive_named_offline(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    archive = raw / "t10k-images-idx3-ubyte.gz"
    cut = archive.read_bytes()[:1000]
    archive.write_bytes(cut)
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert str(error.value).startswith(f"{archive} is cut short (1,000 bytes), as an interrupted download leaves it")
    assert "Delete it and set DOWNLOAD=True to download it again" in str(error.value)
    assert archive.read_bytes() == cut


def test_unreadable_mnist_archive_named(nb, tmp_path, monkeypatch):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    archive = raw / "t10k-images-idx3-ubyte.gz"
    monkeypatch.setattr(nb.gzip, "open", opener_denying(archive, gzip.open))
    with pytest.raises(OSError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert str(error.value) == (f"cannot read {archive} (Permission denied). Make it readable, or delete it to "
                                f"download it again")


def test_unwritable_mnist_folder_names_fix(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    # A folder where the temporary file goes: opening it for writing fails even as root, which a chmod does not do.
    (raw / "train-images-idx3-ubyte.partial").mkdir()
    with pytest.raises(OSError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert f"cannot unpack {raw / 'train-images-idx3-ubyte.gz'} because {raw} cannot be written" in str(error.value)
    assert "set DATA_DIR to a folder that can be written" in str(error.value)


@pytest.mark.parametrize("replace", [
    lambda path: path.mkdir(),
    lambda path: path.symlink_to(path.parent / "no-such-file"),
], ids=["folder", "broken-link"])
@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_mnist_name_not_file_is_named(nb, tmp_path, replace, name):
    """A folder or a broken link where a file or archive belongs is named, not only reported as missing."""
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    replace(raw / name)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert message.startswith(f"MNIST files t10k-images-idx3-ubyte are missing in {raw}")
    assert message.endswith(f"These names in that folder are neither files nor links to files: {name}. Replace "
                            f"them with the files.")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, where every write fails")
def test_full_disk_while_unpacking_names_archive(nb, tmp_path, monkeypatch):
    real_copy = nb.shutil.copyfileobj

    def copy_onto_full_disk(source, target):
        target.write(source.read(100))           # the start lands in the partial file
        with open("/dev/full", "wb") as full:    # the rest meets a real "no space left"
            real_copy(source, full)

    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    monkeypatch.setattr(nb.shutil, "copyfileobj", copy_onto_full_disk)
    with pytest.raises(OSError) as error:
        nb.load_mnist(tmp_path, download=False)
    message = str(error.value)
    archive = raw / "train-images-idx3-ubyte.gz"
    assert message.startswith(f"unpacking {archive} to {raw / 'train-images-idx3-ubyte'} failed (OSError: No space")
    assert re.search(r"The four MNIST files take 55 MB unpacked; [\d,.]+ MiB are free in ", message)
    assert message.endswith(f"free in {raw}. Free disk space there, or set DATA_DIR to a folder with room for them")
    assert not (raw / "train-images-idx3-ubyte.partial").exists()


def test_stale_partial_link_not_followed(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    expected = nb.load_mnist(tmp_path, download=False)
    gzip_mnist_files(raw)
    (tmp_path / "notes.txt").write_text("mine")
    (raw / "train-images-idx3-ubyte.partial").symlink_to(tmp_path / "notes.txt")
    mnist = nb.load_mnist(tmp_path, download=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert torch.equal(mnist.train_images, expected.train_images)


UNPACK_LIMIT_SCRIPT = """
import resource, sys
from tools.nbdefs import load_definitions
nb = load_definitions("part2_cyclegan.ipynb", env={"PROFILE": "smoke", "DATA_DIR": sys.argv[1],
                                                   "REPORT_DIR": sys.argv[1], "CHECKPOINT_DIR": sys.argv[1]})
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    nb.load_mnist(sys.argv[1], download=False)
except OSError as error:
    print(error)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-size limits as on Linux")
def test_file_size_limit_while_unpacking_named(repo_root, tmp_path):
    """A real `ulimit -f` below the size of an MNIST file: the advice is to raise it."""
    write_tiny_data(tmp_path, train=12, test=6)                 # 12 images: 9,424 bytes unpacked
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(raw)
    completed = subprocess.run([sys.executable, "-c", UNPACK_LIMIT_SCRIPT, str(tmp_path)], cwd=repo_root,
                               capture_output=True, text=True, check=True)
    message = completed.stdout.strip()
    assert message.startswith(f"unpacking {raw / 'train-images-idx3-ubyte.gz'} to ")
    assert "failed (OSError: File too large)." in message
    assert message.endswith(f"free in {raw}, but this process may write no file larger than 4,096 bytes "
                            f"(ulimit -f). Raise that limit, or set DATA_DIR to a folder with room for them")
    assert not list(raw.glob("*.partial"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, where every write fails")
def test_full_disk_keeps_previous_checkpoint(nb, tmp_path, monkeypatch):
    path = tmp_path / "gan.pt"
    nb.save_checkpoint(path, {"step": torch.tensor(3)})
    monkeypatch.setattr(nb.torch, "save", save_onto_full_disk(torch.save))
    with pytest.raises(OSError) as error:
        nb.save_checkpoint(path, {"step": torch.tensor(4), "weights": torch.zeros(2**18)})
    message = str(error.value)
    assert message.startswith(f"writing checkpoint {path} failed (")
    assert "Its tensors take 1.0 MiB; " in message
    assert f"free in {tmp_path}. Free disk space there, or set CHECKPOINT_DIR to another folder." in message
    assert message.endswith(f"{path} still holds the previous checkpoint, from which a rerun continues.")
    assert not path.with_suffix(".tmp").exists()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 3


def test_home_folder_in_settings_expanded(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    nb = load(repo_root, TARGET_DOMAIN="synthetic", CHECKPOINT_DIR="~/checkpoints", REPORT_DIR="~/report")
    assert nb.RUN_CHECKPOINT_DIR == tmp_path / "checkpoints" / "part2_smoke_synthetic"
    assert nb.RESULTS_PATH == tmp_path / "report" / "results" / "part2_smoke_synthetic.json"
    write_tiny_data(tmp_path / "data", train=12, test=6)
    assert len(nb.load_mnist("~/data").train_labels) == 12


def serve_svhn_files(nb, server, monkeypatch, serve_folder, corrupt_md5=False):
    """Point SVHN's sources at a local HTTP server of tiny .mat files in `server`, with their MD5 sums."""
    write_tiny_data(server, train=12, test=6)
    base_url = serve_folder(server / "svhn")
    sources = {}
    for split, (_, filename, _) in nb.SVHN_SOURCES.items():
        md5 = hashlib.md5((server / "svhn" / filename).read_bytes()).hexdigest()
        sources[split] = (f"{base_url}/{filename}", filename, "0" * 32 if corrupt_md5 else md5)
    monkeypatch.setattr(nb, "SVHN_SOURCES", sources)
    return sources


def test_svhn_download_checked_and_loaded(nb, tmp_path, monkeypatch, serve_folder):
    """The real download and MD5 check, from a local HTTP server in place of SVHN's."""
    serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    expected = nb.load_svhn(tmp_path / "server", download=False)
    svhn = nb.load_svhn(tmp_path / "data", download=True)
    assert sorted(path.name for path in (tmp_path / "data" / "svhn").iterdir()) == ["test_32x32.mat",
                                                                                   "train_32x32.mat"]
    assert torch.equal(svhn.train_images, expected.train_images)
    assert torch.equal(svhn.test_labels, expected.test_labels)


def test_svhn_download_names_synced(nb, tmp_path, monkeypatch, serve_folder):
    """The SVHN folder is synced once each downloaded file has its name."""
    serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    synced = record_syncs(monkeypatch)
    nb.load_svhn(tmp_path / "data", download=True)
    files = [filename for _, filename, _ in nb.SVHN_SOURCES.values()]
    assert [sorted(names) for _, names in synced.folders] == [sorted(files[:count]) for count in (1, 2)]


def test_svhn_download_wrong_md5_removed(nb, tmp_path, monkeypatch, serve_folder):
    sources = serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder, corrupt_md5=True)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_svhn(tmp_path / "data", download=True)
    message = str(error.value)
    assert message.startswith(f"SVHN file {tmp_path / 'data' / 'svhn' / 'train_32x32.mat'} is missing and the "
                              f"download from {sources['train'][0]} failed (")
    assert "TARGET_DOMAIN='synthetic'" in message
    assert not (tmp_path / "data" / "svhn").exists()


def test_svhn_reply_longer_than_file_rejected(nb, tmp_path, monkeypatch, serve_folder):
    """A reply longer than the file it should be is cut off there, so that an endless one cannot fill the disk."""
    sources = serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    monkeypatch.setitem(nb.DOWNLOAD_SIZES, "train_32x32.mat", 100)
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path / "data", "train")
    assert str(error.value).startswith(f"SVHN file {tmp_path / 'data' / 'svhn' / 'train_32x32.mat'} is missing and "
                                       f"the download from {sources['train'][0]} failed (the reply is longer than "
                                       f"the 100 bytes of the file, so it is not that file). ")
    assert not (tmp_path / "data").exists()


def test_svhn_download_of_exact_size_accepted(nb, tmp_path, monkeypatch, serve_folder):
    """A reply exactly as long as the file's size in DOWNLOAD_SIZES is accepted as that file."""
    serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    served = (tmp_path / "server" / "svhn" / "train_32x32.mat").read_bytes()
    monkeypatch.setitem(nb.DOWNLOAD_SIZES, "train_32x32.mat", len(served))
    path = nb.svhn_file(tmp_path / "data", "train")
    assert path.read_bytes() == served


def test_trickled_svhn_download_times_out(nb, tmp_path, monkeypatch, serve_folder):
    """A server that sends a byte every 50 ms never lets the socket's timeout expire, but falls below the rate."""
    sources = serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    trickling = serve_folder(tmp_path / "server" / "svhn", trickle_every=0.05) + "/train_32x32.mat"
    monkeypatch.setitem(nb.SVHN_SOURCES, "train", (trickling, *sources["train"][1:]))
    monkeypatch.setattr(nb, "DOWNLOAD_TIMEOUT_S", 1)
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path / "data", "train")
    assert re.search(r"failed \(\d+ bytes arrived in the last 1 s, fewer than DOWNLOAD_MIN_RATE \(10,000 bytes per "
                     r"second\) allows\)\. ", str(error.value))
    assert not (tmp_path / "data").exists()


def test_long_download_prints_progress(nb, tmp_path, monkeypatch, serve_folder, capsys):
    """With no interval, each piece that arrives prints a line, and the last names the whole file and SVHN's size."""
    serve_svhn_files(nb, tmp_path / "server", monkeypatch, serve_folder)
    monkeypatch.setattr(nb, "DOWNLOAD_PROGRESS_S", 0)
    path = nb.svhn_file(tmp_path / "data", "train")
    assert capsys.readouterr().out.splitlines()[-1] == f"  {path.stat().st_size / 2**20:,.1f} MiB of 173.6 MiB"


def forbidden_download(url, *args, **kwargs):
    """Stand in for download_checked where a test must fail, not reach a real server, if one is tried."""
    raise AssertionError(f"no download may be tried here, but {url} was")


def serve_mnist_archives(nb, root, monkeypatch, serve_folder, train=12, test=6, tls=False):
    """Serve tiny MNIST archives from a local mirror in place of torchvision's, with their MD5s.

    Returns the MNIST that the served files contain and the folder of the archives.
    """
    write_tiny_data(root, train=train, test=test)
    served = root / "mnist" / "MNIST" / "raw"
    expected = nb.load_mnist(root, download=False)
    gzip_mnist_files(served)
    resources = [(path.name, hashlib.md5(path.read_bytes()).hexdigest()) for path in sorted(served.iterdir())]
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", [serve_folder(served, tls=tls) + "/"])
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "resources", resources)
    return expected, served


def endless_trailers(connection, stopping):
    """A whole chunked body of 10 bytes, then trailer lines without end, which http.client reads in a loop."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n")
    while not stopping.is_set():
        connection.sendall(b"X-Trailer: 0123456789012345678901234567890123456789\r\n" * 1000)


def endless_interim_replies(connection, stopping):
    """Interim 100 Continue replies without end, which http.client skips in a loop before the real one."""
    while not stopping.is_set():
        connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)


def trickled_headers(connection, stopping):
    """A reply whose status line and headers arrive one byte every 50 ms."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Padding: " + b"x" * 1000 + b"\r\n\r\n0123456789":
        if stopping.is_set():
            return
        connection.sendall(bytes([byte]))
        time.sleep(0.05)


def cut_short(connection, stopping):
    """A reply that announces 100,000 bytes and closes after 3,000."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 3000)


@pytest.mark.parametrize("reply", [endless_trailers, endless_interim_replies])
def test_endless_reply_parts_stopped(nb, tmp_path, serve_raw, reply):
    """Bytes that are not the body count too, so that a server cannot hold a download open with them."""
    with open(tmp_path / "download", "wb") as file, pytest.raises(ConnectionError) as error:
        nb.download_into(serve_raw(reply) + "/file", file, 100)
    assert str(error.value) == ("the server sent more than 1,048,776 bytes in all, far more than the file and the "
                                "reply's headers take")


def test_trickled_headers_time_out(nb, tmp_path, monkeypatch, serve_raw):
    """The rate counts from the first byte of the reply, headers included."""
    monkeypatch.setattr(nb, "DOWNLOAD_TIMEOUT_S", 1)
    with open(tmp_path / "download", "wb") as file, pytest.raises(TimeoutError) as error:
        nb.download_into(serve_raw(trickled_headers) + "/file", file, 100)
    assert re.fullmatch(r"\d+ bytes arrived in the last 1 s, fewer than DOWNLOAD_MIN_RATE \(10,000 bytes per "
                        r"second\) allows", str(error.value))


def test_svhn_reply_cut_short_named(nb, tmp_path, monkeypatch, serve_raw):
    url = serve_raw(cut_short) + "/train_32x32.mat"
    monkeypatch.setitem(nb.SVHN_SOURCES, "train", (url, "train_32x32.mat", "0" * 32))
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path / "data", "train")
    assert str(error.value).startswith(f"SVHN file {tmp_path / 'data' / 'svhn' / 'train_32x32.mat'} is missing and "
                                       f"the download from {url} failed (the connection closed after 3,000 bytes, "
                                       f"97,000 bytes before the end that the server announced). ")
    assert not (tmp_path / "data").exists()


def test_redirect_to_ftp_rejected(nb, tmp_path, serve_raw):
    """urllib follows a redirect to ftp, where the checks of the reply would not apply."""
    def to_ftp(connection, stopping):
        connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:9/file\r\nContent-Length: 0\r\n\r\n")

    with open(tmp_path / "download", "wb") as file, pytest.raises(OSError) as error:
        nb.download_into(serve_raw(to_ftp) + "/file", file, 100)
    assert str(error.value) == ("HTTP Error 302: a redirect to ftp://127.0.0.1:9/file, which is not an http or https "
                                "address")


def test_error_after_redirect_named(nb, tmp_path, serve_raw):
    """urllib's message for an HTTP error names no address, and the caller's names the first one."""
    requests = []

    def moved_then_missing(connection, stopping):
        requests.append(1)
        if len(requests) == 1:
            connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n")
        else:
            connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    url = serve_raw(moved_then_missing)
    with open(tmp_path / "download", "wb") as file, pytest.raises(urllib.error.HTTPError) as error:
        nb.download_into(url + "/old", file, 100)
    assert str(error.value) == f"HTTP Error 404: Not Found, from {url}/new after a redirect"


def test_redirects_limited_to_three(nb, tmp_path, serve_raw):
    """Each reply may take up to about twice DOWNLOAD_TIMEOUT_S, so urllib's ten redirects would multiply that."""
    requests = []

    def onward(connection, stopping):
        requests.append(1)
        connection.sendall(f"HTTP/1.1 302 Found\r\nLocation: /{len(requests)}\r\nContent-Length: 0\r\n\r\n".encode())

    with open(tmp_path / "download", "wb") as file, pytest.raises(urllib.error.HTTPError):
        nb.download_into(serve_raw(onward) + "/0", file, 100)
    assert len(requests) == 4


def test_chunked_reply_cut_short_named(nb, tmp_path, serve_raw):
    def cut_chunk(connection, stopping):
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2710\r\n" + b"x" * 5000)

    with open(tmp_path / "download", "wb") as file, pytest.raises(ConnectionError) as error:
        nb.download_into(serve_raw(cut_chunk) + "/file", file, 20_000)
    assert str(error.value) == "the connection closed after 5,000 bytes, before the end of the reply"


def test_http_error_closes_socket(nb, tmp_path, serve_folder):
    """urllib's HTTPError keeps its reply's socket open, and the notebook's error keeps the HTTPError, as IPython
    keeps the last error."""
    url = serve_folder(tmp_path) + "/missing"
    open_files = len(os.listdir("/proc/self/fd"))
    errors = []
    for _ in range(5):
        with open(tmp_path / "download", "wb") as file, pytest.raises(urllib.error.HTTPError) as error:
            nb.download_into(url, file, 100)
        errors.append(error.value)
    # The test server's threads close their side of each connection after the reply, perhaps a moment after
    # the client has read it, and they count here too. A socket that the kept errors hold stays open.
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) != open_files and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) == open_files


SHARED_DOWNLOAD_CODE = ("download_timeout", "CheckedReader", "CheckedResponse", "WebRedirects", "checked_opener",
                        "missing_folders", "remove_empty_folders", "locked_folder", "error_text", "open_new_file",
                        "sync_file", "unsynced_folders", "sync_folder")


def test_download_code_same_in_notebooks(repo_root):
    """Both notebooks carry their own copy of the download code, since each must run alone. The copies agree."""
    def definitions(notebook):
        found = {}
        for cell in nbformat.read(repo_root / notebook, as_version=4).cells:
            if cell.cell_type == "code":
                for node in ast.parse(cell.source).body:
                    name = getattr(node, "name", None)
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                        name = node.targets[0].id
                    if name in SHARED_DOWNLOAD_CODE:
                        found[name] = ast.get_source_segment(cell.source, node)
        return found

    part1_code, part2_code = definitions("part1_lstm.ipynb"), definitions(NOTEBOOK)
    assert sorted(part2_code) == sorted(SHARED_DOWNLOAD_CODE)
    assert part1_code == part2_code


def test_mnist_download_from_mirror(nb, tmp_path, monkeypatch, serve_folder):
    """The real MNIST download, MD5 check and unpacking, from a local HTTP mirror of tiny archives."""
    expected, _ = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    mnist = nb.load_mnist(tmp_path / "data", download=True)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert torch.equal(mnist.test_labels, expected.test_labels)


def test_mnist_files_synced_in_full(nb, tmp_path, monkeypatch, serve_folder):
    """Each downloaded MNIST archive and each unpacked file is synced with all its bytes before it takes its name."""
    serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    synced = record_syncs(monkeypatch)
    nb.load_mnist(tmp_path / "data", download=True)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    assert sorted(synced.files) == sorted(identity(path) for path in raw.iterdir())


def test_mnist_names_synced(nb, tmp_path, monkeypatch, serve_folder):
    """The MNIST folder is synced once each downloaded archive, and then its unpacked file, has its name."""
    serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    synced = record_syncs(monkeypatch)
    nb.load_mnist(tmp_path / "data", download=True)
    named, expected = [], []
    for name in nb.MNIST_RAW_FILES:
        for file in (f"{name}.gz", name):
            named.append(file)
            expected.append(sorted(named))
    assert [sorted(names) for _, names in synced.folders] == expected


def test_mnist_download_over_https(nb, tmp_path, monkeypatch, serve_folder):
    """torchvision's first MNIST mirror is https, which the notebook's own HTTPS handler must reach."""
    expected, _ = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder, tls=True)
    mnist = nb.load_mnist(tmp_path / "data", download=True)
    assert torch.equal(mnist.train_images, expected.train_images)


def test_mnist_download_sends_torchvision_agent(nb, tmp_path, monkeypatch, serve_folder):
    """The requests name torchvision as their User-Agent, as torchvision's own downloads do."""
    serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    nb.load_mnist(tmp_path / "data", download=True)
    assert serve_folder.user_agents == [nb.torchvision.datasets.utils.USER_AGENT] * 4


def test_interrupted_svhn_download_leaves_nothing(nb, tmp_path, monkeypatch, serve_folder):
    """Ctrl-C in a stalled download: no partial file under the data file's name, no created folder."""
    write_tiny_data(tmp_path / "server", train=12, test=6)
    base_url = serve_folder(tmp_path / "server" / "svhn", stall_after=1000)
    monkeypatch.setattr(nb, "SVHN_SOURCES", {split: (f"{base_url}/{filename}", filename, md5)
                                             for split, (_, filename, md5) in nb.SVHN_SOURCES.items()})
    monkeypatch.setattr(nb, "DOWNLOAD_TIMEOUT_S", 20)      # longer than the interrupt takes to arrive
    # Python raises KeyboardInterrupt only where SIGINT has its default handler, and a shell starts a
    # background job, such as a CI script run with &, with SIGINT ignored. Sent to the main thread, the
    # signal interrupts its blocked read.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(1.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            nb.load_svhn(tmp_path / "data", download=True)
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, previous_handler)
    assert not (tmp_path / "data").exists()


def test_rejected_mnist_archive_removed(nb, tmp_path, monkeypatch, serve_folder):
    """An archive that fails its MD5 check is deleted, so that the next run cannot unpack it as data."""
    write_tiny_data(tmp_path / "server", train=12, test=6)
    served = tmp_path / "server" / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(served)
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", [serve_folder(served) + "/"])
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "resources",
                        [(path.name, "0" * 32) for path in sorted(served.iterdir())])
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    served_md5 = hashlib.md5((served / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert "train-images-idx3-ubyte.gz: the downloaded file (" in str(error.value)
    assert f"has MD5 {served_md5}, not the {'0' * 32} of the original" in str(error.value)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("cut", [lambda archive: archive[:len(archive) // 2], lambda archive: archive[:-1],
                                 lambda archive: b"", lambda archive: archive[:1]],
                         ids=["half", "last-byte", "empty", "first-byte"])
def test_cut_mnist_archive_downloaded_again(nb, tmp_path, monkeypatch, serve_folder, capsys, cut):
    expected, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    archive = raw / "train-images-idx3-ubyte.gz"
    archive.write_bytes(cut((served / archive.name).read_bytes()))
    mnist = nb.load_mnist(tmp_path / "data", download=True)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert archive.read_bytes() == (served / archive.name).read_bytes()
    assert f"NOTE: {archive} is cut short, as an interrupted download leaves it" in capsys.readouterr().out


@pytest.mark.parametrize("damage, problem", DAMAGED_ARCHIVES, ids=DAMAGED_IDS)
def test_damaged_mnist_archive_kept_with_download(nb, tmp_path, monkeypatch, serve_folder, damage, problem):
    """Only an archive cut short is downloaded again, because other damage may be a file that the user put there."""
    _, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    archive = raw / "train-images-idx3-ubyte.gz"
    damaged = damage((served / archive.name).read_bytes())
    archive.write_bytes(damaged)
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    assert str(error.value).startswith(f"{archive} {problem}")
    assert archive.read_bytes() == damaged


def test_cut_mnist_archive_kept_beside_damaged(nb, tmp_path, monkeypatch, serve_folder, capsys):
    """A cut archive is deleted only after every archive has been checked, so a damaged one stops the run first."""
    _, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    cut = raw / "train-images-idx3-ubyte.gz"
    cut.write_bytes((served / cut.name).read_bytes()[:100])
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="is not a whole gzip file"):
        nb.load_mnist(tmp_path / "data", download=True)
    assert cut.stat().st_size == 100
    assert "NOTE" not in capsys.readouterr().out


def test_undeletable_mnist_archive_named(nb, tmp_path, monkeypatch, serve_folder):
    _, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    archive = raw / "train-images-idx3-ubyte.gz"
    archive.write_bytes((served / archive.name).read_bytes()[:100])
    real_unlink = Path.unlink

    def unlink_denied(path, *args, **kwargs):   # a sticky folder denies it, but not to root, who may run the tests
        if path == archive:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink_denied)
    with pytest.raises(OSError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    assert str(error.value) == (f"{archive} is cut short, as an interrupted download leaves it, and cannot be deleted "
                                f"(Operation not permitted). Delete it, or make its folder writable")


def test_mnist_download_keeps_present_files(nb, tmp_path, monkeypatch, serve_folder):
    """Only the missing file is downloaded, and the others, here different from the mirror's, keep their bytes."""
    expected, _ = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    write_tiny_data(tmp_path / "data", train=12, test=6, seed=1)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    present = {path.name: path.read_bytes() for path in raw.iterdir() if path.name != "t10k-images-idx3-ubyte"}
    (raw / "t10k-images-idx3-ubyte").unlink()
    mnist = nb.load_mnist(tmp_path / "data", download=True)
    assert {name: (raw / name).read_bytes() for name in present} == present
    assert torch.equal(mnist.test_images, expected.test_images)
    assert sorted(path.name for path in raw.iterdir()) == sorted([*nb.MNIST_RAW_FILES, "t10k-images-idx3-ubyte.gz"])


def test_mnist_download_tries_next_mirror(nb, tmp_path, monkeypatch, serve_folder):
    expected, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    dead_mirror = serve_folder(tmp_path / "server") + "/nowhere/"
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", [dead_mirror, serve_folder(served) + "/"])
    mnist = nb.load_mnist(tmp_path / "data", download=True)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert torch.equal(mnist.test_labels, expected.test_labels)


def test_failed_mnist_mirrors_all_named(nb, tmp_path, monkeypatch, serve_folder):
    mirrors = [serve_folder(tmp_path) + "/first/", serve_folder(tmp_path) + "/second/"]
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", mirrors)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    assert f"({mirrors[0]}train-images-idx3-ubyte.gz: HTTP Error 404" in str(error.value)
    assert f"; {mirrors[1]}train-images-idx3-ubyte.gz: HTTP Error 404" in str(error.value)
    assert not (tmp_path / "data").exists()


def test_mnist_stale_processed_cache_ignored(nb, tmp_path):
    """torchvision's MNIST would load an older version's processed/*.pt in place of the raw files."""
    write_tiny_data(tmp_path, train=12, test=6)
    expected = nb.load_mnist(tmp_path, download=False)
    processed = tmp_path / "mnist" / "MNIST" / "processed"
    processed.mkdir()
    for name in ("training.pt", "test.pt"):
        torch.save((torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(5, dtype=torch.long)), processed / name)
    mnist = nb.load_mnist(tmp_path, download=False)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert torch.equal(mnist.test_labels, expected.test_labels)


def test_unreadable_mnist_file_named(nb, tmp_path, monkeypatch):
    write_tiny_data(tmp_path, train=12, test=6)
    labels = tmp_path / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    monkeypatch.setattr(nb, "open", opener_denying(labels, open), raising=False)
    with pytest.raises(OSError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert str(error.value) == (f"cannot read {labels} (Permission denied). Make it readable, or replace it with "
                                f"the original")


def test_unwritable_mnist_folder_not_downloaded(nb, tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "download_checked", forbidden_download)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    # A folder where the write check's file goes makes writing fail even as root, which a chmod does not do.
    (raw / ".write-check").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path, download=True)
    assert str(error.value).startswith(f"MNIST files {', '.join(nb.MNIST_RAW_FILES)} are missing in {raw} and "
                                       f"cannot be downloaded, because this process cannot write to that folder (")
    assert str(error.value).endswith("Make it writable, or set DATA_DIR to a folder that is")


def test_mnist_folder_is_file_named(nb, tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "download_checked", forbidden_download)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.parent.mkdir(parents=True)
    raw.write_text("not a folder")
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path, download=True)
    assert str(error.value) == (f"MNIST's files go into {raw}, which is a file, not a folder. Move or rename it, or "
                                f"point DATA_DIR at another folder")


def test_mnist_folder_at_name_named(nb, tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "download_checked", forbidden_download)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path, download=True)
    assert str(error.value) == (f"MNIST files {', '.join(nb.MNIST_RAW_FILES)} are missing in {raw}, and they cannot "
                                f"be downloaded there because these names are folders: train-labels-idx1-ubyte. "
                                f"Remove or rename them, or set DATA_DIR to another folder")


def test_svhn_link_to_nowhere_not_followed(nb, tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    (folder / "train_32x32.mat").symlink_to(tmp_path / "elsewhere.mat")
    with pytest.raises(FileNotFoundError) as error:
        nb.load_svhn(tmp_path, download=True)
    assert str(error.value) == (f"{folder / 'train_32x32.mat'} is a link to {tmp_path / 'elsewhere.mat'}, which does "
                                f"not exist. Point the link at the SVHN file, or remove it to download the file")
    assert not (tmp_path / "elsewhere.mat").exists()


def test_failed_svhn_download_leaves_no_folder(nb, tmp_path, monkeypatch):
    def partial_then_offline(url, path, max_bytes, md5):
        path.write_bytes(b"partial")
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(nb, "download_checked", partial_then_offline)
    with pytest.raises(FileNotFoundError):
        nb.load_svhn(tmp_path / "data")
    assert not (tmp_path / "data").exists(), "a failed download must not leave folders or files behind"


def test_failed_mnist_download_leaves_nothing(nb, tmp_path, monkeypatch, serve_folder):
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", [serve_folder(tmp_path) + "/nowhere/"])
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    assert str(error.value).startswith(f"MNIST files {', '.join(nb.MNIST_RAW_FILES)} are missing in {raw} and "
                                       f"the download failed (")
    assert not (tmp_path / "data").exists(), "a failed download must not leave folders behind"


def test_mnist_normalised_background_is_minus_one(nb, tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 10:18, 12:16] = 255
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    write_mnist_idx(raw, "train", images, [0, 1, 2])
    write_mnist_idx(raw, "t10k", images[:2], [3, 4])
    mnist = nb.load_mnist(tmp_path)
    normalised = nb.to_model_range(mnist.train_images)
    assert normalised.shape == (3, 1, 32, 32)
    assert mnist.train_labels.tolist() == [0, 1, 2]
    assert mnist.test_labels.tolist() == [3, 4]
    assert normalised[:, :, :2].eq(-1).all()  # padding rows
    assert normalised[:, :, :, :2].eq(-1).all()  # padding columns
    assert normalised[0, 0, 0:12].eq(-1).all()  # background above the stroke
    assert normalised[0, 0, 12:20, 14:18].eq(1).all()  # the stroke, shifted by the padding


def test_saved_image_maps_range_to_black_and_white(nb, tmp_path):
    first = torch.tensor([[-1.0, 1.0], [-3.0, 3.0]]).view(1, 1, 2, 2)
    images = torch.cat([first, torch.zeros(1, 1, 2, 2)])
    path = tmp_path / "grid.png"
    nb.save_image_grid(images, path, columns=2)
    pixels = plt.imread(path)[..., :3]  # padding of 2 pixels around each image
    assert np.allclose(pixels[2, 2], 0.0)  # -1 is black
    assert np.allclose(pixels[2, 3], 1.0)  # 1 is white
    assert np.allclose(pixels[3, 2], 0.0)  # -3 is clamped to black
    assert np.allclose(pixels[3, 3], 1.0)  # 3 is clamped to white
    assert np.allclose(pixels[2, 6], 0.5, atol=1 / 255)  # 0 is mid-gray


def test_synthetic_digits_deterministic_with_every_class(nb):
    images, labels = nb.make_synthetic_digits(40, seed=5)
    again, again_labels = nb.make_synthetic_digits(40, seed=5)
    other, _ = nb.make_synthetic_digits(40, seed=6)
    assert images.shape == (40, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert torch.equal(images, again)
    assert torch.equal(labels, again_labels)
    assert not torch.equal(images, other)
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    assert images.float().std(dim=(1, 2, 3)).min() > 5  # no blank crops


def test_synthetic_digit_dominates_centre(nb):
    # Ink (distance from the background colour) must concentrate in the middle columns, where
    # the centre digit is, and not spread evenly as with three equal digits in the crop.
    images, _ = nb.make_synthetic_digits(200, seed=3)
    gray = images.float().mean(1)  # (N, 32, 32)
    edge_rows = torch.cat([gray[:, 0, :], gray[:, 31, :]], dim=1)
    background = edge_rows.median(dim=1).values.view(-1, 1, 1)
    ink = (gray - background).abs()
    centre = ink[:, :, 10:22].mean()
    sides = torch.cat([ink[:, :, :6], ink[:, :, 26:]], dim=2).mean()
    assert centre > 1.3 * sides


def test_synthetic_digits_match_their_labels(nb):
    """Each crop's ink matches the template of its own digit best, for most crops.

    The templates are every font's upright digits at the middle height, centred, and the match is the
    best normalised correlation over shifts of up to 3 pixels. In this computation 88% of these 100 crops match
    their label. With random labels 8% match, and with crops transposed by a wrong axis order 22%.
    """
    images, labels = nb.make_synthetic_digits(100, seed=3)
    gray = images.float().mean(1)
    background = torch.cat([gray[:, 0, :], gray[:, 31, :]], dim=1).median(dim=1).values.view(-1, 1, 1)
    ink = (gray - background).abs()
    ink = ink / ink.flatten(1).norm(dim=1).view(-1, 1, 1)
    scores = torch.full((len(images), 10), -1.0)
    for path in nb.digit_font_paths():
        font = nb.FT2Font(str(path))
        for digit in range(10):
            mask = nb.render_digit(font, digit, 20.5, 0.0)
            canvas = np.zeros((32, 32), dtype=np.float32)
            nb.paste_max(canvas, mask, 16 - mask.shape[0] // 2, 16 - mask.shape[1] // 2)
            template = torch.from_numpy(canvas) / float(np.linalg.norm(canvas))
            for rows in range(-3, 4):
                for columns in range(-3, 4):
                    shifted = torch.roll(template, (rows, columns), (0, 1))
                    scores[:, digit] = torch.maximum(scores[:, digit], (ink * shifted).sum(dim=(1, 2)))
    assert (scores.argmax(1) == labels).float().mean() > 0.6


def test_synthetic_digits_keep_contrast(nb):
    """Digit and background differ by at least 0.3 in luminance, so the middle of a typical crop spans more than 0.3.

    The spread is the 5th to 95th percentile of luminance, in [0, 1], over rows 6-25 and columns 10-21. Its
    median over these 100 crops is 0.39, and 0.15 when the contrast test is inverted.
    """
    pixels = nb.make_synthetic_digits(100, seed=3)[0].float() / 255.0
    luminance = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    middle = luminance[:, 6:26, 10:22].flatten(1)
    spread = middle.quantile(0.95, dim=1) - middle.quantile(0.05, dim=1)
    assert spread.median() > 0.3


def test_synthetic_pixels_clipped_not_wrapped(nb):
    """Values past 0 or 255 are clipped: no pixel differs by more than 200 from all four neighbours.

    A value that wrapped around in the uint8 conversion does. In these 100 crops the largest such
    difference is 132.
    """
    images = nb.make_synthetic_digits(100, seed=3)[0].float()
    inner = images[:, :, 1:-1, 1:-1]
    neighbours = (images[:, :, 1:-1, :-2], images[:, :, 1:-1, 2:], images[:, :, :-2, 1:-1], images[:, :, 2:, 1:-1])
    isolation = torch.stack([(inner - neighbour).abs() for neighbour in neighbours]).min(dim=0).values
    assert isolation.max() <= 200


def test_synthetic_test_set_apart_from_training(nb):
    """The synthetic test images are drawn apart from the training images, so that no test image is a training one."""
    domain = nb.load_target_domain("synthetic", "unused", 0, 0, 20, 20, seed=0)
    flat_train = domain.train_images.flatten(1)
    shared = [image for image in domain.test_images.flatten(1) if (flat_train == image).all(dim=1).any()]
    assert shared == []


def test_paste_max_clips_mask_at_edges(nb):
    mask = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    canvas = np.zeros((4, 4), dtype=np.float32)
    canvas[0, 1] = 7.0
    nb.paste_max(canvas, mask, -1, -1)  # only the mask's lower right 2x2 lands
    assert canvas[:2, :2].tolist() == [[5.0, 7.0], [8.0, 9.0]]
    assert canvas[2:].sum() == 0.0
    assert canvas[:, 2:].sum() == 0.0
    nb.paste_max(canvas, mask, 2, 3)  # only the mask's first column lands, in the last column
    assert canvas[2:, 3].tolist() == [1.0, 4.0]


# Evaluation mode


def test_eval_translation_independent_of_batch(nb):
    gan = small_gan(nb)
    for seed in range(3):  # give batch norm running statistics away from their start
        nb.train_iteration(gan, *batches(seed=seed))
    generator = torch.Generator().manual_seed(9)
    batch = torch.rand(8, 1, 32, 32, generator=generator) * 2 - 1
    other = batch.clone()
    other[1:] = torch.rand(7, 1, 32, 32, generator=generator) * 2 - 1
    alone = nb.translate(gan.G, batch[:1])
    assert torch.allclose(nb.translate(gan.G, batch)[:1], alone, atol=1e-6)
    assert torch.allclose(nb.translate(gan.G, other)[:1], alone, atol=1e-6)
    assert gan.G.training  # back in train mode
    with torch.no_grad():  # in train mode the rest of the batch does matter
        assert not torch.allclose(gan.G(batch)[:1], gan.G(other)[:1], atol=1e-6)


def test_sampling_restores_train_mode(nb):
    gan = small_gan(nb)
    gan.F.eval()
    m_fixed, s_fixed = batches()[0][0][:2], batches()[1][0][:2]
    samples = nb.sample_translations(gan, m_fixed, s_fixed, step=0)
    assert samples["G(m)"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        gan.G.eval()
        expected = gan.F(gan.G(m_fixed))
        gan.G.train()
    assert torch.equal(samples["F(G(m))"], expected), "the grid shows F(G(m)) in eval mode"
    assert samples["F(G(m))"].shape == (2, 1, 32, 32)
    assert gan.G.training
    assert not gan.F.training  # each network gets its own previous mode back


def test_sampling_out_of_memory_counts_images(nb, monkeypatch):
    gan = small_gan(nb)
    monkeypatch.setattr(nb, "translate", allocation_failure)
    with pytest.raises(MemoryError, match="sample grids at iteration 6 ran out of CPU memory in batches of 2 images"):
        nb.sample_translations(gan, batches()[0][0][:2], batches()[1][0][:2], step=6)


def test_failed_calibration_restores_batch_norm(tiny_run, monkeypatch):
    """update_bn sets momentum to None and train mode, and restores them only when it finishes."""
    gan = small_gan(tiny_run)
    gan.G.eval()
    monkeypatch.setattr(gan.G, "forward", allocation_failure)
    with pytest.raises(MemoryError, match="batch norm calibration ran out of CPU memory in batches of 8 images"):
        tiny_run.calibrate_batch_norm(gan)
    layers = [module for module in gan.G.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert [layer.momentum for layer in layers] == [0.1] * len(layers)
    assert not gan.G.training


def test_classifier_scoring_out_of_memory_keeps_training(tiny_run, tmp_path, monkeypatch):
    path = tmp_path / "classifier.pt"
    monkeypatch.setattr(tiny_run, "predict", allocation_failure)
    with pytest.raises(MemoryError, match="scoring the synthetic digit classifier ran out of CPU memory"):
        tiny_run.train_classifier(tiny_run.target, 4, 2, 0, path, batch_size=8)
    assert path.exists(), "the trained weights are saved before scoring"
    monkeypatch.undo()
    monkeypatch.setattr(tiny_run, "optimizer_step", allocation_failure)   # the rerun must not train
    _, accuracy = tiny_run.train_classifier(tiny_run.target, 4, 2, 0, path, batch_size=8)
    assert 0 <= accuracy <= 1


def test_classifier_learns_paired_labels(tiny_run, tmp_path):
    """Each digit is a white bar at its own place, which 30 steps learn, if images stay paired with labels."""
    labels = torch.arange(100) % 10
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    for index, digit in enumerate(labels.tolist()):
        row, column = divmod(digit, 5)
        images[index, :, 4 + 14 * row:12 + 14 * row, 2 + 6 * column:6 + 6 * column] = 255
    domain = tiny_run.DigitDomain("synthetic", images, labels, images, labels)
    _, accuracy = tiny_run.train_classifier(domain, 4, 30, 0, tmp_path / "classifier.pt", batch_size=20)
    assert accuracy > 0.9


def test_mean_image_error_in_batches(nb, monkeypatch):
    """Training images 0, 255, 255 average to 1/3 in [-1, 1] units, so a black test image is off by 4/3."""
    monkeypatch.setattr(nb, "EVAL_BATCH_SIZE", 1)
    train = torch.tensor([0, 255, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 32, 32).contiguous()
    test = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    assert nb.mean_image_error(train, test) == pytest.approx(16 / 9)
    assert nb.mean_image_error(train, train) == pytest.approx((2 * (1 / 3 - 1) ** 2 + (4 / 3) ** 2) / 3)


def test_class_preservation_counts(nb):
    class ConstantClassifier(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[:, 3] = 1.0
            return logits

    identity = torch.nn.Identity()
    images = torch.zeros(5, 1, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 3, 1, 0, 3])
    accuracy, confusion = nb.class_preservation(identity, ConstantClassifier(), images, labels)
    assert accuracy == pytest.approx(0.6)
    assert confusion[3, 3] == 3
    assert confusion[1, 3] == 1
    assert confusion.sum() == 5


def test_fingerprint_covers_every_tensor(nb):
    first = torch.arange(4)
    assert nb.tensor_fingerprint(first, torch.zeros(3)) == nb.tensor_fingerprint(first, torch.zeros(3))
    assert nb.tensor_fingerprint(first, torch.zeros(3)) != nb.tensor_fingerprint(first, torch.ones(3))


def test_fingerprint_covers_shape_and_dtype(nb):
    """The same bytes split, shaped or typed differently give different fingerprints."""
    values = torch.arange(6)
    assert nb.tensor_fingerprint(values[:2], values[2:]) != nb.tensor_fingerprint(values[:4], values[4:])
    assert nb.tensor_fingerprint(values) != nb.tensor_fingerprint(values.view(2, 3))
    assert nb.tensor_fingerprint(values) != nb.tensor_fingerprint(values.view(torch.float64))


def test_fingerprint_covers_training_labels(nb):
    """Two domains of the same images with other labels have different fingerprints."""
    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    first = nb.DigitDomain("mnist", images, labels, images, labels)
    relabelled = nb.DigitDomain("mnist", images, labels.flip(0), images, labels)
    assert nb.fingerprint(first) != nb.fingerprint(relabelled)


def test_pretraining_rejects_two_class_discriminators(nb):
    gan = nb.build_cyclegan(4, 4, num_classes=2)
    (m_data, m_label), (s_data, s_label) = batches()
    streams = (iter([(m_data, m_label)]), iter([(s_data, s_label)]))
    before = parameters_of(gan.Dx)
    with pytest.raises(ValueError, match="pretrain_steps=0"):
        nb.pretrain_discriminators(gan, *streams, steps=1)
    assert not changed(gan.Dx, before)


# Training loop: determinism, checkpoints, NaN


@pytest.fixture
def tiny_run(repo_root, tmp_path):
    """Definitions with tiny in-memory domains, ready for train_cyclegan."""
    nb = load(repo_root, TARGET_DOMAIN="synthetic", GAN_STEPS=4, SAMPLE_EVERY=2, LOG_EVERY=2,
              D_PRETRAIN_STEPS=2, BATCH_SIZE=8, CONV_DIM_G=4, CONV_DIM_D=4,
              CHECKPOINT_DIR=tmp_path / "checkpoints", REPORT_DIR=tmp_path / "report")
    rng = np.random.default_rng(0)
    m_images = torch.from_numpy(rng.integers(0, 256, (30, 1, 32, 32), dtype=np.uint8))
    labels = torch.arange(30) % 10
    s_images, s_labels = nb.make_synthetic_digits(30, seed=1)
    nb.mnist = nb.DigitDomain("mnist", m_images, labels, m_images[:10], labels[:10])
    nb.target = nb.DigitDomain("synthetic", s_images, s_labels, s_images[:10], s_labels[:10])
    torch.manual_seed(0)
    nb.classifiers = {"mnist": nb.DigitClassifier(1, 4), "synthetic": nb.DigitClassifier(3, 4)}
    return nb


def test_same_seed_gives_identical_run(tiny_run, tmp_path):
    _, first = tiny_run.train_cyclegan("first", 11, 2)
    _, second = tiny_run.train_cyclegan("second", 11, 2)
    assert len(first.losses["G_msm"]) == 4
    assert first.losses == second.losses
    assert first.checks == second.checks


def frozen_clock(tiny_run, monkeypatch):
    """Give the notebook a time.monotonic that returns clock["now"], which only the test moves, and return clock."""
    clock = {"now": 0.0}

    class FrozenTime:
        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self):
            return clock["now"]

    monkeypatch.setattr(tiny_run, "time", FrozenTime())
    return clock


def test_pretraining_timed_apart(tiny_run, monkeypatch):
    """ms_per_iteration divides train_time_s by the GAN iterations, so the pretraining's time is kept apart."""
    clock = frozen_clock(tiny_run, monkeypatch)
    pretrain = tiny_run.pretrain_discriminators

    def slow_pretrain(*args):
        pretrain(*args)
        clock["now"] += 100.0           # the only time that passes on this clock

    monkeypatch.setattr(tiny_run, "pretrain_discriminators", slow_pretrain)
    _, record = tiny_run.train_cyclegan("run", 11, 2)
    assert record.pretrain_time_s == 100.0
    assert record.train_time_s == 0.0


def test_rerun_loads_finished_training(tiny_run, monkeypatch):
    gan, record = tiny_run.train_cyclegan("run", 11, 2)

    def fail(*args):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(tiny_run, "train_iteration", fail)
    loaded, loaded_record = tiny_run.train_cyclegan("run", 11, 2)
    assert loaded_record.losses == record.losses
    for name, network in gan.networks().items():
        for key, value in network.state_dict().items():
            assert torch.equal(value, loaded.networks()[name].state_dict()[key]), (name, key)


def test_rerun_with_other_classifiers_rejected(tiny_run):
    """The checkpoint stores the checks over training, which the classifiers scored."""
    tiny_run.train_cyclegan("run", 11, 2)
    torch.manual_seed(1)
    tiny_run.classifiers["mnist"] = tiny_run.DigitClassifier(1, 4)
    with pytest.raises(ValueError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert message.startswith(f"checkpoint {tiny_run.RUN_CHECKPOINT_DIR / 'cyclegan_run.pt'} was written with "
                              f"other settings or data (saved, now): {{'classifiers': ")
    assert "'checked_test_images'" not in message


def test_rerun_with_other_test_images_rejected(tiny_run):
    tiny_run.train_cyclegan("run", 11, 2)
    domain = tiny_run.target
    tiny_run.target = tiny_run.DigitDomain(domain.name, domain.train_images, domain.train_labels,
                                           domain.test_images.flip(0), domain.test_labels.flip(0))
    with pytest.raises(ValueError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert ": {'checked_test_images': " in message
    assert "'classifiers'" not in message


def test_checked_test_labels_in_checkpoint_config(tiny_run):
    """A rerun whose class-preservation test images keep their pixels but change labels rejects the checkpoint."""
    tiny_run.train_cyclegan("run", 11, 2)
    domain = tiny_run.target
    tiny_run.target = tiny_run.DigitDomain(domain.name, domain.train_images, domain.train_labels,
                                           domain.test_images, (domain.test_labels + 1) % 10)
    with pytest.raises(ValueError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert ": {'checked_test_images': " in str(error.value)


def test_digit_without_test_images_unmapped(nb):
    confusion = [[0] * 10 for _ in range(10)]
    confusion[2][7], confusion[2][3], confusion[5][5] = 3, 1, 2
    mapping = nb.digit_mapping(confusion)
    assert mapping == [None, None, 7, None, None, 5, None, None, None, None]
    assert nb.mapping_text(mapping) == "[-, -, 7, -, -, 5, -, -, -, -]"


def test_most_common_digit_and_share(nb):
    labels = torch.tensor([1, 1, 1, 4, 7, 7, 0, 9])
    assert nb.most_common_digit(labels) == {"digit": 1, "share": 0.375}


def reference_and_resumed_runs(tiny_run, monkeypatch):
    """Return the records of a run left alone and of one stopped by a Ctrl-C in iteration 3, then resumed."""
    _, reference = tiny_run.train_cyclegan("reference", 11, 2)
    original = tiny_run.train_iteration
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(tiny_run, "train_iteration", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_run.train_cyclegan("resumed", 11, 2)
    monkeypatch.setattr(tiny_run, "train_iteration", original)
    _, resumed = tiny_run.train_cyclegan("resumed", 11, 2)  # from the checkpoint at iteration 2
    return reference, resumed


def test_interrupted_run_resumes_identically(tiny_run, monkeypatch):
    reference, resumed = reference_and_resumed_runs(tiny_run, monkeypatch)
    assert resumed.losses == reference.losses


def test_resumed_run_keeps_checks_once(tiny_run, monkeypatch):
    """A run resumed at a check's iteration runs that check only once, so its checks match an uninterrupted run's."""
    reference, resumed = reference_and_resumed_runs(tiny_run, monkeypatch)
    assert [check["step"] for check in resumed.checks] == [0, 2, 4]
    assert resumed.checks == reference.checks
    assert [sample["step"] for sample in resumed.samples] == [0, 2, 4]


def test_iterations_use_scheduled_learning_rate(tiny_run, monkeypatch):
    """Iteration `step` trains at learning_rate_at(step), also after a resume, for both optimizers."""
    original = tiny_run.train_iteration
    used = []

    def recording(gan, *batches):
        used.append([group["lr"] for optimizer in (gan.d_optimizer, gan.g_optimizer)
                     for group in optimizer.param_groups])
        if len(used) == 3:
            raise KeyboardInterrupt
        return original(gan, *batches)

    monkeypatch.setattr(tiny_run, "train_iteration", recording)
    with pytest.raises(KeyboardInterrupt):
        tiny_run.train_cyclegan("run", 11, 2)
    tiny_run.train_cyclegan("run", 11, 2)               # resumes at iteration 2
    rates = [tiny_run.learning_rate_at(step) for step in (0, 1, 2, 2, 3)]
    assert rates[-1] == tiny_run.LEARNING_RATE / 2
    assert [set(groups) for groups in used] == [{rate} for rate in rates]


def test_train_time_adds_every_interval(tiny_run, monkeypatch):
    """train_time_s sums every logged interval, across a resume too, so ms_per_iteration averages the whole run."""
    clock = frozen_clock(tiny_run, monkeypatch)
    original = tiny_run.train_iteration
    calls = []

    def one_second_iteration(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        clock["now"] += 1.0             # the only time that passes on this clock
        return original(*args)

    monkeypatch.setattr(tiny_run, "train_iteration", one_second_iteration)
    with pytest.raises(KeyboardInterrupt):
        tiny_run.train_cyclegan("run", 11, 2)
    _, record = tiny_run.train_cyclegan("run", 11, 2)   # resumes at iteration 2
    assert record.train_time_s == 4.0


def test_resumed_run_keeps_current_fused_adam(tiny_run, monkeypatch):
    """A checkpoint written with FUSED_ADAM on loads with the setting now in force."""
    tiny_run.train_cyclegan("run", 11, 2)
    monkeypatch.setattr(tiny_run, "FUSED_ADAM", False)
    gan = tiny_run.build_cyclegan(4, 4, 11, tiny_run.LEARNING_RATE, tiny_run.BETA1, "cpu", False, 0)
    streams = (tiny_run.BatchStream(tiny_run.mnist.train_images, tiny_run.mnist.train_labels, 8, 1, "cpu"),
               tiny_run.BatchStream(tiny_run.target.train_images, tiny_run.target.train_labels, 8, 2, "cpu"))
    step, _, finished = tiny_run.load_run(tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt", gan, streams)
    assert (step, finished) == (4, True)
    for optimizer in (gan.d_optimizer, gan.g_optimizer):
        assert all(group["fused"] is False for group in optimizer.param_groups)
        assert optimizer.state, "the moment estimates were not loaded"


def test_resumed_fused_adam_gets_its_step_layout(tiny_run, monkeypatch):
    """Fused Adam keeps each step count as float32 on the parameter's device, which CUDA's fused kernel requires.

    A checkpoint of plain Adam must load in that layout when FUSED_ADAM is on now. With float64 as the default
    dtype, plain Adam keeps its step counts in float64, so the layout shows on a CPU as well.
    """
    def build():
        gan = tiny_run.build_cyclegan(4, 4, 11, tiny_run.LEARNING_RATE, tiny_run.BETA1, "cpu", False, 0)
        streams = (tiny_run.BatchStream(tiny_run.mnist.train_images, tiny_run.mnist.train_labels, 8, 1, "cpu"),
                   tiny_run.BatchStream(tiny_run.target.train_images, tiny_run.target.train_labels, 8, 2, "cpu"))
        return gan, streams

    monkeypatch.setattr(tiny_run, "FUSED_ADAM", False)
    gan, streams = build()
    saved_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        tiny_run.train_iteration(gan, next(streams[0]), next(streams[1]))
    finally:
        torch.set_default_dtype(saved_dtype)
    path = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_plain_adam.pt"
    tiny_run.save_run(path, gan, 1, tiny_run.TrainingRecord(), streams, False)
    monkeypatch.setattr(tiny_run, "FUSED_ADAM", True)
    resumed, resumed_streams = build()
    step, _, _ = tiny_run.load_run(path, resumed, resumed_streams)
    assert step == 1
    for optimizer in (resumed.d_optimizer, resumed.g_optimizer):
        assert all(group["fused"] is True for group in optimizer.param_groups)
        assert optimizer.state, "the moment estimates were not loaded"
        for parameter, state in optimizer.state.items():
            assert state["step"].dtype == torch.float32
            assert state["step"].device == parameter.device
    tiny_run.train_iteration(resumed, next(resumed_streams[0]), next(resumed_streams[1]))


def test_force_retrain_ignores_checkpoint(tiny_run, monkeypatch, set_setting):
    tiny_run.train_cyclegan("run", 11, 2)
    set_setting(tiny_run, "FORCE_RETRAIN", True)
    calls = []
    original = tiny_run.train_iteration
    monkeypatch.setattr(tiny_run, "train_iteration",
                        lambda *args: calls.append(1) or original(*args))
    tiny_run.train_cyclegan("run", 11, 2)
    assert len(calls) == 4


def test_force_retrain_keeps_every_backup(tiny_run, set_setting):
    tiny_run.train_cyclegan("run", 11, 2)
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    first = checkpoint.read_bytes()
    set_setting(tiny_run, "FORCE_RETRAIN", True)
    tiny_run.train_cyclegan("run", 11, 2)
    tiny_run.train_cyclegan("run", 11, 2)
    backups = list(tiny_run.RUN_CHECKPOINT_DIR.glob("cyclegan_run.pt.*.old"))
    assert len(backups) == 2
    assert any(path.read_bytes() == first for path in backups)


def test_force_retrain_pretrains_again(tiny_run, monkeypatch, set_setting):
    """FORCE_RETRAIN moves the checkpoint aside, so that the new run starts over with the discriminators' pretraining.
    """
    tiny_run.train_cyclegan("run", 11, 2)
    set_setting(tiny_run, "FORCE_RETRAIN", True)
    original = tiny_run.pretrain_discriminators
    pretrained = []
    monkeypatch.setattr(tiny_run, "pretrain_discriminators", lambda *args: pretrained.append(1) or original(*args))
    tiny_run.train_cyclegan("run", 11, 2)
    assert pretrained == [1]


def test_backup_names_never_reused(nb, tmp_path, monkeypatch):
    """Three backups of one checkpoint within one second get three names, so that none replaces another."""
    monkeypatch.setattr(nb.time, "strftime", lambda format: "20261206-150000")
    path = tmp_path / "cyclegan_run.pt"
    names = []
    for _ in range(3):
        backup = nb.backup_path(path)
        backup.write_bytes(b"a kept checkpoint")
        names.append(backup.name)
    assert names == ["cyclegan_run.pt.20261206-150000.old", "cyclegan_run.pt.20261206-150000-2.old",
                     "cyclegan_run.pt.20261206-150000-3.old"]


def test_training_stops_on_changed_setting(tiny_run, monkeypatch):
    """GAN_STEPS set again after the settings were read: neither the CycleGAN nor a classifier trains, and the
    finished run's checkpoint stays as it was."""
    tiny_run.train_cyclegan("run", 11, 2)
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    saved = checkpoint.read_bytes()
    monkeypatch.setattr(tiny_run, "GAN_STEPS", 6)
    expected = "stopped before training the run CycleGAN, because GAN_STEPS = 6 (the run started with 4) changed"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        tiny_run.train_cyclegan("run", 11, 2)
    assert checkpoint.read_bytes() == saved
    classifier_path = tiny_run.RUN_CHECKPOINT_DIR / "classifier.pt"
    with pytest.raises(RuntimeError, match="stopped before training the synthetic classifier, because GAN_STEPS = 6"):
        tiny_run.train_classifier(tiny_run.target, 4, 2, 0, classifier_path, batch_size=8)
    assert not classifier_path.exists()


def test_checkpoint_with_other_settings_is_kept_and_rejected(tiny_run, set_setting):
    tiny_run.train_cyclegan("run", 11, 2)
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    saved = checkpoint.read_bytes()
    set_setting(tiny_run, "CYCLE_WEIGHT", 5.0)
    with pytest.raises(ValueError, match="CYCLE_WEIGHT") as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert "FORCE_RETRAIN" in str(error.value)
    assert checkpoint.read_bytes() == saved, "finished work is not overwritten"


def test_checkpoint_from_other_data_is_rejected(tiny_run):
    tiny_run.train_cyclegan("run", 11, 2)
    images = tiny_run.mnist.train_images.clone()
    images[0] = 255 - images[0]
    tiny_run.mnist = tiny_run.DigitDomain("mnist", images, tiny_run.mnist.train_labels,
                                          tiny_run.mnist.test_images, tiny_run.mnist.test_labels)
    with pytest.raises(ValueError, match="data"):
        tiny_run.train_cyclegan("run", 11, 2)


@pytest.mark.parametrize("name, value", [("LR_DECAY_START", 0.25), ("BETA1", 0.9), ("LEARNING_RATE", 1e-3),
                                         ("CYCLE_WEIGHT", 5.0), ("D_PRETRAIN_STEPS", 3), ("BATCH_SIZE", 4)])
def test_training_settings_in_checkpoint_config(tiny_run, set_setting, name, value):
    """Each setting that changes the CycleGAN's training is part of the config a checkpoint must match."""
    before = tiny_run.run_config()
    set_setting(tiny_run, name, value)
    changed = {key for key, saved in before.items() if tiny_run.run_config()[key] != saved}
    assert changed == {name}


def test_classifier_with_other_steps_rejected(tiny_run, tmp_path):
    """A classifier checkpoint trained for another CLASSIFIER_STEPS is not reused."""
    path = tmp_path / "classifier.pt"
    tiny_run.train_classifier(tiny_run.target, 4, 2, 0, path, batch_size=8)
    with pytest.raises(ValueError) as error:
        tiny_run.train_classifier(tiny_run.target, 4, 3, 0, path, batch_size=8)
    assert "(saved, now): {'steps': (2, 3)}" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"hello\n", b"t"])
def test_unreadable_checkpoint_names_file(tiny_run, content):
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(content)
    with pytest.raises(ValueError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert str(checkpoint) in str(error.value)
    assert "FORCE_RETRAIN" in str(error.value)


def test_flipped_checkpoint_bit_rejected(tiny_run):
    tiny_run.train_cyclegan("run", 11, 2)
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    record = first_tensor_record(checkpoint)
    flip_byte_in_record(checkpoint, record)
    with pytest.raises(ValueError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert str(error.value).startswith(f"checkpoint {checkpoint} is damaged: its record {record} fails its CRC-32 "
                                       f"check")


def test_out_of_memory_in_save_passes(nb, tmp_path, monkeypatch):
    """PyTorch's out-of-memory error while a checkpoint is saved passes as itself, not as a failed write."""
    path = tmp_path / "run.pt"
    nb.save_checkpoint(path, {"config": {"run": 1}})
    monkeypatch.setattr(nb.torch, "save", allocation_failure)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory"):
        nb.save_checkpoint(path, {"config": {"run": 2}})
    assert torch.load(path, weights_only=True)["config"] == {"run": 1}


def test_checkpoint_synced_in_full(nb, tmp_path, monkeypatch):
    """A checkpoint is synced to the disk with all its bytes before it takes its name."""
    synced = record_syncs(monkeypatch)
    path = tmp_path / "run.pt"
    nb.save_checkpoint(path, {"config": {"run": 1}, "weights": torch.arange(1000.0)})
    assert identity(path) in synced.files


def test_checkpoint_name_synced(nb, tmp_path, monkeypatch):
    """The checkpoint's folder is synced once the checkpoint has its name."""
    synced = record_syncs(monkeypatch)
    nb.save_checkpoint(tmp_path / "run.pt", {"config": {"run": 1}})
    assert "run.pt" in names_synced_in(synced, tmp_path)


def test_report_file_synced_in_full(nb, tmp_path, monkeypatch):
    """The results file is synced to the disk with all its bytes before it takes its name."""
    synced = record_syncs(monkeypatch)
    path = tmp_path / "results.json"
    nb.write_report_file(path, lambda file: file.write(b'{"accuracy": 0.9}'))
    assert identity(path) in synced.files


def test_report_file_name_synced(nb, tmp_path, monkeypatch):
    """The results file's folder is synced once the file has its name."""
    synced = record_syncs(monkeypatch)
    nb.write_report_file(tmp_path / "results.json", lambda file: file.write(b"{}"))
    assert "results.json" in names_synced_in(synced, tmp_path)


def test_damaged_record_beside_empty_one_rejected(nb, tmp_path):
    """An empty tensor's record has the CRC-32 0, which must not turn off the check of the other records."""
    path = tmp_path / "run.pt"
    nb.save_checkpoint(path, {"config": {"run": 1}, "weights": torch.arange(64.0), "empty": torch.zeros(0)})
    record = first_tensor_record(path)                  # the weights' record, saved first
    flip_byte_in_record(path, record)
    with pytest.raises(ValueError) as error:
        nb.read_checkpoint(path, {"run": 1})
    assert str(error.value).startswith(f"checkpoint {path} is damaged: its record {record} fails its CRC-32 check")


def test_checkpoint_with_nan_rejected(nb, tmp_path):
    """A checkpoint whose weights contain NaN is rejected with the tensor's name rather than loaded."""
    path = tmp_path / "run.pt"
    nb.save_checkpoint(path, {"config": {"run": 1}, "G": {"weight": torch.tensor([1.0, float("nan")])}})
    with pytest.raises(ValueError) as error:
        nb.read_checkpoint(path, {"run": 1})
    assert str(error.value).startswith(f"checkpoint {path} contains values that are not finite (NaN or infinity) in "
                                       f"G.weight;")


def test_checkpoint_without_read_permission_named(tiny_run, monkeypatch):
    """A checkpoint that cannot be read for lack of permission is named as such, not as unreadable data."""
    tiny_run.train_cyclegan("run", 11, 2)
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(tiny_run.torch, "load", denied)
    with pytest.raises(PermissionError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert str(error.value).startswith(f"cannot read checkpoint {checkpoint} (Permission denied). Make it readable "
                                       f"to reuse it, or set FORCE_RETRAIN=True")


def test_checkpoint_write_waits_for_lock(nb, tmp_path):
    path = tmp_path / "run.pt"
    with nb.locked_folder(tmp_path):
        writer, outcome = run_in_thread(nb.save_checkpoint, path, {"config": {}})
        writer.join(timeout=1)
        assert writer.is_alive(), "the write did not wait for the lock"
        assert not path.exists()
    writer.join(timeout=60)
    assert outcome == {"result": None}
    assert torch.load(path, weights_only=True) == {"config": {}}


def test_memory_error_on_load_is_not_corruption(tiny_run, monkeypatch):
    """A checkpoint that the machine lacks memory to load is not called unreadable, which would invite deleting it."""
    tiny_run.train_cyclegan("run", 11, 2)
    monkeypatch.setattr(tiny_run.torch, "load", allocation_failure)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        tiny_run.train_cyclegan("run", 11, 2)


def test_code_running_checkpoint_is_rejected(tiny_run, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": MakeFolderOnLoad(marker)}, checkpoint)
    with pytest.raises(ValueError, match="unreadable") as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert not marker.exists(), "loading must not call what the file names"
    assert str(checkpoint) in str(error.value)


def test_checkpoint_without_config_names_file(tiny_run):
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.zeros(3), checkpoint)
    with pytest.raises(ValueError, match="has no config") as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert str(checkpoint) in str(error.value)


def test_other_class_count_checkpoint_rejected(tiny_run):
    tiny_run.train_cyclegan("eleven", 11, 2)
    folder = tiny_run.RUN_CHECKPOINT_DIR
    (folder / "cyclegan_two.pt").write_bytes((folder / "cyclegan_eleven.pt").read_bytes())
    with pytest.raises(ValueError, match="does not match Discriminator") as error:
        tiny_run.train_cyclegan("two", 2, 2)
    assert str(folder / "cyclegan_two.pt") in str(error.value)
    assert "FORCE_RETRAIN" in str(error.value)


def test_loaded_classifier_rescored_on_test_set(tiny_run, tmp_path):
    domain = tiny_run.target
    path = tmp_path / "classifier.pt"
    classifier, _ = tiny_run.train_classifier(domain, 4, 2, 0, path, batch_size=8)
    smaller = tiny_run.DigitDomain(domain.name, domain.train_images, domain.train_labels,
                                   domain.test_images[:3], domain.test_labels[:3])
    _, accuracy = tiny_run.train_classifier(smaller, 4, 2, 0, path, batch_size=8)
    expected = (tiny_run.predict(classifier, smaller.test_images) == smaller.test_labels).float().mean().item()
    assert accuracy == expected
    assert accuracy * 3 == pytest.approx(round(accuracy * 3)), "a share of three test images"


def test_out_of_memory_keeps_checkpoint(tiny_run, monkeypatch):
    original = tiny_run.train_iteration
    checkpoint = tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt"
    saved = []

    def fails_after_checkpoint(*args):
        if checkpoint.exists():                  # written after iteration 2
            saved.append(checkpoint.read_bytes())
            allocation_failure()
        return original(*args)

    monkeypatch.setattr(tiny_run, "train_iteration", fails_after_checkpoint)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert "iteration 3 ran out of CPU memory with BATCH_SIZE=8, CONV_DIM_G=4, CONV_DIM_D=4" in message
    assert "Lower BATCH_SIZE, e.g. BATCH_SIZE=4, or CONV_DIM_G and CONV_DIM_D and train again." in message
    assert f"New sizes need new checkpoints in place of cyclegan_run.pt in {tiny_run.RUN_CHECKPOINT_DIR}." in message
    assert "Move those files elsewhere first, or set FORCE_RETRAIN=True" in message
    assert message.endswith("so also trains the digit classifiers again.")
    assert checkpoint.read_bytes() == saved[0], "the checkpoint is left as it was"


@pytest.mark.parametrize("message, expected", ALLOCATION_MESSAGES)
def test_out_of_memory_messages_recognised(nb, message, expected):
    assert nb.is_out_of_memory(RuntimeError(message)) is expected
    assert nb.is_out_of_memory(torch.OutOfMemoryError(message))


def test_pretraining_out_of_memory_names_sizes(tiny_run, monkeypatch):
    monkeypatch.setattr(tiny_run, "pretrain_discriminators", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert "discriminator pretraining ran out of CPU memory" in message
    assert message.endswith("or CONV_DIM_G and CONV_DIM_D and train again.")
    assert "FORCE_RETRAIN" not in message


def test_out_of_memory_counts_finished_runs(tiny_run, monkeypatch):
    """The finished 11-class run's checkpoint also records the sizes, so smaller ones need FORCE_RETRAIN."""
    tiny_run.train_cyclegan("11class", 11, 2)
    monkeypatch.setattr(tiny_run, "train_iteration", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("2class", 2, 0)
    assert "iteration 1 ran out of CPU memory" in str(error.value)
    assert "in place of cyclegan_11class.pt in" in str(error.value)


def test_oversized_batch_advice_halves_real_batch(tiny_run, monkeypatch, set_setting):
    """With 30 training images per domain, BATCH_SIZE=100 runs batches of 30."""
    set_setting(tiny_run, "BATCH_SIZE", 100)
    monkeypatch.setattr(tiny_run, "train_iteration", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 0)
    message = str(error.value)
    assert "BATCH_SIZE=100, CONV_DIM_G=4, CONV_DIM_D=4 (batches of at most 30 images" in message
    assert "Lower BATCH_SIZE, e.g. BATCH_SIZE=15," in message


@pytest.mark.parametrize("failing_call, iteration", [(1, 0), (3, 2), (5, 4)])   # two calls per check
def test_check_out_of_memory_keeps_iterations(tiny_run, monkeypatch, failing_call, iteration):
    """A check that runs out of memory saves the iterations and the pretraining before it, and a rerun runs the
    check and goes on."""
    _, reference = tiny_run.train_cyclegan("reference", 11, 2)
    original = tiny_run.class_preservation
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == failing_call:
            allocation_failure()
        return original(*args)

    monkeypatch.setattr(tiny_run, "class_preservation", fails_once)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert f"the class-preservation check at iteration {iteration} ran out of CPU memory in batches of 10 images" \
        in message
    assert "Lower EVAL_BATCH_SIZE, e.g. EVAL_BATCH_SIZE=5, and run again." in message
    saved = torch.load(tiny_run.RUN_CHECKPOINT_DIR / "cyclegan_run.pt", weights_only=True)
    assert saved["step"] == iteration
    assert saved["finished"] is False

    def pretraining_again(*args):
        raise AssertionError("a rerun must not pretrain the discriminators again")

    monkeypatch.setattr(tiny_run, "pretrain_discriminators", pretraining_again)
    _, resumed = tiny_run.train_cyclegan("run", 11, 2)
    assert resumed.losses == reference.losses
    assert resumed.checks == reference.checks
    assert [sample["step"] for sample in resumed.samples] == [sample["step"] for sample in reference.samples]
    for got, expected in zip(resumed.samples, reference.samples):
        for row in ("G(m)", "F(s)"):
            assert torch.equal(got[row], expected[row]), (expected["step"], row)


def test_final_check_rerun_after_memory_error(tiny_run, monkeypatch, set_setting):
    """A final check that ran out of memory at a GAN_STEPS that SAMPLE_EVERY does not divide runs on the rerun."""
    set_setting(tiny_run, "GAN_STEPS", 5)               # checks at iterations 0, 2, 4 and 5
    original = tiny_run.class_preservation
    calls = []

    def fails_in_last_check(*args):
        calls.append(1)
        if len(calls) == 7:                             # two calls per check: the first of the check at 5
            allocation_failure()
        return original(*args)

    monkeypatch.setattr(tiny_run, "class_preservation", fails_in_last_check)
    with pytest.raises(MemoryError):
        tiny_run.train_cyclegan("run", 11, 2)
    _, record = tiny_run.train_cyclegan("run", 11, 2)
    assert [check["step"] for check in record.checks] == [0, 2, 4, 5]
    assert [sample["step"] for sample in record.samples] == [0, 2, 4, 5]


def test_batch_fetch_out_of_memory_names_sizes(tiny_run, monkeypatch):
    monkeypatch.setattr(tiny_run.BatchStream, "__next__", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 0)
    assert "iteration 1 ran out of CPU memory with BATCH_SIZE=8" in str(error.value)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_classifier(tiny_run.target, 4, 2, 0, tiny_run.RUN_CHECKPOINT_DIR / "classifier.pt", batch_size=8)
    assert "the synthetic digit classifier ran out of CPU memory at training step 1" in str(error.value)


def test_copying_images_out_of_memory_advice(tiny_run, monkeypatch):
    monkeypatch.setattr(tiny_run, "BatchStream", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_cyclegan("run", 11, 2)
    message = str(error.value)
    assert message.startswith("copying the mnist and synthetic training images (0.1 MiB) to the CPU ran out of memory.")
    assert message.endswith("and run again, which reuses every checkpoint written so far.")


def test_final_evaluation_out_of_memory_advice(tiny_run, monkeypatch):
    gan = small_gan(tiny_run)
    monkeypatch.setattr(tiny_run, "cycle_error", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.evaluate_cyclegan(gan)
    message = str(error.value)
    assert message.startswith("the evaluation on the full test sets ran out of CPU memory in batches of 10 images")
    assert "(EVAL_BATCH_SIZE=500," in message
    assert "Lower EVAL_BATCH_SIZE, e.g. EVAL_BATCH_SIZE=5, and run again." in message


def test_classifier_out_of_memory_names_width(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_run, "optimizer_step", allocation_failure)
    with pytest.raises(MemoryError) as error:
        tiny_run.train_classifier(tiny_run.target, 4, 2, 0, tmp_path / "classifier.pt", batch_size=8)
    message = str(error.value)
    assert message.startswith("the synthetic digit classifier ran out of CPU memory at training step 1")
    assert "with CLASSIFIER_WIDTH=4 and batches of 8 images." in message
    assert "Lower CLASSIFIER_WIDTH, e.g. CLASSIFIER_WIDTH=2, and run again." in message
    assert not (tmp_path / "classifier.pt").exists()


def test_other_training_errors_pass_unchanged(tiny_run, monkeypatch):
    def broken(*args):
        raise RuntimeError("Given groups=1, weight of size [4, 1, 3, 3]")

    monkeypatch.setattr(tiny_run, "train_iteration", broken)
    with pytest.raises(RuntimeError, match="Given groups=1") as error:
        tiny_run.train_cyclegan("run", 11, 2)
    assert type(error.value) is RuntimeError


def test_nan_loss_stops_with_message(tiny_run, monkeypatch):
    monkeypatch.setattr(tiny_run, "train_iteration",
                        lambda *args: {"D_ms": 1.0, "D_sm": float("nan"), "G_msm": 1.0,
                                       "G_sms": 1.0})
    with pytest.raises(FloatingPointError, match="D_sm is nan at iteration 1"):
        tiny_run.train_cyclegan("nan", 11, 0)


def test_batch_norm_calibration_changes_only_statistics(tiny_run):
    gan = small_gan(tiny_run)
    for seed in range(2):
        tiny_run.train_iteration(gan, *batches(seed=seed))
    weights = parameters_of(gan.G)
    before = gan.G.encoder[1].running_var.clone()
    tiny_run.calibrate_batch_norm(gan)
    calibrated = gan.G.encoder[1].running_var.clone()
    assert not torch.allclose(before, calibrated)
    assert not changed(gan.G, weights)
    assert gan.G.training
    tiny_run.calibrate_batch_norm(gan)  # the same images give the same statistics: no drift
    assert torch.allclose(gan.G.encoder[1].running_var, calibrated)


def test_evaluation_calibrates_batch_norm(tiny_run):
    gan = small_gan(tiny_run)
    tiny_run.train_iteration(gan, *batches())
    reference = copy.deepcopy(gan)
    tiny_run.calibrate_batch_norm(reference)
    for network in (gan.G, gan.F):
        for layer in network.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.running_mean.fill_(5.0)
    tiny_run.evaluate_cyclegan(gan)
    for name in ("G", "F"):
        for key, value in getattr(reference, name).state_dict().items():
            assert torch.equal(getattr(gan, name).state_dict()[key], value), (name, key)


class ConstantDigit(torch.nn.Module):
    """A classifier that reads `digit` in every image."""

    def __init__(self, digit):
        super().__init__()
        self.digit = digit

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, self.digit] = 1.0
        return logits


def test_evaluation_names_each_direction(tiny_run):
    """G is scored on MNIST with the target domain's classifier, F the other way round, each under its own key."""
    gan = small_gan(tiny_run)
    target = tiny_run.target
    tiny_run.target = tiny_run.DigitDomain("synthetic", target.train_images, target.train_labels,
                                           target.test_images, torch.ones(10, dtype=torch.long))
    tiny_run.classifiers = {"mnist": ConstantDigit(1), "synthetic": ConstantDigit(0)}
    metrics = tiny_run.evaluate_cyclegan(gan)
    assert metrics["class_preservation_G"] == pytest.approx(0.1)  # MNIST test digits 0-9, all read as 0
    assert metrics["class_preservation_F"] == pytest.approx(1.0)  # target test digits all 1, read as 1
    assert [row[0] for row in metrics["confusion_G"]] == [1] * 10
    assert metrics["confusion_F"][1][1] == 10
    mnist_error = tiny_run.cycle_error(gan.G, gan.F, tiny_run.mnist.test_images)
    target_error = tiny_run.cycle_error(gan.F, gan.G, tiny_run.target.test_images)
    assert mnist_error != pytest.approx(target_error)
    assert metrics["cycle_error_mnist"] == pytest.approx(mnist_error)
    assert metrics["cycle_error_target"] == pytest.approx(target_error)


def test_cycle_error_is_per_pixel_value(nb, monkeypatch):
    """A cycle that adds 0.5 to every pixel value has a squared error of 0.25 per value, in one batch or three."""
    images = torch.rand(7, 3, 32, 32) * 2 - 1
    assert nb.cycle_error(torch.nn.Identity(), Shift(0.5), images) == pytest.approx(0.25, rel=1e-6)
    monkeypatch.setattr(nb, "EVAL_BATCH_SIZE", 3)
    assert nb.cycle_error(torch.nn.Identity(), Shift(0.5), images) == pytest.approx(0.25, rel=1e-6)
    assert nb.cycle_error(torch.nn.Identity(), torch.nn.Identity(), images) == 0.0


class Shift(torch.nn.Module):
    """A module that adds `offset` to its input."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, images):
        return images + self.offset


def test_calibration_averages_batch_statistics(tiny_run, monkeypatch):
    """Running mean: the mean of the batch means. Running variance: the mean of the batches' unbiased variances."""
    monkeypatch.setattr(tiny_run, "CALIBRATION_SIZE", 24)  # three batches of BATCH_SIZE=8
    gan = small_gan(tiny_run)
    tiny_run.train_iteration(gan, *batches())
    tiny_run.calibrate_batch_norm(gan)
    with torch.no_grad():
        features = [gan.G.encoder[0](tiny_run.to_model_range(tiny_run.mnist.train_images[start:start + 8]))
                    for start in (0, 8, 16)]
    expected_mean = torch.stack([batch.mean(dim=(0, 2, 3)) for batch in features]).mean(0)
    expected_var = torch.stack([batch.var(dim=(0, 2, 3)) for batch in features]).mean(0)
    assert torch.allclose(gan.G.encoder[1].running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(gan.G.encoder[1].running_var, expected_var, rtol=1e-5)


def test_learning_rate_decays_linearly(nb, monkeypatch):
    monkeypatch.setattr(nb, "GAN_STEPS", 100)
    monkeypatch.setattr(nb, "LR_DECAY_START", 0.5)
    monkeypatch.setattr(nb, "LEARNING_RATE", 1e-3)
    assert nb.learning_rate_at(0) == pytest.approx(1e-3)
    assert nb.learning_rate_at(49) == pytest.approx(1e-3)
    assert nb.learning_rate_at(75) == pytest.approx(0.5e-3)
    assert nb.learning_rate_at(99) == pytest.approx(0.02e-3)
    assert nb.learning_rate_at(150) == 0.0           # past the last step the rate stays at 0
    monkeypatch.setattr(nb, "LR_DECAY_START", 1.0)
    assert nb.learning_rate_at(99) == pytest.approx(1e-3)


def test_benchmark_iteration_reports_time_and_flops(nb):
    calls = []

    def count_flops(step):
        step()
        return 123.0

    def timed(step, repeats, warmup, synchronize):
        times = []
        for _ in range(warmup + repeats):
            step()
            calls.append(1)
            times.append(0.5)
        return times[warmup:]

    result = nb.benchmark_iteration(repeats=2, warmup=1, count_flops=count_flops, timed=timed)
    assert result["flops"] == 123.0
    assert result["times_s"] == [0.5, 0.5]
    assert len(calls) == 3
    assert 0 < result["data_share"] < 1
    assert result["data_ms"] > 0


class FakeClock:
    """The time module with perf_counter advancing 2 ms per call, so that every fetch takes 2 ms."""

    def __init__(self):
        self.calls = 0

    def perf_counter(self):
        self.calls += 1
        return 0.002 * self.calls

    def __getattr__(self, name):
        return getattr(time, name)


def test_benchmark_data_share_counts_timed_fetches(nb, monkeypatch):
    """Only the timed iterations' fetches count, not the warm-up's nor the FLOP count's, over the timed seconds."""
    monkeypatch.setattr(nb, "time", FakeClock())

    def count_flops(step):
        step()
        return 123.0

    def timed(step, repeats, warmup, synchronize):
        for _ in range(warmup + repeats):
            step()
        return [0.5] * repeats

    result = nb.benchmark_iteration(repeats=2, warmup=1, count_flops=count_flops, timed=timed)
    assert result["data_ms"] == pytest.approx(2.0)
    assert result["data_share"] == pytest.approx(2 * 0.002 / (2 * 0.5))


# Real data


def test_real_mnist_loads_with_normalisation(nb, real_data):
    mnist = nb.load_mnist(real_data)
    assert mnist.train_images.shape == (60000, 1, 32, 32)
    assert mnist.test_images.shape == (10000, 1, 32, 32)
    assert mnist.train_images.dtype == torch.uint8
    assert torch.bincount(mnist.train_labels, minlength=10).min() > 5000
    assert mnist.test_labels.unique().tolist() == list(range(10))
    normalised = nb.to_model_range(mnist.test_images[:500])
    assert normalised.min() == -1.0
    assert normalised.max() == 1.0
    assert normalised[:, :, :2].eq(-1).all()  # padded border is background
    assert normalised.mean() < -0.6  # mostly black background, as in MNIST


def test_real_svhn_sample_in_official_format(nb, real_data, tmp_path):
    sample = np.load(real_data / "svhn-sample" / "svhn_real50_uint8.npz")
    images, digits = sample["X"], sample["y"]
    for name in ("train_32x32.mat", "test_32x32.mat"):
        write_svhn_mat(tmp_path / "svhn" / name, images, digits)
    svhn = nb.load_svhn(tmp_path)
    assert torch.equal(svhn.train_images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert svhn.train_labels.tolist() == digits.tolist()
    assert svhn.test_labels.min() == 0
    assert svhn.channels == 3


# End to end


def nonblank_png(path):
    pixels = plt.imread(path)
    return pixels[..., :3].std() > 0.02


@pytest.mark.parametrize("target_domain", ["svhn", "synthetic"])
def test_notebook_smoke_end_to_end(run_notebook, tmp_path, target_domain):
    data_dir = write_tiny_data(tmp_path / "data")
    report = run_notebook(NOTEBOOK, PROFILE="smoke", DATA_DIR=data_dir,
                          TARGET_DOMAIN=target_domain, NUM_THREADS=1)
    results = json.loads((report / "results" / f"part2_smoke_{target_domain}.json").read_text())
    for key in ("notebook", "profile", "target_domain", "device", "hardware", "versions",
                "date", "settings", "wall_time_s", "headline", "metrics"):
        assert key in results, key
    assert results["profile"] == "smoke"
    assert results["target_domain"] == target_domain
    assert results["settings"]["TARGET_DOMAIN"] == target_domain
    for direction in ("G", "F"):
        for label in ("11class", "2class"):
            value = results["headline"][f"class_preservation_{direction}_{label}"]
            assert 0.0 <= value <= 1.0
    run = results["metrics"]["cyclegan_11class"]
    assert sum(map(sum, run["confusion_G"])) == 60  # every MNIST test image, once
    target_test = 60 if target_domain == "svhn" else results["settings"]["SYNTHETIC_TEST_SIZE"]
    assert sum(map(sum, run["confusion_F"])) == target_test
    assert run["iterations"] == results["settings"]["GAN_STEPS"]
    assert run["cycle_error_mnist"] > 0
    assert run["pretrain_time_s"] > 0
    assert results["metrics"]["cyclegan_2class"]["pretrain_time_s"] == 0, "the ablation has no pretraining"
    figures = report / "figures"
    for name in ("data_examples", "losses_11class", "samples_from_mnist_11class",
                 "samples_from_target_11class", "losses_2class", "samples_from_mnist_2class",
                 "samples_from_target_2class", "confusion", "class_preservation"):
        stem = figures / f"part2_smoke_{target_domain}_{name}"
        assert stem.with_suffix(".pdf").exists(), name
        assert nonblank_png(stem.with_suffix(".png")), name
    assert not list(figures.glob(".pending_*"))
    executed = nbformat.read(report / "executed" / NOTEBOOK, as_version=4)
    outputs = "".join(output.get("text", "") for cell in executed.cells
                      if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert f"target domain {target_domain}" in outputs


def test_channels_last_matches_default_layout(nb):
    """The channels-last speed path computes the same losses and weights as the default layout."""
    m_batch, s_batch = batches(seed=3)
    results = []
    for channels_last in (False, True):
        gan = nb.build_cyclegan(4, 4, 11, 1e-3, 0.5, "cpu", channels_last, 0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        m_data, s_data = (x.contiguous(memory_format=fmt) for x in (m_batch[0], s_batch[0]))
        losses = [nb.train_iteration(gan, (m_data, m_batch[1]), (s_data, s_batch[1])) for _ in range(2)]
        results.append((losses, {name: net.state_dict() for name, net in gan.networks().items()}))
    (losses_default, weights_default), (losses_last, weights_last) = results
    for step, (default, last) in enumerate(zip(losses_default, losses_last)):
        for name in default:
            assert last[name] == pytest.approx(default[name], rel=1e-4, abs=1e-5), f"{name} at step {step}"
    for network, state in weights_default.items():
        for key, value in state.items():
            torch.testing.assert_close(weights_last[network][key], value, rtol=1e-3, atol=1e-4,
                                       msg=f"{network}.{key}")


def test_fused_adam_matches_plain_adam(nb):
    """FUSED_ADAM (the default) builds Adam optimisers that update like Adam's per-tensor loop."""
    m_batch, s_batch = batches(seed=4)
    gans, losses = [], []
    saved = nb.FUSED_ADAM
    try:
        for fused in (True, False):
            nb.FUSED_ADAM = fused
            gan = small_gan(nb)
            assert gan.d_optimizer.defaults["fused"] is fused
            assert gan.g_optimizer.defaults["fused"] is fused
            gans.append(gan)
            losses.append([nb.train_iteration(gan, m_batch, s_batch) for _ in range(3)])
    finally:
        nb.FUSED_ADAM = saved

    # Training: the same losses up to rounding. Adam makes each update about the learning rate in
    # size whatever the gradient's size. So a weight whose gradient is near zero can differ by a
    # whole update between the two, while the losses agree far closer than a wrong update allows.
    for step, (fused, plain) in enumerate(zip(*losses)):
        for name in fused:
            assert fused[name] == pytest.approx(plain[name], rel=1e-3, abs=1e-5), f"{name} at step {step}"

    # The optimisers themselves, from the same start and on identical gradients, make the same update.
    try:
        gans = []
        for fused in (True, False):
            nb.FUSED_ADAM = fused
            gans.append(small_gan(nb))
    finally:
        nb.FUSED_ADAM = saved
    generator = torch.Generator().manual_seed(5)
    fused_gan, plain_gan = gans
    for _ in range(3):
        for fused_net, plain_net in zip(fused_gan.networks().values(), plain_gan.networks().values()):
            for fused_param, plain_param in zip(fused_net.parameters(), plain_net.parameters()):
                grad = torch.randn(fused_param.shape, generator=generator)
                fused_param.grad, plain_param.grad = grad.clone(), grad.clone()
        for gan in gans:
            gan.d_optimizer.step()
            gan.g_optimizer.step()
    for (name, fused_net), plain_net in zip(fused_gan.networks().items(), plain_gan.networks().values()):
        for (key, value), plain_value in zip(fused_net.state_dict().items(), plain_net.state_dict().values()):
            torch.testing.assert_close(value, plain_value, rtol=1e-5, atol=1e-6, msg=lambda text, where=f"{name}.{key}":
                                       f"{where}: {text}")


@pytest.mark.parametrize("case", ["no X", "28x28 images", "more labels", "garbage", "float images", "empty",
                                  "text labels"])
def test_malformed_svhn_file_names_file_and_fix(nb, tmp_path, case):
    path = tmp_path / "svhn" / "train_32x32.mat"
    path.parent.mkdir(parents=True)
    images = np.zeros((32, 32, 3, 4), dtype=np.uint8)
    labels = np.array([[1], [2], [3], [10]], dtype=np.uint8)
    if case == "no X":
        scipy.io.savemat(path, {"y": labels})
    elif case == "28x28 images":
        scipy.io.savemat(path, {"X": np.zeros((28, 28, 3, 4), dtype=np.uint8), "y": labels})
    elif case == "more labels":
        scipy.io.savemat(path, {"X": images, "y": np.ones((5, 1), dtype=np.uint8)})
    elif case == "float images":
        scipy.io.savemat(path, {"X": images.astype(np.float64), "y": labels})
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text labels":
        scipy.io.savemat(path, {"X": images, "y": np.array(["1", "2", "3", "4"])})
    else:
        path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(path) in str(error.value)
    assert "download it again" in str(error.value)


def test_truncated_mnist_is_not_reported_missing(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    images = tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path)
    assert f"{images} is not a valid MNIST file" in str(error.value)
    assert "counts 12 images, 9424 bytes with the header, but the file has 1000 bytes" in str(error.value)


@pytest.mark.parametrize("header, problem", [
    ([0x801, 12, 28, 28], "does not start with the idx header 2051"),
    ([0x803, 12, 16, 16], "its images are 16x16, not 28x28"),
])
def test_invalid_mnist_header_names_file(nb, tmp_path, header, problem):
    write_tiny_data(tmp_path, train=12, test=6)
    images = tmp_path / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(np.array(header, dtype=">i4").tobytes() + bytes(12 * header[2] * header[3]))
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path)
    assert str(images) in str(error.value)
    assert problem in str(error.value)
    assert "download it again" in str(error.value)


def test_discriminator_rejects_other_image_sizes(nb):
    discriminator = nb.Discriminator("mnist", conv_dim=4)
    assert discriminator(torch.zeros(2, 1, 32, 32)).shape == (2, 11)
    for shape in [(2, 1, 64, 64), (2, 32, 32, 1)]:
        with pytest.raises(ValueError, match=r"shape \(B, C, 32, 32\), got " + re.escape(str(shape))):
            discriminator(torch.zeros(shape))


def test_mnist_labels_outside_digits_rejected(nb, tmp_path):
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    write_mnist_idx(raw, "train", np.zeros((12, 28, 28), dtype=np.uint8), np.full(12, 205))
    with pytest.raises(ValueError, match="must be 0-9"):
        nb.load_mnist(tmp_path)


def test_mnist_label_ten_rejected(nb, tmp_path):
    """Label 10 is the discriminators' class of generated images, not a digit, so MNIST labels of 10 are rejected."""
    write_tiny_data(tmp_path, train=12, test=6)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    write_mnist_idx(raw, "t10k", np.zeros((6, 28, 28), dtype=np.uint8), [0, 1, 2, 3, 4, 10])
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert str(error.value).startswith(f"the MNIST t10k labels in {raw} must be 0-9, found [0, 1, 2, 3, 4, 10]")


def test_mnist_file_with_extra_bytes_named(nb, tmp_path):
    """An idx file longer than its header's count implies is rejected with its name and both sizes."""
    write_tiny_data(tmp_path, train=12, test=6)
    labels = tmp_path / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes() + b"\0")
    with pytest.raises(ValueError) as error:
        nb.load_mnist(tmp_path, download=False)
    assert f"{labels} is not a valid MNIST file" in str(error.value)
    assert "its header counts 6 labels, 14 bytes with the header, but the file has 15 bytes" in str(error.value)


@pytest.mark.parametrize("loader", ["load_mnist", "load_svhn"])
def test_limits_apply_to_their_splits(nb, tmp_path, loader):
    """TRAIN_LIMIT cuts the training split and TEST_LIMIT the test split, each to its first images."""
    load = getattr(nb, loader)
    write_tiny_data(tmp_path, train=12, test=6)
    full = load(tmp_path, download=False)
    limited = load(tmp_path, train_limit=10, test_limit=4, download=False)
    assert torch.equal(limited.train_images, full.train_images[:10])
    assert torch.equal(limited.train_labels, full.train_labels[:10])
    assert torch.equal(limited.test_images, full.test_images[:4])
    assert torch.equal(limited.test_labels, full.test_labels[:4])



def test_cpu_identity_reads_first_processor(nb, cpuinfo_sample, tmp_path):
    assert nb.cpu_identity(cpuinfo_sample) == ("AMD EPYC", "25", "17")
    assert nb.cpu_identity(tmp_path / "missing") == (None, None, None)


def test_results_record_this_cpu(nb, this_cpu):
    hardware = nb.hardware_description()
    assert hardware["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if this_cpu is not None:
        assert (hardware["cpu"], hardware["cpu_family"], hardware["cpu_model"]) == this_cpu


def test_cyclegan_too_large_names_widths(nb, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 160000000000 bytes")

    monkeypatch.setattr(nb, "Generator", out_of_memory)
    with pytest.raises(MemoryError, match=r"CONV_DIM_G=100000 and CONV_DIM_D=4 ran out of memory"):
        nb.build_cyclegan(100_000, 4)


# Fetching the data before a run


KILLED_DOWNLOAD_SCRIPT = """
import sys
from tools.nbdefs import load_definitions
nb = load_definitions("part2_cyclegan.ipynb", env={"PROFILE": "smoke", "NUM_THREADS": "1"})
nb.SVHN_SOURCES = {"train": (sys.argv[1], "train_32x32.mat", sys.argv[2])}
print("definitions loaded", flush=True)
nb.svhn_file(sys.argv[3], "train")
"""


def test_killed_svhn_download_leaves_part_file(nb, repo_root, tmp_path, monkeypatch, serve_folder):
    """A download killed outright runs no cleanup: it leaves only a .part file, which the next download replaces."""
    served = tmp_path / "server" / "train_32x32.mat"      # only its MD5 is checked here, not its format
    served.parent.mkdir()
    served.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    # The download writes what arrives as it arrives, so the server's bytes reach the disk before it stalls.
    stalling_url = serve_folder(served.parent, stall_after=100_000) + "/train_32x32.mat"
    data = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD_SCRIPT, stalling_url, md5, str(data)],
                               cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)})
    partial = data / "svhn" / "train_32x32.mat.part"
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert partial.is_file(), "the download had started"
    assert not (data / "svhn" / "train_32x32.mat").exists()
    good_url = serve_folder(served.parent) + "/train_32x32.mat"
    monkeypatch.setattr(nb, "SVHN_SOURCES", {"train": (good_url, "train_32x32.mat", md5)})
    assert nb.svhn_file(data, "train").read_bytes() == served.read_bytes()
    assert sorted(path.name for path in (data / "svhn").iterdir()) == ["train_32x32.mat"]


MNIST_DOWNLOAD_SCRIPT = """
import json
import sys
from tools.nbdefs import load_definitions
nb = load_definitions("part2_cyclegan.ipynb", env={"PROFILE": "smoke", "NUM_THREADS": "1"})
nb.torchvision.datasets.MNIST.mirrors = [sys.argv[1]]
nb.torchvision.datasets.MNIST.resources = json.loads(sys.argv[2])
print("definitions loaded", flush=True)
nb.load_mnist(sys.argv[3], download=True)
"""


def test_killed_mnist_download_leaves_part_file(nb, repo_root, tmp_path, monkeypatch, serve_folder):
    """A download killed outright runs no cleanup, so it leaves only a .part file, which the next download replaces."""
    # Random pixels do not compress: the training images' archive is about 235 kB, and the download writes what
    # arrives as it arrives, so its first 100 kB reach the disk before the server stalls.
    expected, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder, train=300)
    resources = nb.torchvision.datasets.MNIST.resources
    stalling_mirror = serve_folder(served, stall_after=100_000) + "/"
    data = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-c", MNIST_DOWNLOAD_SCRIPT, stalling_mirror,
                                json.dumps(resources), str(data)],
                               cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)})
    raw = data / "mnist" / "MNIST" / "raw"
    partial = raw / "train-images-idx3-ubyte.gz.part"
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert partial.is_file(), "the download had started"
    assert not (raw / "train-images-idx3-ubyte.gz").exists()
    mnist = nb.load_mnist(data, download=True)
    assert torch.equal(mnist.train_images, expected.train_images)
    assert torch.equal(mnist.test_labels, expected.test_labels)
    assert not any(path.name.endswith(".part") for path in raw.iterdir())


def test_mnist_download_waits_for_lock(nb, repo_root, tmp_path, monkeypatch, serve_folder):
    """A second process waits while the data folder is locked, then finds the files there and downloads nothing."""
    expected, served = serve_mnist_archives(nb, tmp_path / "server", monkeypatch, serve_folder)
    resources = nb.torchvision.datasets.MNIST.resources
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    dead_mirror = serve_folder(tmp_path) + "/nowhere/"    # a download would fail, so the files come from this test
    with nb.locked_folder(raw):
        process = subprocess.Popen([sys.executable, "-c", MNIST_DOWNLOAD_SCRIPT, dead_mirror,
                                    json.dumps(resources), str(tmp_path / "data")],
                                   cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)},
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "definitions loaded\n"
        time.sleep(2)
        assert process.poll() is None, "the second process did not wait for the lock"
        for path in served.iterdir():
            (raw / path.name).write_bytes(path.read_bytes())
    assert process.wait(timeout=60) == 0
    assert torch.equal(nb.load_mnist(tmp_path / "data", download=False).train_images, expected.train_images)


def test_svhn_download_waits_for_lock(nb, repo_root, tmp_path, serve_folder):
    """A second process waits while the SVHN folder is locked, then finds the file there and downloads nothing."""
    folder = tmp_path / "data" / "svhn"
    folder.mkdir(parents=True)
    dead_url = serve_folder(tmp_path) + "/nowhere/train_32x32.mat"
    with nb.locked_folder(folder):
        process = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD_SCRIPT, dead_url, "0" * 32,
                                    str(tmp_path / "data")],
                                   cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)},
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "definitions loaded\n"
        time.sleep(2)
        assert process.poll() is None, "the second process did not wait for the lock"
        (folder / "train_32x32.mat").write_bytes(b"the first process's download")
    assert process.wait(timeout=60) == 0
    assert (folder / "train_32x32.mat").read_bytes() == b"the first process's download"


def test_svhn_reply_not_http_named(nb, tmp_path, monkeypatch, serve_garbage):
    url = f"{serve_garbage}/train_32x32.mat"
    monkeypatch.setattr(nb, "SVHN_SOURCES", {"train": (url, "train_32x32.mat", "0" * 32)})
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path / "data", "train")
    assert str(error.value).startswith(f"SVHN file {tmp_path / 'data' / 'svhn' / 'train_32x32.mat'} is missing and "
                                       f"the download from {url} failed (this is not HTTP\\r\\n). ")
    assert not (tmp_path / "data").exists()


def test_mnist_reply_not_http_named(nb, tmp_path, monkeypatch, serve_garbage):
    monkeypatch.setattr(nb.torchvision.datasets.MNIST, "mirrors", [serve_garbage + "/"])
    with pytest.raises(FileNotFoundError) as error:
        nb.load_mnist(tmp_path / "data", download=True)
    assert "are missing in" in str(error.value)
    assert "gz: this is not HTTP\\r\\n)" in str(error.value)
    assert not (tmp_path / "data").exists()


def test_file_at_svhn_folder_named(nb, tmp_path):
    (tmp_path / "svhn").write_text("not a folder")
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path, "train")
    assert str(error.value) == (f"SVHN's files go into {tmp_path / 'svhn'}, which is a file, not a folder. Move or "
                                f"rename it, or point DATA_DIR at another folder")


def test_svhn_unwritable_folder_named(nb, tmp_path, monkeypatch):
    def rejected(url, path, max_bytes, md5):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(nb, "download_checked", rejected)
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path / "data", "train")
    assert "because this process may not create or write to " \
           f"{tmp_path / 'data' / 'svhn'} (Permission denied). Make it writable, or point DATA_DIR" in str(error.value)


def test_data_dir_file_rejected(repo_root, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(ValueError) as error:
        load(repo_root, DATA_DIR=tmp_path / "data")
    assert str(error.value) == (f"DATA_DIR={str(tmp_path / 'data')!r} is invalid: it must be a folder, not a file, "
                                f'e.g. DATA_DIR="data"')


def test_fetch_data_reads_svhn_files(nb, tmp_path, monkeypatch):
    """An SVHN file that is there but cannot be read fails the check, as it would fail the run later."""
    write_tiny_data(tmp_path, train=12, test=6)
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"")
    monkeypatch.setattr(nb, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(nb, "TARGET_DOMAIN", "svhn")
    with pytest.raises(ValueError, match="test_32x32.mat"):
        nb.fetch_data()


def test_fetch_data_skips_svhn_for_synthetic(nb, tmp_path, monkeypatch):
    write_tiny_data(tmp_path, train=12, test=6)
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"")
    monkeypatch.setattr(nb, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(nb, "TARGET_DOMAIN", "synthetic")
    assert nb.fetch_data() is None


def test_fetch_data_honours_download_off(nb, tmp_path, monkeypatch):
    """With DOWNLOAD off, fetch_data names the missing MNIST files and tries no download."""
    monkeypatch.setattr(nb, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(nb, "DOWNLOAD", False)
    monkeypatch.setattr(nb, "TARGET_DOMAIN", "synthetic")
    monkeypatch.setattr(nb, "download_checked", forbidden_download)
    with pytest.raises(FileNotFoundError) as error:
        nb.fetch_data()
    assert "are missing in" in str(error.value)
    assert "and DOWNLOAD is False" in str(error.value)


def compressed_uint8_variable(name, shape, stored_as=(2, 1), size=None):
    """A compressed .mat variable of class uint8 and `shape` that contains only its first MiB of zeros.

    `stored_as` is the data element's MAT type and bytes per value: (2, 1) is uint8, (9, 8) double. The
    data element declares `size` bytes, by default those that the shape needs. Reading the variable would
    allocate them all; listing it reads only the header. Unpacked in full, such a variable would fill
    memory, as a zip bomb does.
    """
    data_type, item_size = stored_as
    size = math.prod(shape) * item_size if size is None else size
    body = (struct.pack("<4I", 6, 8, 9, 0)                                           # array flags: uint8
            + struct.pack("<2I", 5, 4 * len(shape)) + struct.pack(f"<{len(shape)}i", *shape)
            + bytes(-4 * len(shape) % 8)
            + struct.pack("<2H", 1, len(name)) + name.encode().ljust(4, b"\0")        # a name of up to 4 bytes
            + struct.pack("<2I", data_type, size))
    element = struct.pack("<2I", 14, len(body) + size + (-size % 8)) + body
    stream = zlib.compress(element + bytes(min(size + (-size % 8), 2**20)))
    return struct.pack("<2I", 15, len(stream)) + stream


def write_mat(path, variables, extra=b""):
    """Write `variables` to the .mat file `path` with scipy, then append the raw variable elements `extra`."""
    scipy.io.savemat(path, variables, do_compression=True)
    with open(path, "ab") as file:
        file.write(extra)


def test_oversized_svhn_file_left_unread(nb, tmp_path, monkeypatch):
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"y": np.ones((1_000_000, 1), np.uint8)},
              compressed_uint8_variable("X", (32, 32, 3, 1_000_000)))

    def no_read(*args, **kwargs):
        raise AssertionError("the arrays must not be read")

    monkeypatch.setattr(nb.scipy.io, "loadmat", no_read)
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} declares 1,000,000 images (2,929.7 MiB), more than SVHN's train "
                                       f"file contains (73,257), so it was not read;")


def test_oversized_svhn_data_left_unread(nb, tmp_path, monkeypatch):
    """A variable whose data declares more bytes than its shape needs is rejected before scipy reads them, which
    would unpack them all: 1 GiB for a 1 MB file of such zeros."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"y": np.ones((2, 1), np.uint8)}, compressed_uint8_variable("X", (32, 32, 3, 2), size=2**30))
    assert_left_unread(nb, path, monkeypatch, f"{path}: the data of X takes 1,073,741,824 bytes, not the 6,144 "
                                              f"that its shape (32, 32, 3, 2) needs at 1 byte per value, so it was "
                                              f"not read;")


def assert_left_unread(nb, path, monkeypatch, message):
    """Assert that load_svhn_mat rejects the file `path` with an error that starts with `message`, before
    scipy.io's loadmat reads the arrays, or its whosmat lists them."""
    for reader in ("loadmat", "whosmat"):
        def no_read(*args, reader=reader, **kwargs):
            raise AssertionError(f"scipy.io.{reader} must not run")

        monkeypatch.setattr(nb.scipy.io, reader, no_read)
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("mark", [b"\x01\x01IM", b"\x01\x00ZZ"])
def test_odd_mat_header_still_checked(nb, tmp_path, monkeypatch, mark):
    """scipy reads a file as MAT v5 with another minor version, and as big-endian with any byte-order mark but
    IM, so the size check reads the file the same way."""
    path = tmp_path / "train_32x32.mat"
    order = "<" if mark.endswith(b"IM") else ">"
    y = struct.pack(order + "4I", 6, 8, 9, 0) + struct.pack(order + "2I", 5, 8) + struct.pack(order + "2i", 2, 1)
    y += struct.pack(order + "2H", 1, 1) + b"y\0\0\0" + struct.pack(order + "2I", 2, 2) + bytes([1, 1]).ljust(8, b"\0")
    x = (struct.pack(order + "4I", 6, 8, 9, 0) + struct.pack(order + "2I", 5, 16)
         + struct.pack(order + "4i", 32, 32, 3, 2) + struct.pack(order + "2H", 1, 1) + b"X\0\0\0"
         + struct.pack(order + "2I", 2, 2**30))
    x_stream = zlib.compress(struct.pack(order + "2I", 14, len(x) + 2**30) + x + bytes(2**20))
    path.write_bytes(b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + mark
                     + struct.pack(order + "2I", 14, len(y)) + y
                     + struct.pack(order + "2I", 15, len(x_stream)) + x_stream)
    assert_left_unread(nb, path, monkeypatch, f"{path}: the data of X takes 1,073,741,824 bytes, not the 6,144")


def test_array_flags_read_like_scipy(nb, tmp_path, monkeypatch):
    """scipy reads an array's flags as 8 bytes, whatever their tag declares. A tag that declares more must not
    lead the check past the real header to a decoy one at the start of the data."""
    path = tmp_path / "train_32x32.mat"
    shape_and_name = (struct.pack("<2I", 5, 16) + struct.pack("<4i", 32, 32, 3, 2)
                      + struct.pack("<2H", 1, 1) + b"X\0\0\0")
    header = (struct.pack("<4I", 6, 8 + len(shape_and_name) + 8, 9, 0) + shape_and_name
              + struct.pack("<2I", 2, 2**30))
    decoy = shape_and_name + struct.pack("<2I", 2, 6144)
    stream = zlib.compress(struct.pack("<2I", 14, len(header) + 2**30) + header + decoy + bytes(2**20))
    write_mat(path, {"y": np.ones((2, 1), np.uint8)}, struct.pack("<2I", 15, len(stream)) + stream)
    assert_left_unread(nb, path, monkeypatch, f"{path}: the data of X takes 1,073,741,824 bytes, not the 6,144")


def write_mat_v4(path):
    scipy.io.savemat(path, {"X": np.zeros((3072, 2), np.uint8), "y": np.ones((2, 1))}, format="4")


def write_unknown_mat_v4(path):
    """A file that scipy reads as MAT v4, with a type code that scipy does not know."""
    path.write_bytes(struct.pack("<5i", 60, 1, 1, 0, 2) + b"X\0" + bytes(8))


def write_mat_v73_header(path):
    path.write_bytes(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + struct.pack("<H", 0x0200) + b"IM")


@pytest.mark.parametrize("write, found", [(write_mat_v4, "MAT v4"), (write_unknown_mat_v4, "MAT v4"),
                                          (write_mat_v73_header, "MAT v7.3 (HDF5)")])
def test_other_mat_versions_named(nb, tmp_path, write, found):
    path = tmp_path / "train_32x32.mat"
    write(path)
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value) == (f"{path} is a {found} file, where SVHN's files are MAT v5; delete it to download it "
                                f"again, or replace it with the original")


@pytest.mark.parametrize("compress, name_bytes", [(True, 2**28), (False, 0xFFFFFFF0)])
def test_huge_variable_name_unread(nb, tmp_path, monkeypatch, compress, name_bytes):
    """scipy's listing reads a variable's name whole, at the size its header declares, so the headers are read
    first. Listed by scipy, a 261 kB file whose extra variable declares a name of 256 MiB takes 652 MiB."""
    path = tmp_path / "train_32x32.mat"
    header = (struct.pack("<4I", 6, 8, 6, 0) + struct.pack("<2I2i", 5, 8, 1, 1)       # a double of shape (1, 1)
              + struct.pack("<2I", 1, name_bytes))                                   # its name's tag
    element = struct.pack("<2I", 14, len(header) + 8) + header + bytes(8)
    if compress:
        stream = zlib.compress(struct.pack("<2I", 14, len(header) + name_bytes + 16) + header + bytes(2**20))
        element = struct.pack("<2I", 15, len(stream)) + stream
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)}, element)
    assert_left_unread(nb, path, monkeypatch, f"{path} is not a readable .mat file (ValueError: a variable's name "
                                              f"takes {name_bytes:,d} bytes, where MATLAB's names have at most 63 "
                                              f"characters);")


def big_endian_mat(path, variables, compress):
    """Write uint8 arrays as a big-endian MAT v5 file, as MATLAB on a big-endian machine does, which scipy
    cannot write."""
    elements = b""
    for name, array in variables.items():
        data = array.tobytes(order="F")                                          # MATLAB stores columns first
        body = (struct.pack(">4I", 6, 8, 9, 0)                                   # array flags: uint8
                + struct.pack(">2I", 5, 4 * array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
                + bytes(-4 * array.ndim % 8)
                + struct.pack(">2I", 1, len(name)) + name.encode().ljust(8, b"\0")   # a name of up to 8 bytes
                + struct.pack(">2I", 2, len(data)) + data + bytes(-len(data) % 8))
        element = struct.pack(">2I", 14, len(body)) + body
        if compress:
            element = struct.pack(">2I", 15, len(packed := zlib.compress(element))) + packed
        elements += element
    path.write_bytes(b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + struct.pack(">H", 0x0100) + b"MI" + elements)


@pytest.mark.parametrize("compress", [False, True])
def test_big_endian_svhn_file_loads(nb, tmp_path, compress):
    path = tmp_path / "train_32x32.mat"
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    big_endian_mat(path, {"labels": np.ones((3, 1), np.uint8), "X": images,
                          "y": np.array([[10], [4]], np.uint8)}, compress)
    loaded, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0, 4]
    assert torch.equal(loaded, torch.from_numpy(images.transpose(3, 2, 0, 1).copy()))


def test_other_mat_variables_left_unread(nb, tmp_path):
    """A variable that the notebook does not use is skipped, however large it would unpack."""
    path = tmp_path / "train_32x32.mat"
    images = np.zeros((32, 32, 3, 2), np.uint8)
    write_mat(path, {"X": images, "y": np.array([[3], [10]], np.uint8)},
              compressed_uint8_variable("Z", (1_000_000, 4096)))
    _, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [3, 0]


def opaque_variable(name):
    """An uncompressed variable of MATLAB's opaque class, the class of a saved classdef object. It has a name
    and no shape, then the text MCOS, the object's class name, and stand-in bytes for the object's data."""
    body = (struct.pack("<4I", 6, 8, 17, 0)                                         # array flags: opaque
            + struct.pack("<2I", 1, len(name)) + name.encode().ljust(8, b"\0")
            + struct.pack("<2I", 1, 4) + b"MCOS" + bytes(4)
            + struct.pack("<2I", 1, 6) + b"Person" + bytes(2) + bytes(16))
    return struct.pack("<2I", 14, len(body)) + body


def test_opaque_variable_beside_svhn_loads(nb, tmp_path):
    """A MATLAB object beside X and y is skipped, where scipy's whosmat raises TypeError."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [7]])}, opaque_variable("person"))
    _, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0, 7]


MAT_LISTING_CASES = {
    "uint8 4-D": np.zeros((32, 32, 3, 5), np.uint8), "double column": np.arange(5.0)[:, None],
    "int64 row": np.arange(4, dtype=np.int64)[None], "single": np.ones((2, 3), np.float32),
    "empty": np.zeros((0, 3)), "complex": np.ones((2, 2), complex), "logical": np.array([[True, False]]),
    "text": "digits", "cell": np.array([[np.ones(2), "a"]], dtype=object), "struct": {"a": 1.0, "b": "x"},
    "sparse": scipy.sparse.eye(3, format="csc"),
}


@pytest.mark.parametrize("compress", [False, True])
def test_mat_listing_matches_scipy(nb, tmp_path, compress):
    """The notebook's own listing of a file's variables, which reads only their headers, agrees with scipy's."""
    path = tmp_path / "variables.mat"
    variables = {name.replace(" ", "_").replace("-", "_"): value for name, value in MAT_LISTING_CASES.items()}
    scipy.io.savemat(path, variables, do_compression=compress)
    listed = [(variable.name, variable.kind) for variable in nb.mat_variables(path)]
    assert listed == [(name, kind) for name, _, kind in scipy.io.whosmat(path)]


@pytest.mark.parametrize("compress", [False, True])
def test_mat_listing_reads_numeric_shapes(nb, tmp_path, compress):
    path = tmp_path / "variables.mat"
    variables = {"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((5, 1)), "e": np.zeros((0, 3), np.int16)}
    scipy.io.savemat(path, variables, do_compression=compress)
    shapes = {variable.name: variable.shape for variable in nb.mat_variables(path)}
    assert shapes == {"X": (32, 32, 3, 5), "y": (5, 1), "e": (0, 3)}


SCIPY_MAT_FILES = Path(scipy.io.__file__).parent / "matlab" / "tests" / "data"


def test_matlab_files_read_like_scipy(nb):
    """The MAT v5 files that MATLAB 6.5.1 to 7.4 wrote on 32-bit Linux for scipy's own tests are listed as scipy
    lists them, and their real numeric arrays read as scipy reads them."""
    files = [path for path in sorted(SCIPY_MAT_FILES.glob("*_GLNX86.mat"))
             if scipy.io.matlab.matfile_version(path)[0] == 1]                         # not MAT v4
    assert len(files) > 30, f"scipy's test files are missing from {SCIPY_MAT_FILES}"
    compared = 0
    for path in files:
        listed = list(nb.mat_variables(path))
        names = [(variable.name or "__function_workspace__", variable.kind) for variable in listed]   # scipy's name
        assert names == [(name, kind) for name, _, kind in scipy.io.whosmat(path)], path.name
        arrays = scipy.io.loadmat(path)
        for variable in listed:
            if variable.data_type is not None and not variable.is_complex and variable.kind != "logical":
                data = nb.read_mat_data(path, variable).reshape(variable.shape, order="F")
                assert np.array_equal(data, arrays[variable.name]), f"{path.name}: {variable.name}"
                assert data.dtype == arrays[variable.name].dtype, f"{path.name}: {variable.name}"
                compared += 1
    assert compared >= 16


def svhn_arrays(count):
    """Random SVHN-like X (32, 32, 3, count) uint8 and y (count, 1) in 1-10, as SVHN's files hold them."""
    rng = np.random.default_rng(count)
    return rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8), rng.integers(1, 11, (count, 1))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("label_type", [np.float64, np.float32, np.uint8, np.int16, np.int32, np.uint64])
def test_svhn_reader_matches_loadmat(nb, tmp_path, compress, label_type):
    path = tmp_path / "train_32x32.mat"
    images, labels = svhn_arrays(5)
    scipy.io.savemat(path, {"X": images, "y": labels.astype(label_type)}, do_compression=compress)
    expected = scipy.io.loadmat(path)
    loaded, loaded_labels = nb.load_svhn_mat(path)
    assert torch.equal(loaded, torch.from_numpy(expected["X"].transpose(3, 2, 0, 1).copy()))
    assert loaded_labels.tolist() == [label % 10 for label in expected["y"].ravel().astype(int).tolist()]


def test_one_image_svhn_file_loads(nb, tmp_path):
    """MATLAB drops the trailing dimension of size 1, so X of one image has shape (32, 32, 3)."""
    path = tmp_path / "test_32x32.mat"
    images, _ = svhn_arrays(1)
    scipy.io.savemat(path, {"X": images[..., 0], "y": np.array([[10]])})
    loaded, labels = nb.load_svhn_mat(path)
    assert torch.equal(loaded, torch.from_numpy(images.transpose(3, 2, 0, 1).copy()))
    assert labels.tolist() == [0]


def zeros_stream_variable(name, shape=(1, 1)):
    """A compressed uint8 variable of zeros whose zlib stream goes on with 128 MiB of zeros past the variable's
    end, which scipy's reader unpacks when it meets the variable. `name` has at most 4 characters."""
    size = math.prod(shape)
    body = (struct.pack("<4I", 6, 8, 9, 0)                                           # array flags: uint8
            + struct.pack("<2I", 5, 4 * len(shape)) + struct.pack(f"<{len(shape)}i", *shape)
            + bytes(-4 * len(shape) % 8)
            + struct.pack("<2H", 1, len(name)) + name.encode().ljust(4, b"\0")
            + struct.pack("<2I", 2, size) + bytes(size + (-size % 8)))
    packer = zlib.compressobj(9)
    stream = packer.compress(struct.pack("<2I", 14, len(body)) + body)
    stream += b"".join(packer.compress(bytes(2**24)) for _ in range(8)) + packer.flush()
    return struct.pack("<2I", 15, len(stream)) + stream


def test_compressed_variable_before_x_unread(nb, tmp_path, monkeypatch):
    """A variable placed before X is listed from its first 4 KiB only, and scipy reads nothing. Read by scipy,
    this 131 kB file raised the peak RSS by 256 MiB."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.array([[3]], np.uint8)})
    data = path.read_bytes()
    path.write_bytes(data[:128] + zeros_stream_variable("Z") + data[128:])
    for reader in ("loadmat", "whosmat"):
        monkeypatch.setattr(nb.scipy.io, reader, None)      # calling it raises TypeError
    _, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [3]


def test_data_past_compressed_array_rejected(nb, tmp_path):
    """The zlib stream of X goes on after X's data. Read by scipy, this 131 kB file raised the peak RSS by
    256 MiB before scipy rejected it."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"y": np.array([[3]], np.uint8)}, zeros_stream_variable("X", (32, 32, 3, 1)))
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: the compressed array X goes "
                                       f"on past the end of its data);")


def test_bytes_after_variables_rejected(nb, tmp_path):
    """scipy's listing rejects them too. Walked as 8-byte elements, 64 MiB of zero bytes took 10 s."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.array([[3]], np.uint8)}, bytes(2**20))
    end = path.stat().st_size - 2**20
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: the element at byte "
                                       f"{end:,d} has MAT data type 0, where a variable, of type 14, belongs);")


def test_cut_short_svhn_file_named(nb, tmp_path):
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: the variable at byte 128 "
                                       f"declares 6,200 bytes, but the file ends 864 bytes into them, so it is cut "
                                       f"short);")


def svhn_file_with_x_stream(path, stream):
    """Write an SVHN file whose X, of the images svhn_arrays(2), is the compressed element of zlib `stream`."""
    images, labels = svhn_arrays(2)
    scipy.io.savemat(path, {"X": images})
    x_element = path.read_bytes()[128:]
    scipy.io.savemat(path, {"y": labels.astype(np.uint8)})
    data = path.read_bytes()
    compressed = stream(x_element)
    path.write_bytes(data[:128] + struct.pack("<2I", 15, len(compressed)) + compressed + data[128:])
    return images, labels


def unterminated(data):
    packer = zlib.compressobj()
    return packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH)


def empty_blocks_first(data):
    packer = zlib.compressobj()
    return packer.compress(b"") + packer.flush(zlib.Z_SYNC_FLUSH) + b"\0\0\0\xff\xff" * 14_000 + packer.compress(data) \
        + packer.flush()


@pytest.mark.parametrize("stream", [unterminated, empty_blocks_first])
def test_odd_zlib_streams_load(nb, tmp_path, stream):
    """scipy reads a stream without its end and checksum, which its reader says some MATLAB files have, and
    one that starts with 70,000 bytes of empty deflate blocks, which unpack to nothing."""
    path = tmp_path / "train_32x32.mat"
    images, labels = svhn_file_with_x_stream(path, stream)
    loaded, loaded_labels = nb.load_svhn_mat(path)
    assert torch.equal(loaded, torch.from_numpy(images.transpose(3, 2, 0, 1).copy()))
    assert loaded_labels.tolist() == (labels.ravel() % 10).tolist()


def test_eight_bytes_past_array_rejected(nb, tmp_path):
    """Padding to a multiple of 8 takes at most 7 bytes, so a stream that goes on 8 bytes past X is rejected."""
    path = tmp_path / "train_32x32.mat"
    svhn_file_with_x_stream(path, lambda element: zlib.compress(element + bytes(8)))
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: the compressed array X goes "
                                       f"on past the end of its data);")


def test_svhn_file_at_image_limit_loads(nb, tmp_path, monkeypatch):
    """A file of exactly SVHN_MAX_IMAGES images, as SVHN's train file is, loads in full."""
    write_tiny_data(tmp_path, train=12, test=6)
    monkeypatch.setattr(nb, "SVHN_MAX_IMAGES", 12)
    images, labels = nb.load_svhn_mat(tmp_path / "svhn" / "train_32x32.mat")
    assert len(images) == 12
    assert labels.tolist() == [digit % 10 for digit in range(12)]


def test_svhn_file_without_images_rejected(nb, tmp_path):
    """A file whose X and y contain no images is rejected with the counts, before any data is read."""
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 0), np.uint8), "y": np.zeros((0, 1), np.uint8)})
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} holds 0 images and 0 labels;")


def test_file_cut_in_tag_named(nb, tmp_path):
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    path.write_bytes(path.read_bytes()[:131])
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: the file ends 3 bytes into "
                                       f"the tag of the variable at byte 128, so it is cut short);")


def test_huge_svhn_label_named(nb, tmp_path):
    """A whole number far outside 1-10 is named as it is stored, without a cast to int64 that overflows."""
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1e300], [3]])})
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path}: SVHN labels must be 1-10, with 10 for the digit 0, found [3, 1e+300];")


def test_shape_stored_as_uint32_accepted(nb, tmp_path):
    """MATLAB stores shapes as int32, but scipy reads uint32 too."""
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [5]], np.uint8)})
    data = bytearray(path.read_bytes())
    y_at = data.rindex(b"y\0\0\0") - 44                   # y's tag, flags, shape and name's tag come first
    assert struct.unpack_from("<2I", data, y_at + 24) == (5, 8)
    struct.pack_into("<I", data, y_at + 24, 6)
    path.write_bytes(data)
    _, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0, 5]


def write_svhn_y_name_as(path, name_type, name=b"y"):
    """Write a two-image SVHN file whose variable y has its one-character name stored as MAT data type
    `name_type`, with the byte `name`."""
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [5]], np.uint8)})
    data = bytearray(path.read_bytes())
    y_at = data.rindex(b"y\0\0\0") - 44                   # y's tag, flags, shape and name's tag come first
    assert struct.unpack_from("<2H", data, y_at + 40) == (1, 1)     # a small element: int8, 1 byte
    struct.pack_into("<H", data, y_at + 40, name_type)
    data[y_at + 44:y_at + 45] = name
    path.write_bytes(data)


def test_name_stored_as_numbers_rejected(nb, tmp_path):
    """scipy's loadmat raises TypeError for a name that is not int8 characters."""
    path = tmp_path / "train_32x32.mat"
    write_svhn_y_name_as(path, 2)
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: a variable's name is "
                                       f"stored as MAT data type 2, where MATLAB writes int8 characters (1));")


def test_ascii_utf8_name_accepted(nb, tmp_path):
    """scipy reads a name stored as UTF-8 where it is ASCII, because some malformed files store names that way."""
    path = tmp_path / "train_32x32.mat"
    write_svhn_y_name_as(path, 16)
    assert sorted(key for key in scipy.io.loadmat(path) if not key.startswith("__")) == ["X", "y"]
    _, labels = nb.load_svhn_mat(path)
    assert labels.tolist() == [0, 5]


def test_non_ascii_utf8_name_rejected(nb, tmp_path):
    path = tmp_path / "train_32x32.mat"
    write_svhn_y_name_as(path, 16, name=b"\xff")
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (ValueError: a variable's name 'ÿ' "
                                       f"is stored as UTF-8 with characters outside ASCII, where MATLAB writes "
                                       f"int8 characters (1));")


def test_uint8_class_stored_as_double_rejected(nb, tmp_path):
    """The class in a variable's header need not match how its data is stored, which sets the loaded dtype."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"y": np.ones((2, 1), np.uint8)}, compressed_uint8_variable("X", (32, 32, 3, 2), stored_as=(9, 8)))
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path}: X must be uint8 of shape (32, 32, 3, N), found its data stored as "
                                       f"MAT data type 9, not uint8 (2), so it was not read;")


def test_repeated_svhn_variable_rejected(nb, tmp_path):
    """scipy lists the last variable of a name but reads the first, so a second X could pass unchecked."""
    path = tmp_path / "train_32x32.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)},
              compressed_uint8_variable("X", (32, 32, 3, 2)))
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} has more than one variable named X;")


def test_svhn_labels_in_cell_rejected(nb, tmp_path):
    path = tmp_path / "test_32x32.mat"
    labels = np.empty((2, 1), dtype=object)
    labels[0, 0], labels[1, 0] = np.ones(3), np.ones(3)
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": labels})
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path}: labels y must be whole numbers, found cell;")


def test_svhn_bad_checksum_named(nb, tmp_path):
    """A compressed .mat whose zlib checksum is wrong makes scipy raise zlib.error. The message names the file."""
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((4, 1), np.uint8)},
                     do_compression=True)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                         # the last byte of the zlib stream's Adler-32 checksum
    path.write_bytes(data)
    with pytest.raises(ValueError) as error:
        nb.load_svhn_mat(path)
    assert str(error.value).startswith(f"{path} is not a readable .mat file (error: Error -3 while decompressing")
    assert str(error.value).endswith("delete it to download it again, or replace it with the original")


@pytest.mark.parametrize("name, message", [
    ("train_32x32.mat", "{path} is a folder, not SVHN's file. Remove or rename it to download the file, or put the "
                        "file in its place"),
    ("train_32x32.mat.part", "cannot write {path} for the download (it is a folder). Remove it, or point DATA_DIR at "
                             "another folder"),
])
def test_svhn_folder_at_file_named(nb, tmp_path, name, message):
    """A folder at the file's name, or at the name its download goes to first, is named with the fix."""
    path = tmp_path / "svhn" / name
    path.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        nb.svhn_file(tmp_path, "train")
    assert str(error.value) == message.format(path=path)


def test_data_cell_downloads_in_kernel(repo_root, tmp_path, serve_folder, run_cells_until):
    """The data cell downloads MNIST and SVHN in a kernel that has run only the cells before it, in order."""
    write_tiny_data(tmp_path / "server", train=12, test=6)
    svhn_url = serve_folder(tmp_path / "server" / "svhn")
    svhn_md5 = {name: hashlib.md5((tmp_path / "server" / "svhn" / name).read_bytes()).hexdigest()
                for name in ("train_32x32.mat", "test_32x32.mat")}
    served = tmp_path / "server" / "mnist" / "MNIST" / "raw"
    gzip_mnist_files(served)
    resources = [(path.name, hashlib.md5(path.read_bytes()).hexdigest()) for path in sorted(served.glob("*.gz"))]
    mirror = serve_folder(served) + "/"
    setup = (f"SVHN_SOURCES = {{split: ({svhn_url!r} + '/' + name, name, {svhn_md5!r}[name]) "
             f"for split, name in (('train', 'train_32x32.mat'), ('test', 'test_32x32.mat'))}}\n"
             f"torchvision.datasets.MNIST.mirrors = [{mirror!r}]\n"
             f"torchvision.datasets.MNIST.resources = {resources!r}")
    data = tmp_path / "data"
    run_cells_until(repo_root / NOTEBOOK, "mnist = load_mnist(DATA_DIR", setup,
                    {**SMOKE, "TARGET_DOMAIN": "svhn", "DATA_DIR": str(data)})
    assert (data / "svhn" / "test_32x32.mat").read_bytes() == (tmp_path / "server" / "svhn" /
                                                               "test_32x32.mat").read_bytes()
    assert (data / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()

