"""Tests of part1_lstm.ipynb: the cell's math, attention, evaluation, data and a smoke run."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tools.nbdefs import load_definitions
from tools.run_notebooks import NotebookFailed

NOTEBOOK = "part1_lstm.ipynb"


@pytest.fixture(scope="module")
def part1(repo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("part1_defs")
    # MIXED_PRECISION's default depends on the CPU, so it is off here and the tests that want it switch it on.
    return load_definitions(repo_root / NOTEBOOK, env={
        "PROFILE": "smoke", "DATA_DIR": str(folder / "data"), "REPORT_DIR": str(folder / "report"),
        "CHECKPOINT_DIR": str(folder / "checkpoints"), "MIXED_PRECISION": "0"})


@pytest.fixture(autouse=True)
def forget_changed_settings(part1):
    """Clear the record of settings that a test set again, as a rerun of the definitions cell does, because the
    tests of this file share one loaded notebook."""
    yield
    part1.settings_set_again.clear()


def copy_weights_into(cell, reference):
    with torch.no_grad():
        cell.x2h.weight.copy_(reference.weight_ih)
        cell.x2h.bias.copy_(reference.bias_ih)
        cell.h2h.weight.copy_(reference.weight_hh)
        cell.h2h.bias.copy_(reference.bias_hh)


def tiny_model(part1, name, vocab_size=13, embed=6, hidden=8, dropout=0.0, fused=True, seed=0):
    torch.manual_seed(seed)
    model = part1.MODEL_CLASSES[name](vocab_size, embed, hidden, dropout).double()
    if hasattr(model, "fused"):
        model.fused = fused
    return model


# ---------------------------------------------------------------- the cell


def test_definitions_load_without_side_effects(part1, tmp_path):
    assert part1.PROFILE == "smoke"
    for name in ("MyLSTMCell", "MyLSTM", "MyLSTM_att", "TorchLSTM", "evaluate", "Vocabulary"):
        assert hasattr(part1, name), name
    report = part1.FIGURE_DIR.parent
    assert not report.exists(), "loading the definitions must not write the report folder"


def test_cell_matches_torch_lstmcell_over_steps(part1):
    torch.manual_seed(1)
    reference = nn.LSTMCell(5, 7).double()
    cell = part1.MyLSTMCell(5, 7).double()
    copy_weights_into(cell, reference)
    inputs = torch.randn(6, 3, 5, dtype=torch.double, requires_grad=True)   # (T, B, I)
    h0 = torch.randn(3, 7, dtype=torch.double)
    c0 = torch.randn(3, 7, dtype=torch.double)

    def run(step):
        h, c, loss = h0, c0, 0.0
        for t in range(inputs.shape[0]):
            h, c = step(inputs[t], (h, c))
            loss = loss + (h * (t + 1)).sum() + (c ** 2).sum()
        return h, c, loss

    h_ref, c_ref, loss_ref = run(reference)
    grads_ref = torch.autograd.grad(loss_ref, [inputs, reference.weight_ih, reference.weight_hh,
                                               reference.bias_ih, reference.bias_hh])
    h, c, loss = run(cell)
    grads = torch.autograd.grad(loss, [inputs, cell.x2h.weight, cell.h2h.weight, cell.x2h.bias, cell.h2h.bias])
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-12)
    for name, grad, grad_ref in zip(["input", "x2h.weight", "h2h.weight", "x2h.bias", "h2h.bias"], grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_cell_closed_form_with_zero_weights(part1):
    cell = part1.MyLSTMCell(3, 2).double()
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 0.7, 1.5, -2.0], dtype=torch.double)   # i, f, g, o
    with torch.no_grad():
        cell.x2h.weight.zero_()
        cell.h2h.weight.zero_()
        cell.x2h.bias.copy_(bias)
        cell.h2h.bias.copy_(bias / 2)
    x = torch.randn(4, 3, dtype=torch.double)
    h_in = torch.randn(4, 2, dtype=torch.double)
    c_in = torch.tensor([[1.0, -2.0]], dtype=torch.double).expand(4, 2)
    h_out, c_out = cell(x, (h_in, c_in))

    pre = 1.5 * bias
    i, f, g, o = torch.sigmoid(pre[0:2]), torch.sigmoid(pre[2:4]), torch.tanh(pre[4:6]), torch.sigmoid(pre[6:8])
    expected_c = f * c_in + i * g
    expected_h = o * torch.tanh(expected_c)
    torch.testing.assert_close(c_out, expected_c, rtol=0, atol=1e-15)
    torch.testing.assert_close(h_out, expected_h, rtol=0, atol=1e-15)


def test_reset_parameters_uniform_bound(part1):
    cell = part1.MyLSTMCell(30, 25)
    bound = 1 / math.sqrt(25)
    for name, parameter in cell.named_parameters():
        assert parameter.abs().max() <= bound, name
        assert parameter.min() < -0.8 * bound, f"{name} does not fill the interval"
        assert parameter.max() > 0.8 * bound, f"{name} does not fill the interval"
    assert cell.x2h.weight.shape == (100, 30)
    assert cell.h2h.weight.shape == (100, 25)


def test_reset_bound_uses_hidden_size(part1):
    torch.manual_seed(0)
    cell = part1.MyLSTMCell(400, 4)                 # a bound from the input size, 1 / sqrt(400), is a tenth as wide
    bound = 1 / math.sqrt(4)
    largest = cell.x2h.weight.abs().max().item()
    assert largest <= bound
    assert largest > 0.9 * bound


@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att"])
def test_fused_path_matches_plain_loop(part1, name):
    fused = tiny_model(part1, name, fused=True)
    plain = tiny_model(part1, name, fused=False)
    x = torch.randint(13, (4, 9))
    weights = torch.randn(4, 9, 13, dtype=torch.double)
    results = []
    for model in (fused, plain):
        logits = model.forward_all(x)
        loss = (logits * weights).sum() + model(x).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logits, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for (param_name, _), grad_fused, grad_plain in zip(fused.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(grad_fused, grad_plain, rtol=0, atol=1e-11, msg=f"gradient of {param_name}")


def test_lstm_recurrence_gradcheck(part1):
    torch.manual_seed(2)
    steps, batch, inputs, hidden = 4, 3, 5, 2
    args = [torch.randn(steps, batch, inputs, dtype=torch.double, requires_grad=True),
            torch.randn(batch, hidden, dtype=torch.double, requires_grad=True),
            torch.randn(batch, hidden, dtype=torch.double, requires_grad=True),
            *recurrence_parameters(inputs, hidden, seed=2)]
    assert torch.autograd.gradcheck(part1.LSTMRecurrence.apply, args)
    # Each output's gradient path on its own, so that one wrong path cannot hide behind another.
    for output in range(3):
        def one_output(*tensors, index=output):
            return part1.LSTMRecurrence.apply(*tensors)[index]
        assert torch.autograd.gradcheck(one_output, args), f"output {output}"


# ---------------------------------------------------------------- the CPU speed paths

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn(part1, monkeypatch):
    """Switch ONEDNN_MATMUL on for one test, and let monkeypatch restore it afterwards."""
    monkeypatch.setattr(part1, "ONEDNN_MATMUL", True)
    return part1


@needs_onednn
def test_onednn_linear_matches_nn_linear(onednn):
    part1 = onednn
    torch.manual_seed(3)
    layer = part1.OneDNNLinear(24, 40)
    reference = nn.Linear(24, 40)
    reference.load_state_dict(layer.state_dict())            # same parameters, same state_dict keys
    x = torch.randn(5, 7, 24)                                 # a (B, T, in) input, as the models use
    grad_y = torch.randn(5, 7, 40)
    results = []
    for module in (layer, reference):
        x_copy = x.clone().requires_grad_()
        y = module(x_copy)
        grads = torch.autograd.grad(y, [x_copy, module.weight, module.bias], grad_y)
        results.append((y, *grads))
    assert results[0][0].grad_fn.name() == "OneDNNLinearFunctionBackward", "the oneDNN path was not taken"
    for name, mine, expected in zip(("output", "input grad", "weight grad", "bias grad"), results[0], results[1]):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert results[0][2].is_contiguous(), "the weight gradient must have the weight's layout"


def test_onednn_linear_falls_back_exactly(part1):
    """Float64, or ONEDNN_MATMUL off, runs nn.Linear's own kernel: bit-identical outputs."""
    torch.manual_seed(4)
    layer = part1.OneDNNLinear(6, 9)
    reference = nn.Linear(6, 9)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6)
    saved = part1.ONEDNN_MATMUL
    try:
        part1.ONEDNN_MATMUL = False
        assert torch.equal(layer(x), reference(x))
    finally:
        part1.ONEDNN_MATMUL = saved
    assert torch.equal(layer.double()(x.double()), reference.double()(x.double()))


@needs_onednn
@pytest.mark.parametrize("packed", [False, True])
def test_linear_helper_with_bias_add_and_packed_weight(onednn, packed):
    part1 = onednn
    torch.manual_seed(5)
    x, weight, bias, add = torch.randn(8, 12), torch.randn(20, 12), torch.randn(20), torch.randn(8, 20)
    used = part1.prepack(weight, batch_size=8) if packed else weight
    assert used.is_mkldnn == packed
    expected = x.double() @ weight.double().t() + bias.double() + add.double()
    torch.testing.assert_close(part1.linear(x, used, bias, add).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part1.linear(x, used).double(), x.double() @ weight.double().t(),
                               rtol=1e-5, atol=1e-5)
    # A transposed view as the weight, which is how the recurrence's backward pass passes W_hh^T.
    torch.testing.assert_close(part1.linear(add, weight.t()).double(), add.double() @ weight.double(),
                               rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att", "TorchLSTM"])
def test_speed_paths_match_plain_float32(onednn, name):
    """The notebook's default float32 path (oneDNN, fused recurrence) against the plain loop without oneDNN."""
    part1 = onednn
    x = torch.randint(50, (6, 11))
    weights = torch.randn(6, 11, 50)
    results = []
    for speed in (True, False):
        part1.ONEDNN_MATMUL = speed
        torch.manual_seed(0)
        model = part1.MODEL_CLASSES[name](50, 16, 24, 0.0)
        if hasattr(model, "fused"):
            model.fused = speed
        logits = model.forward_all(x)
        loss = (logits * weights).sum() + model(x).pow(2).sum()
        results.append((logits, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for (param_name, _), fast, plain in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5, msg=f"gradient of {param_name}")


@needs_onednn
def test_onednn_linear_second_derivative(onednn):
    """A gradient penalty through OneDNNLinear gets the same second derivatives as through nn.Linear."""
    part1 = onednn
    torch.manual_seed(6)
    layer = part1.OneDNNLinear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 4)
    results = []
    for module in (layer, reference):
        x_copy = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(torch.tanh(module(x_copy)).pow(2).sum(), x_copy, create_graph=True)
        results.append(torch.autograd.grad(grad_x.pow(2).sum(), [x_copy, module.weight, module.bias]))
    for name, mine, expected in zip(("input", "weight", "bias"), *results):
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6, msg=name)


@needs_onednn
def test_onednn_linear_shape_errors_are_nn_linear_s(onednn):
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        onednn.OneDNNLinear(8, 5)(torch.randn(3, 7))


@needs_onednn
def test_onednn_linear_follows_cpu_autocast(onednn):
    layer = onednn.OneDNNLinear(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 6)).dtype == torch.bfloat16


@pytest.fixture
def mixed_precision(part1, monkeypatch):
    """Switch MIXED_PRECISION on for one test, and let monkeypatch restore it afterwards."""
    monkeypatch.setattr(part1, "MIXED_PRECISION", True)
    return part1


def bfloat16_reference(*tensors):
    """Round the tensors to bfloat16 and widen them to float64, for an exact reference product."""
    return [tensor.detach().to(torch.bfloat16).double() for tensor in tensors]


def test_mixed_precision_rounds_output_layer(mixed_precision):
    torch.manual_seed(11)
    layer = mixed_precision.OutputLinear(24, 40)
    x = torch.randn(5, 7, 24)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, y.to(torch.bfloat16).float()), "the logits must be rounded to bfloat16"
    x16, weight16, bias16 = bfloat16_reference(x, layer.weight, layer.bias)
    expected = x16 @ weight16.t() + bias16
    # Rounding the float32 sum to bfloat16 once costs at most 2**-8 of the value, on top of the sum's own
    # error. The bound is twice that, for backends that round the sum differently.
    torch.testing.assert_close(y.double(), expected, rtol=2**-7, atol=1e-5)
    float32 = nn.functional.linear(x, layer.weight, layer.bias)
    assert (y - float32).abs().max() > 1e-4, "the bfloat16 path was not taken"


def test_mixed_precision_gradients_within_rounding(mixed_precision):
    torch.manual_seed(12)
    layer = mixed_precision.OutputLinear(24, 40)
    x = torch.randn(9, 24, requires_grad=True)
    grad_y = torch.randn(9, 40)
    grads = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad_y)
    x16, weight16, grad16 = bfloat16_reference(x, layer.weight, grad_y)
    expected = (grad16 @ weight16, grad16.t() @ x16, grad16.sum(0))
    for name, grad, reference in zip(("input", "weight", "bias"), grads, expected):
        assert grad.dtype == torch.float32, name
        # The backward products and the bias sum are rounded to bfloat16 once each.
        torch.testing.assert_close(grad.double(), reference, rtol=2**-7, atol=1e-4, msg=name)


def test_mixed_precision_skips_evaluation(mixed_precision):
    """In eval mode the layer multiplies in float32, exactly as with the setting off."""
    torch.manual_seed(13)
    layer = mixed_precision.OutputLinear(24, 40).eval()
    x = torch.randn(6, 24)
    on = layer(x)
    mixed_precision.MIXED_PRECISION = False
    assert torch.equal(on, layer(x))


def test_mixed_precision_keeps_cell_float32(mixed_precision):
    """Only the output layer rounds, so the cell and its plain loop still match torch.nn.LSTMCell in float32."""
    part1 = mixed_precision
    torch.manual_seed(15)
    reference = nn.LSTMCell(5, 7)
    cell = part1.MyLSTMCell(5, 7)
    copy_weights_into(cell, reference)
    assert cell.training
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    for mine, expected in zip(cell(x, (h, c)), reference(x, (h, c))):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)
    inputs = torch.randn(3, 6, 5)
    torch.testing.assert_close(part1.run_cell_over_window(cell, inputs, fused=False),
                               part1.run_cell_over_window(cell, inputs, fused=True), rtol=1e-5, atol=1e-6)


def torch_func_gradients(model, x):
    """Return the gradients of model(x).logsumexp(-1).sum() by parameter name, taken by torch.func.grad."""
    parameters = {key: value.detach() for key, value in model.named_parameters()}

    def loss(parameters):
        return torch.func.functional_call(model, parameters, (x,)).logsumexp(-1).sum()

    return torch.func.grad(loss)(parameters)


def test_mixed_precision_off_under_torch_func(mixed_precision):
    """Under a torch.func transform the output layer computes in float32, as with the setting off."""
    part1 = mixed_precision
    torch.manual_seed(16)
    model = part1.MODEL_CLASSES["MyLSTM"](30, 8, 12, 0.0)
    assert model.training
    x = torch.randint(30, (4, 6))
    grads = torch_func_gradients(model, x)
    part1.MIXED_PRECISION = False
    model(x).logsumexp(-1).sum().backward()
    for key, parameter in model.named_parameters():
        torch.testing.assert_close(grads[key], parameter.grad, rtol=1e-5, atol=1e-6, msg=key)


def test_mixed_precision_leaves_float64_alone(mixed_precision):
    torch.manual_seed(14)
    layer = mixed_precision.OutputLinear(6, 9).double()
    x = torch.randn(3, 6, dtype=torch.double)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att", "TorchLSTM"])
