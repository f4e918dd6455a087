"""data.document_end: training on a packed stream of documents, each attending only within itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.lab import experiment as ex
from attention_jax.lab import steps
from attention_jax.lab.config import ConfigError, validate
from attention_jax.lab.loop import train
from attention_jax.lab.runs import load_run
from attention_jax.model import cross_entropy, segment_ids_from_ends


def test_segment_ids_from_ends_close_each_document_with_its_end_token():
    tokens = jnp.asarray([[4, 5, 0, 6, 0, 7], [0, 0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(
        np.asarray(segment_ids_from_ends(tokens, 0)), [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    )


def test_the_loss_of_a_packed_batch_is_that_of_its_documents_masked_apart(tiny_config, small_text):
    text = small_text(3000)
    packed = ex.Experiment.from_config(tiny_config(**{"data.document_end": "."}), text=text)
    plain = ex.Experiment.from_config(tiny_config(), text=text)
    end = packed.tokenizer.encode(".")[0]
    assert packed.model_config.end_token_id == end and plain.model_config.end_token_id is None
    params = jax.jit(packed.model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    x, y = steps.batch(jax.random.key(1), packed.train_data, 16, 8)
    assert np.any(np.asarray(x)[:, :-1] == end)  # some window holds a document boundary
    ids = np.cumsum(np.asarray(x) == end, axis=1) - (np.asarray(x) == end)  # numpy: the end closes its document
    key = jax.random.key(2)
    got = steps.loss_fn(params, packed.model, x, y, key, True)
    want = cross_entropy(plain.model.apply({"params": params}, x, segment_ids=jnp.asarray(ids)), y)
    unpacked = steps.loss_fn(params, plain.model, x, y, key, True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert abs(float(got) - float(unpacked)) > 1e-4  # the boundaries act


def test_a_packed_run_trains_resumes_and_samples_with_its_end_token(tmp_path, tiny_config, small_text):
    text = small_text(3000)
    config = tiny_config(max_iters=4, eval_interval=2, checkpoint_every=2, **{"data.document_end": "."})
    summary = train(config, tmp_path / "w", text=text, progress=False)
    assert np.isfinite(summary["final_val_loss"][0])
    run = load_run(tmp_path / "w")
    assert run.model.model_config.end_token_id == run.tokenizer.encode(".")[0]  # config.json round trip


@pytest.mark.parametrize("bad, why", [("ab", "must be one character"), ("", "must be one character")])
def test_a_bad_document_end_is_one_line_naming_the_key(tiny_config, bad, why):
    with pytest.raises(ConfigError, match=rf"^data\.document_end.*{why}"):
        validate(tiny_config(**{"data.document_end": bad}))


def test_a_document_end_missing_from_the_text_is_refused_before_training(tiny_config, small_text):
    with pytest.raises(ConfigError, match=r"^data\.document_end='§' does not occur in the text"):
        ex.Experiment.from_config(tiny_config(**{"data.document_end": "§"}), text=small_text(3000))
