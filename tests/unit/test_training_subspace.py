"""Task-subspace LoRA (--task-subspace, subspace.py) against plain references: the layer-input
covariances against the inputs recomputed from the model's hidden states, the subspace
against the generalized eigenproblem solved directly, and the projection: after it (and
after an optimizer step with the callback) every LoRA A reads nothing outside its subspace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterd.errors import InvalidArgument
from adapterd.training import subspace
from adapterd.training.data import Example, collate, tokens
from adapterd.training.spec import TrainingSpec
from adapterd.training.worker import prepare_model


def examples(texts: list[tuple[str, str]]) -> list[Example]:
    return [Example(i, p, c, p, c) for i, (p, c) in enumerate(texts, 1)]


TASK = examples([("pandas: drop NaN rows\n", "df.dropna()"), ("pandas: first rows\n", "df.head()"),
                 ("numpy: five zeros, please\n", "np.zeros(5)")])
GENERAL = examples([("What is the capital of France?\n", "Paris."), ("Say hello.\n", "Hello!"),
                    ("Name a colour.\n", "Blue."), ("Write one word about the sea, then stop.\n", "Waves.")])


@pytest.fixture
def peft_model(model_factory):
    torch.manual_seed(0)
    return prepare_model(model_factory("llama"), TrainingSpec(name="x", rank=4, dropout=0.0), torch.device("cpu"),
                         torch.float32)


def reference_basis(c_task: np.ndarray, c_general: np.ndarray, size: int) -> np.ndarray:
    """The projector onto the span of the top `size` eigenvectors of inv(B) A, B = C_general + eps I."""
    d = c_general.shape[0]
    b = c_general + subspace.EPS * np.trace(c_general) / d * np.eye(d)
    values, vectors = np.linalg.eig(np.linalg.solve(b, c_task))
    top = np.real(vectors[:, np.argsort(-np.real(values))[:size]])
    q, _ = np.linalg.qr(top)
    return q @ q.T


def test_the_basis_spans_the_top_generalized_eigenvectors():
    g = np.random.default_rng(0)
    d = 12
    x_task, x_general = g.normal(size=(200, d)) * g.uniform(0.1, 3, d), g.normal(size=(300, d)) @ g.normal(size=(d, d))
    c_task, c_general = x_task.T @ x_task / 200, x_general.T @ x_general / 300
    for size in (1, 3, 7):
        q, ratios = subspace.task_basis(torch.tensor(c_task), torch.tensor(c_general), size)
        assert q.shape == (d, size)
        np.testing.assert_allclose(q.T.numpy() @ q.numpy(), np.eye(size), atol=1e-10)  # orthonormal
        np.testing.assert_allclose(q.numpy() @ q.numpy().T, reference_basis(c_task, c_general, size), atol=1e-8)
        assert (ratios[:-1] >= ratios[1:]).all()  # highest first
    # Where general text carries all the energy in the first half and the task only in the second, the
    # subspace is the second half.
    c_general = np.diag([10.0] * 6 + [0.01] * 6)
    c_task = np.diag([1.0] * 12)
    q, ratios = subspace.task_basis(torch.tensor(c_task), torch.tensor(c_general), 6)
    np.testing.assert_allclose(q.numpy() @ q.numpy().T, np.diag([0.0] * 6 + [1.0] * 6), atol=1e-10)
    assert float(ratios[-1]) > 50 * 1.0 / 10.0
    # More directions asked for than the layer has: all of them.
    assert subspace.task_basis(torch.tensor(c_task), torch.tensor(c_general), 100)[0].shape == (12, 12)


def test_input_covariances_equal_the_inputs_recomputed_from_the_hidden_states(peft_model):
    model, tok = peft_model
    layers = subspace.lora_linears(model)
    model.train()
    assert layers and all(name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                          for name in layers)
    sums, count = subspace.input_covariances(model, tok, GENERAL, layers, batch_size=3)  # a padded batch, then one row
    assert model.training  # the mode it was in

    decoder = model.base_model.model.model
    expected, real = {}, 0
    with torch.no_grad(), model.disable_adapter():
        for start in (0, 3):
            batch = collate([tokens(e, tok) for e in GENERAL[start:start + 3]], tok.pad_token_id)
            mask = batch["attention_mask"].bool()
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
            real += int(mask.sum())
            for i, layer in enumerate(decoder.layers):
                x = layer.input_layernorm(hidden[i])[mask].double()  # (N, d): what q, k and v read
                expected[i] = expected.get(i, 0) + x.T @ x
    assert count == real == sum(len(tokens(e, tok)[0]) for e in GENERAL)
    for i in range(len(decoder.layers)):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = next(n for n in layers if n.endswith(f"layers.{i}.self_attn.{proj}"))
            torch.testing.assert_close(sums[name], expected[i], rtol=1e-5, atol=1e-4)


def test_projection_keeps_each_lora_a_in_its_subspace_through_training(peft_model):
    model, tok = peft_model
    bases = subspace.task_bases(model, tok, TASK, GENERAL, 3, batch_size=2)
    layers = subspace.lora_linears(model)
    assert set(bases) == set(layers)
    assert subspace.off_subspace(model, bases) > 0.5  # PEFT's random A reads every direction
    subspace.project(model, bases)
    assert subspace.off_subspace(model, bases) < 1e-6

    # An optimizer step moves A off the subspace (Adam is not rotation-equivariant); the callback puts it back.
    # (B is made nonzero first: at PEFT's B = 0, A gets no gradient.)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    callback = subspace.ProjectionCallback(model, bases)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate([tokens(e, tok) for e in TASK], tok.pad_token_id)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert subspace.off_subspace(model, bases) > 1e-4
        callback.on_optimizer_step(None, None, None, model=model)
        assert subspace.off_subspace(model, bases) < 1e-6

    # So a layer's LoRA adds nothing for an input outside its subspace, and something inside it.
    name = next(n for n in layers if n.endswith("layers.0.self_attn.q_proj"))
    layer, (q, _) = layers[name], bases[name]
    z = torch.randn(5, q.shape[0], dtype=torch.float64)
    outside, inside = (z - z @ q @ q.T).float(), (z @ q @ q.T).float()
    delta = lambda x: layer.lora_B["default"](layer.lora_A["default"](x))  # noqa: E731
    assert delta(outside).abs().max() < 1e-5 * delta(inside).abs().max()


@pytest.mark.parametrize("kwargs,message", [
    ({"task_subspace": -1}, "--task-subspace must be in 0..65536"),
    ({"task_subspace": 70000}, "--task-subspace must be in 0..65536"),
    ({"task_subspace": 8, "method": "ia3"}, "--task-subspace restricts LoRA's A matrices: it needs --method lora"),
    ({"task_subspace": 8, "use_dora": True}, "without --use-dora"),
])
def test_bad_task_subspace_specs(kwargs, message):
    with pytest.raises(InvalidArgument, match=message.replace(".", r"\.").replace("(", r"\(")):
        TrainingSpec(name="x", **kwargs)