def test_mixed_precision_models_match_float32(mixed_precision, name):
    """A training-mode forward and backward pass with MIXED_PRECISION on stays within bfloat16's rounding."""
    part1 = mixed_precision
    x = torch.randint(50, (6, 11))
    targets = torch.randint(50, (6, 11))
    results = []
    for on in (True, False):
        part1.MIXED_PRECISION = on
        torch.manual_seed(0)
        model = part1.MODEL_CLASSES[name](50, 16, 24, 0.0)
        logits = model.forward_all(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        results.append((logits, torch.autograd.grad(loss, list(model.parameters()))))
    (logits_on, grads_on), (logits_off, grads_off) = results
    assert not torch.equal(logits_on, logits_off), "the bfloat16 path was not taken"
    # Each rounded input carries a relative error of up to 2**-8, and a sum of terms of both signs can
    # lose relative accuracy, so the bound is 2**-6 of the largest logit rather than one rounding.
    torch.testing.assert_close(logits_on, logits_off, rtol=0, atol=2**-6 * logits_off.abs().max().item())
    for (param_name, _), on, off in zip(model.named_parameters(), grads_on, grads_off):
        scale = off.abs().max().item()
        assert scale > 0, param_name
        torch.testing.assert_close(on, off, rtol=0, atol=0.02 * scale, msg=f"gradient of {param_name}")


@needs_onednn
@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att"])
def test_torch_func_transforms_take_plain_path(onednn, name):
    """torch.func.grad, vmap and jacrev run with the speed settings on and match ordinary autograd."""
    part1 = onednn
    torch.manual_seed(10)
    model = part1.MODEL_CLASSES[name](30, 8, 12, 0.0)
    assert model.fused
    x = torch.randint(30, (4, 6))
    parameters = {key: value.detach() for key, value in model.named_parameters()}
    grads = torch_func_gradients(model, x)
    fast_path = model.hidden_states(x).grad_fn.next_functions[0][0]      # under the (B, T, H) transpose
    assert fast_path.name() == "LSTMRecurrenceBackward", "the reference must take the fast path"
    model.zero_grad()
    model(x).logsumexp(-1).sum().backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad.abs().max() > 0, key
        torch.testing.assert_close(grads[key], parameter.grad, rtol=1e-5, atol=1e-6, msg=key)

    def one_window(window):
        return torch.func.functional_call(model, parameters, (window.unsqueeze(0),)).squeeze(0)

    per_window = torch.func.vmap(one_window)(x)
    torch.testing.assert_close(per_window, model(x), rtol=1e-5, atol=1e-6)

    def summed_logits(weight_hh):
        return torch.func.functional_call(model, {**parameters, "lstmcell.h2h.weight": weight_hh}, (x,)).sum(0)

    jacobian = torch.func.jacrev(summed_logits)(parameters["lstmcell.h2h.weight"])    # (30, 4H, H)
    logits = model(x).sum(0)
    for word in range(30):
        (row,) = torch.autograd.grad(logits[word], model.lstmcell.h2h.weight, retain_graph=True)
        torch.testing.assert_close(jacobian[word], row, rtol=1e-5, atol=1e-6, msg=f"row of word {word}")


def test_vectorized_jacobian_needs_plain_loop(part1):
    """autograd.functional's vectorize=True batches only the backward pass, so the fused recurrence
    cannot take part. The docs tell users to switch it off. If this starts to pass, update them."""
    torch.manual_seed(11)
    model = part1.MyLSTM(20, 6, 7, 0.0)
    x = torch.randint(20, (2, 5))
    weight_hh = model.lstmcell.h2h.weight.detach()

    def summed_logits(weight):
        return torch.func.functional_call(model, {"lstmcell.h2h.weight": weight}, (x,)).sum(0)

    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.autograd.functional.jacobian(summed_logits, weight_hh, vectorize=True)
    model.fused = False
    vectorized = torch.autograd.functional.jacobian(summed_logits, weight_hh, vectorize=True)
    torch.testing.assert_close(vectorized, torch.autograd.functional.jacobian(summed_logits, weight_hh))


def test_transform_check_inside_and_outside(part1):
    assert not part1.functorch_transforms_active()
    seen = []

    def record(t):
        seen.append(part1.functorch_transforms_active())
        return t.sum()

    torch.func.grad(record)(torch.ones(2))
    torch.func.vmap(record)(torch.ones(3, 2))
    assert seen == [True, True]
    assert not part1.functorch_transforms_active()


def recurrence_parameters(inputs, hidden, seed):
    """x2h weight and bias, h2h weight and bias of a cell, in float64, each requiring gradients."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4 * hidden, inputs), (4 * hidden,), (4 * hidden, hidden), (4 * hidden,)]
    return [torch.randn(*shape, dtype=torch.double, generator=generator).requires_grad_() for shape in shapes]


def test_lstm_recurrence_accepts_strided_inputs(part1):
    """Inputs as a transposed view (as MyLSTM passes them) give the same outputs and gradients as a copy."""
    torch.manual_seed(7)
    strided = torch.randn(3, 4, 6, dtype=torch.double).transpose(0, 1)   # (T=4, B=3, I=6)
    zeros = torch.zeros(3, 5, dtype=torch.double)
    results = []
    for inputs in (strided, strided.contiguous()):
        inputs = inputs.detach().requires_grad_()
        parameters = recurrence_parameters(6, 5, seed=8)
        hs, _, _ = part1.LSTMRecurrence.apply(inputs, zeros, zeros, *parameters)
        results.append((hs, *torch.autograd.grad(hs.pow(2).sum(), [inputs, *parameters])))
    names = ("hs", "inputs grad", "x2h weight grad", "x2h bias grad", "h2h weight grad", "h2h bias grad")
    for name, strided_result, contiguous_result in zip(names, *results):
        torch.testing.assert_close(strided_result, contiguous_result, rtol=0, atol=1e-12, msg=name)


def test_lstm_recurrence_second_derivative_raises(part1):
    inputs = torch.randn(2, 1, 3, dtype=torch.double, requires_grad=True)
    zeros = torch.zeros(1, 2, dtype=torch.double)
    hs, _, _ = part1.LSTMRecurrence.apply(inputs, zeros, zeros, *recurrence_parameters(3, 2, seed=9))
    (grad,) = torch.autograd.grad(hs.pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_resumed_optimizer_keeps_current_fused_adam(part1):
    model = tiny_model(part1, "MyLSTM").float()
    saved = part1.FUSED_ADAM
    try:
        part1.FUSED_ADAM = True
        fused = part1.make_optimizer(model, 1e-3)
        model.forward_all(torch.randint(13, (2, 4))).sum().backward()
        fused.step()
        part1.FUSED_ADAM = False
        resumed = part1.make_optimizer(model, 1e-3)
        part1.load_optimizer_state(resumed, fused.state_dict())
    finally:
        part1.FUSED_ADAM = saved
    assert all(group["fused"] is False for group in resumed.param_groups)
    assert len(resumed.state) == len(list(model.parameters())), "the moment estimates were not loaded"


def test_resumed_fused_adam_gets_its_step_layout(part1):
    """Fused Adam keeps each step count as float32 on the parameter's device, which CUDA's fused kernel requires.

    A checkpoint of plain Adam must load in that layout when FUSED_ADAM is on now. With float64 as the default
    dtype, plain Adam keeps its step counts in float64, so the layout shows on a CPU as well.
    """
    model = tiny_model(part1, "MyLSTM")
    saved_fused, saved_dtype = part1.FUSED_ADAM, torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        part1.FUSED_ADAM = False
        plain = part1.make_optimizer(model, 1e-3)
        model.forward_all(torch.randint(13, (2, 4))).sum().backward()
        plain.step()
        part1.FUSED_ADAM = True
        resumed = part1.make_optimizer(model, 1e-3)
        part1.load_optimizer_state(resumed, plain.state_dict())
    finally:
        part1.FUSED_ADAM = saved_fused
        torch.set_default_dtype(saved_dtype)
    assert all(group["fused"] is True for group in resumed.param_groups)
    assert len(resumed.state) == len(list(model.parameters())), "the moment estimates were not loaded"
    for parameter, state in resumed.state.items():
        assert state["step"].dtype == torch.float32
        assert state["step"].device == parameter.device
    resumed.step()


def test_fused_adam_matches_plain_adam(part1):
    results = []
    for fused in (True, False):
        saved = part1.FUSED_ADAM
        part1.FUSED_ADAM = fused
        try:
            model = tiny_model(part1, "MyLSTM").float()
            optimizer = part1.make_optimizer(model, 1e-2)
        finally:
            part1.FUSED_ADAM = saved
        assert optimizer.defaults["fused"] is fused
        x = torch.randint(13, (4, 9))
        for _ in range(3):
            optimizer.zero_grad()
            model.forward_all(x).logsumexp(-1).mean().backward()
            optimizer.step()
        results.append([parameter.detach().clone() for parameter in model.parameters()])
    for fused_value, plain_value in zip(*results):
        torch.testing.assert_close(fused_value, plain_value, rtol=1e-5, atol=1e-6)


FAULTS_SCRIPT = """
import resource, sys, torch
from tools.nbdefs import load_definitions
part1 = load_definitions("part1_lstm.ipynb", env={"PROFILE": "smoke", "KEEP_FREED_MEMORY": sys.argv[1]})
for _ in range(3):                                        # 64 MiB tensors, allocated, touched and freed
    torch.ones(2**24).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(2**24).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is Linux only")
def test_keep_freed_memory_stops_repeated_page_faults(repo_root):
    """With KEEP_FREED_MEMORY freed large tensors mostly reuse mapped pages; without it each one faults again."""
    faults = {}
    for setting in ("1", "0"):
        completed = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, setting], cwd=repo_root,
                                   capture_output=True, text=True, check=True)
        faults[setting] = int(completed.stdout.split()[-1])
    tensor_pages = 2**26 // 4096                              # one 64 MiB tensor in 4 KiB pages
    assert faults["0"] > 9.5 * tensor_pages, faults           # the default: all ten fault every page again
    # Kept memory: most of the ten reuse pages already mapped. Where small allocations land between
    # the freed blocks the heap still grows now and then; two of ten faulting in was the most seen.
    assert faults["1"] < 5 * tensor_pages, faults


# ---------------------------------------------------------------- attention and the training path


def test_attention_weights_are_a_distribution(part1):
    model = tiny_model(part1, "MyLSTM_att").eval()
    x = torch.randint(13, (5, 8))                  # batch size differs from window length
    logits, weights = model(x, return_attention=True)
    assert logits.shape == (5, 13)
    assert weights.shape == (5, 7)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5, dtype=torch.double), rtol=0, atol=1e-12)


def test_attention_context_is_weighted_sum(part1):
    model = tiny_model(part1, "MyLSTM_att").eval()
    x = torch.randint(13, (3, 6))
    logits, weights = model(x, return_attention=True)
    hs = model.hidden_states(x)
    scores = torch.einsum("bh,bjh->bj", hs[:, -1], hs[:, :-1])
    expected_weights = torch.softmax(scores, dim=1)
    context = (expected_weights.unsqueeze(2) * hs[:, :-1]).sum(dim=1)
    expected_logits = model.out(torch.cat([hs[:, -1], context], dim=1))
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)


def test_attention_sequences_independent_in_batch(part1):
    model = tiny_model(part1, "MyLSTM_att").eval()
    x = torch.randint(13, (4, 7))
    changed = x.clone()
    changed[1:] = torch.randint(13, (3, 7))
    torch.testing.assert_close(model(x)[0], model(changed)[0], rtol=0, atol=0)
    torch.testing.assert_close(model.forward_all(x)[0], model.forward_all(changed)[0], rtol=0, atol=0)


def test_attention_window_of_one_word(part1):
    model = tiny_model(part1, "MyLSTM_att").eval()
    logits, weights = model(torch.tensor([[3], [4]]), return_attention=True)
    assert weights.shape == (2, 0)
    assert torch.isfinite(logits).all()
    hs = model.hidden_states(torch.tensor([[3], [4]]))
    expected = model.out(torch.cat([hs[:, -1], torch.zeros_like(hs[:, -1])], dim=1))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att", "TorchLSTM"])
def test_every_prefix_equals_forward(part1, name):
    model = tiny_model(part1, name, dropout=0.5).eval()
    x = torch.randint(13, (3, 10))
    all_logits = model.forward_all(x)
    assert all_logits.shape == (3, 10, 13)
    for t in range(10):
        torch.testing.assert_close(all_logits[:, t], model(x[:, :t + 1]), rtol=0, atol=1e-12,
                                   msg=f"{name}: prefix of length {t + 1}")


def test_training_dropout_masks_hidden_states(part1):
    model = tiny_model(part1, "MyLSTM", dropout=0.5).train()
    x = torch.randint(13, (3, 6))
    hs = model.hidden_states(x)
    torch.manual_seed(4)
    all_logits = model.forward_all(x)
    last_logits = model(x)
    torch.manual_seed(4)
    expected_all = model.out(nn.functional.dropout(hs, 0.5, training=True))
    expected_last = model.out(nn.functional.dropout(hs[:, -1], 0.5, training=True))
    torch.testing.assert_close(all_logits, expected_all, rtol=0, atol=1e-12)
    torch.testing.assert_close(last_logits, expected_last, rtol=0, atol=1e-12)
    assert not torch.allclose(all_logits, model.out(hs)), "the dropout masks must change the logits"


def test_attention_matrix_rows_equal_forward_weights(part1):
    model = tiny_model(part1, "MyLSTM_att").eval()
    x = torch.randint(13, (2, 7))
    _, matrix = model.forward_all(x, return_attention=True)
    assert matrix.shape == (2, 7, 7)
    assert torch.all(matrix.triu() == 0), "a query attends only to earlier positions"
    for t in range(1, 7):
        _, weights = model(x[:, :t + 1], return_attention=True)
        torch.testing.assert_close(matrix[:, t, :t], weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix[:, 1:].sum(dim=2), torch.ones(2, 6, dtype=torch.double), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- evaluation


def test_zero_output_layer_scores_vocabulary_size(part1):
    model = tiny_model(part1, "MyLSTM", vocab_size=50).float()
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()
    ids = torch.randint(50, (1000,))
    result = part1.evaluate(model, ids, window=7, batch_size=16)
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-6)
    assert result["tokens"] == 999


def test_evaluation_windows_cover_each_token_once(part1):
    ids = torch.arange(103)
    targets = torch.cat([t.flatten() for _, t in part1.evaluation_windows(ids, window=10, batch_size=4)])
    assert torch.equal(targets, ids[1:])
    for inputs, batch_targets in part1.evaluation_windows(ids, window=10, batch_size=4):
        assert torch.equal(batch_targets, inputs + 1), "each target is the next id of the stream"


def test_evaluation_windows_any_length(part1):
    ids = torch.arange(30)
    for length in range(2, 30):
        batches = part1.evaluation_windows(ids[:length], window=5, batch_size=2)
        targets = torch.cat([batch_targets.flatten() for _, batch_targets in batches])
        assert torch.equal(targets, ids[1:length]), f"{length} ids"
    for max_tokens in range(1, 29):
        batches = part1.evaluation_windows(ids, window=5, batch_size=2, max_tokens=max_tokens)
        targets = torch.cat([batch_targets.flatten() for _, batch_targets in batches])
        assert torch.equal(targets, ids[1:max_tokens + 1]), f"max_tokens={max_tokens}"


def test_evaluate_scores_max_tokens(part1):
    model = tiny_model(part1, "MyLSTM", vocab_size=20).float()
    ids = torch.randint(20, (60,), generator=torch.Generator().manual_seed(2))
    limited = part1.evaluate(model, ids, window=5, batch_size=2, max_tokens=21)
    assert limited["tokens"] == 21
    assert limited == part1.evaluate(model, ids[:22], window=5, batch_size=2)


def test_perplexity_weights_tokens_not_batches(part1):
    model = tiny_model(part1, "MyLSTM", vocab_size=20).float().eval()
    ids = torch.randint(20, (95,))         # 94 predictions: 9 windows of 10, a last window of 4
    result = part1.evaluate(model, ids, window=10, batch_size=4)
    per_token, batch_means = [], []
    with torch.no_grad():
        for inputs, targets in part1.evaluation_windows(ids, 10, 4):
            losses = nn.functional.cross_entropy(model.forward_all(inputs).flatten(0, 1), targets.flatten(),
                                                 reduction="none")
            per_token.append(losses)
            batch_means.append(losses.mean().item())
    token_mean = torch.cat(per_token).mean().item()
    assert result["tokens"] == 94
    assert result["cross_entropy"] == pytest.approx(token_mean, rel=1e-6)
    assert abs(np.mean(batch_means) - token_mean) > 1e-4, "the test data must tell the two averages apart"


def test_perplexity_exact_below_overflow(part1):
    assert part1.perplexity_of(100.0) == math.exp(100.0)
    assert part1.perplexity_of(700.0) == math.exp(700.0)
    assert part1.perplexity_of(709.5) == math.exp(709.5)
    assert part1.perplexity_of(710.0) == math.inf


def test_evaluate_restores_training_mode(part1):
    model = tiny_model(part1, "MyLSTM_att", vocab_size=20, dropout=0.5).float()
    model.train()
    part1.evaluate(model, torch.randint(20, (60,)), window=8, batch_size=4)
    assert model.training
    model.eval()
    part1.evaluate(model, torch.randint(20, (60,)), window=8, batch_size=4)
    assert not model.training


def test_evaluate_ignores_dropout(part1):
    model = tiny_model(part1, "MyLSTM", vocab_size=20, dropout=0.9).float().train()
    ids = torch.randint(20, (80,))
    first = part1.evaluate(model, ids, window=8, batch_size=4)
    second = part1.evaluate(model, ids, window=8, batch_size=4)
    assert first == second



def test_evaluate_counts_top5_by_rank(part1):
    model = tiny_model(part1, "MyLSTM_att", vocab_size=20).float().eval()
    ids = torch.randint(20, (95,), generator=torch.Generator().manual_seed(3))
    result = part1.evaluate(model, ids, window=10, batch_size=4)
    ranks = []
    with torch.no_grad():
        for inputs, targets in part1.evaluation_windows(ids, 10, 4):
            logits = model.forward_all(inputs).flatten(0, 1)
            target_logits = logits.gather(1, targets.flatten()[:, None])
            ranks.append((logits > target_logits).sum(dim=1))      # 0 for the most likely word
    ranks = torch.cat(ranks)
    assert result["accuracy"] == (ranks == 0).sum().item() / len(ranks)
    assert result["top5_accuracy"] == (ranks < 5).sum().item() / len(ranks)
    assert result["top5_accuracy"] > result["accuracy"], "the test data must tell the two apart"


def test_generate_samples_in_eval_mode(part1):
    """Dropout is off while generating, so a seed gives one text, and the model's mode comes back."""
    words = [f"w{index}" for index in range(30)]
    vocab = part1.Vocabulary(words)
    model = tiny_model(part1, "MyLSTM", vocab_size=len(vocab), dropout=0.9).float().eval()
    expected = part1.generate(model, vocab, "w1 w2", 20, 5, seed=4)
    model.train()
    for seed in (1, 2):
        torch.manual_seed(seed)                  # in train mode, the dropout masks would differ
        assert part1.generate(model, vocab, "w1 w2", 20, 5, seed=4) == expected
    assert model.training


def test_generate_samples_tempered_distribution(part1):
    vocab = part1.Vocabulary(["a", "b"])                                 # ids 0, 1 and 2 for <unk>
    model = tiny_model(part1, "MyLSTM", vocab_size=len(vocab)).float()
    with torch.no_grad():
        model.out.weight.zero_()                                         # so the logits equal the bias
        model.out.bias.copy_(torch.tensor([0.0, math.log(2.0), -30.0]))
    words = part1.generate(model, vocab, "a", 1000, 4, temperature=0.5, seed=0).split()[1:]
    # softmax([0, ln 2] / 0.5) gives "b" 4/5. Temperature 1 would give 2/3, and multiplying by 0.5 would give 0.59.
    assert words.count("b") / len(words) == pytest.approx(0.8, abs=0.04)
    assert words.count("a") / len(words) == pytest.approx(0.2, abs=0.04)


def test_generate_feeds_last_window(part1):
    words = [f"w{index}" for index in range(30)]
    vocab = part1.Vocabulary(words)
    model = tiny_model(part1, "MyLSTM", vocab_size=len(vocab)).float()
    contexts = []
    model.register_forward_pre_hook(lambda module, args: contexts.append(args[0][0].tolist()))
    text = part1.generate(model, vocab, "w1 w2 w3", 8, 4, seed=1)
    ids = vocab.encode(text.split()).tolist()
    assert len(contexts) == 8
    for step, context in enumerate(contexts):
        assert context == ids[:3 + step][-4:], f"word {step}"


# ---------------------------------------------------------------- data


def test_vocabulary_unknown_words_and_round_trip(part1):
    train_line = "the cat sat on the <unk> mat"
    vocab = part1.Vocabulary(train_line.split() + ["<eos>"])
    assert vocab.itos.count("<unk>") == 1
    assert vocab.decode(vocab.encode(train_line.split())) == train_line.split()
    assert vocab.encode(["zebra"]).tolist() == [vocab.unk_id]
    assert vocab.itos[0] == "the", "most frequent word first"


def test_vocabulary_adds_unknown_token_when_absent(part1):
    vocab = part1.Vocabulary("a b b c".split())
    assert vocab.itos.count("<unk>") == 1
    assert vocab.encode(["never-seen"]).tolist() == [vocab.unk_id]
    assert len(vocab) == 4


def test_read_words_appends_eos(part1, tmp_path):
    path = tmp_path / "ptb.train.txt"
    path.write_text(" a b \n c\n")
    assert part1.read_words(path) == ["a", "b", "<eos>", "c", "<eos>"]


def test_read_words_skips_byte_order_mark(part1, tmp_path):
    path = tmp_path / "ptb.train.txt"
    path.write_bytes(b"\xef\xbb\xbf a b \n c \n")
    assert part1.read_words(path) == ["a", "b", "<eos>", "c", "<eos>"]


@pytest.mark.parametrize("content", [b"", b"\x9c\x80 binary \xff\n"])
def test_read_words_rejects_empty_or_binary_file(part1, tmp_path, content):
    path = tmp_path / "ptb.valid.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        part1.read_words(path)
    assert str(path) in str(error.value)
    assert "downloaded again" in str(error.value)


def test_read_words_rejects_one_token(part1, tmp_path):
    """A file of one empty line reads as one token, an end of line, which predicts nothing."""
    path = tmp_path / "ptb.valid.txt"
    path.write_bytes(b"\n")
    with pytest.raises(ValueError) as error:
        part1.read_words(path)
    assert str(error.value).startswith(f"{path} has 1 tokens, too few to predict any word; ")


def test_window_batcher_shifts_and_partial_batch(part1):
    ids = torch.arange(200)
    batcher = part1.WindowBatcher(ids, window=7, batch_size=6, seed=3)
    assert batcher.windows_per_epoch == (200 - 1 - 7) // 7
    sizes = [batcher.batch(step)[0].shape[0] for step in range(batcher.batches_per_epoch)]
    assert sizes[:-1] == [6] * (len(sizes) - 1)
    assert sizes[-1] == batcher.windows_per_epoch - 6 * (len(sizes) - 1)
    assert sizes[-1] < 6, "27 windows in batches of 6 leave a partial last batch"
    inputs, targets = batcher.batch(5)
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(batcher.batch(5)[0], inputs), "a step's batch is deterministic"



def test_window_offset_changes_per_pass(part1):
    """Each pass shifts every window by one offset below the window size, drawn anew per pass."""
    batcher = part1.WindowBatcher(torch.arange(200), window=7, batch_size=6, seed=3)
    offsets = []
    for epoch in range(12):
        steps = range(epoch * batcher.batches_per_epoch, (epoch + 1) * batcher.batches_per_epoch)
        starts = torch.cat([batcher.batch(step)[0][:, 0] for step in steps])
        assert len(set((starts % 7).tolist())) == 1, epoch
        assert len(starts) == batcher.windows_per_epoch
        offsets.append(int(starts[0]) % 7)
    assert len(set(offsets)) > 1


@pytest.mark.parametrize("window, batch_size", [(7, 6), (5, 4), (3, 60)])
def test_batcher_counts_partial_batch_tokens(part1, window, batch_size):
    batcher = part1.WindowBatcher(torch.arange(200), window=window, batch_size=batch_size, seed=0)
    counted = 0
    for step in range(3 * batcher.batches_per_epoch + 2):
        assert batcher.tokens_in(step) == counted, step
        counted += batcher.batch(step)[1].numel()


def test_missing_files_offline_error_names_files(part1, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "ptb", download=False)
    message = str(error.value)
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", "DATA_DIR"):
        assert name in message


def test_ptb_download_verified_and_kept(part1, real_data, tmp_path, monkeypatch, serve_folder):
    """The download path end to end, from a local HTTP server that contains the real files."""
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb") + "/{name}")
    paths, checksums_match = part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert checksums_match == {name: True for name in part1.PTB_SHA256}
    for split, path in paths.items():
        assert path == tmp_path / "ptb" / f"ptb.{split}.txt"
        assert path.read_bytes() == (real_data / "ptb" / path.name).read_bytes()
    assert not list((tmp_path / "ptb").glob("*.part"))


def test_ptb_download_wrong_checksum_deleted(part1, tmp_path, monkeypatch, serve_folder):
    write_tiny_corpus(tmp_path / "server")
    url = serve_folder(tmp_path / "server") + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    with pytest.raises(ValueError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    name = next(iter(part1.PTB_SHA256))
    assert str(error.value).startswith(f"{url.format(name=name)} does not match its SHA-256 "
                                       f"{part1.PTB_SHA256[name]}; the download was deleted.")
    assert not (tmp_path / "data").exists(), "the folders the download created are removed"


def test_ptb_download_failure_names_url(part1, tmp_path, monkeypatch, serve_folder):
    url = serve_folder(tmp_path) + "/nowhere/{name}"                  # the server returns 404
    monkeypatch.setattr(part1, "PTB_URL", url)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    message = str(error.value)
    assert message.startswith(f"could not download {url.format(name='ptb.train.txt')} (HTTP Error 404: ")
    files = "ptb.train.txt, ptb.valid.txt, ptb.test.txt"
    assert f"Without internet access, copy {files} into {tmp_path / 'data' / 'ptb'}" in message
    assert not (tmp_path / "data").exists(), "the folders the download created are removed"


def test_failed_download_keeps_existing_folder(part1, tmp_path, monkeypatch, serve_folder):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "notes.txt").write_text("mine")
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(tmp_path) + "/nowhere/{name}")
    with pytest.raises(FileNotFoundError):
        part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert sorted(path.name for path in (tmp_path / "ptb").iterdir()) == ["notes.txt"]


def test_stalled_download_times_out(part1, tmp_path, monkeypatch, serve_folder):
    write_tiny_corpus(tmp_path / "server")
    url = serve_folder(tmp_path / "server", stall_after=100) + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    monkeypatch.setattr(part1, "DOWNLOAD_TIMEOUT_S", 1)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert str(error.value).startswith(f"could not download {url.format(name='ptb.train.txt')} (nothing arrived for "
                                       f"DOWNLOAD_TIMEOUT_S = 1 s).")
    assert not (tmp_path / "data").exists()


def test_trickled_download_times_out(part1, tmp_path, monkeypatch, serve_folder):
    """A server that sends a byte every 50 ms never lets the socket's timeout expire, but falls below the rate."""
    write_tiny_corpus(tmp_path / "server")
    url = serve_folder(tmp_path / "server", trickle_every=0.05) + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    monkeypatch.setattr(part1, "DOWNLOAD_TIMEOUT_S", 1)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert re.match(rf"could not download {re.escape(url.format(name='ptb.train.txt'))} \(\d+ bytes arrived in the "
                    rf"last 1 s, fewer than DOWNLOAD_MIN_RATE \(10,000 bytes per second\) allows\)\. ",
                    str(error.value))
    assert not (tmp_path / "data").exists()


def test_data_folder_link_to_nowhere_named(part1, tmp_path):
    (tmp_path / "data").symlink_to(tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert str(error.value) == (f"cannot create {tmp_path / 'data' / 'ptb'} for the download ({tmp_path / 'data'} "
                                f"is a link to a missing folder). Point DATA_DIR at a folder that can be written, or "
                                f"put ptb.train.txt, ptb.valid.txt, ptb.test.txt into {tmp_path / 'data' / 'ptb'}")
    assert not (tmp_path / "moved").exists()


def test_stale_part_link_not_followed(part1, real_data, tmp_path, monkeypatch, serve_folder):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt.part").symlink_to(tmp_path / "notes.txt")
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb") + "/{name}")
    paths, _ = part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert paths["train"].read_bytes() == (real_data / "ptb" / "ptb.train.txt").read_bytes()


def test_stale_part_folder_named(part1, tmp_path, monkeypatch, serve_folder):
    partial = tmp_path / "ptb" / "ptb.train.txt.part"
    partial.mkdir(parents=True)
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(tmp_path) + "/nowhere/{name}")
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert str(error.value) == (f"cannot write {partial} for the download (Is a directory). Remove it, or point "
                                f"DATA_DIR at a folder that can be written")


def test_download_keeps_folder_behind_dots(part1, tmp_path, monkeypatch, serve_folder):
    """In "new/../existing" the folder "existing" was there before and must survive the cleanup."""
    (tmp_path / "existing").mkdir()
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(tmp_path) + "/nowhere/{name}")
    with pytest.raises(FileNotFoundError):
        part1.ensure_ptb(tmp_path / "new" / ".." / "existing", download=True)
    assert (tmp_path / "existing").is_dir()


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_ptb_name_not_a_file(part1, tmp_path, kind):
    """A folder or a broken link with a file's name is named as such, not reported missing or downloaded over."""
    folder = tmp_path / "ptb"
    write_tiny_corpus(folder)
    path = folder / "ptb.valid.txt"
    path.unlink()
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(folder, download=True)
    assert str(error.value).startswith(f"{path}: not a file (a folder or a broken link). Replace it with the")


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"])
def test_real_ptb_other_line_endings_match(part1, real_data, tmp_path, ending):
    """A copy with Windows or classic Mac line endings has the same tokens, so it counts as the reference."""
    folder = tmp_path / "ptb"
    folder.mkdir()
    for name in part1.PTB_SHA256:
        (folder / name).write_bytes((real_data / "ptb" / name).read_bytes().replace(b"\n", ending))
    _, checksums_match = part1.ensure_ptb(folder, download=False)
    assert checksums_match == dict.fromkeys(part1.PTB_SHA256, True)
    assert part1.read_words(folder / "ptb.valid.txt") == part1.read_words(real_data / "ptb" / "ptb.valid.txt")


def test_real_ptb_token_counts(part1, real_data):
    paths, checksums_match = part1.ensure_ptb(real_data / "ptb", download=False)
    assert all(checksums_match.values())
    counts = {split: len(part1.read_words(path)) for split, path in paths.items()}
    assert counts == {"train": 929_589, "valid": 73_760, "test": 82_430}
    vocab = part1.Vocabulary(part1.read_words(paths["train"]))
    assert len(vocab) == 10_000
    assert vocab.encode(part1.read_words(paths["test"])).eq(vocab.unk_id).sum() > 0


# ---------------------------------------------------------------- settings and training


def test_environment_overrides_settings(repo_root, tmp_path):
    module = load_definitions(repo_root / NOTEBOOK, module_name="part1_env",
                              env={"PROFILE": "smoke", "HIDDEN_SIZE": "48", "FORCE_RETRAIN": "yes",
                                   "VALID_TOKENS_DURING_TRAINING": "123", "REPORT_DIR": str(tmp_path)})
    assert module.HIDDEN_SIZE == 48
    assert module.FORCE_RETRAIN is True
    assert module.VALID_TOKENS_DURING_TRAINING == 123
    everything = load_definitions(repo_root / NOTEBOOK, module_name="part1_env_all",
                                  env={"PROFILE": "smoke", "VALID_TOKENS_DURING_TRAINING": "0",
                                       "REPORT_DIR": str(tmp_path)})
    assert everything.VALID_TOKENS_DURING_TRAINING == 0, "0 selects the whole validation split"
    assert module.EMBED_SIZE == module.PROFILE_SETTINGS["smoke"]["EMBED_SIZE"]


def load_with_setting(monkeypatch, repo_root, tmp_path, name, value):
    """Load the definitions in the smoke profile with the variable `name` set to `value`, or unset for None."""
    monkeypatch.delenv(name, raising=False)
    env = {"PROFILE": "smoke", "REPORT_DIR": str(tmp_path)}
    if value is not None:
        env[name] = value
    return load_definitions(repo_root / NOTEBOOK, module_name=f"part1_{name.lower()}", env=env)


@pytest.mark.parametrize("capability, env_value, expected", [
    ("AVX512", None, True),     # the default, "auto": oneDNN where PyTorch reports AVX-512
    ("AVX2", None, False),
    ("DEFAULT", "auto", False),
    ("AVX2", "1", True),        # an explicit value wins over the CPU
    ("AVX512", "no", False),
])
def test_onednn_matmul_auto_follows_cpu(repo_root, tmp_path, monkeypatch, capability, env_value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    module = load_with_setting(monkeypatch, repo_root, tmp_path, "ONEDNN_MATMUL", env_value)
    assert module.ONEDNN_MATMUL is expected
    assert module.SETTINGS["ONEDNN_MATMUL"] is expected
    assert module.describe_hardware()["cpu_capability"] == capability


@pytest.mark.parametrize("bfloat16, amx, env_value, expected", [
    (True, False, None, True),     # the default, "auto": bfloat16 where the CPU has the instructions
    (False, True, None, True),
    (False, False, None, False),
    (False, False, "yes", True),   # an explicit value wins over the CPU
    (True, False, "0", False),
])
def test_mixed_precision_auto_follows_cpu(repo_root, tmp_path, monkeypatch, bfloat16, amx, env_value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    module = load_with_setting(monkeypatch, repo_root, tmp_path, "MIXED_PRECISION", env_value)
    assert module.MIXED_PRECISION is expected
    assert module.SETTINGS["MIXED_PRECISION"] is expected
    assert module.describe_hardware()["cpu_bfloat16"] is (bfloat16 or amx)


def test_onednn_matmul_auto_off_on_gpu(part1, monkeypatch):
    """oneDNN never runs CUDA tensors, so "auto" records it as off in a GPU run whatever the CPU has."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert part1.onednn_matmul_helps()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not part1.onednn_matmul_helps()


def test_gpu_run_turns_off_cudnn_tf32(repo_root, tmp_path, monkeypatch):
    """On a GPU torch.nn.LSTM (cuDNN) computes in float32 like MyLSTM, not in TF32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)    # PyTorch's default, restored afterwards
    module = load_with_setting(monkeypatch, repo_root, tmp_path, "MIXED_PRECISION", None)
    assert module.DEVICE.type == "cuda"
    assert torch.backends.cudnn.allow_tf32 is False


def test_mixed_precision_auto_off_on_gpu(part1, monkeypatch):
    """Not measured on a GPU, so "auto" keeps float32 there even where the CPU has bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert part1.mixed_precision_helps()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not part1.mixed_precision_helps()


@pytest.mark.parametrize("name, value", [
    ("HIDDEN_SIZE", "abc"), ("FORCE_RETRAIN", "maybe"), ("PROFILE", "huge"), ("HIDDEN_SIZE", "0"),
    ("WINDOW", "-3"), ("BATCH_SIZE", "0"), ("EVAL_EVERY", "0"), ("TRAIN_STEPS", "-5"), ("DROPOUT", "1.5"),
    ("GRAD_CLIP", "-1"), ("LEARNING_RATE", "nan"), ("LEARNING_RATE", "1e-320"), ("SEED", "-1"), ("NUM_THREADS", "-2"),
    ("NUM_THREADS", "3000000000"),
    ("VALID_TOKENS_DURING_TRAINING", "-5"), ("ONEDNN_MATMUL", "none"), ("ONEDNN_MATMUL", "sometimes"),
    ("FUSED_ADAM", "none"), ("FUSED_ADAM", "auto"), ("MIXED_PRECISION", "none"), ("MIXED_PRECISION", "half"),
    ("KEEP_FREED_MEMORY", "2")])
def test_invalid_setting_names_value(repo_root, tmp_path, name, value):
    env = {"PROFILE": "smoke", "REPORT_DIR": str(tmp_path), name: value}
    with pytest.raises(ValueError) as error:
        load_definitions(repo_root / NOTEBOOK, module_name="part1_bad", env=env)
    assert name in str(error.value)
    assert value in str(error.value)


@pytest.mark.parametrize("word, expected", [
    ("1", True), ("true", True), ("Yes", True), ("ON", True), ("0", False), ("false", False), ("No", False),
    ("off", False)])
def test_boolean_words_parse_both_ways(part1, word, expected):
    """Each word that the error message offers for a boolean setting parses to its truth value, in any case."""
    assert part1.parse_setting("FORCE_RETRAIN", word, False) is expected


@pytest.mark.parametrize("name, value", [
    ("DROPOUT", 0.0), ("SEED", 2**32 - 1), ("NUM_THREADS", 1024), ("NUM_THREADS", 0),
    ("VALID_TOKENS_DURING_TRAINING", 0), ("LEARNING_RATE", 1e-8)])
def test_setting_range_ends_accepted(part1, name, value):
    """The last valid value at each end of a setting's range passes validate_settings."""
    assert part1.validate_settings({**part1.SETTINGS, name: value}) is None


@pytest.mark.parametrize("name, value", [
    ("DROPOUT", 1.0), ("SEED", 2**32), ("NUM_THREADS", 1025), ("GRAD_CLIP", math.inf), ("LEARNING_RATE", math.inf)])
def test_setting_past_range_rejected(part1, name, value):
    """A value just past a setting's range, or an infinite one, raises a ValueError that names the setting."""
    with pytest.raises(ValueError) as error:
        part1.validate_settings({**part1.SETTINGS, name: value})
    assert f"{name}={value!r} is invalid" in str(error.value)


@pytest.mark.parametrize("cuda, expected", [(False, "cpu"), (True, "full")])
def test_auto_profile_follows_cuda(part1, monkeypatch, cuda, expected):
    """PROFILE "auto", in any case, resolves to "full" where CUDA is available and to "cpu" where it is not."""
    monkeypatch.delenv("PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    namespace = {**part1.settings_as_written, "SETTING_NAMES": part1.SETTING_NAMES, "PROFILE": " Auto "}
    settings = part1.resolve_settings(namespace)
    assert settings["PROFILE"] == expected
    assert settings["HIDDEN_SIZE"] == part1.PROFILE_SETTINGS[expected]["HIDDEN_SIZE"]


def test_none_text_keeps_folder_names(repo_root, tmp_path, monkeypatch):
    """"none" means the profile's value only for settings that default to None."""
    module = load_with_setting(monkeypatch, repo_root, tmp_path, "CHECKPOINT_DIR", "none")
    assert module.CHECKPOINT_DIR == "none"
    module = load_with_setting(monkeypatch, repo_root, tmp_path, "HIDDEN_SIZE", "None")
    assert module.HIDDEN_SIZE == module.PROFILE_SETTINGS["smoke"]["HIDDEN_SIZE"]


def test_home_folder_in_settings_expanded(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    module = load_definitions(repo_root / NOTEBOOK, module_name="part1_home", env={
        "PROFILE": "smoke", "DATA_DIR": "~/data", "REPORT_DIR": "~/report", "CHECKPOINT_DIR": "~/checkpoints"})
    assert module.DATA_PATH == tmp_path / "data"
    assert module.RESULTS_PATH == tmp_path / "report" / "results" / "part1_smoke.json"
    assert module.CHECKPOINT_PATH == tmp_path / "checkpoints" / "part1_smoke"


@pytest.mark.parametrize("name", ["DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR"])
def test_unknown_home_folder_setting_raises(repo_root, tmp_path, monkeypatch, name):
    with pytest.raises(ValueError, match=f"{name}='~no-such-user-of-this-test/folder' is invalid: it must be a "
                                         f"folder path whose leading ~ or ~user has a home folder"):
        load_with_setting(monkeypatch, repo_root, tmp_path, name, "~no-such-user-of-this-test/folder")


def test_single_window_split_advice(part1, monkeypatch):
    """A split of one window gets the advice for a batch that cannot shrink, whatever EVAL_BATCH_SIZE is."""
    model = part1.MyLSTM(17, 4, 6, 0.0)
    monkeypatch.setattr(model, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        part1.evaluate(model, torch.randint(17, (8,)), 5, 64)
    message = str(error.value)
    assert "batches of 1 window of up to 5 tokens (EVAL_BATCH_SIZE=64)." in message
    assert "A batch of one window cannot be split" in message


def test_memory_error_on_load_is_not_corruption(part1, tmp_path, monkeypatch):
    """A checkpoint that the machine lacks memory to load is not called unreadable, which would invite deleting it."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    monkeypatch.setattr(part1.torch, "load", allocation_failure)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        part1.load_checkpoint(path, train_settings(part1))


def python_memory_error(*args, **kwargs):
    """Stand in for torch.load where Python's own allocator fails, as the unpickler's can."""
    raise MemoryError


def test_out_of_memory_in_save_passes(part1, tmp_path, monkeypatch):
    """PyTorch's out-of-memory error while a checkpoint is saved passes as itself, not as a failed write."""
    path = tmp_path / "model.pt"
    part1.save_checkpoint(path, {"step": torch.tensor(1)})
    monkeypatch.setattr(part1.torch, "save", allocation_failure)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory"):
        part1.save_checkpoint(path, {"step": torch.tensor(2)})
    assert torch.load(path, weights_only=True)["step"] == 1


def test_python_memory_error_on_load_passes(part1, tmp_path, monkeypatch):
    """Python's MemoryError while a checkpoint loads passes unchanged, not as a ValueError that calls it unreadable."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    monkeypatch.setattr(part1.torch, "load", python_memory_error)
    with pytest.raises(MemoryError):
        part1.load_checkpoint(path, train_settings(part1))


@pytest.mark.parametrize("name, value", [("PROFILE", None), ("DATA_DIR", 5), ("REPORT_DIR", ""),
                                         ("CHECKPOINT_DIR", None), ("LEARNING_RATE", True), ("GRAD_CLIP", True),
                                         ("DROPOUT", False)])
def test_invalid_cell_value_raises(part1, monkeypatch, name, value):
    for setting in part1.SETTING_NAMES:
        monkeypatch.delenv(setting, raising=False)
    namespace = {"SETTING_NAMES": part1.SETTING_NAMES, "PROFILE_SETTINGS": part1.PROFILE_SETTINGS,
                 **part1.SETTINGS, name: value}
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid"):
        part1.resolve_settings(namespace)


def test_path_settings_become_text(part1, monkeypatch, tmp_path):
    """Path("...") in the settings cell: the results file (JSON) and torch.load(weights_only=True) take only text."""
    for setting in part1.SETTING_NAMES:
        monkeypatch.delenv(setting, raising=False)
    folders = {name: tmp_path / name.lower() for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    namespace = {"SETTING_NAMES": part1.SETTING_NAMES, "PROFILE_SETTINGS": part1.PROFILE_SETTINGS,
                 **part1.SETTINGS, **folders}
    settings = part1.resolve_settings(namespace)
    assert {name: settings[name] for name in folders} == {name: str(path) for name, path in folders.items()}
    checkpoint = tmp_path / "settings.pt"
    torch.save({"settings": settings}, checkpoint)
    assert torch.load(checkpoint, weights_only=True)["settings"] == json.loads(json.dumps(settings))


def train_settings(part1, **changes):
    settings = dict(part1.SETTINGS)
    settings.update(TRAIN_STEPS=6, EVAL_EVERY=2, VALID_TOKENS_DURING_TRAINING=None, WINDOW=5, BATCH_SIZE=3,
                    EVAL_BATCH_SIZE=4, EMBED_SIZE=4, HIDDEN_SIZE=6, FORCE_RETRAIN=False)
    settings.update(changes)
    return settings


def run_training(part1, checkpoint, settings, stop_after=None, name="MyLSTM_att", seed=0, log=lambda *args: None):
    torch.manual_seed(seed)
    model = part1.MODEL_CLASSES[name](17, settings["EMBED_SIZE"], settings["HIDDEN_SIZE"], 0.3)
    generator = torch.Generator().manual_seed(5)
    train_ids, valid_ids = torch.randint(17, (300,), generator=generator), torch.randint(17, (40,), generator=generator)
    batcher = part1.WindowBatcher(train_ids, settings["WINDOW"], settings["BATCH_SIZE"], settings["SEED"])
    history, _ = part1.train_model(name, model, batcher, valid_ids, settings, checkpoint, stop_after=stop_after,
                                   log=log)
    return model, history


def test_training_stops_on_changed_setting(part1, tmp_path, monkeypatch):
    """HIDDEN_SIZE set again after the settings were read: training stops before it writes a checkpoint."""
    monkeypatch.setattr(part1, "HIDDEN_SIZE", part1.SETTINGS["HIDDEN_SIZE"] + 1)
    checkpoint = tmp_path / "model.pt"
    read = part1.SETTINGS["HIDDEN_SIZE"]
    expected = (f"stopped before training MyLSTM_att, because HIDDEN_SIZE = {read + 1} (the run started with {read}) "
                f"changed after the run started")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        run_training(part1, checkpoint, train_settings(part1))
    assert not checkpoint.exists()


class RecordingAdam(torch.optim.Adam):
    """Adam that records the learning rate and the gradients' total norm of each step."""

    def __init__(self, parameters, lr):
        super().__init__(parameters, lr=lr)
        self.steps = []

    def step(self, closure=None):
        gradients = [parameter.grad for group in self.param_groups for parameter in group["params"]
                     if parameter.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad) for grad in gradients]))
        self.steps.append({"lr": self.param_groups[0]["lr"], "norm": norm.item()})
        return super().step(closure)


def recorded_training(part1, monkeypatch, checkpoint, settings):
    """Run run_training with a RecordingAdam and return its record of each step."""
    optimizers = []

    def make_recording_optimizer(model, learning_rate):
        optimizers.append(RecordingAdam(model.parameters(), learning_rate))
        return optimizers[-1]

    monkeypatch.setattr(part1, "make_optimizer", make_recording_optimizer)
    run_training(part1, checkpoint, settings)
    return optimizers[-1].steps


def test_training_clips_gradient_norm(part1, tmp_path, monkeypatch):
    unclipped = recorded_training(part1, monkeypatch, tmp_path / "unclipped.pt", train_settings(part1, GRAD_CLIP=1e9))
    clipped = recorded_training(part1, monkeypatch, tmp_path / "clipped.pt", train_settings(part1, GRAD_CLIP=0.01))
    assert min(step["norm"] for step in unclipped) > 0.01, "the gradients must need clipping"
    assert len(clipped) == 6
    for step in clipped:
        assert step["norm"] <= 0.01 * (1 + 1e-5)


def test_learning_rate_follows_cosine_decay(part1, tmp_path, monkeypatch):
    settings = train_settings(part1, LEARNING_RATE=0.004)
    steps = recorded_training(part1, monkeypatch, tmp_path / "decay.pt", settings)
    assert [step["lr"] for step in steps] == [part1.learning_rate_at(index, 6, 0.004) for index in range(6)]
    assert part1.learning_rate_at(0, 101, 2.0) == 2.0
    assert part1.learning_rate_at(50, 101, 2.0) == pytest.approx(1.05)
    assert part1.learning_rate_at(100, 101, 2.0) == pytest.approx(0.1)


def test_recall_follows_fused_setting(part1, monkeypatch, set_setting):
    seen = []
    plain_run = part1.run_cell_over_window

    def recording_run(cell, inputs, fused):
        seen.append(fused)
        return plain_run(cell, inputs, fused)

    monkeypatch.setattr(part1, "run_cell_over_window", recording_run)
    for setting in (False, True):
        set_setting(part1, "FUSED_RECURRENCE", setting)
        seen.clear()
        part1.train_recall(part1.MODEL_CLASSES["MyLSTM_att"], 2, 0, batch_size=4, embed_size=4, hidden_size=6)
        assert set(seen) == {setting}


def test_resumed_training_equals_uninterrupted(part1, tmp_path):
    settings = train_settings(part1)
    straight, straight_history = run_training(part1, tmp_path / "straight.pt", settings)
    run_training(part1, tmp_path / "resumed.pt", settings, stop_after=4)
    resumed, resumed_history = run_training(part1, tmp_path / "resumed.pt", settings, seed=99)
    assert [row["valid_perplexity"] for row in resumed_history] == [row["valid_perplexity"] for row in straight_history]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_last_partial_interval_saved(part1, tmp_path):
    """Where TRAIN_STEPS is no multiple of EVAL_EVERY, the last steps are validated and saved all the same."""
    settings = train_settings(part1, TRAIN_STEPS=5)
    _, history = run_training(part1, tmp_path / "model.pt", settings)
    assert [row["step"] for row in history] == [2, 4, 5]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 5


def test_stop_after_ends_there(part1, tmp_path):
    """stop_after ends training after exactly that many steps, and the checkpoint records the last of them."""
    settings = train_settings(part1, EVAL_EVERY=1)
    _, history = run_training(part1, tmp_path / "model.pt", settings, stop_after=3)
    assert [row["step"] for row in history] == [1, 2, 3]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 3


def test_training_time_adds_up_over_resume(part1, tmp_path):
    """Each history row records the training seconds so far, and a resumed run adds its own to the saved ones."""
    settings = train_settings(part1)
    run_training(part1, tmp_path / "model.pt", settings, stop_after=4)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["train_time_s"]
    _, history = run_training(part1, tmp_path / "model.pt", settings)
    times = [row["train_time_s"] for row in history]
    assert times[0] > 0
    assert times[1] == saved
    assert times[2] > saved


class SteppingClock:
    """The time module, except that perf_counter advances by one second at each reading."""

    def __init__(self):
        self.now = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_training_log_rates_per_interval(part1, tmp_path, monkeypatch):
    """The log's ms/step and tokens/s divide each interval's seconds by that interval's steps and tokens alone."""
    monkeypatch.setattr(part1, "time", SteppingClock())      # each interval of 2 steps then takes 1 s
    settings = train_settings(part1)
    torch.manual_seed(0)
    model = part1.MyLSTM(17, 4, 6, 0.0)
    batcher = part1.WindowBatcher(torch.randint(17, (300,)), 5, 3, 0)
    lines = []
    part1.train_model("MyLSTM", model, batcher, torch.randint(17, (40,)), settings, tmp_path / "m.pt",
                      log=lines.append)
    assert len(lines) == 3
    for line in lines:
        assert line.endswith("|    500 ms/step |       30 tokens/s"), line


class RecordingFunctional:
    """A stand-in for torch.nn.functional whose cross_entropy records the loss and targets of each training call.

    Training calls pass no options, and evaluation passes reduction="sum", so only calls without options are recorded.
    """

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(nn.functional, name)

    def cross_entropy(self, logits, targets, **options):
        loss = nn.functional.cross_entropy(logits, targets, **options)
        if not options:
            self.calls.append({"loss": loss.item(), "targets": targets.clone()})
        return loss


def test_training_loss_weights_every_token(part1, tmp_path, monkeypatch):
    recorder = RecordingFunctional()
    monkeypatch.setattr(part1, "nnf", recorder)
    settings = train_settings(part1, TRAIN_STEPS=21, EVAL_EVERY=7)
    _, history = run_training(part1, tmp_path / "loss.pt", settings)
    # The batcher that run_training builds: 300 ids make 58 windows of 5, so step 20 of 21 has a batch of one window.
    train_ids = torch.randint(17, (300,), generator=torch.Generator().manual_seed(5))
    batcher = part1.WindowBatcher(train_ids, 5, 3, settings["SEED"])
    counts = [call["targets"].numel() for call in recorder.calls]
    assert counts == [batcher.batch(step)[1].numel() for step in range(21)]
    assert counts[19] == 5, "the last interval must hold a partial batch"
    for interval, row in enumerate(history):
        calls = recorder.calls[7 * interval:7 * (interval + 1)]
        token_sum = sum(call["loss"] * call["targets"].numel() for call in calls)
        tokens = sum(call["targets"].numel() for call in calls)
        assert row["train_loss"] == pytest.approx(token_sum / tokens, rel=1e-12), f"interval {interval}"
    last = recorder.calls[14:21]
    step_mean = sum(call["loss"] for call in last) / 7
    assert abs(step_mean - history[2]["train_loss"]) > 1e-4, "the data must tell the two averages apart"


def save_onto_full_disk(real_save):
    """Return a torch.save that starts the file it is given, then meets a real "no space left" on /dev/full."""
    def save(state, target):
        target.write(b"the start of a checkpoint")
        with open("/dev/full", "wb") as full:
            real_save(state, full)

    return save


def opener_onto_full_disk(suffix, real_open_new_file):
    """Return an open_new_file that opens /dev/full, where every write fails, for names ending in `suffix`."""
    def open_new_file(path):
        if path.name.endswith(suffix):
            return open("/dev/full", "wb")
        return real_open_new_file(path)

    return open_new_file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
def test_full_disk_keeps_earlier_results(part1, tmp_path):
    path = tmp_path / "results" / "part1_smoke.json"
    path.parent.mkdir()
    path.write_text('{"earlier": true}')

    def write(file):
        file.write(b'{"later": ')
        file.flush()
        with open("/dev/full", "wb") as full:
            full.write(b"true}")

    with pytest.raises(OSError) as error:
        part1.write_report_file(path, write)
    message = str(error.value)
    assert message.startswith(f"writing {path} failed (No space left on device); ")
    assert f"free in {path.parent}. Free disk space there, or set REPORT_DIR to another folder." in message
    assert message.endswith("The earlier part1_smoke.json is unchanged, and the checkpoints are kept, so a rerun "
                            "reuses the trained models.")
    assert path.read_text() == '{"earlier": true}'
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
def test_full_disk_behind_other_error_named(part1, tmp_path):
    """A writer that raises another error while handling the full disk's OSError, as torch.save and matplotlib's
    PDF writer can, still gets the full-disk advice, and the earlier file stays."""
    path = tmp_path / "results" / "part1_smoke.json"
    path.parent.mkdir()
    path.write_text('{"earlier": true}')

    def write(file):
        try:
            with open("/dev/full", "wb") as full:
                full.write(b"true}")
        except OSError:
            # Chained through __context__ only, as torch.save's RuntimeError is.
            raise RuntimeError("file write failed")  # noqa: B904

    with pytest.raises(OSError) as error:
        part1.write_report_file(path, write)
    message = str(error.value)
    assert message.startswith(f"writing {path} failed (No space left on device); ")
    assert f"free in {path.parent}. Free disk space there, or set REPORT_DIR to another folder." in message
    assert path.read_text() == '{"earlier": true}'


@pytest.mark.parametrize("blocked", ["results.json", "results.json.partial"])
def test_folder_in_way_of_report_file(part1, tmp_path, blocked):
    path = tmp_path / "results.json"
    (tmp_path / blocked).mkdir()
    with pytest.raises(OSError) as error:
        part1.write_report_file(path, lambda file: file.write(b"{}"))
    assert str(error.value).startswith(f"writing {path} failed (Is a directory): {tmp_path / blocked} is in the "
                                       f"way. Remove or rename it, or set REPORT_DIR to another folder. No earlier "
                                       f"results.json exists")
    assert sorted(child.name for child in tmp_path.iterdir()) == [blocked]


def test_interrupt_in_report_write_passes(part1, tmp_path):
    """A Ctrl-C while a writer handles an OSError is an interrupt, not a disk failure."""
    def write(file):
        file.write(b"{")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise KeyboardInterrupt from None

    with pytest.raises(KeyboardInterrupt):
        part1.write_report_file(tmp_path / "results.json", write)
    assert list(tmp_path.iterdir()) == []


def record_syncs(monkeypatch):
    """Make os.fsync record what it syncs before it syncs it, and return the records in the order of the syncs.

    `files` contains the inode and size of each file, and `folders` the inode of each folder and the names in it."""
    synced = SimpleNamespace(files=[], folders=[])
    real_fsync = os.fsync

    def fsync(descriptor):
        status = os.fstat(descriptor)
        if stat.S_ISDIR(status.st_mode):
            synced.folders.append((status.st_ino, set(os.listdir(descriptor))))
        else:
            synced.files.append((status.st_ino, status.st_size))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def names_synced_in(synced, folder):
    """Return every name that `folder` held at one of its syncs in the records of record_syncs."""
    inode = folder.stat().st_ino
    return set().union(*(names for number, names in synced.folders if number == inode))


def identity(path):
    """Return the inode and size of the file `path`, as record_syncs records them."""
    status = path.stat()
    return status.st_ino, status.st_size


def test_report_file_synced_in_full(part1, tmp_path, monkeypatch):
    """The results file is synced to the disk with all its bytes before it takes its name."""
    synced = record_syncs(monkeypatch)
    path = tmp_path / "results.json"
    part1.write_report_file(path, lambda file: file.write(b'{"perplexity": 123.4}'))
    assert identity(path) in synced.files


def test_report_file_name_synced(part1, tmp_path, monkeypatch):
    """The results file's folder is synced once the file has its name, so that the rename outlasts a power cut."""
    synced = record_syncs(monkeypatch)
    part1.write_report_file(tmp_path / "results.json", lambda file: file.write(b"{}"))
    assert "results.json" in names_synced_in(synced, tmp_path)


def test_checkpoint_synced_in_full(part1, tmp_path, monkeypatch):
    """A checkpoint is synced to the disk with all its bytes before it takes its name."""
    synced = record_syncs(monkeypatch)
    path = tmp_path / "m.pt"
    part1.save_checkpoint(path, {"weights": torch.arange(1000.0)})
    assert identity(path) in synced.files


def test_checkpoint_name_synced(part1, tmp_path, monkeypatch):
    """The checkpoint's folder is synced once the checkpoint has its name."""
    synced = record_syncs(monkeypatch)
    part1.save_checkpoint(tmp_path / "m.pt", {"weights": torch.arange(10.0)})
    assert "m.pt" in names_synced_in(synced, tmp_path)


def test_ptb_download_synced_in_full(part1, real_data, tmp_path, monkeypatch, serve_folder):
    """Each downloaded Penn Treebank file is synced to the disk with all its bytes before it takes its name."""
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb") + "/{name}")
    synced = record_syncs(monkeypatch)
    paths, _ = part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert sorted(synced.files) == sorted(identity(path) for path in paths.values())


def test_ptb_download_names_synced(part1, real_data, tmp_path, monkeypatch, serve_folder):
    """The Penn Treebank folder is synced once each downloaded file has its name."""
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb") + "/{name}")
    synced = record_syncs(monkeypatch)
    part1.ensure_ptb(tmp_path / "ptb", download=True)
    files = list(part1.PTB_SHA256)
    assert [sorted(names) for _, names in synced.folders] == [sorted(files[:count]) for count in (1, 2, 3)]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_file_system_without_sync_passes(part1, tmp_path, monkeypatch, code):
    """Where the file system cannot sync, the results file is still written."""
    def fsync(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "results.json"
    part1.write_report_file(path, lambda file: file.write(b"{}"))
    assert path.read_bytes() == b"{}"


def fail_folder_syncs(monkeypatch, code):
    """Make os.fsync raise OSError `code` for folders, and sync files as before."""
    real_fsync = os.fsync

    def fsync(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_folder_without_sync_quiet(part1, tmp_path, monkeypatch, capsys, code):
    """A file system that cannot sync a folder is passed over, and nothing is printed."""
    fail_folder_syncs(monkeypatch, code)
    part1.write_report_file(tmp_path / "results.json", lambda file: file.write(b"{}"))
    assert capsys.readouterr().out == ""


def test_failed_folder_sync_warns(part1, tmp_path, monkeypatch, capsys):
    """An I/O error in a folder's sync is named in a warning, since the file under its new name is whole."""
    fail_folder_syncs(monkeypatch, errno.EIO)
    part1.write_report_file(tmp_path / "results.json", lambda file: file.write(b"{}"))
    assert capsys.readouterr().out == (f"WARNING: could not sync the folder {tmp_path} after a rename into it "
                                       f"(Input/output error). Its new file is written in full, but after a power "
                                       f"cut the file that had that name before, or none, could be there in its "
                                       f"place. This warning is not repeated for this folder.\n")


def test_folder_sync_warning_once(part1, tmp_path, monkeypatch, capsys):
    """A folder whose sync keeps failing is warned about at its first failure only, and another folder again."""
    fail_folder_syncs(monkeypatch, errno.EIO)
    (tmp_path / "other").mkdir()
    for path in (tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other" / "c.json"):
        part1.write_report_file(path, lambda file: file.write(b"{}"))
    warned = [line.split(" after ")[0] for line in capsys.readouterr().out.splitlines()]
    assert warned == [f"WARNING: could not sync the folder {tmp_path}",
                      f"WARNING: could not sync the folder {tmp_path / 'other'}"]


def test_failed_folder_sync_keeps_file(part1, tmp_path, monkeypatch):
    """The results file stays written when its folder's sync fails."""
    fail_folder_syncs(monkeypatch, errno.EIO)
    path = tmp_path / "results.json"
    part1.write_report_file(path, lambda file: file.write(b'{"later": true}'))
    assert path.read_bytes() == b'{"later": true}'


def test_no_folder_sync_on_windows(part1, tmp_path, monkeypatch):
    """Windows cannot open a folder, so sync_folder does not try."""
    synced = record_syncs(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(os, "name", "nt")
        part1.sync_folder(tmp_path)
    assert synced.folders == []


def test_failed_sync_keeps_earlier_file(part1, tmp_path, monkeypatch):
    """A sync that fails with an I/O error fails the write and leaves the earlier results file as it was."""
    path = tmp_path / "results.json"
    path.write_text('{"earlier": true}')

    def fsync(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"^writing .*results\.json failed \(Input/output error\)"):
        part1.write_report_file(path, lambda file: file.write(b'{"later": true}'))
    assert path.read_text() == '{"earlier": true}'


def test_report_write_waits_for_lock(part1, tmp_path):
    path = tmp_path / "results.json"
    with part1.locked_folder(tmp_path):
        writer, outcome = run_in_thread(part1.write_report_file, path, lambda file: file.write(b"{}"))
        writer.join(timeout=1)
        assert writer.is_alive(), "the write did not wait for the lock"
        assert not path.exists()
    writer.join(timeout=60)
    assert outcome == {"result": None}
    assert path.read_bytes() == b"{}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
@pytest.mark.parametrize("suffix", [".png.partial", ".pdf.partial"])
def test_full_disk_keeps_earlier_figure(part1, tmp_path, monkeypatch, suffix):
    """matplotlib's own writers meet the full disk, and the files of the earlier call stay."""
    monkeypatch.setattr(part1, "FIGURE_DIR", tmp_path)
    fig, ax = part1.plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = part1.save_figure(fig, "learning_curves")
    pending = part1.pending_figures()
    earlier = {path.name: path.read_bytes() for path in pending.iterdir()}
    monkeypatch.setattr(part1, "open_new_file", opener_onto_full_disk(suffix, part1.open_new_file))
    with pytest.raises(OSError) as error:
        part1.save_figure(fig, "learning_curves")
    part1.plt.close(fig)
    failed = png.with_suffix(suffix.removesuffix(".partial"))
    assert str(error.value).startswith(f"writing {failed} failed (No space left on device); ")
    assert sorted(earlier) == ["part1_smoke_learning_curves.pdf", "part1_smoke_learning_curves.png"]
    assert {path.name: path.read_bytes() for path in pending.iterdir()} == earlier


def test_figures_wait_for_results_file(part1, tmp_path, monkeypatch):
    """A run stopped before its results file leaves the last finished run's figures in FIGURE_DIR."""
    monkeypatch.setattr(part1, "FIGURE_DIR", tmp_path)
    (tmp_path / "part1_smoke_learning_curves.png").write_bytes(b"the last finished run's")
    fig, ax = part1.plt.subplots()
    ax.plot([0, 1], [1, 0])
    pngs = [part1.save_figure(fig, name) for name in part1.FIGURE_NAMES]
    part1.plt.close(fig)
    assert pngs[0] == tmp_path / f".pending_part1_smoke_{part1.pending_token}" / "part1_smoke_learning_curves.png"
    assert (tmp_path / "part1_smoke_learning_curves.png").read_bytes() == b"the last finished run's"
    assert part1.publish_figures() == [tmp_path / f"part1_smoke_{name}{suffix}" for name in part1.FIGURE_NAMES
                                       for suffix in (".pdf", ".png")]
    assert (tmp_path / "part1_smoke_learning_curves.png").read_bytes().startswith(b"\x89PNG")
    assert len(list(tmp_path.iterdir())) == 2 * len(part1.FIGURE_NAMES), "the pending folder is gone"


def publish_recording_syncs(notebook, folder, monkeypatch):
    """Save every figure of `notebook` with FIGURE_DIR at `folder`, then publish them while record_syncs records.

    Returns the published paths and the names that `folder` held at its syncs."""
    monkeypatch.setattr(notebook, "FIGURE_DIR", folder)
    fig, ax = notebook.plt.subplots()
    ax.plot([0, 1], [1, 0])
    for name in notebook.FIGURE_NAMES:
        notebook.save_figure(fig, name)
    notebook.plt.close(fig)
    synced = record_syncs(monkeypatch)
    published = notebook.publish_figures()
    return published, names_synced_in(synced, folder)


def test_published_figure_names_synced(part1, tmp_path, monkeypatch):
    """FIGURE_DIR is synced once the published figures have their names there."""
    published, synced_names = publish_recording_syncs(part1, tmp_path, monkeypatch)
    assert {path.name for path in published} <= synced_names


def test_interrupted_runs_figures_discarded(part1, tmp_path, monkeypatch):
    monkeypatch.setattr(part1, "FIGURE_DIR", tmp_path)
    pending = tmp_path / f".pending_part1_smoke_{part1.pending_token}"
    pending.mkdir()
    (pending / "part1_smoke_learning_curves.png").write_bytes(b"from a run stopped midway")
    (tmp_path / "part1_smoke_learning_curves.png").write_bytes(b"the last finished run's")
    part1.discard_pending_figures()
    assert not pending.exists()
    assert (tmp_path / "part1_smoke_learning_curves.png").read_bytes() == b"the last finished run's"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
def test_full_disk_keeps_last_checkpoint(part1, tmp_path, monkeypatch):
    """A checkpoint write that fails midway is named and cleaned up, and a rerun resumes as if nothing happened."""
    settings = train_settings(part1)
    straight, straight_history = run_training(part1, tmp_path / "straight.pt", settings)
    checkpoint = tmp_path / "full.pt"
    run_training(part1, checkpoint, settings, stop_after=2)
    saved = checkpoint.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(part1.torch, "save", save_onto_full_disk(torch.save))
        with pytest.raises(OSError) as error:
            run_training(part1, checkpoint, settings)
    message = str(error.value)
    assert message.startswith(f"writing checkpoint {checkpoint} failed (OSError: [Errno 28] No space left on device)")
    assert re.search(r"\. Its tensors take [\d,]+ bytes; [\d,.]+ MiB are free in ", message)
    assert f"free in {tmp_path}. Free disk space there, or set CHECKPOINT_DIR to another folder." in message
    assert message.endswith(f"{checkpoint} still holds the previous checkpoint, from which a rerun continues.")
    assert not checkpoint.with_suffix(".tmp").exists()
    assert checkpoint.read_bytes() == saved
    resumed, resumed_history = run_training(part1, checkpoint, settings, seed=99)
    assert [row["valid_perplexity"] for row in resumed_history] == [row["valid_perplexity"] for row in straight_history]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_stale_temporary_link_not_followed(part1, tmp_path):
    """A link left at the temporary name is replaced, so the file it points to is never overwritten."""
    (tmp_path / "notes.txt").write_text("mine")
    path = tmp_path / "m.pt"
    path.with_suffix(".tmp").symlink_to(tmp_path / "notes.txt")
    part1.save_checkpoint(path, {"step": torch.tensor(5)})
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not path.is_symlink()
    assert torch.load(path, weights_only=True)["step"] == 5


def test_checkpoint_folder_replaced_by_file(part1, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(OSError) as error:
        part1.save_checkpoint(tmp_path / "run" / "m.pt", {"step": torch.tensor(1)})
    assert str(error.value) == (f"cannot create {tmp_path / 'run'} for checkpoint m.pt (File exists). Move what is in "
                                f"the way, or set CHECKPOINT_DIR to a folder that can be written")


def test_new_file_never_opens_link(part1, tmp_path, monkeypatch):
    """A link that appears between the removal and the open makes the open fail, instead of writing through it."""
    (tmp_path / "notes.txt").write_text("mine")
    path = tmp_path / "m.tmp"
    path.symlink_to(tmp_path / "notes.txt")
    monkeypatch.setattr(type(path), "unlink", lambda self, missing_ok=False: None)    # as if the link came back
    with pytest.raises(FileExistsError):
        part1.open_new_file(path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_temporary_name_taken_by_folder(part1, tmp_path):
    path = tmp_path / "m.pt"
    part1.save_checkpoint(path, {"step": torch.tensor(1)})
    path.with_suffix(".tmp").mkdir()
    with pytest.raises(OSError) as error:
        part1.save_checkpoint(path, {"step": torch.tensor(2)})
    temporary = path.with_suffix(".tmp")
    assert str(error.value) == (f"cannot write checkpoint {path} by way of {temporary} (Is a directory). Remove "
                                f"{temporary}, or set CHECKPOINT_DIR to another folder. {path} is unchanged.")
    assert torch.load(path, weights_only=True)["step"] == 1


FILE_SIZE_LIMIT_SCRIPT = """
import pathlib, resource, sys, torch
from tools.nbdefs import load_definitions
part1 = load_definitions("part1_lstm.ipynb", env={"PROFILE": "smoke", "DATA_DIR": sys.argv[1],
                                                  "REPORT_DIR": sys.argv[1], "CHECKPOINT_DIR": sys.argv[1]})
resource.setrlimit(resource.RLIMIT_FSIZE, (2**15, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:    # 300 small tensors: 19,200 bytes of tensors in a file of about 80 KB, above the limit of 32 KiB
    part1.save_checkpoint(pathlib.Path(sys.argv[1]) / "big.pt", {"weights": [torch.zeros(16) for _ in range(300)]})
except OSError as error:
    print(error)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-size limits as on Linux")
def test_file_size_limit_is_named(repo_root, tmp_path):
    """Beyond `ulimit -f` the advice is to raise the limit, not to free disk space (a real limit, no mock)."""
    completed = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path)], cwd=repo_root,
                               capture_output=True, text=True, check=True)
    message = completed.stdout.strip()
    assert message.startswith(f"writing checkpoint {tmp_path / 'big.pt'} failed (")
    assert "Its tensors take 19,200 bytes; " in message
    assert f"free in {tmp_path}, but this process may write no file larger than 32,768 bytes (ulimit -f)." in message
    assert message.endswith("Raise that limit, or set CHECKPOINT_DIR to another folder. No earlier checkpoint "
                            "exists, so a rerun starts over.")
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix in (".pt", ".tmp")) == []


ADVICE_UNDER_LIMIT_SCRIPT = """
import resource, sys
from tools.nbdefs import load_definitions
part1 = load_definitions("part1_lstm.ipynb", env={"PROFILE": "smoke", "DATA_DIR": sys.argv[1],
                                                  "REPORT_DIR": sys.argv[1], "CHECKPOINT_DIR": sys.argv[1]})
resource.setrlimit(resource.RLIMIT_FSIZE, (2**15, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
print(part1.write_failure_advice(sys.argv[1], None)[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-size limits as on Linux")
def test_file_size_limit_named_without_errno(repo_root, tmp_path):
    """A failed write that carried no error number names a file-size limit first, ahead of disk space."""
    completed = subprocess.run([sys.executable, "-c", ADVICE_UNDER_LIMIT_SCRIPT, str(tmp_path)], cwd=repo_root,
                               capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "Raise that limit"


def test_same_seed_gives_identical_training(part1, tmp_path):
    settings = train_settings(part1)
    _, first = run_training(part1, tmp_path / "a.pt", settings)
    _, second = run_training(part1, tmp_path / "b.pt", settings)
    assert [row["valid_perplexity"] for row in first] == [row["valid_perplexity"] for row in second]
    assert [row["train_loss"] for row in first] == [row["train_loss"] for row in second]


def test_finished_checkpoint_is_loaded_not_retrained(part1, tmp_path):
    settings = train_settings(part1)
    trained, _ = run_training(part1, tmp_path / "model.pt", settings)
    saved = (tmp_path / "model.pt").stat().st_mtime_ns
    loaded, _ = run_training(part1, tmp_path / "model.pt", settings, seed=7)
    assert (tmp_path / "model.pt").stat().st_mtime_ns == saved
    for a, b in zip(trained.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_with_other_settings_is_rejected(part1, tmp_path):
    run_training(part1, tmp_path / "model.pt", train_settings(part1))
    with pytest.raises(ValueError, match="HIDDEN_SIZE"):
        run_training(part1, tmp_path / "model.pt", train_settings(part1, HIDDEN_SIZE=7))
    assert (tmp_path / "model.pt").exists(), "the old checkpoint is kept"
    run_training(part1, tmp_path / "model.pt", train_settings(part1, HIDDEN_SIZE=7, FORCE_RETRAIN=True))
    assert len(list(tmp_path.glob("model.pt.*.old"))) == 1, "FORCE_RETRAIN keeps the replaced checkpoint"


@pytest.mark.parametrize("changes", [{"EVAL_EVERY": 3}, {"VALID_TOKENS_DURING_TRAINING": 20}])
def test_checkpoint_with_other_history_rejected(part1, tmp_path, changes):
    """The history in a checkpoint was scored every EVAL_EVERY steps on VALID_TOKENS_DURING_TRAINING tokens."""
    run_training(part1, tmp_path / "model.pt", train_settings(part1))
    with pytest.raises(ValueError) as error:
        run_training(part1, tmp_path / "model.pt", train_settings(part1, **changes))
    [(name, value)] = changes.items()
    saved = train_settings(part1)[name]
    assert f"was written with other settings (saved, now): {{{name!r}: ({saved!r}, {value!r})}}" in str(error.value)


def test_checkpoint_with_other_steps_rejected(part1, tmp_path):
    """A checkpoint trained toward another TRAIN_STEPS followed another learning-rate schedule, so it is rejected."""
    run_training(part1, tmp_path / "model.pt", train_settings(part1), stop_after=4)
    with pytest.raises(ValueError) as error:
        run_training(part1, tmp_path / "model.pt", train_settings(part1, TRAIN_STEPS=8))
    assert "was written with other settings (saved, now): {'TRAIN_STEPS': (6, 8)}" in str(error.value)


def test_checkpoint_before_history_settings_named(part1, tmp_path):
    """A checkpoint from before EVAL_EVERY and VALID_TOKENS_DURING_TRAINING were recorded cannot be matched."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    state = torch.load(path, weights_only=True)
    del state["settings"]["EVAL_EVERY"], state["settings"]["VALID_TOKENS_DURING_TRAINING"]
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(error.value) == (f"checkpoint {path} was written by an earlier version of this notebook, which did "
                                f"not record EVAL_EVERY, VALID_TOKENS_DURING_TRAINING, so it cannot be checked "
                                f"against them; {part1.CHECKPOINT_RETRAIN}.")


def test_checkpoint_before_valid_digest_named(part1, tmp_path):
    torch.manual_seed(0)
    model = part1.MyLSTM(17, 4, 6, 0.0)
    settings = train_settings(part1)
    batcher = part1.WindowBatcher(torch.randint(17, (300,)), 5, 3, 0)
    valid = torch.randint(17, (40,))
    part1.train_model("MyLSTM", model, batcher, valid, settings, tmp_path / "m.pt", log=lambda *args: None,
                      data_fingerprint={"train_sha256": "aa", "vocabulary": 17})
    with pytest.raises(ValueError) as error:
        part1.train_model("MyLSTM", model, batcher, valid, settings, tmp_path / "m.pt", log=lambda *args: None,
                          data_fingerprint={"train_sha256": "aa", "vocabulary": 17, "valid_sha256": "cc"})
    assert "which did not record the validation file's SHA-256, so it cannot be checked" in str(error.value)


def test_checkpoint_in_other_precision_is_rejected(part1, tmp_path):
    """A model must not finish training in another precision than it started in."""
    run_training(part1, tmp_path / "model.pt", train_settings(part1, TRAIN_STEPS=6), stop_after=4)
    with pytest.raises(ValueError, match="MIXED_PRECISION") as error:
        run_training(part1, tmp_path / "model.pt", train_settings(part1, MIXED_PRECISION=True))
    assert "FORCE_RETRAIN" in str(error.value)
    assert "set MIXED_PRECISION=0 to reuse it" in str(error.value)


def test_bfloat16_checkpoint_keeps_its_precision(part1, tmp_path):
    """A checkpoint trained with MIXED_PRECISION on resumes with it on and is rejected with it off."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1, MIXED_PRECISION=True), stop_after=4)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1, MIXED_PRECISION=False))
    assert "set MIXED_PRECISION=1 to reuse it" in str(error.value)
    _, history = run_training(part1, path, train_settings(part1, MIXED_PRECISION=True))
    assert [row["step"] for row in history] == [2, 4, 6]


def test_checkpoint_before_mixed_precision_reads_as_float32(part1, tmp_path):
    path = tmp_path / "model.pt"
    trained, _ = run_training(part1, path, train_settings(part1))
    state = torch.load(path, weights_only=True)
    del state["settings"]["MIXED_PRECISION"]                     # as written before the setting existed
    torch.save(state, path)
    loaded, _ = run_training(part1, path, train_settings(part1, MIXED_PRECISION=False), seed=7)
    for a, b in zip(trained.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="MIXED_PRECISION"):
        run_training(part1, path, train_settings(part1, MIXED_PRECISION=True))


def test_repeated_force_retrain_keeps_every_backup(part1, tmp_path):
    run_training(part1, tmp_path / "model.pt", train_settings(part1))
    first = (tmp_path / "model.pt").read_bytes()
    for learning_rate in (1e-2, 2e-2):
        run_training(part1, tmp_path / "model.pt", train_settings(part1, LEARNING_RATE=learning_rate,
                                                                   FORCE_RETRAIN=True))
    backups = sorted(tmp_path.glob("model.pt.*.old"))
    assert len(backups) == 2
    assert any(path.read_bytes() == first for path in backups), "the first finished run is still there"


def test_backups_in_one_second_all_kept(part1, tmp_path, monkeypatch):
    """Three FORCE_RETRAIN runs within one second keep each replaced checkpoint under its own numbered name."""
    monkeypatch.setattr(part1.time, "strftime", lambda format: "20260101-120000")
    run_training(part1, tmp_path / "model.pt", train_settings(part1))
    replaced = [(tmp_path / "model.pt").read_bytes()]
    for learning_rate in (1e-2, 2e-2, 3e-2):
        run_training(part1, tmp_path / "model.pt", train_settings(part1, LEARNING_RATE=learning_rate,
                                                                   FORCE_RETRAIN=True))
        replaced.append((tmp_path / "model.pt").read_bytes())
    names = ["model.pt.20260101-120000.old", "model.pt.20260101-120000-2.old", "model.pt.20260101-120000-3.old"]
    assert sorted(path.name for path in tmp_path.glob("model.pt.*.old")) == sorted(names)
    assert [(tmp_path / name).read_bytes() for name in names] == replaced[:3]


def train_twice_on(part1, path, first, second):
    """Train a tiny MyLSTM into the checkpoint `path` with the data fingerprint `first`, then again with `second`."""
    settings = train_settings(part1)
    torch.manual_seed(0)
    model = part1.MyLSTM(17, 4, 6, 0.0)
    batcher = part1.WindowBatcher(torch.randint(17, (300,)), 5, 3, 0)
    valid = torch.randint(17, (40,))
    for fingerprint in (first, second):
        part1.train_model("MyLSTM", model, batcher, valid, settings, path, log=lambda *args: None,
                          data_fingerprint=fingerprint)


def test_checkpoint_from_other_data_is_rejected(part1, tmp_path):
    with pytest.raises(ValueError, match="other data") as error:
        train_twice_on(part1, tmp_path / "m.pt", {"train_sha256": "aa", "vocabulary": 17},
                       {"train_sha256": "bb", "vocabulary": 17})
    assert "DATA_DIR" in str(error.value)
    assert "FORCE_RETRAIN" in str(error.value)


@pytest.mark.parametrize("saved, now", [(None, {"train_sha256": "aa", "vocabulary": 17}),
                                        ({"train_sha256": "aa", "vocabulary": 17}, None)])
def test_checkpoint_without_fingerprint_rejected(part1, tmp_path, saved, now):
    """A checkpoint that records no data is not reused for a run that names its data, nor the other way round."""
    with pytest.raises(ValueError) as error:
        train_twice_on(part1, tmp_path / "m.pt", saved, now)
    assert f"was trained on other data (saved {saved}, now {now})" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"hello\n", b"t", None])
def test_unreadable_checkpoint_names_file_and_fix(part1, tmp_path, content):
    path = tmp_path / "model.pt"
    if content is None:
        run_training(part1, path, train_settings(part1))
        content = path.read_bytes()[:len(path.read_bytes()) // 2]      # a truncated file
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(path) in str(error.value)
    assert "FORCE_RETRAIN" in str(error.value)
    assert path.read_bytes() == content, "the unreadable file is left for inspection"


def opener_denying(denied, real_open):
    """Wrap `real_open` so that opening the file `denied` fails as without read permission.

    A chmod would deny nothing to root, who may run the tests.
    """
    def opener(path, *args, **kwargs):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    return opener


def flip_byte_in_record(path, record):
    """Flip one bit in the data of the zip record `record` of the file `path`, leaving its stored CRC-32."""
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(record).header_offset
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[offset + 26:offset + 30])
    data[offset + 30 + name_length + extra_length] ^= 0x01
    path.write_bytes(data)


def first_tensor_record(path):
    """Return the name of the first tensor's record in the checkpoint zip file `path`."""
    with zipfile.ZipFile(path) as archive:
        return sorted(name for name in archive.namelist() if "/data/" in name)[0]


def test_flipped_checkpoint_bit_rejected(part1, tmp_path):
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    record = first_tensor_record(path)
    flip_byte_in_record(path, record)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(error.value).startswith(f"checkpoint {path} is damaged: its record {record} fails its CRC-32 check")
    assert "FORCE_RETRAIN" in str(error.value)


def test_flipped_bit_beside_empty_tensor_rejected(part1, tmp_path):
    """An empty tensor's record has a CRC-32 of 0, as in a file saved without checksums, and the other records
    are checked all the same."""
    path = tmp_path / "model.pt"
    part1.save_checkpoint(path, {"empty": torch.zeros(0), "weights": torch.arange(64.0)})
    with zipfile.ZipFile(path) as archive:
        [record] = [info.filename for info in archive.infolist() if "/data/" in info.filename and info.file_size]
    flip_byte_in_record(path, record)
    with pytest.raises(ValueError) as error:
        part1.load_checkpoint(path, train_settings(part1))
    assert str(error.value).startswith(f"checkpoint {path} is damaged: its record {record} fails its CRC-32 check")


def test_checkpoint_without_checksums_loads(part1, tmp_path):
    """torch.save writes a CRC-32 of 0 for every record when its CRC option is off, and such a file is sound."""
    path = tmp_path / "model.pt"
    trained, _ = run_training(part1, path, train_settings(part1))
    state = torch.load(path, weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)
    loaded, _ = run_training(part1, path, train_settings(part1), seed=7)
    for a, b in zip(trained.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_nan_checkpoint_weights_rejected(part1, tmp_path):
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    state = torch.load(path, weights_only=True)
    key = next(name for name in state["model"] if name.endswith("h2h.weight"))
    state["model"][key][0, 0] = float("nan")
    part1.save_checkpoint(path, state)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(error.value).startswith(f"checkpoint {path} contains values that are not finite (NaN or infinity) "
                                       f"in model.{key};")


def test_unreadable_checkpoint_not_called_damaged(part1, tmp_path, monkeypatch):
    """A checkpoint this process may not read can be sound, so the message must not invite deleting it."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1))
    monkeypatch.setattr("builtins.open", opener_denying(path, open))
    with pytest.raises(PermissionError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(error.value).startswith(f"cannot read checkpoint {path} (Permission denied). Make it readable to "
                                       f"reuse it, or set FORCE_RETRAIN=True")
    assert "delete" not in str(error.value)


def run_in_thread(function, *args):
    """Start `function(*args)` in a thread and return the thread and a dict that receives its result or error."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_checkpoint_write_waits_for_lock(part1, tmp_path):
    """Runs that share CHECKPOINT_DIR take turns, so neither renames the other's half-written temporary file."""
    path = tmp_path / "model.pt"
    with part1.locked_folder(tmp_path):        # a second descriptor, which flock blocks even in one process
        writer, outcome = run_in_thread(part1.save_checkpoint, path, {"step": 1})
        writer.join(timeout=1)
        assert writer.is_alive(), "the write did not wait for the lock"
        assert not path.exists()
    writer.join(timeout=60)
    assert outcome == {"result": None}
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_ptb_download_waits_for_lock(part1, tmp_path, monkeypatch, serve_folder):
    """A run that finds the folder locked waits, then finds the file that the other run downloaded."""
    folder = tmp_path / "ptb"
    write_tiny_corpus(folder)
    (folder / "ptb.test.txt").unlink()
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(tmp_path) + "/nowhere/{name}")   # a download would fail
    with part1.locked_folder(folder):
        reader, outcome = run_in_thread(part1.ensure_ptb, folder, True)
        reader.join(timeout=1)
        assert reader.is_alive(), "the download did not wait for the lock"
        (folder / "ptb.test.txt").write_text(" the other run's download \n")
    reader.join(timeout=60)
    paths, _ = outcome["result"]
    assert paths["test"].read_text() == " the other run's download \n"


class MakeFolderOnLoad:
    """Unpickling this calls os.mkdir: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_running_checkpoint_is_rejected(part1, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"settings": MakeFolderOnLoad(marker)}, path)
    with pytest.raises(ValueError, match="unreadable") as error:
        run_training(part1, path, train_settings(part1))
    assert not marker.exists(), "loading must not call what the file names"
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [torch.zeros(3), {"settings": {}}])
def test_foreign_checkpoint_names_file(part1, tmp_path, content):
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not one of this notebook's training checkpoints") as error:
        run_training(part1, path, train_settings(part1))
    assert str(path) in str(error.value)
    assert "FORCE_RETRAIN" in str(error.value)


@pytest.mark.parametrize("missing", ["optimizer", "step", "history", "train_time_s", "rng", "settings"])
def test_incomplete_checkpoint_names_file(part1, tmp_path, missing):
    """A training checkpoint that lacks one of its parts is rejected by name, before training reads that part."""
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1), stop_after=4)
    state = torch.load(path, weights_only=True)
    del state[missing]
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        run_training(part1, path, train_settings(part1))
    assert str(error.value).startswith(f"checkpoint {path} is not one of this notebook's training checkpoints")


def test_other_model_checkpoint_names_file(part1, tmp_path):
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1), name="MyLSTM")
    saved = path.read_bytes()
    with pytest.raises(ValueError, match="does not match MyLSTM_att") as error:
        run_training(part1, path, train_settings(part1), name="MyLSTM_att")
    assert "FORCE_RETRAIN" in str(error.value)
    assert path.read_bytes() == saved


def test_overflowing_perplexity_names_learning_rate(part1, tmp_path):
    assert part1.perplexity_of(2.0) == pytest.approx(math.exp(2.0))
    assert part1.perplexity_of(800.0) == math.inf
    settings = train_settings(part1)
    torch.manual_seed(0)
    model = part1.MyLSTM(17, 4, 6, 0.0)
    with torch.no_grad():
        model.out.bias[3] = 1e5                     # a loss near 1e5 nats: finite, but exp overflows
    batcher = part1.WindowBatcher(torch.randint(17, (300,)), 5, 3, 0)
    with pytest.raises(FloatingPointError, match=r"validation perplexity is inf at step 2") as error:
        part1.train_model("MyLSTM", model, batcher, torch.randint(17, (40,)), settings, tmp_path / "big.pt",
                          log=lambda *args: None)
    assert "LEARNING_RATE" in str(error.value)
    assert "checkpoint" not in str(error.value), "no checkpoint was written before the first evaluation"
    assert math.isnan(part1.perplexity_of(math.nan))


def test_divergence_after_checkpoint_advises_force_retrain(part1, tmp_path):
    path = tmp_path / "model.pt"
    run_training(part1, path, train_settings(part1, TRAIN_STEPS=2))
    assert "FORCE_RETRAIN=True" in part1.divergence_advice(path, 0.5)
    assert str(path) in part1.divergence_advice(path, 0.5)
    assert "FORCE_RETRAIN" not in part1.divergence_advice(tmp_path / "none.pt", 0.5)


def test_nan_loss_stops_with_model_and_step(part1, tmp_path):
    settings = train_settings(part1)
    torch.manual_seed(0)
    model = part1.MyLSTM(17, 4, 6, 0.0)
    with torch.no_grad():
        model.out.bias[3] = float("nan")
    batcher = part1.WindowBatcher(torch.randint(17, (300,)), 5, 3, 0)
    with pytest.raises(FloatingPointError, match=r"MyLSTM: training loss is nan at step 1"):
        part1.train_model("MyLSTM", model, batcher, torch.randint(17, (40,)), settings, tmp_path / "nan.pt",
                          log=lambda *args: None)


def allocation_failure(*args, **kwargs):
    """Raise PyTorch's own CPU out-of-memory error by requesting more bytes than any machine has."""
    torch.empty(2**62, dtype=torch.uint8)


def test_training_out_of_memory_keeps_checkpoint(part1, tmp_path, monkeypatch):
    settings = train_settings(part1)
    path = tmp_path / "model.pt"
    run_training(part1, path, settings, stop_after=2)                # writes the checkpoint of step 2
    saved = path.read_bytes()
    monkeypatch.setattr(part1.MyLSTM_att, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        run_training(part1, path, settings)
    message = str(error.value)
    assert "MyLSTM_att: training step 3 ran out of CPU memory" in message
    assert "BATCH_SIZE=3, WINDOW=5, EMBED_SIZE=4, HIDDEN_SIZE=6" in message
    assert "Lower BATCH_SIZE, e.g. BATCH_SIZE=1, or the other sizes, and train again." in message
    assert f"Set FORCE_RETRAIN=True as well, because new sizes need new checkpoints in place of those in {tmp_path} " \
           f"(model.pt)." in message
    assert path.read_bytes() == saved, "the checkpoint is left as it was"


def test_out_of_memory_counts_other_models_checkpoints(part1, tmp_path, monkeypatch):
    """A finished model's checkpoint also records the sizes, so smaller ones need FORCE_RETRAIN."""
    settings = train_settings(part1)
    run_training(part1, tmp_path / "MyLSTM.pt", settings, name="MyLSTM")
    monkeypatch.setattr(part1.MyLSTM_att, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        run_training(part1, tmp_path / "MyLSTM_att.pt", settings)
    assert "MyLSTM_att: training step 1 ran out of CPU memory" in str(error.value)
    assert "Set FORCE_RETRAIN=True as well" in str(error.value)
    assert "(MyLSTM.pt)" in str(error.value)


def test_first_step_out_of_memory_advice(part1, tmp_path, monkeypatch):
    settings = train_settings(part1, BATCH_SIZE=1)
    monkeypatch.setattr(part1.MyLSTM_att, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        run_training(part1, tmp_path / "none.pt", settings)
    message = str(error.value)
    assert "training step 1 ran out of CPU memory" in message
    assert "Lower WINDOW, EMBED_SIZE or HIDDEN_SIZE and train again." in message
    assert "FORCE_RETRAIN" not in message


def test_oversized_batch_advice_halves_real_batch(part1, tmp_path, monkeypatch):
    """300 tokens in windows of 5 make 58 windows an epoch, so BATCH_SIZE=100 runs batches of 58."""
    monkeypatch.setattr(part1.MyLSTM_att, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        run_training(part1, tmp_path / "model.pt", train_settings(part1, BATCH_SIZE=100))
    message = str(error.value)
    assert "BATCH_SIZE=100, WINDOW=5, EMBED_SIZE=4, HIDDEN_SIZE=6 (batches of 58 windows" in message
    assert "Lower BATCH_SIZE, e.g. BATCH_SIZE=29, or the other sizes" in message


@pytest.mark.parametrize("batch_size, phrases", [
    (8, ("batches of 8 windows of up to 5 tokens.", "Lower EVAL_BATCH_SIZE, e.g. EVAL_BATCH_SIZE=4, and run again.")),
    (100, ("batches of 39 windows of up to 5 tokens (EVAL_BATCH_SIZE=100).", "e.g. EVAL_BATCH_SIZE=19,")),
    (1, ("batches of 1 window of up to 5 tokens.",
         "A batch of one window cannot be split, so lower WINDOW or HIDDEN_SIZE")),
])
def test_evaluation_out_of_memory_advice(part1, monkeypatch, batch_size, phrases):
    model = part1.MyLSTM(17, 4, 6, 0.0)
    monkeypatch.setattr(model, "forward_all", allocation_failure)
    with pytest.raises(MemoryError) as error:
        part1.evaluate(model, torch.randint(17, (200,)), 5, batch_size)
    for phrase in phrases:
        assert phrase in str(error.value)
    assert model.training, "evaluate restores training mode after the error"


def test_validation_out_of_memory_names_model_and_step(part1, tmp_path, monkeypatch):
    original = part1.MyLSTM_att.forward_all

    def fails_in_eval_mode(self, inputs):
        if not self.training:
            allocation_failure()
        return original(self, inputs)

    monkeypatch.setattr(part1.MyLSTM_att, "forward_all", fails_in_eval_mode)
    with pytest.raises(MemoryError) as error:
        run_training(part1, tmp_path / "model.pt", train_settings(part1))
    message = str(error.value)
    assert message.startswith("MyLSTM_att: validation after step 2: evaluation ran out of CPU memory")
    assert "Lower EVAL_BATCH_SIZE, e.g. EVAL_BATCH_SIZE=2, and run again." in message
    assert message.endswith("The checkpoint keeps the training up to step 2, and a rerun validates it first.")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["step"] == 2
    assert saved["history"] == []
    assert saved["pending_validation"]["tokens"] == 2 * 3 * 5, "two steps of 3 windows of 5 tokens"


@pytest.mark.parametrize("failing_validation", [2, 3])       # validations come after steps 2, 4 and 6
def test_validation_out_of_memory_resumes_identically(part1, tmp_path, monkeypatch, failing_validation):
    """A rerun after validation ran out of memory validates that step first and then trains as if uninterrupted."""
    settings = train_settings(part1)
    straight, straight_history = run_training(part1, tmp_path / "straight.pt", settings)
    original = part1.evaluate
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_validation:
            raise MemoryError("evaluation ran out of CPU memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(part1, "evaluate", fails_once)
    with pytest.raises(MemoryError):
        run_training(part1, tmp_path / "resumed.pt", settings)
    monkeypatch.setattr(part1, "evaluate", original)
    resumed, resumed_history = run_training(part1, tmp_path / "resumed.pt", settings, seed=99)
    timeless = [{key: row[key] for key in ("step", "train_loss", "valid_perplexity")} for row in straight_history]
    assert [{key: row[key] for key in timeless[0]} for row in resumed_history] == timeless
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert "pending_validation" not in torch.load(tmp_path / "resumed.pt", weights_only=True)


def test_pending_last_validation_logged_as_resume(part1, tmp_path, monkeypatch):
    """A checkpoint of the last step whose validation ran out of memory is logged as resumed, not as finished."""
    settings = train_settings(part1)
    path = tmp_path / "model.pt"
    original = part1.evaluate
    calls = []

    def fails_last(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                # the validation after step 6, the last
            raise MemoryError("evaluation ran out of CPU memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(part1, "evaluate", fails_last)
    with pytest.raises(MemoryError):
        run_training(part1, path, settings)
    monkeypatch.setattr(part1, "evaluate", original)
    lines = []
    run_training(part1, path, settings, log=lines.append)
    assert lines[0] == f"MyLSTM_att: resuming checkpoint {path} at step 6"


# Messages of failed allocations and of another error, with whether is_out_of_memory must accept them.
ALLOCATION_MESSAGES = [
    ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
     True),
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", False),
]


@pytest.mark.parametrize("message, expected", ALLOCATION_MESSAGES)
def test_out_of_memory_messages_recognised(part1, message, expected):
    assert part1.is_out_of_memory(RuntimeError(message)) is expected
    assert part1.is_out_of_memory(torch.OutOfMemoryError(message))


def test_other_runtime_errors_pass_unchanged(part1, monkeypatch):
    def broken(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model = part1.MyLSTM(17, 4, 6, 0.0)
    monkeypatch.setattr(model, "forward_all", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as error:
        part1.evaluate(model, torch.randint(17, (200,)), 5, 8)
    assert type(error.value) is RuntimeError


def test_batch_size_one_trains(part1, tmp_path):
    settings = train_settings(part1, BATCH_SIZE=1, EVAL_BATCH_SIZE=1, TRAIN_STEPS=3, EVAL_EVERY=3)
    _, history = run_training(part1, tmp_path / "one.pt", settings)
    assert len(history) == 1
    assert math.isfinite(history[0]["valid_perplexity"])


def test_recall_task_target_is_value_after_key(part1):
    windows, targets = part1.recall_batch(50, torch.Generator().manual_seed(0))
    assert windows.shape == (50, part1.RECALL_LENGTH)
    assert torch.all((windows == part1.RECALL_KEY).sum(dim=1) == 1)
    positions = (windows == part1.RECALL_KEY).int().argmax(dim=1)
    assert torch.all(positions < part1.RECALL_LENGTH // 2)
    assert torch.equal(targets, windows[torch.arange(50), positions + 1])
    assert torch.all(targets < part1.RECALL_VALUES)
    distances = (part1.RECALL_LENGTH - 1) - (positions + 1)
    assert distances.min() >= part1.RECALL_DISTANCES[0]
    assert distances.max() <= part1.RECALL_DISTANCES[1]
    many, _ = part1.recall_batch(2000, torch.Generator().manual_seed(1))
    many_distances = (part1.RECALL_LENGTH - 2) - (many == part1.RECALL_KEY).int().argmax(dim=1)
    assert set(many_distances.tolist()) == set(range(part1.RECALL_DISTANCES[0], part1.RECALL_DISTANCES[1] + 1))


def value_after_key(part1, windows):
    """Return the value that follows KEY in each recall window."""
    key_positions = (windows == part1.RECALL_KEY).int().argmax(dim=1)
    return windows[torch.arange(len(windows)), key_positions + 1]


def test_recall_training_targets_and_accuracy(part1, monkeypatch):
    recorder = RecordingFunctional()
    monkeypatch.setattr(part1, "nnf", recorder)
    inputs_seen = []

    class OracleAtEvaluation(part1.MyLSTM):
        """MyLSTM while training. In eval mode it predicts the value after KEY, so its accuracy must be 1."""

        def forward(self, x):
            inputs_seen.append(x.clone())
            logits = super().forward(x)
            if self.training:
                return logits
            return nn.functional.one_hot(value_after_key(part1, x), logits.shape[1]).to(logits.dtype)

    _, curve = part1.train_recall(OracleAtEvaluation, 3, 0, batch_size=4, embed_size=4, hidden_size=6)
    assert len(recorder.calls) == 3
    for step, (inputs, call) in enumerate(zip(inputs_seen, recorder.calls), start=1):
        assert torch.equal(call["targets"], value_after_key(part1, inputs)), f"step {step}"
    assert curve == [{"step": 3, "accuracy": 1.0}]


# ---------------------------------------------------------------- end to end


def write_tiny_corpus(folder, seed=0):
    """Write ptb.{train,valid,test}.txt in the PTB format: space-led lines, <unk> and N tokens."""
    rng = random.Random(seed)
    words = [f"w{index}" for index in range(60)] + ["<unk>", "N", "the", "of"]
    folder.mkdir(parents=True)
    for split, lines in (("train", 400), ("valid", 60), ("test", 60)):
        text = "".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + " \n"
                       for _ in range(lines))
        (folder / f"ptb.{split}.txt").write_text(text)


def assert_png_not_blank(path):
    image = matplotlib_image(path)
    assert image.std() > 0.01, f"{path.name} is blank"


def matplotlib_image(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_notebook_smoke_run_end_to_end(run_notebook, tmp_path):
    write_tiny_corpus(tmp_path / "data" / "ptb")
    with open(tmp_path / "data" / "ptb" / "ptb.test.txt", "a") as file:
        file.write(" w1 never-trained w2 unseen \n")
    report = run_notebook(NOTEBOOK, PROFILE="smoke", DATA_DIR=tmp_path / "data", DOWNLOAD=0)
    results = json.loads((report / "results" / "part1_smoke.json").read_text())
    assert results["profile"] == "smoke"
    assert results["data"]["outside_vocabulary"] == {"train": 0, "valid": 0, "test": 2}
    assert results["headline"]["test tokens outside the vocabulary"] == 2
    assert results["data"]["checksums_match"] == {"ptb.train.txt": False, "ptb.valid.txt": False,
                                                  "ptb.test.txt": False}
    models = results["metrics"]["models"]
    assert set(models) == {"MyLSTM", "MyLSTM_att", "TorchLSTM"}
    vocabulary = results["data"]["vocabulary"]
    for name, row in models.items():
        assert 1 < row["test"]["perplexity"] < vocabulary, name
        assert row["test"]["tokens"] == results["data"]["splits"]["test"] - 1
        assert len(results["metrics"]["histories"][name]) == 2
    for name in ("learning_curves", "attention_heatmaps", "recall_experiment", "recall_attention"):
        assert_png_not_blank(report / "figures" / f"part1_smoke_{name}.png")
        assert (report / "figures" / f"part1_smoke_{name}.pdf").stat().st_size > 1000
    assert not list((report / "figures").glob(".pending_*"))



def test_cpu_identity_reads_first_processor(part1, cpuinfo_sample, tmp_path):
    assert part1.cpu_identity(cpuinfo_sample) == ("AMD EPYC", "25", "17")
    assert part1.cpu_identity(tmp_path / "missing") == (None, None, None)


def test_results_record_this_cpu(part1, this_cpu):
    hardware = part1.describe_hardware()
    assert hardware["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if this_cpu is not None:
        assert (hardware["cpu"], hardware["cpu_family"], hardware["cpu_model"]) == this_cpu



@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="getrusage as on Linux and macOS")
def test_peak_memory_reported_in_mib(part1):
    """Linux reports peak memory in KiB, so with PyTorch loaded the peak is hundreds of MiB, below the machine's
    total."""
    machine_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = part1.peak_memory_mib()
    assert peak > 100
    assert peak < machine_mib


@pytest.mark.parametrize("name", ["MyLSTM", "MyLSTM_att", "TorchLSTM"])
def test_word_ids_checked_for_shape_and_range(part1, name):
    torch.manual_seed(0)
    model = part1.MODEL_CLASSES[name](17, 4, 6, 0.0)
    assert model(torch.tensor([[0, 16, 3]])).shape == (1, 17)
    for shape in [(0, 5), (2, 0), (5,)]:
        with pytest.raises(ValueError, match=r"batch and time >= 1, got " + re.escape(str(shape))):
            model.forward_all(torch.zeros(shape, dtype=torch.long))
    for bad in (17, -1):
        with pytest.raises(ValueError, match=rf"from 0 to 16, .* range from {min(bad, 0)} to {max(bad, 3)};"):
            model(torch.tensor([[0, bad, 3]]))


def test_window_and_batch_must_be_positive(part1):
    ids = torch.arange(50)
    with pytest.raises(ValueError, match="window must be a whole number of 1 or more, got 0"):
        part1.WindowBatcher(ids, 0, 3, 0)
    with pytest.raises(ValueError, match="batch_size must be a whole number of 1 or more, got 0"):
        list(part1.evaluation_windows(ids, 5, 0))
    with pytest.raises(ValueError, match="window must be a whole number of 1 or more, got True"):
        part1.WindowBatcher(ids, True, 3, 0)
    batcher = part1.WindowBatcher(ids, np.int64(5), torch.tensor(4), 0)       # NumPy and tensor integers work
    assert batcher.batch(0)[0].shape == (4, 5)


def test_batcher_needs_two_windows_of_tokens(part1):
    """At an offset of up to WINDOW - 1, one window and its last target need 2 * WINDOW + 1 tokens."""
    with pytest.raises(ValueError, match=r"has 24 tokens, fewer than 2 \* WINDOW \+ 1 = 25"):
        part1.WindowBatcher(torch.arange(24), 12, 4, 0)
    batcher = part1.WindowBatcher(torch.arange(25), 12, 4, 0)
    for step in range(5):
        inputs, targets = batcher.batch(step)
        assert inputs.shape == (1, 12)
        assert torch.equal(targets, inputs + 1)


def test_generate_rejects_zero_temperature(part1):
    model = part1.MyLSTM(17, 4, 6, 0.0)
    with pytest.raises(ValueError, match="temperature must be above 0, got 0"):
        part1.generate(model, None, "a b", 3, 5, temperature=0)


def test_cell_rejects_mismatched_state_shapes(part1):
    cell = part1.MyLSTMCell(3, 5)
    x, state = torch.zeros(2, 3), torch.zeros(2, 5)
    assert cell(x, (state, state))[0].shape == (2, 5)
    assert cell(torch.zeros(3), (torch.zeros(5), torch.zeros(5)))[0].shape == (5,), "one unbatched step"
    for h, c in [(torch.zeros(1, 5), state), (state, torch.zeros(5)), (torch.zeros(2, 4), state)]:
        with pytest.raises(ValueError, match=r"expected x \(B, 3\) and h, c \(B, 5\)"):
            cell(x, (h, c))
    with pytest.raises(ValueError, match=r"got x \(2, 4\)"):
        cell(torch.zeros(2, 4), (state, state))


@pytest.mark.parametrize("message, expected", [
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 160000000000 bytes", MemoryError),
    ("another error", RuntimeError),
])
def test_model_too_large_names_sizes(part1, monkeypatch, message, expected):
    def failing_model(*args):
        raise RuntimeError(message)

    monkeypatch.setitem(part1.MODEL_CLASSES, "MyLSTM", failing_model)
    with pytest.raises(expected) as error:
        part1.build_model("MyLSTM", 10_000, 0)
    if expected is MemoryError:
        assert f"HIDDEN_SIZE={part1.HIDDEN_SIZE}" in str(error.value)
        assert "lower the sizes" in str(error.value)
    else:
        assert str(error.value) == "another error", "other errors pass through unchanged"


def test_string_dropout_asks_for_number(part1):
    with pytest.raises(ValueError) as error:
        part1.validate_settings({**part1.SETTINGS, "DROPOUT": "0.1"})
    assert str(error.value) == ("DROPOUT='0.1' is invalid: it must be a number, at least 0 and below 1, "
                                "e.g. DROPOUT=0.2")


def test_overflowing_model_sizes_named(part1, monkeypatch):
    """Sizes whose byte count does not fit in 64 bits make PyTorch raise "Storage size calculation overflowed"."""
    monkeypatch.setattr(part1, "EMBED_SIZE", 2**62)
    with pytest.raises(MemoryError) as error:
        part1.build_model("MyLSTM", 10_000, 0)
    assert str(error.value).startswith(f"building MyLSTM with EMBED_SIZE={2**62}, HIDDEN_SIZE={part1.HIDDEN_SIZE} "
                                       f"and a vocabulary of 10,000 words needs more memory than is free (Storage "
                                       f"size calculation overflowed")
    assert str(error.value).endswith("lower the sizes")


def test_sizes_past_64_bits_named(part1, monkeypatch):
    """A size that does not fit in a C long long makes PyTorch raise TypeError "Overflow when unpacking"."""
    monkeypatch.setattr(part1, "HIDDEN_SIZE", 2**63)
    with pytest.raises(MemoryError) as error:
        part1.build_model("MyLSTM", 10_000, 0)
    assert f"HIDDEN_SIZE={2**63}" in str(error.value)
    assert "Overflow when unpacking long long" in str(error.value)


def test_ptb_folder_that_is_file_named(part1, tmp_path):
    folder = tmp_path / "ptb"
    folder.write_text("not a folder")
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(folder, download=True)
    assert str(error.value) == (f"the Penn Treebank files go into {folder}, which is a file, not a folder. Move or "
                                f"rename it, or point DATA_DIR at another folder")


def test_unreadable_ptb_file_named(part1, tmp_path, monkeypatch):
    folder = tmp_path / "ptb"
    write_tiny_corpus(folder)
    denied = folder / "ptb.valid.txt"
    monkeypatch.setattr("builtins.open", opener_denying(denied, open))
    with pytest.raises(OSError) as error:
        part1.ensure_ptb(folder, download=False)
    assert str(error.value) == (f"cannot read {denied} (Permission denied). Make it readable, or point DATA_DIR at "
                                f"a folder whose ptb/ has readable copies")


def test_ptb_download_stops_past_size(part1, tmp_path, monkeypatch, serve_folder):
    """A reply longer than the file it should be is cut off there, so that an endless one cannot fill the disk."""
    write_tiny_corpus(tmp_path / "server")
    url = serve_folder(tmp_path / "server") + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    monkeypatch.setitem(part1.PTB_SIZES, "ptb.train.txt", 100)
    folder = tmp_path / "data" / "ptb"
    with pytest.raises(ValueError) as error:
        part1.ensure_ptb(folder, download=True)
    assert str(error.value) == (f"{url.format(name='ptb.train.txt')} sent more than the 100 bytes of ptb.train.txt, "
                                f"so it is not that file; the download was deleted. Try again later, or place a "
                                f"verified copy of ptb.train.txt in {folder.resolve()}.")
    assert not (tmp_path / "data").exists()


def test_ptb_sizes_match_real_files(part1, real_data):
    sizes = {name: (real_data / "ptb" / name).stat().st_size for name in part1.PTB_SIZES}
    assert sizes == part1.PTB_SIZES


def test_ptb_reply_not_http_named(part1, tmp_path, monkeypatch, serve_garbage):
    url = serve_garbage + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert str(error.value).startswith(f"could not download {url.format(name='ptb.train.txt')} (this is not "
                                       f"HTTP\\r\\n). ")
    assert not (tmp_path / "data").exists()


def test_ptb_download_over_https(part1, real_data, tmp_path, monkeypatch, serve_folder):
    """The Penn Treebank's server is https, which the notebook's own HTTPS handler must reach, with the
    certificate checked."""
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb", tls=True) + "/{name}")
    paths, checksums_match = part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert paths["valid"].read_bytes() == (real_data / "ptb" / "ptb.valid.txt").read_bytes()
    assert all(checksums_match.values())


def test_https_certificate_checked(part1, real_data, tmp_path, monkeypatch, serve_folder):
    url = serve_folder(real_data / "ptb", tls=True) + "/{name}"
    monkeypatch.delenv("SSL_CERT_FILE")                 # the system's certificates, which do not sign this one
    monkeypatch.setattr(part1, "PTB_URL", url)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "ptb", download=True)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error.value)


def test_unreadable_ptb_address_named(part1, tmp_path, monkeypatch, serve_raw):
    """urllib raises ValueError, not OSError, for an address it cannot read, such as this redirect's."""
    def to_broken_address(connection, stopping):
        connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n")

    url = serve_raw(to_broken_address) + "/{name}"
    monkeypatch.setattr(part1, "PTB_URL", url)
    with pytest.raises(FileNotFoundError) as error:
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert str(error.value).startswith(f"could not download {url.format(name='ptb.train.txt')} (Invalid IPv6 URL). ")
    assert not (tmp_path / "data").exists()


def steady_slow_reply(connection, stopping):
    """A reply of 6,000 bytes whose body arrives at about 600 bytes per second, 60 bytes every 100 ms."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6000\r\n\r\n")
    for _ in range(100):
        if stopping.is_set():
            return
        connection.sendall(b"x" * 60)
        time.sleep(0.1)


def test_download_below_rate_fails(part1, tmp_path, monkeypatch, serve_raw):
    """A reply that arrives at 600 bytes per second fails where DOWNLOAD_MIN_RATE requires 1,000 bytes per second
    over each window of DOWNLOAD_TIMEOUT_S seconds, although each window brings more than 1,000 bytes."""
    monkeypatch.setattr(part1, "DOWNLOAD_TIMEOUT_S", 3)
    monkeypatch.setattr(part1, "DOWNLOAD_MIN_RATE", 1000)
    with open(tmp_path / "download", "wb") as file, pytest.raises(TimeoutError) as error:
        part1.download_into(serve_raw(steady_slow_reply) + "/file", file, 6000)
    assert re.fullmatch(r"[\d,]+ bytes arrived in the last 3 s, fewer than DOWNLOAD_MIN_RATE \(1,000 bytes per "
                        r"second\) allows", str(error.value))


@pytest.mark.parametrize("sent", [60, 100])
def test_reply_cut_short_named(part1, tmp_path, serve_raw, sent):
    """A reply that closes before the length its headers announce fails, also where it closes after exactly the
    size the caller expects."""
    def cut_short(connection, stopping):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 110\r\n\r\n" + b"x" * sent)

    with open(tmp_path / "download", "wb") as file, pytest.raises(ConnectionError) as error:
        part1.download_into(serve_raw(cut_short) + "/file", file, 100)
    assert str(error.value) == (f"the connection closed after {sent} bytes, {110 - sent} bytes before the end that "
                                f"the server announced")


def test_ptb_redirect_to_ftp_rejected(part1, tmp_path, serve_raw):
    """urllib follows a redirect to ftp, where the checks of the reply would not apply, so download_into does not."""
    def to_ftp(connection, stopping):
        connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:9/file\r\nContent-Length: 0\r\n\r\n")

    with open(tmp_path / "download", "wb") as file, pytest.raises(OSError) as error:
        part1.download_into(serve_raw(to_ftp) + "/file", file, 100)
    assert str(error.value) == ("HTTP Error 302: a redirect to ftp://127.0.0.1:9/file, which is not an http or https "
                                "address")


def test_redirect_chain_stops_after_three(part1, tmp_path, serve_raw):
    """download_into follows three redirects, each to a new address, and fails at the fourth."""
    requests = []

    def redirect_again(connection, stopping):
        requests.append(1)
        location = f"/moved{len(requests)}".encode()
        connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n")

    with open(tmp_path / "download", "wb") as file, pytest.raises(OSError) as error:
        part1.download_into(serve_raw(redirect_again) + "/file", file, 100)
    assert len(requests) == 4
    assert "HTTP Error 302" in str(error.value)


def test_interrupted_download_check_cleans_up(part1, real_data, tmp_path, monkeypatch, serve_folder):
    """Ctrl-C after the transfer, while the file's SHA-256 is taken, also leaves no partial file or folder."""
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(part1, "PTB_URL", serve_folder(real_data / "ptb") + "/{name}")
    monkeypatch.setattr(part1, "sha256_of", interrupted)
    with pytest.raises(KeyboardInterrupt):
        part1.ensure_ptb(tmp_path / "data" / "ptb", download=True)
    assert not (tmp_path / "data").exists()


def test_fetch_data_reads_every_split(part1, tmp_path, monkeypatch):
    """A file that is there but contains no words fails the check, as it would fail the run later."""
    write_tiny_corpus(tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("")
    monkeypatch.setattr(part1, "DATA_PATH", tmp_path)
    with pytest.raises(ValueError, match="ptb.valid.txt has 0 tokens"):
        part1.fetch_data()


def test_fetch_data_returns_words(part1, tmp_path, monkeypatch):
    write_tiny_corpus(tmp_path / "ptb")
    monkeypatch.setattr(part1, "DATA_PATH", tmp_path)
    paths, words, _ = part1.fetch_data()
    assert words["test"] == part1.read_words(paths["test"])


def test_fetch_data_honours_download_off(part1, tmp_path, monkeypatch, serve_folder):
    """With DOWNLOAD off, fetch_data names the missing files and sends no request to the server."""
    (tmp_path / "server").mkdir()
    monkeypatch.setattr(part1, "PTB_URL", serve_folder(tmp_path / "server") + "/{name}")
    monkeypatch.setattr(part1, "DATA_PATH", tmp_path / "data")
    monkeypatch.setattr(part1, "DOWNLOAD", False)
    with pytest.raises(FileNotFoundError) as error:
        part1.fetch_data()
    assert str(error.value).startswith(f"Penn Treebank files missing in {(tmp_path / 'data' / 'ptb').resolve()}: ")
    assert serve_folder.user_agents == []


def test_data_dir_file_rejected(repo_root, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(ValueError) as error:
        load_definitions(repo_root / NOTEBOOK, env={"PROFILE": "smoke", "DATA_DIR": str(tmp_path / "data")})
    assert str(error.value) == (f"DATA_DIR={str(tmp_path / 'data')!r} is invalid: it must be a folder, not a file, "
                                f'e.g. DATA_DIR="data"')


def test_checkpoint_from_other_valid_file_rejected(repo_root, tmp_path, run_cells_until):
    """A checkpoint's history was scored on the validation file, so another one must not extend it."""
    folder = tmp_path / "data" / "ptb"
    write_tiny_corpus(folder)
    settings = {"PROFILE": "smoke", "DATA_DIR": str(tmp_path / "data"), "DOWNLOAD": "0", "MIXED_PRECISION": "0"}
    run_cells_until(repo_root / NOTEBOOK, 'train_named("MyLSTM")', "", settings)
    valid = folder / "ptb.valid.txt"
    valid.write_text(valid.read_text().replace(" w1 ", " w2 "))
    with pytest.raises(NotebookFailed) as error:
        run_cells_until(repo_root / NOTEBOOK, 'train_named("MyLSTM")', "", settings)
    assert "was trained on other data" in str(error.value)
    assert "'valid_sha256'" in str(error.value)


def test_force_retrain_cell_retrains_model(repo_root, tmp_path, run_cells_until):
    """FORCE_RETRAIN = True in a cell of its own, after the settings were read, trains the model again and keeps
    the replaced checkpoint, as its error messages advise."""
    write_tiny_corpus(tmp_path / "data" / "ptb")
    settings = {"PROFILE": "smoke", "DATA_DIR": str(tmp_path / "data"), "DOWNLOAD": "0", "MIXED_PRECISION": "0"}
    run_cells_until(repo_root / NOTEBOOK, 'train_named("MyLSTM")', "", settings)
    checkpoints = tmp_path / "checkpoints" / "part1_smoke"
    assert not list(checkpoints.glob("MyLSTM.pt.*.old"))
    run_cells_until(repo_root / NOTEBOOK, 'train_named("MyLSTM")', "FORCE_RETRAIN = True", settings)
    assert len(list(checkpoints.glob("MyLSTM.pt.*.old"))) == 1


def test_data_cell_downloads_in_kernel(repo_root, real_data, tmp_path, serve_folder, run_cells_until):
    """The data cell downloads the Penn Treebank in a kernel that has run only the cells before it, in order."""
    url = serve_folder(real_data / "ptb") + "/{name}"
    data = tmp_path / "data"
    run_cells_until(repo_root / NOTEBOOK, "= fetch_data()", f"PTB_URL = {url!r}",
                    {"PROFILE": "smoke", "DATA_DIR": str(data), "MIXED_PRECISION": "0"})
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        assert (data / "ptb" / name).read_bytes() == (real_data / "ptb" / name).read_bytes()

